"""Tests for kernels/ (Triton attention callable from JAX).

On CPU every kernel runs in Triton's interpreter (kernels/bridge.py), so the
shapes are tiny.  Outputs of every kernel launch are poisoned with NaN by the
bridge before the kernel runs, so an element a kernel forgets to write shows up
as NaN here.  Run: ``python -m pytest tests/test_kernels.py``.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import triton
import triton.language as tl

import kernels
from kernels import bridge
from kernels.flash import flash_attention_fwd

ON_GPU = jax.default_backend() == "gpu"

# ---------------------------------------------------------------------------
# float64 numpy oracle (forward and analytic backward)
# ---------------------------------------------------------------------------


def _np_mask(tq, tk, causal, q_seg, kv_seg, batch, window=0):
    mask = np.ones((batch, 1, tq, tk), bool)
    q_pos = np.arange(tq)[:, None] + (tk - tq)
    if causal:
        mask &= (np.arange(tk)[None, :] <= q_pos)[None, None]
    if window:
        mask &= (q_pos - np.arange(tk)[None, :] < window)[None, None]
    if q_seg is not None:
        mask &= (np.asarray(q_seg)[:, None, :, None] == np.asarray(kv_seg)[:, None, None, :])
    return mask


def np_attention(q, k, v, do, *, causal, q_seg=None, kv_seg=None, scale=None, bias=None,
                 window=0):
    """Returns (o, dq, dk, dv) in float64 for loss = sum(o * do); with a `bias`
    [1 or b, h, tq, tk] (added after the scale), (o, dq, dk, dv, dbias)."""
    q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
    b, tq, h, d = q.shape
    _, tk, kvh, _ = k.shape
    g = h // kvh
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    kr = np.repeat(k, g, axis=2)  # [b, tk, h, d]; head h reads kv head h // g
    vr = np.repeat(v, g, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    mask = _np_mask(tq, tk, causal, q_seg, kv_seg, b, window)
    s = np.where(mask, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(mask, np.exp(s - m), 0.0)
    den = e.sum(-1, keepdims=True)
    p = e / np.where(den == 0, 1.0, den)
    o = np.einsum("bhqk,bkhd->bqhd", p, vr)
    dp = np.einsum("bqhd,bkhd->bhqk", do, vr)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))  # gradient of scale * q k^T + bias
    dq = np.einsum("bhqk,bkhd->bqhd", ds, kr) * scale
    dkr = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    dvr = np.einsum("bhqk,bqhd->bkhd", p, do)
    dk = dkr.reshape(b, tk, kvh, g, d).sum(3)
    dv = dvr.reshape(b, tk, kvh, g, d).sum(3)
    if bias is None:
        return o, dq, dk, dv
    return o, dq, dk, dv, ds.sum(0, keepdims=True) if np.shape(bias)[0] == 1 else ds


def rel_err(x, ref):
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def make_inputs(seed, b, tq, tk, h, kvh, d, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, tq, h, d), jnp.float32)
    k = jax.random.normal(ks[1], (b, tk, kvh, d), jnp.float32)
    v = jax.random.normal(ks[2], (b, tk, kvh, d), jnp.float32)
    do = jax.random.normal(ks[3], (b, tq, h, d), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), do.astype(dtype)


def make_segments(seed, b, t, pad_tail=0):
    """Random contiguous segments 1..; the last `pad_tail` positions of row 0 get id 0."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    for i in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t), size=min(2, t - 1), replace=False))
        seg[i] = 1 + np.searchsorted(cuts, np.arange(t), side="right")
    if pad_tail:
        seg[0, -pad_tail:] = 0
    return seg


