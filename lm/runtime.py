"""The one run lifecycle, for every objective: a task (lm/tasks/) supplies data, loss and
evaluation; everything else is here and the same for all.

  train(config, workdir, task): config -> workdir checks -> state (fresh, resumed, or the
      parameters of train.init_from) -> the loop of jitted steps (lm/train.py: gradient
      accumulation, the mesh rules) with periodic evaluation, metrics (metrics.jsonl and
      TensorBoard), checkpoints and SIGTERM -> a final save -> the task's end-of-run report.
  evaluate(config, workdir, task): the latest checkpoint's evaluation, printed and written
      to the same metrics files.
  load(config, workdir): (run, state, tokenizer, step) of the latest checkpoint.

This module never imports a task: experiments/run.py finds one in lm.tasks and hands it over.
Everything is read and checked (config, workdir, checkpoint, source, data, batch sizes over
the devices) before the workdir is written (lm/workdir.py); bad input is a UsageError.
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
from absl import logging
from flax import nnx

from lm import checkpoint as ckpt_lib
from lm import cli
from lm import data as data_lib
from lm import tokenizers
from lm import train as train_lib
from lm import validate
from lm import workdir as workdir_lib
from lm.errors import UsageError
from lm.model import LEGACY_DEFAULTS, checkpoint_fields, flops_per_token, num_params

# Data fields a checkpoint fixes besides the model's (lm.model.checkpoint_fields): a resumed
# run must read the same token ids.
DATA_FIELDS = ("tokenizer", "path")
H100_BF16_FLOPS = 989e12  # peak dense bf16 FLOP/s of one H100 (SXM), the MFU denominator


class Task:
  """An objective: what the lifecycle asks of it (lm/tasks/lm.py is the example to copy).

  load_data(config, tokenizer) -> (config, tokenizer, data): reads and checks the data (a
      UsageError if bad). tokenizer is the checkpoint's or init_from source's, or None (then
      the task makes one). The config may gain fields the data decides (model.num_classes).
  eval_data(config, tokenizer, data_path) -> data: for --mode=eval (data_path: --data_path).
  batch(data, config, step) -> {name: numpy [train.batch_size, ...]}: the global batch of a
      step, from (seed, step) alone, so a resumed run sees the same batches.
  loss(model, batch, rngs) -> (mean loss, {name: scalar}) on one micro-batch; rngs is None
      or carries the dropout stream (lm/train.py make_train_step).
  evaluate(run, state, data, max_batches) -> {name: value} (val_loss at least); max_batches
      None: the whole held-out split.
  describe(result) -> the log line of an evaluation.
  meta(data) -> extra JSON stored with every checkpoint.
  report(run, state, tokenizer, data): after a finished run (process 0), e.g. samples.
  batch_tokens(batch) -> the token positions a step's batch computes (the logged tokens/s);
      None (the default): train.batch_size * data.seq_len.
  """
  name = ""

  def eval_data(self, config, tokenizer, data_path):
    if data_path is not None:
      raise UsageError(f"--data_path: the {self.name} task reads the data its config names")
    return self.load_data(config, tokenizer)[2]

  def describe(self, result: dict) -> str:
    return f"val_loss {result['val_loss']:.4f}"

  def meta(self, data) -> dict:
    return {}

  def report(self, run, state, tokenizer, data) -> None:
    pass

  def batch_tokens(self, batch) -> int | None:
    return None


# --- metrics ---------------------------------------------------------------------------------

class MetricsWriter:
  """WORKDIR/metrics.jsonl (one JSON object per line) and TensorBoard events; process 0 only.

  Events go through the `tensorboard` package's record writer and protos, which import neither
  PyTorch nor TensorFlow (tensorboardX imports torch whenever it is installed; tensorboard's own
  EventFileWriter looks for TensorFlow through tensorboard.compat.tf and writes from a thread,
  where a full disk would go unnoticed). Files are opened at the first write, so a run that
  writes nothing (a finished run started again) adds no file; every write is flushed, so a
  full disk raises OSError here, at the write. Numbers go to TensorBoard, everything to JSONL.
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
              if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]
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
      self.fail(f"non-finite loss or gradient norm at step {first}", latest_checkpoint)

  @staticmethod
  def fail(what: str, latest_checkpoint: int | None) -> None:
    kept = (f"the latest checkpoint is step {latest_checkpoint}; resume from it"
            if latest_checkpoint is not None else "no checkpoint was saved")
    raise UsageError(f"{what}: training stopped without saving it ({kept}, e.g. with a "
                     f"lower train.learning_rate)")


