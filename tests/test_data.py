"""Tokenizers, corpora, splits and deterministic batches."""

import json

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


# --- issue 11: Unicode line separators, lone surrogates, pre-tokenized files ------------------

def test_jsonl_lines_end_at_newline_only(tmp_path):
  """U+2028/U+2029/U+0085 and the other str.splitlines() breaks are legal unescaped inside JSON
  strings; each document reads back exactly. Old code split on them: "not valid JSON"."""
  texts = [f"first line\u2028same document number {i}" for i in range(3)] + [
      "para\u2029graph", "next\x85line", "form\x0cfeed\x0bvtab\x1cfs\x1dgs\x1ers"]
  lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts]
  path = tmp_path / "d.jsonl"
  path.write_bytes(("\n".join(lines[:-1]) + "\r\n" + lines[-1] + "\n").encode("utf-8"))
  docs = data.documents(data_cfg(path=str(path)))
  assert docs == [(f"{path}:{n}", t) for n, t in enumerate(texts, 1)]


def test_line_separators_inside_a_line_of_a_play_stay_in_it():
  """clean_play and classify.speeches split lines on "\\n" only (old: splitlines broke them)."""
  from lm.tasks import classify
  play = "**HAMLET**\nTo be,\u2028or not\x85to be\n"
  assert data.clean_play(play) == "HAMLET:\nTo be,\u2028or not\x85to be\n"
  assert classify.speeches(data.clean_play(play)) == ["To be,\u2028or not\x85to be"]


BPE = tokenizers.BPETokenizer.train(["the cat sat on the mat"] * 20, 300)


@pytest.mark.parametrize("tok", [tokenizers.ByteTokenizer(), tokenizers.CharTokenizer.train("ab"),
                                 BPE], ids=["byte", "char", "bpe"])
def test_lone_surrogates_encode_as_replacement_characters(tok, caplog):
  """Old code: UnicodeEncodeError (byte, char) or TypeError (bpe)."""
  fffd = list("\ufffd".encode("utf-8"))  # EF BF BD, written out independently below
  assert fffd == [0xEF, 0xBF, 0xBD]
  with caplog.at_level("WARNING"):
    ids = tok.encode("a\udc80b\ud83d")
  assert "2 invalid character(s)" in caplog.text
  if tok.kind == "byte":
    assert list(ids) == [ord("a"), *fffd, ord("b"), *fffd]
  elif tok.kind == "char":
    assert list(ids) == [256, *fffd, 257, *fffd]
  assert tok.decode(ids) == "a\ufffdb\ufffd"
  np.testing.assert_array_equal(ids, tok.encode("a\ufffdb\ufffd"))


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_lone_surrogates_in_jsonl_become_replacement_characters(tmp_path, kind):
  """A cut emoji (legal JSON) no longer ends load_corpus in a UnicodeEncodeError."""
  texts = [f"emoji cut in half \ud83d here, document {i}" for i in range(12)]
  path = tmp_path / "s.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))  # as "\ud83d" escapes
  want = [t.replace("\ud83d", "\ufffd") for t in texts]
  docs = data.documents(data_cfg(path=str(path)))
  assert [t for _, t in docs] == want
  c = data.load_corpus(data_cfg(path=str(path), tokenizer=kind, vocab_size=280, seq_len=4))
  train, val = data.split_documents(docs, 0.1)
  assert c.tokenizer.decode(c.train) == "\n\n".join(train)
  assert c.tokenizer.decode(c.val) == "\n\n".join(val)
  assert c.val_bytes == len("\n\n".join(val).encode("utf-8"))


def test_a_few_undecodable_bytes_in_a_text_file_become_replacement_characters(tmp_path):
  """Same policy as lone surrogates (one U+FFFD per byte); a file with more than 1 in 1000
  undecodable bytes is in another encoding and still refused (previous test, "not valid UTF-8").
  Old code refused any file with a single bad byte."""
  text = "hello world\n" * 500
  (tmp_path / "a.txt").write_bytes(text.encode() + b"caf\xe9 \xff\xfe!\n" + text.encode())
  docs = data.documents(data_cfg(path=str(tmp_path / "a.txt")))
  assert docs == [(str(tmp_path / "a.txt"), text + "caf\ufffd \ufffd\ufffd!\n" + text)]


