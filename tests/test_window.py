"""Sliding-window attention (model.attention_window) from the forward pass to the rolling KV
cache and the runs that default to their trained window (issue 18)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import runtime
from lm import sample as sample_lib
from lm import validate
from lm.errors import UsageError
from tests.test_generate import VOCAB, cached_logits, random_model


@jax.jit
def _forward(model, tokens, positions, segment_ids):
  return model(tokens, positions=positions, segment_ids=segment_ids)


def windowed_reference(model, prompts, continuations):
  """Per row, logits of one full forward pass (no cache) of the left-padded prompt +
  continuation: the model's own window mask over the whole sequence."""
  tokens, valid = sample_lib.left_pad([np.concatenate([p, c]) for p, c in
                                       zip(prompts, continuations)])
  logits = np.asarray(_forward(model, jnp.asarray(tokens), sample_lib.positions_of(valid),
                               jnp.asarray(valid)))
  return [logits[r, tokens.shape[1] - len(p) - len(c):] for r, (p, c) in
          enumerate(zip(prompts, continuations))]


@pytest.mark.parametrize("overrides, n_new", [
    (dict(num_kv_heads=0, max_seq_len=16), 16),  # rotary: past 2W and past max_seq_len
    (dict(num_kv_heads=2, max_seq_len=16), 16),  # GQA
    (dict(num_kv_heads=1, positions="learned", use_bias=True, max_seq_len=32), 12),  # GPT-2-like
])
def test_rolling_cache_decoding_matches_windowed_forward(overrides, n_new):
  """Prefill (prompts shorter and longer than W, left-padded) then one token per step
  through a cache of W slots: every position's logits equal the full forward pass with the
  window mask. fp32 both ways, logits of std > 1: the paths differ only in summation order
  (a few ulps of the ~10-sized logits), so 1e-5 is tight yet safe. Fails on the code before
  the rolling cache (the cache there had no window: its attention saw every earlier key) and
  when the window test of cached_attention is removed."""
  w = 5
  model = random_model(31, attention_window=w, **overrides)
  rng = np.random.default_rng(31)
  prompts = [rng.integers(0, VOCAB, n) for n in (3, 9, 1)]  # 9 > W: the prefill rolls too
  continuations = rng.integers(0, VOCAB, (len(prompts), n_new))
  total = 9 + n_new
  assert total > 2 * w
  cache = model.init_cache(len(prompts), total)
  assert cache[0].k.shape[2] == w  # W slots, whatever the length
  got = cached_logits(model, prompts, continuations)
  want = windowed_reference(model, prompts, continuations)
  full = windowed_reference(random_model(31, **overrides), prompts, continuations)
  for r in range(len(prompts)):
    assert want[r].std() > 1.0
    np.testing.assert_allclose(got[r], want[r], rtol=1e-5, atol=1e-5)
    # The window changes the logits once a row is longer than W: the comparison can fail.
    assert np.abs(full[r][w + 1:] - want[r][w + 1:]).max() > 0.1


def greedy_by_forward(model, prompt, n):
  """Greedy continuation by repeated full forward passes over a fixed right-padded length
  (causal: the padding after a position never changes its logits)."""
  ids = list(prompt)
  length = len(prompt) + n
  for _ in range(n):
    tokens = np.zeros((1, length), np.int32)
    tokens[0, :len(ids)] = ids
    pos = jnp.arange(length)[None]
    logits = np.asarray(_forward(model, jnp.asarray(tokens), pos, jnp.ones((1, length), jnp.int32)))
    ids.append(int(np.argmax(logits[0, len(ids) - 1])))
  return np.asarray(ids[len(prompt):])


def test_generation_past_max_seq_len_with_rotary_window_is_greedy_by_forward():
  """generate() with the rolling cache (its prompt-only padding mask and positions) runs
  3 x max_seq_len tokens and equals greedy decoding by full windowed forward passes, for each
  of num_return_sequences=2 copies; a stop token still cuts. Failed before: 'exceeds the model's context' for any such length."""
  model = random_model(32, attention_window=4, max_seq_len=12)
  rng = np.random.default_rng(32)
  prompts = [rng.integers(0, VOCAB, n) for n in (2, 7)]
  gen = lambda **kw: sample_lib.generate(model, prompts, max_new_tokens=36, temperature=0.0,
                                         num_return_sequences=2, **kw)
  out = gen()
  for prompt, seqs in zip(prompts, out):
    want = greedy_by_forward(model, prompt, 36)
    for seq in seqs:
      np.testing.assert_array_equal(seq, want)
  stop = int(out[1][0][20])
  for g, c in zip(out, gen(stop_token=stop)):
    n = int(np.argmax(g[0] == stop)) if (g[0] == stop).any() else 36
    for seq in c:
      np.testing.assert_array_equal(seq, g[0][:n])