# --- what a checkpoint fixes -----------------------------------------------------------------

def check_resumable(saved: dict, config) -> None:
  """UsageError naming the first model or data field that `config` changes from `saved` (a
  checkpoint's config) but the checkpoint fixes."""
  for field in checkpoint_fields():
    old = saved["model"].get(field, LEGACY_DEFAULTS.get(field))
    new = config.model.get(field, LEGACY_DEFAULTS.get(field))
    if old != new:
      raise UsageError(f"the workdir's checkpoint has model.{field}={old!r} but the config says "
                       f"{new!r}: use a new --workdir or the old config")
  for field in DATA_FIELDS:
    old, new = saved["data"].get(field), config.data.get(field)
    if old != new:
      raise UsageError(f"the workdir's checkpoint was trained with data.{field}={old!r}, the "
                       f"config says {new!r}: use a new --workdir")


def with_checkpoint_fields(config, saved_model: dict, source: str, keep=()):
  """A copy of `config` whose model fields fixed by a checkpoint are the checkpoint's
  (saved_model: its config's model section), except those in `keep`."""
  saved_model = {**LEGACY_DEFAULTS, **saved_model}  # a checkpoint older than a field
  config = copy.deepcopy(config)
  with config.unlocked():
    for field in checkpoint_fields():
      if field in keep or field not in saved_model:
        continue
      if saved_model[field] != config.model.get(field):
        logging.info("model.%s=%r from %s", field, saved_model[field], source)
        config.model[field] = saved_model[field]
  return config


def adopt_source(config, source: str):
  """Fine-tuning: (config with the model fields of the checkpoint at `source`, its tokenizer).

  Every checkpoint field but num_classes (a classifier may add a head) comes from the
  source, so a config need not repeat them (a converted GPT-2 has learned positions,
  biases, ...); the token ids must be the source's for its embeddings to mean anything.
  """
  src, meta = ckpt_lib.read_meta(source)
  src.close()
  config = with_checkpoint_fields(config, meta["config"]["model"], f"train.init_from={source}",
                                  keep=("num_classes",))
  return config, tokenizers.from_json(meta["tokenizer"])


def load_params_from(run, state: nnx.State, source: str) -> nnx.State:
  """Fine-tuning: model parameters from another run's checkpoint, with a fresh optimizer.

  Parameters the source lacks (a new classification head), or has in another shape (a
  classifier of another number of classes), keep their fresh initialisation.
  """
  src, meta = ckpt_lib.read_meta(source)
  saved = meta["config"]["model"]
  src_cfg = dataclasses.replace(run.model_cfg, num_classes=saved.get("num_classes", 0))
  abstract = train_lib.abstract_state(src_cfg, run.tx, run.mesh, run.rules)
  src_state = src.restore(abstract)
  src.close()
  loaded = dict(nnx.to_flat_state(src_state[0]))
  flat = []
  for path, var in nnx.to_flat_state(state[0]):
    src_var = loaded.get(path)
    if src_var is not None and src_var.value.shape != var.value.shape:
      logging.info("%s: fresh (%s in %s, %s here)", "/".join(map(str, path)),
                   src_var.value.shape, source, var.value.shape)
      src_var = None
    flat.append((path, var if src_var is None else src_var))
  state[0] = nnx.from_flat_state(flat)
  return state


