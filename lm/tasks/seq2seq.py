"""Supervised sequence-to-sequence data and its metrics.

Pairs (input text, target text) come from a `.jsonl` file (one object per line, the two texts in
named fields) or from the embedded task: restoring a Shakespeare speech's punctuation, capitals
and line breaks from its lower-cased, unpunctuated one-line form. Held-out plays give the
validation pairs (the same split as genre classification), so no speech is in both.

Metrics: character error rate (Levenshtein edit distance over target characters, summed over the
corpus) and exact match; the copy baseline (output = input) is what a model must beat.
"""

from __future__ import annotations

import dataclasses
import unicodedata

import numpy as np

from lm import data as data_lib
from lm import tokenizers
from lm.errors import UsageError
from lm.tasks import classify


@dataclasses.dataclass
class Pairs:
  inputs: list[str]
  targets: list[str]


def strip_for_restoration(text: str) -> str:
  """The restoration task's input: lower case, no punctuation (Unicode category P*), every run
  of whitespace (line breaks included) one space."""
  kept = "".join(c for c in text.lower() if not unicodedata.category(c).startswith("P"))
  return " ".join(kept.split())


def restoration_pairs(val_fraction: float = 0.1, min_chars: int = 20, max_chars: int = 200,
                      docs: list[tuple[str, str]] | None = None) -> tuple[Pairs, Pairs]:
  """(train, validation) pairs of the embedded restoration task: every speech of
  min_chars..max_chars characters (as printed) whose stripped form is not empty."""
  docs = data_lib.play_documents() if docs is None else docs
  held = classify.split_plays([n for n, _ in docs], val_fraction)
  train, val = Pairs([], []), Pairs([], [])
  for name, text in docs:
    part = val if name in held else train
    for speech in classify.speeches(text):
      stripped = strip_for_restoration(speech)
      if min_chars <= len(speech) <= max_chars and stripped:
        part.inputs.append(stripped)
        part.targets.append(speech)
  for split, part in (("training", train), ("validation", val)):
    if not part.inputs:
      raise UsageError(f"the restoration task has no {split} speeches of {min_chars}..{max_chars} "
                       "characters")
  return train, val


def read_pairs(path: str, input_field: str, target_field: str) -> Pairs:
  """Pairs from a .jsonl file, valid Unicode (U+FFFD for undecodable bytes, as every source);
  UsageError naming the line for bad JSON or a missing field, or for a file without pairs."""
  rows = data_lib.read_jsonl(path, input_field, target_field)
  if not rows:
    raise UsageError(f"{path}: no input/target pairs")
  clean = lambda i: [tokenizers.clean_text(r[i], path) for r in rows]
  return Pairs(clean(1), clean(2))


def edit_distance(a: str, b: str) -> int:
  """Levenshtein distance (insertions, deletions, substitutions cost 1), one DP row at a time."""
  if len(a) < len(b):
    a, b = b, a
  row = np.arange(len(b) + 1)
  codes = np.frombuffer(b.encode("utf-32-le"), np.uint32)
  for i, ch in enumerate(a, 1):
    sub = row[:-1] + (codes != ord(ch))  # diagonal: substitute or match
    new = np.empty_like(row)
    new[0] = i
    new[1:] = np.minimum(sub, row[1:] + 1)  # ... or delete ch
    # Insertions chain along the row: new[j] = min(new[j], new[j-1] + 1), a running minimum.
    new = np.minimum.accumulate(new - np.arange(len(new))) + np.arange(len(new))
    row = new
  return int(row[-1])


def char_error_rate(predictions: list[str], targets: list[str]) -> float:
  """Total edit distance / total target characters (corpus-level CER)."""
  if len(predictions) != len(targets):
    raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
  chars = sum(len(t) for t in targets)
  return sum(edit_distance(p, t) for p, t in zip(predictions, targets)) / max(chars, 1)


def exact_match(predictions: list[str], targets: list[str]) -> float:
  """Fraction of predictions equal to their target."""
  return float(np.mean([p == t for p, t in zip(predictions, targets)])) if targets else 0.0
