"""Every entry point a user runs, in one process that refuses and records every attempt to
import torch or torch.*. Prints {"attempts": [...], "codes": {...}} as the last stdout line.

  python tests/no_torch_driver.py WORKDIR

The finder is installed before anything else is imported, so it sees an attempt even where
torch is not installed (tensorboardX's `try: import torch`, for instance).
"""

import importlib.abc
import sys

ATTEMPTS = []


class RefuseTorch(importlib.abc.MetaPathFinder):

  def find_spec(self, name, path=None, target=None):
    if name == "torch" or name.startswith("torch."):
      ATTEMPTS.append(name)
      raise ImportError(f"import of {name} refused by tests/no_torch_driver.py")
    return None


sys.meta_path.insert(0, RefuseTorch())

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from tests.conftest import run_main  # noqa: E402

TINY = ["--config=experiments/base.py", "--config.model.num_layers=1",
        "--config.model.d_model=64", "--config.model.num_heads=2", "--config.model.d_ff=64",
        "--config.data.seq_len=16", "--config.train.num_steps=2", "--config.train.warmup_steps=1",
        "--config.train.batch_size=2", "--config.train.eval_batches=1",
        "--config.train.eval_batch_size=2", "--config.train.log_every=1",
        "--config.sample.num_samples=1", "--config.sample.max_new_tokens=3"]


def main(out: str) -> None:
  import time
  codes, t0 = {}, time.time()
  for impl in ("xla", "triton", "triton_softmax"):
    codes[f"train_{impl}"] = run_main(*TINY, f"--workdir={out}/{impl}",
                                      f"--config.model.attention_impl={impl}")
  with open(f"{out}/small.txt", "w") as f:  # the whole embedded split would take a minute
    f.write("To be, or not to be, that is the question.\n" * 20)
  codes["eval"] = run_main(*TINY, f"--workdir={out}/xla", "--mode=eval",
                           f"--data_path={out}/small.txt")
  codes["sample"] = run_main(*TINY, f"--workdir={out}/xla", "--mode=sample", "--prompt=A")

  from lm import convert, tokenizers
  from tests.test_convert import write_gpt2
  tok = tokenizers.ByteTokenizer()
  write_gpt2(f"{out}/hf", vocab=tok.vocab_size, n_positions=16, d=16, layers=1, heads=2)
  tokenizers.save(tok, f"{out}/hf")
  codes["convert_in"] = convert.main([f"--hf_dir={out}/hf", f"--workdir={out}/converted"])
  codes["convert_out"] = convert.main(["--export", f"--hf_dir={out}/hf_out",
                                       f"--workdir={out}/converted"])

  from kernels import bench
  with contextlib.redirect_stdout(io.StringIO()):  # keep the last line for the report
    codes["kernel_cpu_check"] = bench.main(["--out", f"{out}/bench", "--cpu-repeats=1",
                                            "--cpu-seq-lens=16"])
  print(json.dumps({"attempts": ATTEMPTS, "codes": codes,
                    "wall_s": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
