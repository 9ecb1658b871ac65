"""Plain jax.numpy attention: the oracle for the Triton kernels.

Semantics shared by every implementation in kernels/:

* q ``[batch, q_len, num_heads, head_dim]``, k/v ``[batch, kv_len,
  num_kv_heads, head_dim]``; ``num_kv_heads`` divides ``num_heads`` and query
  head ``h`` reads kv head ``h // (num_heads // num_kv_heads)`` (GQA/MQA).
* ``causal``: query ``i`` sits at position ``i + kv_len - q_len`` (ends
  aligned, as in decoding) and sees keys ``j <= i + kv_len - q_len``.
* ``segment_ids``: a query sees only keys with an equal segment id.
* ``window`` W > 0 (with ``causal``): query ``i`` sees only keys ``j`` with
  ``0 <= i + kv_len - q_len - j < W`` (sliding window).
* ``bias`` ``[1 or batch, num_heads, q_len, kv_len]``: added to the scores
  after the scale, before masking: ``softmax(scale * q k^T + bias)``.
* a query that sees no key at all gets a zero output (and zero gradients).
* softmax in float32; output in q's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels._checks import check_attention_args, check_bias_and_window

__all__ = ["attention", "attention_mask"]


def attention_mask(q_len: int, kv_len: int, *, causal: bool, q_seg=None, kv_seg=None,
                   window: int = 0):
    """Boolean mask ``[batch or 1, 1, q_len, kv_len]`` (True = visible)."""
    mask = jnp.ones((1, 1, q_len, kv_len), dtype=bool)
    qi = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    kj = jnp.arange(kv_len)[None, :]
    if causal:
        mask = mask & (kj <= qi)[None, None]
    if window:
        mask = mask & (qi - kj < window)[None, None]
    if q_seg is not None:
        mask = mask & (q_seg[:, None, :, None] == kv_seg[:, None, None, :])
    return mask


def attention(q, k, v, *, causal: bool = False, segment_ids=None, softmax_scale=None,
              bias=None, window: int = 0):
    """Reference attention in plain jnp (differentiable by JAX autodiff, bias included)."""
    q_seg, kv_seg, scale = check_attention_args(q, k, v, segment_ids, softmax_scale,
                                                name="reference.attention",
                                                check_head_dim=False)
    b, tq, h, d = q.shape
    _, tk, kvh, _ = k.shape
    window = check_bias_and_window(bias, window, causal, (b, h, tq, tk),
                                   name="reference.attention")
    g = h // kvh
    qf = q.astype(jnp.float32).reshape(b, tq, kvh, g, d)
    kf = k.astype(jnp.float32)
    vf = v.astype(jnp.float32)
    s = jnp.einsum("bqkgd,bskd->bkgqs", qf, kf,
                   precision=jax.lax.Precision.HIGHEST).reshape(b, h, tq, tk) * scale
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    mask = attention_mask(tq, tk, causal=causal, q_seg=q_seg, kv_seg=kv_seg, window=window)
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    o = jnp.einsum("bkgqs,bskd->bqkgd", p.reshape(b, kvh, g, tq, tk), vf,
                   precision=jax.lax.Precision.HIGHEST)
    return o.reshape(b, tq, h, d).astype(q.dtype)
