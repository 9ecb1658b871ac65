"""T5's span-corruption pre-training data (Raffel et al. 2020, section 3.1.4; t5.data.preprocessors
`span_corruption`, `random_spans_noise_mask`, `random_spans_helper`).

A window of raw tokens is split into alternating non-noise and noise spans (noise_density of the
tokens, mean noise span length mean_span, the first span never noise). The encoder input keeps
the non-noise tokens with each noise span replaced by one sentinel; the target lists each noise
span after its sentinel. Sentinel i is `first_sentinel - i` (T5's <extra_id_i> count down from
the end of the vocabulary). Both end with EOS:

  raw      a b c d e f g h          noise: c d, g
  inputs   a b <0> e f <1> h EOS
  targets  <0> c d <1> g EOS

Everything is numpy and a pure function of (seed, step, row), like lm/data.py's batches, so a
resumed run sees the same examples.

The task `span_corruption` (config.train.task): lm/data.py's corpus (data.path, the embedded
plays by default) with the char tokenizer and T5's specials (lm/tasks/seq2seq.py: <pad>, </s>,
100 sentinels); inputs of data.seq_len tokens at most (every row the same length, from raw
windows of raw_length_for(data.seq_len)), noise density and mean span length from
config.span_corruption (0.15 and 3, T5's). Loss and evaluation are seq2seq's (teacher-forced
cross-entropy and per-token accuracy); evaluation runs over consecutive raw windows of the
held-out split, each corrupted with draws fixed by its index, so every evaluation scores the
same examples. Config: experiments/t5_span.py; fine-tune with the seq2seq task
(train.init_from: the same tokenizer and model).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lm import data as data_lib
from lm.errors import UsageError
from lm.tasks import seq2seq


def _counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
  """(noise tokens, noise spans) of a raw window of `length` tokens (length >= 2)."""
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  num_spans = max(int(round(num_noise / mean_span)), 1)
  return num_noise, min(num_spans, num_noise, length - num_noise)


def corrupted_lengths(raw_length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
  """(inputs length, targets length) that a raw window of `raw_length` tokens corrupts to,
  EOS included: every window of that length gives exactly these lengths."""
  num_noise, num_spans = _counts(raw_length, noise_density, mean_span)
  return raw_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def raw_length_for(inputs_length: int, noise_density: float, mean_span: float) -> int:
  """The longest raw window whose corrupted inputs fit in `inputs_length` tokens (T5's
  random_spans_helper). UsageError if even 2 raw tokens do not fit."""
  if corrupted_lengths(2, noise_density, mean_span)[0] > inputs_length:
    raise UsageError(f"span corruption: inputs of {inputs_length} tokens cannot hold a corrupted "
                     "window (need at least 3: a token, a sentinel and EOS)")
  n = 2
  while corrupted_lengths(n + 1, noise_density, mean_span)[0] <= inputs_length:
    n += 1
  return n


def _random_partition(rng: np.random.Generator, n_items: int, n_parts: int) -> np.ndarray:
  """n_parts positive lengths summing to n_items, uniformly over the compositions."""
  cuts = np.sort(rng.choice(np.arange(1, n_items), size=n_parts - 1, replace=False))
  return np.diff(np.concatenate([[0], cuts, [n_items]]))


def noise_mask(rng: np.random.Generator, length: int, noise_density: float,
               mean_span: float) -> np.ndarray:
  """bool [length]: True on noise tokens; alternating spans, the first one non-noise."""
  num_noise, num_spans = _counts(length, noise_density, mean_span)
  noise = _random_partition(rng, num_noise, num_spans)
  keep = _random_partition(rng, length - num_noise, num_spans)
  spans = np.stack([keep, noise], 1).reshape(-1)  # keep_0, noise_0, keep_1, noise_1, ...
  return np.repeat(np.tile([False, True], num_spans), spans)


def corrupt(tokens: np.ndarray, mask: np.ndarray, *, first_sentinel: int,
            eos: int) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) int32 of raw `tokens` [n] under noise `mask` [n] (see the module doc)."""
  tokens = np.asarray(tokens, np.int32)
  starts = mask & ~np.concatenate([[False], mask[:-1]])  # first token of each noise span
  sentinel = first_sentinel - (np.cumsum(starts) - 1)  # the span's sentinel, per token
  inputs = np.where(starts, sentinel, tokens)[starts | ~mask]  # a span collapses to its sentinel
  # Each noise token, preceded by its span's sentinel when it opens the span (row-major pairs).
  pairs = np.stack([sentinel[mask], tokens[mask]], 1)
  targets = pairs[np.stack([starts[mask], np.ones(mask.sum(), bool)], 1)]
  return (np.concatenate([inputs, [eos]]).astype(np.int32),
          np.concatenate([targets, [eos]]).astype(np.int32))


