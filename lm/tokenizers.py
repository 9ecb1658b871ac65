"""Tokenizers: byte-level, character-level (with byte fallback) and BPE files.

Every tokenizer round-trips any valid Unicode string exactly: `decode(encode(s)) == s`.
- byte: ids are the UTF-8 bytes (vocab 256); needs no training.
- char: ids 0..255 are UTF-8 bytes, 256.. the characters seen in the training text. A
  character outside that vocabulary falls back to its UTF-8 bytes, so nothing is lost.
- bpe: a Hugging Face `tokenizers` file (tokenizer.json), loaded from disk or trained.
A tokenizer serialises to JSON (`to_json`/`from_json`), stored in checkpoints and as
`tokenizer.json` in the run's directory (`save`/`load`).

Text that is not valid Unicode has one policy, applied by `clean_text` wherever text enters (every
tokenizer's `encode` and training, documents read by lm/data.py, sampling prompts): each lone
surrogate code point (U+D800..U+DFFF: half an emoji cut out of a JSON string, or an undecodable
byte of a file or command line, which Python carries as U+DC80..U+DCFF) becomes U+FFFD, as most
pipelines do, and a warning counts them. Such text cannot be written as UTF-8, so without this
every tokenizer failed on it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Protocol

import numpy as np
from absl import logging

FILENAME = "tokenizer.json"

_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_invalid(text: str) -> tuple[str, int]:
  """(text with every lone surrogate replaced by U+FFFD, how many were replaced)."""
  if _SURROGATE.search(text) is None:  # the usual case: one scan, no copy
    return text, 0
  return _SURROGATE.subn("\ufffd", text)


def warn_replaced(source: str, n: int) -> None:
  logging.warning("%s: %d invalid character(s) (lone surrogates or undecodable bytes) "
                  "replaced with U+FFFD", source, n)


def clean_text(text: str, source: str = "text") -> str:
  """`text` made encodable as UTF-8 (see module doc); logs a warning naming `source` if it
  held lone surrogates."""
  text, n = replace_invalid(text)
  if n:
    warn_replaced(source, n)
  return text


class Tokenizer(Protocol):
  kind: str
  vocab_size: int

  def encode(self, text: str) -> np.ndarray: ...
  def decode(self, ids: Iterable[int]) -> str: ...
  def to_json(self) -> str: ...


def save(tok: Tokenizer, directory: str) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, FILENAME), "w", encoding="utf-8") as f:
    f.write(tok.to_json())


class ByteTokenizer:
  kind = "byte"
  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(clean_text(text).encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    # Sampled ids may not form valid UTF-8; show those bytes as U+FFFD rather than fail.
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

  def to_json(self) -> str:
    return json.dumps({"type": "byte"})


class CharTokenizer:
  kind = "char"

  def __init__(self, chars: Iterable[str]):
    self.chars = sorted(set(chars))
    self.index = {c: 256 + i for i, c in enumerate(self.chars)}
    self.vocab_size = 256 + len(self.chars)

  @classmethod
  def train(cls, text: str) -> "CharTokenizer":
    return cls(set(clean_text(text)))

  def encode(self, text: str) -> np.ndarray:
    index = self.index
    out = []
    for c in clean_text(text):
      i = index.get(c)
      if i is None:
        out.extend(c.encode("utf-8"))  # byte fallback for unseen characters
      else:
        out.append(i)
    return np.asarray(out, np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    parts, pending = [], bytearray()
    for i in ids:
      i = int(i)
      if i < 256:
        pending.append(i)
        continue
      if pending:
        parts.append(pending.decode("utf-8", errors="replace"))
        pending = bytearray()
      parts.append(self.chars[i - 256] if i - 256 < len(self.chars) else "\ufffd")
    if pending:
      parts.append(pending.decode("utf-8", errors="replace"))
    return "".join(parts)

  def to_json(self) -> str:
    return json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False)


class BPETokenizer:
  """A Hugging Face `tokenizers` tokenizer (byte-level BPE such as GPT-2's)."""
  kind = "bpe"

  def __init__(self, tok):
    self.tok = tok
    self.vocab_size = tok.get_vocab_size()

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((clean_text(t) for t in texts), trainer=trainer)
    return cls(tok)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tok.encode(clean_text(text)).ids, np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return self.tok.decode([int(i) for i in ids])

  def to_json(self) -> str:
    return self.tok.to_str()


def from_json(text: str) -> Tokenizer:
  """Inverse of `to_json`; also reads a Hugging Face tokenizer.json."""
  payload = json.loads(text)
  kind = payload.get("type")
  if kind == "byte":
    return ByteTokenizer()
  if kind == "char":
    return CharTokenizer(payload["chars"])
  from tokenizers import Tokenizer as HFTokenizer
  return BPETokenizer(HFTokenizer.from_str(text))


def load(directory: str) -> Tokenizer:
  """Reads the tokenizer a run saved (or a Hugging Face tokenizer.json) from `directory`."""
  with open(os.path.join(directory, FILENAME), encoding="utf-8") as f:
    return from_json(f.read())
