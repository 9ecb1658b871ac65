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

Without a GPU it says so and runs a small CPU correctness + timing check of
the same kernels in Triton's interpreter instead (``cpu_check.csv``).
"""

from __future__ import annotations

import argparse
import csv
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


def _impl_fn(name: str, causal: bool):
    if name == "xla":
        return lambda q, k, v: kernels.reference_attention(q, k, v, causal=causal)
    if name == "xla_triton_softmax":
        return lambda q, k, v: kernels.fused_softmax_attention(q, k, v, causal=causal)
    if name == "triton_flash":
        return lambda q, k, v: kernels.flash_attention(q, k, v, causal=causal)
    if name == "cudnn":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                            implementation="cudnn")
    raise ValueError(f"unknown implementation {name!r}; choose from {IMPLS}.")


def attention_flops(b, h, tq, tk, d, causal) -> float:
    """Forward FLOPs: two matmuls of 2*B*H*Tq*Tk*D each; causal does half."""
    f = 4.0 * b * h * tq * tk * d
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


def _random_inputs(key, b, t, h, kvh, d, dtype, n_sets):
    sets = []
    for i in range(n_sets):
        kq, kk, kv, kd = jax.random.split(jax.random.fold_in(key, i), 4)
        sets.append(tuple(jax.random.normal(kk_, shape, jnp.float32).astype(dtype)
                          for kk_, shape in ((kq, (b, t, h, d)), (kk, (b, t, kvh, d)),
                                             (kv, (b, t, kvh, d)), (kd, (b, t, h, d)))))
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


def bench_one(impl, b, t, h, kvh, d, causal, dtype, warmup, repeats, n_sets=2, seed=0):
    """Returns a result dict (times in ms, TFLOP/s, memory) or status OOM/ERROR."""
    row = dict(impl=impl, batch=b, seq_len=t, heads=h, kv_heads=kvh, head_dim=d,
               causal=causal, dtype=jnp.dtype(dtype).name, status="ok")
    f = _impl_fn(impl, causal)
    try:
        sets = _random_inputs(jax.random.key(seed), b, t, h, kvh, d, dtype, n_sets)
        fwd = jax.jit(f)

        def loss(q, k, v, do):
            return jnp.sum(f(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))

        fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        row["fwd_ms"] = 1e3 * _time(fwd, [s[:3] for s in sets], warmup, repeats)
        # backward alone: vjp residuals computed up front, then only the pullback is timed
        pullbacks = [(jax.vjp(f, *s[:3])[1], s[3]) for s in sets]
        bwd = jax.jit(lambda pb, do: pb(do))
        row["bwd_ms"] = 1e3 * _time(bwd, pullbacks, warmup, repeats)
        del pullbacks
        row["fwd_bwd_ms"] = 1e3 * _time(fwd_bwd, sets, warmup, repeats)
        row["mem_fwd_bwd_mb"] = _memory_mb(fwd_bwd.lower(*sets[0]).compile())
        row["device_peak_mb"] = _device_peak_mb()
    except Exception as e:  # report and continue with the next configuration
        row["status"] = "OOM" if _is_oom(e) else f"ERROR: {type(e).__name__}: {str(e)[:200]}"
        return row
    fl = attention_flops(b, h, t, t, d, causal)
    row["fwd_tflops"] = fl / (row["fwd_ms"] * 1e-3) / 1e12
    row["bwd_tflops"] = 2.5 * fl / (row["bwd_ms"] * 1e-3) / 1e12
    row["fwd_bwd_tflops"] = 3.5 * fl / (row["fwd_bwd_ms"] * 1e-3) / 1e12
    return row


FIELDS = ["impl", "batch", "seq_len", "heads", "kv_heads", "head_dim", "causal", "dtype", "status",
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
            for t in args.seq_lens:
                b = max(1, args.tokens // t)
                for impl in args.impls:
                    row = bench_one(impl, b, t, args.heads, args.kv_heads or args.heads, d, causal,
                                    dtype, args.warmup, args.repeats)
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


CPU_FIELDS = ["impl", "batch", "seq_len", "heads", "head_dim", "causal", "max_rel_err",
              "fwd_ms", "fwd_bwd_ms"]


def run_cpu_check(args):
    """Interpreter run on tiny shapes: errors vs the jnp reference, and timings."""
    rows = []
    b, h, d = 2, 4, 32
    for t in args.cpu_seq_lens:
        for causal in (False, True):
            sets = _random_inputs(jax.random.key(t), b, t, h, h, d, jnp.float32, 2)
            q, k, v, do = sets[0]
            ref_f = lambda q, k, v, c=causal: kernels.reference_attention(q, k, v, causal=c)  # noqa: E731
            ref_o, ref_vjp = jax.vjp(ref_f, q, k, v)
            ref_g = ref_vjp(do)
            for impl in ("triton_flash", "xla_triton_softmax"):
                f = _impl_fn(impl, causal)
                o, vjp = jax.vjp(f, q, k, v)
                g = vjp(do)
                err = max(float(jnp.linalg.norm((x - y).ravel()) / jnp.linalg.norm(y.ravel()))
                          for x, y in zip((o,) + tuple(g), (ref_o,) + tuple(ref_g)))

                def loss(q, k, v, do, f=f):
                    return jnp.sum(f(q, k, v) * do)

                fwd = jax.jit(f)
                fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
                row = dict(impl=impl, batch=b, seq_len=t, heads=h, head_dim=d, causal=causal,
                           max_rel_err=err,
                           fwd_ms=1e3 * _time(fwd, [s[:3] for s in sets], 1, args.cpu_repeats),
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


def _ints(s):
    return [int(x) for x in s.split(",") if x]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out", help="output directory (CSV, PNG)")
    p.add_argument("--seq-lens", type=_ints,
                   default=[512, 1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--head-dims", type=_ints, default=[64, 128])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=0, help="0: same as --heads")
    p.add_argument("--tokens", type=int, default=16384, help="batch * seq_len (batch >= 1)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--causal", type=lambda s: [x.strip().lower() in ("1", "true", "yes")
                                               for x in s.split(",")],
                   default=[False, True], help="comma list, e.g. 'false,true'")
    p.add_argument("--impls", type=lambda s: [x for x in s.split(",") if x], default=list(IMPLS))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--cpu-repeats", type=int, default=3)
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
