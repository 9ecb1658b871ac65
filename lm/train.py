"""Training by maximum likelihood: next-token cross-entropy, AdamW, a jitted step over pure state.

`train(config, workdir)` is the whole job: data -> model -> sharded state (fresh, resumed or
initialised from another run) -> loop of jitted steps with periodic evaluation, metrics and
checkpoints -> a final checkpoint and a few samples. The step is one `jax.jit` with in/out
shardings (pjit) over `nnx.State`; the model is merged from it inside the trace, so no Python
object graph is walked per step.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from lm import checkpoint as ckpt_lib
from lm import data as data_lib
from lm import sharding
from lm import tokenizers
from lm import validate
from lm import workdir as workdir_lib
from lm.errors import UsageError
from lm.model import ModelConfig, Transformer, flops_per_token, num_params

# Model fields that change parameter shapes: a resumed run must agree on all of them.
SHAPE_FIELDS = ("num_layers", "num_heads", "num_kv_heads", "d_model", "d_ff", "positions", "mlp",
                "use_bias", "qkv_bias", "tie_embeddings", "max_seq_len", "norm", "norm_type",
                "num_classes")
# Fields that change no shape but the model's function: loading a checkpoint takes them from it.
NUMERIC_FIELDS = ("ln_eps", "rope_theta", "rope_scaling")
# What checkpoints written before a field existed meant by its absence.
LEGACY_DEFAULTS = {"norm_type": "layernorm", "qkv_bias": False, "rope_scaling": ""}


def model_config(config, vocab_size: int) -> ModelConfig:
  return validate.model_config(config, vocab_size)


# Weight decay by what a parameter is (lm/model.py's names), never by its shape: the weight
# matrices of dense layers and the embeddings are decayed; norm scales and biases are not, even
# the attention biases bq/bk/bv of shape [heads, head_dim]. A new name must be added to one set.
DECAYED = frozenset({"embed", "pos_embed", "head", "cls_head",  # embeddings, output heads
                     "wq", "wk", "wv", "wo", "w_in", "w_gate", "w_out"})  # dense layers
NOT_DECAYED = frozenset({"scale", "bias",  # LayerNorm
                         "bq", "bk", "bv", "bo", "b_in", "b_out", "cls_bias"})  # biases


def decays_weight(path) -> bool:
  """Whether AdamW decays the parameter at `path` (a pytree key path or a tuple of names).

  Decided by the parameter's own name, the last string key of the path (nnx's trailing
  `.value` skipped); raises ValueError for a name in neither DECAYED nor NOT_DECAYED.
  """
  names = [getattr(k, "key", getattr(k, "name", k)) for k in path]
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


def make_optimizer(train_cfg):
  """(AdamW with lr_schedule and global-norm clipping, the schedule); weight decay only on the
  parameters decays_weight names (dense matrices and embeddings, not norms or biases)."""
  schedule = lr_schedule(train_cfg)
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: decays_weight(path), params)
  tx = optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip),
      optax.adamw(schedule, b1=train_cfg.beta1, b2=train_cfg.beta2,
                  weight_decay=train_cfg.weight_decay, mask=decay_mask))
  return tx, schedule


def cross_entropy(logits, targets, weights=None):
  """Summed next-token negative log-likelihood and the number of scored tokens."""
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  if weights is None:
    return nll.sum(), jnp.asarray(nll.size, jnp.float32)
  return (nll * weights).sum(), weights.sum()


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

  @property
  def batch_sharding(self):
    """[batch, ...] rows over the data-parallel mesh axes."""
    return sharding.batch_sharding(self.mesh, self.rules)

  @property
  def micro_batch_sharding(self):
    """[grad_accum, batch, ...]: each micro-batch split like a batch."""
    spec = jax.sharding.PartitionSpec(None, *self.batch_sharding.spec)
    return jax.sharding.NamedSharding(self.mesh, spec)

  def abstract_state(self) -> nnx.State:
    """Shapes, dtypes and shardings of the train state, allocating nothing."""
    abstract = _abstract_state(self.model_cfg, self.tx)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, self.shardings)


def _build(model_cfg: ModelConfig, tx, seed: int):
  model = Transformer(model_cfg, nnx.Rngs(params=jax.random.key(seed)))
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def _abstract_state(model_cfg, tx):
  return nnx.state(nnx.eval_shape(lambda: _build(model_cfg, tx, 0)))


def make_run(config, vocab_size: int, mesh=None) -> Run:
  model_cfg = model_config(config, vocab_size)
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  tx, schedule = make_optimizer(config.train)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _build(model_cfg, tx, 0)))
  return Run(config, model_cfg, mesh, rules, graphdef,
             sharding.state_shardings(abstract, mesh, rules), tx, schedule)


def init_state(run: Run, seed: int) -> nnx.State:
  """Fresh parameters and optimizer state, created already sharded (never whole on one device)."""
  init = jax.jit(lambda: nnx.state(_build(run.model_cfg, run.tx, seed)),
                 out_shardings=run.shardings)
  with jax.set_mesh(run.mesh):
    return init()


def make_train_step(run: Run):
  """jit(step)(state, batch [accum, micro, seq_len+1], step) -> (state, metrics)."""
  cfg = run.config
  dropout = run.model_cfg.dropout > 0

  def loss_fn(params, model_def, tokens, key):
    model = nnx.merge(model_def, params)
    rngs = nnx.Rngs(dropout=key) if dropout else None
    loss_sum, count = cross_entropy(model(tokens[:, :-1], rngs=rngs), tokens[:, 1:])
    return loss_sum / count

  def step_fn(state, batch, step):
    model, opt = nnx.merge(run.graphdef, state)
    model_def, params = nnx.split(model)
    base_key = jax.random.fold_in(jax.random.key(cfg.seed), step)

    def micro(acc, xs):
      i, tokens = xs
      loss, grads = jax.value_and_grad(loss_fn)(params, model_def, tokens,
                                                jax.random.fold_in(base_key, i))
      return jax.tree.map(jnp.add, acc, (loss, grads)), None

    zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    n = batch.shape[0]
    (loss, grads), _ = jax.lax.scan(micro, zero, (jnp.arange(n), batch))
    loss, grads = jax.tree.map(lambda x: x / n, (loss, grads))
    opt.update(model, grads)
    metrics = {"train_loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": run.schedule(step)}
    return nnx.state((model, opt)), metrics

  return jax.jit(sharding.with_rules(step_fn, run.rules),
                 in_shardings=(run.shardings, run.micro_batch_sharding, None),
                 out_shardings=(run.shardings, None), donate_argnums=0)


def make_eval_step(run: Run):
  """jit(eval)(state, tokens [B, seq_len+1], weights [B, seq_len]) -> (loss sum, count)."""

  def eval_fn(state, tokens, weights):
    model, _ = nnx.merge(run.graphdef, state)
    return cross_entropy(model(tokens[:, :-1]), tokens[:, 1:], weights)

  return jax.jit(sharding.with_rules(eval_fn, run.rules),
                 in_shardings=(run.shardings, run.batch_sharding, run.batch_sharding))


def put_batch(run: Run, batch: np.ndarray, sharding_=None) -> jax.Array:
  """The global batch (the same numpy array on every process) -> one array sharded over the
  data-parallel axes. Each process hands its devices exactly the rows they hold, whatever the
  mesh's device order (tensor or FSDP axes may span hosts)."""
  return jax.make_array_from_callback(batch.shape, sharding_ or run.batch_sharding,
                                      lambda index: batch[index])


