"""The run lifecycle and the task registry (issue 13): every task runs through lm/runtime.py
with the same gradient accumulation, mesh rules, SIGTERM handling and metrics; lm/ stays free
of import circles and of experiments/."""

import ast
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from tests.conftest import FAKE_DEVICE_ENV, ROOT, run_main, tiny_config


# --- the classifier under non-default mesh rules ---------------------------------------------

_RULES_WORKER = r"""
import json, sys
import jax, numpy as np
from flax import nnx
from lm import tasks, train
from lm.config import base_config
c = base_config()
c.model.update(num_layers=1, d_model=32, num_heads=4, d_ff=64, max_seq_len=32, num_classes=3,
               attention_impl="xla")
c.data.seq_len, c.train.batch_size, c.train.grad_accum = 16, 8, 2
c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
c.mesh.rules = json.loads(sys.argv[1])
run = train.make_run(c, 256)
state = train.init_state(run, 0)
step = train.make_train_step(run, tasks.get("classify").loss)
rng = np.random.default_rng(0)
batch = {"tokens": rng.integers(0, 256, (8, 16)).astype(np.int32),
         "lengths": rng.integers(1, 17, 8).astype(np.int32),
         "labels": rng.integers(0, 3, 8).astype(np.int32)}
with jax.set_mesh(run.mesh):
  hlo = step.lower(state, train.put_micro_batches(run, batch, 2), 0).as_text()
  for i in range(2):
    state, metrics = step(state, train.put_micro_batches(run, batch, 2), i)
specs = {"/".join(map(str, p)): [list(e) if isinstance(e, tuple) else e
                                 for e in v.get_value().sharding.spec]
         for p, v in nnx.to_flat_state(state[0])}
constraints = [l.split("<@mesh, ")[1].split(">")[0] for l in hlo.splitlines()
               if "sdy.sharding_constraint" in l and "x16x32xf32" in l]
print(json.dumps({"specs": specs, "constraints": constraints,
                  "loss": float(metrics["train_loss"])}))
"""


def test_classifier_steps_follow_the_configured_mesh_rules():
  """The classifier trained (two steps, grad_accum 2) under 8 fake devices, mesh 2x2x2, with
  rules that differ from DEFAULT_RULES everywhere: its parameters are sharded as those rules
  say (expected specs written out by hand) and so is its residual stream inside the step
  (batch over fsdp alone, where the default rules give data and fsdp). Old code: the
  classifier's steps never set the rules, so the constraints inside its trace used the
  defaults ([{"data", "fsdp"}, ...]: checked by dropping the rules from the model's graph)."""
  rules = [["batch", "fsdp"], ["vocab", "data"], ["embed", "tensor"], ["heads", "data"],
           ["kv_heads", "data"], ["heads_merged", "data"], ["mlp", "data"]]
  env = {**os.environ, "PYTHONPATH": ROOT, **FAKE_DEVICE_ENV}
  proc = subprocess.run([sys.executable, "-c", _RULES_WORKER, json.dumps(rules)], env=env,
                        capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  specs = out["specs"]
  want = {"embed": ["data", "tensor"],  # [vocab, embed]; the blocks are stacked [layers, ...]
          "blocks/attn/wq": [None, "tensor", "data", None],  # [embed, heads, head_dim]
          "blocks/attn/wk": [None, "tensor", "data", None],  # [embed, kv_heads, head_dim]
          "blocks/attn/wo": [None, "data", "tensor"],  # [heads_merged, embed]
          "blocks/mlp/w_in": [None, "tensor", "data"],  # [embed, mlp]
          "blocks/mlp/w_gate": [None, "tensor", "data"],
          "blocks/mlp/w_out": [None, "data", "tensor"],  # [mlp, embed]
          "blocks/ln1/scale": [None, None],  # "norm": no rule
          "cls_head": ["tensor", None],  # [embed, classes]
          "cls_bias": [None]}
  for name, spec in want.items():
    got = specs[name]
    assert got + [None] * (len(spec) - len(got)) == spec, (name, got)
  assert len(out["constraints"]) >= 1  # the residual stream, in the scanned layer
  assert all(c == '[{"fsdp"}, {}, {}]' for c in out["constraints"]), out["constraints"]
  assert np.isfinite(out["loss"])


# --- gradient accumulation for the classifier ------------------------------------------------

def test_classifier_gradient_accumulation_matches_one_big_batch():
  """The classifier's train step over 4 micro-batches of 2 gives the loss, accuracy and
  update of one batch of 8 (the old classify step had no accumulation; run.py refused
  grad_accum > 1 for it)."""
  from lm import tasks, train
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(1, 50, (8, 32)).astype(np.int32),
           "lengths": rng.integers(1, 33, 8).astype(np.int32),
           "labels": rng.integers(0, 3, 8).astype(np.int32)}
  results = []
  for accum in (1, 4):
    # adam_eps 1e-3 as in tests/sharding_worker.py: with 1e-8, Adam's first update of a
    # parameter whose gradient is ~1e-9 turns float32 summation-order noise (one batch vs four,
    # scanned layers) into 0.1% of the update.
    run = train.make_run(tiny_config(**{"train.grad_accum": accum, "model.num_classes": 3,
                                        "train.adam_eps": 1e-3}), 50)
    state = train.init_state(run, seed=0)
    with jax.set_mesh(run.mesh):
      state, m = train.make_train_step(run, tasks.get("classify").loss)(
          state, train.put_micro_batches(run, batch, accum), 0)
    results.append((float(m["train_loss"]), float(m["train_accuracy"]),
                    jax.tree.map(np.asarray, nnx.to_pure_dict(state))))
  assert results[0][0] == pytest.approx(results[1][0], abs=1e-5)
  assert results[0][1] == results[1][1]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               results[0][2], results[1][2])


