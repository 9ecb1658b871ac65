"""Shared test set-up: CPU JAX, the repo on sys.path, a tiny config factory."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

def pytest_configure(config):
  """One persistent XLA compilation cache for the whole run: both xdist workers (they inherit
  this process's environment) and every subprocess they start. Many tests compile the same tiny
  programs again (a run, its resume, its eval; run.py subprocesses that each start afresh):
  those become cache hits. A cached executable is the one XLA would compile again, so no
  check changes. Every program is written, the quick ones too: test_cli, test_train and
  test_finetune took 108 s with that, 163 s with JAX's 0.5 s threshold (2026-11-30)."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return  # an xdist worker (the controller made the cache), or the caller's own cache
  import shutil
  import tempfile
  path = tempfile.mkdtemp(prefix="lm-tests-jax-cache-")
  config.add_cleanup(lambda: shutil.rmtree(path, ignore_errors=True))
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  if "jax" in sys.modules:  # imported before this hook: its config has read the environment
    import jax
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


# Rough seconds per file in a full run (2026-11-30, 2-core machine; only their order matters,
# and it is not exact: test_no_torch.py took 70 s idle, test_benchmarks.py 110 s). Files run
# longest first, so that the two xdist workers (--dist loadfile, setup.cfg) end together
# instead of one of them starting a 2-minute file last; files not listed follow in their
# usual order.
FILE_SECONDS = {
    "test_gpu_lowering.py": 150, "test_sharding.py": 90, "test_t5_tasks.py": 90,
    "test_train.py": 90, "test_benchmarks.py": 90, "test_cli.py": 80, "test_kernels.py": 75,
    "test_encoder.py": 65, "test_scan.py": 60, "test_runtime.py": 60, "test_beam_search.py": 60,
    "test_mlm.py": 55, "test_finetune.py": 55, "test_bad_input.py": 50, "test_properties.py": 45,
    "test_convert.py": 45, "test_no_torch.py": 40, "test_t5.py": 40, "test_multihost.py": 40,
}


def pytest_collection_modifyitems(config, items):
  """Longest files first (FILE_SECONDS); a stable sort keeps each file's own order."""
  items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))


def fake_devices(n: int) -> str:
  """XLA_FLAGS for n fake CPU devices. XLA's in-process collectives abort a run whose devices
  do not all reach an all-reduce within 40 s (a CHECK failure, 2026-11-30: 'only 7 of them
  arrived on time'); a busy 2-core machine can be that slow, so the tests wait up to 10
  minutes. That does not help a participant that never arrives (05:45: 4 of 8 after 600 s):
  see FAKE_DEVICE_ENV."""
  return (f"--xla_force_host_platform_device_count={n} "
          "--xla_cpu_collective_call_terminate_timeout_seconds=600 "
          "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120")


# For a process with 8 fake devices. XLA's CPU client runs each device's part of a program as
# a task on a pool of max(PJRT_NPROC or the cores, devices) threads, and an all-reduce needs
# all 8 tasks running at once ("only enough threads for one collective",
# xla/pjrt/cpu/cpu_client.cc). On 2 cores that pool is exactly 8 threads: any other task
# holding one (a transfer, the next launch's dispatch) leaves the all-reduce short, the
# likely cause of the aborts above. 16 threads leave room for them (not proven: the abort
# was never reproduced on purpose).
FAKE_DEVICE_ENV = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": fake_devices(8), "PJRT_NPROC": "16"}


def assert_trains_like_one_device(worker: str, tmp_path):
  """Runs `worker` (Python source that writes {mesh shape: {"losses", "params"}} as JSON to
  argv[1], "(1, 1, 1)" among them) on 8 fake CPU devices; asserts the one-device run learns and
  every other mesh gives its losses and parameters."""
  import json
  import subprocess
  import numpy as np
  env = {**os.environ, "PYTHONPATH": ROOT, **FAKE_DEVICE_ENV}
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
