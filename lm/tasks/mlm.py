"""Masked language modelling (BERT): predict the tokens hidden in a bidirectional context.

Data: lm/data.py's corpus encoded as one stream, with a tokenizer that has [CLS] [SEP] [PAD]
[MASK] (word-piece, or char with specials added; byte and bpe are refused). A training row is
[CLS] + a random window of seq_len - 2 tokens + [SEP], drawn from (seed, step) like the LM's.
Masking (Devlin et al. 2019): each non-special token is chosen with probability
mlm.mask_prob (0.15); of the chosen, 80% become [MASK], 10% a random non-special token, 10%
stay. With mlm.whole_word (word-piece only) a word's pieces are chosen together. The draws
come from (seed, step) alone, so a resumed run masks exactly as an uninterrupted one. At most
max_predictions(seq_len) tokens a row are chosen (the first ones; as BERT's
max_predictions_per_seq; at 0.15 the cap binds in fewer than 1 row in 10^8), and the loss is the
cross-entropy of the chosen tokens only, the MLM head run on those positions alone.

Evaluation: the held-out split in consecutive windows, masked with draws fixed per window
index (the same tokens at every evaluation), padding the last row; reported: MLM loss,
masked-token accuracy, and the unigram baseline (always answering the commonest training
token; its accuracy and the loss of the training unigram distribution, add-one smoothed).

A batch: {"inputs" [B, T], "positions" [B, K], "targets" [B, K], "weights" [B, K]} (T =
data.seq_len, K = max_predictions(T)); evaluation batches add "attention_mask" [B, T].
Config: experiments/bert_mlm.py (optional section mlm: mask_prob, whole_word).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax

from lm import data as data_lib
from lm import runtime
from lm import tokenizers
from lm import train as train_lib
from lm.errors import UsageError

NEEDED = ("[CLS]", "[SEP]", "[PAD]", "[MASK]")


def options(config) -> tuple[float, bool]:
  """(mask_prob, whole_word) of config.mlm (0.15, False when absent)."""
  mc = config.get("mlm") or {}
  return float(mc.get("mask_prob", 0.15)), bool(mc.get("whole_word", False))


def max_predictions(seq_len: int, mask_prob: float) -> int:
  """Tokens predicted per row at most: the mean number chosen plus 6 standard deviations."""
  mean = seq_len * mask_prob
  return min(seq_len, math.ceil(mean + 6 * math.sqrt(mean * (1 - mask_prob))) + 1)


class Masker:
  """BERT's masking of rows of token ids, from a numpy Generator (see module doc)."""

  def __init__(self, tokenizer, mask_prob: float, whole_word: bool):
    ids = tokenizers.special_ids(tokenizer)
    missing = [s for s in NEEDED if s not in ids]
    if missing:
      raise UsageError(f"masked-LM needs a tokenizer with {', '.join(NEEDED)}; this "
                       f"{tokenizer.kind} tokenizer lacks {', '.join(missing)} (use "
                       f"data.tokenizer=wordpiece or char)")
    self.ids = ids
    self.special = np.zeros(tokenizer.vocab_size, bool)
    self.special[list(ids.values())] = True
    self.normal = np.flatnonzero(~self.special)  # what a random replacement draws from
    self.mask_prob = mask_prob
    self.continuation = None
    if whole_word:
      if not hasattr(tokenizer, "continuation"):
        raise UsageError(f"mlm.whole_word needs a word-piece tokenizer, not {tokenizer.kind}")
      self.continuation = tokenizer.continuation()

  def __call__(self, tokens: np.ndarray, rng: np.random.Generator, k: int) -> dict:
    """tokens int [B, T] -> {"inputs" [B, T], "positions", "targets", "weights" [B, k]}."""
    b, t = tokens.shape
    special = self.special[tokens]
    draw, action = rng.random((b, t)), rng.random((b, t))
    random_ids = self.normal[rng.integers(0, len(self.normal), (b, t))]
    if self.continuation is not None:  # one draw per word: that of its first piece
      starts = ~self.continuation[tokens] | special
      word_start = np.maximum.accumulate(np.where(starts, np.arange(t), 0), axis=1)
      draw = np.take_along_axis(draw, word_start, axis=1)
    chosen = (draw < self.mask_prob) & ~special
    chosen &= np.cumsum(chosen, axis=1) <= k  # the cap: the first k chosen of a row
    inputs = np.where(chosen & (action < 0.8), self.ids["[MASK]"], tokens)
    inputs = np.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    # the chosen positions first (in order), then unchosen ones with weight 0
    order = np.argsort(~chosen, axis=1, kind="stable")[:, :k]
    weights = np.take_along_axis(chosen, order, axis=1).astype(np.float32)
    return {"inputs": inputs.astype(np.int32), "positions": order.astype(np.int32),
            "targets": np.take_along_axis(tokens, order, axis=1).astype(np.int32),
            "weights": weights}