def trained_window(meta: dict) -> int:
  """The attention window a checkpoint's model was trained with (its meta: config, ...): its
  model.attention_window when > 0; 0 (full) when it says 0 or was converted from another
  library (trained at its whole context); else (-1, auto, or a checkpoint older than the
  field) its training data.seq_len, the longest span it ever attended over. Always 0 for an
  encoder (its attention is bidirectional, never windowed)."""
  model = meta["config"]["model"]
  window = model.get("attention_window", -1)
  if window >= 0 or "converted_from" in meta or model.get("arch", "decoder") != "decoder":
    return max(window, 0)
  return meta["config"]["data"]["seq_len"]


def load(config, workdir: str):
  """(run, state, tokenizer, step) of the latest checkpoint in `workdir`.

  The fields the checkpoint fixes come from its own config; everything else (data, batch
  sizes, attention_impl, dtype, attention_window) from `config`, so one may evaluate on other
  data or kernels. model.attention_window -1 (auto) becomes trained_window(): evaluating or
  sampling longer than the training windows keeps each query's keys within the span the model
  was trained on (issue 18: val loss 1.75 at 64 characters, 2.44 at 256 with full attention).
  """
  ckpt, meta = ckpt_lib.read_meta(workdir)
  config = with_checkpoint_fields(config, meta["config"]["model"], workdir)
  with config.unlocked():
    if config.model.get("attention_window", -1) == -1:
      config.model.attention_window = trained_window(meta)
    if config.data.seq_len > config.model.max_seq_len and \
        validate.bounded_by_max_seq_len(config.model):  # e.g. a converted GPT-2
      logging.info("data.seq_len %d -> the checkpoint's max_seq_len %d", config.data.seq_len,
                   config.model.max_seq_len)
      config.data.seq_len = config.model.max_seq_len
  tokenizer = tokenizers.from_json(meta["tokenizer"])
  run = train_lib.make_run(config, tokenizer.vocab_size)
  state = ckpt.restore(run.abstract_state())
  step = ckpt.latest_step()
  ckpt.close()
  return run, state, tokenizer, step


# --- the lifecycle ---------------------------------------------------------------------------

@dataclasses.dataclass
class Job:
  """A training run once everything is read and checked, before anything is written."""
  task: Task
  config: object
  workdir: str
  run: train_lib.Run
  tokenizer: object
  data: object
  ckpt: ckpt_lib.Checkpointer | None
  latest: int | None
  saved: dict | None  # the latest checkpoint's config


def prepare(config, workdir: str, task: Task) -> Job:
  """Reads and checks everything a training run needs; writes nothing."""
  validate.check_config(config, "train")
  workdir_lib.check(workdir, "train")
  tc = config.train
  ckpt, latest = workdir_lib.existing_checkpoints(workdir, tc.keep_checkpoints)
  tokenizer, saved = None, None
  if tc.init_from:  # fine-tuning: the source's model fields and tokenizer
    config, tokenizer = adopt_source(config, tc.init_from)
  if latest is not None:
    meta = ckpt.read_meta(latest)
    saved = meta["config"]
    tokenizer = tokenizers.from_json(meta["tokenizer"])
  config, tokenizer, data = task.load_data(config, tokenizer)
  if saved is not None:
    check_resumable(saved, config)
  run = train_lib.make_run(config, tokenizer.vocab_size)
  train_lib.check_divides_data_parallel(run, micro_batch_size=tc.batch_size // tc.grad_accum,
                                        eval_batch_size=tc.eval_batch_size)
  return Job(task, config, workdir, run, tokenizer, data, ckpt, latest, saved)


def start_state(job: Job, ckpt: ckpt_lib.Checkpointer) -> nnx.State:
  """The resumed state, or a fresh one (with init_from's parameters)."""
  run = job.run
  if job.latest is not None:
    state = ckpt.restore(run.abstract_state(), job.latest)
    logging.info("resumed from %s at step %d", ckpt.directory, job.latest)
    return state
  state = train_lib.init_state(run, job.config.seed)
  if job.config.train.init_from:
    state = load_params_from(run, state, job.config.train.init_from)
  return state


