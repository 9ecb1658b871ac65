"""Benchmark attention implementations: XLA reference, XLA + Triton fused softmax,
Triton flash attention and cuDNN (``jax.nn.dot_product_attention``).

    python kernels/bench.py [--out bench_out] [--seq-lens 512,1024,...] ...

On a GPU: forward, backward and forward+backward time (median of many runs
after warm-up, ``block_until_ready``, fresh random inputs rotated between
runs), TFLOP/s (forward ``4 * B * H * T * S * D``, halved when causal; backward
counted as 2.5x forward) and memory, for bf16 over sequence lengths 512..32k,
head dims 64 and 128, causal and not, with ``batch * seq_len`` held at
``--tokens``.  Out-of-memory is caught and reported as OOM.  Prints a table,
writes ``results.csv`` and ``tflops.png`` (if matplotlib is installed) to
``--out``.

``--window W`` (causal rows only) and ``--bias const|grad`` (an fp32
``[1, heads, T, T]`` additive bias, without or with its gradient) measure the
sliding-window and biased variants; FLOPs then count only the visible
(query, key) pairs.

Without a GPU it says so and runs a small CPU correctness + timing check of
the same kernels in Triton's interpreter instead (``cpu_check.csv``).
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import kernels

IMPLS = ("xla", "xla_triton_softmax", "triton_flash", "cudnn")


def _impl_fn(name: str, causal: bool, window: int = 0):
    """f(q, k, v, bias=None) for implementation ``name``."""
    kw = dict(causal=causal, window=window)
    if name == "xla":
        return lambda q, k, v, bias=None: kernels.reference_attention(q, k, v, bias=bias, **kw)
    if name == "xla_triton_softmax":
        return lambda q, k, v, bias=None: kernels.fused_softmax_attention(q, k, v, bias=bias,
                                                                          **kw)
    if name == "triton_flash":
        return lambda q, k, v, bias=None: kernels.flash_attention(q, k, v, bias=bias, **kw)
    if name == "cudnn":
        local = (window - 1, 0) if window else None
        return lambda q, k, v, bias=None: jax.nn.dot_product_attention(
            q, k, v, bias=bias, is_causal=causal, local_window_size=local,
            implementation="cudnn")
    raise ValueError(f"unknown implementation {name!r}; choose from {IMPLS}.")


def attention_flops(b, h, tq, tk, d, causal, window: int = 0) -> float:
    """Forward FLOPs: two matmuls of 2*B*H*Tq*Tk*D each; causal does half; a
    window W (with causal, Tq == Tk) counts the visible pairs, about Tq*W."""
    f = 4.0 * b * h * tq * tk * d
    if window:
        pairs = sum(min(i + 1, window) for i in range(tq))
        return f * pairs / (tq * tk)
    return f / 2 if causal else f


def _is_oom(e: Exception) -> bool:
    msg = str(e)
    return ("RESOURCE_EXHAUSTED" in msg or "Out of memory" in msg or "out of memory" in msg
            or "OOM" in msg)


def _time(fn, arg_sets, warmup: int, repeats: int) -> float:
    """Median wall time (s) over `repeats` runs, cycling through `arg_sets`."""
    for i in range(warmup):
        jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
    times = []
    for i in range(repeats):
        args = arg_sets[i % len(arg_sets)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _random_inputs(key, b, t, h, kvh, d, dtype, n_sets, bias="none"):
    """n_sets tuples (q, k, v, do, bias): bias None, or fp32 [1, h, t, t]."""
    sets = []
    for i in range(n_sets):
        kq, kk, kv, kd, kb = jax.random.split(jax.random.fold_in(key, i), 5)
        arrays = tuple(jax.random.normal(kk_, shape, jnp.float32).astype(dtype)
                       for kk_, shape in ((kq, (b, t, h, d)), (kk, (b, t, kvh, d)),
                                          (kv, (b, t, kvh, d)), (kd, (b, t, h, d))))
        sets.append(arrays + (None if bias == "none" else
                              jax.random.normal(kb, (1, h, t, t), jnp.float32),))
    return sets


def _memory_mb(compiled) -> float | None:
    try:
        m = compiled.memory_analysis()
        total = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
                 - getattr(m, "alias_size_in_bytes", 0))
        return total / 2**20
    except Exception:  # not available on every backend / version
        return None


def _device_peak_mb() -> float | None:
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use", 0) / 2**20 or None
    except Exception:
        return None


def bench_one(impl, b, t, h, kvh, d, causal, dtype, warmup, repeats, n_sets=2, seed=0,
              window=0, bias="none"):
    """Returns a result dict (times in ms, TFLOP/s, memory) or status OOM/ERROR.

    bias: "none", "const" (an fp32 [1, h, t, t] bias, no gradient) or "grad" (its
    gradient is computed too)."""
    row = dict(impl=impl, batch=b, seq_len=t, heads=h, kv_heads=kvh, head_dim=d,
               causal=causal, window=window, bias=bias, dtype=jnp.dtype(dtype).name,
               status="ok")
    f = _impl_fn(impl, causal, window)
    try:
        sets = _random_inputs(jax.random.key(seed), b, t, h, kvh, d, dtype, n_sets, bias)
        fwd = jax.jit(f)

        def loss(q, k, v, do, bias):
            return jnp.sum(f(q, k, v, bias).astype(jnp.float32) * do.astype(jnp.float32))

        # the bias is an argument either way; differentiated only for "grad"
        fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4) if bias == "grad" else (0, 1, 2)))
        row["fwd_ms"] = 1e3 * _time(fwd, [s[:3] + s[4:] for s in sets], warmup, repeats)

        def pullback(q, k, v, do, bias):
            if bias == "grad":
                return jax.vjp(f, q, k, v, bias)[1], do
            return jax.vjp(lambda q, k, v: f(q, k, v, bias), q, k, v)[1], do

        # backward alone: vjp residuals computed up front, then only the pullback is timed
        pullbacks = [pullback(*s) for s in sets]
        bwd = jax.jit(lambda pb, do: pb(do))
        row["bwd_ms"] = 1e3 * _time(bwd, pullbacks, warmup, repeats)
        del pullbacks
        row["fwd_bwd_ms"] = 1e3 * _time(fwd_bwd, sets, warmup, repeats)
        row["mem_fwd_bwd_mb"] = _memory_mb(fwd_bwd.lower(*sets[0]).compile())
        row["device_peak_mb"] = _device_peak_mb()
    except Exception as e:  # report and continue with the next configuration
        row["status"] = "OOM" if _is_oom(e) else f"ERROR: {type(e).__name__}: {str(e)[:200]}"
        return row
    fl = attention_flops(b, h, t, t, d, causal, window)
    row["fwd_tflops"] = fl / (row["fwd_ms"] * 1e-3) / 1e12
    row["bwd_tflops"] = 2.5 * fl / (row["bwd_ms"] * 1e-3) / 1e12
    row["fwd_bwd_tflops"] = 3.5 * fl / (row["fwd_bwd_ms"] * 1e-3) / 1e12
    return row


FIELDS = ["impl", "batch", "seq_len", "heads", "kv_heads", "head_dim", "causal", "window", "bias",
          "dtype", "status",
          "fwd_ms", "bwd_ms", "fwd_bwd_ms", "fwd_tflops", "bwd_tflops", "fwd_bwd_tflops",
          "mem_fwd_bwd_mb", "device_peak_mb"]


def _fmt(x):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)


def print_table(rows, fields):
    widths = {f: max(len(f), *(len(_fmt(r.get(f))) for r in rows)) for f in fields}
    print("  ".join(f.rjust(widths[f]) for f in fields))
    for r in rows:
        print("  ".join(_fmt(r.get(f)).rjust(widths[f]) for f in fields), flush=True)


def write_csv(rows, path, fields):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the PNG plot (pip install matplotlib).")
        return
    combos = sorted({(r["head_dim"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(1, len(combos), figsize=(5 * len(combos), 4), squeeze=False)
    for ax, (d, causal) in zip(axes[0], combos):
        for impl in IMPLS:
            pts = [(r["seq_len"], r["fwd_bwd_tflops"]) for r in rows
                   if r["impl"] == impl and r["head_dim"] == d and r["causal"] == causal
                   and r["status"] == "ok"]
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("fwd+bwd TFLOP/s")
        ax.set_title(f"head_dim={d}, causal={causal}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def run_gpu(args):
    dtype = jnp.dtype(args.dtype)
    rows = []
    os.makedirs(args.out, exist_ok=True)
    for d in args.head_dims:
        for causal in args.causal:
            if args.window and not causal:
                print("--window: skipping causal=False (a window needs causal)")
                continue
            for t in args.seq_lens:
                b = max(1, args.tokens // t)
                for impl in args.impls:
                    row = bench_one(impl, b, t, args.heads, args.kv_heads or args.heads, d, causal,
                                    dtype, args.warmup, args.repeats, window=args.window,
                                    bias=args.bias)
                    if not rows:
                        print("  ".join(FIELDS))
                    rows.append(row)
                    print("  ".join(_fmt(row.get(f)) for f in FIELDS), flush=True)
                    # rewritten after every row: a run cut short keeps what it measured
                    write_csv(rows, os.path.join(args.out, "results.csv"), FIELDS)
    print("\nsummary:")
    print_table(rows, FIELDS)
    write_csv(rows, os.path.join(args.out, "results.csv"), FIELDS)
    print(f"wrote {os.path.join(args.out, 'results.csv')}")
    plot(rows, os.path.join(args.out, "tflops.png"))
    return rows


CPU_FIELDS = ["impl", "batch", "seq_len", "heads", "head_dim", "causal", "window", "bias",
              "max_rel_err", "fwd_ms", "fwd_bwd_ms"]


def run_cpu_check(args):
    """Interpreter run on tiny shapes: errors vs the jnp reference (gradients included, the
    bias's with --bias grad), and timings."""
    rows = []
    b, h, d = 2, 4, 32
    n_diff = 4 if args.bias == "grad" else 3  # differentiated: q, k, v (and the bias)

    def outputs_and_grads(f, q, k, v, do, bias):
        operands = (q, k, v, bias)
        o, vjp = jax.vjp(lambda *p: f(*p, *operands[len(p):]), *operands[:n_diff])
        return (o,) + tuple(vjp(do))

    for t in args.cpu_seq_lens:
        for causal in (False, True):
            if args.window and not causal:
                continue
            sets = _random_inputs(jax.random.key(t), b, t, h, h, d, jnp.float32, 2, args.bias)
            want = outputs_and_grads(_impl_fn("xla", causal, args.window), *sets[0])
            for impl in ("triton_flash", "xla_triton_softmax"):
                f = _impl_fn(impl, causal, args.window)
                got = outputs_and_grads(f, *sets[0])
                err = max(float(jnp.linalg.norm((x - y).ravel()) / jnp.linalg.norm(y.ravel()))
                          for x, y in zip(got, want))
                fwd = jax.jit(f)
                fwd_bwd = jax.jit(functools.partial(outputs_and_grads, f))
                row = dict(impl=impl, batch=b, seq_len=t, heads=h, head_dim=d, causal=causal,
                           window=args.window, bias=args.bias, max_rel_err=err,
                           fwd_ms=1e3 * _time(fwd, [s[:3] + s[4:] for s in sets], 1,
                                              args.cpu_repeats),
                           fwd_bwd_ms=1e3 * _time(fwd_bwd, sets, 1, args.cpu_repeats))
                if not rows:
                    print("  ".join(CPU_FIELDS))
                rows.append(row)
                print("  ".join(_fmt(row.get(f)) for f in CPU_FIELDS), flush=True)
    print("\nsummary:")
    print_table(rows, CPU_FIELDS)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "cpu_check.csv")
    write_csv(rows, path, CPU_FIELDS)
    print(f"wrote {path}")
    bad = [r for r in rows if not r["max_rel_err"] < 1e-5]
    if bad:
        print(f"FAILED: {len(bad)} configurations exceed relative error 1e-5")
        return 1
    print("CPU check passed: all relative errors < 1e-5 (float32).")
    return 0