def get_batch(ids: np.ndarray, *, seed: int, step: int, batch_size: int, inputs_length: int,
              noise_density: float, mean_span: float, first_sentinel: int,
              eos: int) -> tuple[np.ndarray, np.ndarray]:
  """The span-corruption batch of `step`: (inputs [B, inputs_length'], targets [B, L_t]) int32,
  from random raw windows of `ids`; a function of (seed, step) alone.

  Every row has the same lengths (corrupted_lengths of raw_length_for(inputs_length)), so no
  padding is needed. UsageError if `ids` is shorter than one raw window.
  """
  raw = raw_length_for(inputs_length, noise_density, mean_span)
  if len(ids) <= raw:
    raise UsageError(f"span corruption needs more than {raw} tokens of text, got {len(ids)}")
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, len(ids) - raw, size=batch_size)
  rows = [corrupt(np.asarray(ids[s:s + raw]), noise_mask(rng, raw, noise_density, mean_span),
                  first_sentinel=first_sentinel, eos=eos) for s in starts]
  return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


# --- the task ----------------------------------------------------------------------------------

def options(config) -> tuple[float, float]:
  """(noise_density, mean_span) of config.span_corruption ((0.15, 3.0) when absent)."""
  sc = config.get("span_corruption") or {}
  return float(sc.get("noise_density", 0.15)), float(sc.get("mean_span", 3.0))


@dataclasses.dataclass
class SpanData:
  train: np.ndarray  # the training split's token ids
  val: seq2seq.Examples  # the held-out windows, corrupted
  specials: seq2seq.Specials


def held_out(ids: np.ndarray, *, seed: int, inputs_length: int, noise_density: float,
             mean_span: float, specials: seq2seq.Specials) -> seq2seq.Examples:
  """Consecutive raw windows of `ids`, window i corrupted with the draws of [seed, i, 2] (never a
  training step's [seed, step])."""
  raw = raw_length_for(inputs_length, noise_density, mean_span)
  rows = [corrupt(np.asarray(ids[s:s + raw]),
                  noise_mask(np.random.default_rng([seed, i, 2]), raw, noise_density, mean_span),
                  first_sentinel=specials.first_sentinel, eos=specials.eos)
          for i, s in enumerate(range(0, len(ids) - raw + 1, raw))]
  return seq2seq.Examples(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))


class SpanCorruption(seq2seq.Seq2Seq):
  """T5's pre-training objective; the loss, evaluation and log line are seq2seq's."""
  name = "span_corruption"

  def load_data(self, config, tokenizer):
    seq2seq.check_model(config, self.name)
    corpus = data_lib.load_corpus(config.data, tokenizer,
                                  seq2seq.char_specials(seq2seq.NUM_SENTINELS))
    specials = seq2seq.specials_of(corpus.tokenizer)
    config = seq2seq.with_start_token(config, specials)
    density, mean = options(config)
    raw = raw_length_for(config.data.seq_len, density, mean)
    spans = _counts(raw, density, mean)[1]
    if spans > specials.num_sentinels:
      raise UsageError(f"span corruption: data.seq_len={config.data.seq_len} makes {spans} noise "
                       f"spans a row, more than the tokenizer's {specials.num_sentinels} "
                       f"sentinels {seq2seq.sentinel(0)}..")
    for split, ids in (("training", corpus.train), ("validation", corpus.val)):
      if len(ids) <= raw:
        raise UsageError(f"span corruption: the {split} split has {len(ids)} tokens, it needs "
                         f"more than one raw window of {raw}")
    val = held_out(corpus.val, seed=config.seed, inputs_length=config.data.seq_len,
                   noise_density=density, mean_span=mean, specials=specials)
    return config, corpus.tokenizer, SpanData(corpus.train, val, specials)

  def eval_data(self, config, tokenizer, data_path):
    if data_path is not None:
      raise UsageError("--data_path: the span_corruption task reads the data its config names")
    return self.load_data(config, tokenizer)[2]

  def batch(self, data: SpanData, config, step):
    density, mean = options(config)
    inputs, targets = get_batch(data.train, seed=config.seed, step=step,
                                batch_size=config.train.batch_size,
                                inputs_length=config.data.seq_len, noise_density=density,
                                mean_span=mean, first_sentinel=data.specials.first_sentinel,
                                eos=data.specials.eos)
    return seq2seq.make_batch(inputs, targets, data.specials)

  def evaluate(self, run, state, data: SpanData, max_batches):
    return seq2seq.teacher_forced(run, state, data.val, data.specials, max_batches)

  def report(self, run, state, tokenizer, data):
    pass


TASK = SpanCorruption()
