"""The train state and its jitted steps, the same for every objective (lm/tasks/).

`make_run(config, vocab_size)` fixes the model graph, mesh, rules, shardings and optimizer
(AdamW, warmup + cosine); `init_state` creates the state already sharded; `make_train_step`
turns a task's loss into one `jax.jit` with in/out shardings (pjit) over `nnx.State`, with
gradient accumulation as a `lax.scan` over micro-batches and dropout keys from (seed, step,
micro-batch); `make_eval_step` does the same for a task's evaluation function. The model's
graph holds the run's own `config.mesh.rules` (Transformer(cfg, rngs, rules)), so every
task's steps place activations by them. The model is merged from the state inside the trace, so no Python object graph is walked per step. The run's lifecycle
(data, resume, loop, metrics, checkpoints) is lm/runtime.py.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lm import sharding
from lm import validate
from lm.errors import UsageError
from lm.model import ModelConfig, build


# Weight decay by what a parameter is (lm/model.py's names), never by its shape: the weight
# matrices of dense layers and the embeddings are decayed; norm scales and biases are not, even
# the attention biases bq/bk/bv of shape [heads, head_dim]. A new name must be added to one set.
DECAYED = frozenset({"embed", "pos_embed", "head", "cls_head",  # embeddings, output heads
                     "wq", "wk", "wv", "wo", "w_in", "w_gate", "w_out",  # dense layers
                     "type_embed", "mlm_w", "pool_w"})  # the encoder's (lm.model.Encoder)
NOT_DECAYED = frozenset({"scale", "bias",  # LayerNorm
                         "bq", "bk", "bv", "bo", "b_in", "b_out", "cls_bias",  # biases
                         "mlm_b", "mlm_bias", "pool_b",
                         "embedding"})  # T5's relative position bias (a bias on the scores)


def decays_weight(path) -> bool:
  """Whether AdamW decays the parameter at `path` (a pytree key path or a tuple of names).

  Decided by the parameter's own name, the last string key of the path (nnx's trailing
  `.value` skipped); raises ValueError for a name in neither DECAYED nor NOT_DECAYED.
  """
  names = _names(path)
  name = next(n for n in reversed(names) if isinstance(n, str) and n != "value")
  if name in DECAYED:
    return True
  if name in NOT_DECAYED:
    return False
  raise ValueError(f"weight decay: parameter {'/'.join(map(str, names))} is in neither "
                   f"DECAYED nor NOT_DECAYED of lm/train.py")


def lr_schedule(train_cfg) -> optax.Schedule:
  """Learning rate of update `step` (0 = the first): peak * (step + 1) / (warmup + 1) during
  warmup, as nanoGPT (the first update is not wasted at lr 0), the peak exactly at
  step = warmup_steps, then a cosine to min_lr_ratio * peak at step = num_steps (and after)."""
  peak, warmup = train_cfg.learning_rate, train_cfg.warmup_steps
  end = peak * train_cfg.min_lr_ratio
  decay_steps = max(train_cfg.num_steps - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    cosine = end + 0.5 * (peak - end) * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup, peak * (step + 1.0) / (warmup + 1.0), cosine)
  return schedule


def _names(path) -> list:
  return [getattr(k, "key", getattr(k, "name", k)) for k in path]


def make_optimizer(train_cfg):
  """(AdamW with lr_schedule and global-norm clipping, the schedule); weight decay only on the
  parameters decays_weight names (dense matrices and embeddings, not norms or biases).

  train.relative_bias_lr != 1 multiplies the updates of T5's relative position bias tables
  (parameters under a `rel_bias` module): AdamW moves each parameter by about lr a step
  whatever its scale, and these are attention logits that must reach several units.
  """
  schedule = lr_schedule(train_cfg)
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: decays_weight(path), params)
  parts = [optax.clip_by_global_norm(train_cfg.grad_clip),
           optax.adamw(schedule, b1=train_cfg.beta1, b2=train_cfg.beta2, eps=train_cfg.adam_eps,
                       weight_decay=train_cfg.weight_decay, mask=decay_mask)]
  bias_lr = train_cfg.get("relative_bias_lr", 1.0)
  if bias_lr != 1.0:  # (no state: checkpoints resume whatever the value)
    bias_mask = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: "rel_bias" in _names(path), params)
    parts.append(optax.masked(optax.scale(bias_lr), bias_mask))
  return optax.chain(*parts), schedule


@dataclasses.dataclass
class Run:
  """Everything the jitted functions close over: model graph, shardings, optimizer."""
  config: object
  model_cfg: ModelConfig
  mesh: jax.sharding.Mesh
  rules: tuple
  graphdef: object
  shardings: nnx.State
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  eval_steps: dict = dataclasses.field(default_factory=dict, repr=False)  # make_eval_step's

  @property
  def batch_sharding(self):
    """[batch, ...] rows over the data-parallel mesh axes."""
    return sharding.batch_sharding(self.mesh, self.rules)

  def abstract_state(self) -> nnx.State:
    """Shapes, dtypes and shardings of the train state, allocating nothing."""
    return abstract_state(self.model_cfg, self.tx, self.mesh, self.rules)


def _build(model_cfg: ModelConfig, tx, seed: int, rules):
  model = build(model_cfg, nnx.Rngs(params=jax.random.key(seed)), rules)
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def abstract_state(model_cfg: ModelConfig, tx, mesh, rules) -> nnx.State:
  """The train state of `model_cfg` as ShapeDtypeStructs with their shardings (a restore
  target), allocating nothing."""
  abstract = nnx.state(nnx.eval_shape(lambda: _build(model_cfg, tx, 0, rules)))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, sharding.state_shardings(abstract, mesh, rules))


def make_run(config, vocab_size: int, mesh=None) -> Run:
  model_cfg = validate.model_config(config, vocab_size)
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  tx, schedule = make_optimizer(config.train)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _build(model_cfg, tx, 0, rules)))
  return Run(config, model_cfg, mesh, rules, graphdef,
             sharding.state_shardings(abstract, mesh, rules), tx, schedule)


def init_state(run: Run, seed: int) -> nnx.State:
  """Fresh parameters and optimizer state, created already sharded (never whole on one device)."""
  init = jax.jit(lambda: nnx.state(_build(run.model_cfg, run.tx, seed, run.rules)),
                 out_shardings=run.shardings)
  with jax.set_mesh(run.mesh):
    return init()


def make_loss_check(run: Run, loss_fn):
  """jit(check)(state, batch) -> the loss of `state` on the first micro-batch of `batch`, no
  dropout: whether a state is fit to save. A finite loss and gradient norm at step k do not
  make the parameters of step k's update usable: a huge learning rate moves them to ~1e30,
  finite, yet every forward pass of them overflows."""

  def check(state, batch):
    model, _ = nnx.merge(run.graphdef, state)
    return loss_fn(model, jax.tree.map(lambda x: x[0], batch), None)[0]

  return jax.jit(check, in_shardings=(run.shardings, None))


def make_train_step(run: Run, loss_fn):
  """jit(step)(state, batch, step) -> (state, metrics) for a task's loss.

  loss_fn(model, micro_batch, rngs) -> (mean loss, {name: scalar}): rngs is None without
  dropout, else an nnx.Rngs with a "dropout" stream of its own per (step, micro-batch).
  batch: {name: array [grad_accum, micro, ...]} (put_micro_batches); the loss, the task's
  metrics and the gradients are averaged over the equal micro-batches. metrics adds
  train_loss, grad_norm and lr. The state is donated.
  """
  seed, dropout = run.config.seed, run.model_cfg.dropout > 0

  def step_fn(state, batch, step):
    model, opt = nnx.merge(run.graphdef, state)
    model_def, params = nnx.split(model)
    base_key = jax.random.fold_in(jax.random.key(seed), step)

    def loss_of(params, micro_batch, i):
      rngs = nnx.Rngs(dropout=jax.random.fold_in(base_key, i)) if dropout else None
      return loss_fn(nnx.merge(model_def, params), micro_batch, rngs)

    def micro(acc, xs):
      i, micro_batch = xs
      out, grads = jax.value_and_grad(loss_of, has_aux=True)(params, micro_batch, i)
      return jax.tree.map(jnp.add, acc, (out, grads)), None

    n = jax.tree.leaves(batch)[0].shape[0]
    first = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), batch)
    out_shape = jax.eval_shape(loss_of, params, first, 0)
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), out_shape)
    zero = (zero, jax.tree.map(jnp.zeros_like, params))
    ((loss, task_metrics), grads), _ = jax.lax.scan(micro, zero, (jnp.arange(n), batch))
    loss, task_metrics, grads = jax.tree.map(lambda x: x / n, (loss, task_metrics, grads))
    opt.update(model, grads)
    metrics = {"train_loss": loss, **task_metrics, "grad_norm": optax.tree.norm(grads),
               "lr": run.schedule(step)}
    return nnx.state((model, opt)), metrics

  return jax.jit(step_fn, in_shardings=(run.shardings, None, None),
                 out_shardings=(run.shardings, None), donate_argnums=0)


def make_eval_step(run: Run, eval_fn):
  """jit(eval)(state, batch) -> eval_fn(model, batch), without dropout; batch {name: array
  [B, ...]} (put_batch). The outputs are replicated: every process can read all of them (a
  few numbers a batch)."""

  if eval_fn in run.eval_steps:  # one compile per run, however often it evaluates
    return run.eval_steps[eval_fn]

  def fn(state, batch):
    model, _ = nnx.merge(run.graphdef, state)
    return eval_fn(model, batch)

  replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
  step = jax.jit(fn, in_shardings=(run.shardings, None),
                 out_shardings=replicated)
  run.eval_steps[eval_fn] = step
  return step


def put_batch(run: Run, batch, micro: bool = False):
  """The global batch (the same numpy arrays on every process: one array or a dict of them,
  each [batch, ...], or [grad_accum, batch, ...] when micro) -> arrays sharded over the
  data-parallel axes. Each process hands its devices exactly the rows they hold, whatever the
  mesh's device order (tensor or FSDP axes may span hosts)."""

  def put(x):
    x = np.asarray(x)
    spec = sharding.batch_sharding(run.mesh, run.rules, ndim=x.ndim - micro).spec
    where = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec(
        *((None,) if micro else ()), *spec))
    return jax.make_array_from_callback(x.shape, where, lambda index: x[index])

  return jax.tree.map(put, batch)


def put_micro_batches(run: Run, batch: dict, grad_accum: int) -> dict:
  """A global batch {name: [batch_size, ...]} split into grad_accum equal micro-batches
  [grad_accum, batch_size / grad_accum, ...] and put on the devices (make_train_step's
  input)."""
  return put_batch(run, {k: np.asarray(v).reshape(grad_accum, -1, *np.shape(v)[1:])
                         for k, v in batch.items()}, micro=True)


def check_divides_data_parallel(run: Run, **sizes) -> None:
  """Batch dimensions must split evenly over the data-parallel devices (data x fsdp)."""
  spec = run.batch_sharding.spec[0]
  axes = spec if isinstance(spec, tuple) else (spec,) if spec else ()
  ways = math.prod(run.mesh.shape[a] for a in axes)
  for name, size in sizes.items():
    if size % ways:
      raise UsageError(f"{name}={size} does not split evenly over the {ways} data-parallel "
                       f"devices (mesh {' x '.join(axes)})")
