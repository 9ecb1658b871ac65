"""Attention kernels in Triton, callable from JAX.

GPU: XLA custom calls through jax-triton.  CPU: the same kernel source run by
Triton's interpreter inside ``jax.pure_callback`` (see ``kernels/bridge.py``).
This package knows nothing about the model code.

Public API (q ``[batch, q_len, num_heads, head_dim]``, k/v ``[batch, kv_len,
num_kv_heads, head_dim]``, result ``[batch, q_len, num_heads, head_dim]`` in
q's dtype):

* ``flash_attention(q, k, v, *, causal=False, segment_ids=None, softmax_scale=None,
  bias=None, window=0)``
* ``fused_softmax_attention(...)`` (same arguments)
* ``reference_attention(...)``: plain jnp oracle with the same semantics.

``bias`` ``[1 or batch, num_heads, q_len, kv_len]`` is added to the scaled
scores (differentiable); ``window`` W > 0 (with ``causal``) lets a query see
only the last W keys up to its own position.

All three are differentiable and work under ``jax.jit``, ``jax.grad``,
``jax.checkpoint`` and ``jax.vmap``.
"""

from kernels._checks import MAX_HEAD_DIM, head_dim_problem
from kernels.flash import flash_attention
from kernels.reference import attention as reference_attention
from kernels.softmax import fused_softmax_attention, masked_softmax

__all__ = [
    "MAX_HEAD_DIM",
    "head_dim_problem",
    "flash_attention",
    "fused_softmax_attention",
    "masked_softmax",
    "reference_attention",
]
