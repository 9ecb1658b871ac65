"""Span corruption (T5) and the seq2seq data and metrics, against references written here."""

import functools
import json

import numpy as np
import pytest

from lm.errors import UsageError
from lm.tasks import seq2seq
from lm.tasks import span_corruption as sc


def reference_corrupt(tokens, mask, first_sentinel, eos):
  """T5's span corruption written as a plain loop over tokens."""
  inputs, targets, span = [], [], -1
  for i, (t, noisy) in enumerate(zip(tokens, mask)):
    opens = noisy and (i == 0 or not mask[i - 1])
    if opens:
      span += 1
      inputs.append(first_sentinel - span)
      targets.append(first_sentinel - span)
    (targets if noisy else inputs).append(int(t))
  return inputs + [eos], targets + [eos]


def spans(mask):
  """[(is_noise, length)] of the runs of `mask`."""
  out = []
  for m in mask:
    if out and out[-1][0] == m:
      out[-1][1] += 1
    else:
      out.append([bool(m), 1])
  return out


@pytest.mark.parametrize("length", [2, 3, 10, 57, 200])
def test_noise_mask_counts_and_alternation(length):
  rng = np.random.default_rng(length)
  for _ in range(20):
    mask = sc.noise_mask(rng, length, 0.15, 3.0)
    n_noise = min(max(round(length * 0.15), 1), length - 1)
    assert mask.shape == (length,) and mask.sum() == n_noise
    runs = spans(mask)
    assert not runs[0][0], "the first span is never noise"
    n_spans = sum(noisy for noisy, _ in runs)
    assert n_spans == min(max(round(n_noise / 3), 1), n_noise, length - n_noise)


def test_mean_noise_span_length_is_about_mean_span():
  rng = np.random.default_rng(0)
  lengths = [n for _ in range(300) for noisy, n in spans(sc.noise_mask(rng, 512, 0.15, 3.0))
             if noisy]
  assert abs(np.mean(lengths) - 3.0) < 0.1


def test_corrupt_matches_the_loop_reference_and_inverts():
  rng = np.random.default_rng(1)
  for length in (5, 31, 100):
    tokens = rng.integers(0, 50, size=length)
    mask = sc.noise_mask(rng, length, 0.15, 3.0)
    inputs, targets = sc.corrupt(tokens, mask, first_sentinel=99, eos=100)
    ref_in, ref_tgt = reference_corrupt(tokens, mask, 99, 100)
    assert inputs.tolist() == ref_in and targets.tolist() == ref_tgt
    assert (len(inputs), len(targets)) == sc.corrupted_lengths(length, 0.15, 3.0)
    # Putting each target span back at its sentinel restores the raw tokens.
    fill, cur = {}, None
    for t in targets[:-1]:
      if t > 50:
        cur = int(t)
        fill[cur] = []
      else:
        fill[cur].append(int(t))
    restored = [x for t in inputs[:-1] for x in (fill[int(t)] if t > 50 else [int(t)])]
    assert restored == tokens.tolist()


def test_raw_length_is_the_longest_that_fits():
  for inputs_length in (3, 16, 64, 512):
    raw = sc.raw_length_for(inputs_length, 0.15, 3.0)
    assert sc.corrupted_lengths(raw, 0.15, 3.0)[0] <= inputs_length
    assert sc.corrupted_lengths(raw + 1, 0.15, 3.0)[0] > inputs_length
  with pytest.raises(UsageError, match="cannot hold"):
    sc.raw_length_for(2, 0.15, 3.0)


def test_batches_are_a_function_of_seed_and_step():
  ids = np.random.default_rng(2).integers(0, 60, size=5000)
  kw = dict(batch_size=4, inputs_length=64, noise_density=0.15, mean_span=3.0,
            first_sentinel=99, eos=100)
  a = sc.get_batch(ids, seed=0, step=7, **kw)
  b = sc.get_batch(ids, seed=0, step=7, **kw)
  c = sc.get_batch(ids, seed=0, step=8, **kw)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not np.array_equal(a[0], c[0])
  raw = sc.raw_length_for(64, 0.15, 3.0)
  assert a[0].shape == (4, sc.corrupted_lengths(raw, 0.15, 3.0)[0])
  assert a[1].shape == (4, sc.corrupted_lengths(raw, 0.15, 3.0)[1])
  with pytest.raises(UsageError, match="needs more than"):
    sc.get_batch(ids[:raw], seed=0, step=0, **kw)