def test_undecodable_bytes_of_a_command_line_prompt_become_replacement_characters():
  """Python hands argv's undecodable bytes over as U+DC80..U+DCFF; the prompt is cleaned once
  and printed back exactly (old code: UnicodeEncodeError)."""
  from flax import nnx
  from lm import sample
  from lm.config import model_config
  from lm.model import Transformer
  model = Transformer(model_config(vocab_size=256, num_layers=1, d_model=16, num_heads=2,
                                   max_seq_len=16), nnx.Rngs(0))
  cfg = ConfigDict({"prompt": "", "max_new_tokens": 3, "temperature": 0.0, "top_k": 0,
                    "top_p": 1.0, "num_samples": 1, "seed": 0})
  prompt = b"caf\xe9!".decode("utf-8", "surrogateescape")  # as sys.argv carries it
  (out,) = sample.sample_text(model, tokenizers.ByteTokenizer(), cfg, prompt)
  assert out.startswith("caf\ufffd!") and out.encode("utf-8")


# Pre-tokenized files: every id in [0, vocab), over the whole file.

@pytest.mark.parametrize("write,tokenizer,message", [
    # the cases, each with its offset in the training part (old code: NaN / garbage)
    (lambda p: np.save(p / "t.npy", np.where(np.arange(2000) == 3, 60000, np.arange(2000) % 256)
                       .astype(np.uint16)), "byte",
     r"t.npy: token id 60000 at offset 3 is outside the vocabulary \[0, 256\)"),
    (lambda p: np.save(p / "t.npy", np.where(np.arange(2000) == 500, -1, np.arange(2000) % 256)
                       .astype(np.int32)), "byte", r"token id -1 at offset 500 is outside"),
    (lambda p: (np.arange(2000) % 256).astype(np.uint32).tofile(p / "t.bin"), "byte",
     r"every id at an odd offset is 0.*token_dtype=uint16.*\(uint32\?\)"),
    # the same kind: non-integer dtypes, lengths that no uint16 file has
    (lambda p: np.save(p / "t.npy", np.arange(2000, dtype=np.float32) % 256), "byte",
     r"integer token ids .* got float32\[2000\]"),
    (lambda p: np.save(p / "t.npy", np.ones(2000, bool)), "byte", "integer token ids"),
    (lambda p: (p / "t.bin").write_bytes(bytes(2001)), "byte",
     "2001 bytes is not a whole number of uint16 ids"),
])
def test_bad_token_files_raise_one_clear_error(tmp_path, write, tokenizer, message):
  write(tmp_path)
  path = str(next(tmp_path.glob("t.*")))
  with pytest.raises(UsageError, match=message):
    data.load_corpus(data_cfg(path=path, tokenizer=tokenizer))


def test_token_ids_are_checked_over_the_whole_file_in_chunks(tmp_path, monkeypatch):
  """The first bad id is found far past the first chunk (old code looked at the validation
  part's first 2**20 ids only), and a wider file read with the right dtype loads exactly."""
  monkeypatch.setattr(data, "CHECK_CHUNK", 64)
  ids = np.arange(5000, dtype=np.uint32) % 256
  ids.tofile(tmp_path / "ok.bin")
  c = data.load_corpus(data_cfg(path=str(tmp_path / "ok.bin"), tokenizer="byte",
                                token_dtype="uint32"))
  np.testing.assert_array_equal(np.concatenate([c.train, c.val]), ids)
  ids[[3001, 4000]] = 256
  ids.tofile(tmp_path / "bad.bin")
  with pytest.raises(UsageError, match="token id 256 at offset 3001 is outside"):
    data.load_corpus(data_cfg(path=str(tmp_path / "bad.bin"), tokenizer="byte",
                              token_dtype="uint32"))
  with pytest.raises(UsageError, match="token_dtype='float32' is not an integer dtype"):
    data.load_corpus(data_cfg(path=str(tmp_path / "ok.bin"), tokenizer="byte",
                              token_dtype="float32"))
