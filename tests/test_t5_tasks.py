"""The encoder-decoder tasks (issue 15): seq2seq (lm/tasks/seq2seq.py) and span corruption
(lm/tasks/span_corruption.py) through the run lifecycle: batches, loss, runs that train,
evaluate and resume, 8 devices, bad input."""

import json
import os
import signal
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from flax import nnx

from lm import checkpoint as ckpt_lib
from lm import tokenizers
from lm import validate
from lm.tasks import seq2seq
from lm.tasks import span_corruption as sc
from tests.conftest import ROOT, assert_trains_like_one_device, run_main

T5 = {"model.arch": "encoder_decoder", "model.positions": "relative", "model.norm": "pre",
      "model.norm_type": "rmsnorm", "model.mlp": "gated_gelu", "model.tie_embeddings": False,
      "model.relative_buckets": 8, "model.relative_max_distance": 16, "model.ln_eps": 1e-6,
      "model.attention_window": 0, "model.attention_impl": "xla", "model.num_layers": 1,
      "model.num_decoder_layers": 0,  # as num_layers (t5_restore.py's decoder has 3)
      "model.d_model": 32, "model.d_ff": 32, "model.num_heads": 2, "data.seq_len": 40,
      "train.task": "seq2seq", "train.batch_size": 4, "train.eval_batch_size": 4}

WORDS = "the king is dead long live the king o romeo wherefore art thou to be or not".split()


def write_pairs(path, n=14, seed=0):
  """n pairs of a toy restoration task (input: lower case, no punctuation), in a .jsonl file."""
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for i in range(n):  # every input different (the number)
      words = list(rng.choice(WORDS, size=rng.integers(1, 4))) + [str(i)]
      f.write(json.dumps({"input": " ".join(words),
                          "target": " ".join(words).capitalize() + "."}) + "\n")
  return str(path)


def t5_config(make_config, **overrides):
  config = make_config(**{**T5, **overrides})
  with config.unlocked():
    config.seq2seq = {"max_target_len": 40, "eval_generate": 0}
  return config


def test_seq2seq_batches_rows_masks_shift_and_epochs(tmp_path, make_config):
  """Rows are the pair's tokens + EOS right-padded with <pad>; the masks mark exactly the real
  tokens; decoder inputs are the targets shifted right behind decoder_start_id (= <pad>); a
  batch is a function of (seed, step) and an epoch of steps holds every pair once. Checked to
  fail: decoder inputs unshifted, or weights on the padding."""
  config = t5_config(make_config, **{"data.path": write_pairs(tmp_path / "p.jsonl", 14),
                                     "data.val_fraction": 0.15})
  config, tok, data = seq2seq.TASK.load_data(config, None)
  train, val = seq2seq.read_pairs(config.data.path, "input", "target"), data.val_pairs
  assert len(data.train.inputs) == 12 and len(val.inputs) == 2  # the last 2 held out
  sp = tok.special_ids
  assert config.model.decoder_start_id == sp["<pad>"] == data.specials.pad
  seen = []
  for step in range(3):  # 3 steps of 4 rows: one epoch of the 12 training pairs
    b = seq2seq.TASK.batch(data, config, step)
    assert b["inputs"].shape == (4, 40) and b["targets"].shape == (4, 40)
    for r in range(4):
      k = [i for i in range(12) if np.array_equal(b["inputs"][r], data.train.inputs[i])][0]
      seen.append(k)
      x = list(tok.encode(train.inputs[k])) + [sp["</s>"]]
      y = list(tok.encode(train.targets[k])) + [sp["</s>"]]
      assert list(b["inputs"][r]) == x + [sp["<pad>"]] * (40 - len(x))
      assert list(b["attention_mask"][r]) == [1] * len(x) + [0] * (40 - len(x))
      assert list(b["targets"][r]) == y + [sp["<pad>"]] * (40 - len(y))
      assert list(b["weights"][r]) == [1.0] * len(y) + [0.0] * (40 - len(y))
      assert list(b["decoder_inputs"][r]) == [config.model.decoder_start_id] + \
          list(b["targets"][r][:-1])
  assert sorted(seen) == list(range(12))
  again, other = seq2seq.TASK.batch(data, config, 1), seq2seq.TASK.batch(data, config, 5)
  b = seq2seq.TASK.batch(data, config, 1)
  for name in b:
    np.testing.assert_array_equal(b[name], again[name])
  assert not np.array_equal(b["inputs"], other["inputs"])


