"""Character-level Transformer on the embedded Shakespeare plays: the laptop-sized baseline.

Command:
  python experiments/run.py --config=experiments/base.py --workdir=runs/base
Expected on the 2-core CPU: about 1 minute of steps (40.8 ms and 18,800 tokens/s per step
of 12 x 64 characters, idle machine, 2026-11-30; "done ... in 141.5 s" in its log while the test suite
ran beside it); validation loss 1.786 nats/char at step 1100 (20 eval batches), 1.768 over
the whole validation split (`--mode=eval`), then two samples of 200 characters. (The looped
layers of 2026-11-29 reached 1.758 / 1.743: the scanned layers draw other initial values for
the same seed; see BUILD_NOTES.md, issue 17.) The model saw 64-character windows; sampling
and evaluation keep every query within the last 64 characters (model.attention_window -1: the
trained window; a rolling KV cache of 64 slots), so the samples read like a play script for
their whole length (before issue 18 they turned into non-words after 60-100 characters), and
`--mode=eval --config.data.seq_len=256` scores 1.744. The first sample, as printed on
2026-11-30:
    CISTOR:
    Laceher, the tear I the pullow: smentle, day,
    When be sweet the buch end and than tI of have as subforse begain, their decites
    To have marry four but in but some as such and with there.
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
