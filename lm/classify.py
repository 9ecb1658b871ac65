"""Sequence classification: which genre a Shakespeare speech comes from.

The task, with real labels from the embedded corpus: every play lies in a genre folder
(comedies, histories, problems, roman, romances, tragedies). A speech is the text a speaker
says between their 'NAME:' line and the next blank line of the cleaned play (speaker names
themselves are left out); its label is its play's folder. Whole plays are held out: within
each genre the plays are ranked by a stable hash of their names (as lm/data.py ranks
documents) and the first max(1, round(n * data.val_fraction)) go to validation, so every
genre is represented there and no play is on both sides.

The model is the language model's Transformer with a classification head pooled from the
last real token (`Transformer.classify`), trained with cross-entropy; with
config.train.init_from it starts from a language model's parameters (the head is fresh).
Reported: held-out accuracy against the majority-class baseline (always answering the
commonest genre of the training speeches), and against the best constant answer in
hindsight (the commonest genre of the held-out speeches).

Entry points: `train(config, workdir)` (run.py --mode=train with config.train.task="classify")
and `evaluate_workdir(config, workdir)` (--mode=eval); experiments/finetune_classify.py.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import os
import re
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from lm import checkpoint as ckpt_lib
from lm import data as data_lib
from lm import sharding
from lm import tokenizers
from lm import train as train_lib
from lm import validate
from lm import workdir as workdir_lib
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


def encode(tokenizer, texts: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [n, seq_len] right-padded with 0, lengths [n]); a text keeps its first seq_len
  tokens."""
  tokens = np.zeros((len(texts), seq_len), np.int32)
  lengths = np.zeros((len(texts),), np.int32)
  for i, text in enumerate(texts):
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


# --- steps -----------------------------------------------------------------------------------

def _vector_sharding(run):
  return sharding.batch_sharding(run.mesh, run.rules, ndim=1)


def make_train_step(run: train_lib.Run):
  """jit(step)(state, tokens [B, T], lengths [B], labels [B], step) -> (state, metrics)."""
  dropout = run.model_cfg.dropout > 0
  seed = run.config.seed

  def loss_fn(params, model_def, tokens, lengths, labels, key):
    model = nnx.merge(model_def, params)
    logits = model.classify(tokens, lengths, rngs=nnx.Rngs(dropout=key) if dropout else None)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits.argmax(-1) == labels).mean()

  def step_fn(state, tokens, lengths, labels, step):
    model, opt = nnx.merge(run.graphdef, state)
    model_def, params = nnx.split(model)
    key = jax.random.fold_in(jax.random.key(seed), step)
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, model_def, tokens, lengths, labels, key)
    opt.update(model, grads)
    metrics = {"train_loss": loss, "train_accuracy": acc, "grad_norm": optax.tree.norm(grads),
               "lr": run.schedule(step)}
    return nnx.state((model, opt)), metrics

  vec = _vector_sharding(run)
  return jax.jit(step_fn, in_shardings=(run.shardings, run.batch_sharding, vec, vec, None),
                 out_shardings=(run.shardings, None), donate_argnums=0)


def make_eval_step(run: train_lib.Run):
  """jit(eval)(state, tokens, lengths, labels) -> (per-row loss [B], predictions [B])."""

  def eval_fn(state, tokens, lengths, labels):
    model, _ = nnx.merge(run.graphdef, state)
    logits = model.classify(tokens, jnp.maximum(lengths, 1))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels), logits.argmax(-1)

  vec = _vector_sharding(run)
  replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
  # Outputs replicated: every process can fetch all rows (they are a few numbers each).
  return jax.jit(eval_fn, in_shardings=(run.shardings, run.batch_sharding, vec, vec),
                 out_shardings=replicated)


