"""Scanned layers (issue 17): the stacked model equals the looped reference (logits, gradients,
dropout, every remat policy, KV-cache generation), checkpoints restore across the two layouts,
and the new config fields are validated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import checkpoint as ckpt_lib
from lm import layers, train, validate
from lm import sample as sample_lib
from lm.config import model_config
from lm.errors import UsageError
from lm.model import Transformer
from tests.conftest import tiny_config

VOCAB = 37
FIELDS = dict(vocab_size=VOCAB, max_seq_len=24, num_layers=3, num_heads=4, d_model=32, d_ff=48,
              attention_impl="xla")


def pair(**overrides):
  """(looped, scanned) models holding the same random parameters (the scanned ones are the
  looped ones stacked); N(0, 0.3) weights so that every layer changes the logits."""
  looped = Transformer(model_config(**{**FIELDS, **overrides, "scan_layers": False}),
                       nnx.Rngs(0))
  rng = np.random.default_rng(0)
  pure = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.asarray(rng.normal(path[-1].key == "scale", 0.3, x.shape), jnp.float32),
      nnx.to_pure_dict(nnx.state(looped)))
  _with(looped, pure)
  scanned = Transformer(model_config(**{**FIELDS, **overrides, "scan_layers": True}),
                        nnx.Rngs(1))
  _with(scanned, layers.stack_layers(pure))
  return looped, scanned


def _with(model, pure):
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  return state


TOKENS = np.random.default_rng(1).integers(0, VOCAB, (2, 20)).astype(np.int32)


def close(got, want):
  """Gradient trees equal up to float32 rounding, measured against the largest gradient
  entry (rounding after a few layers of another summation order is ~1e-7 of it, a real
  difference O(1); some gradients, such as the key bias's, are zero up to rounding)."""
  scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(want))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale),
               got, want)


