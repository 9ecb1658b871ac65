"""Fused masked softmax in Triton, and attention built on it.

``fused_softmax_attention`` = XLA einsum for ``Q K^T`` (fp32 accumulation) ->
one Triton kernel that applies the scale, the additive bias, the causal, window
and segment masks and the row softmax in a single pass -> XLA einsum for ``P V``.  GQA is handled by
reshaping q to ``[B, Tq, KVH, G, D]`` (K/V are never repeated).

Kernels work on the scores viewed as ``B * H * Tq`` rows of length ``Tk``;
each program owns ``BLOCK_R`` whole rows (``BLOCK_N >= Tk``, a power of two).
Rows whose query sees no key produce all-zero probabilities.

Backward: ``G = P * (dP - rowsum(P * dP))`` and ``dS = scale * G`` in one
kernel, with ``dP = dO V^T`` from XLA; ``dBias = G`` (summed over the batch
for a batch-1 bias), written only when the bias needs a gradient.  Masked
entries have ``P = 0`` and need no mask.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from kernels import bridge
from kernels._batching import fold_vmap
from kernels._checks import check_attention_args, check_bias_and_window
from kernels._vjp import dense_cotangent, primal, sum_bias_grad, wants_grad

__all__ = ["fused_softmax_attention", "masked_softmax"]


@triton.jit
def _softmax_fwd_kernel(S, QSEG, KSEG, BIAS, scale, n_rows, Tq, Tk, H, bias_group, window,
                        P,
                        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                        HAS_SEG: tl.constexpr, HAS_BIAS: tl.constexpr, WINDOWED: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < Tk
    tile_ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    offs = rows64[:, None] * Tk + cols[None, :]
    s = tl.load(S + offs, mask=tile_ok, other=0.0).to(tl.float32) * scale
    b = rows // (Tq * H)
    if HAS_BIAS:
        # row (b, h, i) of the scores reads row (b // bias_group, h, i) of the bias
        b_rows = (b // bias_group).to(tl.int64) * (Tq * H) + rows % (Tq * H)
        bias = tl.load(BIAS + b_rows[:, None] * Tk + cols[None, :], mask=tile_ok, other=0.0)
        s += bias.to(tl.float32)
    valid = col_ok[None, :]
    q_pos = rows % Tq + (Tk - Tq)  # ends aligned when Tq != Tk
    if CAUSAL:
        valid = valid & (cols[None, :] <= q_pos[:, None])
    if WINDOWED:
        valid = valid & (cols[None, :] > q_pos[:, None] - window)
    if HAS_SEG:
        q_seg = tl.load(QSEG + b.to(tl.int64) * Tq + rows % Tq, mask=row_ok, other=-1)
        k_seg = tl.load(KSEG + b.to(tl.int64)[:, None] * Tk + cols[None, :], mask=tile_ok,
                        other=-2)
        valid = valid & (q_seg[:, None] == k_seg)
    s = tl.where(valid, s * 1.4426950408889634, float("-inf"))  # base 2
    m = tl.max(s, 1)
    m = tl.where(m == float("-inf"), 0.0, m)  # fully masked row: exp2(-inf) = 0
    e = tl.math.exp2(s - m[:, None])
    den = tl.sum(e, 1)
    den = tl.where(den == 0.0, 1.0, den)
    p = e / den[:, None]
    tl.store(P + offs, p.to(P.dtype.element_ty), mask=tile_ok)


@triton.jit
def _softmax_bwd_kernel(P, DP, scale, n_rows, Tk,
                        DS, DB,
                        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BIAS_GRAD: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < Tk)[None, :]
    offs = rows.to(tl.int64)[:, None] * Tk + cols[None, :]
    p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
    dp = tl.load(DP + offs, mask=mask, other=0.0).to(tl.float32)
    dot = tl.sum(p * dp, 1)
    g = p * (dp - dot[:, None])  # gradient of the softmax's input, scale * S + bias
    tl.store(DS + offs, (g * scale).to(DS.dtype.element_ty), mask=mask)
    if BIAS_GRAD:
        tl.store(DB + offs, g, mask=mask)


def _launch_params(n_rows: int, tk: int, interpret: bool):
    block_n = triton.next_power_of_2(tk)
    if interpret:
        # few, large programs: interpreter cost is per operation, not per element
        budget = 1 << 16
        num_warps = 4
    else:
        budget = 1 << 12  # ~4K fp32 values per program keeps registers happy
        num_warps = 4 if block_n <= 1024 else (8 if block_n <= 4096 else 16)
    block_r = max(1, min(budget // block_n, triton.next_power_of_2(n_rows)))
    block_r = triton.next_power_of_2(block_r)
    return block_r, block_n, num_warps


@dataclasses.dataclass(frozen=True)
class _SoftmaxCfg:
    causal: bool
    scale: float
    has_seg: bool
    has_bias: bool
    window: int  # 0: none
    interpret: bool


@functools.lru_cache(maxsize=None)
def _fwd_impl(cfg: _SoftmaxCfg, out_dtype):
    def fwd(s, *extras):
        b, h, tq, tk = s.shape
        n_rows = b * h * tq
        extras = list(extras)
        dummy = jnp.zeros((1,), jnp.int32)
        q_seg, kv_seg = (extras.pop(0), extras.pop(0)) if cfg.has_seg else (dummy, dummy)
        # a bias row serves bias_group consecutive batch rows (see flash._extra_operands)
        bias = extras.pop(0) if cfg.has_bias else jnp.zeros((1,), jnp.float32)
        bias_group = b // bias.shape[0] if cfg.has_bias else 1
        block_r, block_n, warps = _launch_params(n_rows, tk, cfg.interpret)
        (p,) = bridge.triton_call(
            _softmax_fwd_kernel, s, q_seg, kv_seg, bias, cfg.scale, n_rows, tq, tk, h,
            bias_group, cfg.window,
            out_shape=jax.ShapeDtypeStruct(s.shape, out_dtype),
            grid=(triton.cdiv(n_rows, block_r),), interpret=cfg.interpret,
            num_warps=warps, num_stages=1,
            BLOCK_R=block_r, BLOCK_N=block_n, CAUSAL=cfg.causal, HAS_SEG=cfg.has_seg,
            HAS_BIAS=cfg.has_bias, WINDOWED=cfg.window > 0)
        return (p,)

    return fold_vmap(fwd)


@functools.lru_cache(maxsize=None)
def _bwd_impl(cfg: _SoftmaxCfg, bias_grad: bool):
    """(dS,) or, with ``bias_grad``, (dS, dBias) with dBias fp32 over the scores' batch."""

    def bwd(p, dp):
        b, h, tq, tk = p.shape
        n_rows = b * h * tq
        block_r, block_n, warps = _launch_params(n_rows, tk, cfg.interpret)
        out_shape = [jax.ShapeDtypeStruct(p.shape, jnp.float32),
                     jax.ShapeDtypeStruct(p.shape if bias_grad else (1,), jnp.float32)]
        ds, dbias = bridge.triton_call(
            _softmax_bwd_kernel, p, dp, cfg.scale, n_rows, tk,
            out_shape=out_shape, grid=(triton.cdiv(n_rows, block_r),), interpret=cfg.interpret,
            num_warps=warps, num_stages=1, BLOCK_R=block_r, BLOCK_N=block_n,
            BIAS_GRAD=bias_grad)
        return (ds, dbias) if bias_grad else (ds,)

    return fold_vmap(bwd)


