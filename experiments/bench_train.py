"""Training-step benchmark: init, compile and step time, tokens/s, peak memory (and on GPU MFU).

  python experiments/bench_train.py --config=experiments/base.py
  python experiments/bench_train.py --config=experiments/base.py --depths=6,24,48
  python experiments/bench_train.py --config=experiments/gpt2_small.py \
      --config.mesh.data=1 --config.mesh.fsdp=-1           # FSDP over every GPU

Times the real jitted train step of lm/train.py with the lm task's loss (the one
`experiments/run.py` runs) on random tokens of the model's vocabulary: init (the jitted
creation of parameters and optimizer state), the first step (compilation), a few more warm-up
steps, then the median of --steps timed steps, each ended by block_until_ready. No data
loading, evaluation or checkpointing is timed. Peak memory is the device's peak_bytes_in_use
on GPU and the process's maximum resident set size (getrusage) on CPU. MFU counts
6·params + attention FLOPs per token (lm.model.flops_per_token) against the device's dense
bf16 peak (--peak_tflops per device, default an H100 SXM's 989).

--depths=6,24,48 runs the benchmark once per depth (model.num_layers), each in a fresh
process (so compile time and peak memory are its own), and prints a table of how the numbers
grow with depth, the step time also as a multiple of the first depth's.

Measured 2026-11-30 on the 2-core CPU (AMD EPYC, idle), base.py with --depths=6,24,48 and
the default remat (auto): step 54-58 / 235-239 / 460-478 ms, 48 layers 8.25-8.44x the 6-layer
step; init + first step 4.4-4.8 s at 48 layers (BUILD_NOTES.md, issue 17).
"""

import json
import os
import resource
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags
from kernels.bridge import on_gpu
from ml_collections import config_flags

from lm import cli, layers, tasks, validate
from lm import train as train_lib
from lm.errors import UsageError
from lm.model import flops_per_token

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/base.py", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 30, "timed steps (median reported)")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed steps first (compilation)")
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "0: 50304 for configs with a BPE/GPT-2 "
                              "tokenizer, else 339 (the char vocabulary of the plays)")
_PEAK = flags.DEFINE_float("peak_tflops", 989.0, "per-device peak for MFU (GPU only)")
_DEPTHS = flags.DEFINE_list("depths", [], "model.num_layers values: one run each, in its own "
                            "process, and a table")
_JSON = flags.DEFINE_bool("json", False, "also print the numbers as one JSON line")


def main(_):
  cli.quiet_library_logs()
  with cli.one_line_errors():
    if _DEPTHS.value:
      _depth_table(_CONFIG.value, _DEPTHS.value)
    else:
      _bench(_CONFIG.value)


def _check(config):
  """The config's fields, and a task this benchmark times: it runs the lm task's loss on
  random tokens, which on an encoder (bert_mlm.py, task mlm or classify) would time a step
  no run takes, with the 50,304-token vocabulary of a BPE config."""
  validate.check_config(config, "train")
  if config.train.task != "lm":
    raise UsageError(f"train.task={config.train.task!r}: bench_train times the lm task's "
                     "train step (a decoder config such as experiments/base.py)")


