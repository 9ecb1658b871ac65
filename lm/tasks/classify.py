"""Sequence classification: which genre a Shakespeare speech comes from.

The task, with real labels from the embedded corpus: every play lies in a genre folder
(comedies, histories, problems, roman, romances, tragedies). A speech is the text a speaker
says between their 'NAME:' line and the next blank line of the cleaned play (speaker names
themselves are left out); its label is its play's folder. Whole plays are held out: within
each genre the plays are ranked by a stable hash of their names (as lm/data.py ranks
documents) and the first max(1, round(n * data.val_fraction)) go to validation, so every
genre is represented there and no play is on both sides.

The model is the language model's Transformer with a classification head pooled from the
last real token (`Transformer.classify`), or (model.arch="encoder") the encoder's head on its
pooled [CLS] (`Encoder.classify`; each speech is [CLS] + its tokens + [SEP], padding masked),
trained with cross-entropy; with config.train.init_from it starts from a language model's or
a masked-LM encoder's parameters (the head, and the encoder's pooler, are fresh).
Reported: held-out accuracy against the majority-class baseline (always answering the
commonest genre of the training speeches), and against the best constant answer in
hindsight (the commonest genre of the held-out speeches).

The task `classify` of lm/runtime.py's lifecycle (config.train.task="classify"); a batch is
{"tokens": [B, seq_len] right-padded, "lengths": [B], "labels": [B]}. Config:
experiments/finetune_classify.py.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from lm import data as data_lib
from lm import runtime
from lm import tokenizers
from lm import train as train_lib
from lm.errors import UsageError

_SPEAKER = re.compile(r"^[A-Z][A-Z0-9 ,.'&-]*:$")  # 'HAMLET:', 'FIRST CITIZEN:'


# --- data ------------------------------------------------------------------------------------

def speeches(text: str) -> list[str]:
  """The speeches of a cleaned play: the lines after each 'NAME:' line up to a blank line."""
  out, current = [], None
  for line in text.split("\n"):  # not splitlines(): U+2028 etc. inside a line stay there
    stripped = line.strip()
    if _SPEAKER.match(stripped):
      if current:
        out.append("\n".join(current))
      current = []
    elif current is not None:
      if stripped:
        current.append(stripped)
      elif current:
        out.append("\n".join(current))
        current = None
  if current:
    out.append("\n".join(current))
  return out


@dataclasses.dataclass
class Examples:
  texts: list[str]
  labels: np.ndarray  # int32 [n]
  plays: list[str]  # the genre/play each text comes from


@dataclasses.dataclass
class Dataset:
  classes: list[str]
  train: Examples
  val: Examples

  @property
  def majority(self) -> int:
    return int(np.bincount(self.train.labels, minlength=len(self.classes)).argmax())


def split_plays(names: list[str], val_fraction: float) -> set[str]:
  """The held-out plays: per genre, the first max(1, round(n * val_fraction)) by crc32."""
  by_genre = collections.defaultdict(list)
  for name in names:
    by_genre[name.split("/")[0]].append(name)
  held = set()
  for plays in by_genre.values():
    ranked = sorted(plays, key=lambda n: (zlib.crc32(n.encode()), n))
    held.update(ranked[:max(1, round(len(plays) * val_fraction))])
  return held


def genre_dataset(val_fraction: float = 0.1, min_chars: int = 0,
                  docs: list[tuple[str, str]] | None = None) -> Dataset:
  """Speeches labelled by genre from the embedded plays (or `docs`: (genre/play, text))."""
  docs = data_lib.play_documents() if docs is None else docs
  names = [n for n, _ in docs]
  classes = sorted({n.split("/")[0] for n in names})
  if len(classes) < 2:
    raise UsageError(f"genre classification needs plays from two genres or more, got {classes}")
  if any(sum(n.startswith(c + "/") for n in names) < 2 for c in classes):
    raise UsageError("every genre needs two plays or more (one is held out)")
  held = split_plays(names, val_fraction)
  parts = {True: ([], [], []), False: ([], [], [])}
  for name, text in docs:
    texts, labels, plays = parts[name in held]
    for s in speeches(text):
      if len(s) >= min_chars:
        texts.append(s)
        labels.append(classes.index(name.split("/")[0]))
        plays.append(name)
  make = lambda t, l, p: Examples(t, np.asarray(l, np.int32), p)
  return Dataset(classes, make(*parts[False]), make(*parts[True]))


def encode(tokenizer, texts: list[str], seq_len: int,
           specials: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [n, seq_len] right-padded with 0, lengths [n]); a text keeps its first seq_len
  tokens. specials (an encoder's): each row is [CLS] + its first seq_len - 2 tokens + [SEP]."""
  tokens = np.zeros((len(texts), seq_len), np.int32)
  lengths = np.zeros((len(texts),), np.int32)
  for i, text in enumerate(texts):
    if specials:
      ids = np.asarray(tokenizer.encode(text), np.int32)[:seq_len - 2]
      ids = np.concatenate([[specials["[CLS]"]], ids, [specials["[SEP]"]]]).astype(np.int32)
    else:
      ids = np.asarray(tokenizer.encode(text), np.int32)[:seq_len]
    if len(ids) == 0:
      ids = np.asarray(tokenizer.encode(" "), np.int32)[:1]
    tokens[i, :len(ids)] = ids
    lengths[i] = len(ids)
  return tokens, lengths


