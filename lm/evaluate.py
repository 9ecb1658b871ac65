"""Use a trained run: load its latest checkpoint, evaluate on a whole split, or sample text."""

from __future__ import annotations

import copy
import json
import os

import jax
from absl import logging
from flax import nnx

from lm import checkpoint as ckpt_lib
from lm import data as data_lib
from lm import tokenizers
from lm import train as train_lib
from lm import validate
from lm.errors import UsageError


def load(config, workdir: str):
  """(run, state, tokenizer, step) of the latest checkpoint in `workdir`.

  The model's shape comes from the checkpoint's own config; everything else (data, batch
  sizes, attention_impl, dtype) from `config`, so one may evaluate on other data or kernels.
  """
  ckpt, meta = ckpt_lib.read_meta(workdir)
  config = copy.deepcopy(config)
  with config.unlocked():
    for field in train_lib.SHAPE_FIELDS + train_lib.NUMERIC_FIELDS:
      if field in meta["config"]["model"]:
        config.model[field] = meta["config"]["model"][field]
    if config.data.seq_len > config.model.max_seq_len:  # e.g. a converted GPT-2 of short context
      logging.info("data.seq_len %d -> the checkpoint's max_seq_len %d", config.data.seq_len,
                   config.model.max_seq_len)
      config.data.seq_len = config.model.max_seq_len
  tokenizer = tokenizers.from_json(meta["tokenizer"])
  run = train_lib.make_run(config, tokenizer.vocab_size)
  state = ckpt.restore(run.abstract_state())
  step = ckpt.latest_step()
  ckpt.close()
  return run, state, tokenizer, step


def evaluate_workdir(config, workdir: str, data_path: str | None = None) -> dict:
  """Loss, perplexity and bits per byte over the whole validation split; appended to metrics.

  With config.train.task="classify": held-out accuracy instead (lm/classify.py).
  """
  validate.check_config(config, "eval")
  if config.train.get("task", "lm") == "classify":
    from lm import classify
    if data_path is not None:
      raise UsageError("--data_path: the classification task reads the embedded plays")
    return classify.evaluate_workdir(config, workdir)
  run, state, tokenizer, step = load(config, workdir)
  if data_path is not None:
    with run.config.unlocked():
      run.config.data.path = data_path
  corpus = data_lib.load_corpus(run.config.data, tokenizer)
  with jax.set_mesh(run.mesh):
    result = train_lib.evaluate(run, train_lib.make_eval_step(run), state, corpus,
                                run.config.train.eval_batch_size)
  result = {"mode": "eval", "data": run.config.data.path or "embedded plays", **result}
  report(workdir, step, result)
  logging.info("eval at step %d: %s", step, result)
  return result


def report(workdir: str, step: int, result: dict) -> None:
  """Prints an evaluation's result (JSON, stdout) first, then appends it to metrics.jsonl, so
  a failing write (read-only or full disk: OSError) never loses it."""
  if jax.process_index() != 0:
    return
  print(json.dumps(result), flush=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": step, **result}) + "\n")


def sample_workdir(config, workdir: str, **overrides) -> list[str]:
  """Prints (and returns) samples; overrides replace fields of config.sample."""
  from lm import sample as sample_lib
  config = copy.deepcopy(config)
  with config.unlocked():
    config.sample.update(overrides)
  validate.check_config(config, "sample")
  run, state, tokenizer, _ = load(config, workdir)
  sample_cfg = run.config.sample
  model = nnx.merge(run.graphdef, state)[0]
  texts = sample_lib.sample_text(model, tokenizer, sample_cfg)
  for text in texts:
    print(f"--- sample ---\n{text}", flush=True)
  return texts
