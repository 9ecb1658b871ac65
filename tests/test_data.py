"""Tokenizers, corpora, splits and deterministic batches."""

import numpy as np
import pytest
from ml_collections import ConfigDict

from lm import data, tokenizers
from lm.errors import UsageError

UNICODE = "Hamlet — «to be» 生きるべきか 🎭 \u0301e\x00 tab\there \r\n end"


@pytest.mark.parametrize("tok", [tokenizers.ByteTokenizer(),
                                 tokenizers.CharTokenizer.train("abcdefg hij\n"),
                                 tokenizers.BPETokenizer.train(["the cat sat on the mat"] * 20, 300)])
def test_round_trip_on_arbitrary_unicode(tok, tmp_path):
  rng = np.random.default_rng(0)
  random_text = "".join(chr(c) for c in rng.integers(1, 0x2FFFF, 200)
                        if not 0xD800 <= c <= 0xDFFF)
  for text in (UNICODE, random_text, "", "abc"):
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and (ids < tok.vocab_size).all()
    assert tok.decode(ids) == text
  tokenizers.save(tok, str(tmp_path))
  again = tokenizers.load(str(tmp_path))
  assert again.vocab_size == tok.vocab_size
  np.testing.assert_array_equal(again.encode(UNICODE), tok.encode(UNICODE))


def test_char_tokenizer_falls_back_to_bytes_for_unseen_characters():
  tok = tokenizers.CharTokenizer.train("ab")
  assert tok.vocab_size == 258
  ids = tok.encode("aé")  # é is not in the vocabulary: its two UTF-8 bytes
  assert list(ids) == [256, 0xC3, 0xA9]
  assert tok.decode(ids) == "aé"
  assert tok.decode([256, 0xC3]) == "a\ufffd"  # a cut byte sequence decodes, marked


def data_cfg(**kw):
  return ConfigDict({"path": "", "tokenizer": "char", "vocab_size": 300, "seq_len": 16,
                     "val_fraction": 0.1, "text_field": "text", "token_dtype": "uint16", **kw})


def test_embedded_plays_split_by_play_and_clean_markdown():
  docs = data.play_documents()
  assert len(docs) >= 37 and all("/" in name for name, _ in docs)
  hamlet = dict(docs)["tragedies/hamlet"]
  assert "BERNARDO:\nWho's there?" in hamlet and "**" not in hamlet
  train, val = data.split_documents(docs, 0.1)
  assert len(val) == 4 and len(train) + len(val) == len(docs)
  assert not set(train) & set(val)
  assert data.split_documents(docs, 0.1) == (train, val)  # deterministic


def test_text_files_jsonl_and_token_files(tmp_path):
  (tmp_path / "a.txt").write_text("hello world\n" * 50)
  (tmp_path / "b.jsonl").write_text('{"text": "one line of text here"}\n' * 30)
  ids = np.arange(1000, dtype=np.uint16) % 256
  ids.tofile(tmp_path / "t.bin")
  c = data.load_corpus(data_cfg(path=str(tmp_path / "a.txt")))
  assert c.tokenizer.decode(c.train[:11]) == "hello world"
  assert c.val_bytes == len("hello world\n" * 50) - int(len("hello world\n" * 50) * 0.9)
  c = data.load_corpus(data_cfg(path=str(tmp_path / "b.jsonl")))
  assert "one line of text here" in c.tokenizer.decode(c.train)
  c = data.load_corpus(data_cfg(path=str(tmp_path / "t.bin"), tokenizer="byte"))
  assert isinstance(c.train, np.memmap) and len(c.train) == 900 and len(c.val) == 100


@pytest.mark.parametrize("make,message", [
    (lambda p: str(p / "missing.txt"), "matches no file"),
    (lambda p: (p / "e.txt").write_text("  \n") and str(p / "e.txt"), "corpus is empty"),
    (lambda p: (p / "x.txt").write_bytes(b"ok \xff\xfe bad") and str(p / "x.txt"),
     "not valid UTF-8"),
    (lambda p: (p / "j.jsonl").write_text('{"txt": 1}\n') and str(p / "j.jsonl"), "string field"),
    (lambda p: (p / "s.txt").write_text("tiny") and str(p / "s.txt"), "fewer than seq_len"),
])
def test_bad_data_raises_one_clear_error(tmp_path, make, message):
  with pytest.raises(UsageError, match=message):
    data.load_corpus(data_cfg(path=make(tmp_path)))


def test_batches_depend_only_on_seed_and_step():
  ids = np.arange(10_000, dtype=np.int32)
  b = data.get_batch(ids, seed=3, step=7, batch_size=8, seq_len=16)
  assert b.shape == (8, 17)
  np.testing.assert_array_equal(b[:, 1:], b[:, :-1] + 1)  # contiguous windows
  np.testing.assert_array_equal(b, data.get_batch(ids, seed=3, step=7, batch_size=8, seq_len=16))
  assert not np.array_equal(b, data.get_batch(ids, seed=3, step=8, batch_size=8, seq_len=16))


def test_eval_batches_score_every_target_exactly_once():
  ids = np.arange(1001, dtype=np.int32)
  seen = []
  for tokens, weights in data.eval_batches(ids, seq_len=64, batch_size=4):
    seen.extend(tokens[:, 1:][weights > 0].tolist())
  assert sorted(seen) == list(range(1, 1001))
