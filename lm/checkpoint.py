"""Checkpoints with Orbax: train state (sharded arrays) plus a JSON record of the run.

Layout: WORKDIR/checkpoints/<step>/{state,meta}. Orbax writes each step into a temporary
directory and renames it when complete, so a crash mid-save leaves the earlier checkpoints
intact and `latest_step` never returns a half-written one. Saves of sharded arrays are
collective: every process calls `save`, each writes its own shards.
"""

from __future__ import annotations

import os
import signal

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from lm import layers
from lm.errors import UsageError


class Checkpointer:

  def __init__(self, directory: str, keep: int = 3):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))
    self._pending = None  # the step of a save still being written (save(wait=False))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: nnx.State, meta: dict, wait: bool = True) -> None:
    """Writes step `step` completely or not at all; a file-system failure (disk full, ...)
    raises UsageError naming the step and the latest complete checkpoint, which stays the
    latest (Orbax renames a step's directory only once it is written).

    wait=False returns once the arrays are copied to host memory (the state may then be
    donated to the next step) and writes in a background thread (Orbax's async
    checkpointing): a failure then raises at the next save, `finish` or `close`, still
    naming its own step. A crash mid-write leaves the earlier checkpoints as they were."""
    self.finish()  # one save in flight at a time; the previous one's failure first
    self._pending = step
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
          meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:
      self._pending = None
      self._raise_save_error(step, e)
    if wait:
      self.finish()

  def finish(self) -> None:
    """Waits for a save in flight (wait=False); UsageError if it failed for want of space."""
    step, self._pending = self._pending, None
    if step is None:
      return
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      self._raise_save_error(step, e)

  def _raise_save_error(self, step: int, e: Exception):
    cause = _os_error_in(e)  # Orbax wraps the OSError of its writer threads in other types
    if cause is None:
      raise e
    self.manager.reload()
    raise UsageError(f"saving checkpoint {step} in {self.directory} failed: "
                     f"{cause.strerror or cause} (the latest complete checkpoint is "
                     f"{self.manager.latest_step()})") from e

  def read_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # a damaged or foreign step directory: Orbax/tensorstore errors
      raise self._unreadable(step, e) from None
    if not isinstance(out.meta, dict) or "config" not in out.meta:
      raise self._unreadable(step, ValueError("its meta record is not one of ours"))
    return out.meta

  def restore(self, abstract_state: nnx.State, step: int | None = None) -> nnx.State:
    """Restores into the shapes and shardings of `abstract_state` (any mesh, any device count).

    The layer layout may differ from the checkpoint's (model.scan_layers, lm/layers.py): a
    checkpoint of per-layer parameters (all from before issue 17) restores into stacked ones
    and back: when the target's layout does not restore, the other one is tried."""
    step = self.latest_step() if step is None else step
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        nnx.to_pure_dict(abstract_state))
    want = layers.layout_of(target)
    layouts = (want,) if want is None else (want, "per_layer" if want == "stacked" else "stacked")
    first_error = None
    for layout in layouts:
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_in_layout(target, layout))))
        break
      except Exception as e:
        first_error = first_error or e
    else:
      raise self._unreadable(step, first_error) from None
    values = out.state
    bad = _first_non_finite(values)
    if bad:  # bytes damaged on disk (never saved so): NaN samples, a resume that stops at once
      raise self._unreadable(step, ValueError(f"non-finite values in {bad}")) from None
    if layout != want:  # convert, then place as the target says
      values = jax.device_put(_in_layout(values, want), jax.tree.map(lambda x: x.sharding, target))
    state = jax.tree.map(lambda x: x, abstract_state)  # a copy to fill
    nnx.replace_by_pure_dict(state, values)
    return state

  def _unreadable(self, step: int, error: Exception) -> UsageError:
    lines = str(error).strip().splitlines()
    # tensorstore's first line ends in "See full TensorStore details: <bound method ...>"
    first = lines[0].split(" See full TensorStore details")[0][:200] if lines else ""
    detail = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return UsageError(f"checkpoint {self.directory}/{step} cannot be read ({detail}); move that "
                      f"step's directory away to resume from an earlier one")

  def close(self) -> None:
    try:
      self.finish()
    finally:
      self.manager.close()

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *exc):
    try:
      self.close()
    except Exception:
      if exc_type is None:  # else keep the first error: it says what went wrong
        raise
    return False


def _in_layout(tree, layout: str | None):
  """A pure-dict train state (arrays or ShapeDtypeStructs) with its layers in `layout`
  ("stacked" or "per_layer"; None: as it is). A struct's sharding gains or loses the stacked
  axis's entry."""
  if layout is None or layers.layout_of(tree) == layout:
    return tree

  def struct(x, shape, spec):
    where = jax.sharding.NamedSharding(x.sharding.mesh, jax.sharding.PartitionSpec(*spec))
    return jax.ShapeDtypeStruct(shape, x.dtype, sharding=where)

  if layout == "stacked":
    def stack(xs):
      if not isinstance(xs[0], jax.ShapeDtypeStruct):
        return jnp.stack(xs)
      spec = tuple(xs[0].sharding.spec) + (None,) * (xs[0].ndim - len(xs[0].sharding.spec))
      return struct(xs[0], (len(xs), *xs[0].shape), (None, *spec))
    return layers.stack_layers(tree, stack)

  def take(x, i):
    if not isinstance(x, jax.ShapeDtypeStruct):
      return x[i]
    return struct(x, x.shape[1:], tuple(x.sharding.spec)[1:])
  return layers.unstack_layers(tree, take=take)


def _os_error_in(e: BaseException) -> OSError | None:
  """The OSError among an exception's causes and contexts, if any."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, OSError):
      return e
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


def _first_non_finite(values) -> str | None:
  """The path of the first float array of a pure-dict state holding NaN or inf, or None (one
  device reduction per array, read back once)."""
  leaves = [(p, x) for p, x in jax.tree_util.tree_leaves_with_path(values)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  finite = jax.device_get([jnp.isfinite(x).all() for _, x in leaves])
  bad = [p for (p, _), ok in zip(leaves, finite) if not ok]
  return "/".join(str(getattr(k, "key", k)) for k in bad[0]) if bad else None


def read_meta(workdir_or_ckpt_dir: str) -> tuple[Checkpointer, dict]:
  """Opens WORKDIR/checkpoints (or a checkpoints dir itself) and reads its latest record."""
  d = workdir_or_ckpt_dir
  if os.path.isdir(os.path.join(d, "checkpoints")):
    d = os.path.join(d, "checkpoints")
  if not os.path.isdir(d):
    raise UsageError(f"no checkpoint directory at {workdir_or_ckpt_dir}")
  ckpt = Checkpointer(d)
  if ckpt.latest_step() is None:
    raise UsageError(f"{d} holds no checkpoint")
  return ckpt, ckpt.read_meta()


class StopSignal:
  """Turns SIGTERM (a preempted job) into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. inside some test runners)
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False
