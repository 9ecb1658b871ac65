"""Shared test set-up: CPU JAX, the repo on sys.path, a tiny config factory."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


def fake_devices(n: int) -> str:
  """XLA_FLAGS for n fake CPU devices. XLA's in-process collectives abort a run whose devices
  do not all reach an all-reduce within 40 s (a CHECK failure, 2026-11-30: 'only 7 of them
  arrived on time'), which a 2-core machine running several 8-device processes at once can
  exceed: the tests wait up to 10 minutes instead."""
  return (f"--xla_force_host_platform_device_count={n} "
          "--xla_cpu_collective_call_terminate_timeout_seconds=600 "
          "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120")


def assert_trains_like_one_device(worker: str, tmp_path):
  """Runs `worker` (Python source that writes {mesh shape: {"losses", "params"}} as JSON to
  argv[1], "(1, 1, 1)" among them) on 8 fake CPU devices; asserts the one-device run learns and
  every other mesh gives its losses and parameters."""
  import json
  import subprocess
  import numpy as np
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": fake_devices(8)}
  out = tmp_path / "out.json"
  r = subprocess.run([sys.executable, "-c", worker, str(out)], env=env, cwd=ROOT,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  result = json.loads(out.read_text())
  ref = result.pop("(1, 1, 1)")
  assert ref["losses"][-1] < ref["losses"][0]
  assert result, "no multi-device mesh was run"
  for shape, got in result.items():
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=2e-5, err_msg=shape)
    for name, want in ref["params"].items():
      np.testing.assert_allclose(np.asarray(got["params"][name]), np.asarray(want), atol=2e-5,
                                 err_msg=f"{shape} {name}")


def tiny_config(**overrides):
  """experiments/base.py shrunk to a model that trains in seconds; overrides as 'a.b': value."""
  from experiments import base
  config = base.get_config()
  config.model.num_layers = 2
  config.model.d_model = 32
  config.model.d_ff = 64
  config.model.num_heads = 4
  config.model.max_seq_len = 64
  config.data.seq_len = 32
  config.train.num_steps = 20
  config.train.batch_size = 8
  config.train.warmup_steps = 2
  config.train.log_every = 5
  config.train.eval_every = 10
  config.train.eval_batches = 2
  config.train.eval_batch_size = 8
  config.train.checkpoint_every = 10
  config.sample.num_samples = 0
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture
def make_config():
  return tiny_config


def run_cli(*args, timeout=600, env=None):
  """Runs experiments/run.py in a subprocess; returns the CompletedProcess."""
  import subprocess
  full_env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
  return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "run.py"), *args],
                        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


def run_main(*args):
  """experiments/run.py (its parse_flags and main) in this process, as `run.py *args` would
  run; returns the exit code. Saves a subprocess start (5-10 s) per call."""
  from absl import flags
  import experiments.run as run_py
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)  # the override flags the previous parse defined
  argv, saved = ["run.py", *args], sys.argv
  sys.argv = argv  # ml_collections reads the --config.* overrides from sys.argv
  try:
    run_py.main(run_py.parse_flags(argv))
  except SystemExit as e:
    return e.code
  finally:
    sys.argv = saved
  return 0
