"""The GPU path, checked without a GPU: lower for CUDA sm_90 and assemble.

With the jax CUDA plugin and jax-triton installed (the ``test`` extra),
``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`` inside
``bridge.lower_for_gpu(90)`` runs jax-triton's lowering, which compiles every
autotune configuration of every kernel to sm_90 PTX with the installed Triton
(setup.cfg pins the GPU image's 3.6.0).  We capture each compiled kernel,
assemble its PTX with Triton's bundled ptxas (``backend.make_cubin``), and check:

* the custom calls are there (one in the forward; forward, preprocess, dK/dV
  and dQ in the flash gradient; forward and backward for the fused softmax);
* with an attention bias and a sliding window too; the backward computes dBias
  only for a differentiated bias;
* every configuration assembles;
* every one fits an H100's shared memory (227 KiB per block; the compiler
  does not enforce it);
* no fp64 instruction in any PTX.

Before the scalar-typing fix in kernels/bridge.py this failed: jax-triton typed
the Python-float softmax scale as fp64, and Triton 3.6 rejected the flash
forward at lowering (and the fused softmax PTX was full of ``.f64`` ops).

``KERNELS_LOWERING_REPORT=path`` writes the table of configurations
(shared memory, registers) that BUILD_NOTES.md quotes.
"""

from __future__ import annotations

import contextlib
import io
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # about 2 min of CPU: every configuration is compiled

jt_lib = pytest.importorskip("jax_triton.triton_lib", reason="needs jax-triton (the test extra)")

import kernels  # noqa: E402
from kernels import bridge  # noqa: E402
from tests.test_kernels import scalar_probe  # noqa: E402

H100_SHARED_BYTES = 227 * 1024  # max dynamic shared memory per block on sm_90
_CUSTOM_CALL = "stablehlo.custom_call @triton_kernel_call"

# (name, dtype, head_dim, causal, segments, num_heads, num_kv_heads, window, bias).  Chosen
# to cover bf16/fp32, causal or not, GQA, segment ids, several head dims, a sliding window
# and an additive bias with and without a gradient (bias: None, "grad": fp32 [1, H, T, T]
# differentiated, "const": bf16 [B, H, T, T] not differentiated) without compiling the same
# kernel specialisation twice (num_kv_heads = 1 would be specialised by jax-triton as a
# constant: avoided).  bf16 cases compile every autotune configuration; fp32 uses one
# fixed tile on the GPU (kernels/flash.py, _GPU_FP32).
FLASH_CASES = [
    ("bf16-d128-causal-seg-gqa", jnp.bfloat16, 128, True, True, 8, 2, 0, None),
    ("bf16-d64", jnp.bfloat16, 64, False, False, 4, 4, 0, None),
    ("fp32-d64-causal-seg-gqa", jnp.float32, 64, True, True, 4, 2, 0, None),
    ("fp32-d128", jnp.float32, 128, False, False, 4, 4, 0, None),
    ("bf16-d80-causal-gqa", jnp.bfloat16, 80, True, False, 4, 2, 0, None),  # padded to 128
    # the largest tiles with a bias tile on top: every configuration must still fit
    ("bf16-d128-causal-window-biasgrad-gqa", jnp.bfloat16, 128, True, True, 8, 2, 64, "grad"),
    ("bf16-d64-biasconst", jnp.bfloat16, 64, False, False, 4, 4, 0, "const"),
    ("bf16-d256-causal-window-biasgrad-gqa", jnp.bfloat16, 256, True, False, 4, 2, 128, "grad"),
]
# Lowered with one fixed configuration (KERNELS_AUTOTUNE=0) to save compiling: d64's tiles are
# no larger than d128's, whose every configuration is compiled (with and without a bias); d80's padded
# 128-wide tiles are the d128 case's, whose every configuration is compiled above (~40 s);
# the constant bias's kernels differ from the differentiated one's only by BIAS_GRAD; d256
# with a bias has 1 forward and 2 backward configurations, all checked once (BUILD_NOTES.md).
FIXED_CONFIG_CASES = {"bf16-d64", "bf16-d80-causal-gqa", "bf16-d64-biasconst",
                      "bf16-d256-causal-window-biasgrad-gqa"}
FUSED_CASES = [
    ("bf16-d128-causal-seg-gqa", jnp.bfloat16, 128, True, True, 8, 2, 0, None),
    ("fp32-d64", jnp.float32, 64, False, False, 4, 4, 0, None),
    ("bf16-d64-causal-window-biasgrad", jnp.bfloat16, 64, True, False, 4, 2, 32, "grad"),
]
SEQ = 256


