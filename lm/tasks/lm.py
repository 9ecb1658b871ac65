"""Next-token prediction: cross-entropy of every token given the ones before it.

The task file to copy for a new objective: data (load_data, batch), loss, evaluation
(evaluate, describe) and an end-of-run report (samples); lm/runtime.py does the rest.
Data: lm/data.py's corpus (the embedded plays, text, jsonl or token files); a batch is
{"tokens": [batch_size, seq_len + 1]} of random windows drawn from (seed, step).
Evaluation: loss (nats/token), perplexity and bits per byte over the held-out split.
"""

from __future__ import annotations

import copy
import math

import jax
from absl import logging
import optax
from flax import nnx

from lm import data as data_lib
from lm import runtime
from lm import train as train_lib
from lm.errors import UsageError


def cross_entropy(logits, targets, weights=None):
  """Summed next-token negative log-likelihood and the number of scored tokens."""
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  if weights is None:
    return nll.sum(), jax.numpy.asarray(nll.size, jax.numpy.float32)
  return (nll * weights).sum(), weights.sum()


def eval_sums(model, batch):
  """(loss sum, token count) of a batch {"tokens": [B, T+1], "weights": [B, T]}."""
  tokens = batch["tokens"]
  return cross_entropy(model(tokens[:, :-1]), tokens[:, 1:], batch["weights"])


def check_decoder(config):
  """UsageError unless the model (the config's, or the checkpoint's it now holds) is a decoder."""
  arch = config.model.get("arch", "decoder")
  if arch != "decoder":
    tasks = "seq2seq or span_corruption" if arch == "encoder_decoder" else "mlm or classify"
    raise UsageError(f"train.task='lm' (next token) needs model.arch='decoder'; this model is an "
                     f"{arch} (its task: {tasks})")


class LanguageModel(runtime.Task):
  name = "lm"

  def load_data(self, config, tokenizer):
    check_decoder(config)
    corpus = data_lib.load_corpus(config.data, tokenizer)
    return config, corpus.tokenizer, corpus

  def eval_data(self, config, tokenizer, data_path):
    check_decoder(config)
    data_cfg = copy.deepcopy(config.data)
    if data_path is not None:
      with data_cfg.unlocked():
        data_cfg.path = data_path
    return data_lib.load_corpus(data_cfg, tokenizer)

  def batch(self, corpus, config, step):
    tc = config.train
    return {"tokens": data_lib.get_batch(corpus.train, seed=config.seed, step=step,
                                         batch_size=tc.batch_size, seq_len=config.data.seq_len)}

  def loss(self, model, batch, rngs):
    tokens = batch["tokens"]
    loss_sum, count = cross_entropy(model(tokens[:, :-1], rngs=rngs), tokens[:, 1:])
    return loss_sum / count, {}

  def evaluate(self, run, state, corpus, max_batches):
    """Validation loss (nats/token), perplexity and bits per byte over (part of) the split."""
    batch_size = run.config.train.eval_batch_size
    train_lib.check_divides_data_parallel(run, eval_batch_size=batch_size)
    step = eval_step(run)
    total, count = 0.0, 0.0
    for tokens, weights in data_lib.eval_batches(corpus.val, seq_len=run.config.data.seq_len,
                                                 batch_size=batch_size, max_batches=max_batches):
      s, c = step(state, train_lib.put_batch(run, {"tokens": tokens, "weights": weights}))
      total, count = total + float(s), count + float(c)
    loss = total / max(count, 1.0)
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(count)}
    if corpus.val_bytes:
      out["val_bpb"] = loss / math.log(2) * len(corpus.val) / corpus.val_bytes
    return out

  def describe(self, result):
    bpb = f"{result['val_bpb']:.4f}" if "val_bpb" in result else "n/a"
    return f"val_loss {result['val_loss']:.4f} | val_ppl {result['val_ppl']:.2f} | val_bpb {bpb}"

  def report(self, run, state, tokenizer, corpus):
    """A few samples (config.sample) printed on stdout; a prompt the tokenizer cannot encode
    is a warning here, not a failed run (training and its checkpoint are done)."""
    if not run.config.sample.num_samples:
      return
    from lm import sample as sample_lib
    model = nnx.merge(run.graphdef, state)[0]
    try:
      texts = sample_lib.sample_text(model, tokenizer, run.config.sample)
    except UsageError as e:
      logging.warning("no samples: %s", e)
      return
    for text in texts:
      print(f"--- sample ---\n{text}", flush=True)


TASK = LanguageModel()


def train_step(run):
  """The jitted train step of this task (lm.train.make_train_step with its loss)."""
  return train_lib.make_train_step(run, TASK.loss)


def eval_step(run):
  """jit(state, {"tokens", "weights"}) -> (loss sum, token count)."""
  return train_lib.make_eval_step(run, eval_sums)