def run_with_grads(fn, q, k, v, do, **kw):
    """(out, (dq, dk, dv)) for loss = sum(out * do), jitted (segment ids are closed over)."""

    def loss(q, k, v):
        o = fn(q, k, v, **kw)
        return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)), o

    @jax.jit
    def run(q, k, v):
        (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return o, grads

    return run(q, k, v)


# (seed, b, tq, tk, h, kvh, d, causal, segments, block_sizes)
#   segments: None | "self" (one array, padded tail) | "pair" (q/kv ids differ:
#   some queries see no key at all)
FLASH_CASES = [
    (0, 2, 37, 37, 4, 2, 32, False, None, (16, 16)),
    (1, 1, 37, 37, 4, 2, 32, True, None, (16, 16)),
    (2, 1, 20, 45, 3, 1, 32, True, None, (16, 16)),     # MQA, q_len < kv_len
    (3, 1, 45, 20, 2, 2, 64, True, None, (16, 32)),     # q_len > kv_len: empty rows
    (4, 2, 33, 33, 2, 1, 64, True, "self", (16, 16)),   # MQA + segments + padding
    (5, 2, 40, 24, 2, 1, 32, False, "pair", (32, 16)),  # cross-attention segments
    (6, 1, 29, 29, 2, 1, 128, True, "self", None),      # default (interpreter) blocks
    (7, 1, 18, 31, 2, 2, 128, False, None, (16, 16)),
    (8, 1, 21, 21, 2, 1, 256, True, None, (16, 16)),
    (9, 1, 17, 23, 1, 1, 256, False, "pair", None),
    (10, 2, 9, 9, 2, 2, 32, True, "self", None),        # shorter than one block
    # head dims that are not powers of two (tiles padded along head_dim; refused before)
    (11, 1, 19, 23, 2, 1, 40, True, None, None),
    (12, 1, 21, 21, 2, 2, 80, False, "self", (16, 16)),
    (13, 1, 17, 17, 2, 1, 96, True, None, None),
    (14, 1, 13, 19, 1, 1, 160, True, "pair", (16, 16)),
]


def _segments_for(case_seg, seed, b, tq, tk):
    if case_seg is None:
        return None, None, None
    if case_seg == "self":
        seg = make_segments(seed, b, tq, pad_tail=3)
        return jnp.asarray(seg), seg, seg
    qs = make_segments(seed, b, tq)
    kvs = make_segments(seed + 100, b, tk)
    qs[0, :4] = 9  # id absent from the kv side: these queries see nothing
    return (jnp.asarray(qs), jnp.asarray(kvs)), qs, kvs


@pytest.mark.parametrize("case", FLASH_CASES, ids=lambda c: "-".join(map(str, c[1:])))
def test_flash_matches_float64_reference(case):
    seed, b, tq, tk, h, kvh, d, causal, seg_kind, blocks = case
    q, k, v, do = make_inputs(seed, b, tq, tk, h, kvh, d)
    segment_ids, qs, kvs = _segments_for(seg_kind, seed, b, tq, tk)
    o, (dq, dk, dv) = run_with_grads(kernels.flash_attention, q, k, v, do, causal=causal,
                                     segment_ids=segment_ids, block_sizes=blocks)
    ro, rdq, rdk, rdv = np_attention(q, k, v, do, causal=causal, q_seg=qs, kv_seg=kvs)
    assert o.shape == q.shape and o.dtype == q.dtype
    for name, x, ref in (("out", o, ro), ("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        assert np.isfinite(np.asarray(x)).all(), f"{name} has NaN/inf (unwritten element?)"
        assert rel_err(x, ref) < 1e-5, (name, rel_err(x, ref))
    # queries that see no key: exact zeros, zero gradient
    empty = ~_np_mask(tq, tk, causal, qs, kvs, b).any(-1)[:, 0]  # [b, tq]
    if empty.any():
        assert np.all(np.asarray(o)[empty] == 0.0)
        assert np.all(np.asarray(dq)[empty] == 0.0)


FUSED_CASES = [
    (20, 2, 37, 37, 4, 2, 32, True, "self"),
    (21, 1, 20, 45, 2, 1, 64, True, None),
    (22, 1, 45, 20, 2, 2, 128, True, None),
    (23, 2, 24, 30, 2, 1, 256, False, "pair"),
    # head dims that are not powers of two (refused before)
    (24, 1, 11, 13, 2, 1, 40, True, None),
    (25, 1, 12, 12, 2, 2, 80, True, "self"),
    (26, 1, 9, 14, 2, 1, 96, False, None),
    (27, 1, 10, 10, 1, 1, 160, True, None),
]


@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "-".join(map(str, c[1:])))
def test_fused_softmax_matches_float64_reference(case):
    seed, b, tq, tk, h, kvh, d, causal, seg_kind = case
    q, k, v, do = make_inputs(seed, b, tq, tk, h, kvh, d)
    segment_ids, qs, kvs = _segments_for(seg_kind, seed, b, tq, tk)
    o, grads = run_with_grads(kernels.fused_softmax_attention, q, k, v, do, causal=causal,
                              segment_ids=segment_ids)
    refs = np_attention(q, k, v, do, causal=causal, q_seg=qs, kv_seg=kvs)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), (o,) + tuple(grads), refs):
        assert np.isfinite(np.asarray(x)).all(), name
        assert rel_err(x, ref) < 1e-5, (name, rel_err(x, ref))


