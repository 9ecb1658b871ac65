"""Genre of a Shakespeare speech with a BERT-style encoder: the classifier on the pooled [CLS].

The task is experiments/finetune_classify.py's (lm/tasks/classify.py: one held-out play per
genre, accuracy against the majority baseline); the model is experiments/bert_mlm.py's encoder
with a pooler and a classification head.
Commands (from scratch; then from the masked-LM checkpoint, whose shape and word-piece
tokenizer it takes, with a fresh pooler and head):
  python experiments/run.py --config=experiments/bert_classify.py --workdir=runs/bert_genre
  python experiments/run.py --config=experiments/bert_classify.py --workdir=runs/bert_genre_ft \
      --config.train.init_from=runs/bert
Measured 2026-11-30, 600 steps, on the 2-core CPU shared with 3 other jobs (the lead
re-measures; BUILD_NOTES.md, issue 14): from scratch 4 min 17 s wall, held-out accuracy 0.295;
from bert_mlm.py's 1000-step run 5 min 57 s, 0.236; majority baseline 0.201.
`:smoke` is a 30-step plumbing check.
"""

import ml_collections

from lm.config import base_config, bert_model


def get_config(arg: str | None = None):
  config = base_config(arg)
  bert_model(config.model, num_layers=4, num_heads=4, d_model=128, d_ff=512, max_seq_len=128)
  config.model.positions, config.model.norm = "rope", "pre"  # bert_mlm.py's encoder
  config.model.mlm_head = False  # from scratch: no MLM head (init_from takes the source's)
  config.model.num_classes = 0  # 0: as many as the data has genres
  config.train.task = "classify"
  config.classify = ml_collections.ConfigDict()
  config.classify.min_chars = 80  # as experiments/finetune_classify.py
  config.classify.balanced = True
  config.classify.genres = ""
  config.data.tokenizer = "wordpiece"
  config.data.vocab_size = 4096
  config.data.seq_len = 64  # [CLS] + the speech's first 62 word pieces + [SEP]
  config.data.val_fraction = 0.1
  t = config.train
  t.num_steps = 600
  t.batch_size = 32
  t.learning_rate = 3e-4
  t.warmup_steps = 50
  t.weight_decay = 0.01
  t.eval_every = 300
  t.eval_batch_size = 256
  t.checkpoint_every = 300
  config.sample.num_samples = 0
  if arg == "smoke":
    t.num_steps, t.eval_every, t.checkpoint_every, t.log_every = 30, 30, 30, 10
    t.warmup_steps = 10
  return config
