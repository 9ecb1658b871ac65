"""The training loop end to end: resume exactness, crashes, SIGTERM, accumulation (no torch: test_no_torch.py)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from tests.conftest import ROOT, run_cli, tiny_config

TINY = ["--config=experiments/base.py", "--config.model.num_layers=2", "--config.model.d_model=32", "--config.model.d_ff=64",
        "--config.model.max_seq_len=64", "--config.data.seq_len=32", "--config.train.num_steps=20",
        "--config.train.batch_size=8", "--config.train.warmup_steps=2",
        "--config.train.log_every=5", "--config.train.eval_every=10",
        "--config.train.eval_batches=2", "--config.train.checkpoint_every=10",
        "--config.sample.num_samples=0"]


def final_state(workdir):
  from lm import runtime
  run, state, _, step = runtime.load(tiny_config(), workdir)
  return step, jax.tree.map(np.asarray, nnx.to_pure_dict(state))


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  # A resumed run repeats the steps after its checkpoint: the last record of each kind wins.
  return {(r["step"], "val_loss" in r): r for r in records}


def crash(workdir, step, when):
  cmd = [sys.executable, os.path.join(ROOT, "tests", "crash_driver.py"), str(step), when, "--",
         *TINY, f"--workdir={workdir}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  assert run_cli(*TINY, f"--workdir={straight}").returncode == 0
  crash(resumed, 10, "after")
  assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["10"]
  proc = run_cli(*TINY, f"--workdir={resumed}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "resumed from" in proc.stderr
  (s1, a), (s2, b) = final_state(straight), final_state(resumed)
  assert s1 == s2 == 20
  jax.tree.map(np.testing.assert_array_equal, a, b)  # bit-identical parameters and moments
  m1, m2 = metrics(straight), metrics(resumed)
  for key in [(20, True), (20, False), (15, False)]:
    for field in ("val_loss", "train_loss"):
      if field in m1[key]:
        assert m1[key][field] == m2[key][field], (key, field)


@pytest.mark.slow
def test_crash_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path):
  workdir = str(tmp_path / "w")
  crash(workdir, 20, "during")
  from lm import checkpoint
  assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 10
  proc = run_cli(*TINY, f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert final_state(workdir)[0] == 20


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / "w")
  args = [*TINY, "--config.train.num_steps=100000", "--config.train.eval_every=100000",
          "--config.train.checkpoint_every=100000", f"--workdir={workdir}"]
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "experiments", "run.py"), *args],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics_file = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while not (os.path.exists(metrics_file) and os.path.getsize(metrics_file)):
    assert time.time() < deadline and proc.poll() is None
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  assert "SIGTERM" in err
  steps = os.listdir(os.path.join(workdir, "checkpoints"))
  assert len(steps) == 1 and 5 <= int(steps[0]) < 100000


def test_gradient_accumulation_matches_one_big_batch():
  from lm import train
  from lm.data import get_batch
  from lm.tasks import lm as lm_task
  results = []
  for accum in (1, 4):
    config = tiny_config(**{"train.grad_accum": accum})
    run = train.make_run(config, vocab_size=300)
    state = train.init_state(run, seed=0)
    ids = np.random.default_rng(0).integers(0, 300, 5000).astype(np.int32)
    batch = get_batch(ids, seed=0, step=0, batch_size=8, seq_len=32).reshape(accum, 8 // accum, -1)
    with jax.set_mesh(run.mesh):
      state, m = lm_task.train_step(run)(state, train.put_batch(run, {"tokens": batch}, micro=True), 0)
    results.append((float(m["train_loss"]), jax.tree.map(np.asarray, nnx.to_pure_dict(state))))
  assert abs(results[0][0] - results[1][0]) < 1e-5
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               results[0][1], results[1][1])


def test_batch_sizes_must_split_over_the_data_parallel_devices():
  import types
  from jax.sharding import PartitionSpec as P
  from lm import train
  from lm.errors import UsageError
  mesh = types.SimpleNamespace(shape={"data": 2, "fsdp": 3, "tensor": 2})
  run = types.SimpleNamespace(mesh=mesh,
                              batch_sharding=types.SimpleNamespace(spec=P(("data", "fsdp"), None)))
  train.check_divides_data_parallel(run, micro_batch_size=12, eval_batch_size=6)  # 6-way: fine
  with pytest.raises(UsageError, match=r"eval_batch_size=8 does not split evenly over the 6 "
                                       r"data-parallel devices \(mesh data x fsdp\)"):
    train.check_divides_data_parallel(run, micro_batch_size=12, eval_batch_size=8)


# --- issue 11: schedule start and the weight-decay mask --------------------------------------

def schedule_cfg(**kw):
  from ml_collections import ConfigDict
  return ConfigDict({"learning_rate": 3e-3, "min_lr_ratio": 0.1, "warmup_steps": 10,
                     "num_steps": 100, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.99,
                     "adam_eps": 1e-8, "grad_clip": 1.0, **kw})


@pytest.mark.parametrize("warmup,num_steps", [(10, 100), (1, 7), (0, 50)])
def test_lr_schedule_starts_above_zero_peaks_after_warmup_and_ends_at_min(warmup, num_steps):
  """Old code: lr 0 on the first update (its gradients thrown away)."""
  import math
  from lm import train
  peak, ratio = 3e-3, 0.1
  schedule = train.lr_schedule(schedule_cfg(warmup_steps=warmup, num_steps=num_steps))

  def oracle(s):  # nanoGPT's get_lr, in float64
    if s < warmup:
      return peak * (s + 1) / (warmup + 1)
    t = min((s - warmup) / (num_steps - warmup), 1.0)
    return peak * ratio + 0.5 * (1 + math.cos(math.pi * t)) * (peak - peak * ratio)

  first = peak / (warmup + 1) if warmup else peak
  assert float(schedule(0)) == pytest.approx(first, rel=1e-6) and first > 0
  if warmup:
    assert float(schedule(warmup - 1)) == pytest.approx(peak * warmup / (warmup + 1), rel=1e-6)
  assert float(schedule(warmup)) == pytest.approx(peak, rel=1e-6)  # the peak ends warmup
  assert float(schedule(num_steps)) == pytest.approx(peak * ratio, rel=1e-6)
  for s in range(num_steps + 5):
    assert float(schedule(s)) == pytest.approx(oracle(s), rel=1e-5), s


def model_families():
  """Every model configuration the project has, shrunk to tiny widths: the experiment configs
  (base.py: rope/SwiGLU/tied; gpt2_small.py: learned positions, GELU, biases; the classifier),
  and the variants: untied head, GQA, post-LN, Llama (RMSNorm) with Qwen2's q/k/v biases."""
  import importlib
  from lm.model import ModelConfig
  families = {}
  for name, extra in (("base", {}), ("gpt2_small", {}), ("finetune_classify", {"num_classes": 3}),
                      ("base", {"tie_embeddings": False, "use_bias": True}),
                      ("gpt2_small", {"num_kv_heads": 2, "tie_embeddings": False}),
                      ("base", {"norm": "post", "num_kv_heads": 1}),
                      ("llama_small", {"qkv_bias": True})):  # RMSNorm, GQA, q/k/v biases
    model = dict(importlib.import_module(f"experiments.{name}").get_config().model)
    model.update(num_layers=2, num_heads=4, d_model=16, d_ff=24, max_seq_len=8, **extra)
    families[f"{name}{extra}"] = ModelConfig.from_config(model, vocab_size=11)
  return families


