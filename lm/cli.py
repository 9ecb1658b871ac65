"""What the command-line entry points share (experiments/run.py, the benchmarks, lm.convert):
bad input ends in one `error:` line on stderr and exit code 2, and other libraries' INFO logs
stay out of stderr, so stdout carries results and stderr the project's own logs."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import logging as py_logging
import os
import sys

from absl import logging

from lm.errors import UsageError


def fail(message: str) -> None:
  """Prints `error: message` on stderr and exits with code 2."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose bad arguments end as `fail` does (argparse prints its usage text first and
  names the program: "prog: error: ...")."""

  def error(self, message):
    fail(message)


class _ProjectInfoOnly(py_logging.Filter):
  """Passes warnings and above, and INFO from files under `roots`."""

  def __init__(self, roots: tuple[str, ...]):
    super().__init__()
    self.roots = roots

  def filter(self, record) -> bool:
    return record.levelno >= py_logging.WARNING or record.pathname.startswith(self.roots)


def quiet_library_logs() -> None:
  """Libraries (Orbax on every save, JAX at start-up) log at INFO through absl too: keep their
  warnings, and INFO from this project only (lm/, kernels/ and the running script's folder).
  On a machine without an NVIDIA driver, JAX runs on the CPU without trying its CUDA plugin
  first (cpu_without_gpu_driver). Calling it again changes nothing (one filter per process)."""
  cpu_without_gpu_driver()
  handler = logging.get_absl_handler()
  if any(isinstance(f, _ProjectInfoOnly) for f in handler.filters):
    return
  roots = tuple(d for name in ("lm", "kernels")
                for d in importlib.util.find_spec(name).submodule_search_locations)
  roots += (os.path.dirname(os.path.abspath(sys.argv[0] or ".")),)
  handler.addFilter(_ProjectInfoOnly(roots))


def cpu_without_gpu_driver() -> None:
  """JAX_PLATFORMS=cpu when no NVIDIA driver is loaded and JAX_PLATFORMS is not set: the CUDA
  plugin that the `test` extra installs (to lower the kernels for sm_90 without a GPU) fails
  to start there and logs a cuDNN traceback on every run. Call it before JAX's first
  computation; with a driver (a GPU machine) or JAX_PLATFORMS set, it does nothing."""
  if "JAX_PLATFORMS" in os.environ or os.path.exists("/proc/driver/nvidia/version"):
    return
  import jax
  jax.config.update("jax_platforms", "cpu")


# glibc mallopt parameters (malloc.h) and the values keep_freed_host_memory sets.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_KEEP = ((_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))


def keep_freed_host_memory() -> bool:
  """Makes glibc's malloc keep freed memory for reuse instead of returning it to the kernel;
  True if applied (Linux with glibc), False elsewhere (nothing changed).

  Why (issue 17): XLA's CPU runtime allocates its buffers (temporaries, outputs) afresh on
  every execution of a jitted step and frees them after. Over glibc's default thresholds these
  are mmap'd, or the heap is trimmed after the free, so every step the kernel maps and zeroes
  the same pages again: 8,700 minor page faults and 14 ms of system time per step of the
  nanoGPT-sized model (89 ms of CPU per step, 1 thread). Allocating below 1 GiB from the heap,
  never trimming below 1 GiB and growing it 64 MiB at a time removes them (6 faults per step,
  70 ms). The cost: the process keeps its peak heap (a training process reaches it every
  step anyway). Call it early in a process, before the large allocations."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt  # glibc's; musl has no mallopt
  except (OSError, AttributeError):
    return False
  return all([mallopt(param, value) == 1 for param, value in _KEEP])


@contextlib.contextmanager
def one_line_errors():
  """UsageError, file-system trouble (OSError) and ValueError (e.g. a kernel refusing shapes)
  inside become one `error:` line and exit code 2; the traceback goes to the debug log."""
  try:
    yield
  except UsageError as e:
    fail(str(e))
  except OSError as e:  # read-only, disk full, ...
    logging.debug("OSError", exc_info=True)
    fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e))
  except ValueError as e:
    logging.debug("ValueError", exc_info=True)
    fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
