"""Character-level Transformer on the embedded Shakespeare plays: the laptop-sized baseline.

Command:
  python experiments/run.py --config=experiments/base.py --workdir=runs/base
Expected on the idle 2-core CPU (measured 2026-11-29, BUILD_NOTES.md): 69 s wall time, start
to end (about 50 ms and 15,000 tokens/s per step of 12 x 64 characters); validation loss
1.758 nats/char at step 1100 (20 eval batches), 1.743 over the whole validation split
(`--mode=eval`), then two samples of 200 characters. The model saw 64-character windows;
sampling keeps every query within the last 64 characters (model.attention_window -1: the
trained window; a rolling KV cache of 64 slots), so they read like a play script for their
whole length (before issue 18 they turned into non-words after 60-100 characters). The first,
as printed on 2026-11-30:
    CISTOR:
    Lace, and as temple.
    JACTARO:
    What me sud, and shall shall these holes man
    In side: or have teen bishall and upon him now,
    You to the marry for to did of a sembles such and
    what there the qu
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