def evaluate(run: Run, eval_step, state, corpus: data_lib.Corpus, batch_size: int,
             max_batches: int | None = None) -> dict:
  """Validation loss (nats/token), perplexity and bits per byte over (part of) the split."""
  check_divides_data_parallel(run, eval_batch_size=batch_size)
  total, count = 0.0, 0.0
  for tokens, weights in data_lib.eval_batches(corpus.val, seq_len=run.config.data.seq_len,
                                               batch_size=batch_size, max_batches=max_batches):
    s, c = eval_step(state, put_batch(run, tokens), put_batch(run, weights))
    total, count = total + float(s), count + float(c)
  loss = total / max(count, 1.0)
  out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(count)}
  if corpus.val_bytes:
    out["val_bpb"] = loss / math.log(2) * len(corpus.val) / corpus.val_bytes
  return out


class MetricsWriter:
  """WORKDIR/metrics.jsonl (one JSON object per line) and TensorBoard events; process 0 only.

  Events go through the `tensorboard` package's record writer and protos, which import neither
  PyTorch nor TensorFlow (tensorboardX imports torch whenever it is installed; tensorboard's own
  EventFileWriter looks for TensorFlow through tensorboard.compat.tf and writes from a thread,
  where a full disk would go unnoticed). Files are opened at the first write, so a run that
  writes nothing (a finished run started again) adds no file; every write is flushed, so a
  full disk raises OSError here, at the write.
  """

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self.workdir = workdir
    self.file = self.tb = None

  def _open(self) -> None:
    import socket
    from tensorboard.summary.writer.record_writer import RecordWriter
    self.file = open(os.path.join(self.workdir, "metrics.jsonl"), "a", encoding="utf-8")
    tb_dir = os.path.join(self.workdir, "tensorboard")
    os.makedirs(tb_dir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
    self.tb = RecordWriter(open(os.path.join(tb_dir, name), "wb"))
    self._event(file_version="brain.Event:2")

  def _event(self, **fields) -> None:
    from tensorboard.compat.proto import event_pb2
    self.tb.write(event_pb2.Event(wall_time=time.time(), **fields).SerializeToString())
    self.tb.flush()

  def write(self, step: int, metrics: dict) -> None:
    if not self.active:
      return
    from tensorboard.compat.proto import summary_pb2
    if self.file is None:
      self._open()
    record = {"step": int(step), **{k: v.item() if hasattr(v, "item") else v
                                     for k, v in metrics.items()}}
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in record.items()
              if k != "step" and isinstance(v, (int, float))]
    self._event(step=int(step), summary=summary_pb2.Summary(value=values))

  def close(self) -> None:
    for f in (self.file, self.tb):
      if f is not None:
        f.close()
    self.file = self.tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False


