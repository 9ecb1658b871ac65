"""experiments/run.py as a user runs it: the main job, and one clear line for each bad input."""

import json
import os

import pytest

from tests.conftest import run_cli

TINY = ["--config=experiments/base.py", "--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.d_ff=64",
        "--config.data.seq_len=32", "--config.train.num_steps=2", "--config.train.warmup_steps=1",
        "--config.train.batch_size=4",
        "--config.train.eval_batches=1", "--config.sample.num_samples=0"]


def assert_one_line_error(proc, *fragments):
  assert proc.returncode != 0
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
  for f in fragments:
    assert f in lines[-1], lines[-1]
  return lines[-1]


@pytest.mark.slow
def test_main_job_trains_checkpoints_logs_and_samples(tmp_path):
  workdir = tmp_path / "base"
  proc = run_cli("--config=experiments/base.py:smoke", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "--- sample ---" in proc.stdout
  assert (workdir / "checkpoints" / "30").is_dir()
  assert json.loads((workdir / "config.json").read_text())["train"]["num_steps"] == 30
  assert (workdir / "tokenizer.json").is_file() and any((workdir / "tensorboard").iterdir())
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if "train_loss" in r]
  assert all({"step", "train_loss", "tokens_per_sec"} <= r.keys() for r in train)
  assert train[-1]["train_loss"] < train[0]["train_loss"] - 0.5  # it learned something
  val = [r for r in records if "val_loss" in r]
  assert val and {"val_ppl", "val_bpb"} <= val[-1].keys()
  # eval and sample modes on the same workdir
  proc = run_cli("--config=experiments/base.py:smoke", f"--workdir={workdir}", "--mode=eval")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["val_tokens"] > 100_000 and result["val_loss"] < 5
  proc = run_cli("--config=experiments/base.py:smoke", f"--workdir={workdir}", "--mode=sample",
                 "--prompt=ROMEO:", "--num_samples=3", "--max_new_tokens=20")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("--- sample ---\nROMEO:") == 3


def test_unknown_config_key(tmp_path):
  proc = run_cli(*TINY, "--config.model.num_layer=3", f"--workdir={tmp_path}")
  assert_one_line_error(proc, "num_layer")


def test_wrong_value_type(tmp_path):
  proc = run_cli(*TINY, "--config.train.num_steps=many", f"--workdir={tmp_path}")
  assert_one_line_error(proc, "num_steps")


def test_seq_len_above_the_models_maximum(tmp_path):
  proc = run_cli(*TINY, "--config.data.seq_len=512", f"--workdir={tmp_path}")
  assert_one_line_error(proc, "seq_len=512", "max_seq_len=256")


@pytest.mark.parametrize("name,content,fragment", [
    ("missing.txt", None, "matches no file"),
    ("empty.txt", b"", "corpus is empty"),
    ("latin1.txt", "café au lait ".encode("latin-1") * 100, "not valid UTF-8"),
])
def test_bad_data(tmp_path, name, content, fragment):
  path = tmp_path / name
  if content is not None:
    path.write_bytes(content)
  proc = run_cli(*TINY, f"--config.data.path={path}", f"--workdir={tmp_path / 'w'}")
  assert_one_line_error(proc, fragment, name)
  assert not (tmp_path / "w" / "checkpoints").exists() or not os.listdir(tmp_path / "w" / "checkpoints")


def test_a_token_id_outside_the_vocabulary_is_one_line_not_nan(tmp_path):
  """Issue 11: the old code trained on it and logged train_loss=nan at the first step."""
  import numpy as np
  ids = (np.arange(3000) % 256).astype(np.uint16)
  ids[3] = 60000
  np.save(tmp_path / "ids.npy", ids)
  proc = run_cli(*TINY, f"--config.data.path={tmp_path / 'ids.npy'}",
                 "--config.data.tokenizer=byte", f"--workdir={tmp_path / 'w'}")
  assert_one_line_error(proc, "ids.npy: token id 60000 at offset 3 is outside the vocabulary")
  assert "nan" not in proc.stderr