def _extras(cfg: _SoftmaxCfg, q_seg, kv_seg, bias) -> tuple:
    return ((q_seg, kv_seg) if cfg.has_seg else ()) + ((bias,) if cfg.has_bias else ())


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _masked_softmax(cfg: _SoftmaxCfg, dtypes, s, q_seg, kv_seg, bias):
    return _fwd_impl(cfg, dtypes[1])(s, *_extras(cfg, q_seg, kv_seg, bias))[0]


def _masked_softmax_fwd(cfg, dtypes, s, q_seg, kv_seg, bias):
    # symbolic_zeros=True: arguments come as CustomVJPPrimal (see kernels/_vjp.py); the
    # bias is kept for the backward (its shape and dtype) only when it needs a gradient
    bias_grad = wants_grad(bias)
    s, q_seg, kv_seg, bias = (primal(x) for x in (s, q_seg, kv_seg, bias))
    p = _masked_softmax(cfg, dtypes, s, q_seg, kv_seg, bias)
    return p, (p, bias if bias_grad else None)


def _masked_softmax_bwd(cfg, dtypes, res, dp):
    p, bias = res
    dp = dense_cotangent(dp).astype(jnp.float32)
    if bias is None:
        (ds,) = _bwd_impl(cfg, False)(p, dp)
        return ds.astype(dtypes[0]), None, None, None
    ds, dbias = _bwd_impl(cfg, True)(p, dp)
    return ds.astype(dtypes[0]), None, None, sum_bias_grad(dbias, bias)