@jax.jit
def _first_nonfinite(first, loss, grad_norm, step):
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  return jnp.where((first < 0) & ~ok, step, first)


class NonFiniteGuard:
  """The first step whose loss or gradient norm was not finite, kept on the device.

  `update` after every step dispatches one tiny jitted op and does not wait for it (no
  host sync per step); `check` reads the value (a sync) and is called only where the loop
  syncs anyway: before metrics are written, before an evaluation and before every save, so a
  non-finite state is never saved nor logged. Once non-finite, the parameters stay so: the
  run stops (UsageError naming the step) and the last good checkpoint stays the latest.
  """

  def __init__(self):
    self.first = jnp.asarray(-1, jnp.int32)

  def update(self, metrics: dict, step: int) -> None:
    """metrics of the update that makes `step` steps done (1-based, as the logs count)."""
    self.first = _first_nonfinite(self.first, metrics["train_loss"], metrics["grad_norm"], step)

  def check(self, latest_checkpoint: int | None) -> None:
    first = int(self.first)
    if first >= 0:
      kept = (f"the latest checkpoint is step {latest_checkpoint}; resume from it"
              if latest_checkpoint is not None else "no checkpoint was saved")
      raise UsageError(f"non-finite loss or gradient norm at step {first}: training stopped "
                       f"without saving it ({kept}, e.g. with a lower train.learning_rate)")


def _check_resumable(saved: dict, config) -> None:
  for field in SHAPE_FIELDS:
    old, new = saved["model"].get(field, LEGACY_DEFAULTS.get(field)), config.model.get(field)
    if old != new:
      raise UsageError(f"the workdir's checkpoint has model.{field}={old!r} but the config says "
                       f"{new!r}: use a new --workdir or the old config")
  for field in ("tokenizer", "path"):
    old, new = saved["data"].get(field), config.data.get(field)
    if old != new:
      raise UsageError(f"the workdir's checkpoint was trained with data.{field}={old!r}, the "
                       f"config says {new!r}: use a new --workdir")