def evaluate(run, eval_step, state, examples: Examples, tokens, lengths, batch_size: int,
             majority: int, classes: list[str]) -> dict:
  """Accuracy and loss over every held-out example, with the two constant baselines."""
  n = len(lengths)
  if n == 0:
    raise UsageError("no held-out speeches to evaluate on")
  train_lib.check_divides_data_parallel(run, eval_batch_size=batch_size)
  vec = _vector_sharding(run)
  put = train_lib.put_batch
  losses, preds = [], []
  for i in range(0, n, batch_size):
    idx = np.arange(i, i + batch_size)
    real = idx < n
    idx = np.where(real, idx, 0)
    t, l, y = tokens[idx], lengths[idx], examples.labels[idx]
    loss, pred = eval_step(state, put(run, t), put(run, l, vec), put(run, y, vec))
    losses.append(np.asarray(jax.device_get(loss))[real])
    preds.append(np.asarray(jax.device_get(pred))[real])
  pred, labels = np.concatenate(preds), examples.labels
  counts = np.bincount(labels, minlength=len(classes))
  per_class = {c: float((pred[labels == k] == k).mean()) if counts[k] else None
               for k, c in enumerate(classes)}
  return {"val_accuracy": float((pred == labels).mean()), "val_loss": float(np.concatenate(losses)[:n].mean()),
          "majority_class": classes[majority],
          "majority_baseline": float((labels == majority).mean()),
          "best_constant_baseline": float(counts.max() / n),
          "val_examples": int(n), "val_plays": len(set(examples.plays)),
          "val_accuracy_per_class": per_class}


# --- jobs ------------------------------------------------------------------------------------

def with_classes(config, ds: Dataset):
  """config with model.num_classes set from the data (0 in the config: take the data's)."""
  config = copy.deepcopy(config)
  with config.unlocked():
    if config.model.num_classes not in (0, len(ds.classes)):
      raise UsageError(f"model.num_classes={config.model.num_classes} but the data has "
                       f"{len(ds.classes)} classes {ds.classes}")
    config.model.num_classes = len(ds.classes)
  return config