def loss_and_grads(model, dropout_key=None):
  def loss(model):
    rngs = None if dropout_key is None else nnx.Rngs(dropout=dropout_key)
    logits = model(jnp.asarray(TOKENS[:, :-1]), rngs=rngs)
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, jnp.asarray(TOKENS[:, 1:, None]), -1).mean(), logits
  (value, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
  return value, logits, nnx.to_pure_dict(grads)


@pytest.mark.parametrize("overrides,remat", [
    ({}, "none"),
    ({}, "full"),
    ({}, "auto"),
    (dict(use_bias=True, mlp="gelu", positions="learned", tie_embeddings=False), "dots_saveable"),
    (dict(num_kv_heads=2, norm="post", norm_type="rmsnorm"), "dots_with_no_batch_dims_saveable"),
])
def test_scanned_layers_equal_the_loop(overrides, remat):
  """Logits and every gradient of the scanned model equal the looped reference's (the same
  parameters, restacked), for each remat policy. Checked to fail: a scan that runs the layers
  in reverse (lax.scan reverse=True) differs in the logits by O(1)."""
  looped, scanned = pair(**overrides)
  scanned = Transformer(model_config(**{**FIELDS, **overrides, "remat": remat}), nnx.Rngs(1))
  _with(scanned, layers.stack_layers(nnx.to_pure_dict(nnx.state(looped))))
  loss_l, logits_l, grads_l = loss_and_grads(looped)
  loss_s, logits_s, grads_s = loss_and_grads(scanned)
  assert float(jnp.abs(logits_l).max()) > 1.0  # far from uniform: a wrong layer would show
  np.testing.assert_allclose(logits_s, logits_l, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(loss_s, loss_l, rtol=1e-6)
  close(grads_s, layers.stack_layers(grads_l))


def test_dropout_draws_the_same_masks_in_both_layouts():
  """Layer i's dropout stream is fold_in(key, i) in both layouts: the same loss with dropout
  on (and another one than without dropout)."""
  looped, scanned = pair(dropout=0.3)
  key = jax.random.key(3)
  loss_l, _, grads_l = loss_and_grads(looped, key)
  loss_s, _, grads_s = loss_and_grads(scanned, key)
  assert abs(float(loss_l) - float(loss_and_grads(looped)[0])) > 1e-3
  np.testing.assert_allclose(loss_s, loss_l, rtol=1e-6)
  close(grads_s, layers.stack_layers(grads_l))


def test_generation_with_the_kv_cache_equals_the_looped_model():
  """Greedy KV-cache generation of the stacked model gives the looped model's tokens, and its
  cached logits are the full forward pass's."""
  looped, scanned = pair()
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
  kw = dict(max_new_tokens=10, temperature=0.0)
  out_l = sample_lib.generate(looped, prompts, **kw)
  out_s = sample_lib.generate(scanned, prompts, **kw)
  for a, b in zip(out_l, out_s):
    np.testing.assert_array_equal(a[0], b[0])
  cache = scanned.init_cache(2, 20)
  tokens = jnp.asarray(TOKENS[:, :20])
  logits, _ = scanned.decode(tokens, cache, 0, positions=jnp.broadcast_to(jnp.arange(20), (2, 20)),
                             segment_ids=jnp.ones((2, 20), jnp.int32))
  np.testing.assert_allclose(logits, scanned(tokens), rtol=1e-5, atol=1e-5)


def test_stack_and_unstack_are_inverse_on_a_train_state():
  """Every "blocks" of a pure-dict train state (parameters and both Adam moments) is stacked
  and comes back; layout_of tells them apart."""
  run = train.make_run(tiny_config(**{"model.scan_layers": False}), 11)
  pure = jax.tree.map(np.asarray, nnx.to_pure_dict(train.init_state(run, 0)))
  stacked = layers.stack_layers(pure, np.stack)
  assert layers.layout_of(pure) == "per_layer" and layers.layout_of(stacked) == "stacked"
  # params, mu and nu: 2 layers of 11 arrays each (2 norms of 2, wq, wk, wv, wo, w_in,
  # w_gate, w_out) become 11 stacked arrays each
  assert len(jax.tree.leaves(pure)) - len(jax.tree.leaves(stacked)) == 3 * 11
  back = layers.unstack_layers(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(pure)
  jax.tree.map(np.testing.assert_array_equal, back, pure)


@pytest.mark.parametrize("saved_scan,restored_scan", [(False, True), (True, False)])
def test_checkpoints_restore_into_the_other_layout(tmp_path, saved_scan, restored_scan):
  """A train state saved with per-layer parameters (every checkpoint from before issue 17)
  restores into stacked ones, and the other way round: the same numbers, the target's
  shardings. Checked to fail without the fallback layout in Checkpointer.restore (one
  "cannot be read" line)."""
  src_run = train.make_run(tiny_config(**{"model.scan_layers": saved_scan}), 11)
  state = train.init_state(src_run, 0)
  with ckpt_lib.Checkpointer(str(tmp_path)) as ck:
    ck.save(3, state, {"config": {"model": {}}, "step": 3})
  dst_run = train.make_run(tiny_config(**{"model.scan_layers": restored_scan}), 11)
  with ckpt_lib.Checkpointer(str(tmp_path)) as ck:
    restored = ck.restore(dst_run.abstract_state(), 3)
  want = nnx.to_pure_dict(state)
  want = layers.stack_layers(want) if restored_scan else layers.unstack_layers(want)
  got = nnx.to_pure_dict(restored)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               got, want)
  for (_, v), (_, s) in zip(nnx.to_flat_state(restored), nnx.to_flat_state(dst_run.shardings)):
    assert v.get_value().sharding.is_equivalent_to(s.get_value(), v.get_value().ndim)


@pytest.mark.parametrize("field,value,message", [
    ("model.remat", "dots", "model.remat='dots': expected one of auto, none, full, dots_saveable"),
    ("model.scan_layers", 1, "model.scan_layers=1: expected true or false"),
])
def test_bad_scan_and_remat_settings_are_one_clear_error(field, value, message):
  import ml_collections
  config = tiny_config().to_dict()  # a plain dict takes a value of another type
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(UsageError, match=message):
    validate.check_config(ml_collections.ConfigDict(config), "train")


def test_remat_names_are_the_layers_names():
  assert validate.REMAT_POLICIES == layers.REMAT_POLICIES
  assert all(layers.remat_policy(n) is not None for n in layers.REMAT_POLICIES if n != "none")
  assert layers.remat_name("auto") == "dots_with_no_batch_dims_saveable"
  assert layers.remat_policy("full") is jax.checkpoint_policies.nothing_saveable
