"""KV-cache generation: cached logits equal a full forward pass, greedy with and without the
cache agree, sampling settings behave and are validated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import sample as sample_lib
from lm.errors import UsageError
from lm.config import model_config
from lm.model import Transformer

VOCAB = 61


def random_model(seed, **overrides):
  """A tiny model with large random weights, so attention and logits are far from uniform.

  Weights are drawn with numpy straight into the model's abstract state: no per-parameter
  compilation."""
  fields = dict(vocab_size=VOCAB, max_seq_len=48, num_layers=2, num_heads=4, d_model=32,
                attention_impl="xla")
  cfg = model_config(**{**fields, **overrides})
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  pure = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.asarray(rng.normal(path[-1].key == "scale", 0.3, x.shape), jnp.float32),
      nnx.to_pure_dict(state))  # LayerNorm scales near 1, everything else N(0, 0.3)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


@jax.jit
def _forward(model, tokens):
  return model(tokens)


def full_logits(model, ids):
  """Logits of a plain forward pass over `ids` (right-padded to the context: causal attention
  makes the padding invisible to earlier positions, and one shape compiles once)."""
  padded = np.zeros((1, model.cfg.max_seq_len), np.int32)
  padded[0, :len(ids)] = ids
  return np.asarray(_forward(model, jnp.asarray(padded)))[0, :len(ids)]


def cached_logits(model, prompts, continuations):
  """Prefill left-padded prompts, then feed the continuations one token per decode call.

  Returns, per row, the logits at each of its real positions: [len(prompt) + len(cont), V].
  """
  tokens, valid = sample_lib.left_pad(prompts)
  b, p = tokens.shape
  n = len(continuations[0])
  total = p + n
  valid = jnp.concatenate([jnp.asarray(valid), jnp.ones((b, n), jnp.int32)], 1)
  positions = sample_lib.positions_of(valid)
  cache = model.init_cache(b, total)
  step = jax.jit(lambda m, t, c, i, pos: m.decode(t, c, i, positions=pos, segment_ids=valid))
  logits, cache = step(model, jnp.asarray(tokens), cache, 0, positions[:, :p])
  chunks = [np.asarray(logits)]
  cont = np.asarray(continuations, np.int32)
  for i in range(n):
    logits, cache = step(model, jnp.asarray(cont[:, i:i + 1]), cache, p + i,
                         positions[:, p + i:p + i + 1])
    chunks.append(np.asarray(logits))
  all_logits = np.concatenate(chunks, 1)
  return [all_logits[r, p - len(prompts[r]):] for r in range(b)]


@pytest.mark.parametrize("overrides", [
    dict(num_kv_heads=0),  # MHA, rotary positions
    dict(num_kv_heads=2),  # GQA
    dict(num_kv_heads=1, positions="learned", use_bias=True),  # MQA, GPT-2-style positions
])
def test_cached_decoding_matches_full_forward(overrides):
  seed = 21  # fixed: a failure must reproduce
  model = random_model(seed, **overrides)
  rng = np.random.default_rng(seed)
  lengths = [3, 11, 7, 1]
  prompts = [rng.integers(0, VOCAB, n) for n in lengths]
  continuations = rng.integers(0, VOCAB, (len(prompts), 6))
  cache = model.init_cache(len(prompts), 17)
  kv = model.cfg.num_kv_heads or model.cfg.num_heads
  assert cache[0].k.shape == (len(prompts), kv, 17, model.cfg.head_dim)
  got = cached_logits(model, prompts, continuations)
  for r, (prompt, cont) in enumerate(zip(prompts, continuations)):
    want = full_logits(model, np.concatenate([prompt, cont]))
    assert want.std() > 1.0  # logits far from uniform: the comparison means something
    np.testing.assert_allclose(got[r], want, rtol=1e-5, atol=1e-5)


def greedy_without_cache(model, prompt, n):
  ids = list(prompt)
  for _ in range(n):
    ids.append(int(np.argmax(full_logits(model, ids)[-1])))
  return np.asarray(ids[len(prompt):])


@pytest.mark.parametrize("num_kv_heads", [2])  # MHA: in test_sampling_settings
def test_greedy_with_and_without_cache_identical(num_kv_heads):
  seed = 22  # fixed: a failure must reproduce
  model = random_model(seed, num_kv_heads=num_kv_heads)
  rng = np.random.default_rng(seed)
  prompts = [rng.integers(0, VOCAB, n) for n in (5, 2, 9)]
  out = sample_lib.generate(model, prompts, max_new_tokens=12, temperature=0.0)
  for prompt, seqs in zip(prompts, out):
    assert len(seqs) == 1 and len(seqs[0]) == 12
    np.testing.assert_array_equal(seqs[0], greedy_without_cache(model, prompt, 12))


def nucleus(logits, temperature, top_k, top_p):
  """The set of tokens sampling may pick (numpy, from the definitions)."""
  z = logits / temperature
  order = np.argsort(-z, kind="stable")
  if top_k:
    order = order[:top_k]
  p = np.exp(z[order] - z[order].max())
  p /= p.sum()
  before = np.cumsum(p) - p
  return set(order[before < top_p].tolist())


def test_sampling_settings():
  seed = 23  # fixed: a failure must reproduce
  model = random_model(seed)
  rng = np.random.default_rng(seed)
  prompts = [rng.integers(0, VOCAB, n) for n in (4, 8)]
  # All calls share one shape (2 prompts x 2 sequences, 10 tokens): one compile per filter.
  gen = lambda **kw: sample_lib.generate(model, prompts, max_new_tokens=10,
                                         num_return_sequences=2, **kw)
  greedy = gen(temperature=0.0)
  for g, prompt in zip(greedy, prompts):
    assert np.array_equal(g[0], g[1])  # greedy copies agree
    np.testing.assert_array_equal(g[0], greedy_without_cache(model, prompt, 10))
  # top_k=1 and a tiny nucleus both reduce sampling to greedy.
  for kw in (dict(top_k=1), dict(top_p=1e-6)):
    for g, o in zip(greedy, gen(temperature=1.0, seed=3, **kw)):
      np.testing.assert_array_equal(o[0], g[0])
      np.testing.assert_array_equal(o[1], g[0])
  # Several sequences per prompt differ; the same seed repeats, another seed does not.
  a, b, c = gen(temperature=1.0, seed=7), gen(temperature=1.0, seed=7), gen(temperature=1.0, seed=8)
  same = lambda x, y: all(np.array_equal(u, v) for us, vs in zip(x, y) for u, v in zip(us, vs))
  assert same(a, b) and not same(a, c)
  assert not np.array_equal(a[0][0], a[0][1])
  # Every sampled token lies in the top-k / nucleus set of the logits before it, and the
  # filters still leave room for choice (not all greedy).
  for kw in (dict(temperature=2.0, top_k=3), dict(temperature=1.5, top_p=0.6),
             dict(temperature=3.0, top_k=5, top_p=0.8)):
    out = gen(seed=11, **kw)
    off_greedy = 0
    for prompt, seqs in zip(prompts, out):
      for seq in seqs:
        logits = full_logits(model, np.concatenate([prompt, seq]))
        for i, tok in enumerate(seq):
          row = logits[len(prompt) - 1 + i]
          allowed = nucleus(row, kw["temperature"], kw.get("top_k", 0), kw.get("top_p", 1.0))
          assert int(tok) in allowed, (kw, i)
          off_greedy += int(tok) != int(np.argmax(row))
    assert off_greedy > 0, kw
  # A stop token ends each sequence before it.
  stop = int(greedy[1][0][4])
  for g, o in zip(greedy, gen(temperature=0.0, stop_token=stop)):
    cut = int(np.argmax(g[0] == stop)) if (g[0] == stop).any() else len(g[0])
    np.testing.assert_array_equal(o[0], g[0][:cut])
    assert len(o[1]) == cut


def test_top_k_compiles_per_power_of_two_width_and_keeps_exactly_k():
  Mode = sample_lib.Mode
  assert Mode.of(40, 1.0, 339) == Mode.of(64, 1.0, 339) == (64, False)
  assert Mode.of(65, 0.9, 339) == (128, True)
  assert Mode.of(1000, 1.0, 339).top_k == 339 and Mode.of(0, 1.0, 339).top_k == 0
  # Close logits: unfiltered, the 6th..10th tokens would be drawn hundreds of times.
  logits = jnp.asarray(np.random.default_rng(0).permutation(50)[None] * 0.1, jnp.float32)
  keys = jax.random.split(jax.random.key(1), 3000)
  draws = jax.vmap(lambda k: sample_lib.sample_logits(logits, k, 1.0, 5, 1.0))(keys)[:, 0]
  top5 = set(np.argsort(-np.asarray(logits[0]))[:5].tolist())
  assert set(np.asarray(draws).tolist()) == top5  # width 8 is compiled, 5 are kept


def test_sample_logits_top_p_keeps_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 2000)
  draws = jax.vmap(lambda k: sample_lib.sample_logits(logits, k, 1.0, 0, 0.75))(keys)[:, 0]
  counts = np.bincount(np.asarray(draws), minlength=4)
  assert counts[2] == counts[3] == 0  # 0.5 + 0.3 >= 0.75: only the first two stay
  assert abs(counts[0] / counts.sum() - 0.5 / 0.8) < 0.05


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(num_return_sequences=0), "num_return_sequences"),
    (dict(max_new_tokens=45), "context"),  # 4 + 45 > 48
    (dict(stop_token=VOCAB), "stop_token"),
])
def test_bad_settings_raise_usage_error(kwargs, message):
  model = random_model(0)  # nothing compiles: validation comes first
  with pytest.raises(UsageError, match=message):
    sample_lib.generate(model, [[1, 2, 3, 4]], **{"max_new_tokens": 5, **kwargs})


def test_prompt_longer_than_context():
  model = random_model(0)
  with pytest.raises(UsageError, match="exceeds the model's context of 48"):
    sample_lib.generate(model, [list(range(49))], max_new_tokens=1)
  with pytest.raises(UsageError, match="at least one token"):
    sample_lib.generate(model, [[]], max_new_tokens=1)