def test_length_buckets_cut_batches_of_similar_lengths(tmp_path, make_config):
  """seq2seq.length_buckets=4: each batch is cut to the smallest quarter of the full lengths
  that holds its rows (nothing real is cut: the same rows as the uncut pairs), and 16 steps
  (one chunk) hold 16 * batch_size different pairs of the epoch. Checked to fail with the
  cut one bucket too short."""
  config = t5_config(make_config, **{"data.path": write_pairs(tmp_path / "p.jsonl", 80)})
  with config.unlocked():
    config.seq2seq.length_buckets = 4
  config, tok, data = seq2seq.TASK.load_data(config, None)
  pad, seen, widths = data.specials.pad, [], set()
  for step in range(16):
    b = seq2seq.TASK.batch(data, config, step)
    width = b["inputs"].shape[1]
    assert width in (10, 20, 30, 40) and b["targets"].shape[1] == width
    widths.add(width)
    for r in range(4):
      k = [i for i in range(len(data.train.inputs))
           if np.array_equal(b["inputs"][r], data.train.inputs[i, :width])][0]
      seen.append(k)
      assert (data.train.inputs[k, width:] == pad).all()
      assert (data.train.targets[k, width:] == pad).all()
      np.testing.assert_array_equal(b["targets"][r], data.train.targets[k, :width])
    longest = max((b["inputs"] != pad).sum(1).max(), (b["targets"] != pad).sum(1).max())
    assert longest > width - 10  # the smallest bucket that holds the batch
  assert len(set(seen)) == 64 and len(widths) > 1


def test_span_corruption_batches_and_fixed_held_out_windows(tmp_path, make_config):
  """Rows of one length, no padding; targets open with <extra_id_0>; both end with EOS;
  decoder inputs shifted behind <pad>; putting the spans back gives a window of the corpus;
  the same (seed, step) the same batch; held-out examples identical at every load."""
  text = " ".join(np.random.default_rng(0).choice(WORDS, 3000))
  (tmp_path / "t.txt").write_text(text)
  config = t5_config(make_config, **{"train.task": "span_corruption",
                                     "data.path": str(tmp_path / "t.txt")})
  config, tok, data = sc.TASK.load_data(config, None)
  sp = tok.special_ids
  first = sp["<extra_id_0>"]
  assert sp["<extra_id_7>"] == first - 7 and data.specials.num_sentinels == 100
  b = sc.TASK.batch(data, config, 3)
  raw = sc.raw_length_for(40, 0.15, 3.0)
  assert b["inputs"].shape == (4, sc.corrupted_lengths(raw, 0.15, 3.0)[0])
  assert b["inputs"].shape[1] <= 40 and b["attention_mask"].all() and b["weights"].all()
  assert (b["targets"][:, 0] == first).all() and (b["targets"][:, -1] == sp["</s>"]).all()
  assert (b["inputs"][:, -1] == sp["</s>"]).all()
  assert (b["decoder_inputs"][:, 0] == sp["<pad>"]).all()
  np.testing.assert_array_equal(b["decoder_inputs"][:, 1:], b["targets"][:, :-1])
  for r in range(4):  # the spans back at their sentinels give raw text of the corpus
    fill, cur = {}, None
    for t in b["targets"][r][:-1]:
      if t > first - 100 and t <= first:
        cur = int(t)
        fill[cur] = []
      else:
        fill[cur].append(int(t))
    restored = [x for t in b["inputs"][r][:-1]
                for x in (fill[int(t)] if first - 100 < t <= first else [int(t)])]
    assert len(restored) == raw and tok.decode(restored) in text
  again = sc.TASK.batch(data, config, 3)
  assert all(np.array_equal(b[k], again[k]) for k in b)
  assert not np.array_equal(b["inputs"], sc.TASK.batch(data, config, 4)["inputs"])
  _, _, data2 = sc.TASK.load_data(config, tok)
  np.testing.assert_array_equal(data2.val.inputs, data.val.inputs)
  np.testing.assert_array_equal(data2.val.targets, data.val.targets)


