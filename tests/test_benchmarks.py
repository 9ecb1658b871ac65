"""The benchmarks run end to end on CPU and report numbers (their values are not asserted:
speed targets live in BUILD_NOTES.md, never in tests)."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _run(*args):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_train_benchmark_times_the_real_step():
  out = _run("experiments/bench_train.py", "--config=experiments/base.py",
             "--config.model.num_layers=1", "--config.model.d_model=32",
             "--config.model.d_ff=64", "--config.train.batch_size=4", "--steps=3", "--warmup=1")
  line = next(l for l in out.splitlines() if l.startswith("throughput"))
  assert float(line.split()[1].replace(",", "")) > 0
  assert "over 3 steps" in out and "1 layers, d_model 32" in out


def test_train_benchmark_depth_table_has_a_row_per_depth():
  out = _run("experiments/bench_train.py", "--config=experiments/base.py", "--depths=1,2",
             "--config.model.d_model=32", "--config.model.d_ff=64",
             "--config.train.batch_size=4", "--steps=2", "--warmup=1")
  table = out[out.index("layers  init s"):].splitlines()
  assert "process max RSS" in table[0]  # on the CPU: the peak resident set of each run
  rows = [line.split() for line in table[1:]]
  assert [r[0] for r in rows] == ["1", "2"] and rows[0][4] == "1.00"
  assert all(float(r[3]) > 0 and float(r[6].replace(",", "")) > 0 for r in rows)


@pytest.mark.parametrize("arch", ["decoder", "encoder_decoder"])
def test_generate_benchmark_reports_each_batch_size(arch):
  out = _run("experiments/bench_generate.py", "--batch_sizes=1,3", "--max_new_tokens=5",
             "--repeats=1", "--prompt_len=4", f"--arch={arch}")
  report = json.loads(out[out.index("{"):])
  assert report["model"]["arch"] == arch
  assert [r["batch"] for r in report["results"]] == [1, 3]
  assert all(r["tokens_per_s"] > 0 for r in report["results"])


def test_kernel_benchmark_on_cpu_says_no_gpu_and_checks_the_kernels(tmp_path):
  out = _run("kernels/bench.py", "--out", str(tmp_path), "--cpu-repeats=1")
  assert "No GPU available" in out and "CPU check passed" in out
  rows = (tmp_path / "cpu_check.csv").read_text().splitlines()
  assert len(rows) > 1 and "max_rel_err" in rows[0]


@pytest.mark.parametrize("args,fragment", [
    (["experiments/bench_train.py", "--config.data.seq_len=0"], "data.seq_len=0"),
    (["experiments/bench_train.py", "--steps=0"], "--steps=0"),
    (["experiments/bench_generate.py", "--workdir=/nonexistent/run"], "/nonexistent/run"),
    (["experiments/bench_generate.py", "--batch_sizes=0"], "--batch_sizes=0"),
    (["experiments/bench_generate.py", "--config=/nonexistent.py"], "/nonexistent.py"),
    (["experiments/bench_train.py", "--config=experiments/bert_mlm.py"], "train.task='mlm'"),
    (["kernels/bench.py", "--cpu-seq-lens=16,0"], "--cpu-seq-lens"),
    (["kernels/bench.py", "--cpu-repeats=0"], "--cpu-repeats"),
    (["kernels/bench.py", "--window=-1"], "--window=-1"),
    (["kernels/bench.py", "--causal=ture"], "'ture'"),  # was read as False, silently
    (["-m", "lm.convert", "--hf_dir=x"], "--workdir"),
])
def test_benchmark_bad_input_is_one_line(args, fragment):
  """Before: ZeroDivisionError, min() of an empty list, a UsageError traceback, a hang; the
  BERT config timed the lm loss (exit 0); kernels/bench.py's sizes of 0 were tracebacks, its
  and lm.convert's argparse errors came after the usage text (checked, 2026-11-30)."""
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=300)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith("error:") and fragment in lines[0], lines