def write_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def check_divides_data_parallel(run: Run, **sizes) -> None:
  """Batch dimensions must split evenly over the data-parallel devices (data x fsdp)."""
  spec = run.batch_sharding.spec[0]
  axes = spec if isinstance(spec, tuple) else (spec,) if spec else ()
  ways = math.prod(run.mesh.shape[a] for a in axes)
  for name, size in sizes.items():
    if size % ways:
      raise UsageError(f"{name}={size} does not split evenly over the {ways} data-parallel "
                       f"devices (mesh {' x '.join(axes)})")


def train(config, workdir: str) -> dict:
  """Runs (or resumes) training; returns the last evaluation's metrics.

  Everything is read and checked (config, workdir, checkpoint, data, model, batch sizes over
  the devices) before the workdir is written; UsageError if anything is wrong.
  """
  validate.check_config(config, "train")
  workdir_lib.check(workdir, "train")
  t_start = time.time()
  tc = config.train
  ckpt, latest = workdir_lib.existing_checkpoints(workdir, tc.keep_checkpoints)
  tokenizer, saved = None, None
  if tc.init_from:  # fine-tuning: the source's model shape and tokenizer (see adopt_source)
    config, tokenizer = adopt_source(config, tc.init_from)
  if latest is not None:
    meta = ckpt.read_meta(latest)
    saved = meta["config"]
    _check_resumable(saved, config)
    tokenizer = tokenizers.from_json(meta["tokenizer"])
  corpus = data_lib.load_corpus(config.data, tokenizer)
  tokenizer = corpus.tokenizer
  run = make_run(config, tokenizer.vocab_size)
  micro = tc.batch_size // tc.grad_accum
  check_divides_data_parallel(run, micro_batch_size=micro, eval_batch_size=tc.eval_batch_size)
  workdir_lib.commit(workdir, config, tokenizer, saved, latest or 0)  # valid: now write
  ckpt = ckpt or ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       keep=tc.keep_checkpoints)

  if latest is not None:
    state = ckpt.restore(run.abstract_state(), latest)
    logging.info("resumed from %s at step %d", ckpt.directory, latest)
  else:
    state = init_state(run, config.seed)
    if tc.init_from:
      state = _load_params_from(run, state, tc.init_from)
  step = latest or 0
  logging.info("model: %s parameters, %d devices, mesh %s",
               f"{num_params(nnx.merge(run.graphdef, state)[0]):,}", jax.device_count(),
               dict(run.mesh.shape))

  meta = {"config": config.to_dict(), "tokenizer": tokenizer.to_json(), "seed": config.seed}
  train_step, eval_step = make_train_step(run), make_eval_step(run)
  writer, guard = MetricsWriter(workdir), NonFiniteGuard()
  tokens_per_step = tc.batch_size * config.data.seq_len
  flops = flops_per_token(run.model_cfg, config.data.seq_len) * tokens_per_step
  last_eval, t_log, steps_since_log = {}, time.time(), 0

  def save(at_step):
    ckpt.save(at_step, state, {**meta, "step": at_step})

  with ckpt_lib.StopSignal() as stop, jax.set_mesh(run.mesh), writer, ckpt:
    while step < tc.num_steps:
      # Every process draws the whole (small) global batch; put_batch hands out the rows.
      batch = data_lib.get_batch(corpus.train, seed=config.seed, step=step,
                                 batch_size=tc.batch_size, seq_len=config.data.seq_len)
      batch = put_batch(run, batch.reshape(tc.grad_accum, micro, -1), run.micro_batch_sharding)
      state, metrics = train_step(state, batch, step)
      step += 1
      steps_since_log += 1
      guard.update(metrics, step)
      is_log = step % tc.log_every == 0 or step == tc.num_steps
      is_eval = step % tc.eval_every == 0 or step == tc.num_steps
      is_save = step % tc.checkpoint_every == 0 or step == tc.num_steps
      if is_log or is_eval or is_save or stop.requested:
        guard.check(ckpt.latest_step())  # the loop syncs here anyway
      if is_log:
        metrics = jax.device_get(metrics)
        dt = (time.time() - t_log) / steps_since_log
        record = {**metrics, "tokens_per_sec": tokens_per_step / dt, "step_time_ms": 1e3 * dt}
        if jax.default_backend() == "gpu":
          record["mfu"] = flops / dt / (989e12 * jax.device_count())
        logging.info("step %d/%d | loss %.4f | lr %.2e | %.0f tok/s | %.1f ms/step", step,
                     tc.num_steps, metrics["train_loss"], metrics["lr"],
                     record["tokens_per_sec"], record["step_time_ms"])
        writer.write(step, record)
        t_log, steps_since_log = time.time(), 0
      if is_eval:
        last_eval = evaluate(run, eval_step, state, corpus, tc.eval_batch_size, tc.eval_batches)
        logging.info("step %d | val_loss %.4f | val_ppl %.2f | val_bpb %s", step,
                     last_eval["val_loss"], last_eval["val_ppl"],
                     f"{last_eval['val_bpb']:.4f}" if "val_bpb" in last_eval else "n/a")
        writer.write(step, last_eval)
        t_log = time.time()  # keep evaluation out of the throughput numbers
      if is_save:
        save(step)
        t_log = time.time()
      if stop.requested:
        logging.warning("SIGTERM: saving a checkpoint at step %d and stopping", step)
        save(step)
        break
  logging.info("done at step %d in %.1f s", step, time.time() - t_start)
  if config.sample.num_samples and step >= tc.num_steps and jax.process_index() == 0:
    from lm import sample as sample_lib
    model = nnx.merge(run.graphdef, state)[0]
    for text in sample_lib.sample_text(model, tokenizer, config.sample):
      print(f"--- sample ---\n{text}", flush=True)
  return {**last_eval, "step": step, "wall_time_s": time.time() - t_start}