class _Recorder:
  """Captures what jax-triton compiles and which kernels each lowering calls."""

  def __init__(self):
    self.compiled = []  # dicts: kernel, warps, stages, shared, ptx, options, backend
    self.called = []    # kernel names, in lowering order
    self.metas = []     # their constexprs (and first operand's dtype), in the same order
    self._meta = {}     # constexprs of the kernel being compiled

  @contextlib.contextmanager
  def install(self, monkeypatch):
    compile_orig = jt_lib.compile_ttir_inplace
    get_orig = jt_lib.get_or_create_triton_kernel

    def compile_ttir_inplace(ttir, backend, options, capability, platform):
      result = compile_orig(ttir, backend, options, capability, platform)
      self.compiled.append(dict(kernel=result.name, warps=options.num_warps,
                                stages=options.num_stages, shared=result.shared_mem_bytes,
                                ptx=result.binary, options=options, backend=backend,
                                capability=capability, meta=self._meta))
      return result

    def get_or_create_triton_kernel(backend_init, platform, fn, *args, **kwargs):
      self.called.append(fn.__name__)
      self._meta = dict(kwargs.get("metaparams", {}), dtype=args[0][0].lstrip("*"))
      self.metas.append(self._meta)
      return get_orig(backend_init, platform, fn, *args, **kwargs)

    monkeypatch.setattr(jt_lib, "compile_ttir_inplace", compile_ttir_inplace)
    monkeypatch.setattr(jt_lib, "get_or_create_triton_kernel", get_or_create_triton_kernel)
    yield self


