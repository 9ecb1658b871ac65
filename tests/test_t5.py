"""The encoder-decoder (T5, lm/model.py EncoderDecoder): masks, caches, layouts, generation.

Its numerics against an independent numpy T5 are in tests/test_convert_t5.py (from Hugging Face
key names); here: what the model must do whatever its weights.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import sample
from lm.config import base_config, t5_model
from lm.model import ModelConfig, build

VOCAB = 40


def make(version="1.1", seed=0, vocab_size=VOCAB, **fields):
  model = t5_model(base_config().model, num_layers=2, num_heads=4, d_model=32, d_ff=48,
                   version=version)
  model.num_decoder_layers = 3  # not num_layers: the two stacks are sized apart
  model.attention_impl = "xla"
  model.update(fields)
  return build(ModelConfig.from_config(model, vocab_size), nnx.Rngs(seed))


def batch(seed=0, s=9, t=6):
  rng = np.random.RandomState(seed)
  ids = jnp.asarray(rng.randint(1, VOCAB, (2, s)), jnp.int32)
  mask = jnp.asarray([[1] * s, [1] * (s - 3) + [0] * 3], jnp.int32)
  dec = jnp.asarray(rng.randint(1, VOCAB, (2, t)), jnp.int32)
  return ids, mask, dec


# Jitted: eager dispatch of every op of a two-stack model takes a minute on a busy CPU.
forward = nnx.jit(lambda model, ids, dec, mask: model(ids, dec, mask))
encode = nnx.jit(lambda model, ids, mask: model.encode(ids, mask))


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_masks_causality_and_bidirectionality(version):
  model = make(version)
  ids, mask, dec = batch()
  logits = forward(model, ids, dec, mask)
  assert logits.shape == (2, 6, VOCAB) and logits.dtype == jnp.float32
  # Encoder padding is invisible: other pad tokens change no logit of that row...
  padded = ids.at[1, -3:].set(7)
  np.testing.assert_array_equal(forward(model, padded, dec, mask)[1], logits[1])
  # ... and unmasked they would (the test can fail).
  assert not np.allclose(forward(model, padded, dec, None)[1], forward(model, ids, dec, None)[1])
  # The decoder is causal: a later target token changes no earlier logit.
  later = forward(model, ids, dec.at[:, 4].set(3), mask)
  np.testing.assert_array_equal(later[:, :4], logits[:, :4])
  assert not np.allclose(later[:, 4:], logits[:, 4:])
  # The encoder is bidirectional: its last real token changes the first position's state.
  ctx, ctx2 = encode(model, ids, mask), encode(model, ids.at[0, 8].set(5), mask)
  assert not np.allclose(ctx[0, 0], ctx2[0, 0])


def test_scanned_equals_looped():
  """Stacked (lax.scan) and per-layer parameters holding the same values give the same
  logits and gradients (both stacks; the relative bias and cross-attention inside)."""
  from lm.layers import stack_layers
  looped, scanned = make(scan_layers=False), make(scan_layers=True, seed=1)
  state = nnx.state(scanned)
  nnx.replace_by_pure_dict(state, stack_layers(nnx.to_pure_dict(nnx.state(looped))))
  nnx.update(scanned, state)
  ids, mask, dec = batch()

  @nnx.jit
  def loss_and_grads(model):
    return nnx.value_and_grad(lambda m: m(ids, dec, mask).std())(model)
  la, ga = loss_and_grads(looped)
  lb, gb = loss_and_grads(scanned)
  np.testing.assert_allclose(lb, la, rtol=1e-5)
  ga = stack_layers(nnx.to_pure_dict(ga))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6), ga,
               nnx.to_pure_dict(gb))


@pytest.mark.parametrize("scan", [True, False])
def test_cached_decoding_equals_full_forward(scan):
  """Decoding one token at a time with the self-attention KV cache and cached cross-attention
  keys/values gives the logits of the teacher-forced forward pass, position by position."""
  model = make(scan_layers=scan)
  ids, mask, dec = batch(1)
  full = forward(model, ids, dec, mask)
  context = encode(model, ids, mask)
  cache = model.init_cache(context, dec.shape[1] + 2)
  step = nnx.jit(lambda m, tok, cache, t: m.decode(tok, None, mask, cache=cache, cache_index=t))
  steps = []
  for t in range(dec.shape[1]):
    logits, cache = step(model, dec[:, t:t + 1], cache, t)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-5)


def greedy_by_full_forward(model, prompt, n):
  """Greedy decoding by re-running the whole model on the growing target (no cache)."""
  ids = jnp.asarray([prompt], jnp.int32)
  dec = np.zeros((1, n + 1), np.int32)  # fixed shape, one compile: the decoder is causal,
  dec[0, 0] = model.cfg.decoder_start_id  # so the zeros after position j never reach it
  for j in range(n):
    dec[0, j + 1] = int(forward(model, ids, jnp.asarray(dec), None)[0, j].argmax())
  return list(dec[0, 1:])


def test_generate_greedy_equals_repeated_forward_and_batches():
  """lm.sample.generate on an encoder-decoder: greedy output equals greedy by full forward
  passes, for prompts of different lengths batched together (left padding masked), and beam
  search with one beam is greedy."""
  model = make("1.0", seed=3)
  prompts = [[5, 9, 2, 17, 30, 11, 4], [8, 3], [21, 22, 23, 24]]
  out = sample.generate(model, prompts, max_new_tokens=7, temperature=0.0)
  for prompt, seqs in zip(prompts, out):
    assert list(seqs[0]) == greedy_by_full_forward(model, prompt, 7)
  beam1 = sample.generate(model, prompts, max_new_tokens=7, num_beams=2, length_penalty=0.0,
                          num_return_sequences=1)
  assert len(beam1) == 3 and all(len(b[0]) == 7 for b in beam1)


def test_config_errors():
  base = t5_model(base_config().model)
  with pytest.raises(ValueError, match="relative positions"):
    ModelConfig.from_config({**base, "positions": "rope"}, VOCAB)
  with pytest.raises(ValueError, match="relative_buckets"):
    ModelConfig.from_config({**base, "relative_buckets": 0}, VOCAB)
  with pytest.raises(ValueError, match="encoder_decoder"):
    ModelConfig.from_config({**base_config().model, "num_decoder_layers": 2}, VOCAB)
  cfg = ModelConfig.from_config({**base, "d_kv": 16, "num_heads": 6}, VOCAB)
  assert cfg.head_dim == 16 and dataclasses.replace(cfg).decoder_layers == cfg.num_layers


def test_relative_bias_init_and_learning_rate():
  """model.relative_bias_init sets the std of both bias tables (0: T5's d_model^-0.5), and
  train.relative_bias_lr multiplies their first AdamW update and no other parameter's
  (float64 oracle: the first update is lr_0 * g / (|g| + eps)). Without the multiplier (old
  code) the tables moved by lr_0 like every other parameter (checked)."""
  from lm import train
  tables = lambda m: np.concatenate([np.ravel(m.encoder.rel_bias.embedding[...]),
                                     np.ravel(m.decoder.rel_bias.embedding[...])])
  assert 0.12 < np.std(tables(make())) < 0.24  # 32 ** -0.5 = 0.177, 256 draws
  assert 2.1 < np.std(tables(make(relative_bias_init=2.5))) < 2.9
  params = nnx.to_pure_dict(nnx.state(make(), nnx.Param))
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
  tcfg = base_config().train
  tcfg.update(dict(relative_bias_lr=30.0, weight_decay=0.0, grad_clip=1e9, warmup_steps=4))
  tx, _ = train.make_optimizer(tcfg)
  updates, _ = tx.update(grads, tx.init(params), params)
  lr0 = tcfg.learning_rate / 5
  scaled = 0
  for (path, g), u in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(updates)):
    factor = 30.0 if "rel_bias" in jax.tree_util.keystr(path) else 1.0
    scaled += factor != 1.0
    g = np.float64(g)
    np.testing.assert_allclose(u, -lr0 * factor * g / (np.abs(g) + 1e-8), rtol=1e-5, atol=1e-9,
                               err_msg=jax.tree_util.keystr(path))
  assert scaled == 2  # the encoder's table and the decoder's


def test_constrained_restoration_is_greedy_among_the_spelling_tokens():
  """seq2seq.restore_texts (the restoration task's decoding): each token is the model's argmax
  among the tokens that keep the output spelling the input: punctuation while the
  max_new_tokens budget can still spell the rest, the next input character in either case,
  any whitespace for an input space, EOS once all is spelled. Oracle: those
  rules on decoded strings, by repeated full forward passes. Checked to fail when the pointer
  is not advanced past a space (the oracle then allows other letters), and with punctuation
  allowed beyond the budget."""
  import unicodedata
  from lm.tasks import seq2seq as s2s
  from lm.tokenizers import CharTokenizer
  tok = CharTokenizer("abc ,.!\nABC", specials=s2s.char_specials())
  sp = s2s.specials_of(tok)
  texts = ["ab c", "cab ba c", "a"]
  ex = s2s.encode_pairs(tok, sp, s2s.Pairs(texts, texts), 10, 10)
  n, spelled = 12, 0
  for seed in range(3):
    model = make(vocab_size=tok.vocab_size, seed=seed, decoder_start_id=sp.pad)  # as the task
    # Punctuation logits 0: a random model then spells (a letter of logit > 0) about half the
    # time, instead of mostly choosing among a dozen punctuation tokens.
    punct = [v for v in range(256) if unicodedata.category(chr(v)).startswith("P")]
    punct += [tok.index[c] for c in ",.!"]
    model.head[...] = model.head[...].at[:, np.array(punct)].set(0.0)
    got = s2s.restore_texts(model, tok, sp, ex, batch_size=2, max_new_tokens=n)
    for text, row, out in zip(texts, ex.inputs, got):
      dec, pos, want = [sp.pad], 0, []
      while len(want) < n:
        padded = jnp.asarray([dec + [sp.pad] * (n + 1 - len(dec))])
        logits = np.asarray(forward(model, jnp.asarray(row[None]), padded,
                                    jnp.asarray((row != sp.pad)[None], jnp.int32)))
        logits = logits[0, len(dec) - 1]

        def allowed(v):
          if v == sp.eos:
            return pos == len(text)
          s = tok.decode([v]) if v != sp.pad else ""
          if len(s) != 1:
            return False
          if unicodedata.category(s).startswith("P"):  # while the rest still fits
            return n - len(want) - 1 >= len(text) - pos
          return pos < len(text) and (s.isspace() if text[pos] == " " else s.lower() == text[pos])
        v = max((v for v in range(tok.vocab_size) if allowed(v)), key=lambda v: logits[v])
        if v == sp.eos:
          break
        pos += not unicodedata.category(tok.decode([v])).startswith("P")
        want.append(v)
        dec.append(v)
      assert out == tok.decode(want), (seed, text)
      stripped = s2s.strip_for_restoration(out)
      assert text.replace(" ", "").startswith(stripped.replace(" ", ""))
      spelled += stripped == text
    # A budget of exactly the inputs' length leaves no room for punctuation: each input is
    # spelled to its end (the model alone puts punctuation about every other step).
    same = ["ab c", "ca b", "bbca"]
    got = s2s.restore_texts(model, tok, sp, s2s.encode_pairs(tok, sp, s2s.Pairs(same, same),
                                                             10, 10), batch_size=2,
                            max_new_tokens=4)
    assert [s2s.strip_for_restoration(out) for out in got] == same, got
  assert spelled >= 3  # inputs spelled to the end (EOS), spaces included


def test_constrained_beams_equal_exhaustive_search_among_spellings():
  """seq2seq._restore with beams enough to keep every prefix (3^4 = 81; three tokens allowed a
  step) returns exhaustive search's best output among those that spell the input, each step's
  log-probabilities renormalised over the allowed tokens (float64 oracle over every prefix's
  teacher-forced logits), for four length penalties. Checked to fail when a beam's allowed
  tokens come from its pointer before the token it was extended by."""
  from lm.tasks import seq2seq as s2s
  from lm.tokenizers import CharTokenizer
  tok = CharTokenizer("ab ,\nAB", specials=s2s.char_specials())
  sp = s2s.specials_of(tok)
  ex = s2s.encode_pairs(tok, sp, s2s.Pairs(["a b"], ["a b"]), 6, 6)
  ids = tok.index
  # Hand-made tables (restore_texts builds them from the tokenizer, whose 256 byte tokens
  # would make exhaustive search too large): ',' punctuation, a/A b/B letters, ' ' '\n' spaces.
  kind, key = np.zeros(tok.vocab_size, np.int32), np.full(tok.vocab_size, -1, np.int32)
  kind[ids[","]] = s2s.PUNCT
  for c, k, spell in (("a", s2s.CHAR, "a"), ("A", s2s.CHAR, "a"), ("b", s2s.CHAR, "b"),
                      ("B", s2s.CHAR, "b"), (" ", s2s.SPACE, " "), ("\n", s2s.SPACE, " ")):
    kind[ids[c]], key[ids[c]] = k, ids[spell]
  row, n, beams = ex.inputs[0], 5, 81

  def allowed(ptr, j):  # output token j: punctuation only while the rest can still be spelled
    nxt = row[ptr]
    return [v for v in range(tok.vocab_size)
            if (kind[v] == s2s.PUNCT and n - j - 1 >= len("a b") - ptr)
            or (kind[v] > s2s.PUNCT and key[v] == nxt) or (v == sp.eos and nxt == sp.eos)]

  model = make(vocab_size=tok.vocab_size, seed=6, decoder_start_id=sp.pad)
  graphdef, state = nnx.split(model)
  valid = jnp.asarray((row != sp.pad)[None], jnp.int32)
  # Every prefix of allowed tokens, no EOS inside: its next-token log-probabilities.
  prefixes, frontier = [((), 0)], [((), 0)]
  for _ in range(n - 1):
    frontier = [(p + (v,), ptr + (kind[v] > s2s.PUNCT)) for p, ptr in frontier
                for v in allowed(ptr, len(p)) if v != sp.eos]
    prefixes += frontier
  dec = np.full((len(prefixes), n + 1), sp.pad, np.int32)
  for r, (p, _) in enumerate(prefixes):
    dec[r, 1:1 + len(p)] = p
  logits = np.asarray(forward(model, jnp.asarray(np.repeat(row[None], len(prefixes), 0)),
                              jnp.asarray(dec), jnp.repeat(valid, len(prefixes), 0)), np.float64)
  # Each prefix's renormalised next-token log-probabilities and its own running sum.
  logp, total = {}, {(): 0.0}
  for r, (p, ptr) in enumerate(prefixes):
    z, ok = logits[r, len(p)], allowed(ptr, len(p))
    logp[p] = dict(zip(ok, z[ok] - z[ok].max() - np.log(np.exp(z[ok] - z[ok].max()).sum())))
    for v in ok:
      if v != sp.eos and len(p) + 1 < n:
        total[p + (v,)] = total[p] + logp[p][v]
  winners = set()
  for length_penalty in (-2.0, 0.0, 1.0, 3.0):
    # Finished: ends in EOS, or n tokens without one.
    scores = [((total[p] + lp) / (len(p) + 1) ** length_penalty, p + (v,))
              for p, _ in prefixes for v, lp in logp[p].items() if v == sp.eos or len(p) + 1 == n]
    best = max(scores)[1]
    got = s2s._restore(graphdef, state, jnp.asarray(row[None]), n, beams,
                       jnp.float32(length_penalty), valid, jnp.asarray(kind), jnp.asarray(key),
                       jnp.int32(sp.eos))
    want = [v for v in best if v != sp.eos]
    np.testing.assert_array_equal(np.asarray(got[0])[:len(want)], want)
    assert len(want) == n or int(got[0, len(want)]) == sp.eos
    winners.add(best)
  assert len(winners) > 1  # the length penalty changes the winner: it is applied as specified
