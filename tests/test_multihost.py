"""Multi-process training with jax.distributed on localhost (CPU collectives over gloo).

Two processes of experiments/run.py with 2 fake CPU devices each form one 4-device job
(mesh fsdp=2 x tensor=2); one process with 4 devices runs the same config. A second pair of
processes runs tensor=4, so tensor parallelism spans both "hosts" and each process must feed
its devices the whole (replicated) batch. All run at once. They must log the same losses,
only process 0 may write metrics and log, and the checkpoint the two processes wrote
together must restore in this single-device process.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lm import checkpoint as ckpt_lib
from lm import sharding, tokenizers, train
from tests.conftest import ROOT, fake_devices

STEPS = 4
OVERRIDES = {
    "model.num_layers": 2, "model.d_model": 32, "model.num_heads": 4, "model.max_seq_len": 64,
    "model.mlp": "gelu", "model.d_ff": 128, "model.attention_impl": "xla",
    "train.learning_rate": 1e-3, "train.grad_accum": 1,
    "data.seq_len": 32, "train.num_steps": STEPS, "train.batch_size": 8,
    "train.warmup_steps": 1, "train.log_every": 1, "train.eval_every": STEPS,
    "train.eval_batches": 1, "train.eval_batch_size": 8, "train.checkpoint_every": STEPS,
    "sample.num_samples": 0, "mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2,
}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, devices, *extra, **overrides):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": fake_devices(devices)}
  args = [f"--config.{k}={v}" for k, v in {**OVERRIDES, **overrides}.items()]
  return subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "experiments", "run.py"),
       "--config=experiments/base.py", f"--workdir={workdir}", *args, *extra],
      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multihost")
  address, address_tp = f"localhost:{_free_port()}", f"localhost:{_free_port()}"
  tp = {"mesh.fsdp": 1, "mesh.tensor": 4}
  procs = {
      "p0": _launch(tmp / "two", 2, f"--coordinator_address={address}", "--num_processes=2",
                    "--process_id=0"),
      "p1": _launch(tmp / "two", 2, f"--coordinator_address={address}", "--num_processes=2",
                    "--process_id=1"),
      "one": _launch(tmp / "one", 4),
      "tp0": _launch(tmp / "two_tp", 2, f"--coordinator_address={address_tp}",
                     "--num_processes=2", "--process_id=0", **tp),
      "tp1": _launch(tmp / "two_tp", 2, f"--coordinator_address={address_tp}",
                     "--num_processes=2", "--process_id=1", **tp),
  }
  logs = {}
  try:
    for name, p in procs.items():
      logs[name], _ = p.communicate(timeout=600)
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
  for name, p in procs.items():
    assert p.returncode == 0, f"{name} failed:\n{logs[name][-4000:]}"
  return tmp, logs


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_two_processes_train_like_one(jobs):
  tmp, logs = jobs
  two, one = _metrics(tmp / "two"), _metrics(tmp / "one")
  losses = lambda m: [r["train_loss"] for r in m if "train_loss" in r]
  assert len(losses(two)) == STEPS
  np.testing.assert_allclose(losses(two), losses(one), rtol=2e-6, atol=0)
  val = lambda m: [r["val_loss"] for r in m if "val_loss" in r]
  np.testing.assert_allclose(val(two), val(one), rtol=2e-6, atol=0)
  assert losses(two)[-1] < losses(two)[0]
  assert "4 devices" in logs["p0"] and "mesh {'data': 1, 'fsdp': 2, 'tensor': 2}" in logs["p0"]


def test_tensor_parallelism_across_processes_trains_like_one(jobs):
  tmp, logs = jobs
  losses = lambda m: [r["train_loss"] for r in m if "train_loss" in r]
  np.testing.assert_allclose(losses(_metrics(tmp / "two_tp")), losses(_metrics(tmp / "one")),
                             rtol=1e-5, atol=0)
  assert "mesh {'data': 1, 'fsdp': 1, 'tensor': 4}" in logs["tp0"]


def test_only_process_0_logs_and_writes_metrics(jobs):
  tmp, logs = jobs
  steps = [r["step"] for r in _metrics(tmp / "two") if "train_loss" in r]
  assert steps == list(range(1, STEPS + 1))  # one record per step, not one per process
  assert f"step {STEPS}/{STEPS}" in logs["p0"]
  assert "step 1/" not in logs["p1"] and "val_loss" not in logs["p1"]


def test_checkpoint_of_two_processes_restores_in_one(jobs):
  """Here: one process, one device. The state the two processes wrote equals the state the
  single 4-device process wrote, and the restored model's loss is the logged one."""
  tmp, _ = jobs
  states = []
  for name in ("two", "one"):
    ckpt, meta = ckpt_lib.read_meta(str(tmp / name))
    config = ml_collections.ConfigDict(meta["config"])
    vocab = tokenizers.from_json(meta["tokenizer"]).vocab_size
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}),
                              jax.devices()[:1])
    run = train.make_run(config, vocab, mesh=mesh)
    states.append(ckpt.restore(run.abstract_state()))
    ckpt.close()
    assert meta["step"] == STEPS
  two, one = (dict(nnx.to_flat_state(s)) for s in states)
  assert two.keys() == one.keys()
  for path in two:
    a, b = np.asarray(two[path].get_value()), np.asarray(one[path].get_value())
    assert len(two[path].get_value().sharding.device_set) == 1
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6, err_msg=str(path))
  assert int(np.asarray(two[(1, "step")].get_value())) == STEPS