def test_reference_matches_float64_reference():
    q, k, v, do = make_inputs(30, 2, 19, 23, 4, 2, 32)
    seg = (jnp.asarray(make_segments(1, 2, 19)), jnp.asarray(make_segments(2, 2, 23)))
    o, grads = run_with_grads(kernels.reference_attention, q, k, v, do, causal=True,
                              segment_ids=seg)
    refs = np_attention(q, k, v, do, causal=True, q_seg=np.asarray(seg[0]),
                        kv_seg=np.asarray(seg[1]))
    for x, ref in zip((o,) + tuple(grads), refs):
        assert rel_err(x, ref) < 1e-5


# ---------------------------------------------------------------------------
# additive bias (T5's relative position bias) and sliding window (issues 15, 18)
# ---------------------------------------------------------------------------


def make_bias(seed, bias_batch, h, tq, tk):
    return 2.0 * jax.random.normal(jax.random.key(seed), (bias_batch, h, tq, tk), jnp.float32)


def run_with_bias_grads(fn, q, k, v, bias, do, **kw):
    """(out, (dq, dk, dv, dbias)) for loss = sum(out * do), jitted."""

    def loss(q, k, v, bias):
        o = fn(q, k, v, bias=bias, **kw)
        return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)), o

    @jax.jit
    def run(q, k, v, bias):
        (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, bias)
        return o, grads

    return run(q, k, v, bias)


# (seed, b, tq, tk, h, kvh, d, causal, window, bias_batch, segments, block_sizes): every case
# with odd lengths and GQA/MQA; bias_batch 0 = no bias.
BIAS_WINDOW_CASES = [
    (200, 2, 37, 37, 4, 2, 32, True, 13, 2, "self", (16, 16)),   # window across blocks
    (201, 2, 29, 45, 2, 1, 40, True, 20, 1, "pair", (16, 16)),   # q_len < kv_len, batch-1 bias
    (202, 1, 45, 20, 2, 2, 24, True, 7, 1, None, (16, 32)),      # q_len > kv_len: empty rows
    (203, 1, 70, 70, 2, 1, 16, True, 35, 0, "self", (16, 16)),   # unmasked blocks inside it
    (204, 2, 24, 30, 2, 1, 32, False, 0, 2, "pair", None),       # bias alone, not causal
]


def _bias_window_case(case):
    seed, b, tq, tk, h, kvh, d, causal, window, bias_batch, seg_kind, blocks = case
    q, k, v, do = make_inputs(seed, b, tq, tk, h, kvh, d)
    segment_ids, qs, kvs = _segments_for(seg_kind, seed, b, tq, tk)
    bias = make_bias(seed, bias_batch, h, tq, tk) if bias_batch else None
    refs = np_attention(q, k, v, do, causal=causal, q_seg=qs, kv_seg=kvs, bias=bias,
                        window=window)
    kw = dict(causal=causal, segment_ids=segment_ids, window=window)
    return q, k, v, do, bias, kw, refs, blocks


def _check_against(got, refs, tol=1e-5):
    for name, x, ref in zip(("out", "dq", "dk", "dv", "dbias"), got, refs):
        assert np.shape(x) == np.shape(ref), (name, np.shape(x), np.shape(ref))
        assert np.isfinite(np.asarray(x)).all(), f"{name} has NaN/inf (unwritten element?)"
        assert rel_err(x, ref) < tol, (name, rel_err(x, ref))


@pytest.mark.parametrize("impl", ["flash", "fused_softmax"])
@pytest.mark.parametrize("case", BIAS_WINDOW_CASES, ids=lambda c: "-".join(map(str, c[1:])))
def test_bias_and_window_match_float64_reference(case, impl):
    """Output and dq, dk, dv, dbias against the float64 oracle, with bias, window, segment
    ids, GQA and odd lengths together.  (The kernels took neither bias nor window before:
    TypeError on the old code.  Checked to fail with the bias added without log2(e) in the
    base-2 kernels (error 0.17), and without dBias's zero fill left of the window (NaN).)"""
    q, k, v, do, bias, kw, refs, blocks = _bias_window_case(case)
    if impl == "flash":
        fn = functools.partial(kernels.flash_attention, block_sizes=blocks)
    else:
        fn = kernels.fused_softmax_attention
    if bias is None:
        o, grads = run_with_grads(fn, q, k, v, do, **kw)
    else:
        o, grads = run_with_bias_grads(fn, q, k, v, bias, do, **kw)
    _check_against((o,) + tuple(grads), refs)


