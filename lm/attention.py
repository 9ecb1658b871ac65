"""The one attention entry point of the model: `attention(q, k, v, impl=...)`.

Layout everywhere: q [B, Tq, H, D], k and v [B, Tk, KVH, D] with KVH dividing H (GQA).
Masking: causal, plus optional segment ids [B, T] so that packed sequences never attend
across documents (a token attends only to keys with its own segment id).

impl:
  xla            einsum + softmax in plain JAX: the reference, runs anywhere
  cudnn          jax.nn.dot_product_attention(implementation="cudnn"), GPU only
  triton         our fused flash-attention kernel (kernels/), GPU or CPU interpreter
  triton_softmax XLA matmuls around our fused Triton softmax kernel
  auto           triton on GPU when the kernels take the head size, xla otherwise
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lm import sharding

IMPLS = ("xla", "cudnn", "triton", "triton_softmax", "auto")
_MASK_VALUE = -1e30  # finite, so a fully masked row gives zeros rather than NaN


def _kernel_head_dim_problem(head_dim: int) -> str | None:
  from kernels import head_dim_problem  # lazily: the xla path never needs Triton
  return head_dim_problem(head_dim)


def check_impl(impl: str, head_dim: int) -> None:
  """ValueError (one sentence) if `impl` is unknown or cannot run heads of size `head_dim`.

  Called when the model config is read, so a model the Triton kernels cannot run is refused
  before any work, not at its first step."""
  if impl not in IMPLS:
    raise ValueError(f"attention_impl={impl!r} is not one of {IMPLS}")
  if impl == "cudnn":
    from kernels.bridge import on_gpu
    if not on_gpu():
      raise ValueError("attention_impl='cudnn' needs a CUDA GPU (this machine has none); use "
                       "'xla' or 'auto'")
  if impl in ("triton", "triton_softmax"):
    problem = _kernel_head_dim_problem(head_dim)
    if problem:
      raise ValueError(f"attention_impl={impl!r}: {problem}; use attention_impl='xla' or "
                       f"'auto' (or 'cudnn' on a GPU)")


def resolve_impl(impl: str, head_dim: int | None = None) -> str:
  """The implementation `impl` runs as; `auto` picks triton on a GPU only when the kernels
  take `head_dim` (None: not known, assumed fine), else xla (which runs anything)."""
  if impl not in IMPLS:
    raise ValueError(f"attention_impl={impl!r} is not one of {IMPLS}")
  if impl == "auto":
    from kernels.bridge import on_gpu  # the project's one "is this a GPU" test
    if not on_gpu():
      return "xla"
    ok = head_dim is None or _kernel_head_dim_problem(head_dim) is None
    return "triton" if ok else "xla"
  return impl


def attention(q, k, v, *, impl: str = "auto", causal: bool = True, segment_ids=None,
              window: int = 0, bias=None, scale: float | None = None,
              rules=sharding.DEFAULT_RULES):
  """softmax(QK^T * scale + bias)V by `impl`, under the masks below.

  q [B, Tq, H, D]; k, v [B, Tk, KVH, D]. Queries are aligned to the end of the keys (query i
  sits at key position i + Tk - Tq), as when decoding.
  causal: a query sees keys at or before its position.
  segment_ids: [B, T] (self-attention) or a pair ([B, Tq], [B, Tk]); a query sees only keys
    of its own segment id (packed documents; padding as its own id).
  window: 0 (all) or W > 0: a query sees only the last W keys up to and including its own
    position (sliding-window attention, Mistral / Gemma); needs causal=True.
  bias: None or an additive score bias [1 or B, H, Tq, Tk] (T5's relative position bias),
    added after the scaling; gradients flow to it.
  scale: the score scale, default 1/sqrt(D) (T5 uses 1: its init absorbs it).
  `rules` (config.mesh.rules) place the Triton kernels' per-device blocks under a mesh.
  Raises ValueError for a window without causal or a negative window.
  """
  if window < 0 or (window and not causal):
    raise ValueError(f"attention window={window}: expected 0 (full) or > 0 with causal=True")
  impl = resolve_impl(impl, q.shape[-1])
  if impl == "xla":
    return xla_attention(q, k, v, causal=causal, segment_ids=segment_ids, window=window,
                         bias=bias, scale=scale)
  if impl == "cudnn":
    mask = None
    if segment_ids is not None:
      q_seg, kv_seg = _segment_pair(segment_ids)
      mask = (q_seg[:, :, None] == kv_seg[:, None, :])[:, None]
    # cuDNN takes GQA natively (k/v with fewer heads); its window counts keys left of the query.
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, scale=scale, is_causal=causal,
        local_window_size=(window - 1, 0) if window else None, implementation="cudnn")
  import kernels  # imported lazily: the xla path never needs Triton
  fn = kernels.flash_attention if impl == "triton" else kernels.fused_softmax_attention
  # A custom call cannot partition itself: under a mesh, shard_map it over batch and heads.
  return sharding.shard_heads(fn, q, k, v, rules=rules, causal=causal, segment_ids=segment_ids,
                              bias=bias, window=window, softmax_scale=scale)


def _segment_pair(segment_ids):
  """(query ids [B, Tq], key ids [B, Tk]) from a [B, T] array or such a pair."""
  return segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)


def _scores(q, k, kv_layout="bskd", scale=None):
  """QK^T/sqrt(d) per query head, grouping query heads over shared K/V heads (no repeat).

  kv_layout names k's axes: "bskd" ([B, Tk, KVH, D], the model's) or "bksd" (the KV cache's)."""
  b, tq, h, d = q.shape
  kvh = k.shape[kv_layout.index("k")]
  qg = q.reshape(b, tq, kvh, h // kvh, d)
  s = jnp.einsum(f"bqkgd,{kv_layout}->bkgqs", qg, k, preferred_element_type=jnp.float32)
  return s * (1.0 / jnp.sqrt(d).astype(jnp.float32) if scale is None else jnp.float32(scale))


def _weighted_values(p, v, out_shape, dtype, kv_layout="bskd"):
  out = jnp.einsum(f"bkgqs,{kv_layout}->bqkgd", p.astype(v.dtype), v)
  return out.reshape(out_shape).astype(dtype)


def _softmax(s, mask):
  s = jnp.where(mask, s, _MASK_VALUE)
  p = jax.nn.softmax(s, axis=-1)
  return jnp.where(mask, p, 0.0)  # rows with no visible key give zeros


def xla_attention(q, k, v, *, causal=True, segment_ids=None, window=0, bias=None, scale=None):
  """The reference semantics of `attention` in plain JAX (fp32 softmax)."""
  b, tq, h, _ = q.shape
  tk = k.shape[1]
  q_pos = jnp.arange(tq)[:, None] + (tk - tq)  # queries aligned to the end of the keys
  k_pos = jnp.arange(tk)[None, :]
  mask = jnp.ones((1, 1, 1, tq, tk), bool)
  if causal:
    mask &= q_pos >= k_pos
  if window:
    mask &= q_pos - k_pos < window
  if segment_ids is not None:
    q_seg, kv_seg = _segment_pair(segment_ids)
    mask &= (q_seg[:, :, None] == kv_seg[:, None, :])[:, None, None]
  s = _scores(q, k, scale=scale)
  if bias is not None:  # [1|B, H, Tq, Tk] -> the scores' [B, KVH, H/KVH, Tq, Tk]
    kvh = k.shape[2]
    s = s + bias.astype(jnp.float32).reshape(bias.shape[0], kvh, h // kvh, tq, tk)
  p = _softmax(s, mask)
  return _weighted_values(p, v, q.shape, q.dtype)


def slot_times(cache_index, slots: int):
  """[slots] int32: the time each slot of a rolling KV cache holds before a chunk is written
  at `cache_index`: the latest t < cache_index with t % slots == slot; negative if none."""
  return cache_index - 1 - jnp.mod(cache_index - 1 - jnp.arange(slots), slots)


def cached_attention(q, k, v, k_cache, v_cache, cache_index, valid, window: int = 0, *,
                     bias=None, scale=None):
  """Attention of a chunk of queries at times cache_index, cache_index + 1, ... over the keys
  before it (a rolling KV cache, as it was before the chunk) and the chunk's own keys.

  q [B, T, H, D]; k, v [B, T, KVH, D] (the chunk's); the caches are head-major
  [B, KVH, slots, D] (see layers.LayerCache): slot s holds the latest earlier time t with
  t % slots == s, so `slots` must be at least the window (or cover every time, without one).
  valid [B, L]: nonzero at real tokens, by time; times from L on are real (left padding sits
  in the prompt only). window: as attention(); 0 = all cached keys. bias: None or
  [1|B, H, T, slots + T] added to the scores, keys in the order cache slots then chunk
  (slot_times gives the slots' times); scale: as attention().
  Returns [B, T, H, D] in q's dtype.
  """
  b, t = q.shape[:2]
  slots = k_cache.shape[2]
  q_time = cache_index + jnp.arange(t)
  k_time = jnp.concatenate([slot_times(cache_index, slots), q_time])  # [slots + T]
  mask = (k_time[None, :] <= q_time[:, None]) & (k_time[None, :] >= 0)
  if window:
    mask &= q_time[:, None] - k_time[None, :] < window
  n = valid.shape[1]
  real = jnp.where(k_time < n, jnp.take(valid, jnp.clip(k_time, 0, n - 1), axis=1) != 0, True)
  mask = (mask[None] & real[:, None, :])[:, None, None]  # [B, 1, 1, T, slots + T]
  s = jnp.concatenate([_scores(q, k_cache, "bksd", scale), _scores(q, k, scale=scale)], -1)
  if bias is not None:  # [1|B, H, T, S] -> the scores' [B, KVH, H/KVH, T, S]
    kvh = k.shape[2]
    s = s + bias.astype(jnp.float32).reshape(bias.shape[0], kvh, -1, *bias.shape[2:])
  p = _softmax(s, mask)
  out = (_weighted_values(p[..., :slots], v_cache, q.shape, jnp.float32, "bksd")
         + _weighted_values(p[..., slots:], v, q.shape, jnp.float32))
  return out.astype(q.dtype)