def dataset_for(config) -> Dataset:
  """The dataset config.classify describes: min_chars (shorter speeches are dropped) and
  genres (comma-separated folder names to keep; empty: all)."""
  cc = config.get("classify") or {}
  docs = data_lib.play_documents()
  genres = [g.strip() for g in str(cc.get("genres", "") or "").split(",") if g.strip()]
  if genres:
    known = sorted({n.split("/")[0] for n, _ in docs})
    unknown = sorted(set(genres) - set(known))
    if unknown:
      raise UsageError(f"classify.genres: unknown genre(s) {unknown}; the folders are {known}")
    docs = [(n, t) for n, t in docs if n.split("/")[0] in genres]
  return genre_dataset(config.data.val_fraction, min_chars=int(cc.get("min_chars", 0)),
                       docs=docs)


def sample_batch(labels: np.ndarray, *, seed: int, step: int, batch_size: int,
                 balanced: bool) -> np.ndarray:
  """Indices of the training examples of `step` (from (seed, step) alone, as lm/data.py).

  balanced: a uniformly drawn class, then an example of it, so the rare genres weigh as much
  as the common ones (the held-out plays are one per genre, not the training proportions).
  """
  rng = np.random.default_rng([seed, step])
  if not balanced:
    return rng.integers(0, len(labels), batch_size)
  classes = np.unique(labels)
  picked = classes[rng.integers(0, len(classes), batch_size)]
  order = np.argsort(labels, kind="stable")
  starts = np.searchsorted(labels[order], picked)
  sizes = np.bincount(labels)[picked]
  return order[starts + (rng.random(batch_size) * sizes).astype(np.int64)]


# --- the task --------------------------------------------------------------------------------

@dataclasses.dataclass
class Encoded:
  """The dataset with its speeches as token ids (encode): what the task trains and evaluates
  on."""
  ds: Dataset
  train_tokens: np.ndarray
  train_lengths: np.ndarray
  val_tokens: np.ndarray
  val_lengths: np.ndarray


def with_classes(config, ds: Dataset):
  """config with model.num_classes set from the data (0 in the config: take the data's)."""
  config = copy.deepcopy(config)
  with config.unlocked():
    if config.model.num_classes not in (0, len(ds.classes)):
      raise UsageError(f"model.num_classes={config.model.num_classes} but the data has "
                       f"{len(ds.classes)} classes {ds.classes}")
    config.model.num_classes = len(ds.classes)
  return config


def class_logits(model, tokens, lengths, rngs=None):
  """[B, num_classes] of right-padded tokens [B, T] with lengths [B], for either family."""
  if model.cfg.arch == "encoder":
    mask = (jnp.arange(tokens.shape[1]) < lengths[:, None]).astype(jnp.int32)
    return model.classify(tokens, mask, rngs=rngs)
  return model.classify(tokens, lengths, rngs=rngs)


def loss_and_accuracy(model, batch, rngs=None):
  """(mean cross-entropy, {"train_accuracy": mean}) of a batch {tokens, lengths, labels}."""
  logits = class_logits(model, batch["tokens"], batch["lengths"], rngs)
  labels = batch["labels"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, {"train_accuracy": (logits.argmax(-1) == labels).mean()}


def row_losses_and_predictions(model, batch):
  """(per-row loss [B], predicted class [B]); padding rows (length 0) pool their first token."""
  logits = class_logits(model, batch["tokens"], jnp.maximum(batch["lengths"], 1))
  return (optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]),
          logits.argmax(-1))