def test_xla_attention_bias_and_window_match_float64_reference():
    """lm.attention.xla_attention (the model's reference path) against the same oracle."""
    from lm.attention import xla_attention
    q, k, v, do, bias, kw, refs, _ = _bias_window_case(BIAS_WINDOW_CASES[1])
    o, grads = run_with_bias_grads(xla_attention, q, k, v, bias, do, **kw)
    _check_against((o,) + tuple(grads), refs)
    got = kernels.reference_attention(q, k, v, bias=bias, **kw)
    assert rel_err(got, refs[0]) < 1e-5


@pytest.mark.parametrize("impl", ["flash", "fused_softmax"])
def test_bias_without_gradient(impl, monkeypatch):
    """A bias that needs no gradient (stop_gradient) gives the right dq, dk, dv, zero
    dbias, and the backward kernels are asked for no dBias (symbolic zeros); a
    differentiated bias is.  (Fails on the old code: no bias argument.)"""
    from kernels import flash, softmax
    module = flash if impl == "flash" else softmax
    fn = kernels.flash_attention if impl == "flash" else kernels.fused_softmax_attention
    asked = []
    original = module._bwd_impl
    monkeypatch.setattr(module, "_bwd_impl",
                        lambda cfg, bias_grad: asked.append(bias_grad) or original(cfg, bias_grad))
    q, k, v, do = make_inputs(210, 1, 21, 21, 2, 1, 32)
    bias = make_bias(210, 1, 2, 21, 21)
    refs = np_attention(q, k, v, do, causal=True, bias=bias, window=9)
    frozen = lambda q, k, v, bias, **kw: fn(q, k, v, bias=jax.lax.stop_gradient(bias), **kw)  # noqa: E731
    o, grads = run_with_bias_grads(frozen, q, k, v, bias, do, causal=True, window=9)
    _check_against((o,) + tuple(grads[:3]), refs[:4])
    assert np.all(np.asarray(grads[3]) == 0.0)
    assert asked == [False]
    run_with_bias_grads(fn, q, k, v, bias, do, causal=True, window=9)
    assert asked == [False, True]


@pytest.mark.parametrize("fn", [kernels.flash_attention, kernels.fused_softmax_attention],
                         ids=["flash", "fused_softmax"])
def test_bias_under_vmap_and_remat(fn):
    """vmap folds the mapped axis into the kernels' batch: a batch-1 bias shared by the
    mapped rows must then serve its own rows only (bias row = batch row // (batch // bias
    batch)), and its gradient sums over them.  Also under jax.checkpoint.  (Fails on the old
    code: no bias.)"""
    q, k, v, _ = make_inputs(220, 2, 16, 16, 2, 1, 16)
    ref = kernels.reference_attention
    qv = jnp.stack([q, -0.5 * q])
    bias = make_bias(221, 1, 2, 16, 16)

    def grads(f, wrap):
        g = jax.vmap(lambda q, b: f(q, k, v, bias=b, causal=True, window=6), in_axes=(0, None))
        return jax.jit(jax.grad(wrap(lambda q, b: jnp.sum(g(q, b) ** 2)), argnums=(0, 1)))(qv, bias)

    want = grads(ref, lambda f: f)
    for x, y in zip(grads(fn, jax.checkpoint), want):
        assert rel_err(x, y) < 1e-5


