"""A small T5 trained to restore Shakespeare's punctuation, capitals and line breaks (task
seq2seq, the embedded restoration pairs: speeches of 20-150 characters, lm/tasks/seq2seq.py).

Command:
  python experiments/run.py --config=experiments/t5_restore.py --workdir=runs/t5
  python experiments/run.py --config=experiments/t5_restore.py --workdir=runs/t5 --mode=eval
  python experiments/run.py --config=experiments/t5_restore.py --workdir=runs/t5 --mode=sample \
      --prompt="now is the winter of our discontent" --num_samples=1
(the prompt as the task's inputs are: lower case, no punctuation; sample mode decodes freely,
greedy; --mode=eval reports both decodings). `--config=experiments/t5_restore.py:smoke`: 30
steps, about 2 minutes, for trying the commands (its --mode=eval decodes every held-out pair to
the full length, slower than a trained model's; `--data_path=FILE.jsonl` evaluates one's own).

Measured 2026-11-30 on the idle 2-core CPU: training 1200 steps in 9 min 1 s wall (868 s user
CPU); --mode=eval over all 2,875 held-out pairs 3 min 22 s. Held-out result (eval):
teacher-forced loss 0.186, token accuracy 0.940; decoding constrained to spell the input (the
model chooses case, punctuation and line breaks, never the letters: seq2seq.restore_texts)
CER 0.0776 against the copy baseline's 0.1051, exact match 0.148 against 0.0 (--config.seed=1:
CER 0.0753, exact match 0.150, 8 min 42 s). Free greedy decoding does not beat the copy
baseline: CER 0.347, exact match 0.136. On most speeches it is right or nearly (median CER
0.08 over 256 pairs), but on about a quarter it loses its place where short n-grams repeat,
skipping ahead or going back (BUILD_NOTES.md, "T5 encoder-decoders").
The relative bias tables start at std 2.5 and learn 30x faster than the rest: with T5's own
init (std 0.09) and AdamW the copy never formed in this budget (token accuracy 0.50, CER
1.27). Restoration alone, no span-corruption pre-training: span corruption's targets are the
missing spans, never the input copied in order (argued, not measured at equal budget).
Model: T5 v1.1 (gated-GELU, untied head), 2 encoder + 3 decoder layers, d_model 128, 8 heads,
d_ff 256, 1.10M parameters, char tokens (325 with <pad> and </s>). Batches of 32 pairs in 8
length buckets (seq2seq.length_buckets: cut to 19, 38, .., 152 tokens). Speeches up to 150
characters, not 200: the longest tenth cost a fifth of the steps' time (attention is
quadratic); `--config.seq2seq.max_chars=200 --config.data.seq_len=200
--config.seq2seq.max_target_len=208` restores longer ones (13 min 43 s with 4 buckets).
"""

import ml_collections

from lm.config import base_config, t5_model


def get_config(arg: str | None = None):
  config = base_config(arg)
  t5_model(config.model, num_layers=2, num_heads=8, d_model=128, d_ff=256, version="1.1")
  # A third decoder layer: the decoder finds its place in the input by its last characters,
  # and one more layer reaches further back (greedy CER 0.60 -> 0.28 at equal steps).
  config.model.num_decoder_layers = 3
  # From scratch the relative bias tables must first form heads that look at fixed offsets
  # (the copy is found by content: the last characters against the input's): T5's init std
  # (0.09) and AdamW's ~lr steps take thousands of steps to get there (BUILD_NOTES.md).
  config.model.relative_bias_init = 2.5
  config.train.relative_bias_lr = 30.0
  config.data.seq_len = 152  # inputs: at most 150 characters (+ EOS)
  config.seq2seq = ml_collections.ConfigDict()
  config.seq2seq.max_target_len = 152  # targets: 150 characters at most (+ EOS)
  config.seq2seq.eval_generate = 0
  config.seq2seq.length_buckets = 8  # batches cut to 19, 38, .., 152 tokens (see above)
  config.seq2seq.max_chars = 150  # the speeches of the embedded task: 20..max_chars characters
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
  config.sample.num_samples = 3  # held-out pairs the end of training prints
  # --mode=sample: greedy, the length of a target (the prompt: lower case, no punctuation)
  config.sample.temperature = 0.0
  config.sample.max_new_tokens = 152
  if arg == "smoke":
    t.num_steps, t.eval_every, t.checkpoint_every, t.log_every = 30, 30, 30, 10
    t.warmup_steps, t.eval_batches = 10, 2
    config.seq2seq.eval_generate = 64
  return config
