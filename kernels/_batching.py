"""vmap support for kernel calls: fold the vmapped axis into the batch axis."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def fold_vmap(fn):
    """Wrap ``fn(*arrays) -> tuple of arrays`` with a ``jax.custom_batching.custom_vmap``
    rule that folds a vmapped axis into axis 0 of every operand and result.

    Valid for our kernel calls because every operand and result has the
    attention batch as its leading axis, and rows of the batch are independent:
    a vmapped call becomes one kernel launch over ``axis_size * batch`` rows
    (jax-triton's custom call has no batching rule of its own).  Unbatched
    operands are broadcast.  Nested vmaps recurse through the same rule.
    """

    @jax.custom_batching.custom_vmap
    def wrapped(*args):
        return fn(*args)

    @wrapped.def_vmap
    def _rule(axis_size, in_batched, *args):
        flat = []
        for a, batched in zip(args, in_batched):
            if not batched:
                a = jnp.broadcast_to(a[None], (axis_size,) + a.shape)
            flat.append(a.reshape((axis_size * a.shape[1],) + a.shape[2:]))
        outs = wrapped(*flat)
        outs = tuple(o.reshape((axis_size, o.shape[0] // axis_size) + o.shape[1:]) for o in outs)
        return outs, tuple(True for _ in outs)

    return wrapped
