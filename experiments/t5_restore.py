"""A small T5 trained to restore Shakespeare's punctuation, capitals and line breaks (task
seq2seq, the embedded restoration pairs: lm/tasks/seq2seq.py).

Command:
  python experiments/run.py --config=experiments/t5_restore.py --workdir=runs/t5
  python experiments/run.py --config=experiments/t5_restore.py --workdir=runs/t5 --mode=eval
(numbers: to be measured)
"""

import ml_collections

from lm.config import base_config, t5_model


def get_config(arg: str | None = None):
  config = base_config(arg)
  t5_model(config.model, num_layers=2, num_heads=4, d_model=128, d_ff=256, version="1.1")
  config.model.attention_impl = "xla"
  config.data.seq_len = 200  # inputs: the longest stripped speech is 195 characters (+ EOS)
  config.seq2seq = ml_collections.ConfigDict()
  config.seq2seq.max_target_len = 208  # targets: 200 characters at most (+ EOS)
  config.seq2seq.eval_generate = 0
  config.seq2seq.length_buckets = 4  # batches cut to 50/100/150/200 characters: ~2x faster
  t = config.train
  t.task = "seq2seq"
  t.num_steps = 1200
  t.batch_size = 32
  t.learning_rate = 3e-3
  t.warmup_steps = 50
  t.weight_decay = 0.01
  t.log_every = 25
  t.eval_every = 400
  t.eval_batches = 4
  t.eval_batch_size = 64
  t.checkpoint_every = 400
  config.sample.num_samples = 3
  if arg == "smoke":
    t.num_steps, t.eval_every, t.checkpoint_every, t.log_every = 30, 30, 30, 10
    t.warmup_steps, t.eval_batches = 10, 2
    config.seq2seq.eval_generate = 64
  return config