def test_run_py_trains_the_classifier_with_gradient_accumulation(tmp_path):
  """run.py --config=experiments/finetune_classify.py --config.train.grad_accum=2 trains
  (old code: 'error: train.grad_accum=2: the classify task trains without ...')."""
  workdir = tmp_path / "genre"
  code = run_main("--config=experiments/finetune_classify.py", f"--workdir={workdir}",
                  "--config.train.grad_accum=2", "--config.train.num_steps=2",
                  "--config.train.warmup_steps=1", "--config.train.batch_size=8",
                  "--config.train.log_every=1", "--config.train.eval_every=2",
                  "--config.train.checkpoint_every=2", "--config.train.eval_batch_size=64",
                  "--config.data.tokenizer=byte", "--config.data.seq_len=16",
                  "--config.model.num_layers=1", "--config.model.d_model=32",
                  "--config.model.d_ff=64", "--config.classify.genres=comedies,histories",
                  "--config.classify.min_chars=400")
  assert code == 0
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "train_loss" in r] == [1, 2]
  assert all(0 <= r["train_accuracy"] <= 1 for r in records if "train_loss" in r)
  evals = [r for r in records if "val_accuracy" in r]
  assert len(evals) == 1 and evals[0]["step"] == 2 and evals[0]["val_plays"] == 2


# --- SIGTERM and metrics ---------------------------------------------------------------------

def test_sigterm_on_a_checkpoint_step_saves_it_once(tmp_path, monkeypatch):
  """SIGTERM noticed after step 4, a checkpoint step: step 4 is saved once and the run stops
  there. Old code: saved at step 4 by the checkpoint cadence, then again for the SIGTERM."""
  from lm import checkpoint, runtime, tasks, train
  stops, saves = [], []
  real_step, real_save = train.make_train_step, checkpoint.Checkpointer.save

  class Recorded(checkpoint.StopSignal):
    def __enter__(self):
      stops.append(self)
      return super().__enter__()

  def make_step(run, loss_fn):
    step_fn = real_step(run, loss_fn)

    def step(state, batch, i):
      if i + 1 == 4:  # the update that makes 4 steps done: SIGTERM arrives during it
        stops[-1].requested = True
      return step_fn(state, batch, i)
    return step

  monkeypatch.setattr(checkpoint, "StopSignal", Recorded)
  monkeypatch.setattr(train, "make_train_step", make_step)
  monkeypatch.setattr(checkpoint.Checkpointer, "save",
                      lambda self, step, *a, **kw: (saves.append(step),
                                                    real_save(self, step, *a, **kw)))
  config = tiny_config(**{"train.num_steps": 8, "train.checkpoint_every": 4,
                          "train.eval_every": 8, "train.log_every": 2})
  out = runtime.train(config, str(tmp_path), tasks.get("lm"))
  assert out["step"] == 4 and saves == [4]