@pytest.mark.slow
def test_resuming_with_a_different_model_shape_fails_and_keeps_the_checkpoint(tmp_path):
  assert run_cli(*TINY, f"--workdir={tmp_path}").returncode == 0
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  proc = run_cli(*TINY, "--config.model.d_model=64", f"--workdir={tmp_path}")
  assert_one_line_error(proc, "d_model=32", "64")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before
  assert run_cli(*TINY, "--config.train.num_steps=3", f"--workdir={tmp_path}").returncode == 0


def test_quiet_library_logs_is_one_filter_however_often_called():
  """Old code added a filter per call (bench scripts and run.py each call it)."""
  from absl import logging as absl_logging
  from lm import cli
  handler = absl_logging.get_absl_handler()
  before = list(handler.filters)
  try:
    for _ in range(3):
      cli.quiet_library_logs()
    added = [f for f in handler.filters if f not in before]
    assert len(added) + sum(isinstance(f, cli._ProjectInfoOnly) for f in before) == 1
    record = lambda level, path: type("R", (), {"levelno": level, "pathname": path})()
    f = next(f for f in handler.filters if isinstance(f, cli._ProjectInfoOnly))
    import logging as py_logging
    import lm
    project_file = lm.__file__
    assert f.filter(record(py_logging.INFO, project_file))
    assert not f.filter(record(py_logging.INFO, "/site-packages/orbax/x.py"))
    assert f.filter(record(py_logging.WARNING, "/site-packages/orbax/x.py"))
  finally:
    handler.filters[:] = before


@pytest.mark.skipif(os.path.exists("/proc/driver/nvidia/version"), reason="an NVIDIA driver is loaded")
def test_no_cuda_plugin_traceback_without_a_gpu_driver():
  """With the `test` extra's CUDA plugin installed and no driver, every entry point started
  with a cuDNN traceback on stderr (JAX tried the plugin first)."""
  import importlib.util
  import subprocess
  import sys
  if importlib.util.find_spec("jax_plugins.xla_cuda13") is None:
    pytest.skip("the jax CUDA plugin is not installed (the `test` extra installs it)")
  from tests.conftest import ROOT
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env["PYTHONPATH"] = ROOT
  code = ("from lm import cli; cli.quiet_library_logs(); import jax; "
          "print(jax.default_backend())")
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0 and r.stdout.strip() == "cpu", r.stderr[-2000:]
  assert "Traceback" not in r.stderr and "cuDNN" not in r.stderr, r.stderr[-2000:]


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc only")
def test_keep_freed_host_memory_stops_page_faults_of_repeated_buffers():
  """XLA's CPU runtime allocates and frees its step buffers on every step; by default glibc
  hands such blocks back to the kernel, which maps and zeroes them again each time (issue 17).
  The same in numpy: a 64 MiB array (above glibc's largest automatic mmap threshold, 32 MiB)
  made and freed 10 times, in a fresh process each (mallopt is process-wide), with and
  without keep_freed_host_memory. Without it (the old code) every round faults pages in again
  (fewer than 16,384 a round where the kernel backs them with huge pages)."""
  import subprocess
  import sys
  from tests.conftest import ROOT
  code = ("import resource, sys, numpy as np; from lm import cli; "
          "print(cli.keep_freed_host_memory() if sys.argv[1] == '1' else '-'); "
          "np.ones(1 << 24, np.float32); r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; "
          "[np.ones(1 << 24, np.float32).sum() for _ in range(10)]; "
          "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)")
  faults = {}
  for keep in ("0", "1"):
    r = subprocess.run([sys.executable, "-c", code, keep], env={**os.environ, "PYTHONPATH": ROOT},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    applied, n = r.stdout.split()
    assert applied == ("True" if keep == "1" else "-")
    faults[keep] = int(n)
  assert faults["0"] >= 1000, faults  # the default: the rounds fault in anew
  assert faults["1"] < faults["0"] / 10, faults  # kept: the first array's pages are reused