def test_bias_gradient_is_deterministic():
    """dBias is written by exactly one program per element (no atomics): bit-identical runs."""
    q, k, v, do = make_inputs(230, 2, 33, 33, 2, 1, 32)
    bias = make_bias(230, 1, 2, 33, 33)
    f = jax.jit(lambda q, k, v, bias: run_with_bias_grads(
        kernels.flash_attention, q, k, v, bias, do, causal=True, window=12, block_sizes=(16, 16)))
    a, b_ = jax.device_get(f(q, k, v, bias)), jax.device_get(f(q, k, v, bias))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b_)):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def _tiles_with_a_visible_key(t, window, block_m, block_n):
    """(query block, key block) tiles that hold at least one visible pair, from the mask."""
    mask = _np_mask(t, t, True, None, None, 1, window)[0, 0]
    tiles = mask.reshape(t // block_m, block_m, t // block_n, block_n).any(axis=(1, 3))
    return int(tiles.sum())


def test_window_skips_key_blocks(monkeypatch):
    """T=1024, W=128, 64x64 tiles: the forward and both backward kernels visit exactly the
    tiles that hold a visible (query, key) pair -- 45 of the 136 a full causal pass visits,
    so the cost grows as T*W, not T^2.  Counted as tl.dot calls in the interpreter (forward:
    2 per visited tile; dK/dV: 4; dQ: 3).  Checked to fail when the kernels' loop bounds
    ignore the window (the mask alone keeps results right but visits 136 tiles)."""
    t, window, bm, bn = 1024, 128, 64, 64
    dots = {}
    launch = []
    original_dot, original_run = bridge._fast_create_dot, bridge._run_interpreted

    def counting_dot(*args, **kwargs):
        dots[launch[-1]] = dots.get(launch[-1], 0) + 1
        return original_dot(*args, **kwargs)

    def run(kernel, *args):
        launch.append(bridge._python_fn(kernel).__name__)
        return original_run(kernel, *args)

    monkeypatch.setattr(bridge, "_fast_create_dot", counting_dot)
    monkeypatch.setattr(bridge, "_run_interpreted", run)
    q, k, v, do = make_inputs(240, 1, t, t, 1, 1, 16)
    o, vjp = jax.vjp(lambda q, k, v: kernels.flash_attention(
        q, k, v, causal=True, window=window, block_sizes=(bm, bn)), q, k, v)
    grads = vjp(do)
    visited = {"fwd": dots["_flash_fwd_kernel"] / 2, "dkdv": dots["_bwd_dkdv_kernel"] / 4,
               "dq": dots["_bwd_dq_kernel"] / 3}
    want = _tiles_with_a_visible_key(t, window, bm, bn)
    full = _tiles_with_a_visible_key(t, 0, bm, bn)
    print(f"\nT={t} W={window} tiles {bm}x{bn}: visited {visited}; with a visible pair: {want}; "
          f"full causal: {full}; all: {(t // bm) * (t // bn)}")
    assert (want, full) == (45, 136)
    assert visited == {"fwd": want, "dkdv": want, "dq": want}
    ref = kernels.reference_attention(q, k, v, causal=True, window=window)
    assert rel_err(o, ref) < 1e-5
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_attention_entry_point_passes_bias_and_window_to_the_kernels():
    """lm.attention.attention(impl=triton|triton_softmax) with a window and a bias equals
    the XLA path (it raised NotImplementedError before)."""
    from lm.attention import attention
    q, k, v, _ = make_inputs(250, 2, 19, 19, 2, 1, 16)
    bias = make_bias(250, 1, 2, 19, 19)
    seg = jnp.asarray(make_segments(250, 2, 19))
    want = attention(q, k, v, impl="xla", causal=True, segment_ids=seg, window=5, bias=bias)
    for impl in ("triton", "triton_softmax"):
        got = attention(q, k, v, impl=impl, causal=True, segment_ids=seg, window=5, bias=bias)
        assert rel_err(got, want) < 1e-5, impl


def test_attention_entry_point_scale_matches_the_oracle():
    """attention(scale=...) (T5 scores are unscaled) on every CPU path equals the float64
    oracle with that scale, not with 1/sqrt(d) (the old entry point had no scale)."""
    from lm.attention import attention
    q, k, v, do = make_inputs(251, 1, 13, 13, 2, 2, 16)
    bias = make_bias(251, 1, 2, 13, 13)
    want = np_attention(q, k, v, do, causal=False, scale=1.0, bias=bias)[0]
    for impl in ("xla", "triton", "triton_softmax"):
        got = attention(q, k, v, impl=impl, causal=False, bias=bias, scale=1.0)
        assert rel_err(got, want) < 1e-5, impl


def test_padding_rows_give_zero_output_and_zero_gradients():
    b, t, h, d = 2, 24, 2, 32
    q, k, v, do = make_inputs(40, b, t, t, h, 1, d)
    qs = np.ones((b, t), np.int32)
    qs[1, -7:] = 0  # padding queries: no key has segment id 0
    kvs = np.ones((b, t), np.int32)
    kvs[1, -7:] = 5  # padding keys nobody attends to
    for fn in (kernels.flash_attention, kernels.fused_softmax_attention):
        o, (dq, dk, dv) = run_with_grads(fn, q, k, v, do, causal=True,
                                         segment_ids=(jnp.asarray(qs), jnp.asarray(kvs)))
        assert np.all(np.asarray(o)[1, -7:] == 0.0)
        assert np.all(np.asarray(dq)[1, -7:] == 0.0)
        assert np.all(np.asarray(dk)[1, -7:] == 0.0)
        assert np.all(np.asarray(dv)[1, -7:] == 0.0)
        assert np.isfinite(np.asarray(o)).all()


def test_with_interpreter_overflow_sanitizer(monkeypatch):
    """One case with the interpreter's int32 overflow checks on (off by default for speed)."""
    monkeypatch.setattr(bridge, "INTERPRETER_SANITIZE_OVERFLOW", True)
    q, k, v, do = make_inputs(55, 1, 21, 27, 2, 1, 32)
    seg = (jnp.asarray(make_segments(6, 1, 21)), jnp.asarray(make_segments(7, 1, 27)))
    o, grads = run_with_grads(kernels.flash_attention, q, k, v, do, causal=True, segment_ids=seg,
                              block_sizes=(16, 16))
    refs = np_attention(q, k, v, do, causal=True, q_seg=np.asarray(seg[0]),
                        kv_seg=np.asarray(seg[1]))
    for x, ref in zip((o,) + tuple(grads), refs):
        assert rel_err(x, ref) < 1e-5


def test_backward_is_deterministic():
    q, k, v, do = make_inputs(50, 1, 33, 33, 4, 2, 32)
    seg = jnp.asarray(make_segments(3, 1, 33))
    f = jax.jit(lambda q, k, v: run_with_grads(kernels.flash_attention, q, k, v, do, causal=True,
                                               segment_ids=seg, block_sizes=(16, 16)))
    a = jax.device_get(f(q, k, v))
    b_ = jax.device_get(f(q, k, v))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b_)):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_softmax_scale_and_lse():
    q, k, v, do = make_inputs(60, 1, 20, 20, 2, 2, 64)
    o, (dq, dk, dv) = run_with_grads(kernels.flash_attention, q, k, v, do, causal=True,
                                     softmax_scale=0.3)
    refs = np_attention(q, k, v, do, causal=True, scale=0.3)
    for x, ref in zip((o, dq, dk, dv), refs):
        assert rel_err(x, ref) < 1e-5
    o2, lse = flash_attention_fwd(q, k, v, causal=True, softmax_scale=0.3)
    s = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64)) * 0.3
    s = np.where(np.tril(np.ones((20, 20), bool)), s, -np.inf)
    ref_lse = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
    assert rel_err(lse, ref_lse) < 1e-6
    assert np.array_equal(np.asarray(o2), np.asarray(o))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs(dtype):
    q, k, v, do = make_inputs(70, 1, 24, 24, 2, 1, 64, dtype)
    ro, *rgrads = np_attention(q, k, v, do, causal=True)
    tol = 2e-2 if dtype == jnp.bfloat16 else 3e-3
    for fn in (kernels.flash_attention, kernels.fused_softmax_attention):
        o, grads = run_with_grads(fn, q, k, v, do, causal=True)
        assert o.dtype == dtype and all(g.dtype == dtype for g in grads)
        assert rel_err(o, ro) < tol
        for g, rg in zip(grads, rgrads):
            assert rel_err(g, rg) < 2 * tol