def wrap(windows: np.ndarray, ids: dict, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Windows [B, <= seq_len - 2] (rows padded with -1) -> ([CLS] w [SEP] [PAD]... [B,
  seq_len], attention_mask [B, seq_len])."""
  b = windows.shape[0]
  tokens = np.full((b, seq_len), ids["[PAD]"], np.int32)
  mask = np.zeros((b, seq_len), np.int32)
  for r, w in enumerate(windows):
    w = w[w >= 0]
    row = np.concatenate([[ids["[CLS]"]], w, [ids["[SEP]"]]])
    tokens[r, :len(row)], mask[r, :len(row)] = row, 1
  return tokens, mask


def mlm_sums(model, batch, rngs=None):
  """(loss sum, correct predictions, predicted tokens) of a batch; the MLM head only on the
  chosen positions."""
  h = model.hidden(batch["inputs"], batch.get("attention_mask"), rngs=rngs)
  h = jnp.take_along_axis(h, batch["positions"][..., None], axis=1)  # [B, K, d]
  logits = model.mlm_logits(h)
  w = batch["weights"]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  correct = (logits.argmax(-1) == batch["targets"]) * w
  return (nll * w).sum(), correct.sum(), w.sum()


class MaskedLM(runtime.Task):
  name = "mlm"

  def _check_model(self, config):
    m = config.model
    if m.get("arch", "decoder") != "encoder" or not m.get("mlm_head", False):
      raise UsageError(f"train.task='mlm' needs an encoder with its masked-LM head "
                       f"(model.arch='encoder', model.mlm_head=True); this model has "
                       f"arch={m.get('arch', 'decoder')!r}, mlm_head={m.get('mlm_head', False)}")

  def load_data(self, config, tokenizer):
    self._check_model(config)
    corpus = data_lib.load_corpus(config.data, tokenizer, tokenizers.CHAR_SPECIALS)
    if config.data.seq_len < 3:
      raise UsageError(f"data.seq_len={config.data.seq_len}: the masked-LM rows need 3 or more "
                       f"([CLS], a token, [SEP])")
    Masker(corpus.tokenizer, *options(config))  # refuses a tokenizer without the specials now
    return config, corpus.tokenizer, corpus

  def eval_data(self, config, tokenizer, data_path):
    self._check_model(config)
    return runtime.Task.eval_data(self, config, tokenizer, data_path)

  def batch(self, corpus, config, step):
    seq_len, (p, whole) = config.data.seq_len, options(config)
    windows = data_lib.get_batch(corpus.train, seed=config.seed, step=step,
                                 batch_size=config.train.batch_size, seq_len=seq_len - 3)
    masker = Masker(corpus.tokenizer, p, whole)
    tokens, _ = wrap(windows, masker.ids, seq_len)
    rng = np.random.default_rng([config.seed, step, 1])  # [seed, step] drew the windows
    return masker(tokens, rng, max_predictions(seq_len, p))

  def loss(self, model, batch, rngs):
    loss_sum, correct, count = mlm_sums(model, batch, rngs)
    count = jnp.maximum(count, 1.0)
    return loss_sum / count, {"train_accuracy": correct / count}

  def evaluate(self, run, state, corpus, max_batches):
    config = run.config
    seq_len, (p, whole) = config.data.seq_len, options(config)
    batch_size = config.train.eval_batch_size
    train_lib.check_divides_data_parallel(run, eval_batch_size=batch_size)
    masker = Masker(corpus.tokenizer, p, whole)
    k = max_predictions(seq_len, p)
    step = train_lib.make_eval_step(run, mlm_sums)
    counts = np.bincount(np.asarray(corpus.train), minlength=corpus.tokenizer.vocab_size)
    counts[masker.special] = 0
    top = int(counts.argmax())
    log_unigram = np.log((counts + 1) / (counts + 1).sum())
    n = seq_len - 2
    starts = list(range(0, len(corpus.val), n))
    if max_batches is not None:
      starts = starts[:max_batches * batch_size]
    totals = np.zeros(5)  # loss, correct, count, unigram correct, unigram loss
    for i in range(0, len(starts), batch_size):
      windows = np.full((batch_size, n), -1, np.int64)
      for r, s in enumerate(starts[i:i + batch_size]):
        w = np.asarray(corpus.val[s:s + n])
        windows[r, :len(w)] = w
      tokens, mask = wrap(windows, masker.ids, seq_len)
      # Fixed draws per batch index ([seed, i, 2]: never a training step's [seed, step, 1]).
      batch = masker(tokens, np.random.default_rng([config.seed, i, 2]), k)
      batch["attention_mask"] = mask
      loss, correct, count = step(state, train_lib.put_batch(run, batch))
      w, t = batch["weights"], batch["targets"]
      totals += (float(loss), float(correct), float(count), float(((t == top) * w).sum()),
                 float(-(log_unigram[t] * w).sum()))
    totals = [float(x) for x in totals]
    count = max(totals[2], 1.0)
    return {"val_loss": totals[0] / count, "val_accuracy": totals[1] / count,
            "val_masked_tokens": int(totals[2]), "unigram_accuracy": totals[3] / count,
            "unigram_loss": totals[4] / count}

  def describe(self, result):
    return (f"val_loss {result['val_loss']:.4f} | masked-token accuracy "
            f"{result['val_accuracy']:.4f} (unigram baseline {result['unigram_accuracy']:.4f}, "
            f"loss {result['unigram_loss']:.4f}) over {result['val_masked_tokens']} tokens")


TASK = MaskedLM()
