"""Call a ``@triton.jit`` kernel from JAX, on GPU or on CPU.

One entry point, :func:`triton_call`:

* GPU backend: an XLA custom call built by ``jax_triton.triton_call``
  (imported lazily, only here; installed by the ``gpu`` extra).
* any other backend (CPU): the *same kernel source* executed by Triton's
  interpreter inside ``jax.pure_callback`` over numpy buffers.  The
  interpreter expects torch-like tensors (``data_ptr``, ``untyped_storage``,
  ``new_empty``, ``set_``, ``copy_``...); :class:`_NumpyTensor` provides that
  protocol on top of numpy, so torch is never imported.

The interpreter is selected per call (no ``TRITON_INTERPRET`` needed before
import): we build a ``triton.runtime.interpreter.InterpretedFunction`` from the
kernel's Python function, with a private copy of its globals in which the
``@triton.jit`` helpers it calls are interpreted as well.  The module's
``JITFunction`` objects are untouched, so GPU compilation and interpretation
can coexist in one process.

Calling convention (same on both paths, mirrors jax-triton): the kernel's
parameters are, in order, the positional ``args`` (arrays become pointers,
Python scalars become scalar arguments), then one pointer per output in
``out_shape``, then the ``constexpr`` keyword arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.abc
import inspect
import os
import sys
import threading
import types
from typing import Any, Callable, Sequence

import jax
import numpy as np

__all__ = ["triton_call", "on_gpu", "use_interpreter", "lower_for_gpu", "typed_scalar"]

# Triton's interpreter checks every int32 add/sub/mul for overflow by default
# (a debugging aid that is off in compiled kernels unless debug=True).  It
# roughly doubles interpreter time for our kernels, so it is off unless this
# flag (or the env var KERNELS_INTERPRET_SANITIZE_OVERFLOW=1) turns it on.
INTERPRETER_SANITIZE_OVERFLOW = os.environ.get("KERNELS_INTERPRET_SANITIZE_OVERFLOW", "0") == "1"


# Set by lower_for_gpu(): the GPU branch is taken without a GPU, so that a
# function can be lowered for CUDA on a CPU-only machine (tests, CI).
_FORCED_GPU: dict | None = None


def on_gpu() -> bool:
    """True when JAX's default backend is a GPU (CUDA or ROCm), or inside
    :func:`lower_for_gpu`."""
    return _FORCED_GPU is not None or jax.default_backend() in ("gpu", "cuda", "rocm")


def use_interpreter() -> bool:
    """True when kernels run in Triton's interpreter (every non-GPU backend)."""
    return not on_gpu()


@contextlib.contextmanager
def lower_for_gpu(compute_capability: int = 90):
    """Take the GPU (jax-triton) branch while tracing, whatever the backend.

    For lowering only, e.g. on a machine without a GPU::

      with bridge.lower_for_gpu(90):
        lowered = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))

    ``compute_capability`` is passed to ``jax_triton.triton_call`` (without it
    jax-triton asks device 0 for its capability, which fails without a GPU).
    Needs jax-triton and the jax CUDA plugin (the ``test`` extra installs both).
    Kernel configurations are decided when a function is traced, so trace
    inside the context.  Not thread-safe (a module-level switch).
    """
    global _FORCED_GPU
    saved = _FORCED_GPU
    _FORCED_GPU = {"compute_capability": int(compute_capability)}
    try:
        yield
    finally:
        _FORCED_GPU = saved


# --------------------------------------------------------------------------
# scalar arguments: one explicit dtype each, the same on both paths
# --------------------------------------------------------------------------

# What a scalar kernel argument may be, and the Triton type it has in the
# kernel.  jax-triton alone would type a Python float as fp64 (the interpreter
# as fp32), so every scalar is converted here, before either path sees it.
_SCALAR_TRITON_TYPES = {np.dtype(np.float32): "fp32", np.dtype(np.int32): "i32",
                        np.dtype(np.bool_): "i1"}


