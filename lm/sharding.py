"""Device mesh and logical-to-mesh axis rules.

The model names its axes ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", ...);
the config maps them to the mesh axes ("data", "fsdp", "tensor") with a short list of rules.
One rule list covers data parallel, FSDP and tensor parallel at once: an axis of size 1 in
the mesh simply shards nothing, so choosing a strategy is choosing `config.mesh` sizes.
RULE_SETS names narrower lists (pure DP, FSDP only, TP only) for when a mesh axis should be
used for the batch alone.

Inside a jitted function traced under `jax.set_mesh(mesh)`:
  constrain(x, ("batch", None, None), rules)   a sharding constraint by logical names
  shard_heads(kernel, q, k, v, rules=...)      runs an attention kernel that cannot partition
                                               itself (the Triton custom call) per device,
                                               under shard_map
Both do nothing special without a mesh or on one device. The rules are always an argument:
the model holds its run's rules (lm.model.Transformer(cfg, rngs, rules)), so a trace never
falls back on rules it was not given.
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

# Named presets. "batch" always spans data and fsdp (a size-1 axis adds nothing).
_BATCH = (("batch", ("data", "fsdp")),)
_TP = (("vocab", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"),
       ("heads_merged", "tensor"), ("mlp", "tensor"))
RULE_SETS = {
    "dp": _BATCH,  # every parameter replicated
    "fsdp": _BATCH + (("embed", "fsdp"),),  # ZeRO-3: params and moments split on d_model
    "tp": _BATCH + _TP,  # Megatron: heads and MLP hidden split, vocab split
    "fsdp_tp": DEFAULT_RULES,
}

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


def _spec_of(x: nnx.Variable, rules, mesh=None) -> P:
  axes = x.get_metadata().get("out_sharding")
  if not axes:
    return P()
  spec = logical_to_spec(axes, rules)
  if mesh is None:
    return spec
  # A dimension its mesh axes do not divide (e.g. a 65-character vocab over tensor=2) stays
  # whole rather than failing: jit needs shardings that divide evenly.
  return P(*(_fit(e, d, mesh) for e, d in zip(spec, x.get_value().shape)))


def state_shardings(state: nnx.State, mesh, rules) -> nnx.State:
  """NamedShardings for every variable of an nnx.State, from its logical axis names.

  Optimizer moments inherit their parameter's names, so they shard the same way (ZeRO-3
  when "embed" maps to "fsdp").
  """
  return jax.tree.map(lambda x: x.replace(NamedSharding(mesh, _spec_of(x, rules, mesh))), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def partition_specs(state: nnx.State, rules, mesh=None) -> dict[str, P]:
  """{"0/blocks/0/attn/wq": PartitionSpec, ...} for every variable (for tables and tests);
  `mesh` (a Mesh or AbstractMesh) also drops mesh axes that do not divide a dimension."""
  return {"/".join(map(str, path)): _spec_of(x, rules, mesh)
          for path, x in nnx.to_flat_state(state)}


def batch_sharding(mesh, rules, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, ...] array: rows split over the data-parallel axes."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def _active_mesh():
  """The mesh set with `jax.set_mesh`, or None when there is none or it has one device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  return mesh


def _mesh_axes(entry, mesh) -> tuple:
  """A PartitionSpec entry as a tuple of the mesh's axis names (unknown names dropped)."""
  names = (entry,) if isinstance(entry, str) else tuple(entry or ())
  return tuple(n for n in names if n in mesh.axis_names)


def _fit(entry, dim: int, mesh):
  """Keeps the leading mesh axes of `entry` whose product divides `dim` (else replicates)."""
  kept, size = [], 1
  for name in _mesh_axes(entry, mesh):
    if dim % (size * mesh.shape[name]):
      break
    kept.append(name)
    size *= mesh.shape[name]
  return tuple(kept) or None


def constrain(x, axes, rules=DEFAULT_RULES):
  """with_sharding_constraint by logical axis names (mapped by `rules`) under the current
  mesh; a no-op without one. A mesh axis that does not divide its dimension is dropped (e.g.
  batch 1 when sampling)."""
  mesh = _active_mesh()
  if mesh is None:
    return x
  spec = logical_to_spec(axes, rules)
  return jax.lax.with_sharding_constraint(
      x, P(*(_fit(e, d, mesh) for e, d in zip(spec, x.shape))))


def shard_heads(kernel, q, k, v, *, rules=DEFAULT_RULES, segment_ids=None, bias=None,
                **kwargs):
  """`kernel(q, k, v, segment_ids=..., bias=..., **kwargs)` run by every device on its shard.

  A Triton custom call (or the interpreter's pure_callback) cannot be partitioned by XLA,
  which would all-gather q, k, v and run it whole everywhere. Attention is independent per
  (batch row, head), so shard_map splits batch over the mesh axes of "batch" and heads (query
  and key/value alike) over those of "heads" (by `rules`) and calls the kernel on the local
  blocks.
  q [B, T, H, D], k/v [B, S, KVH, D], segment_ids None, [B, T] or a pair ([B, T], [B, S]);
  bias None or [1 or B, H, T, S], split like the heads (and like the batch when it has B
  rows; a batch-1 bias is whole on every device). `bias` is passed to the kernel only when
  given (kernels without one keep working).
  """
  extra = {} if bias is None else {"bias": bias}
  mesh = _active_mesh()
  if mesh is None:
    return kernel(q, k, v, segment_ids=segment_ids, **extra, **kwargs)
  batch = _fit(logical_to_spec(("batch",), rules)[0], q.shape[0], mesh)
  heads = _mesh_axes(logical_to_spec(("heads",), rules)[0], mesh)
  n = math.prod(mesh.shape[a] for a in heads)
  if q.shape[2] % n or k.shape[2] % n:
    raise ValueError(
        f"attention: {q.shape[2]} query heads and {k.shape[2]} key/value heads must both be "
        f"divisible by the {'*'.join(heads)} mesh size {n} that splits heads; change "
        f"model.num_heads/num_kv_heads or config.mesh.tensor")
  heads = heads or None
  qkv = P(batch, None, heads, None)
  seg = P(batch, None)
  # the optional operands travel as a dict (a pytree: its specs are a dict of the same keys)
  opt, opt_specs = {}, {}
  if isinstance(segment_ids, (tuple, list)):
    opt["segment_ids"], opt_specs["segment_ids"] = tuple(segment_ids), (seg, seg)
  elif segment_ids is not None:
    opt["segment_ids"], opt_specs["segment_ids"] = segment_ids, seg
  if bias is not None:
    opt["bias"] = bias
    opt_specs["bias"] = P(batch if bias.shape[0] > 1 else None, heads, None, None)

  def fn(q, k, v, opt):
    return kernel(q, k, v, **{"segment_ids": None, **opt}, **kwargs)

  return jax.shard_map(fn, in_specs=(qkv, qkv, qkv, opt_specs), out_specs=qkv,
                       check_vma=False)(q, k, v, opt)