def train(config, workdir: str, task: Task) -> dict:
  """Runs (or resumes) training for `task`; returns the last evaluation's metrics with the
  step reached and the wall time. UsageError for bad input, before the workdir is written."""
  t_start = time.time()
  cli.keep_freed_host_memory()  # no page faults for XLA's per-step buffers (issue 17)
  job = prepare(config, workdir, task)
  config, tc = job.config, job.config.train
  # The state first (restore or init), so that an unreadable checkpoint or a failing init_from
  # leaves the workdir as it was; then the workdir is written.
  state = start_state(job, job.ckpt)
  workdir_lib.commit(workdir, config, job.tokenizer, job.saved, job.latest or 0)  # valid: write
  ckpt = job.ckpt or ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                           keep=tc.keep_checkpoints)
  logging.info("model: %s parameters, %d devices, mesh %s",
               f"{num_params(nnx.merge(job.run.graphdef, state)[0]):,}", jax.device_count(),
               dict(job.run.mesh.shape))
  loop = Loop(job, ckpt)
  with ckpt_lib.StopSignal() as stop, jax.set_mesh(job.run.mesh), loop.writer, ckpt:
    state, step = loop.run(state, job.latest or 0, stop)
  logging.info("done at step %d in %.1f s", step, time.time() - t_start)
  if step >= tc.num_steps and jax.process_index() == 0:
    task.report(job.run, state, job.tokenizer, job.data)
  return {**loop.last_eval, "step": step, "wall_time_s": time.time() - t_start,
          **{f"waited_{k}_s": v for k, v in loop.waited.items()}}