def train(config, workdir: str) -> dict:
  """Trains (or resumes) a genre classifier; returns the last evaluation. Everything is read
  and checked before the workdir is written (as train.train)."""
  validate.check_config(config, "train")
  workdir_lib.check(workdir, "train")
  t_start = time.time()
  tc = config.train
  ckpt, latest = workdir_lib.existing_checkpoints(workdir, tc.keep_checkpoints)
  tokenizer, saved = None, None
  if tc.init_from:
    config, tokenizer = train_lib.adopt_source(config, tc.init_from)
  ds = dataset_for(config)
  config = with_classes(config, ds)
  if latest is not None:
    meta = ckpt.read_meta(latest)
    saved = meta["config"]
    train_lib._check_resumable(saved, config)
    tokenizer = tokenizers.from_json(meta["tokenizer"])
  tokenizer = tokenizer or data_lib.make_tokenizer(config.data, ds.train.texts)
  run = train_lib.make_run(config, tokenizer.vocab_size)
  train_lib.check_divides_data_parallel(run, batch_size=tc.batch_size,
                                        eval_batch_size=tc.eval_batch_size)
  workdir_lib.commit(workdir, config, tokenizer, saved, latest or 0)  # valid: now write
  ckpt = ckpt or ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       keep=tc.keep_checkpoints)
  if latest is not None:
    state = ckpt.restore(run.abstract_state(), latest)
  else:
    state = train_lib.init_state(run, config.seed)
    if tc.init_from:
      state = train_lib._load_params_from(run, state, tc.init_from)
  step = latest or 0

  seq_len = config.data.seq_len
  train_tokens, train_lengths = encode(tokenizer, ds.train.texts, seq_len)
  val_tokens, val_lengths = encode(tokenizer, ds.val.texts, seq_len)
  logging.info("genre classification: %d classes %s, %d training speeches from %d plays, %d "
               "held-out from %d plays %s", len(ds.classes), ds.classes, len(ds.train.texts),
               len(set(ds.train.plays)), len(ds.val.texts), len(set(ds.val.plays)),
               sorted(set(ds.val.plays)))
  meta = {"config": config.to_dict(), "tokenizer": tokenizer.to_json(), "seed": config.seed,
          "classes": ds.classes}
  train_step, eval_step = make_train_step(run), make_eval_step(run)
  writer, guard = train_lib.MetricsWriter(workdir), train_lib.NonFiniteGuard()
  vec = _vector_sharding(run)
  put = train_lib.put_batch  # the global batch; each process feeds its devices' rows
  last_eval, t_log, since = {}, time.time(), 0
  balanced = bool((config.get("classify") or {}).get("balanced", False))

  def do_eval():
    return evaluate(run, eval_step, state, ds.val, val_tokens, val_lengths, tc.eval_batch_size,
                    ds.majority, ds.classes)

  with ckpt_lib.StopSignal() as stop, jax.set_mesh(run.mesh), writer, ckpt:
    while step < tc.num_steps:
      idx = sample_batch(ds.train.labels, seed=config.seed, step=step,
                         batch_size=tc.batch_size, balanced=balanced)
      state, metrics = train_step(state, put(run, train_tokens[idx]),
                                  put(run, train_lengths[idx], vec),
                                  put(run, ds.train.labels[idx], vec), step)
      step += 1
      since += 1
      guard.update(metrics, step)
      is_log = step % tc.log_every == 0 or step == tc.num_steps
      is_eval = step % tc.eval_every == 0 or step == tc.num_steps
      is_save = step % tc.checkpoint_every == 0 or step == tc.num_steps or stop.requested
      if is_log or is_eval or is_save:
        guard.check(ckpt.latest_step())  # the loop syncs here anyway
      if is_log:
        metrics = jax.device_get(metrics)
        dt = (time.time() - t_log) / since
        logging.info("step %d/%d | loss %.4f | acc %.3f | %.1f ms/step", step, tc.num_steps,
                     metrics["train_loss"], metrics["train_accuracy"], 1e3 * dt)
        writer.write(step, {**metrics, "step_time_ms": 1e3 * dt})
        t_log, since = time.time(), 0
      if is_eval:
        last_eval = do_eval()
        logging.info("step %d | held-out accuracy %.4f | majority baseline %.4f (%s) | "
                     "best constant %.4f", step, last_eval["val_accuracy"],
                     last_eval["majority_baseline"], last_eval["majority_class"],
                     last_eval["best_constant_baseline"])
        writer.write(step, last_eval)
        t_log = time.time()
      if is_save:
        ckpt.save(step, state, {**meta, "step": step})
        t_log = time.time()
      if stop.requested:
        logging.warning("SIGTERM: checkpoint saved at step %d, stopping", step)
        break
  return {**last_eval, "step": step, "wall_time_s": time.time() - t_start}


def evaluate_workdir(config, workdir: str) -> dict:
  """Held-out accuracy of a workdir's classifier; printed and appended to metrics.jsonl."""
  from lm import evaluate as evaluate_lib
  run, state, tokenizer, step = evaluate_lib.load(config, workdir)
  if not run.model_cfg.num_classes:
    raise UsageError(f"the checkpoint in {workdir} has no classification head "
                     "(config.train.task='classify' evaluates classifiers)")
  ds = dataset_for(run.config)
  if len(ds.classes) != run.model_cfg.num_classes:
    raise UsageError(f"the checkpoint has {run.model_cfg.num_classes} classes, the data "
                     f"{len(ds.classes)}")
  tokens, lengths = encode(tokenizer, ds.val.texts, run.config.data.seq_len)
  with jax.set_mesh(run.mesh):
    result = evaluate(run, make_eval_step(run), state, ds.val, tokens, lengths,
                      run.config.train.eval_batch_size, ds.majority, ds.classes)
  result = {"mode": "eval", "task": "classify", **result}
  evaluate_lib.report(workdir, step, result)
  return result
