"""Helpers for the kernels' ``custom_vjp`` rules with ``symbolic_zeros=True``.

With symbolic zeros the forward rule receives each argument as a
``CustomVJPPrimal`` (``.value``, ``.perturbed``), so it can tell whether the
attention bias needs a gradient (``perturbed`` is False for a constant, a
``stop_gradient``-ed bias or one that is not differentiated) and the backward
rule computes dBias only then.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def primal(x):
    """The value of a CustomVJPPrimal (None stays None)."""
    return None if x is None else x.value


def wants_grad(x) -> bool:
    """True when the CustomVJPPrimal ``x`` is differentiated (None: False)."""
    return x is not None and bool(x.perturbed)


def grad_flag(wanted: bool):
    """A residual that says "compute this gradient" by its structure alone
    (residuals must be pytrees of arrays): ``()`` for yes, ``None`` for no;
    test it with ``flag is not None``."""
    return () if wanted else None


def dense_cotangent(ct):
    """A symbolic-zero output cotangent as zeros; any other cotangent as is."""
    if isinstance(ct, jax.custom_derivatives.SymbolicZero):
        return jnp.zeros(ct.shape, ct.dtype)
    return ct


def sum_bias_grad(dbias, bias):
    """dBias ``[batch, ...]`` (fp32) reduced to the bias's shape and dtype: summed
    over the batch for a batch-1 bias (in XLA, deterministic)."""
    if bias.shape[0] != dbias.shape[0]:
        dbias = dbias.sum(axis=0, keepdims=True)
    return dbias.astype(bias.dtype)
