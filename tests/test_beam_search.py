"""Beam search (lm.sample.beam_search): against exhaustive search over a tiny vocabulary,
against greedy with one beam, scores recomputed in float64, settings validated; for both
families that generate (a decoder continues the prompt, an encoder-decoder encodes it and
decodes from its start token)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import sample as sample_lib
from lm.errors import UsageError
from tests import test_t5
from tests.test_generate import random_model

V, STOP = 4, 0
FAMILIES = ("decoder", "encoder_decoder")


def make_model(family, seed, **decoder_fields):
  """A random model over the vocabulary V: a decoder (with decoder_fields) or a T5 v1.0
  encoder-decoder (two encoder and three decoder layers)."""
  if family == "decoder":
    return random_model(seed, vocab_size=V, **decoder_fields)
  return test_t5.make("1.0", seed, vocab_size=V)


@jax.jit
def _forward(model, prompt, rows):
  if model.cfg.arch == "decoder":
    return model(rows)
  return model(jnp.broadcast_to(prompt, (rows.shape[0], prompt.shape[0])), rows)


def log_probs(model, prompt, continuations, length):
  """float64 log-softmax of the next token after each continuation c of the prompt, from one
  forward pass over right-padded rows (causal: the padding is invisible before it). A decoder
  reads prompt + c; an encoder-decoder encodes the prompt and reads its start token + c."""
  lead = list(prompt) if model.cfg.arch == "decoder" else [model.cfg.decoder_start_id]
  rows = np.zeros((len(continuations), len(lead) + length), np.int32)
  for r, c in enumerate(continuations):
    rows[r, :len(lead) + len(c)] = np.concatenate([lead, c]).astype(np.int32)
  logits = np.asarray(_forward(model, jnp.asarray(prompt, jnp.int32), rows), np.float64)
  out = []
  for r, c in enumerate(continuations):
    z = logits[r, len(lead) + len(c) - 1]
    out.append(z - z.max() - np.log(np.exp(z - z.max()).sum()))
  return out


def score(model, prompt, seq, length_penalty, max_len):
  """sum log p(seq) / len(seq) ** length_penalty in float64 (seq includes its stop token)."""
  prefixes = [seq[:i] for i in range(len(seq))]
  lps = log_probs(model, prompt, prefixes + [[]] * (max_len - len(seq)), max_len)  # one shape
  return sum(lp[t] for lp, t in zip(lps, seq)) / len(seq) ** length_penalty


def exhaustive(model, prompt, max_len, length_penalty):
  """Every finished sequence (ends in STOP, no STOP before it, or max_len tokens without
  one) with its score, best first (numpy over every prefix's float64 log-probabilities)."""
  prefixes = [list(p) for n in range(max_len)
              for p in itertools.product([t for t in range(V) if t != STOP], repeat=n)]
  lp = dict(zip(map(tuple, prefixes), log_probs(model, prompt, prefixes, max_len)))
  scored = []
  for p in prefixes:
    total = sum(lp[tuple(p[:i])][t] for i, t in enumerate(p))
    ends = [STOP] + ([t for t in range(V) if t != STOP] if len(p) == max_len - 1 else [])
    for t in ends:
      seq = p + [t]
      scored.append(((total + lp[tuple(p)][t]) / len(seq) ** length_penalty, seq))
  return sorted(scored, key=lambda x: -x[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_best_beams_equal_exhaustive_search(family):
  """With beams enough to keep every prefix ((V-1)^(L-1) * V = 108), beam search is exact:
  its 5 best hypotheses per prompt (left-padded batch) equal exhaustive search's under each
  length penalty, which picks different winners (so the penalty is applied as specified).
  Verified to fail with the penalty's length counted without the stop token, and (encoder-
  decoder) with the encoder's padding mask dropped from the cross-attention's cache."""
  model = make_model(family, 41, max_seq_len=16)
  rng = np.random.default_rng(41)
  prompts = [rng.integers(0, V, 2), rng.integers(0, V, 5)]
  max_len, winners = 4, set()
  for length_penalty in (-1.0, 0.0, 1.0, 3.0):
    got = sample_lib.beam_generate(model, prompts, max_new_tokens=max_len, num_beams=108,
                                   length_penalty=length_penalty, num_return_sequences=5,
                                   stop_token=STOP)
    for prompt, hyps in zip(prompts, got):
      want = exhaustive(model, prompt, max_len, length_penalty)[:5]
      for (seq, s), (s_want, seq_want) in zip(hyps, want):
        cut = seq_want[:-1] if seq_want[-1] == STOP else seq_want
        np.testing.assert_array_equal(seq, cut)
        assert s == pytest.approx(s_want, rel=1e-5, abs=1e-5)
      winners.add((length_penalty > 0, tuple(want[0][1])))
  assert len({w for _, w in winners}) > 1  # the length penalty changes the best sequence


@pytest.mark.parametrize("family", FAMILIES)
def test_one_beam_is_greedy(family):
  model = make_model(family, 42, max_seq_len=32)
  rng = np.random.default_rng(42)
  prompts = [rng.integers(0, V, 3), rng.integers(0, V, 6)]
  greedy = sample_lib.generate(model, prompts, max_new_tokens=10, temperature=0.0)
  for early in (False, True):
    beams = sample_lib.beam_generate(model, prompts, max_new_tokens=10, num_beams=1,
                                     early_stopping=early)
    for g, b in zip(greedy, beams):
      np.testing.assert_array_equal(b[0][0], g[0])
  # With a stop token, early stopping ends at greedy's first stop.
  stop = int(greedy[0][0][3])
  greedy = sample_lib.generate(model, prompts, max_new_tokens=10, temperature=0.0,
                               stop_token=stop)
  beams = sample_lib.beam_generate(model, prompts, max_new_tokens=10, num_beams=1,
                                   early_stopping=True, stop_token=stop)
  for g, b in zip(greedy, beams):
    np.testing.assert_array_equal(b[0][0], g[0])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("early_stopping", [False, True])
def test_pruned_beams_report_their_float64_scores_best_first(early_stopping, family):
  """3 beams (the cache is reordered as beams are chosen; the decoder's is a rolling window of
  3, the encoder-decoder's holds the cross-attention keys and values too): each returned
  hypothesis's score is its float64 recomputation from a full forward pass, best first;
  sampling with generate(num_beams=3) returns the same sequences."""
  model = make_model(family, 43, max_seq_len=32, attention_window=3)
  rng = np.random.default_rng(43)
  prompts = [rng.integers(0, V, 2), rng.integers(0, V, 5)]
  max_len = 8
  got = sample_lib.beam_generate(model, prompts, max_new_tokens=max_len, num_beams=3,
                                 length_penalty=1.0, early_stopping=early_stopping,
                                 num_return_sequences=3, stop_token=STOP)
  for prompt, hyps in zip(prompts, got):
    assert len(hyps) == 3
    scores = [s for _, s in hyps]
    assert scores == sorted(scores, reverse=True)
    for seq, s in hyps:
      full = list(seq) + ([STOP] if len(seq) < max_len else [])
      assert s == pytest.approx(score(model, prompt, full, 1.0, max_len), rel=1e-5, abs=1e-5)
  plain = sample_lib.generate(model, prompts, max_new_tokens=max_len, num_beams=3,
                              early_stopping=early_stopping, num_return_sequences=3,
                              stop_token=STOP)
  for hyps, seqs in zip(got, plain):
    for (seq, _), s in zip(hyps, seqs):
      np.testing.assert_array_equal(seq, s)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_beams=0), "num_beams must be >= 1"),
    (dict(num_beams=2, num_return_sequences=3), r"num_return_sequences \(3\) must be <= num_beams"),
    (dict(num_beams=2, length_penalty=float("nan")), "length_penalty"),
])
@pytest.mark.parametrize("family", FAMILIES)
def test_bad_beam_settings_raise_usage_error(kwargs, message, family):
  model = make_model(family, 0)
  with pytest.raises(UsageError, match=message):
    sample_lib.generate(model, [[1, 2]], max_new_tokens=3, **kwargs)


@pytest.mark.parametrize("overrides, line", [
    (["--config.sample.num_beams=0"], "error: sample.num_beams=0: expected an integer >= 1"),
    (["--config.sample.num_beams=2", "--config.sample.num_samples=3"],
     "error: sample.num_samples=3: expected <= sample.num_beams=2"),
])
def test_bad_beam_config_is_one_error_line(overrides, line, tmp_path, capfd):
  from tests.conftest import run_main
  code = run_main("--config=experiments/base.py", f"--workdir={tmp_path}/run", *overrides)
  err = capfd.readouterr().err.strip().splitlines()
  assert code != 0 and err[-1].startswith(line)
  assert not any("Traceback" in x for x in err)
