"""Genre of a Shakespeare speech: a classification head on the Transformer (lm/classify.py).

Each speech of the embedded plays is labelled by its play's genre folder (comedies,
histories, problems, roman, romances, tragedies); one play per genre is held out (all its
speeches), and held-out accuracy is reported against the majority-class baseline.

Commands:
  python experiments/run.py --config=experiments/finetune_classify.py --workdir=runs/genre
  python experiments/run.py --config=experiments/finetune_classify.py --workdir=runs/genre \
      --mode=eval            # prints and appends accuracy / baselines to metrics.jsonl
Fine-tune from a language model instead of training from scratch (the model shape and the
tokenizer then come from that checkpoint; its head is replaced by a fresh classifier):
  python experiments/run.py --config=experiments/finetune_classify.py --workdir=runs/genre_ft \
      --config.train.init_from=runs/base --config.data.seq_len=256
`:smoke` is a 30-step plumbing check. Measured (2026-11-23, 2-core CPU, BUILD_NOTES.md):
from scratch, about 6 min (machine loaded), held-out accuracy 0.325 against a majority
baseline of 0.201; from the base.py char LM with seq_len 256, 300 steps (about 8 min): 0.209.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402

from experiments import base  # noqa: E402


def get_config(arg: str | None = None):
  config = base.get_config(arg)
  config.train.task = "classify"
  config.classify = ml_collections.ConfigDict()
  config.classify.min_chars = 80  # shorter speeches ("Ay, my lord.") carry no genre
  config.classify.balanced = True  # draw classes uniformly: the held-out plays are one a genre
  config.classify.genres = ""  # comma-separated genre folders to keep; "": all six
  config.data.tokenizer = "bpe"  # word pieces: a small model learns genre words quickly
  config.data.vocab_size = 4096
  config.data.seq_len = 64  # tokens of a speech kept (from its start)
  config.data.val_fraction = 0.1  # per genre, max(1, round(n * 0.1)) plays held out
  config.model.num_classes = 0  # 0: as many as the data has genres
  t = config.train
  t.num_steps = 600
  t.batch_size = 32
  t.learning_rate = 1e-3
  t.warmup_steps = 50
  t.eval_every = 300
  t.eval_batch_size = 256
  t.checkpoint_every = 300
  config.sample.num_samples = 0
  if arg == "smoke":
    t.num_steps, t.eval_every, t.checkpoint_every, t.log_every = 30, 30, 30, 10
    t.warmup_steps = 10
  return config