def _positive(s):
    if not s.strip().isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s!r}")
    return int(s)


def _bools(s):
    """A comma list of true/false (1/0, yes/no): anything else is an error, not False."""
    words = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    values = [words.get(x.strip().lower()) for x in s.split(",") if x.strip()]
    if not values or None in values:
        raise argparse.ArgumentTypeError(f"expected true/false, comma-separated, got {s!r}")
    return values


def _ints(s):
    """A comma list of integers >= 1 (a size of 0 divided by zero or reached an empty jnp
    reference with a traceback)."""
    values = [_positive(x) for x in s.split(",") if x]
    if not values:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, comma-separated, got {s!r}")
    return values


class _OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one `error:` line and exit code 2, as the project's other entry points
    (lm.cli.fail), not argparse's usage text first."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def main(argv=None):
    # Without an NVIDIA driver, skip the CUDA plugin (the `test` extra installs it to lower
    # for sm_90): its failed start logs a cuDNN traceback. As lm/cli.py cpu_without_gpu_driver.
    if "JAX_PLATFORMS" not in os.environ and not os.path.exists("/proc/driver/nvidia/version"):
        jax.config.update("jax_platforms", "cpu")
    p = _OneLineParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out", help="output directory (CSV, PNG)")
    p.add_argument("--seq-lens", type=_ints,
                   default=[512, 1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--head-dims", type=_ints, default=[64, 128])
    p.add_argument("--heads", type=_positive, default=16)
    p.add_argument("--kv-heads", type=int, default=0, help="0: same as --heads")
    p.add_argument("--tokens", type=_positive, default=16384, help="batch * seq_len (batch >= 1)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--causal", type=_bools, default=[False, True],
                   help="comma list, e.g. 'false,true'")
    p.add_argument("--impls", type=lambda s: [x for x in s.split(",") if x], default=list(IMPLS))
    p.add_argument("--window", type=int, default=0,
                   help="sliding window W > 0 (causal rows only); 0: full attention")
    p.add_argument("--bias", default="none", choices=["none", "const", "grad"],
                   help="additive fp32 [1, heads, T, T] bias: none, without (const) or with "
                        "(grad) its gradient")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=_positive, default=20)
    p.add_argument("--cpu-repeats", type=_positive, default=3)
    p.add_argument("--cpu-seq-lens", type=_ints, default=[64, 128],
                   help="CPU check: sequence lengths (batch 2, 4 heads, head_dim 32)")
    p.add_argument("--cpu-check", action="store_true",
                   help="run the CPU interpreter check even if a GPU is present")
    p.add_argument("--rehearse", action="store_true",
                   help="run the GPU benchmark's code path whatever the backend (a CPU "
                        "rehearsal of kernels/gpu_session.sh: give tiny sizes; cuDNN rows "
                        "then report an error)")
    args = p.parse_args(argv)
    for impl in args.impls:
        if impl not in IMPLS:
            p.error(f"unknown implementation {impl!r}; choose from {IMPLS}")
    if args.window < 0:
        p.error(f"--window={args.window}: expected 0 (full) or a positive window")

    backend = jax.default_backend()
    print(f"jax {jax.__version__}, backend {backend}, devices {jax.devices()}")
    if (backend != "gpu" and not args.rehearse) or args.cpu_check:
        if backend != "gpu":
            print("No GPU available: the GPU benchmark (XLA / Triton softmax / Triton flash / "
                  "cuDNN) was NOT run.  Running a small CPU correctness + timing check of the "
                  "Triton kernels in Triton's interpreter instead (timings are interpreter "
                  "speed, not kernel performance).")
        return run_cpu_check(args)
    run_gpu(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