def test_loss_is_teacher_forced_cross_entropy_of_the_real_targets(tmp_path, make_config):
  """The task's loss and accuracy against float64 numpy over the model's logits at the
  weighted positions only (checked to fail with the padding weighted)."""
  from lm.model import build
  config = t5_config(make_config, **{"data.path": write_pairs(tmp_path / "p.jsonl")})
  config, tok, data = seq2seq.TASK.load_data(config, None)
  batch = seq2seq.TASK.batch(data, config, 0)
  model = build(validate.model_config(config, tok.vocab_size), nnx.Rngs(0))
  # Jitted: eager dispatch of a two-stack model takes a minute on a busy CPU.
  loss, metrics = nnx.jit(lambda m, b: seq2seq.TASK.loss(m, b, None))(model, batch)
  logits = np.asarray(nnx.jit(lambda m, b: m(b["inputs"], b["decoder_inputs"],
                                             b["attention_mask"]))(model, batch), np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  w = batch["weights"]
  assert 0 < w.sum() < w.size
  np.testing.assert_allclose(float(loss), (nll * w).sum() / w.sum(), rtol=1e-5)
  acc = ((logits.argmax(-1) == batch["targets"]) * w).sum() / w.sum()
  np.testing.assert_allclose(float(metrics["train_accuracy"]), acc, rtol=1e-6)


def test_generation_metrics_against_the_copy_baseline():
  pairs = seq2seq.Pairs(["to be or not", "o romeo"], ["To be, or not.", "O Romeo!"])
  out = seq2seq.generation_metrics(["To be, or not.", "O romeo"], pairs)
  assert out["exact_match"] == 0.5 and out["copy_exact_match"] == 0.0
  assert out["cer"] == pytest.approx(2 / 22)  # "O romeo" -> "O Romeo!": 2 edits
  assert out["copy_cer"] == pytest.approx((3 + 3) / 22)


# --- runs through experiments/run.py ------------------------------------------------------

def tiny_args(data_path, workdir, *extra, **overrides):
  """run.py arguments of a tiny T5 on experiments/t5_restore.py; overrides as "a.b": value."""
  over = {**T5, "train.num_steps": 8, "train.warmup_steps": 1, "train.log_every": 2,
          "train.eval_every": 4, "train.eval_batches": 1, "train.checkpoint_every": 4,
          "train.learning_rate": 1e-2, "sample.num_samples": 1, "data.path": data_path,
          "seq2seq.max_target_len": 40, "seq2seq.length_buckets": 4, **overrides}
  return ["--config=experiments/t5_restore.py", *(f"--config.{k}={v}" for k, v in over.items()),
          f"--workdir={workdir}", *extra]


def final_params(workdir):
  from lm import runtime
  from experiments import t5_restore
  run, state, _, step = runtime.load(t5_restore.get_config(), workdir)
  return step, {"/".join(map(str, p)): np.asarray(v.get_value())
                for p, v in nnx.to_flat_state(state)}


@pytest.mark.slow
def test_run_trains_evaluates_and_resumes_bit_exactly_after_sigkill(tmp_path, capfd):
  """experiments/run.py end to end on a tiny T5: a straight 8-step run, and the same run
  SIGKILLed right after its step-4 checkpoint (tests/crash_driver.py) then resumed: identical
  parameters, optimizer state and final validation loss. --mode=eval prints the CER and
  exact match of greedy generation over every held-out pair beside the copy baseline."""
  data = write_pairs(tmp_path / "p.jsonl", 40)
  straight, crashed = tmp_path / "straight", tmp_path / "crashed"
  assert run_main(*tiny_args(data, straight)) == 0
  out, _ = capfd.readouterr()
  assert "--- output ---" in out  # the end-of-run report: a validation pair restored
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "crash_driver.py"), "4",
                         "after", "--", *tiny_args(data, crashed)], capture_output=True,
                        text=True, timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert sorted(os.listdir(crashed / "checkpoints")) == ["4"]
  assert run_main(*tiny_args(data, crashed)) == 0
  (s1, a), (s2, b) = final_params(straight), final_params(crashed)
  assert s1 == s2 == 8 and a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  capfd.readouterr()
  assert run_main(*tiny_args(data, straight, "--mode=eval")) == 0
  result = json.loads(capfd.readouterr()[0].strip().splitlines()[-1])
  pairs = seq2seq.read_pairs(data, "input", "target")
  val = pairs.targets[-4:]  # data.val_fraction 0.1 of 40 pairs
  assert result["generated_pairs"] == 4
  assert result["copy_cer"] == pytest.approx(seq2seq.char_error_rate(pairs.inputs[-4:], val))
  assert 0 <= result["cer"] and 0 <= result["exact_match"] <= 1 and result["val_tokens"] > 0


