"""Character-level Transformer on the embedded Shakespeare plays: the laptop-sized baseline.

Command:
  python experiments/run.py --config=experiments/base.py --workdir=runs/base
Expected on the idle 2-core CPU (measured 2026-11-29, BUILD_NOTES.md): 69 s wall time, start
to end (about 50 ms and 15,000 tokens/s per step of 12 x 64 characters); validation loss
1.758 nats/char at step 1100 (20 eval batches), 1.743 over the whole validation split
(`--mode=eval`), then two samples that read like a play script for their first ~60-100
characters (the model saw 64-character windows; past that they drift, issue 18).
Override any field on the command line, e.g. `--config.train.num_steps=200`;
`--config=experiments/base.py:smoke` is a 30-step run for checking the plumbing.
The values themselves are lm/config.py's `base_config` (the one place for defaults; an
installed `lm` needs them without experiments/). Fork it: call `lm.config.base_config(arg)`
and change a few fields (see gpt2_small.py).
"""

from lm.config import base_config


def get_config(arg: str | None = None):
  """The defaults of lm/config.py, unchanged (arg "smoke": a 30-step run)."""
  return base_config(arg)
