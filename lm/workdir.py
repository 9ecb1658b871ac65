"""A run directory's life: checked before use, written only once the run is known valid.

Layout: checkpoints/<step>/, config.json (the config of the run's first start, never
rewritten), config_history.jsonl (one line per later start that changed a field: the step it
took effect and the old and new values), tokenizer.json, metrics.jsonl, tensorboard/.
A job reads what it needs first (`check`, `existing_checkpoints`), validates everything, and
only then calls `commit`, so a failing command leaves the workdir as it found it.
"""

from __future__ import annotations

import json
import os

from absl import logging

from lm.errors import UsageError

CONFIG = "config.json"
HISTORY = "config_history.jsonl"


def check(workdir: str, mode: str) -> None:
  """UsageError unless `workdir` can serve `mode` (train: a directory, or none yet, under a
  writable parent; eval/sample: a directory holding checkpoints)."""
  if not workdir:
    raise UsageError("--workdir is empty: give a directory, e.g. --workdir=runs/base")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UsageError(f"--workdir={workdir} is a file, not a directory")
  if mode != "train":
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
      raise UsageError(f"--workdir={workdir} holds no checkpoints to {mode} (train first)")
    return
  parent = os.path.abspath(workdir)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UsageError(f"--workdir={workdir}: {parent} is a file, not a directory")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UsageError(f"--workdir={workdir}: {parent} is not writable")


def existing_checkpoints(workdir: str, keep: int = 3):
  """(Checkpointer, latest step) of a workdir that holds checkpoints, else (None, None);
  creates nothing."""
  from lm import checkpoint as ckpt_lib
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return None, None
  ckpt = ckpt_lib.Checkpointer(directory, keep=keep)
  return ckpt, ckpt.latest_step()


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(saved: dict, config) -> dict:
  """{field: [old, new]} between a checkpoint's config (JSON) and `config`."""
  old = _flat(saved)
  new = _flat(json.loads(config.to_json_best_effort()))
  return {k: [old.get(k), new.get(k)] for k in sorted(old.keys() | new.keys())
          if old.get(k) != new.get(k)}


def commit(workdir: str, config, tokenizer, saved_config: dict | None, step: int) -> None:
  """Creates the workdir (process 0 writes): tokenizer.json and config.json on a first start
  (saved_config None: no checkpoint yet); on a resume, a config_history.jsonl line if fields
  changed since the latest checkpoint (saved_config, its config) and nothing else."""
  import jax
  from lm import tokenizers
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() != 0:
    return
  fresh = saved_config is None  # a resume never rewrites what its first start wrote
  if fresh or not os.path.exists(os.path.join(workdir, tokenizers.FILENAME)):
    tokenizers.save(tokenizer, workdir)
  path = os.path.join(workdir, CONFIG)
  if fresh or not os.path.exists(path):
    with open(path, "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  if saved_config is not None:
    changes = config_changes(saved_config, config)
    if changes:
      with open(os.path.join(workdir, HISTORY), "a") as f:
        f.write(json.dumps({"step": step, "changed": changes}) + "\n")
      logging.info("config changed at step %d (recorded in %s): %s", step, HISTORY,
                   ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