class Loop:
  """The training loop of a prepared job: steps, logs, evaluations, checkpoints, SIGTERM."""

  def __init__(self, job: Job, ckpt: ckpt_lib.Checkpointer):
    self.job, self.ckpt = job, ckpt
    run, config = job.run, job.config
    self.train_step = train_lib.make_train_step(run, job.task.loss)
    self.loss_check = train_lib.make_loss_check(run, job.task.loss)
    self.writer, self.guard = MetricsWriter(job.workdir), NonFiniteGuard()
    self.meta = {"config": config.to_dict(), "tokenizer": job.tokenizer.to_json(),
                 "seed": config.seed, **job.task.meta(job.data)}
    self.tokens_per_step = config.train.batch_size * config.data.seq_len
    self.flops = flops_per_token(run.model_cfg, config.data.seq_len) * self.tokens_per_step
    self.last_eval, self.t_log, self.since_log, self.tokens_since_log = {}, time.time(), 0, 0
    self.waited = {"batches": 0.0, "checkpoints": 0.0}  # seconds the loop waited for them

  def run(self, state, step: int, stop: ckpt_lib.StopSignal):
    """Steps until train.num_steps or a SIGTERM; returns (state, step). The host never holds
    the devices up: the batches are made and put on the devices ahead, in a background
    thread (data.Prefetcher), checkpoints are written in the background (the last one, and
    a SIGTERM's, before returning), and the loop reads device values only at log,
    evaluation and save steps. self.waited adds up the seconds spent waiting for each."""
    job, tc = self.job, self.job.config.train

    def make(s):  # the global batch of step s (the same on every process), on the devices
      batch = job.task.batch(job.data, job.config, s)
      return train_lib.put_micro_batches(job.run, batch, tc.grad_accum)

    t_start = time.time()
    with data_lib.Prefetcher(make, step, tc.num_steps) as batches:
      while step < tc.num_steps:
        t = time.time()
        batch = batches.get(step)
        self.waited["batches"] += time.time() - t
        state, metrics = self.train_step(state, batch, step)
        step += 1
        self.since_log += 1
        self.tokens_since_log += job.task.batch_tokens(batch) or self.tokens_per_step
        self.guard.update(metrics, step)
        last = step == tc.num_steps
        is_log = step % tc.log_every == 0 or last
        is_eval = step % tc.eval_every == 0 or last
        # A SIGTERM saves here, once, even when it arrives on a checkpoint step. Read once: a
        # signal arriving between two reads would stop the run unsaved.
        stopping = stop.requested
        is_save = step % tc.checkpoint_every == 0 or last or stopping
        if is_log or is_eval or is_save:
          self.guard.check(self.ckpt.latest_step())  # the loop syncs here anyway
        if is_log:
          self.log(step, metrics)
        if is_eval:
          self.evaluate(step, state)
        if is_save:
          self.save(step, state, batch, wait=last or stopping)
        if stopping:
          logging.warning("SIGTERM: checkpoint saved at step %d, stopping", step)
          break
    total = time.time() - t_start
    logging.info("the loop waited %.1f%% of its %.1f s for batches, %.1f%% for checkpoints",
                 100 * self.waited["batches"] / total, total,
                 100 * self.waited["checkpoints"] / total)
    return state, step

  def save(self, step: int, state, batch, wait: bool) -> None:
    t = time.time()
    # One forward pass of what is about to be saved: parameters that every forward pass
    # turns into NaN are never saved, even when they are finite themselves.
    if not jnp.isfinite(self.loss_check(state, batch)):
      self.guard.fail(f"the parameters after step {step} give a non-finite loss",
                      self.ckpt.latest_step())
    self.ckpt.save(step, state, {**self.meta, "step": step}, wait=wait)
    self.waited["checkpoints"] += time.time() - t
    self.t_log = time.time()

  def log(self, step: int, metrics: dict) -> None:
    metrics = jax.device_get(metrics)
    dt = (time.time() - self.t_log) / self.since_log
    tokens = self.tokens_since_log / self.since_log  # per step: length buckets vary it
    record = {**metrics, "tokens_per_sec": tokens / dt, "step_time_ms": 1e3 * dt}
    from kernels.bridge import on_gpu
    if on_gpu():
      record["mfu"] = self.flops / dt / (H100_BF16_FLOPS * jax.device_count())
    extra = "".join(f" | {k} {float(v):.4f}" for k, v in metrics.items()
                    if k not in ("train_loss", "lr", "grad_norm"))
    logging.info("step %d/%d | loss %.4f%s | lr %.2e | %.0f tok/s | %.1f ms/step", step,
                 self.job.config.train.num_steps, metrics["train_loss"], extra, metrics["lr"],
                 record["tokens_per_sec"], record["step_time_ms"])
    self.writer.write(step, record)
    self.t_log, self.since_log, self.tokens_since_log = time.time(), 0, 0

  def evaluate(self, step: int, state) -> None:
    job = self.job
    self.last_eval = job.task.evaluate(job.run, state, job.data, job.config.train.eval_batches)
    logging.info("step %d | %s", step, job.task.describe(self.last_eval))
    self.writer.write(step, self.last_eval)
    self.t_log = time.time()  # keep evaluation out of the throughput numbers


def evaluate(config, workdir: str, task: Task, data_path: str | None = None) -> dict:
  """The task's evaluation of the latest checkpoint in `workdir` over the whole held-out
  split (or `data_path`): printed as JSON on stdout first, then written with the step to
  metrics.jsonl and TensorBoard (a failing write never loses it)."""
  validate.check_config(config, "eval")
  run, state, tokenizer, step = load(config, workdir)
  data = task.eval_data(run.config, tokenizer, data_path)
  with jax.set_mesh(run.mesh):
    result = {"mode": "eval", "task": task.name, **({"data": data_path} if data_path else {}),
              **task.evaluate(run, state, data, None)}
  bad = [k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)]
  if bad:  # never print NaN as a result (nor write it: json.dumps would write invalid JSON)
    raise UsageError(f"the checkpoint at step {step} of {workdir} gives non-finite "
                     f"{', '.join(bad)}: its parameters are unusable")
  if jax.process_index() == 0:
    print(json.dumps(result), flush=True)
    with MetricsWriter(workdir) as writer:
      writer.write(step, result)
  logging.info("eval at step %d: %s", step, task.describe(result))
  return result
