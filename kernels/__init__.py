"""Attention kernels in Triton, callable from JAX (GPU via jax-triton, CPU via
Triton's interpreter).  Knows nothing about the model code in lm/.

Public API:
  flash_attention(q, k, v, *, causal=False, segment_ids=None, softmax_scale=None)
  fused_softmax_attention(q, k, v, *, causal=False, segment_ids=None, softmax_scale=None)
  reference_attention(...)  -- plain jnp oracle with the same semantics
"""

from kernels.flash import flash_attention
from kernels.reference import attention as reference_attention

__all__ = ["flash_attention", "reference_attention"]
