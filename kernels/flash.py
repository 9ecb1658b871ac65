"""Flash attention (forward + backward) in Triton, callable from JAX.

Layout: q/o/dq are ``[B, Tq, H, D]`` and k/v/dk/dv ``[B, Tk, KVH, D]`` exactly
as the caller passes them (no transposes; rows are addressed with a stride of
``H * D`` or ``KVH * D``).  The log-sum-exp and the backward's ``delta`` are
internal fp32 ``[B, H, Tq]`` buffers.  LSE is kept in base 2 (``log2(e)`` is
folded into the softmax scale so the kernels use ``exp2``/``log2``); it is
``+inf`` for a query that sees no key, which makes every recomputed
probability of that row exactly zero in the backward pass.

An optional additive bias ``[BB, H, Tq, Tk]`` (``BB`` = 1 or B) is read tile by
tile where the scores are made: ``S = (q k^T * scale + bias) * log2(e)`` (the
bias is in natural-log units, so it gets ``log2(e)`` too).  Batch row ``b``
reads bias row ``b // (B // BB)``: stride 0 for a batch-1 bias, and still right
after ``fold_vmap`` has folded a vmapped axis into the batch of both.

Forward (grid ``(cdiv(Tq, BLOCK_M), B * H)``): one program per query block,
online softmax over K/V blocks in stages (``_kv_range``):

1. with a sliding window, the blocks on its left edge, masked;
2. blocks that need no mask at all (fully visible under causality and the
   window, fully inside ``Tk``) -- no ``where`` per element;
3. the diagonal band (causal) and/or the ragged ``Tk`` tail, with the mask.

Blocks entirely above the diagonal or left of every window of the query block
are never visited, so with a window W the cost grows as ``Tq * W``, not
``Tq * Tk``.  Segment ids, when given, are applied in every stage.  Causal with
``Tq != Tk`` aligns the ends: query ``i`` sits at key position ``i + Tk - Tq``
and, with a window, sees keys ``j`` with ``0 <= i + Tk - Tq - j < W``.

Backward (FlashAttention-2 scheme, no atomics, deterministic):

* ``_bwd_preprocess``: ``delta = rowsum(dO * O)``;
* ``_bwd_dkdv_kernel``: one program per K/V block and kv head; loops over the
  ``H // KVH`` query heads of its GQA group and their query blocks in the
  range that sees the block (``_q_range``), recomputing
  ``P = exp2(S - lse)``; accumulates dK and dV in fp32;
* ``_bwd_dq_kernel``: one program per query block, loops over K/V blocks as
  the forward does.  When the bias needs a gradient it also writes
  ``dBias = dS = P * (dP - delta)`` (fp32, ``[B, H, Tq, Tk]``): each element by
  exactly one program, zeros where no query of the block looks, so it is
  deterministic; a batch-1 bias's gradient is then summed over the batch in XLA.

GQA/MQA: query head ``h`` reads kv head ``h // (H // KVH)``; K/V are never
repeated in memory.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from kernels import bridge
from kernels._batching import fold_vmap
from kernels._checks import check_attention_args, check_bias_and_window
from kernels._vjp import dense_cotangent, grad_flag, primal, sum_bias_grad, wants_grad

__all__ = ["flash_attention", "flash_attention_fwd"]

_LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, q_seg, offs_m, K_base, V_base, KSEG_base, B_base, lo, hi, Tq,
               Tk, kv_stride, shift, window, qk_scale, HEAD_DIM: tl.constexpr,
               HEAD_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, HAS_BIAS: tl.constexpr,
               WINDOWED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_PAD)
    d_ok = offs_d < HEAD_DIM  # the tile is padded to a power of two along head_dim
    # pointers advance by one block per iteration (fewer ops per iteration)
    kT_ptrs = K_base + (lo + offs_n)[None, :] * kv_stride + offs_d[:, None]
    v_ptrs = V_base + (lo + offs_n)[:, None] * kv_stride + offs_d[None, :]
    step = BLOCK_N * kv_stride
    if HAS_BIAS:
        # rows past Tq read row Tq - 1 (never stored): no row mask on the bias load
        b_ptrs = B_base + tl.minimum(offs_m, Tq - 1)[:, None] * Tk + (lo + offs_n)[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        if MASKED:
            cols = start_n + offs_n
            col_ok = cols < Tk
            k = tl.load(kT_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        elif HEAD_PAD != HEAD_DIM:
            k = tl.load(kT_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        else:
            k = tl.load(kT_ptrs)
            v = tl.load(v_ptrs)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:  # the bias is in natural-log units: base 2 like the scores
            if MASKED:
                bias = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                bias = tl.load(b_ptrs)
            qk += bias.to(tl.float32) * 1.4426950408889634
            b_ptrs += BLOCK_N
        if MASKED:
            valid = col_ok[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + shift)
            if WINDOWED:
                valid = valid & (cols[None, :] > offs_m[:, None] + shift - window)
            qk = tl.where(valid, qk, float("-inf"))
        if HAS_SEG:
            k_seg = tl.load(KSEG_base + start_n + offs_n, mask=start_n + offs_n < Tk, other=-2)
            qk = tl.where(q_seg[:, None] == k_seg[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # rows that have seen no visible key yet keep m = -inf; use 0 as the
        # reference so that exp2(-inf - ref) = 0 instead of NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
        kT_ptrs += step
        v_ptrs += step
    return acc, m_i, l_i


@triton.jit
def _kv_range(start_m, Tq, Tk, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    """Key ranges of query block ``start_m``: ``lo <= full_lo <= full_end <= hi``.

    [full_lo, full_end) needs no mask; [lo, full_lo) (the window's left edge) and
    [full_end, hi) (the diagonal band / ragged Tk tail) are masked; keys outside
    [lo, hi) are hidden from every query of the block and never visited.  The
    starts are multiples of BLOCK_N (or equal to ``hi``)."""
    n_full = (Tk // BLOCK_N) * BLOCK_N
    shift = Tk - Tq
    first = start_m * BLOCK_M + shift  # key position of the block's first query
    last = tl.minimum(start_m * BLOCK_M + BLOCK_M, Tq) - 1 + shift
    if CAUSAL:
        full_end = tl.minimum((tl.maximum(first + 1, 0) // BLOCK_N) * BLOCK_N, n_full)
        hi = tl.minimum(tl.maximum(last + 1, 0), Tk)
    else:
        full_end = n_full
        hi = Tk
    lo = 0
    full_lo = 0
    if WINDOWED:
        # query at position p sees keys (p - window, p]: the first query's window
        # starts the visited keys, the last query's starts the unmasked ones
        lo = tl.minimum((tl.maximum(first - window + 1, 0) // BLOCK_N) * BLOCK_N, hi)
        full_lo = tl.cdiv(tl.maximum(last - window + 1, 0), BLOCK_N) * BLOCK_N
        full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
        full_end = tl.maximum(full_end, full_lo)
    return lo, full_lo, full_end, hi


@triton.jit
def _flash_fwd_kernel(Q, K, V, QSEG, KSEG, BIAS, sm_scale, Tq, Tk, H, KVH, bias_group, window,
                      O, LSE,
                      HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, HAS_BIAS: tl.constexpr,
                      WINDOWED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    off_kvh = off_h // (H // KVH)
    q_stride = H * HEAD_DIM
    kv_stride = KVH * HEAD_DIM
    off_b64 = off_b.to(tl.int64)
    Q_base = Q + off_b64 * Tq * q_stride + off_h * HEAD_DIM
    O_base = O + off_b64 * Tq * q_stride + off_h * HEAD_DIM
    K_base = K + off_b64 * Tk * kv_stride + off_kvh * HEAD_DIM
    V_base = V + off_b64 * Tk * kv_stride + off_kvh * HEAD_DIM
    KSEG_base = KSEG + off_b64 * Tk
    B_base = BIAS + ((off_b // bias_group).to(tl.int64) * H + off_h) * Tq * Tk

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    row_ok = offs_m < Tq
    tile_ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q_base + offs_m[:, None] * q_stride + offs_d[None, :], mask=tile_ok, other=0.0)
    if HAS_SEG:
        q_seg = tl.load(QSEG + off_b64 * Tq + offs_m, mask=row_ok, other=-1)
    else:
        q_seg = offs_m
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): softmax in base 2

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    shift = Tk - Tq
    lo, full_lo, full_end, hi = _kv_range(start_m, Tq, Tk, window, BLOCK_M, BLOCK_N, CAUSAL,
                                          WINDOWED)
    if WINDOWED:  # the window's left edge, masked
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, q_seg, offs_m, K_base, V_base, KSEG_base,
                                   B_base, lo, full_lo, Tq, Tk, kv_stride, shift, window,
                                   qk_scale, HEAD_DIM, HEAD_PAD, BLOCK_N, True, CAUSAL, HAS_SEG,
                                   HAS_BIAS, WINDOWED, DOT_PRECISION)
    # unmasked blocks
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, q_seg, offs_m, K_base, V_base, KSEG_base,
                               B_base, full_lo, full_end, Tq, Tk, kv_stride, shift, window,
                               qk_scale, HEAD_DIM, HEAD_PAD, BLOCK_N, False, CAUSAL, HAS_SEG,
                               HAS_BIAS, WINDOWED, DOT_PRECISION)
    # diagonal band and/or ragged tail, masked
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, q_seg, offs_m, K_base, V_base, KSEG_base,
                               B_base, full_end, hi, Tq, Tk, kv_stride, shift, window,
                               qk_scale, HEAD_DIM, HEAD_PAD, BLOCK_N, True, CAUSAL, HAS_SEG,
                               HAS_BIAS, WINDOWED, DOT_PRECISION)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(O_base + offs_m[:, None] * q_stride + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=tile_ok)
    tl.store(LSE + off_bh.to(tl.int64) * Tq + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_preprocess(O, DO, Tq, H, DELTA, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    stride = H * HEAD_DIM
    base = off_b.to(tl.int64) * Tq * stride + off_h * HEAD_DIM
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    row_ok = offs_m < Tq
    tile_ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    ptrs = base + offs_m[:, None] * stride + offs_d[None, :]
    o = tl.load(O + ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(DELTA + off_bh.to(tl.int64) * Tq + offs_m, delta, mask=row_ok)


@triton.jit
def _bwd_kv_inner(dk, dv, k, v, k_seg, offs_n, Q_base, DO_base, LSE_base, DELTA_base,
                  QSEG_base, B_base, lo, hi, Tq, Tk, q_stride, shift, window, qk_scale,
                  HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                  MASKED: tl.constexpr, HAS_SEG: tl.constexpr, HAS_BIAS: tl.constexpr,
                  WINDOWED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_PAD)
    d_ok = offs_d < HEAD_DIM
    offs_mb = tl.arange(0, BLOCK_M)
    q_ptrs = Q_base + (lo + offs_mb)[:, None] * q_stride + offs_d[None, :]
    do_ptrs = DO_base + (lo + offs_mb)[:, None] * q_stride + offs_d[None, :]
    step = BLOCK_M * q_stride
    if HAS_BIAS:
        # the bias tile transposed; columns past Tk read column Tk - 1 (their
        # dK/dV are never stored), rows past Tq have P = 0 (LSE = +inf)
        bT_cols = B_base + tl.minimum(offs_n, Tk - 1)[:, None]
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_mb
        row_ok = offs_m < Tq
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(do_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        # rows past Tq get lse = +inf, hence P = 0: no other mask needed for them
        lse = tl.load(LSE_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA_base + offs_m, mask=row_ok, other=0.0)
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            bT = tl.load(bT_cols + tl.minimum(offs_m, Tq - 1)[None, :] * Tk)
            qkT += bT.to(tl.float32) * 1.4426950408889634
        pT = tl.math.exp2(qkT - lse[None, :])
        if MASKED:  # only used under causal
            valid = offs_n[:, None] <= offs_m[None, :] + shift
            if WINDOWED:
                valid = valid & (offs_n[:, None] > offs_m[None, :] + shift - window)
            pT = tl.where(valid, pT, 0.0)
        if HAS_SEG:
            q_seg = tl.load(QSEG_base + offs_m, mask=row_ok, other=-1)
            pT = tl.where(k_seg[:, None] == q_seg[None, :], pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PRECISION)
        q_ptrs += step
        do_ptrs += step
    return dk, dv


@triton.jit
def _q_range(start_n, Tq, Tk, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    """Query ranges of key block ``start_n``: ``lo <= mid <= mid_end <= hi``.

    [mid, mid_end) sees every key of the block (no mask); [lo, mid) (diagonal
    band) and [mid_end, hi) (window's edge) are masked; other query blocks see
    none of it and are never visited.  Query ``i`` sees key ``j`` iff
    ``j <= i + shift`` (causal) and ``j > i + shift - window`` (window)."""
    shift = Tk - Tq
    q_end = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    first = start_n * BLOCK_N  # the block's first and last key
    last = first + BLOCK_N - 1
    if CAUSAL:
        lo = (tl.maximum(first - shift, 0) // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(tl.maximum(last - shift, 0), BLOCK_M) * BLOCK_M
        mid = tl.minimum(mid, q_end)
        lo = tl.minimum(lo, mid)
    else:
        lo = 0
        mid = 0
    mid_end = q_end
    hi = q_end
    if WINDOWED:
        hi = tl.cdiv(tl.maximum(last + window - shift, 0), BLOCK_M) * BLOCK_M
        hi = tl.minimum(hi, q_end)
        mid = tl.minimum(mid, hi)
        lo = tl.minimum(lo, mid)
        mid_end = (tl.maximum(first + window - shift, 0) // BLOCK_M) * BLOCK_M
        mid_end = tl.minimum(tl.maximum(mid_end, mid), hi)
    return lo, mid, mid_end, hi


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, QSEG, KSEG, BIAS, sm_scale, Tq, Tk, H, KVH,
                     bias_group, window,
                     DK, DV,
                     HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, HAS_BIAS: tl.constexpr,
                     WINDOWED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    start_n = tl.program_id(0)
    off_bkv = tl.program_id(1)
    off_b = off_bkv // KVH
    off_kvh = off_bkv % KVH
    group = H // KVH
    q_stride = H * HEAD_DIM
    kv_stride = KVH * HEAD_DIM
    off_b64 = off_b.to(tl.int64)
    kv_off = off_b64 * Tk * kv_stride + off_kvh * HEAD_DIM

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_PAD)
    col_ok = offs_n < Tk
    tile_ok = col_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    kv_ptrs = kv_off + offs_n[:, None] * kv_stride + offs_d[None, :]
    k = tl.load(K + kv_ptrs, mask=tile_ok, other=0.0)
    v = tl.load(V + kv_ptrs, mask=tile_ok, other=0.0)
    if HAS_SEG:
        k_seg = tl.load(KSEG + off_b64 * Tk + offs_n, mask=col_ok, other=-2)
    else:
        k_seg = offs_n
    qk_scale = sm_scale * 1.4426950408889634
    shift = Tk - Tq
    lo, mid, mid_end, hi = _q_range(start_n, Tq, Tk, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOWED)
    bias_b = (off_b // bias_group).to(tl.int64)

    dk = tl.zeros([BLOCK_N, HEAD_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_PAD], dtype=tl.float32)
    for g in range(0, group):
        off_h = off_kvh * group + g
        q_off = off_b64 * Tq * q_stride + off_h * HEAD_DIM
        row_off = (off_b64 * H + off_h) * Tq
        B_base = BIAS + (bias_b * H + off_h) * Tq * Tk
        dk, dv = _bwd_kv_inner(dk, dv, k, v, k_seg, offs_n, Q + q_off, DO + q_off, LSE + row_off,
                               DELTA + row_off, QSEG + off_b64 * Tq, B_base, lo, mid, Tq, Tk,
                               q_stride, shift, window, qk_scale, HEAD_DIM, HEAD_PAD, BLOCK_M,
                               True, HAS_SEG, HAS_BIAS, WINDOWED, DOT_PRECISION)
        dk, dv = _bwd_kv_inner(dk, dv, k, v, k_seg, offs_n, Q + q_off, DO + q_off, LSE + row_off,
                               DELTA + row_off, QSEG + off_b64 * Tq, B_base, mid, mid_end, Tq,
                               Tk, q_stride, shift, window, qk_scale, HEAD_DIM, HEAD_PAD,
                               BLOCK_M, False, HAS_SEG, HAS_BIAS, WINDOWED, DOT_PRECISION)
        if WINDOWED:  # the window's edge, masked
            dk, dv = _bwd_kv_inner(dk, dv, k, v, k_seg, offs_n, Q + q_off, DO + q_off,
                                   LSE + row_off, DELTA + row_off, QSEG + off_b64 * Tq, B_base,
                                   mid_end, hi, Tq, Tk, q_stride, shift, window, qk_scale,
                                   HEAD_DIM, HEAD_PAD, BLOCK_M, True, HAS_SEG, HAS_BIAS,
                                   WINDOWED, DOT_PRECISION)
    dk = dk * sm_scale
    tl.store(DK + kv_ptrs, dk.to(DK.dtype.element_ty), mask=tile_ok)
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=tile_ok)


@triton.jit
def _bwd_q_inner(dq, q, do, lse, delta, q_seg, offs_m, K_base, V_base, KSEG_base, B_base,
                 DB_base, lo, hi, Tq, Tk, kv_stride, shift, window, qk_scale,
                 HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, WINDOWED: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_PAD)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < Tq
    k_ptrs = K_base + (lo + offs_n)[:, None] * kv_stride + offs_d[None, :]
    v_ptrs = V_base + (lo + offs_n)[:, None] * kv_stride + offs_d[None, :]
    step = BLOCK_N * kv_stride
    if HAS_BIAS:
        b_ptrs = B_base + tl.minimum(offs_m, Tq - 1)[:, None] * Tk + (lo + offs_n)[None, :]
    if BIAS_GRAD:
        db_ptrs = DB_base + offs_m[:, None] * Tk + (lo + offs_n)[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        if MASKED:
            cols = start_n + offs_n
            col_ok = cols < Tk
            k = tl.load(k_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        elif HEAD_PAD != HEAD_DIM:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            if MASKED:
                bias = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                bias = tl.load(b_ptrs)
            qk += bias.to(tl.float32) * 1.4426950408889634
            b_ptrs += BLOCK_N
        p = tl.math.exp2(qk - lse[:, None])
        if MASKED:
            valid = col_ok[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + shift)
            if WINDOWED:
                valid = valid & (cols[None, :] > offs_m[:, None] + shift - window)
            p = tl.where(valid, p, 0.0)
        if HAS_SEG:
            k_seg = tl.load(KSEG_base + start_n + offs_n, mask=start_n + offs_n < Tk, other=-2)
            p = tl.where(q_seg[:, None] == k_seg[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if BIAS_GRAD:
            # dBias = dS: every element is written by this program only (no atomics)
            if MASKED:
                tl.store(db_ptrs, ds, mask=row_ok[:, None] & col_ok[None, :])
            else:
                tl.store(db_ptrs, ds, mask=row_ok[:, None])
            db_ptrs += BLOCK_N
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        k_ptrs += step
        v_ptrs += step
    return dq


@triton.jit
def _zero_fill(DB_base, offs_m, lo, hi, Tq, Tk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dBias = 0 on the keys [lo, hi) the block's queries do not see."""
    offs_n = tl.arange(0, BLOCK_N)
    zeros = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        tl.store(DB_base + offs_m[:, None] * Tk + cols[None, :], zeros,
                 mask=(offs_m < Tq)[:, None] & (cols < Tk)[None, :])


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, QSEG, KSEG, BIAS, sm_scale, Tq, Tk, H, KVH,
                   bias_group, window,
                   DQ, DBIAS,
                   HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BIAS_GRAD: tl.constexpr, WINDOWED: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    off_kvh = off_h // (H // KVH)
    q_stride = H * HEAD_DIM
    kv_stride = KVH * HEAD_DIM
    off_b64 = off_b.to(tl.int64)
    q_off = off_b64 * Tq * q_stride + off_h * HEAD_DIM
    K_base = K + off_b64 * Tk * kv_stride + off_kvh * HEAD_DIM
    V_base = V + off_b64 * Tk * kv_stride + off_kvh * HEAD_DIM
    B_base = BIAS + ((off_b // bias_group).to(tl.int64) * H + off_h) * Tq * Tk
    DB_base = DBIAS + off_bh.to(tl.int64) * Tq * Tk  # [B, H, Tq, Tk], full batch

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    row_ok = offs_m < Tq
    tile_ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    ptrs = q_off + offs_m[:, None] * q_stride + offs_d[None, :]
    q = tl.load(Q + ptrs, mask=tile_ok, other=0.0)
    do = tl.load(DO + ptrs, mask=tile_ok, other=0.0)
    row_off = off_bh.to(tl.int64) * Tq
    lse = tl.load(LSE + row_off + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row_off + offs_m, mask=row_ok, other=0.0)
    if HAS_SEG:
        q_seg = tl.load(QSEG + off_b64 * Tq + offs_m, mask=row_ok, other=-1)
    else:
        q_seg = offs_m
    qk_scale = sm_scale * 1.4426950408889634
    shift = Tk - Tq
    lo, full_lo, full_end, hi = _kv_range(start_m, Tq, Tk, window, BLOCK_M, BLOCK_N, CAUSAL,
                                          WINDOWED)
    KSEG_base = KSEG + off_b64 * Tk
    dq = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    if WINDOWED:
        dq = _bwd_q_inner(dq, q, do, lse, delta, q_seg, offs_m, K_base, V_base, KSEG_base, B_base,
                          DB_base, lo, full_lo, Tq, Tk, kv_stride, shift, window, qk_scale,
                          HEAD_DIM, HEAD_PAD, BLOCK_N, True, CAUSAL, HAS_SEG, HAS_BIAS, BIAS_GRAD,
                          WINDOWED, DOT_PRECISION)
    dq = _bwd_q_inner(dq, q, do, lse, delta, q_seg, offs_m, K_base, V_base, KSEG_base, B_base,
                      DB_base, full_lo, full_end, Tq, Tk, kv_stride, shift, window, qk_scale,
                      HEAD_DIM, HEAD_PAD, BLOCK_N, False, CAUSAL, HAS_SEG, HAS_BIAS, BIAS_GRAD,
                      WINDOWED, DOT_PRECISION)
    dq = _bwd_q_inner(dq, q, do, lse, delta, q_seg, offs_m, K_base, V_base, KSEG_base, B_base,
                      DB_base, full_end, hi, Tq, Tk, kv_stride, shift, window, qk_scale,
                      HEAD_DIM, HEAD_PAD, BLOCK_N, True, CAUSAL, HAS_SEG, HAS_BIAS, BIAS_GRAD,
                      WINDOWED, DOT_PRECISION)
    if BIAS_GRAD:
        # keys no query of the block sees: dBias = 0 (stores only, no compute).  The
        # visited blocks end at the first multiple of BLOCK_N at or past hi.
        _zero_fill(DB_base, offs_m, 0, lo, Tq, Tk, BLOCK_M, BLOCK_N)
        _zero_fill(DB_base, offs_m, tl.cdiv(hi, BLOCK_N) * BLOCK_N, Tk, Tq, Tk, BLOCK_M, BLOCK_N)
    dq = dq * sm_scale
    tl.store(DQ + ptrs, dq.to(DQ.dtype.element_ty), mask=tile_ok)


# ---------------------------------------------------------------------------
# block sizes: autotuned on GPU, fixed on the interpreter
# ---------------------------------------------------------------------------


# (BLOCK_M, BLOCK_N, num_warps, num_stages).  Kept short on purpose: jax-triton
# compiles every config of an autotuned kernel when it lowers a new shape.
_FWD_CONFIGS = [(64, 32, 4, 3), (64, 64, 4, 3), (64, 128, 4, 2), (128, 32, 4, 3),
                (128, 64, 8, 3), (128, 128, 8, 2)]
# dK/dV kernel: BLOCK_N is its K/V tile, BLOCK_M the inner query tile; the dQ
# kernel uses them the other way round.  Both are tuned over this list.
_BWD_CONFIGS = [(32, 64, 4, 3), (32, 128, 4, 3), (64, 32, 4, 3), (64, 64, 4, 2),
                (128, 32, 4, 3), (64, 128, 8, 2), (128, 64, 8, 2)]
# fixed GPU config when autotuning is disabled (KERNELS_AUTOTUNE=0)
_GPU_FIXED = {16: (64, 64), 32: (64, 64), 64: (64, 64), 128: (64, 64), 256: (64, 32), 512: (32, 32)}
# fp32 inputs are the exact (input_precision="ieee") path: tl.dot becomes
# unrolled FMAs, not tensor-core MMAs, so it is a correctness path, never a
# fast one.  One small fixed tile, no autotuning: each fp32 configuration
# takes 5-30 s to compile (measured in tests/test_gpu_lowering.py) and
# jax-triton would compile the whole list at every lowering.
_GPU_FP32 = (32, 32)


def head_pad(head_dim: int) -> int:
    """Width of the head_dim tile: the next power of two, at least 16 (tl.dot's
    minimum).  Head dims that are not powers of two (e.g. 80, 96) are padded
    with masked loads/stores; the padding costs compute, not correctness."""
    return max(16, triton.next_power_of_2(head_dim))


def _effective_dim(head_dim: int, dtype) -> int:
    """Head dim scaled by element size relative to 16-bit: fp32 tiles cost twice
    the shared memory / registers (fp32 fwd at D=128 with 128x64x3 stages
    needs 225 KiB of shared memory when cross-compiled for sm_90)."""
    return head_dim * (2 if jnp.dtype(dtype).itemsize >= 4 else 1)


def _gpu_configs(head_dim: int, kind: str, has_bias: bool = False):
    """Autotuning space on GPU, pruned by (effective) head dim to keep shared
    memory and registers within bounds.  A bias halves the largest tile: its
    tile (up to 4 bytes an element, pipelined like K and V) took the 128x128
    forward and the 64x128 dQ at D=128 to 225 KiB of the 227 KiB an H100 block
    may have (tests/test_gpu_lowering.py)."""
    table = _FWD_CONFIGS if kind == "fwd" else _BWD_CONFIGS
    if head_dim >= 512:
        cap, stages = 64 * 32, 2
    elif head_dim >= 256:
        cap, stages = 64 * 64, 2
    elif head_dim >= 128:
        cap, stages = (128 * 128 if kind == "fwd" else 64 * 128), None
    else:
        cap, stages = 128 * 128, None
    if has_bias:
        cap = max(cap // 2, 64 * 32)
    table = [(bm, bn, w, min(st, stages or st)) for bm, bn, w, st in table if bm * bn <= cap]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in table]


_AUTOTUNE_KEYS = ["Tq", "Tk", "H", "KVH"]


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str, head_dim: int, has_bias: bool):
    """Autotuned wrapper; ``head_dim`` is the effective one (see _effective_dim)."""
    kernel = {"fwd": _flash_fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}[kernel_name]
    kind = "fwd" if kernel_name == "fwd" else "bwd"
    return triton.autotune(configs=_gpu_configs(head_dim, kind, has_bias),
                           key=_AUTOTUNE_KEYS)(kernel)


def _pow2_clip(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << max(0, (n - 1).bit_length())))


def interpreter_block_sizes(q_len: int, kv_len: int) -> tuple[int, int]:
    """Fixed (BLOCK_M, BLOCK_N) used by Triton's interpreter (CPU).

    Large tiles (up to 256 x 256) keep the number of interpreted programs and
    loop iterations low (interpreter cost is per operation, not per element);
    tiny sequences get tiles shrunk to the next power of two (min 16).
    """
    return _pow2_clip(q_len, 16, 256), _pow2_clip(kv_len, 16, 256)


# ---------------------------------------------------------------------------
# JAX wrappers
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Cfg:
    causal: bool
    scale: float
    has_seg: bool
    has_bias: bool
    window: int  # 0: none
    interpret: bool
    block_sizes: tuple | None  # (BLOCK_M, BLOCK_N) or None (autotune / default)


def _dot_precision(dtype) -> str:
    # fp32 inputs: true fp32 products (no TF32) so results match the fp32
    # reference; for 16-bit inputs the flag is irrelevant.
    return "ieee" if jnp.dtype(dtype) == jnp.float32 else "tf32"


def _blocks(cfg: _Cfg, tq: int, tk: int, head_dim: int, dtype):
    """(BLOCK_M, BLOCK_N), or None to autotune; head_dim is the effective one."""
    if cfg.block_sizes is not None:
        return cfg.block_sizes
    if cfg.interpret:
        return interpreter_block_sizes(tq, tk)
    if jnp.dtype(dtype) == jnp.float32:
        return _GPU_FP32
    if os.environ.get("KERNELS_AUTOTUNE", "1") == "0":
        return _GPU_FIXED[head_dim]
    return None  # autotune


def _extra_operands(cfg: _Cfg, batch: int, extras):
    """(q_seg, kv_seg, bias, bias_group) for the kernels from the optional operands
    ``extras`` = segment ids (if any) then the bias (if any); 1-element dummies stand
    for absent ones.  A bias row serves ``bias_group`` consecutive batch rows: 1 for a
    full-batch bias, ``batch`` for a batch-1 bias (also after fold_vmap has folded a
    vmapped axis into the batch of both)."""
    extras = list(extras)
    dummy = jnp.zeros((1,), jnp.int32)
    q_seg, kv_seg = (extras.pop(0), extras.pop(0)) if cfg.has_seg else (dummy, dummy)
    if not cfg.has_bias:
        return q_seg, kv_seg, jnp.zeros((1,), jnp.float32), 1
    bias = extras.pop(0)
    assert batch % bias.shape[0] == 0, (batch, bias.shape)
    return q_seg, kv_seg, bias, batch // bias.shape[0]


def _consts(cfg: _Cfg, d: int, dtype) -> dict:
    return dict(HEAD_DIM=d, HEAD_PAD=head_pad(d), CAUSAL=cfg.causal, HAS_SEG=cfg.has_seg,
                HAS_BIAS=cfg.has_bias, WINDOWED=cfg.window > 0,
                DOT_PRECISION=_dot_precision(dtype))


@functools.lru_cache(maxsize=None)
def _fwd_impl(cfg: _Cfg):
    def fwd(q, k, v, *extras):
        b, tq, h, d = q.shape
        _, tk, kvh, _ = k.shape
        dtype = q.dtype
        # Inputs keep their dtype on both paths (tiles are upcast to fp32 inside
        # tl.dot; bridge patches the interpreter's bf16 dot, see bridge.py).
        cdt = dtype
        q, k, v = (x.astype(cdt) for x in (q, k, v))
        qseg, kseg, bias, bias_group = _extra_operands(cfg, b, extras)
        out_shape = [jax.ShapeDtypeStruct(q.shape, cdt),
                     jax.ShapeDtypeStruct((b, h, tq), jnp.float32)]
        consts = _consts(cfg, d, cdt)
        blocks = _blocks(cfg, tq, tk, _effective_dim(head_pad(d), cdt), cdt)
        args = (q, k, v, qseg, kseg, bias, cfg.scale, tq, tk, h, kvh, bias_group, cfg.window)
        if blocks is None:
            o, lse = bridge.triton_call(
                _tuned("fwd", _effective_dim(head_pad(d), cdt), cfg.has_bias), *args, out_shape=out_shape,
                grid=lambda meta: (triton.cdiv(tq, meta["BLOCK_M"]), b * h),
                interpret=False, **consts)
        else:
            bm, bn = blocks
            o, lse = bridge.triton_call(
                _flash_fwd_kernel, *args, out_shape=out_shape, grid=(triton.cdiv(tq, bm), b * h),
                interpret=cfg.interpret, BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=2,
                **consts)
        return o.astype(dtype), lse

    return fold_vmap(fwd)


@functools.lru_cache(maxsize=None)
def _bwd_impl(cfg: _Cfg, bias_grad: bool):
    """Gradients (dq, dk, dv), plus dBias [batch, heads, q_len, kv_len] fp32 (the full
    batch, whatever the bias's) when ``bias_grad``."""

    def bwd(q, k, v, o, lse, do, *extras):
        b, tq, h, d = q.shape
        _, tk, kvh, _ = k.shape
        cdt = q.dtype  # as in the forward: no change of dtype but q's
        dtypes = (q.dtype, k.dtype, v.dtype)
        q, k, v, o, do = (x.astype(cdt) for x in (q, k, v, o, do))
        qseg, kseg, bias, bias_group = _extra_operands(cfg, b, extras)
        consts = _consts(cfg, d, cdt)
        blocks = _blocks(cfg, tq, tk, _effective_dim(head_pad(d), cdt), cdt)
        pre_bm = blocks[0] if blocks is not None else 64
        (delta,) = bridge.triton_call(
            _bwd_preprocess, o, do, tq, h,
            out_shape=jax.ShapeDtypeStruct((b, h, tq), jnp.float32),
            grid=(triton.cdiv(tq, pre_bm), b * h), interpret=cfg.interpret,
            HEAD_DIM=d, HEAD_PAD=head_pad(d), BLOCK_M=pre_bm, num_warps=4, num_stages=1)
        args = (q, k, v, do, lse, delta, qseg, kseg, bias, cfg.scale, tq, tk, h, kvh, bias_group,
                cfg.window)
        kv_shapes = [jax.ShapeDtypeStruct(k.shape, cdt), jax.ShapeDtypeStruct(v.shape, cdt)]
        # the dQ kernel writes dBias; without it, a 1-element output it never touches
        dq_shapes = [jax.ShapeDtypeStruct(q.shape, cdt),
                     jax.ShapeDtypeStruct((b, h, tq, tk) if bias_grad else (1,), jnp.float32)]
        if blocks is None:
            dk, dv = bridge.triton_call(
                _tuned("dkdv", _effective_dim(head_pad(d), cdt), cfg.has_bias), *args, out_shape=kv_shapes,
                grid=lambda meta: (triton.cdiv(tk, meta["BLOCK_N"]), b * kvh),
                interpret=False, **consts)
            dq, dbias = bridge.triton_call(
                _tuned("dq", _effective_dim(head_pad(d), cdt), cfg.has_bias), *args, out_shape=dq_shapes,
                grid=lambda meta: (triton.cdiv(tq, meta["BLOCK_M"]), b * h),
                interpret=False, BIAS_GRAD=bias_grad, **consts)
        else:
            bm, bn = blocks
            dk, dv = bridge.triton_call(
                _bwd_dkdv_kernel, *args, out_shape=kv_shapes, grid=(triton.cdiv(tk, bn), b * kvh),
                interpret=cfg.interpret, BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=2,
                **consts)
            dq, dbias = bridge.triton_call(
                _bwd_dq_kernel, *args, out_shape=dq_shapes, grid=(triton.cdiv(tq, bm), b * h),
                interpret=cfg.interpret, BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=2,
                BIAS_GRAD=bias_grad, **consts)
        grads = (dq.astype(dtypes[0]), dk.astype(dtypes[1]), dv.astype(dtypes[2]))
        return grads + (dbias,) if bias_grad else grads

    return fold_vmap(bwd)


def _extras(cfg: _Cfg, q_seg, kv_seg, bias) -> tuple:
    return ((q_seg, kv_seg) if cfg.has_seg else ()) + ((bias,) if cfg.has_bias else ())


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Cfg, q, k, v, q_seg, kv_seg, bias):
    o, _ = _fwd_impl(cfg)(q, k, v, *_extras(cfg, q_seg, kv_seg, bias))
    return o


def _flash_fwd_rule(cfg: _Cfg, q, k, v, q_seg, kv_seg, bias):
    # symbolic_zeros=True: every argument comes as a CustomVJPPrimal; `perturbed`
    # says whether the bias needs a gradient (False for a constant or stop_gradient)
    bias_grad = wants_grad(bias)
    q, k, v, q_seg, kv_seg, bias = (primal(x) for x in (q, k, v, q_seg, kv_seg, bias))
    o, lse = _fwd_impl(cfg)(q, k, v, *_extras(cfg, q_seg, kv_seg, bias))
    return o, (q, k, v, q_seg, kv_seg, bias, o, lse, grad_flag(bias_grad))


def _flash_bwd_rule(cfg: _Cfg, res, do):
    q, k, v, q_seg, kv_seg, bias, o, lse, flag = res
    bias_grad = flag is not None
    do = dense_cotangent(do)
    dq, dk, dv, *dbias = _bwd_impl(cfg, bias_grad)(q, k, v, o, lse, do,
                                                   *_extras(cfg, q_seg, kv_seg, bias))
    return dq, dk, dv, None, None, sum_bias_grad(dbias[0], bias) if bias_grad else None


_flash.defvjp(_flash_fwd_rule, _flash_bwd_rule, symbolic_zeros=True)


def _make_cfg(q, k, v, causal, segment_ids, softmax_scale, bias, window, block_sizes, name):
    q_seg, kv_seg, scale = check_attention_args(q, k, v, segment_ids, softmax_scale, name=name)
    (b, tq, h, _), tk = q.shape, k.shape[1]
    window = check_bias_and_window(bias, window, causal, (b, h, tq, tk), name=name)
    if block_sizes is not None:
        bm, bn = (int(x) for x in block_sizes)
        for x in (bm, bn):
            if x < 16 or x & (x - 1):
                raise ValueError(f"{name}: block sizes must be powers of two >= 16, got {block_sizes}.")
        block_sizes = (bm, bn)
    cfg = _Cfg(causal=bool(causal), scale=scale, has_seg=q_seg is not None,
               has_bias=bias is not None, window=window, interpret=bridge.use_interpreter(),
               block_sizes=block_sizes)
    return cfg, q_seg, kv_seg


def flash_attention(q, k, v, *, causal: bool = False, segment_ids=None, softmax_scale=None,
                    bias=None, window: int = 0, block_sizes=None):
    """Flash attention with a Triton forward and backward (see module docstring).

    Args:
      q: ``[batch, q_len, num_heads, head_dim]``, float32/bfloat16/float16.
      k, v: ``[batch, kv_len, num_kv_heads, head_dim]``, same dtype;
        ``num_kv_heads`` divides ``num_heads``.
      causal: causal mask, ends aligned when ``q_len != kv_len``.
      segment_ids: ``[batch, q_len]`` ints (needs ``q_len == kv_len``) or a
        pair ``(q_segment_ids [batch, q_len], kv_segment_ids [batch, kv_len])``.
        A query attends only keys of its own segment; a query with no visible
        key gets zeros (and zero gradients).
      softmax_scale: defaults to ``1 / sqrt(head_dim)``.
      bias: None or an additive score bias ``[1 or batch, num_heads, q_len,
        kv_len]`` (float32/bfloat16/float16), added after the scale:
        ``softmax(scale * q k^T + bias)``.  Differentiable; dBias is computed
        (deterministically) only when the bias needs a gradient, and summed over
        the batch for a batch-1 bias.
      window: 0 (all keys) or ``W > 0`` with ``causal=True``: query ``i`` sees
        only keys ``j`` with ``0 <= i + kv_len - q_len - j < W``; key blocks
        outside every window are skipped (cost ~ ``q_len * W``).
      block_sizes: optional ``(BLOCK_M, BLOCK_N)`` override (testing/debugging);
        by default fixed sizes on the interpreter and autotuning on GPU.

    Returns:
      ``[batch, q_len, num_heads, head_dim]`` in q's dtype.

    Raises:
      ValueError: bad shapes, dtypes, segment ids, bias or window (one sentence).
    """
    cfg, q_seg, kv_seg = _make_cfg(q, k, v, causal, segment_ids, softmax_scale, bias, window,
                                   block_sizes, "flash_attention")
    return _flash(cfg, q, k, v, q_seg, kv_seg, bias)


def flash_attention_fwd(q, k, v, *, causal: bool = False, segment_ids=None, softmax_scale=None,
                        bias=None, window: int = 0, block_sizes=None):
    """Forward only; returns ``(out, lse)`` with ``lse`` the natural-log
    log-sum-exp ``[batch, num_heads, q_len]`` (``+inf`` for empty rows)."""
    cfg, q_seg, kv_seg = _make_cfg(q, k, v, causal, segment_ids, softmax_scale, bias, window,
                                   block_sizes, "flash_attention_fwd")
    o, lse2 = _fwd_impl(cfg)(q, k, v, *_extras(cfg, q_seg, kv_seg, bias))
    return o, lse2 / _LOG2E
