"""T5's span-corruption pre-training on the embedded plays (task span_corruption:
lm/tasks/span_corruption.py), at the size of experiments/t5_restore.py so that its checkpoint
fine-tunes there:

  python experiments/run.py --config=experiments/t5_span.py --workdir=runs/t5_span
  python experiments/run.py --config=experiments/t5_restore.py --workdir=runs/t5_ft \
      --config.train.init_from=runs/t5_span

Inputs of 128 characters (raw windows of 141 with 15% noise in spans of 3 on average, each
span one sentinel), targets of 29 (the spans behind their sentinels). Measured: see
experiments/t5_restore.py (why the must-show run does not pre-train).
"""

import ml_collections

from experiments import t5_restore


def get_config(arg: str | None = None):
  config = t5_restore.get_config(arg)
  del config["seq2seq"]
  config.span_corruption = ml_collections.ConfigDict()
  config.span_corruption.noise_density = 0.15
  config.span_corruption.mean_span = 3.0
  config.data.seq_len = 128
  config.train.task = "span_corruption"
  config.sample.num_samples = 0
  return config