def _depth_table(config, depths):
  _check(config)
  try:
    depths = [int(d) for d in depths]
  except ValueError:
    depths = []
  if not depths or min(depths) < 1:
    raise UsageError(f"--depths={','.join(_DEPTHS.value)}: expected layer counts >= 1, "
                     "comma-separated")
  # The child gets this command line without --depths, plus its depth (the last override wins).
  argv = [a for a in sys.argv[1:] if not a.startswith("--depths")]
  rows = []
  for depth in depths:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--json",
           f"--config.model.num_layers={depth}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
      raise UsageError(f"the run with {depth} layers failed: "
                       f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    print(proc.stdout, end="", flush=True)
    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  print(f"\n{'layers':>6} {'init s':>7} {'compile s':>9} {'step ms':>8} {'x first':>7} "
        f"{'tokens/s':>9} {'peak MiB':>9}  (peak: {rows[0]['peak_memory']})")
  for r in rows:
    print(f"{r['layers']:>6} {r['init_s']:>7.1f} {r['compile_s']:>9.1f} {r['step_ms']:>8.1f} "
          f"{r['step_ms'] / rows[0]['step_ms']:>7.2f} {r['tokens_per_s']:>9,.0f} "
          f"{r['peak_mib']:>9,.0f}")


def peak_memory() -> tuple[float, str]:
  """(MiB, what was measured): device 0's peak on GPU, else the process's max RSS."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20, "device 0 peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process max RSS"


def _bench(config):
  _check(config)
  cli.keep_freed_host_memory()  # as lm.runtime.train does
  if _STEPS.value < 1 or _WARMUP.value < 0 or _VOCAB.value < 0:
    raise UsageError(f"--steps={_STEPS.value}, --warmup={_WARMUP.value}, --vocab_size="
                     f"{_VOCAB.value}: expected steps >= 1, warmup >= 0, vocab_size >= 0")
  tc = config.train
  vocab = _VOCAB.value or (339 if config.data.tokenizer == "char" else 50304)
  run = train_lib.make_run(config, vocab)
  t0 = time.perf_counter()
  state = train_lib.init_state(run, config.seed)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  step_fn = train_lib.make_train_step(run, tasks.get("lm").loss)
  rng = np.random.default_rng(0)
  micro = tc.batch_size // tc.grad_accum
  batches = [rng.integers(0, vocab, (tc.grad_accum, micro, config.data.seq_len + 1),
                          dtype=np.int32) for _ in range(2)]  # alternated: fresh inputs
  times = []
  with jax.set_mesh(run.mesh):
    batches = [train_lib.put_batch(run, {"tokens": b}, micro=True) for b in batches]
    for i in range(max(_WARMUP.value, 1) + _STEPS.value):  # step 0 (compiles) is never timed
      t = time.perf_counter()
      state, metrics = step_fn(state, batches[i % 2], i)
      jax.block_until_ready((state, metrics))
      if i == 0:
        compile_s = time.perf_counter() - t
      elif i >= _WARMUP.value:
        times.append(time.perf_counter() - t)
  dt = float(np.median(times))
  tokens = tc.batch_size * config.data.seq_len
  n = sum(x.size for x in jax.tree.leaves(state))  # params + optimizer moments
  mc = run.model_cfg
  print(f"device      {jax.devices()[0].device_kind} x {jax.device_count()} "
        f"({jax.default_backend()}), mesh {dict(run.mesh.shape)}")
  print(f"model       {mc.num_layers} layers, d_model {mc.d_model}, "
        f"attention {mc.attention_impl}, dtype {mc.dtype}, "
        f"{'scanned' if mc.scan_layers else 'looped'} layers, remat "
        f"{layers.remat_name(mc.remat)}; "
        f"batch {tc.batch_size} x seq {config.data.seq_len} (grad_accum {tc.grad_accum})")
  print(f"init        {init_s:.1f} s; first step (compile) {compile_s:.1f} s; "
        f"state {n:,} numbers")
  print(f"step        median {1e3 * dt:.1f} ms (min {1e3 * min(times):.1f}, "
        f"max {1e3 * max(times):.1f}) over {len(times)} steps")
  print(f"throughput  {tokens / dt:,.0f} tokens/s")
  if on_gpu():
    flops = flops_per_token(mc, config.data.seq_len) * tokens
    print(f"MFU         {flops / dt / (_PEAK.value * 1e12 * jax.device_count()):.3f} "
          f"({flops / dt / 1e12 / jax.device_count():.0f} TFLOP/s per device)")
  peak_mib, peak_what = peak_memory()
  print(f"peak memory {peak_mib:,.0f} MiB ({peak_what})")
  if _JSON.value:
    print(json.dumps({"layers": mc.num_layers, "init_s": init_s, "compile_s": compile_s,
                      "step_ms": 1e3 * dt, "tokens_per_s": tokens / dt, "peak_mib": peak_mib,
                      "peak_memory": peak_what}), flush=True)


if __name__ == "__main__":
  app.run(main)