def _inputs(dtype, d, h, kvh, seg, bias):
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (2, SEQ, h, d), dtype)
  k = jax.random.normal(ks[1], (2, SEQ, kvh, d), dtype)
  v = jax.random.normal(ks[2], (2, SEQ, kvh, d), dtype)
  segs = jnp.asarray(np.repeat(np.arange(SEQ)[None] // 100, 2, 0).astype(np.int32)) if seg else None
  if bias == "grad":
    bias = jax.random.normal(ks[3], (1, h, SEQ, SEQ), jnp.float32)
  elif bias == "const":
    bias = jax.random.normal(ks[3], (2, h, SEQ, SEQ), jnp.bfloat16)
  return q, k, v, segs, bias


def _lower_cuda(f, *args):
  with bridge.lower_for_gpu(90):
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _ptxas(entry):
  """Assemble one PTX with Triton's bundled ptxas; returns the register count."""
  from triton import knobs
  log = io.StringIO()
  saved = knobs.nvidia.dump_ptxas_log
  knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's log
  try:
    with contextlib.redirect_stdout(log):
      cubin = entry["backend"].make_cubin(entry["ptx"], {}, entry["options"], entry["capability"])
  finally:
    knobs.nvidia.dump_ptxas_log = saved
  assert len(cubin) > 0
  regs = re.findall(r"Used (\d+) registers", log.getvalue())
  spills = re.findall(r"(\d+) bytes spill stores", log.getvalue())
  assert regs and spills, log.getvalue()
  return int(regs[-1]), int(spills[-1])


@pytest.fixture(scope="module")
def lowered():
  """Lower every case once (module-scoped: the compiles dominate the runtime)."""
  jt_lib._COMPILED_KERNEL_CACHE.clear()
  rec = _Recorder()
  calls = {}
  with pytest.MonkeyPatch.context() as mp, rec.install(mp):
    for family, attention, cases in (("flash", kernels.flash_attention, FLASH_CASES),
                                     ("fused", kernels.fused_softmax_attention, FUSED_CASES)):
      for name, dtype, d, causal, seg, h, kvh, window, bias_kind in cases:
        q, k, v, segs, bias = _inputs(dtype, d, h, kvh, seg, bias_kind)
        mp.setenv("KERNELS_AUTOTUNE", "0" if name in FIXED_CONFIG_CASES else "1")  # flash only

        def fwd(q, k, v, bias, segs=segs, causal=causal, window=window, attention=attention):
          return attention(q, k, v, causal=causal, segment_ids=segs, window=window, bias=bias)

        def loss(q, k, v, bias, fwd=fwd):
          return jnp.sum(fwd(q, k, v, bias).astype(jnp.float32) ** 2)

        # the bias is an argument of the lowered function either way; "const" is not
        # differentiated, so its backward must not compute dBias
        argnums = (0, 1, 2, 3) if bias_kind == "grad" else (0, 1, 2)
        for kind, f in (("fwd", fwd), ("grad", jax.grad(loss, argnums=argnums))):
          start = len(rec.called)
          text = _lower_cuda(f, q, k, v, bias)
          calls[(family, name, kind)] = (text.count(_CUSTOM_CALL), rec.called[start:],
                                         rec.metas[start:])
  compiled = rec.compiled
  for entry in compiled:  # sequential: make_cubin prints its log to sys.stdout
    entry["registers"], entry["spill_bytes"] = _ptxas(entry)
  report = os.environ.get("KERNELS_LOWERING_REPORT")
  if report:
    with open(report, "w") as f:
      f.write("kernel,dtype,head_dim,causal,segments,bias,bias_grad,window,block_m,block_n,"
              "block_r,warps,stages,shared_bytes,registers,spill_bytes\n")
      for e in compiled:
        m = e["meta"]
        f.write(f"{e['kernel']},{m['dtype']},{m.get('HEAD_DIM', '')},{m.get('CAUSAL', '')},"
                f"{m.get('HAS_SEG', '')},{m.get('HAS_BIAS', '')},{m.get('BIAS_GRAD', '')},"
                f"{m.get('WINDOWED', '')},{m.get('BLOCK_M', '')},{m.get('BLOCK_N', '')},"
                f"{m.get('BLOCK_R', '')},{e['warps']},{e['stages']},{e['shared']},"
                f"{e['registers']},{e['spill_bytes']}\n")
  return calls, compiled


_FLASH_GRAD_KERNELS = ["_flash_fwd_kernel", "_bwd_preprocess", "_bwd_dkdv_kernel",
                       "_bwd_dq_kernel"]


def test_custom_calls_present(lowered):
  calls, _ = lowered
  for (impl, name, kind), (n_calls, kernel_names, _) in calls.items():
    if impl == "flash":
      want = ["_flash_fwd_kernel"] if kind == "fwd" else _FLASH_GRAD_KERNELS
    else:
      want = (["_softmax_fwd_kernel"] if kind == "fwd"
              else ["_softmax_fwd_kernel", "_softmax_bwd_kernel"])
    assert n_calls == len(want), (impl, name, kind, n_calls)
    # one compile request per autotune configuration of each kernel
    assert set(kernel_names) == set(want), (impl, name, kind, kernel_names)


def test_bias_gradient_only_when_differentiated(lowered):
  """The backward writes dBias (BIAS_GRAD) only for a differentiated bias; the window and
  bias reach the kernels as constexpr flags (HAS_BIAS, WINDOWED)."""
  calls, _ = lowered
  seen = set()
  for family, cases in (("flash", FLASH_CASES), ("fused", FUSED_CASES)):
    bwd_kernel = "_bwd_dq_kernel" if family == "flash" else "_softmax_bwd_kernel"
    for name, *_, window, bias_kind in cases:
      _, names, metas = calls[(family, name, "grad")]
      for kernel, meta in zip(names, metas):
        if kernel == bwd_kernel:
          assert meta["BIAS_GRAD"] == (bias_kind == "grad"), (family, name, meta)
          seen.add((family, meta["BIAS_GRAD"]))
        if kernel in ("_flash_fwd_kernel", "_softmax_fwd_kernel"):
          assert meta["HAS_BIAS"] == (bias_kind is not None), (family, name, meta)
          assert meta["WINDOWED"] == (window > 0), (family, name, meta)
  assert seen == {("flash", True), ("flash", False), ("fused", True), ("fused", False)}


def test_every_configuration_assembles_and_fits_h100_shared_memory(lowered):
  _, compiled = lowered
  # every autotune configuration of the flash kernels was compiled (jax-triton
  # compiles all of them at lowering time) and assembled by ptxas (fixture)
  names = {e["kernel"] for e in compiled}
  assert names >= set(_FLASH_GRAD_KERNELS) | {"_softmax_fwd_kernel", "_softmax_bwd_kernel"}
  n_fwd = sum(e["kernel"] == "_flash_fwd_kernel" for e in compiled)
  assert n_fwd >= len(FLASH_CASES) * 2  # several configurations per case
  too_big = [(e["kernel"], e["warps"], e["stages"], e["shared"]) for e in compiled
             if e["shared"] > H100_SHARED_BYTES]
  assert not too_big, too_big
  assert all(0 < e["registers"] <= 255 for e in compiled)


def test_no_fp64_in_any_ptx(lowered):
  _, compiled = lowered
  for e in compiled:
    ops = sorted(set(re.findall(r"\b[a-z][\w.]*\.f64\b", e["ptx"])))
    assert not ops, (e["kernel"], e["warps"], e["stages"], ops[:10])


def test_python_float_scalar_is_fp32_when_lowered_for_cuda(monkeypatch):
  """A Python float reaching the bridge is an fp32 kernel argument on the GPU
  path (jax-triton alone makes it fp64: the static_assert fails on the old
  bridge).  The interpreter half is in tests/test_kernels.py."""
  rec = _Recorder()
  x = jnp.ones((16,), jnp.float32)
  f = lambda x: bridge.triton_call(  # noqa: E731
      scalar_probe, x, 0.1, 3, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32),
      grid=(1,), BLOCK=16)[0]
  jt_lib._COMPILED_KERNEL_CACHE.clear()
  with rec.install(monkeypatch):
    text = _lower_cuda(f, x)
  assert text.count(_CUSTOM_CALL) == 1
  (entry,) = rec.compiled
  _ptxas(entry)
  params = re.search(r"\.entry\s+\w+\((.*?)\)", entry["ptx"], re.S).group(1)
  assert ".param .f32" in params and ".f64" not in params, params
  assert not re.search(r"\.f64\b", entry["ptx"])