def test_eval_mode_results_reach_tensorboard(tmp_path):
  """--mode=eval writes its result to metrics.jsonl and to a TensorBoard event file, at the
  checkpoint's step (old code: metrics.jsonl only)."""
  from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
  from tensorboard.compat.proto import event_pb2
  from lm import runtime, tasks
  config = tiny_config(**{"train.num_steps": 2, "train.warmup_steps": 1, "train.eval_every": 2,
                          "train.checkpoint_every": 2, "train.log_every": 2})
  runtime.train(config, str(tmp_path), tasks.get("lm"))
  tb = tmp_path / "tensorboard"
  before = set(os.listdir(tb))
  result = runtime.evaluate(config, str(tmp_path), tasks.get("lm"))
  (new,) = set(os.listdir(tb)) - before
  values = {}
  for record in RawEventFileLoader(str(tb / new)).Load():
    event = event_pb2.Event.FromString(record)
    for v in event.summary.value:
      values[(event.step, v.tag)] = v.simple_value
  assert values[(2, "val_loss")] == pytest.approx(result["val_loss"], rel=1e-6)
  assert values[(2, "val_tokens")] == result["val_tokens"]
  last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
  assert last == {"step": 2, **result}


# --- the code's shape ------------------------------------------------------------------------

def _imports(path):
  """Every module a file imports (top level or inside functions), resolved to full names."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
  return out


def _modules(package):
  root = os.path.join(ROOT, package)
  found = {}
  for folder, _, files in os.walk(root):
    for name in files:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].replace(os.sep, ".")
        found[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = \
            os.path.join(folder, name)
  return found


def test_lm_and_kernels_import_no_experiments_and_lm_has_no_import_circle():
  """No module of lm/ or kernels/ imports experiments (an installed package has none); no
  file of lm/, kernels/ or experiments/ edits sys.path; the import graph of lm/ (lazy
  imports inside functions included) has no cycle. Old code: lm.convert imported
  experiments.base after a sys.path insert, and lm.evaluate <-> lm.classify was a cycle."""
  modules = {**_modules("lm"), **_modules("kernels")}
  for name, path in modules.items():
    assert not any(m == "experiments" or m.startswith("experiments.") for m in _imports(path)), name
  for package in ("lm", "kernels", "experiments"):
    for name, path in _modules(package).items():
      assert "sys.path" not in open(path, encoding="utf-8").read(), name
  lm_modules = _modules("lm")
  graph = {name: {m for m in _imports(path) if m in lm_modules and m != name}
           for name, path in lm_modules.items()}
  graph = {k: v - {"lm"} for k, v in graph.items()}  # `from lm import x` names lm.x too

  def cycle_from(node, trail):
    if node in trail:
      return trail[trail.index(node):] + [node]
    for nxt in sorted(graph[node]):
      found = cycle_from(nxt, trail + [node])
      if found:
        return found
    return None

  for start in sorted(graph):
    assert cycle_from(start, []) is None, " -> ".join(cycle_from(start, []))


def test_the_runtime_never_imports_a_task():
  """The registry is the only way from the runtime to a task: lm.runtime and lm.train import
  nothing of lm.tasks."""
  lm_modules = _modules("lm")
  for name in ("lm.runtime", "lm.train"):
    assert not any(m.startswith("lm.tasks") for m in _imports(lm_modules[name])), name


def test_no_function_in_lm_is_longer_than_60_lines():
  """The lifecycle is split into legible pieces (old: train.train 91 lines, classify.train 85)."""
  long = []
  for name, path in _modules("lm").items():
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > 60:
          long.append(f"{name}.{node.name}: {length} lines")
  assert not long, long
