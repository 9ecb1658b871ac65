"""Generation speed: tokens/s of KV-cache decoding (lm/sample.py) at several batch sizes.

  python experiments/bench_generate.py --workdir=runs/base [--batch_sizes=1,16]
      [--prompt_len=16] [--max_new_tokens=200] [--temperature=0.8] [--top_k=40]
  python experiments/bench_generate.py --arch=encoder_decoder --prompt_len=100 \
      --max_new_tokens=100 --temperature=0                  # T5 (lm.config.t5_model), greedy
  python experiments/bench_generate.py --config=experiments/<a config>.py
Times `generate` after one compiling call (median of --repeats); a prompt of --prompt_len
random token ids, every row a copy, no stop token (all max_new_tokens made). An encoder-
decoder's prompt is its encoder input: each call encodes it once, then decodes (cross-attention
keys and values computed once); tokens/s counts the generated tokens.
Without --workdir it builds a model with random weights (speed does not depend on the weights):
--config's, else experiments/base.py's (--arch=decoder) or lm.config.t5_model's defaults
(--arch=encoder_decoder: T5 v1.1, 4 + 4 layers, d_model 128, 4 heads, d_ff 512).

Measured (2-core x86_64 CPU, float32, 2026-11-30, load average 9-11 from other jobs: three
sittings, noisy), the T5 above (2,448,384 params) at prompt 100, 100 new greedy tokens:
batch 1: 618 / 1,287 / 625 tok/s, batch 16: 1,114 / 1,502 / 1,220 tok/s; compiling 12-15 s
(batch 1), 7-11 s (batch 16). BUILD_NOTES.md "T5 generation speed".
"""

import json
import os
import platform
import time

from absl import app, flags
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "run directory (default: a model with random weights)")
config_flags.DEFINE_config_file("config", None, "an experiment config whose model to build "
                                "(random weights; default: --arch's)", lock_config=True)
flags.DEFINE_enum("arch", "decoder", ["decoder", "encoder_decoder"],
                  "without --workdir and --config: base.py's decoder or lm.config.t5_model's")
flags.DEFINE_list("batch_sizes", ["1", "16"], "batch sizes to time")
flags.DEFINE_integer("prompt_len", 16, "prompt tokens")
flags.DEFINE_integer("max_new_tokens", 200, "tokens generated per row")
flags.DEFINE_float("temperature", 0.8, "0: greedy")
flags.DEFINE_integer("top_k", 40, "0: all")
flags.DEFINE_float("top_p", 1.0, "nucleus mass")
flags.DEFINE_integer("repeats", 3, "timed calls per batch size")
FLAGS = flags.FLAGS


def main(argv):
  from lm import cli
  cli.quiet_library_logs()
  path = FLAGS["config"].config_filename if FLAGS["config"].present else None
  if path and not os.path.isfile(path.split(":", 1)[0]):  # ml_collections: a many-line error
    cli.fail(f"--config={path}: no such file")
  with cli.one_line_errors():
    _bench()


def _bench():
  import jax
  import numpy as np
  from flax import nnx
  from lm import runtime, sample, train
  from lm.config import base_config, t5_model
  from lm.model import num_params
  config = FLAGS.config or base_config()
  if FLAGS.workdir:
    run, state, _, _ = runtime.load(config, FLAGS.workdir)
    model = nnx.merge(run.graphdef, state)[0]
  else:
    if FLAGS.config is None and FLAGS.arch == "encoder_decoder":
      t5_model(config.model)
    run = train.make_run(config, 256 + 80)  # the char vocabulary of the plays is 256 + ~80
    model = nnx.merge(run.graphdef, train.init_state(run, 0))[0]
  from lm.errors import UsageError
  if min(FLAGS.prompt_len, FLAGS.max_new_tokens, FLAGS.repeats) < 1:
    raise UsageError("--prompt_len, --max_new_tokens and --repeats must be >= 1")
  rng = np.random.default_rng(0)
  prompt = rng.integers(0, model.cfg.vocab_size, FLAGS.prompt_len)
  results = []
  try:
    batch_sizes = [int(x) for x in FLAGS.batch_sizes]
  except ValueError:
    raise UsageError(f"--batch_sizes={','.join(FLAGS.batch_sizes)}: expected integers") from None
  if min(batch_sizes) < 1:
    raise UsageError(f"--batch_sizes={','.join(FLAGS.batch_sizes)}: expected sizes >= 1")
  for b in batch_sizes:
    kw = dict(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
              top_k=FLAGS.top_k, top_p=FLAGS.top_p)
    t = time.perf_counter()
    sample.generate(model, [prompt] * b, seed=0, **kw)
    compile_s = time.perf_counter() - t  # compiling, then one run
    times = []
    for r in range(FLAGS.repeats):
      t = time.perf_counter()
      out = sample.generate(model, [prompt] * b, seed=r + 1, **kw)
      times.append(time.perf_counter() - t)
      assert all(len(s[0]) == FLAGS.max_new_tokens for s in out)
    dt = float(np.median(times))
    results.append({"batch": b, "tokens_per_s": b * FLAGS.max_new_tokens / dt,
                    "ms_per_step": 1e3 * dt / FLAGS.max_new_tokens, "seconds": dt,
                    "first_call_s": compile_s, "compile_s": compile_s - dt})
  print(json.dumps({"device": jax.devices()[0].device_kind, "machine": platform.machine(),
                    "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
                    "params": num_params(model),
                    "model": {k: getattr(model.cfg, k) for k in
                              ("arch", "num_layers", "decoder_layers", "d_model", "num_heads",
                               "num_kv_heads", "d_ff", "mlp", "vocab_size", "max_seq_len",
                               "attention_impl")},
                    "prompt_len": FLAGS.prompt_len, "max_new_tokens": FLAGS.max_new_tokens,
                    "sampling": {"temperature": FLAGS.temperature, "top_k": FLAGS.top_k,
                                 "top_p": FLAGS.top_p},
                    "results": results}, indent=1))


if __name__ == "__main__":
  app.run(main)