def adopt_source(config, source: str):
  """Fine-tuning: (config with the model shape of the checkpoint at `source`, its tokenizer).

  Every SHAPE_FIELD but num_classes (a classifier may add a head), and NUMERIC_FIELDS, come from
  the source, so a config need not repeat them (a converted GPT-2 has learned positions, biases,
  ...); the token ids must be the source's for its embeddings to mean anything.
  """
  src, meta = ckpt_lib.read_meta(source)
  src.close()
  saved = meta["config"]["model"]
  config = copy.deepcopy(config)
  with config.unlocked():
    for field in SHAPE_FIELDS + NUMERIC_FIELDS:
      if field != "num_classes" and field in saved and saved[field] != config.model.get(field):
        logging.info("train.init_from: model.%s=%r from %s", field, saved[field], source)
        config.model[field] = saved[field]
  return config, tokenizers.from_json(meta["tokenizer"])


def _load_params_from(run: Run, state: nnx.State, source: str) -> nnx.State:
  """Fine-tuning: model parameters from another run's checkpoint, with a fresh optimizer.

  Parameters the source lacks (a new classification head) keep their fresh initialisation.
  """
  src, meta = ckpt_lib.read_meta(source)
  saved = meta["config"]["model"]
  for field in SHAPE_FIELDS:
    old = saved.get(field, LEGACY_DEFAULTS.get(field))
    if field != "num_classes" and old != run.config.model.get(field):
      raise UsageError(f"train.init_from={source}: its model.{field}={old!r} "
                       f"differs from this config's {run.config.model.get(field)!r}")
  src_cfg = dataclasses.replace(run.model_cfg, num_classes=saved.get("num_classes", 0))
  abstract = _abstract_state(src_cfg, run.tx)
  shardings = sharding.state_shardings(abstract, run.mesh, run.rules)
  src_state = src.restore(jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings))
  src.close()
  loaded = dict(nnx.to_flat_state(src_state[0]))
  flat = [(path, loaded.get(path, var)) for path, var in nnx.to_flat_state(state[0])]
  state[0] = nnx.from_flat_state(flat)
  return state
