"""Tokenizers: byte-level, character-level (with byte fallback), BPE and word-piece files.

Every tokenizer but word-piece round-trips any valid Unicode string exactly:
`decode(encode(s)) == s` (word-piece, BERT's, lowercases and splits on whitespace and
punctuation: it keeps the words, not the spacing).
- byte: ids are the UTF-8 bytes (vocab 256); needs no training.
- char: ids 0..255 are UTF-8 bytes, 256.. the characters seen in the training text. A
  character outside that vocabulary falls back to its UTF-8 bytes, so nothing is lost.
- bpe: a Hugging Face `tokenizers` file (tokenizer.json), loaded from disk or trained.
- unigram: a sentencepiece Unigram model in a Hugging Face tokenizer.json (T5's), loaded only;
  `encode` applies the file's post-processor as Hugging Face's `tokenizer(text)` does (T5's
  appends "</s>"), and `decode` drops special tokens.
- wordpiece: BERT's (a tokenizer.json with a WordPiece model), trained here or loaded, with
  [PAD] [UNK] [CLS] [SEP] [MASK]; `encode` gives the text's pieces only, `encode_special` adds
  [CLS]/[SEP] and token types through the file's post-processor ([CLS] A [SEP] B [SEP]).
Special tokens: `special_ids(tok)` -> {"[CLS]": id, ...} (empty for byte and bpe). A char
tokenizer trained with `specials` has them after its characters (the encoder's tasks).
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


SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # word-piece's, at ids 0..4
CHAR_SPECIALS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]")  # char: no [UNK] (bytes fall back)


def special_ids(tok) -> dict[str, int]:
  """{special token: id} of a tokenizer ([CLS], [SEP], [PAD], [MASK], ...); {} if none."""
  return dict(getattr(tok, "special_ids", {}))


def token_id(tok, name: str) -> int | None:
  """The id of the token `name` (e.g. T5's "</s>"): a special of a char tokenizer, or a token
  of a Hugging Face tokenizer.json; None if the tokenizer has no such token."""
  ids = special_ids(tok)
  if name in ids:
    return ids[name]
  hf = getattr(tok, "tok", None)
  return None if hf is None else hf.token_to_id(name)


class CharTokenizer:
  kind = "char"

  def __init__(self, chars: Iterable[str], specials: Iterable[str] = ()):
    self.chars = sorted(set(chars))
    self.index = {c: 256 + i for i, c in enumerate(self.chars)}
    self.specials = list(specials)  # ids after the characters; never produced by encode
    self.special_ids = {name: 256 + len(self.chars) + i for i, name in enumerate(self.specials)}
    self.vocab_size = 256 + len(self.chars) + len(self.specials)

  @classmethod
  def train(cls, text: str, specials: Iterable[str] = ()) -> "CharTokenizer":
    return cls(set(clean_text(text)), specials)

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
      j = i - 256 - len(self.chars)
      parts.append(self.chars[i - 256] if i - 256 < len(self.chars) else
                   self.specials[j] if j < len(self.specials) else "\ufffd")
    if pending:
      parts.append(pending.decode("utf-8", errors="replace"))
    return "".join(parts)

  def to_json(self) -> str:
    extra = {"specials": self.specials} if self.specials else {}
    return json.dumps({"type": "char", "chars": self.chars, **extra}, ensure_ascii=False)


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


class WordPieceTokenizer(BPETokenizer):
  """BERT's word-piece tokenizer (a Hugging Face tokenizer.json with a WordPiece model)."""
  kind = "wordpiece"

  def __init__(self, tok):
    super().__init__(tok)
    self.special_ids = {name: tok.token_to_id(name) for name in SPECIALS
                        if tok.token_to_id(name) is not None}

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int) -> "WordPieceTokenizer":
    """Trained on `texts` as bert-base-uncased is made: BERT's normaliser (lowercase, accents
    stripped) and pre-tokenizer, "##" continuation pieces, SPECIALS at ids 0..4, and the
    post-processor "[CLS] $A [SEP]" / "[CLS] $A [SEP] $B:1 [SEP]:1"."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers, \
        pre_tokenizers, processors, trainers
    tok = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                        show_progress=False)
    tok.train_from_iterator((clean_text(t) for t in texts), trainer=trainer)
    # The trainer numbers the same vocabulary differently from run to run (the "##x" alphabet
    # comes out of a hash map), so two runs with one seed got different ids: renumber it
    # canonically, the specials first, then by string (WordPiece matches by string, not id).
    # Its choice between merges of equal count can still vary (seen on a repeated line, not
    # on the plays); a run's own tokenizer is saved, so resuming never depends on it.
    pieces = sorted(set(tok.get_vocab()) - set(SPECIALS))
    tok.model = models.WordPiece({p: i for i, p in enumerate(list(SPECIALS) + pieces)},
                                 unk_token="[UNK]")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return cls(tok)

  def encode(self, text: str) -> np.ndarray:
    """The pieces of `text`, without [CLS]/[SEP] (corpora are encoded as one stream)."""
    return np.asarray(self.tok.encode(clean_text(text), add_special_tokens=False).ids, np.int32)

  def encode_special(self, text: str, pair: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, token type ids) of `text` (and `pair`) with the post-processor's [CLS]/[SEP]."""
    enc = self.tok.encode(clean_text(text), None if pair is None else clean_text(pair))
    return np.asarray(enc.ids, np.int32), np.asarray(enc.type_ids, np.int32)

  def continuation(self) -> np.ndarray:
    """bool [vocab_size]: whether a piece continues a word ("##ing"), for whole-word masking."""
    out = np.zeros(self.vocab_size, bool)
    for piece, i in self.tok.get_vocab().items():
      out[i] = piece.startswith("##")
    return out


class UnigramTokenizer(BPETokenizer):
  """A sentencepiece Unigram tokenizer.json (T5's): Metaspace pre-tokenizer and decoder."""
  kind = "unigram"


def from_json(text: str) -> Tokenizer:
  """Inverse of `to_json`; also reads a Hugging Face tokenizer.json (WordPiece, Unigram or
  BPE)."""
  payload = json.loads(text)
  kind = payload.get("type")
  if kind == "byte":
    return ByteTokenizer()
  if kind == "char":
    return CharTokenizer(payload["chars"], payload.get("specials", ()))
  from tokenizers import Tokenizer as HFTokenizer
  model = payload.get("model") or {}
  cls = {"WordPiece": WordPieceTokenizer, "Unigram": UnigramTokenizer}.get(model.get("type"),
                                                                         BPETokenizer)
  return cls(HFTokenizer.from_str(text))


def load(directory: str) -> Tokenizer:
  """Reads the tokenizer a run saved (or a Hugging Face tokenizer.json) from `directory`."""
  with open(os.path.join(directory, FILENAME), encoding="utf-8") as f:
    return from_json(f.read())
