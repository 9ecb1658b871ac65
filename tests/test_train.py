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
  from lm import evaluate
  run, state, _, step = evaluate.load(tiny_config(), workdir)
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
  results = []
  for accum in (1, 4):
    config = tiny_config(**{"train.grad_accum": accum})
    run = train.make_run(config, vocab_size=300)
    state = train.init_state(run, seed=0)
    ids = np.random.default_rng(0).integers(0, 300, 5000).astype(np.int32)
    batch = get_batch(ids, seed=0, step=0, batch_size=8, seq_len=32).reshape(accum, 8 // accum, -1)
    with jax.set_mesh(run.mesh):
      state, m = train.make_train_step(run)(state, train.put_batch(run, batch, run.micro_batch_sharding), 0)
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