@pytest.mark.parametrize("fn", [kernels.flash_attention, kernels.fused_softmax_attention],
                         ids=["flash", "fused_softmax"])
def test_jit_grad_remat_vmap(fn):
    q, k, v, do = make_inputs(80, 1, 20, 20, 2, 1, 32)
    seg = jnp.asarray(make_segments(4, 1, 20, pad_tail=2))
    ref = kernels.reference_attention

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v, causal=True, segment_ids=seg) * do)

    want = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
    got = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(q, k, v)
    for x, y in zip(got, want):
        assert rel_err(x, y) < 1e-5
    got = jax.jit(jax.grad(jax.checkpoint(loss(fn)), argnums=(0, 1, 2)))(q, k, v)
    for x, y in zip(got, want):
        assert rel_err(x, y) < 1e-5
    # vmap over a leading axis (k/v shared across it), and grad of vmap
    qv = jnp.stack([q, -q])
    got = jax.jit(jax.vmap(lambda q: fn(q, k, v, causal=True, segment_ids=seg)))(qv)
    want_v = jax.jit(jax.vmap(lambda q: ref(q, k, v, causal=True, segment_ids=seg)))(qv)
    assert rel_err(got, want_v) < 1e-5
    g = jax.jit(jax.grad(lambda qv: jnp.sum(jax.vmap(lambda q: fn(q, k, v, causal=True))(qv) ** 2)))(qv)
    gr = jax.jit(jax.grad(lambda qv: jnp.sum(jax.vmap(lambda q: ref(q, k, v, causal=True))(qv) ** 2)))(qv)
    assert rel_err(g, gr) < 1e-5


@pytest.mark.parametrize("fn", [kernels.flash_attention, kernels.fused_softmax_attention],
                         ids=["flash", "fused_softmax"])
