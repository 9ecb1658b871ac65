"""A small BERT pre-trained by masked language modelling on the embedded plays (task mlm).

Command:
  python experiments/run.py --config=experiments/bert_mlm.py --workdir=runs/bert
  python experiments/run.py --config=experiments/bert_mlm.py --workdir=runs/bert --mode=eval
Measured 2026-11-30 on the 2-core CPU while 3 other jobs ran (load average 6-7; the run got
34% of a core-pair: 276 s user + 96 s system CPU), so the wall time is an upper bound that
the lead re-measures on an idle machine: 1000 steps in 17 min 45 s wall (0.8-1.2 s a step
of 32 x 64 tokens). Masked-token accuracy on the held-out plays (8 eval batches, 4,831
masked tokens) 0.123 at step 1000 (0.113 at step 500), against 0.067 for the unigram
baseline (always the commonest training word piece); MLM loss 6.03 against the unigram
distribution's 6.41. Over the whole held-out split (`--mode=eval`, 24,315 masked tokens):
accuracy 0.129 against 0.064, loss 5.91 against 6.33. It beats the baseline by 2x, not by a
wide margin: the loss sat on the unigram plateau for ~400 steps before context started to
help (BUILD_NOTES.md, issue 14).
The model is BERT's shape at a laptop size: word-piece tokens (4096, trained on the training
plays, lowercased), learned positions, token-type embeddings, embedding LayerNorm, post-LN
blocks with exact-erf GELU, the MLM head tied to the word embeddings. Masking: 15% of the
non-special tokens, 80/10/10 (lm/tasks/mlm.py); `--config.mlm.whole_word` masks whole words.
`:smoke` is a 30-step plumbing run. Fine-tune it on genre classification with
experiments/bert_classify.py (`--config.train.init_from=runs/bert`).
"""

import ml_collections

from lm.config import base_config, bert_model


def get_config(arg: str | None = None):
  config = base_config(arg)
  bert_model(config.model, num_layers=4, num_heads=4, d_model=128, d_ff=512, max_seq_len=128)
  config.data.tokenizer = "wordpiece"
  config.data.vocab_size = 4096
  config.data.seq_len = 64  # [CLS] + 62 word pieces + [SEP]
  config.mlm = ml_collections.ConfigDict()
  config.mlm.mask_prob = 0.15
  config.mlm.whole_word = False
  t = config.train
  t.task = "mlm"
  t.num_steps = 1000
  t.batch_size = 32
  t.learning_rate = 1e-3
  t.warmup_steps = 100
  t.weight_decay = 0.01
  t.log_every = 100
  t.eval_every = 500
  t.eval_batches = 8
  t.eval_batch_size = 64
  t.checkpoint_every = 500
  config.sample.num_samples = 0
  if arg == "smoke":
    t.num_steps, t.eval_every, t.checkpoint_every, t.log_every = 30, 30, 30, 10
    t.warmup_steps, t.eval_batches = 10, 2
  return config
