"""Device mesh and logical-to-mesh axis rules.

The model names its axes ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", ...);
the config maps them to the mesh axes ("data", "fsdp", "tensor") with a short list of rules.
One rule list covers data parallel, FSDP and tensor parallel at once: an axis of size 1 in
the mesh simply shards nothing, so choosing a strategy is choosing `config.mesh` sizes.
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lm.errors import UsageError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or a tuple of them). Names absent here stay replicated.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("heads_merged", "tensor"),
    ("mlp", "tensor"),
)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """Mesh of shape (data, fsdp, tensor); one size may be -1 to take the remaining devices."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
  if sizes.count(-1) > 1:
    raise UsageError(f"mesh sizes {tuple(sizes)}: at most one of data/fsdp/tensor may be -1")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if known <= 0 or n % known:
      raise UsageError(f"mesh sizes {tuple(sizes)} do not fit {n} devices")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n or min(sizes) < 1:
    raise UsageError(f"mesh data*fsdp*tensor = {'*'.join(map(str, sizes))} "
                     f"but there are {n} devices")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(axes, rules) -> P:
  """PartitionSpec for logical `axes`; a mesh axis is used at most once per array."""
  table = dict(rules)
  used, spec = set(), []
  for name in axes:
    target = table.get(name) if name is not None else None
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    targets = tuple(t for t in targets if t not in used)
    used.update(targets)
    spec.append(targets[0] if len(targets) == 1 else (targets or None))
  return P(*spec)


def _spec_of(x: nnx.Variable, rules) -> P:
  axes = x.get_metadata().get("out_sharding")
  return logical_to_spec(axes, rules) if axes else P()


def state_shardings(state: nnx.State, mesh, rules) -> nnx.State:
  """NamedShardings for every variable of an nnx.State, from its logical axis names.

  Optimizer moments inherit their parameter's names, so they shard the same way (ZeRO-3
  when "embed" maps to "fsdp").
  """
  return jax.tree.map(lambda x: x.replace(NamedSharding(mesh, _spec_of(x, rules))), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh, rules, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, ...] array: rows split over the data-parallel axes."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))
