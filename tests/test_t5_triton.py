"""The encoder-decoder (T5) on our Triton kernels: attention_impl "triton" (flash) and
"triton_softmax" (fused softmax) give the logits, the gradients and the greedy generation of
"xla". On the CPU the kernels run in Triton's interpreter, so the model is the smallest that
exercises every case: one layer per stack, two heads of 8.

What the kernels must handle here: the relative position bias [1, H, Tq, Tk] with its gradient
(dBias: the bias table's gradient comes only through it), the encoder's non-causal
self-attention and the decoder's cross-attention with q_len != kv_len and the encoder padding
as (query, key) segment id pairs, the causal decoder self-attention, unscaled scores (scale 1).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import sample
from lm.config import base_config, t5_model
from lm.model import ModelConfig, build

VOCAB = 11


def make(impl):
  model = t5_model(base_config().model, num_layers=1, num_heads=2, d_model=16, d_ff=16)
  model.attention_impl = impl  # a runtime field: the same seed gives the same parameters
  return build(ModelConfig.from_config(model, VOCAB), nnx.Rngs(0))


IDS = jnp.asarray([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]], jnp.int32)
MASK = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], jnp.int32)  # row 1: two padding tokens
DEC = jnp.asarray([[0, 3, 4], [0, 9, 1]], jnp.int32)
WEIGHTS = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, VOCAB)), jnp.float32)


@nnx.jit
def logits_and_grads(model):
  """(logits, gradient of a random projection of them for every parameter)."""
  def loss(m):
    logits = m(IDS, DEC, MASK)
    return (logits * WEIGHTS).sum(), logits
  (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
  return logits, nnx.to_pure_dict(grads)


@pytest.fixture(scope="module")
def xla():
  return logits_and_grads(make("xla"))


@pytest.mark.parametrize("impl", ["triton", "triton_softmax"])
def test_logits_and_gradients_equal_xla(impl, xla):
  """Verified to fail with the bias, or the segment ids, left out of the kernel calls
  (lm/attention.py)."""
  logits, grads = logits_and_grads(make(impl))
  np.testing.assert_allclose(logits, xla[0], rtol=1e-5, atol=1e-5)
  # Both stacks' bias tables get a gradient, through the kernels' dBias only.
  for stack in ("encoder", "decoder"):
    assert np.abs(grads[stack]["rel_bias"]["embedding"]).max() > 1e-3
  flat, want = jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(xla[1])
  for (path, got), ref in zip(flat, want):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


def test_greedy_generation_equals_xla():
  """Decoding runs the cross-attention (one query over the encoder's keys) through the
  kernel: the same tokens as xla's, for prompts of different lengths batched. Verified to
  fail with the segment ids (the padding of the shorter prompt) left out of the kernel calls."""
  prompts = [[1, 2, 3, 4, 5], [6, 7]]
  want = sample.generate(make("xla"), prompts, max_new_tokens=3, temperature=0.0)
  got = sample.generate(make("triton"), prompts, max_new_tokens=3, temperature=0.0)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a[0], b[0])