def test_the_embedded_restoration_task_reports_constrained_decoding(tmp_path, capfd):
  """experiments/t5_restore.py's own data (data.path ""): the evaluations also score decoding
  constrained to spell the input (metrics.jsonl), and the end-of-run report prints that
  output, whose letters are its input's (a prefix: a 2-step model may fill the length with
  punctuation). Checked to fail with the report's constrained output replaced by the free
  greedy one. The logged tokens/s counts the input and target positions the length-bucketed
  batches had (checked to fail with full-length rows counted, the old count)."""
  over = {"data.path": "", "seq2seq.max_chars": 40, "data.seq_len": 88,  # rows half empty
          "seq2seq.max_target_len": 120, "train.num_steps": 2, "train.eval_every": 2,
          "train.checkpoint_every": 2, "seq2seq.eval_generate": 4, "seq2seq.length_buckets": 4}
  assert run_main(*tiny_args("", tmp_path / "w", **over)) == 0
  records = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text()
             .splitlines()]
  evals = [r for r in records if "val_loss" in r]
  assert evals and evals[-1]["generated_pairs"] == 4 and evals[-1]["cer_constrained"] >= 0
  (log,) = [r for r in records if "tokens_per_sec" in r]  # log_every 2: steps 0 and 1
  ckpt, meta = ckpt_lib.read_meta(str(tmp_path / "w"))
  ckpt.close()
  config, _, data = seq2seq.TASK.load_data(ml_collections.ConfigDict(meta["config"]),
                                           tokenizers.from_json(meta["tokenizer"]))
  positions = [b["inputs"].size + b["targets"].size
               for b in (seq2seq.TASK.batch(data, config, step) for step in (0, 1))]
  assert max(positions) <= config.train.batch_size * (44 + 60)  # cut to half the rows or less
  assert log["tokens_per_sec"] * log["step_time_ms"] / 1e3 == pytest.approx(np.mean(positions))
  report = capfd.readouterr()[0].split("--- input ---\n", 1)[1]
  given = report.split("\n--- output ---", 1)[0]
  spelled = report.split("--- constrained ---\n", 1)[1].split("\n--- target ---", 1)[0]
  assert given.startswith(seq2seq.strip_for_restoration(spelled))


@pytest.mark.slow
def test_span_corruption_pre_training_fine_tunes_into_seq2seq(tmp_path, make_config):
  """A span-corruption run on a text file, then seq2seq with train.init_from its workdir: the
  source's tokenizer (sentinels and all) and every parameter are taken over (checked to fail
  with init_from dropped: a new tokenizer without sentinels)."""
  from lm import runtime, tasks
  text = " ".join(np.random.default_rng(0).choice(WORDS, 3000))
  (tmp_path / "t.txt").write_text(text)
  steps = {"train.num_steps": 2, "train.checkpoint_every": 2, "train.eval_every": 2,
           "train.eval_batches": 1}
  span = t5_config(make_config, **{"train.task": "span_corruption",
                                   "data.path": str(tmp_path / "t.txt"), **steps})
  out = runtime.train(span, str(tmp_path / "span"), tasks.get("span_corruption"))
  assert out["val_tokens"] > 0 and np.isfinite(out["val_loss"])
  src_run, src_state, src_tok, _ = runtime.load(span, str(tmp_path / "span"))
  config = t5_config(make_config, **{"data.path": write_pairs(tmp_path / "p.jsonl"),
                                     "train.init_from": str(tmp_path / "span"), **steps,
                                     "train.learning_rate": 1e-9})
  runtime.train(config, str(tmp_path / "ft"), tasks.get("seq2seq"))
  run, state, tok, _ = runtime.load(config, str(tmp_path / "ft"))
  assert tok.to_json() == src_tok.to_json() and "<extra_id_0>" in tok.special_ids
  start = tok.special_ids["<pad>"]
  assert run.model_cfg.decoder_start_id == src_run.model_cfg.decoder_start_id == start
  src = dict(nnx.to_flat_state(src_state[0]))
  for path, var in nnx.to_flat_state(state[0]):  # 2 steps at lr 1e-9: the source's values
    np.testing.assert_allclose(np.asarray(var.get_value()), np.asarray(src[path].get_value()),
                               atol=1e-6, err_msg=str(path))


