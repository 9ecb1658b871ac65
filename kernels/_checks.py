"""Argument validation shared by every attention implementation in kernels/."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

MAX_HEAD_DIM = 256


def head_dim_problem(head_dim: int) -> str | None:
    """Why the kernels cannot take ``head_dim``, or None if they can: any
    multiple of 8 up to 256 (tiles are padded to the next power of two)."""
    if head_dim % 8 or not 8 <= head_dim <= MAX_HEAD_DIM:
        return (f"head_dim {head_dim} is not supported; the Triton kernels take a multiple of 8 "
                f"from 8 to {MAX_HEAD_DIM}")
    return None
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def check_attention_args(q, k, v, segment_ids, softmax_scale, *, name: str,
                         check_head_dim: bool = True):
    """Validate shapes/dtypes; returns (q_seg, kv_seg, scale) with segs int32 or None.

    q: [batch, q_len, num_heads, head_dim]; k, v: [batch, kv_len, num_kv_heads,
    head_dim]; segment_ids: None, [batch, q_len] ints (self-attention, needs
    q_len == kv_len) or a pair (q_segment_ids [batch, q_len], kv_segment_ids
    [batch, kv_len]).
    """
    for arg_name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(
                f"{name}: {arg_name} must have shape [batch, seq_len, heads, head_dim], "
                f"got shape {getattr(x, 'shape', None)}.")
        if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
            raise ValueError(
                f"{name}: {arg_name} has dtype {x.dtype}; supported dtypes are float32, "
                f"bfloat16 and float16.")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"{name}: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    b, tq, h, d = q.shape
    bk, tk, kvh, dk = k.shape
    if k.shape != v.shape:
        raise ValueError(f"{name}: k and v must have the same shape, got {k.shape} and {v.shape}.")
    if bk != b:
        raise ValueError(f"{name}: q has batch {b} but k/v have batch {bk}.")
    if dk != d:
        raise ValueError(f"{name}: q has head_dim {d} but k/v have head_dim {dk}.")
    problem = head_dim_problem(d) if check_head_dim else None
    if problem:
        raise ValueError(f"{name}: {problem}.")
    if kvh < 1 or h % kvh != 0:
        raise ValueError(
            f"{name}: num_kv_heads {kvh} must divide num_heads {h} (GQA/MQA).")
    if min(b, tq, tk, h) < 1:
        raise ValueError(f"{name}: empty input, q shape {q.shape}, k shape {k.shape}.")

    q_seg = kv_seg = None
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)):
            if len(segment_ids) != 2:
                raise ValueError(
                    f"{name}: segment_ids must be an array or a pair (q_segment_ids, "
                    f"kv_segment_ids), got a sequence of length {len(segment_ids)}.")
            q_seg, kv_seg = segment_ids
        else:
            if tq != tk:
                raise ValueError(
                    f"{name}: a single segment_ids array needs q_len == kv_len (got {tq} and "
                    f"{tk}); pass a pair (q_segment_ids, kv_segment_ids) instead.")
            q_seg = kv_seg = segment_ids
        for arg_name, s, t in (("q_segment_ids", q_seg, tq), ("kv_segment_ids", kv_seg, tk)):
            shape = getattr(s, "shape", None)
            if shape != (b, t):
                raise ValueError(f"{name}: {arg_name} must have shape {(b, t)}, got {shape}.")
            if not jnp.issubdtype(s.dtype, jnp.integer):
                raise ValueError(f"{name}: {arg_name} must be integers, got dtype {s.dtype}.")
        q_seg = jnp.asarray(q_seg, jnp.int32)
        kv_seg = jnp.asarray(kv_seg, jnp.int32)

    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d)
    else:
        try:
            softmax_scale = float(softmax_scale)
        except TypeError as e:  # traced values cannot be baked into a kernel
            raise ValueError(
                f"{name}: softmax_scale must be a Python float, got {type(softmax_scale)}.") from e
        if not np.isfinite(softmax_scale):
            raise ValueError(f"{name}: softmax_scale must be finite, got {softmax_scale}.")
    return q_seg, kv_seg, softmax_scale


def check_bias_and_window(bias, window, causal, scores_shape, *, name: str) -> int:
    """Validate the attention ``bias`` and ``window``; returns the window as an int.

    scores_shape: ``(batch, num_heads, q_len, kv_len)``.  bias: None or
    ``[1 or batch, num_heads, q_len, kv_len]``, float32/bfloat16/float16.
    window: an int >= 0; > 0 needs ``causal=True`` (a query sees the last
    ``window`` keys up to its own position).  Raises ValueError.
    """
    b, h, tq, tk = scores_shape
    if bias is not None:
        shape = tuple(getattr(bias, "shape", ()))
        if len(shape) != 4 or shape[0] not in (1, b) or shape[1:] != (h, tq, tk):
            raise ValueError(f"{name}: bias must have shape [1 or {b}, {h}, {tq}, {tk}] "
                             f"([batch, heads, q_len, kv_len]), got {shape or None}.")
        if jnp.dtype(bias.dtype) not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
            raise ValueError(f"{name}: bias has dtype {bias.dtype}; supported dtypes are "
                             f"float32, bfloat16 and float16.")
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)):
        raise ValueError(f"{name}: window must be a Python int, got {type(window).__name__}.")
    window = int(window)
    if window < 0 or (window and not causal):
        raise ValueError(f"{name}: window={window}: expected 0 (all keys) or > 0 with "
                         f"causal=True.")
    if window >= 2**31:
        raise ValueError(f"{name}: window={window} does not fit in int32.")
    return window