def test_learned_positions_and_full_attention_stop_at_max_seq_len():
  for overrides in (dict(positions="learned", attention_window=4), dict(attention_window=0)):
    model = random_model(0, max_seq_len=12, **overrides)
    with pytest.raises(UsageError, match="exceeds the model's context of 12"):
      sample_lib.generate(model, [[1, 2, 3]], max_new_tokens=10)


def test_cache_size_does_not_grow_with_generated_length():
  model = random_model(0, attention_window=64, max_seq_len=64)
  for n in (100, 2000):
    shapes = jax.eval_shape(lambda: model.init_cache(1, n))
    assert [c.k.shape for c in shapes] == [(1, 4, 64, 8)] * 2


@pytest.mark.parametrize("meta, want", [
    ({"config": {"model": {"attention_window": -1}, "data": {"seq_len": 64}}}, 64),
    ({"config": {"model": {}, "data": {"seq_len": 64}}}, 64),  # before the field: auto
    ({"config": {"model": {"attention_window": 0}, "data": {"seq_len": 64}}}, 0),
    ({"config": {"model": {"attention_window": 32}, "data": {"seq_len": 64}}}, 32),
    ({"config": {"model": {}, "data": {"seq_len": 64}}, "converted_from": "/hf"}, 0),
    # An encoder is never windowed (merging issues 14 and 18 gave its eval a window of 32).
    ({"config": {"model": {"arch": "encoder", "attention_window": -1},
                 "data": {"seq_len": 32}}}, 0),
])
def test_trained_window(meta, want):
  assert runtime.trained_window(meta) == want


def test_eval_defaults_to_the_trained_window(tmp_path, make_config):
  """A run trained on 32-token windows, evaluated on 64: auto (-1) is the trained window 32,
  an explicit 0 is full attention, with another loss. Failed before: no field, and full
  attention at 64."""
  from lm.tasks import lm as lm_task
  config = make_config(**{"train.num_steps": 10, "train.eval_every": 10,
                          "train.checkpoint_every": 10})
  runtime.train(config, str(tmp_path), lm_task.TASK)
  losses = {}
  for window in (-1, 0):
    cfg = make_config(**{"data.seq_len": 64, "model.attention_window": window})
    run, state, _, _ = runtime.load(cfg, str(tmp_path))
    assert run.model_cfg.attention_window == (32 if window == -1 else window)
    corpus = lm_task.TASK.eval_data(run.config, None, None)
    with jax.set_mesh(run.mesh):
      losses[window] = lm_task.TASK.evaluate(run, state, corpus, 1)["val_loss"]
  assert losses[-1] != losses[0]  # a different mask (10 steps: attention still near uniform)


def test_bad_window_is_one_error_line(tmp_path, capfd):
  from tests.conftest import run_main
  code = run_main("--config=experiments/base.py", f"--workdir={tmp_path}/run",
                  "--config.model.attention_window=-2")
  err = capfd.readouterr().err.strip().splitlines()
  assert code != 0 and err[-1] == ("error: model.attention_window=-2: expected an integer >= -1 "
                                   "(-1: the trained window, 0: full)")
  assert not any("Traceback" in line for line in err)


def test_window_longer_than_max_seq_len_with_rotary_trains_any_length(make_config):
  """An explicit window frees rotary models from max_seq_len (learned positions stay bound)."""
  config = make_config(**{"data.seq_len": 128, "model.attention_window": 16})
  assert validate.model_config(config, 10).attention_window == 16
  with pytest.raises(UsageError, match="exceeds model.max_seq_len"):
    validate.model_config(make_config(**{"data.seq_len": 128}), 10)
  with pytest.raises(UsageError, match="exceeds model.max_seq_len"):
    validate.model_config(make_config(**{"data.seq_len": 128, "model.attention_window": 16,
                                         "model.positions": "learned"}), 10)