@functools.lru_cache(maxsize=None)
def levenshtein(a, b):
  """The textbook recursion (independent of the row DP under test)."""
  if not a or not b:
    return len(a) + len(b)
  return min(levenshtein(a[1:], b) + 1, levenshtein(a, b[1:]) + 1,
             levenshtein(a[1:], b[1:]) + (a[0] != b[0]))


def test_edit_distance_against_the_recursion():
  rng = np.random.default_rng(3)
  for _ in range(200):
    a = "".join(rng.choice(list("abcé "), size=rng.integers(0, 9)))
    b = "".join(rng.choice(list("abcé "), size=rng.integers(0, 9)))
    assert seq2seq.edit_distance(a, b) == levenshtein(a, b), (a, b)


def test_cer_and_exact_match():
  preds, targets = ["kitten", "abc", ""], ["sitting", "abc", "xy"]
  assert seq2seq.char_error_rate(preds, targets) == pytest.approx((3 + 0 + 2) / (7 + 3 + 2))
  assert seq2seq.exact_match(preds, targets) == pytest.approx(1 / 3)


def test_strip_for_restoration():
  text = "O Romeo, Romeo!\nWherefore art thou Romeo?  'Tis\tlate."
  assert seq2seq.strip_for_restoration(text) == "o romeo romeo wherefore art thou romeo tis late"


def test_restoration_pairs_hold_out_whole_plays():
  play = "HAMLET:\nTo be, or not to be: that is the question.\n\nOPHELIA:\nGood my lord,\nHow does your honour?\n"
  docs = [(f"{g}/{g}{i}", play) for g in ("comedy", "tragedy") for i in range(4)]
  train, val = seq2seq.restoration_pairs(0.25, min_chars=5, max_chars=100, docs=docs)
  assert len(train.inputs) == 12 and len(val.inputs) == 4  # 1 of 4 plays per genre held out
  assert val.targets[1] == "Good my lord,\nHow does your honour?"
  assert val.inputs[1] == "good my lord how does your honour"
  with pytest.raises(UsageError, match="no training speeches"):
    seq2seq.restoration_pairs(0.25, min_chars=500, docs=docs)


def test_read_pairs(tmp_path):
  path = tmp_path / "pairs.jsonl"
  lines = [json.dumps({"src": "a b", "tgt": "A, b."}), "", json.dumps({"src": "c" * 2000, "tgt": "C!"})]
  # One undecodable byte in 2 kB (under the 0.1% a file may have) becomes U+FFFD.
  path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"src": "\xff", "tgt": "d"}\n')
  pairs = seq2seq.read_pairs(str(path), "src", "tgt")
  assert pairs.inputs == ["a b", "c" * 2000, "\ufffd"] and pairs.targets == ["A, b.", "C!", "d"]
  path.write_text(json.dumps({"src": "a"}) + "\n")
  with pytest.raises(UsageError, match=r"pairs.jsonl:1: .*'tgt'"):
    seq2seq.read_pairs(str(path), "src", "tgt")
  path.write_text("\n\n")
  with pytest.raises(UsageError, match="no input/target pairs"):
    seq2seq.read_pairs(str(path), "src", "tgt")


def reference_bucket(rel, bidirectional, num_buckets=32, max_distance=128):
  """T5's relative position bucket for one integer, as Mesh TensorFlow describes it."""
  ret, n = 0, -rel  # n: query position - key position
  if bidirectional:
    num_buckets //= 2
    if n < 0:
      ret += num_buckets
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return ret + n
  far = max_exact + int(np.log(n / max_exact) / np.log(max_distance / max_exact)
                        * (num_buckets - max_exact))
  return ret + min(far, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bucket(bidirectional):
  import jax.numpy as jnp
  from lm.layers import relative_position_bucket
  rel = np.arange(-300, 301)
  got = relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional, num_buckets=32,
                                 max_distance=128)
  want = [reference_bucket(int(r), bidirectional) for r in rel]
  assert np.asarray(got).tolist() == want
  # Every bucket is reached within +-300, but bidirectional bucket 16 (a key after the query
  # at distance 0) cannot be.
  assert len(set(want)) == (31 if bidirectional else 32)