def test_bad_arguments_raise_value_error(fn):
    q = jnp.zeros((1, 8, 2, 32))
    k = jnp.zeros((1, 8, 1, 32))
    for d in (44, 264):  # not a multiple of 8; above 256
        with pytest.raises(ValueError, match=f"head_dim {d} is not supported"):
            fn(jnp.zeros((1, 8, 2, d)), jnp.zeros((1, 8, 1, d)), jnp.zeros((1, 8, 1, d)))
    with pytest.raises(ValueError, match="dtype"):
        fn(q.astype(jnp.int32), k.astype(jnp.int32), k.astype(jnp.int32))
    with pytest.raises(ValueError, match="share one dtype"):
        fn(q, k.astype(jnp.bfloat16), k)
    with pytest.raises(ValueError, match=r"q must have shape \[batch"):
        fn(q[0], k, k)
    with pytest.raises(ValueError, match="batch"):
        fn(jnp.zeros((2, 8, 2, 32)), k, k)
    with pytest.raises(ValueError, match="num_kv_heads 2 must divide num_heads 3"):
        fn(jnp.zeros((1, 8, 3, 32)), jnp.zeros((1, 8, 2, 32)), jnp.zeros((1, 8, 2, 32)))
    with pytest.raises(ValueError, match="same shape"):
        fn(q, k, jnp.zeros((1, 9, 1, 32)))
    with pytest.raises(ValueError, match="q_segment_ids must have shape"):
        fn(q, k, k, segment_ids=jnp.zeros((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="integers"):
        fn(q, k, k, segment_ids=jnp.zeros((1, 8), jnp.float32))
    with pytest.raises(ValueError, match="q_len == kv_len"):
        fn(q, jnp.zeros((1, 9, 1, 32)), jnp.zeros((1, 9, 1, 32)),
           segment_ids=jnp.zeros((1, 8), jnp.int32))
    with pytest.raises(ValueError, match=r"bias must have shape \[1 or 1, 2, 8, 8\]"):
        fn(q, k, k, bias=jnp.zeros((1, 1, 8, 8)))  # one head for two
    with pytest.raises(ValueError, match="bias has dtype int32"):
        fn(q, k, k, bias=jnp.zeros((1, 2, 8, 8), jnp.int32))
    for window, causal in ((4, False), (-1, True)):
        with pytest.raises(ValueError, match=f"window={window}: expected 0"):
            fn(q, k, k, causal=causal, window=window)
    with pytest.raises(ValueError, match="window must be a Python int"):
        fn(q, k, k, causal=True, window=2.5)


def test_bridge_poisons_outputs():
    """An element a kernel does not write must come back as NaN (not zero)."""

    @triton.jit
    def half_copy(X, n, O, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(O + offs, tl.load(X + offs), mask=offs < n)

    x = jnp.arange(8, dtype=jnp.float32)
    (o,) = bridge.triton_call(half_copy, x, 4, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32),
                              grid=(1,), interpret=True, BLOCK=8)
    o = np.asarray(o)
    assert np.array_equal(o[:4], np.arange(4)) and np.isnan(o[4:]).all()


@triton.jit
def scalar_probe(X, s, n, O, BLOCK: tl.constexpr):
    """Checks the types of its scalar arguments: at compile time on the GPU path
    (tests/test_gpu_lowering.py), at run time in the interpreter."""
    tl.static_assert(s.dtype == tl.float32)
    tl.static_assert(n.dtype == tl.int32)
    offs = tl.arange(0, BLOCK)
    tl.store(O + offs, tl.load(X + offs) * s + n)


def test_python_float_scalar_is_fp32_in_the_interpreter():
    """A Python float / int reaching the bridge is an fp32 / int32 kernel argument,
    as on the GPU path (before, the interpreter kept a Python float, which has no
    dtype: the static_assert failed on the old bridge)."""
    x = jnp.arange(16, dtype=jnp.float32)
    (o,) = bridge.triton_call(scalar_probe, x, 0.1, 3,
                              out_shape=jax.ShapeDtypeStruct((16,), jnp.float32), grid=(1,),
                              interpret=True, BLOCK=16)
    want = np.arange(16, dtype=np.float32) * np.float32(0.1) + np.float32(3)
    assert np.array_equal(np.asarray(o), want)
    assert bridge.typed_scalar(0.1).dtype == np.float32
    assert bridge.typed_scalar(7).dtype == np.int32
    with pytest.raises(ValueError, match="int32"):
        bridge.typed_scalar(2**31)
    with pytest.raises(TypeError, match="float64"):
        bridge.typed_scalar(np.float64(0.5))


def test_interpreter_leaves_triton_language_untouched():
    """Interpreted launches must not leak patches into triton.language (GPU
    compilation in the same process relies on it)."""
    from triton.runtime.jit import JITFunction
    before = (tl.core.load, tl.load, tl.core.tensor.__add__, tl.max, tl.standard.sum)
    q, k, v, _ = make_inputs(90, 1, 8, 8, 1, 1, 32)
    kernels.flash_attention(q, k, v).block_until_ready()
    after = (tl.core.load, tl.load, tl.core.tensor.__add__, tl.max, tl.standard.sum)
    assert all(a is b for a, b in zip(before, after))
    assert isinstance(tl.max, JITFunction)


def test_torch_never_imported():
    assert "torch" not in sys.modules


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (jax.default_backend() != 'gpu')")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_bf16_matches_reference(d, causal):
    """Compiled through jax-triton (XLA custom call); bf16 vs the fp32 oracle."""
    b, t, h, kvh = 2, 300, 8, 2
    q, k, v, do = make_inputs(100 + d, b, t, t, h, kvh, d, jnp.bfloat16)
    seg = jnp.asarray(make_segments(5, b, t, pad_tail=9))
    ref = lambda *a, **kw: kernels.reference_attention(  # noqa: E731
        *(x.astype(jnp.float32) for x in a), **kw)
    ro, rgrads = run_with_grads(ref, q, k, v, do, causal=causal, segment_ids=seg)
    for fn in (kernels.flash_attention, kernels.fused_softmax_attention):
        o, grads = jax.jit(lambda q, k, v: run_with_grads(fn, q, k, v, do, causal=causal,
                                                          segment_ids=seg))(q, k, v)
        assert rel_err(o, ro) < 1e-2
        for g, rg in zip(grads, rgrads):
            assert rel_err(g, rg) < 2e-2


_SHARD_MAP_SCRIPT = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
import kernels
mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
q = jax.random.normal(jax.random.key(0), (4, 20, 2, 32))
kv = jax.random.normal(jax.random.key(1), (4, 20, 1, 32))
seg = jnp.asarray(np.repeat([[1] * 12 + [2] * 8], 4, 0).astype(np.int32))
ref = lambda q, kv: kernels.reference_attention(q, kv, kv, causal=True, segment_ids=seg)
want = jax.grad(lambda q, kv: jnp.sum(ref(q, kv) ** 2), argnums=(0, 1))(q, kv)
for fn in (kernels.flash_attention, kernels.fused_softmax_attention):
    sm = jax.shard_map(lambda q, kv, s: fn(q, kv, kv, causal=True, segment_ids=s), mesh=mesh,
                       in_specs=(P("data"), P("data"), P("data")), out_specs=P("data"))
    got = jax.jit(jax.grad(lambda q, kv: jnp.sum(sm(q, kv, seg) ** 2), argnums=(0, 1)))(q, kv)
    for g, w in zip(got, want):
        err = float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w))
        assert err < 1e-5, (fn.__name__, err)
