"""Flash attention (forward + backward) in Triton, callable from JAX.

Layout: q/o/dq are ``[B, Tq, H, D]`` and k/v/dk/dv ``[B, Tk, KVH, D]`` exactly
as the caller passes them (no transposes; rows are addressed with a stride of
``H * D`` or ``KVH * D``).  The log-sum-exp and the backward's ``delta`` are
internal fp32 ``[B, H, Tq]`` buffers.  LSE is kept in base 2 (``log2(e)`` is
folded into the softmax scale so the kernels use ``exp2``/``log2``); it is
``+inf`` for a query that sees no key, which makes every recomputed
probability of that row exactly zero in the backward pass.

Forward (grid ``(cdiv(Tq, BLOCK_M), B * H)``): one program per query block,
online softmax over K/V blocks in two stages:

1. blocks that need no mask at all (fully visible under causality, fully
   inside ``Tk``) -- no ``where`` per element;
2. the diagonal band (causal) and/or the ragged ``Tk`` tail, with the mask.

Fully masked causal blocks (above the diagonal) are never visited.  Segment
ids, when given, are applied in both stages.  Causal with ``Tq != Tk`` aligns
the ends: query ``i`` sits at key position ``i + Tk - Tq``.

Backward (FlashAttention-2 scheme, no atomics, deterministic):

* ``_bwd_preprocess``: ``delta = rowsum(dO * O)``;
* ``_bwd_dkdv_kernel``: one program per K/V block and kv head; loops over the
  ``H // KVH`` query heads of its GQA group and their query blocks,
  recomputing ``P = exp2(S - lse)``; accumulates dK and dV in fp32;
* ``_bwd_dq_kernel``: one program per query block, loops over K/V blocks.

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
from kernels._checks import check_attention_args

__all__ = ["flash_attention", "flash_attention_fwd"]

_LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, q_seg, offs_m, K_base, V_base, KSEG_base, lo, hi, Tk, kv_stride,
               shift, qk_scale, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_SEG: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_PAD)
    d_ok = offs_d < HEAD_DIM  # the tile is padded to a power of two along head_dim
    # pointers advance by one block per iteration (fewer ops per iteration)
    kT_ptrs = K_base + (lo + offs_n)[None, :] * kv_stride + offs_d[:, None]
    v_ptrs = V_base + (lo + offs_n)[:, None] * kv_stride + offs_d[None, :]
    step = BLOCK_N * kv_stride
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
        if MASKED:
            valid = col_ok[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + shift)
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
def _kv_range(start_m, Tq, Tk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr):
    """[0, full_end) needs no mask; [full_end, hi) is the diagonal band / Tk tail."""
    n_full = (Tk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        shift = Tk - Tq
        first = start_m * BLOCK_M + shift  # key position of the block's first query
        last = tl.minimum(start_m * BLOCK_M + BLOCK_M, Tq) - 1 + shift
        full_end = tl.minimum((tl.maximum(first + 1, 0) // BLOCK_N) * BLOCK_N, n_full)
        hi = tl.minimum(tl.maximum(last + 1, 0), Tk)
    else:
        full_end = n_full
        hi = Tk
    return full_end, hi


@triton.jit
def _flash_fwd_kernel(Q, K, V, QSEG, KSEG, sm_scale, Tq, Tk, H, KVH,
                      O, LSE,
                      HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
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
    full_end, hi = _kv_range(start_m, Tq, Tk, BLOCK_M, BLOCK_N, CAUSAL)
    # stage 1: unmasked blocks
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, q_seg, offs_m, K_base, V_base, KSEG_base, 0,
                               full_end, Tk, kv_stride, shift, qk_scale, HEAD_DIM, HEAD_PAD,
                               BLOCK_N, False, CAUSAL, HAS_SEG, DOT_PRECISION)
    # stage 2: diagonal band and/or ragged tail, masked
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, q_seg, offs_m, K_base, V_base, KSEG_base,
                               full_end, hi, Tk, kv_stride, shift, qk_scale, HEAD_DIM,
                               HEAD_PAD, BLOCK_N, True, CAUSAL, HAS_SEG, DOT_PRECISION)
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
                  QSEG_base, lo, hi, Tq, q_stride, shift, qk_scale,
                  HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                  MASKED: tl.constexpr, HAS_SEG: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_PAD)
    d_ok = offs_d < HEAD_DIM
    offs_mb = tl.arange(0, BLOCK_M)
    q_ptrs = Q_base + (lo + offs_mb)[:, None] * q_stride + offs_d[None, :]
    do_ptrs = DO_base + (lo + offs_mb)[:, None] * q_stride + offs_d[None, :]
    step = BLOCK_M * q_stride
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_mb
        row_ok = offs_m < Tq
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(do_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        # rows past Tq get lse = +inf, hence P = 0: no other mask needed for them
        lse = tl.load(LSE_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA_base + offs_m, mask=row_ok, other=0.0)
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        pT = tl.math.exp2(qkT - lse[None, :])
        if MASKED:
            pT = tl.where(offs_n[:, None] <= offs_m[None, :] + shift, pT, 0.0)
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
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, QSEG, KSEG, sm_scale, Tq, Tk, H, KVH,
                     DK, DV,
                     HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
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
    q_end = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    if CAUSAL:
        # query i sees key j iff j <= i + shift.  Blocks before `lo` see none of
        # this K block; blocks from `mid` on see all of it.
        lo = (tl.maximum(start_n * BLOCK_N - shift, 0) // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(tl.maximum(start_n * BLOCK_N + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M
        mid = tl.minimum(mid, q_end)
        lo = tl.minimum(lo, mid)
    else:
        lo = 0
        mid = 0

    dk = tl.zeros([BLOCK_N, HEAD_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_PAD], dtype=tl.float32)
    for g in range(0, group):
        off_h = off_kvh * group + g
        q_off = off_b64 * Tq * q_stride + off_h * HEAD_DIM
        row_off = (off_b64 * H + off_h) * Tq
        dk, dv = _bwd_kv_inner(dk, dv, k, v, k_seg, offs_n, Q + q_off, DO + q_off, LSE + row_off,
                               DELTA + row_off, QSEG + off_b64 * Tq, lo, mid, Tq, q_stride,
                               shift, qk_scale, HEAD_DIM, HEAD_PAD, BLOCK_M, True, HAS_SEG,
                               DOT_PRECISION)
        dk, dv = _bwd_kv_inner(dk, dv, k, v, k_seg, offs_n, Q + q_off, DO + q_off, LSE + row_off,
                               DELTA + row_off, QSEG + off_b64 * Tq, mid, q_end, Tq, q_stride,
                               shift, qk_scale, HEAD_DIM, HEAD_PAD, BLOCK_M, False, HAS_SEG,
                               DOT_PRECISION)
    dk = dk * sm_scale
    tl.store(DK + kv_ptrs, dk.to(DK.dtype.element_ty), mask=tile_ok)
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=tile_ok)


@triton.jit
def _bwd_q_inner(dq, q, do, lse, delta, q_seg, offs_m, K_base, V_base, KSEG_base, lo, hi, Tk,
                 kv_stride, shift, qk_scale, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                 BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_SEG: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_PAD)
    d_ok = offs_d < HEAD_DIM
    k_ptrs = K_base + (lo + offs_n)[:, None] * kv_stride + offs_d[None, :]
    v_ptrs = V_base + (lo + offs_n)[:, None] * kv_stride + offs_d[None, :]
    step = BLOCK_N * kv_stride
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
        p = tl.math.exp2(qk - lse[:, None])
        if MASKED:
            valid = col_ok[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + shift)
            p = tl.where(valid, p, 0.0)
        if HAS_SEG:
            k_seg = tl.load(KSEG_base + start_n + offs_n, mask=start_n + offs_n < Tk, other=-2)
            p = tl.where(q_seg[:, None] == k_seg[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        k_ptrs += step
        v_ptrs += step
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, QSEG, KSEG, sm_scale, Tq, Tk, H, KVH,
                   DQ,
                   HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, DOT_PRECISION: tl.constexpr):
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
    full_end, hi = _kv_range(start_m, Tq, Tk, BLOCK_M, BLOCK_N, CAUSAL)
    dq = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    dq = _bwd_q_inner(dq, q, do, lse, delta, q_seg, offs_m, K_base, V_base, KSEG + off_b64 * Tk,
                      0, full_end, Tk, kv_stride, shift, qk_scale, HEAD_DIM, HEAD_PAD, BLOCK_N,
                      False, CAUSAL, HAS_SEG, DOT_PRECISION)
    dq = _bwd_q_inner(dq, q, do, lse, delta, q_seg, offs_m, K_base, V_base, KSEG + off_b64 * Tk,
                      full_end, hi, Tk, kv_stride, shift, qk_scale, HEAD_DIM, HEAD_PAD, BLOCK_N,
                      True, CAUSAL, HAS_SEG, DOT_PRECISION)
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


def _gpu_configs(head_dim: int, kind: str):
    """Autotuning space on GPU, pruned by (effective) head dim to keep shared
    memory and registers within bounds."""
    table = _FWD_CONFIGS if kind == "fwd" else _BWD_CONFIGS
    if head_dim >= 512:
        table = [(bm, bn, w, min(st, 2)) for bm, bn, w, st in table if bm * bn <= 64 * 32]
    elif head_dim >= 256:
        table = [(bm, bn, w, min(st, 2)) for bm, bn, w, st in table if bm * bn <= 64 * 64]
    elif head_dim >= 128 and kind != "fwd":
        table = [c for c in table if c[0] * c[1] <= 64 * 128]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in table]


_AUTOTUNE_KEYS = ["Tq", "Tk", "H", "KVH"]


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str, head_dim: int):
    """Autotuned wrapper; ``head_dim`` is the effective one (see _effective_dim)."""
    kernel = {"fwd": _flash_fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}[kernel_name]
    kind = "fwd" if kernel_name == "fwd" else "bwd"
    return triton.autotune(configs=_gpu_configs(head_dim, kind), key=_AUTOTUNE_KEYS)(kernel)


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


def _seg_operands(cfg: _Cfg, segs):
    if cfg.has_seg:
        return segs
    dummy = jnp.zeros((1,), jnp.int32)
    return dummy, dummy


@functools.lru_cache(maxsize=None)
def _fwd_impl(cfg: _Cfg):
    def fwd(q, k, v, *segs):
        b, tq, h, d = q.shape
        _, tk, kvh, _ = k.shape
        dtype = q.dtype
        # Inputs keep their dtype on both paths (tiles are upcast to fp32 inside
        # tl.dot; bridge patches the interpreter's bf16 dot, see bridge.py).
        cdt = dtype
        q, k, v = (x.astype(cdt) for x in (q, k, v))
        qseg, kseg = _seg_operands(cfg, segs)
        out_shape = [jax.ShapeDtypeStruct(q.shape, cdt),
                     jax.ShapeDtypeStruct((b, h, tq), jnp.float32)]
        consts = dict(HEAD_DIM=d, HEAD_PAD=head_pad(d), CAUSAL=cfg.causal, HAS_SEG=cfg.has_seg,
                      DOT_PRECISION=_dot_precision(cdt))
        blocks = _blocks(cfg, tq, tk, _effective_dim(head_pad(d), cdt), cdt)
        args = (q, k, v, qseg, kseg, cfg.scale, tq, tk, h, kvh)
        if blocks is None:
            o, lse = bridge.triton_call(
                _tuned("fwd", _effective_dim(head_pad(d), cdt)), *args, out_shape=out_shape,
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
def _bwd_impl(cfg: _Cfg):
    def bwd(q, k, v, o, lse, do, *segs):
        b, tq, h, d = q.shape
        _, tk, kvh, _ = k.shape
        cdt = q.dtype  # as in the forward: no change of dtype but q's
        dtypes = (q.dtype, k.dtype, v.dtype)
        q, k, v, o, do = (x.astype(cdt) for x in (q, k, v, o, do))
        qseg, kseg = _seg_operands(cfg, segs)
        consts = dict(HEAD_DIM=d, HEAD_PAD=head_pad(d), CAUSAL=cfg.causal, HAS_SEG=cfg.has_seg,
                      DOT_PRECISION=_dot_precision(cdt))
        blocks = _blocks(cfg, tq, tk, _effective_dim(head_pad(d), cdt), cdt)
        pre_bm = blocks[0] if blocks is not None else 64
        (delta,) = bridge.triton_call(
            _bwd_preprocess, o, do, tq, h,
            out_shape=jax.ShapeDtypeStruct((b, h, tq), jnp.float32),
            grid=(triton.cdiv(tq, pre_bm), b * h), interpret=cfg.interpret,
            HEAD_DIM=d, HEAD_PAD=head_pad(d), BLOCK_M=pre_bm, num_warps=4, num_stages=1)
        args = (q, k, v, do, lse, delta, qseg, kseg, cfg.scale, tq, tk, h, kvh)
        kv_shapes = [jax.ShapeDtypeStruct(k.shape, cdt), jax.ShapeDtypeStruct(v.shape, cdt)]
        q_shape = jax.ShapeDtypeStruct(q.shape, cdt)
        if blocks is None:
            dk, dv = bridge.triton_call(
                _tuned("dkdv", _effective_dim(head_pad(d), cdt)), *args, out_shape=kv_shapes,
                grid=lambda meta: (triton.cdiv(tk, meta["BLOCK_N"]), b * kvh),
                interpret=False, **consts)
            (dq,) = bridge.triton_call(
                _tuned("dq", _effective_dim(head_pad(d), cdt)), *args, out_shape=q_shape,
                grid=lambda meta: (triton.cdiv(tq, meta["BLOCK_M"]), b * h),
                interpret=False, **consts)
        else:
            bm, bn = blocks
            dk, dv = bridge.triton_call(
                _bwd_dkdv_kernel, *args, out_shape=kv_shapes, grid=(triton.cdiv(tk, bn), b * kvh),
                interpret=cfg.interpret, BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=2,
                **consts)
            (dq,) = bridge.triton_call(
                _bwd_dq_kernel, *args, out_shape=q_shape, grid=(triton.cdiv(tq, bm), b * h),
                interpret=cfg.interpret, BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=2,
                **consts)
        return dq.astype(dtypes[0]), dk.astype(dtypes[1]), dv.astype(dtypes[2])

    return fold_vmap(bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Cfg, q, k, v, q_seg, kv_seg):
    segs = (q_seg, kv_seg) if cfg.has_seg else ()
    o, _ = _fwd_impl(cfg)(q, k, v, *segs)
    return o


def _flash_fwd_rule(cfg: _Cfg, q, k, v, q_seg, kv_seg):
    segs = (q_seg, kv_seg) if cfg.has_seg else ()
    o, lse = _fwd_impl(cfg)(q, k, v, *segs)
    return o, (q, k, v, q_seg, kv_seg, o, lse)


def _flash_bwd_rule(cfg: _Cfg, res, do):
    q, k, v, q_seg, kv_seg, o, lse = res
    segs = (q_seg, kv_seg) if cfg.has_seg else ()
    dq, dk, dv = _bwd_impl(cfg)(q, k, v, o, lse, do, *segs)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd_rule, _flash_bwd_rule)


def _make_cfg(q, k, v, causal, segment_ids, softmax_scale, block_sizes, name):
    q_seg, kv_seg, scale = check_attention_args(q, k, v, segment_ids, softmax_scale, name=name)
    if block_sizes is not None:
        bm, bn = (int(x) for x in block_sizes)
        for x in (bm, bn):
            if x < 16 or x & (x - 1):
                raise ValueError(f"{name}: block sizes must be powers of two >= 16, got {block_sizes}.")
        block_sizes = (bm, bn)
    cfg = _Cfg(causal=bool(causal), scale=scale, has_seg=q_seg is not None,
               interpret=bridge.use_interpreter(), block_sizes=block_sizes)
    return cfg, q_seg, kv_seg


def flash_attention(q, k, v, *, causal: bool = False, segment_ids=None, softmax_scale=None,
                    block_sizes=None):
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
      block_sizes: optional ``(BLOCK_M, BLOCK_N)`` override (testing/debugging);
        by default fixed sizes on the interpreter and autotuning on GPU.

    Returns:
      ``[batch, q_len, num_heads, head_dim]`` in q's dtype.
    """
    cfg, q_seg, kv_seg = _make_cfg(q, k, v, causal, segment_ids, softmax_scale, block_sizes,
                                   "flash_attention")
    return _flash(cfg, q, k, v, q_seg, kv_seg)


def flash_attention_fwd(q, k, v, *, causal: bool = False, segment_ids=None, softmax_scale=None,
                        block_sizes=None):
    """Forward only; returns ``(out, lse)`` with ``lse`` the natural-log
    log-sum-exp ``[batch, num_heads, q_len]`` (``+inf`` for empty rows)."""
    cfg, q_seg, kv_seg = _make_cfg(q, k, v, causal, segment_ids, softmax_scale, block_sizes,
                                   "flash_attention_fwd")
    segs = (q_seg, kv_seg) if cfg.has_seg else ()
    o, lse2 = _fwd_impl(cfg)(q, k, v, *segs)
    return o, lse2 / _LOG2E
