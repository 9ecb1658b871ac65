"""Bad input never costs a traceback or a finished run (issue 12).

One table of bad commands, each run through experiments/run.py's own flag parser and main
in-process (a subprocess costs 5-10 s of start-up each; `test_cli.py` keeps the subprocess
checks), against one tiny finished workdir trained once for the module. Every case must end
with a non-zero exit, exactly one stderr line starting with "error:", no traceback, and the
finished workdir byte-identical. On the code before this change 28 of the 35 first cases failed
(tracebacks, exit 0 with the bad values written into config.json, lines without file names),
and so did the five tests after the table.
"""

import errno
import hashlib
import json
import math
import os
import shutil

import pytest

from tests.conftest import run_main

TINY = ["--config=experiments/base.py", "--config.model.num_layers=1",
        "--config.model.d_model=32", "--config.model.d_ff=64", "--config.data.seq_len=32",
        "--config.train.num_steps=4", "--config.train.warmup_steps=1",
        "--config.train.batch_size=4", "--config.train.eval_batches=1",
        "--config.train.eval_batch_size=8", "--config.train.log_every=2",
        "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
        "--config.sample.num_samples=0"]


def digest(directory) -> dict:
  """{relative path: sha256} of every file under `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("finished") / "run"
  assert run_main(*TINY, f"--workdir={workdir}") == 0
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  return workdir


def _syntax_error_config(tmp):
  path = tmp / "broken.py"
  path.write_text("import ml_collections\n\ndef get_config(:\n  pass\n")
  return [f"--config={path}"], f"{path}:3"


def _raising_config(tmp):
  path = tmp / "raising.py"
  path.write_text("from experiments import base\n\ndef get_config():\n  config = base.get_config()\n"
                  "  config.train.num_steps = undefined_name\n  return config\n")
  return [f"--config={path}"], f"{path}:5"


def _config_import_fails(tmp):  # old: the message without FILE:LINE
  path = tmp / "imports.py"
  path.write_text("import ml_collections\nimport no_such_module_here\n\ndef get_config():\n  pass\n")
  return [f"--config={path}"], f"{path}:2: ModuleNotFoundError"


def _config_without_get_config(tmp):  # old: "unknown config key 'module'"
  path = tmp / "noget.py"
  path.write_text("from lm.config import base_config\nCONFIG = base_config()\n")
  return [f"--config={path}"], "defines no get_config()"


def _workdir_is_a_file(tmp):
  path = tmp / "afile"
  path.write_text("x")
  return [f"--workdir={path}"], "is a file"


def _empty_workdir_for_eval(tmp):
  return [f"--workdir={tmp / 'nothing'}", "--mode=eval"], "holds no checkpoints"


def _utf16_data(tmp):
  path = tmp / "utf16.txt"
  path.write_bytes(("To be, or not to be, that is the question.\n" * 200).encode("utf-16"))
  return [f"--config.data.path={path}"], "contains NUL bytes"


def _token_file_for_a_char_run(tmp):
  import numpy as np
  path = tmp / "bytes.npy"
  np.save(path, np.frombuffer(b"To be, or not to be. " * 300, np.uint8).astype(np.uint16))
  return ["--mode=eval", f"--data_path={path}"], "character tokenizer"


def _enospc(path=None):
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def _read_only(monkeypatch, finished):
  """Any write under the finished workdir fails as on a read-only file system (the tests run
  as root, which ignores permission bits, so the refusal is injected)."""
  import builtins
  real_open, real_makedirs = builtins.open, os.makedirs

  def guarded_open(file, mode="r", *a, **k):
    if any(c in mode for c in "wax+") and str(file).startswith(str(finished)):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
    return real_open(file, mode, *a, **k)
  monkeypatch.setattr(builtins, "open", guarded_open)
  monkeypatch.setattr(os, "makedirs", lambda p, *a, **k: (
      real_makedirs(p, *a, **k) if not str(p).startswith(str(finished)) or os.path.isdir(p)
      else (_ for _ in ()).throw(OSError(errno.EROFS, os.strerror(errno.EROFS), str(p)))))


CLASSIFY = "--config=experiments/finetune_classify.py"  # replaces TINY's config file

# (id, extra args or a function of tmp_path -> (args, expected fragment), fragment)
# Arguments come after TINY and --workdir=<finished>, so later ones win.
CASES = [
    ("seq_len_zero", ["--config.data.seq_len=0"], "data.seq_len=0"),
    ("batch_size_zero", ["--config.train.batch_size=0"], "train.batch_size=0"),
    ("negative_lr", ["--config.train.learning_rate=-1"], "train.learning_rate=-1"),
    ("attention_impl", ["--config.model.attention_impl=nonsense"], "model.attention_impl"),
    ("dtype", ["--config.model.dtype=float8"], "model.dtype='float8'"),
    ("positions", ["--config.model.positions=alibi"], "model.positions"),
    ("norm", ["--config.model.norm=mid"], "model.norm"),
    ("mlp", ["--config.model.mlp=relu"], "model.mlp"),
    ("norm_type", ["--config.model.norm_type=batchnorm"], "model.norm_type='batchnorm'"),
    ("rope_scaling", ["--config.model.rope_scaling=yarn:factor=4"], "model.rope_scaling='yarn"),
    ("tokenizer", ["--config.data.tokenizer=words"], "data.tokenizer='words'"),
    ("dropout_one", ["--config.model.dropout=1.0"], "model.dropout=1.0"),
    ("val_fraction_zero", ["--config.data.val_fraction=0"], "data.val_fraction"),
    ("warmup_over_steps", ["--config.train.warmup_steps=10"], "train.warmup_steps=10"),
    ("grad_accum_split", ["--config.train.grad_accum=3"], "train.grad_accum=3"),
    ("heads_split", ["--config.model.d_model=30"], "model.d_model=30"),
    ("kv_heads_split", ["--config.model.num_kv_heads=3"], "model.num_kv_heads=3"),
    ("beta2_one", ["--config.train.beta2=1.0"], "train.beta2=1.0"),
    ("negative_layers", ["--config.model.num_layers=-1"], "model.num_layers=-1"),
    ("mesh_zero", ["--config.mesh.tensor=0"], "mesh.tensor=0"),
    ("negative_seed", ["--config.seed=-1"], "seed=-1"),
    ("grad_clip_zero", ["--config.train.grad_clip=0"], "train.grad_clip=0"),
    ("min_lr_ratio", ["--config.train.min_lr_ratio=2"], "train.min_lr_ratio=2"),
    ("eval_batches_zero", ["--config.train.eval_batches=0"], "train.eval_batches=0"),
    ("unknown_task", ["--config.train.task=regression"], "train.task='regression'"),
    ("top_p_zero", ["--mode=sample", "--top_p=0"], "sample.top_p=0.0"),
    ("negative_temperature", ["--mode=sample", "--temperature=-1"], "sample.temperature=-1.0"),
    ("resume_other_shape", ["--config.model.d_ff=96"], "model.d_ff=64"),
    # Issue 13: fields that change numerics, not shapes, were resumed silently (old: exit 0).
    ("resume_other_rope_theta", ["--config.model.rope_theta=500000.0"],
     "checkpoint has model.rope_theta=10000.0 but the config says 500000.0"),
    ("resume_other_ln_eps", ["--config.model.ln_eps=1e-6"],
     "checkpoint has model.ln_eps=1e-05 but the config says 1e-06"),
    ("init_from_missing", ["--config.train.init_from=/nonexistent/run"], "/nonexistent/run"),
    ("eval_data_missing", ["--mode=eval", "--data_path=/nonexistent.txt"], "matches no file"),
    ("unknown_key", ["--config.train.num_step=3"], "num_step"),
    ("syntax_error", _syntax_error_config, None),
    ("config_raises", _raising_config, None),
    ("config_import_fails", _config_import_fails, None),
    ("config_without_get_config", _config_without_get_config, None),
    ("workdir_is_file", _workdir_is_a_file, None),
    ("eval_without_checkpoints", _empty_workdir_for_eval, None),
    ("classify_min_chars", [CLASSIFY, "--config.classify.min_chars=-1"], "classify.min_chars=-1"),
    ("classify_eval_of_an_lm", [CLASSIFY, "--mode=eval"], "has no classification head"),
    # Found by a new-user review (2026-11-29): each was a traceback, or a wrong result.
    ("cudnn_without_gpu", ["--config.model.attention_impl=cudnn"], "needs a CUDA GPU"),
    ("huge_seed", ["--config.seed=18446744073709551616"], "seed=18446744073709551616"),
    ("infinite_weight_decay", ["--config.train.weight_decay=inf"], "train.weight_decay=inf"),
    ("float32_overflow_temperature", ["--mode=sample", "--temperature=1e308"],
     "sample.temperature=1e+308"),
    ("sample_zero_samples", ["--mode=sample", "--num_samples=0"], "sample.num_samples=0"),
    ("sample_a_classifier", [CLASSIFY, "--mode=sample", "--num_samples=1"],
     "needs a language model"),
    ("utf16_text", _utf16_data, None),
    ("eval_token_file_with_char_run", _token_file_for_a_char_run, None),
    ("read_only_resume", ["--config.train.num_steps=6", "read_only"], "Read-only file system"),
    ("read_only_eval", ["--mode=eval", "read_only"], "Read-only file system"),
    # Issue 14: the encoder family and its masked-LM task.
    ("unknown_arch", ["--config.model.arch=bert"], "model.arch='bert': expected one of"),
    ("mlm_with_a_decoder", ["--config.train.task=mlm"], "needs model.arch='encoder'"),
    ("mlm_on_a_char_lm_run", ["--config=experiments/bert_mlm.py"],
     "masked-LM needs a tokenizer with [CLS], [SEP], [PAD], [MASK]"),
]


@pytest.mark.parametrize("name,extra,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_the_finished_run_alone(
    name, extra, fragment, finished, tmp_path, capfd, monkeypatch):
  before = digest(finished)
  args = [*TINY, f"--workdir={finished}"]
  if callable(extra):
    extra, fragment = extra(tmp_path)
  files = [a for a in extra if a.startswith("--config=")]
  if files:  # one config file, named before its overrides
    args = [*files, *args[1:]]
    extra = [a for a in extra if a not in files]
  if "read_only" in extra:
    extra = [a for a in extra if a != "read_only"]
    _read_only(monkeypatch, finished)
  code = run_main(*args, *extra)
  monkeypatch.undo()
  out, err = capfd.readouterr()
  errors = [l for l in err.splitlines() if l.startswith("error:")]
  assert code not in (0, None), err[-2000:]
  assert "Traceback" not in err, err[-3000:]
  assert len(errors) == 1, err[-2000:]
  assert fragment in errors[0], errors[0]
  assert digest(finished) == before
  if name == "read_only_eval":  # the result reached stdout before the failing write
    assert json.loads(out.strip().splitlines()[-1])["val_tokens"] > 0
  assert not (tmp_path / "nothing").exists()


def test_non_finite_loss_by_construction_stops_without_saving(tmp_path, capfd):
  """A learning rate of 1e30 overflows the parameters at once: the run stops naming the step,
  before any checkpoint or metric of a non-finite state (before: exit 0 with NaN losses)."""
  workdir = tmp_path / "nan"
  code = run_main(*TINY, f"--workdir={workdir}", "--config.train.learning_rate=1e30",
                  "--config.train.warmup_steps=0")
  err = capfd.readouterr().err
  errors = [l for l in err.splitlines() if l.startswith("error:")]
  assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
  assert "non-finite loss or gradient norm at step" in errors[0]
  assert "no checkpoint was saved" in errors[0]
  assert not os.listdir(workdir / "checkpoints")
  assert not (workdir / "metrics.jsonl").exists()


@pytest.mark.parametrize("damage", ["truncated_state", "foreign_step_directory",
                                    "non_finite_state"])
def test_a_damaged_checkpoint_is_one_line(damage, finished, tmp_path, capfd):
  """Truncated array files in the latest step, a stray directory under checkpoints/ that
  Orbax takes for a step, or a step whose arrays read back as NaN (bytes flipped on disk):
  eval, resume and sample end in one line naming the checkpoint (before: a 149-line
  tensorstore traceback, KeyError 'meta', or for NaN: eval named no checkpoint, a resume
  stopped after a step advising a lower learning rate, sample printed with exit 0)."""
  workdir = tmp_path / "copy"
  shutil.copytree(finished, workdir)
  if damage == "truncated_state":
    step = workdir / "checkpoints" / "4"
    for root, _, files in os.walk(step / "state"):
      for name in files:
        if "ocdbt" in root or name.startswith("ocdbt") or name.endswith(".data"):
          open(os.path.join(root, name), "wb").close()
    expected = "checkpoint " + str(step)
  elif damage == "foreign_step_directory":
    (workdir / "checkpoints" / "9").mkdir()
    (workdir / "checkpoints" / "9" / "notes.txt").write_text("not a checkpoint")
    expected = "checkpoint " + str(workdir / "checkpoints" / "9")
  else:  # step 4's state with every float NaN, saved as step 5
    import jax
    import jax.numpy as jnp
    import ml_collections
    from lm import checkpoint as ckpt_lib
    from lm import runtime
    ckpt, meta = ckpt_lib.read_meta(str(workdir))
    _, state, _, _ = runtime.load(ml_collections.ConfigDict(meta["config"]), str(workdir))
    nan = lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x
    ckpt.save(5, jax.tree.map(nan, state), {**meta, "step": 5})
    ckpt.close()
    expected = "checkpoint " + str(workdir / "checkpoints" / "5")
  before = digest(workdir)
  for mode in ("--mode=eval", "--mode=train", "--mode=sample"):
    code = run_main(*TINY, f"--workdir={workdir}", mode, "--config.train.num_steps=6",
                    "--num_samples=1", "--max_new_tokens=3")
    err = capfd.readouterr().err
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert expected in errors[0] and "cannot be read" in errors[0], errors[0]
    assert "bound method" not in errors[0]  # tensorstore's cut-off pointer to its details
  assert digest(workdir) == before


def test_parameters_that_overflow_every_forward_pass_are_never_saved(tmp_path, capfd):
  """lr 1e30 with clipping off: the first update moves the parameters to ~1e30, finite, and the
  loss and gradient norm of that step are finite too, so only a forward pass of the new
  parameters shows that they are unusable. With a checkpoint every step the old code saved
  them (then eval printed NaN with exit 0); now the run stops before saving, and every
  checkpoint left behind evaluates to a finite loss."""
  workdir = tmp_path / "overflow"
  code = run_main(*TINY, f"--workdir={workdir}", "--config.train.learning_rate=1e30",
                  "--config.train.grad_clip=1e30", "--config.train.warmup_steps=0",
                  "--config.train.checkpoint_every=1", "--config.train.log_every=100",
                  "--config.train.eval_every=100")
  err = capfd.readouterr().err
  errors = [l for l in err.splitlines() if l.startswith("error:")]
  assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
  assert "non-finite loss" in errors[0] and "without saving" in errors[0], errors[0]
  if os.listdir(workdir / "checkpoints"):  # the latest one left behind is usable
    assert run_main(*TINY, f"--workdir={workdir}", "--mode=eval") == 0
    result = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert math.isfinite(result["val_loss"]), result


@pytest.mark.parametrize("where", ["checkpoint", "metrics"])
def test_disk_full_ends_in_one_line_and_keeps_the_last_checkpoint(where, finished, tmp_path,
                                                                  capfd, monkeypatch):
  """ENOSPC injected inside Orbax's writer (the JSON record of a step) or at the metrics write
  of a resumed run: one error line; the latest checkpoint stays the last complete one (4)."""
  workdir = tmp_path / "copy"
  shutil.copytree(finished, workdir)
  if where == "checkpoint":
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch

    async def full(self, x, directory):
      raise _enospc(str(directory))
    monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", full)
  else:
    import lm.runtime
    monkeypatch.setattr(lm.runtime.MetricsWriter, "_event",
                        lambda self, **kw: (_ for _ in ()).throw(_enospc("events")))
  code = run_main(*TINY, f"--workdir={workdir}", "--config.train.num_steps=6")
  monkeypatch.undo()
  err = capfd.readouterr().err
  errors = [l for l in err.splitlines() if l.startswith("error:")]
  assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
  assert "No space left on device" in errors[0]
  if where == "checkpoint":
    assert "saving checkpoint 6" in errors[0] and "latest complete checkpoint is 4" in errors[0]
  from lm import workdir as workdir_lib
  ckpt, latest = workdir_lib.existing_checkpoints(str(workdir))
  ckpt.close()
  assert latest == 4
  assert run_main(*TINY, f"--workdir={workdir}", "--config.train.num_steps=6") == 0
  assert sorted(os.listdir(workdir / "checkpoints"))[-1] == "6"
  history = [json.loads(l) for l in (workdir / "config_history.jsonl").read_text().splitlines()]
  assert history[-1] == {"step": 4, "changed": {"train.num_steps": [4, 6]}}
  assert (workdir / "config.json").read_bytes() == (finished / "config.json").read_bytes()


def test_nan_at_step_k_stops_with_the_checkpoint_before_k_intact_and_resumable(
    tmp_path, capfd, monkeypatch):
  """The step function is wrapped (test-only) to make the state and loss NaN at step K=5.
  Checks run where the loop syncs anyway (here the save at step 6, logs every 4), yet the error
  names step 5; checkpoint 4 stays the latest, is finite, and resuming reaches the end.
  Before: the NaN state was saved as checkpoint 6 and 8 and the run exited 0."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from lm import train, workdir as workdir_lib
  real, K = train.make_train_step, 5

  def poisoned(run, loss_fn):
    step_fn = real(run, loss_fn)

    def step(state, batch, i):
      state, metrics = step_fn(state, batch, i)
      if i + 1 == K:  # the update that makes K steps done
        nan = lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x
        state, metrics = jax.tree.map(nan, state), {**metrics, "train_loss": jnp.nan}
      return state, metrics
    return step
  monkeypatch.setattr(train, "make_train_step", poisoned)
  workdir = tmp_path / "run"
  args = [*TINY, f"--workdir={workdir}", "--config.train.num_steps=8",
          "--config.train.log_every=4", "--config.train.eval_every=8"]
  assert run_main(*args) == 2
  err = capfd.readouterr().err
  errors = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
  assert "non-finite loss or gradient norm at step 5" in errors[0]
  assert "the latest checkpoint is step 4" in errors[0]
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "train_loss" in r] == [4]
  ckpt, latest = workdir_lib.existing_checkpoints(str(workdir))
  assert latest == 4
  import orbax.checkpoint as ocp
  state = ckpt.manager.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  ckpt.close()
  leaves = [np.asarray(x) for x in jax.tree.leaves(state.state)]
  assert leaves and all(np.isfinite(x).all() for x in leaves if x.dtype.kind == "f")
  monkeypatch.setattr(train, "make_train_step", real)
  assert run_main(*args) == 0
  assert sorted(os.listdir(workdir / "checkpoints"), key=int)[-1] == "8"


def test_a_prompt_the_tokenizer_cannot_encode_warns_after_training_and_fails_sampling(
    tmp_path, capfd, caplog):
  """A word-piece LM with the default prompt ("\\n", whitespace to word pieces): the run
  trained, saved and then exited 2 with "every prompt needs at least one token" (2026-11-30).
  Now the end-of-run samples are a warning and --mode=sample is one clear line."""
  workdir = tmp_path / "wp"
  args = [a for a in TINY if a != "--config.sample.num_samples=0"]
  args += ["--config.data.tokenizer=wordpiece", "--config.data.vocab_size=512",
           "--config.sample.max_new_tokens=4", f"--workdir={workdir}"]
  assert run_main(*args) == 0
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any("no samples: the prompt '\\n' encodes to no tokens with the wordpiece tokenizer"
             in w for w in warnings), warnings
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  assert run_main(*args, "--mode=sample") == 2
  lines = [l for l in capfd.readouterr().err.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "encodes to no tokens" in lines[0], lines
  assert run_main(*args, "--mode=sample", "--prompt=ROMEO") == 0