# lm.sharding.shard_heads with a batch-1 bias (whole on every device; its gradient summed over
# the batch shards) and with a full-batch one (split like q), under a batch and a heads mesh
from lm import sharding
from lm.attention import attention
kv2 = jnp.concatenate([kv, -kv], axis=2)
for bias_batch in (1, 4):
    bias = jax.random.normal(jax.random.key(2), (bias_batch, 2, 20, 20))
    loss = lambda impl: lambda q, kv, b: jnp.sum(attention(
        q, kv, kv, impl=impl, causal=True, window=7, bias=b, segment_ids=seg) ** 2)
    want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, kv2, bias)
    for sizes in ((2, 1, 1), (1, 1, 2)):
        mesh = jax.make_mesh(sizes, sharding.MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * 3)
        with jax.set_mesh(mesh):
            got = jax.jit(jax.grad(loss("triton"), argnums=(0, 1, 2)))(q, kv2, bias)
        for g, w in zip(got, want):
            err = float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w))
            assert err < 1e-5, (bias_batch, sizes, err)
print("OK")
"""


@pytest.mark.slow
def test_inside_shard_map_on_two_cpu_devices():
    """Per-device shards under shard_map, with gradients (fresh process: needs 2 CPU devices);
    shard_heads with a bias (batch 1 or full) and a window, split over batch or heads."""
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", _SHARD_MAP_SCRIPT], env=env, cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
