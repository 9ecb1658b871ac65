"""Training-step benchmark: step time, tokens/s and (on GPU) MFU and peak memory of one config.

  python experiments/bench_train.py --config=experiments/base.py
  python experiments/bench_train.py --config=experiments/gpt2_small.py \
      --config.mesh.data=1 --config.mesh.fsdp=-1           # FSDP over every GPU

Times the real jitted train step of lm/train.py with the lm task's loss (the one `experiments/run.py` runs) on random
tokens of the model's vocabulary: a few warm-up steps (compilation), then the median of
--steps timed steps, each ended by block_until_ready. No data loading, evaluation or
checkpointing is timed. MFU counts 6·params + attention FLOPs per token (lm.model
.flops_per_token) against the device's dense bf16 peak (--peak_tflops per device, default an
H100 SXM's 989).
"""

import time

import jax
import numpy as np
from absl import app, flags
from kernels.bridge import on_gpu
from ml_collections import config_flags

from lm import cli, tasks, validate
from lm import train as train_lib
from lm.errors import UsageError
from lm.model import flops_per_token

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/base.py", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 30, "timed steps (median reported)")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed steps first (compilation)")
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "0: 50304 for configs with a BPE/GPT-2 "
                              "tokenizer, else 339 (the char vocabulary of the plays)")
_PEAK = flags.DEFINE_float("peak_tflops", 989.0, "per-device peak for MFU (GPU only)")


def main(_):
  cli.quiet_library_logs()
  with cli.one_line_errors():
    _bench(_CONFIG.value)


def _bench(config):
  validate.check_config(config, "train")
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
  print(f"device      {jax.devices()[0].device_kind} x {jax.device_count()} "
        f"({jax.default_backend()}), mesh {dict(run.mesh.shape)}")
  print(f"model       {run.model_cfg.num_layers} layers, d_model {run.model_cfg.d_model}, "
        f"attention {run.model_cfg.attention_impl}, dtype {run.model_cfg.dtype}; "
        f"batch {tc.batch_size} x seq {config.data.seq_len} (grad_accum {tc.grad_accum})")
  print(f"init        {init_s:.1f} s; first step (compile) {compile_s:.1f} s; "
        f"state {n:,} numbers")
  print(f"step        median {1e3 * dt:.1f} ms (min {1e3 * min(times):.1f}, "
        f"max {1e3 * max(times):.1f}) over {len(times)} steps")
  print(f"throughput  {tokens / dt:,.0f} tokens/s")
  if on_gpu():
    flops = flops_per_token(run.model_cfg, config.data.seq_len) * tokens
    print(f"MFU         {flops / dt / (_PEAK.value * 1e12 * jax.device_count()):.3f} "
          f"({flops / dt / 1e12 / jax.device_count():.0f} TFLOP/s per device)")
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      print(f"peak memory {stats['peak_bytes_in_use'] / 2**30:.2f} GiB (device 0)")


if __name__ == "__main__":
  app.run(main)