def typed_scalar(value) -> np.generic:
    """The scalar kernel argument ``value`` as a NumPy scalar of one explicit dtype.

    Python ``float`` -> ``np.float32``; Python ``int`` -> ``np.int32`` (values
    outside int32 raise ValueError: pass such quantities as arrays); Python
    ``bool`` -> ``np.bool_``.  ``np.float32``, ``np.int32`` and ``np.bool_``
    are kept.  Anything else (``np.float64``, ``np.int64``...) raises
    TypeError, so a kernel never receives a type it was not written for.
    The kernel sees fp32, i32 or i1 respectively, compiled or interpreted.
    """
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if isinstance(value, int) and not isinstance(value, np.generic):
        if not -2**31 <= value < 2**31:
            raise ValueError(f"scalar kernel argument {value} does not fit in int32.")
        return np.int32(value)
    if isinstance(value, float) and not isinstance(value, np.generic):
        return np.float32(value)
    if isinstance(value, np.generic) and value.dtype in _SCALAR_TRITON_TYPES:
        return value
    raise TypeError(
        f"scalar kernel argument {value!r} of type {type(value).__name__}: use a Python "
        f"float/int/bool or np.float32/np.int32/np.bool_.")


def _gpu_scalar(value: np.generic):
    """What jax-triton types as our dtype: Python int in int32 range -> i32,
    np.float32 -> fp32, bool -> i1."""
    if value.dtype == np.bool_:
        return bool(value)
    if value.dtype == np.int32:
        return int(value)
    return value  # np.float32


def _interpreter_scalar(value: np.generic):
    """A typed 0-d Triton tensor, as a compiled kernel receives the argument
    (the interpreter would otherwise keep a Python float as an untyped constant)."""
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle
    ty = {"fp32": tl.float32, "i32": tl.int32, "i1": tl.int1}[_SCALAR_TRITON_TYPES[value.dtype]]
    return tl.tensor(TensorHandle(np.array([value], dtype=value.dtype), ty), ty)


# --------------------------------------------------------------------------
# numpy adapter for the interpreter's tensor protocol
# --------------------------------------------------------------------------