def evaluate(run, state, examples: Examples, tokens, lengths, majority: int,
             classes: list[str]) -> dict:
  """Accuracy and loss over every held-out example (in batches of train.eval_batch_size),
  with the two constant baselines."""
  n, batch_size = len(lengths), run.config.train.eval_batch_size
  if n == 0:
    raise UsageError("no held-out speeches to evaluate on")
  train_lib.check_divides_data_parallel(run, eval_batch_size=batch_size)
  step = train_lib.make_eval_step(run, row_losses_and_predictions)
  losses, preds = [], []
  for i in range(0, n, batch_size):
    idx = np.arange(i, i + batch_size)
    real = idx < n
    idx = np.where(real, idx, 0)
    batch = {"tokens": tokens[idx], "lengths": lengths[idx], "labels": examples.labels[idx]}
    loss, pred = step(state, train_lib.put_batch(run, batch))
    losses.append(np.asarray(jax.device_get(loss))[real])
    preds.append(np.asarray(jax.device_get(pred))[real])
  pred, labels = np.concatenate(preds), examples.labels
  counts = np.bincount(labels, minlength=len(classes))
  per_class = {c: float((pred[labels == k] == k).mean()) if counts[k] else None
               for k, c in enumerate(classes)}
  return {"val_accuracy": float((pred == labels).mean()),
          "val_loss": float(np.concatenate(losses)[:n].mean()),
          "majority_class": classes[majority],
          "majority_baseline": float((labels == majority).mean()),
          "best_constant_baseline": float(counts.max() / n),
          "val_examples": int(n), "val_plays": len(set(examples.plays)),
          "val_accuracy_per_class": per_class}


class Classify(runtime.Task):
  name = "classify"

  def load_data(self, config, tokenizer):
    ds = dataset_for(config)
    config = with_classes(config, ds)
    encoder = config.model.get("arch", "decoder") == "encoder"
    tokenizer = tokenizer or data_lib.make_tokenizer(
        config.data, ds.train.texts, tokenizers.CHAR_SPECIALS if encoder else ())
    logging.info("genre classification: %d classes %s, %d training speeches from %d plays, "
                 "%d held-out from %d plays %s", len(ds.classes), ds.classes,
                 len(ds.train.texts), len(set(ds.train.plays)), len(ds.val.texts),
                 len(set(ds.val.plays)), sorted(set(ds.val.plays)))
    return config, tokenizer, self._encode(config, tokenizer, ds)

  def eval_data(self, config, tokenizer, data_path):
    if data_path is not None:
      raise UsageError("--data_path: the classification task reads the embedded plays")
    if not config.model.num_classes:
      raise UsageError("the checkpoint has no classification head "
                       "(config.train.task='classify' evaluates classifiers)")
    ds = dataset_for(config)
    if len(ds.classes) != config.model.num_classes:
      raise UsageError(f"the checkpoint has {config.model.num_classes} classes, the data "
                       f"{len(ds.classes)}")
    return self._encode(config, tokenizer, ds)

  @staticmethod
  def _encode(config, tokenizer, ds: Dataset) -> Encoded:
    seq_len = config.data.seq_len
    specials = None
    if config.model.get("arch", "decoder") == "encoder":
      specials = tokenizers.special_ids(tokenizer)
      if "[CLS]" not in specials or "[SEP]" not in specials or seq_len < 3:
        raise UsageError(f"the encoder classifies [CLS] + tokens + [SEP]: it needs a tokenizer "
                         f"with [CLS] and [SEP] (this {tokenizer.kind} one has "
                         f"{sorted(specials) or 'none'}) and data.seq_len >= 3")
    train_tokens, train_lengths = encode(tokenizer, ds.train.texts, seq_len, specials)
    val_tokens, val_lengths = encode(tokenizer, ds.val.texts, seq_len, specials)
    return Encoded(ds, train_tokens, train_lengths, val_tokens, val_lengths)

  def batch(self, data: Encoded, config, step):
    balanced = bool((config.get("classify") or {}).get("balanced", False))
    idx = sample_batch(data.ds.train.labels, seed=config.seed, step=step,
                       batch_size=config.train.batch_size, balanced=balanced)
    return {"tokens": data.train_tokens[idx], "lengths": data.train_lengths[idx],
            "labels": data.ds.train.labels[idx]}

  def loss(self, model, batch, rngs):
    return loss_and_accuracy(model, batch, rngs)

  def evaluate(self, run, state, data: Encoded, max_batches):
    ds = data.ds  # every held-out speech, always: max_batches applies to the LM's windows
    return evaluate(run, state, ds.val, data.val_tokens, data.val_lengths, ds.majority,
                    ds.classes)

  def describe(self, result):
    return (f"held-out accuracy {result['val_accuracy']:.4f} | majority baseline "
            f"{result['majority_baseline']:.4f} ({result['majority_class']}) | best constant "
            f"{result['best_constant_baseline']:.4f}")

  def meta(self, data: Encoded):
    return {"classes": data.ds.classes}


TASK = Classify()