_masked_softmax.defvjp(_masked_softmax_fwd, _masked_softmax_bwd, symbolic_zeros=True)


def masked_softmax(scores, *, scale: float = 1.0, causal: bool = False, q_segment_ids=None,
                   kv_segment_ids=None, bias=None, window: int = 0, out_dtype=None):
    """Fused ``softmax(mask(scale * scores + bias))`` over the last axis.

    scores: ``[batch, heads, q_len, kv_len]`` (any float dtype, computed in fp32).
    bias: None or ``[1 or batch, heads, q_len, kv_len]`` float, differentiable.
    window: 0 or ``W > 0`` with ``causal``: query ``i`` sees keys ``j`` with
    ``0 <= i + kv_len - q_len - j < W``.
    Returns probabilities in ``out_dtype`` (default: scores' dtype); fully
    masked rows are all zeros.  Differentiable (Triton backward kernel).
    Raises ValueError for bad shapes, segment ids, bias or window.
    """
    if scores.ndim != 4:
        raise ValueError(f"masked_softmax: scores must be [batch, heads, q_len, kv_len], got "
                         f"shape {scores.shape}.")
    has_seg = q_segment_ids is not None
    if has_seg != (kv_segment_ids is not None):
        raise ValueError("masked_softmax: pass both q_segment_ids and kv_segment_ids, or neither.")
    b, h, tq, tk = scores.shape
    window = check_bias_and_window(bias, window, causal, scores.shape, name="masked_softmax")
    cfg = _SoftmaxCfg(causal=bool(causal), scale=float(scale), has_seg=has_seg,
                      has_bias=bias is not None, window=window,
                      interpret=bridge.use_interpreter())
    out_dtype = jnp.dtype(out_dtype or scores.dtype)
    q_seg = None if not has_seg else jnp.asarray(q_segment_ids, jnp.int32)
    kv_seg = None if not has_seg else jnp.asarray(kv_segment_ids, jnp.int32)
    return _masked_softmax(cfg, (jnp.dtype(scores.dtype), out_dtype), scores, q_seg, kv_seg,
                           bias)


def fused_softmax_attention(q, k, v, *, causal: bool = False, segment_ids=None,
                            softmax_scale=None, bias=None, window: int = 0):
    """Attention with XLA matmuls around the fused Triton masked softmax.

    Same signature and semantics as :func:`kernels.flash_attention` (bias and
    window included); it materialises the ``[batch, heads, q_len, kv_len]``
    scores (fp32) and probabilities (q's dtype).  The bias is added inside the
    softmax kernel; its gradient is the softmax's input gradient (a second
    output of the backward kernel, only when the bias needs one).
    """
    q_seg, kv_seg, scale = check_attention_args(q, k, v, segment_ids, softmax_scale,
                                                name="fused_softmax_attention")
    b, tq, h, d = q.shape
    _, tk, kvh, _ = k.shape
    window = check_bias_and_window(bias, window, causal, (b, h, tq, tk),
                                   name="fused_softmax_attention")
    g = h // kvh
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    s = jnp.einsum("bqkgd,bskd->bkgqs", q.reshape(b, tq, kvh, g, d), k,
                   precision=precision, preferred_element_type=jnp.float32)
    p = masked_softmax(s.reshape(b, h, tq, tk), scale=scale, causal=causal,
                       q_segment_ids=q_seg, kv_segment_ids=kv_seg, bias=bias, window=window,
                       out_dtype=q.dtype)
    o = jnp.einsum("bkgqs,bskd->bqkgd", p.reshape(b, kvh, g, tq, tk), v,
                   precision=precision, preferred_element_type=jnp.float32)
    return o.reshape(b, tq, h, d).astype(q.dtype)