class _NumpyStorage:
    """Untyped storage view: the interpreter only needs identity and copy."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array

    def data_ptr(self) -> int:
        return self.array.__array_interface__["data"][0]

    def cpu(self) -> "_NumpyStorage":
        return self  # already host memory: no copy

    def copy_(self, other: "_NumpyStorage") -> None:
        if other.data_ptr() != self.data_ptr():
            np.copyto(self.array, other.array)


class _NumpyTensor:
    """The subset of the torch.Tensor protocol read by Triton's interpreter."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array

    @property
    def dtype(self) -> str:
        # Triton's type mangler accepts names such as "float32" / "bfloat16".
        return self.array.dtype.name

    @property
    def shape(self):
        return self.array.shape

    def data_ptr(self) -> int:
        return self.array.__array_interface__["data"][0]

    def untyped_storage(self) -> _NumpyStorage:
        return _NumpyStorage(self.array)

    def new_empty(self, *size, device=None, dtype=None) -> "_NumpyTensor":
        del device, dtype
        if len(size) == 1 and isinstance(size[0], (tuple, list)):
            size = tuple(size[0])
        return _NumpyTensor(np.empty(size, dtype=self.array.dtype))

    def set_(self, storage: _NumpyStorage, offset: int, size, stride) -> "_NumpyTensor":
        base = storage.array
        itemsize = base.dtype.itemsize
        self.array = np.lib.stride_tricks.as_strided(
            base.reshape(-1)[offset:], shape=tuple(size),
            strides=tuple(s * itemsize for s in stride))
        return self

    def storage_offset(self) -> int:
        return 0

    def size(self, dim: int | None = None):
        return self.array.shape if dim is None else self.array.shape[dim]

    def stride(self, dim: int | None = None):
        st = tuple(s // self.array.dtype.itemsize for s in self.array.strides)
        return st if dim is None else st[dim]

    def dim(self) -> int:
        return self.array.ndim

    def numel(self) -> int:
        return self.array.size

    def element_size(self) -> int:
        return self.array.dtype.itemsize

    def is_contiguous(self) -> bool:
        return self.array.flags["C_CONTIGUOUS"]

    def cpu(self) -> "_NumpyTensor":
        return self

    def copy_(self, other: "_NumpyTensor") -> "_NumpyTensor":
        if other.data_ptr() != self.data_ptr():
            np.copyto(self.array, other.array)
        return self


# --------------------------------------------------------------------------
# interpreter path
# --------------------------------------------------------------------------

_PATCHED_INDEX = False


def _patch_interpreter_index() -> None:
    """Make ``range(tensor_bound)`` work in every Triton interpreter version.

    In the interpreter runtime scalars (``tl.program_id``, scalar kernel
    arguments) are one-element numpy arrays.  Older interpreters (e.g. Triton
    3.6) implement ``tensor.__index__`` as ``int(array)``, which NumPy >= 2.4
    rejects for 1-d arrays.  Our kernels use such loop bounds, so we install an
    ``__index__`` that reads the single element (what Triton 3.9 does anyway).
    Only the interpreter's per-call language patch is wrapped; compiled GPU
    kernels are unaffected.
    """
    global _PATCHED_INDEX
    if _PATCHED_INDEX:
        return
    from triton.runtime import interpreter as _interp

    original = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__",
                       lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor
    _PATCHED_INDEX = True


def _python_fn(kernel: Any) -> Callable:
    """The plain Python function behind a JITFunction / Autotuner / Heuristics."""
    fn = kernel
    while not isinstance(fn, types.FunctionType):
        inner = getattr(fn, "fn", None)
        if inner is None:
            raise TypeError(f"cannot find the Python function of kernel {kernel!r}")
        fn = inner
    return fn


@functools.lru_cache(maxsize=None)
def _interpreted(fn: types.FunctionType):
    """An InterpretedFunction for ``fn`` whose @triton.jit helpers are interpreted too."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    new_globals = dict(fn.__globals__)
    clone = types.FunctionType(fn.__code__, new_globals, fn.__name__,
                               fn.__defaults__, fn.__closure__)
    clone.__kwdefaults__ = fn.__kwdefaults__
    clone.__annotations__ = dict(fn.__annotations__)
    clone.__module__ = fn.__module__
    clone.__qualname__ = fn.__qualname__
    for name in fn.__code__.co_names:
        value = fn.__globals__.get(name)
        if isinstance(value, JITFunction):
            new_globals[name] = _helper(_python_fn(value))
    return InterpretedFunction(clone)


@functools.lru_cache(maxsize=None)
def _helper(fn: types.FunctionType) -> "_PatchedHelper":
    """The one interpreted stand-in for the @triton.jit helper ``fn``.

    Canonical (cached) so that identity checks made by the interpreter, e.g.
    ``combine_fn is tl.standard._sum_combine`` (fast numpy reductions), hold.
    """
    return _PatchedHelper(_interpreted(fn))


# Triton's interpreter keeps global state (grid indices, language patches), so
# interpreted launches are serialised even if XLA runs callbacks concurrently.
_INTERPRETER_LOCK = threading.RLock()


class _PatchedHelper:
    """A @triton.jit helper called from an interpreted kernel.

    Upstream's ``InterpretedFunction.__call__`` re-patches the whole language on
    every helper call (and never undoes it); that costs ~25% of the runtime of
    our kernels.  We patch once per launch (see :func:`_interpreted_language`)
    and call the AST-rewritten helper directly.
    """

    def __init__(self, interpreted):
        self._interpreted = interpreted
        self.fn = interpreted.fn

    @property
    def __name__(self):
        return self.fn.__name__

    def __call__(self, *args, **kwargs):
        from triton.runtime.errors import InterpreterError
        fn = self._interpreted.rewrite()
        try:
            return fn(*args, **kwargs)
        except InterpreterError:
            raise
        except Exception as e:
            raise InterpreterError(repr(e)) from e


def _language_objects():
    import triton.language as tl
    objs = [tl, tl.core, getattr(tl, "standard", None), getattr(tl, "math", None),
            getattr(tl, "random", None), tl.core.tensor, tl.core.dtype,
            getattr(tl.core, "condition", None), getattr(tl.core, "tensor_descriptor_base", None)]
    seen, out = set(), []
    for o in objs:
        if o is not None and id(o) not in seen:
            seen.add(id(o))
            out.append(o)
    return out


@contextlib.contextmanager
def _interpreted_language():
    """Patch triton.language for interpretation for the duration of one launch.

    * the language builtins of ``triton.language`` *and* ``triton.language.core``
      are patched once (the interpreter itself only patches the modules visible
      from the kernel's globals, then re-patches on each helper call);
    * ``tl.max``, ``tl.sum``, ``tl.cdiv``, ``tl.zeros`` ... are JITFunctions of
      ``triton.language.standard``; with ``TRITON_INTERPRET`` unset at import they
      refuse to run outside a compiled kernel, so they are swapped in place (the
      interpreter's identity checks such as ``combine_fn is
      tl.standard._sum_combine`` keep working) for interpreted helpers;
    * everything is restored afterwards, so compiled (GPU) kernels in the same
      process see an untouched ``triton.language``.
    """
    import triton.language as tl
    from triton.runtime import interpreter as _interp
    from triton.runtime.jit import JITFunction

    _warm_lazy_imports()
    objs = _language_objects()
    snapshot = [(o, dict(vars(o))) for o in objs]
    scopes = []
    try:
        for mod in (tl, getattr(tl, "standard", None), getattr(tl, "random", None),
                    getattr(tl, "math", None)):
            if mod is None:
                continue
            for name, value in list(vars(mod).items()):
                if isinstance(value, JITFunction):
                    setattr(mod, name, _helper(_python_fn(value)))
        # patch the builtins of tl.core (seen by triton.language.standard) and tl
        scopes.append(_interp._patch_lang(tl.standard.sum.fn))
        builder = _interp.interpreter_builder
        original_dot = type(builder).create_dot
        builder.create_dot = functools.partial(_fast_create_dot, builder, original_dot)
        saved_options = builder.options
        if dataclasses.is_dataclass(saved_options) and hasattr(saved_options, "sanitize_overflow"):
            builder.options = dataclasses.replace(
                saved_options, sanitize_overflow=INTERPRETER_SANITIZE_OVERFLOW)
        yield
    finally:
        builder = _interp.interpreter_builder
        if "create_dot" in vars(builder):
            del builder.create_dot
        if "saved_options" in locals():
            builder.options = saved_options
        for scope in reversed(scopes):
            scope.restore()
        for obj, saved in snapshot:
            current = vars(obj)
            for name in list(current.keys()):
                if name not in saved:
                    try:
                        delattr(obj, name)
                    except (AttributeError, TypeError):
                        pass
            for name, value in saved.items():
                if current.get(name, _MISSING) is not value:
                    try:
                        setattr(obj, name, value)
                    except (AttributeError, TypeError):
                        pass


_MISSING = object()


def _float32_view(handle) -> np.ndarray | None:
    """Tile data as float32 for a BLAS matmul (bf16 tiles are stored as raw uint16)."""
    import triton.language as tl
    data = handle.data
    scalar = handle.dtype.scalar if hasattr(handle.dtype, "scalar") else handle.dtype
    if scalar == tl.bfloat16:
        return (data.astype(np.uint32) << 16).view(np.float32)
    if scalar in (tl.float32, tl.float16):
        return data.astype(np.float32, copy=False)
    return None


def _fast_create_dot(builder, original, a, b, d, input_precision, max_num_imprecise_acc):
    """Interpreter ``tl.dot`` through BLAS.

    Upstream computes ``np.matmul(a, b, dtype=acc_dtype)``: passing ``dtype``
    takes NumPy off its BLAS path (~20x slower for our tiles), and bf16 tiles
    are multiplied as their raw uint16 bit patterns.  For float tiles with a
    float32 accumulator we convert to float32 (exact for fp16/bf16) and use a
    plain matmul; anything else goes to the original implementation.
    """
    from triton.runtime.interpreter import TensorHandle
    if d.data.dtype == np.float32:
        a32, b32 = _float32_view(a), _float32_view(b)
        if a32 is not None and b32 is not None:
            return TensorHandle(np.matmul(a32, b32) + d.data, d.dtype.scalar)
    return original(builder, a, b, d, input_precision, max_num_imprecise_acc)


_WARMED = False


class _RefuseTorch(importlib.abc.MetaPathFinder):
    """Refuses `import torch` (and torch.*): see :func:`_warm_lazy_imports`."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"{name} is never imported by kernels/", name=name)
        return None


def _warm_lazy_imports() -> None:
    """Run Triton's one-time initialisation of its argument specializer, with
    ``import torch`` refused, before anything else calls it.

    Triton's native specializer (``native_specialize_impl``, used by the
    interpreter's launches, by ``mangle_type`` and by jax-triton when it lowers a
    kernel) imports torch on its first call, to recognise torch tensors: where
    torch is installed, that would load it into our process.  Refused here, the
    import fails, Triton carries on without it, and later calls never try again.
    The same first call triggers Triton's lazy imports (e.g. gluon), which must
    happen while triton.language is unpatched: some of them assert on its
    JITFunctions.
    """
    global _WARMED
    if _WARMED:
        return
    from triton.runtime.jit import mangle_type
    refuse = None
    if "torch" not in sys.modules:  # already imported by the user: nothing to protect
        refuse = _RefuseTorch()
        sys.meta_path.insert(0, refuse)
    try:
        for probe in (_NumpyTensor(np.zeros(1, np.float32)), 1, 1.0, True):
            mangle_type(probe)
    finally:
        if refuse is not None:
            sys.meta_path.remove(refuse)
    _WARMED = True


def _poison(shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        return np.full(shape, np.iinfo(dtype).min // 2 if np.iinfo(dtype).min < 0 else 0,
                       dtype=dtype)
    return np.full(shape, np.nan, dtype=dtype)


def _run_interpreted(kernel, spec, grid, constexprs, out_shapes, *arrays):
    _patch_interpreter_index()
    fn = _interpreted(_python_fn(kernel))
    arrays = iter(arrays)
    call_args = []
    keep = []
    for kind, value in spec:
        if kind == "array":
            arr = np.ascontiguousarray(next(arrays))
            keep.append(arr)
            call_args.append(_NumpyTensor(arr))
        else:
            call_args.append(_interpreter_scalar(value))
    # Outputs are poisoned (NaN / huge negative ints) so that an element the
    # kernel forgets to write is visible instead of silently zero.
    outs = [_poison(s.shape, s.dtype) for s in out_shapes]
    call_args.extend(_NumpyTensor(o) for o in outs)
    with _INTERPRETER_LOCK, _interpreted_language():
        fn.run(*call_args, grid=grid, warmup=False, **constexprs)
    return tuple(outs)


def _normalize_grid(grid, meta) -> tuple:
    if callable(grid):
        grid = grid(meta)
    if isinstance(grid, int):
        grid = (grid,)
    grid = tuple(int(g) for g in grid)
    if not 1 <= len(grid) <= 3:
        raise ValueError(f"grid must have 1 to 3 dimensions, got {grid}.")
    return grid


# --------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------


def _varying_axes(x) -> frozenset:
    """Mesh axes over which ``x`` varies inside ``shard_map`` (empty outside)."""
    try:
        aval = jax.typeof(x)
    except Exception:
        return frozenset()
    mat = getattr(aval, "mat", None)  # newer JAX: manual axis type
    if mat is not None and hasattr(mat, "varying"):
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", None) or ())  # older JAX


def _mark_varying(outs, inputs):
    """Type kernel outputs as varying over every mesh axis any input varies over.

    Neither ``pure_callback`` nor jax-triton's custom call propagates
    shard_map's varying-manual-axes type; without this a ``custom_vjp`` used
    inside ``shard_map`` rejects its own cotangents.
    """
    want = frozenset().union(*(_varying_axes(a) for a in inputs)) if inputs else frozenset()
    if not want:
        return outs
    fixed = []
    for o in outs:
        missing = tuple(sorted(want - _varying_axes(o), key=str))
        if missing:
            if hasattr(jax.lax, "pcast"):
                o = jax.lax.pcast(o, missing, to="varying")
            elif hasattr(jax.lax, "pvary"):
                o = jax.lax.pvary(o, missing)
        fixed.append(o)
    return tuple(fixed)


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) or hasattr(x, "aval")


def triton_call(kernel, *args, out_shape, grid, num_warps: int | None = None,
                num_stages: int | None = None, interpret: bool | None = None,
                **constexprs):
    """Run ``kernel`` on JAX arrays; returns a tuple of outputs.

    Args:
      kernel: a ``@triton.jit`` function (or a ``triton.autotune`` wrapper of
        one; on the interpreter the wrapper is bypassed and the constexprs
        given here must be complete).
      *args: arrays and scalars, in kernel-parameter order.  Each scalar gets
        one explicit dtype (:func:`typed_scalar`: Python float -> fp32, int ->
        int32, bool -> int1), identical on the GPU and interpreter paths.
      out_shape: a ``jax.ShapeDtypeStruct`` or a sequence of them; one pointer
        per output follows ``args`` in the kernel signature.
      grid: tuple of up to 3 ints, or a callable taking the metaparameter dict.
      num_warps, num_stages: GPU launch options (ignored by the interpreter).
      interpret: force (True) or forbid (False) the interpreter; default: use
        it unless the default backend is a GPU.
      **constexprs: ``tl.constexpr`` keyword arguments.
    """
    single = not isinstance(out_shape, (list, tuple))
    out_shapes = [out_shape] if single else list(out_shape)
    if interpret is None:
        interpret = use_interpreter()
    args = tuple(a if _is_array(a) else typed_scalar(a) for a in args)

    if not interpret:
        import jax_triton as jt  # lazy: GPU-only dependency

        _warm_lazy_imports()  # before jax-triton's lowering calls Triton's specializer

        params = inspect.signature(jt.triton_call).parameters
        out_kw = "out_type" if "out_type" in params else "out_shape"
        launch = {}
        if num_warps is not None:
            launch["num_warps"] = num_warps
        if num_stages is not None:
            launch["num_stages"] = num_stages
        if _FORCED_GPU is not None:
            launch["compute_capability"] = _FORCED_GPU["compute_capability"]
        args = tuple(a if _is_array(a) else _gpu_scalar(a) for a in args)
        outs = jt.triton_call(*args, kernel=kernel, grid=grid,
                              **{out_kw: out_shapes}, **launch, **constexprs)
        if not isinstance(outs, (list, tuple)):
            outs = (outs,)
        return _mark_varying(tuple(outs), [a for a in args if _is_array(a)])

    spec = []
    arrays = []
    for a in args:
        if _is_array(a):
            spec.append(("array", None))
            arrays.append(a)
        else:
            spec.append(("static", a))
    grid_t = _normalize_grid(grid, dict(constexprs))
    result_shapes = tuple(jax.ShapeDtypeStruct(s.shape, s.dtype) for s in out_shapes)
    callback = functools.partial(_run_interpreted, kernel, tuple(spec), grid_t,
                                 dict(constexprs), result_shapes)
    outs = jax.pure_callback(callback, result_shapes, *arrays, vmap_method="sequential")
    return _mark_varying(tuple(outs), arrays)