EIGHT_DEVICE_WORKER = r'''
import json, sys, types
import jax, numpy as np
from flax import nnx
from lm import sharding, tasks, train
from lm.config import base_config, t5_model
from lm.tasks import seq2seq

c = base_config()
t5_model(c.model, num_layers=2, num_heads=8, d_model=64, d_ff=128)
c.model.attention_impl = "xla"
c.data.seq_len, c.train.batch_size, c.train.num_steps, c.train.warmup_steps = 16, 8, 3, 1
c.train.learning_rate, c.train.adam_eps, c.train.task = 1e-2, 1e-3, "seq2seq"  # as sharding_worker
specials = seq2seq.Specials(pad=0, eos=1, first_sentinel=-1, num_sentinels=0)
rng = np.random.default_rng(0)
batches = []
for step in range(3):  # rows of different lengths: padding in both stacks
  inputs = [rng.integers(2, 64, rng.integers(3, 16)) for _ in range(8)]
  targets = [rng.integers(2, 64, rng.integers(2, 12)) for _ in range(8)]
  b = seq2seq.make_batch(seq2seq.pad_rows(inputs, 16, 0), seq2seq.pad_rows(targets, 12, 0),
                         specials)
  batches.append({k: v[None] for k, v in b.items()})
out = {}
for shape in ((1, 1, 1), (2, 2, 2)):  # (2, 2, 2): data, FSDP and tensor at once (suite time)
  devices = jax.devices()[:1] if shape == (1, 1, 1) else None
  mesh = sharding.make_mesh(types.SimpleNamespace(data=shape[0], fsdp=shape[1], tensor=shape[2]),
                            devices)
  run = train.make_run(c, 64, mesh=mesh)
  with jax.set_mesh(mesh):
    state = train.init_state(run, 0)
    step_fn = train.make_train_step(run, tasks.get("seq2seq").loss)
    losses = []
    for i, b in enumerate(batches):
      state, metrics = step_fn(state, train.put_batch(run, b, micro=True), i)
      losses.append(float(metrics["train_loss"]))
  params = {"/".join(map(str, p)): np.asarray(v.get_value()).tolist()
            for p, v in nnx.to_flat_state(state[0])}
  out[str(shape)] = {"losses": losses, "params": params}
json.dump(out, open(sys.argv[1], "w"))
'''


@pytest.mark.slow
def test_encoder_decoder_trains_under_8_devices_like_on_one(tmp_path):
  """seq2seq steps of a T5 (padding in encoder and decoder) on 8 fake CPU devices under a
  2 x 2 x 2 (data, FSDP, tensor) mesh: the same losses and parameters as on one device."""
  assert_trains_like_one_device(EIGHT_DEVICE_WORKER, tmp_path)


# --- bad input ---------------------------------------------------------------------------------

def _missing_target(tmp_path):
  path = write_pairs(tmp_path / "p.jsonl", 5)
  with open(path, "a") as f:
    f.write(json.dumps({"input": "a line without its target"}) + "\n")
  return {"data.path": path}, "p.jsonl:6: expected an object with a string field 'target'"


def _long_target(tmp_path):
  path = write_pairs(tmp_path / "p.jsonl", 5)
  with open(path, "a") as f:
    f.write(json.dumps({"input": "short", "target": "x" * 45}) + "\n")
  return {"data.path": path}, ("p.jsonl:6: its target is 46 tokens with EOS, longer than "
                               "seq2seq.max_target_len=40")


def _empty_file(tmp_path):
  (tmp_path / "e.jsonl").write_text("\n")
  return {"data.path": str(tmp_path / "e.jsonl")}, "e.jsonl: no input/target pairs"


BAD = [
    ("missing_target_field", _missing_target),
    ("target_longer_than_the_decoder", _long_target),
    ("empty_file", _empty_file),
    ("seq2seq_with_a_decoder", lambda _: (
        {"model.arch": "decoder", "model.positions": "rope"},
        "train.task='seq2seq' needs model.arch='encoder_decoder'")),
    ("lm_with_an_encoder_decoder", lambda _: (
        {"train.task": "lm"}, "train.task='lm' needs model.arch='decoder'")),
    ("mlm_with_an_encoder_decoder", lambda _: (
        {"train.task": "mlm"}, "train.task='mlm' needs model.arch='encoder'")),
    ("classify_with_an_encoder_decoder", lambda _: (
        {"train.task": "classify"},
        "train.task='classify' needs model.arch='decoder' or 'encoder'")),
    ("span_corruption_with_a_byte_tokenizer", lambda _: (
        {"train.task": "span_corruption", "data.tokenizer": "byte"},
        "data.tokenizer='byte' has no <pad>/</s>")),
]


@pytest.mark.parametrize("name,make", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_error_line(name, make, tmp_path, capfd):
  """Each through experiments/run.py: a non-zero exit, one `error:` line naming the problem
  (the file's line, the lengths), no traceback, no workdir written."""
  overrides, fragment = make(tmp_path)
  code = run_main(*tiny_args("", tmp_path / "w", **overrides))
  _, err = capfd.readouterr()
  errors = [l for l in err.splitlines() if l.startswith("error:")]
  assert code not in (0, None) and "Traceback" not in err, err[-2000:]
  assert len(errors) == 1 and fragment in errors[0], err[-2000:]
  assert not (tmp_path / "w").exists()