@pytest.mark.parametrize("family", list(model_families()))
def test_first_update_and_weight_decay_of_every_parameter(family):
  """One AdamW update against a float64 oracle, parameter by parameter: the first step moves
  every parameter by lr_0 = peak/(warmup+1), and weight decay acts exactly on the weight
  matrices and embeddings: never norms or biases (bq/bk/bv are [heads, head_dim]), whatever
  their rank. Old code: lr_0 = 0 (nothing moved); with only the schedule fixed, the ndim >= 2
  mask still fails here on bq/bk/bv (checked)."""
  from lm import train
  from lm.model import Transformer
  cfg = model_families()[family]
  model = Transformer(cfg, nnx.Rngs(0))
  rng = np.random.default_rng(1)
  # Random values everywhere, as in a converted GPT-2: zero-initialised biases hide decay.
  params = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32),
                        nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  leaves = jax.tree_util.tree_leaves_with_path(params)
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
  tcfg = schedule_cfg(weight_decay=0.5, grad_clip=1e9, warmup_steps=4)
  tx, _ = train.make_optimizer(tcfg)
  updates, _ = tx.update(grads, tx.init(params), params)
  lr0 = 3e-3 / 5

  def is_norm_or_bias(path):  # the oracle's own rule: LayerNorm modules and b*-named leaves
    names = [str(getattr(k, "key", k)) for k in path]
    return any(n.startswith("ln") for n in names) or names[-1].startswith("b") \
        or names[-1].endswith("bias")

  names = set()
  for (path, p), g, u in zip(leaves, jax.tree.leaves(grads), jax.tree.leaves(updates)):
    g, p = np.float64(g), np.float64(p)
    adam = g / (np.abs(g) + 1e-8)  # m_hat / (sqrt(v_hat) + eps) at the first step
    decay = 0.0 if is_norm_or_bias(path) else 0.5 * p
    np.testing.assert_allclose(u, -lr0 * (adam + decay), rtol=1e-5, atol=1e-9,  # f32 rounding
                               err_msg=jax.tree_util.keystr(path))
    names.add(str(path[-1].key))
  if cfg.use_bias:  # the case that matters: rank-2 biases exist and were checked above
    # stacked layers (model.scan_layers): [layers, heads, head_dim], rank 3
    assert {"bq", "bk", "bv"} <= names and params["blocks"]["attn"]["bq"].ndim == 3


def test_weight_decay_refuses_a_parameter_it_does_not_know():
  from lm import train
  assert train.decays_weight(("blocks", 0, "attn", "wq")) is True
  assert train.decays_weight(("blocks", 0, "attn", "bq")) is False
  with pytest.raises(ValueError, match="blocks/0/new_thing is in neither DECAYED nor"):
    train.decays_weight(("blocks", 0, "new_thing"))
