"""The one entry point: train, evaluate or sample a model from an experiment config.

  python experiments/run.py --config=experiments/base.py --workdir=runs/base
  python experiments/run.py --config=experiments/base.py --workdir=runs/base --mode=eval
  python experiments/run.py --config=experiments/base.py --workdir=runs/base --mode=sample \
      --prompt="ROMEO:" --temperature=0.8 --num_samples=3

`--config.a.b=value` overrides a field; unknown keys and ill-typed values fail with one line.
A workdir that holds a checkpoint is resumed. Several processes (one per host) start
jax.distributed from --coordinator_address/--num_processes/--process_id, or from the
cluster's environment (SLURM, ...) when those are absent and it is a cluster job.
"""

from __future__ import annotations

import os
import re

from absl import app, flags, logging
from ml_collections import config_flags

from lm.cli import fail, one_line_errors, quiet_library_logs

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (file.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to do.")
flags.DEFINE_string("data_path", None, "eval: evaluate on this data instead of the config's.")
flags.DEFINE_string("prompt", None, "sample: the prompt (default: config.sample.prompt).")
flags.DEFINE_integer("num_samples", None, "sample: sequences per prompt.")
flags.DEFINE_integer("max_new_tokens", None, "sample: tokens to generate.")
flags.DEFINE_float("temperature", None, "sample: 0 is greedy.")
flags.DEFINE_integer("top_k", None, "sample: keep the k most likely tokens (0: all).")
flags.DEFINE_float("top_p", None, "sample: nucleus mass in (0, 1].")
flags.DEFINE_integer("seed", None, "sample: random seed.")
flags.DEFINE_integer("stop_token", None, "sample: end a sequence at this token id (-1: none).")
flags.DEFINE_integer("num_beams", None, "sample: beam search with this many beams (1: sampling).")
flags.DEFINE_string("coordinator_address", None, "multi-process: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "multi-process: this process's index.")


def parse_flags(argv):
  """absl's parser, but a bad flag or config override is one line on stderr, not a dump."""
  config_path = None
  for arg in argv[1:]:  # ml_collections would defer a missing file's error to first use
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1].split(":", 1)[0]
      if not os.path.isfile(path):
        fail(f"config file {path} not found")
      if not defines_get_config(path):
        fail(f"{path}: defines no get_config() (an experiment config returns its ConfigDict "
             "from get_config(arg=None); see experiments/base.py)")
      config_path = path
  try:
    return FLAGS(argv)
  except Exception as e:  # absl's flags.Error; ml_collections raises KeyError/AttributeError too
    where = config_file_line(e, config_path)
    if where:
      fail(where)
    while e.args and isinstance(e.args[0], Exception):  # AttributeError(KeyError(...))
      e = e.args[0]
    message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    lines = [l.strip() for l in message.splitlines() if l.strip()]
    if any(l.startswith("Traceback") for l in lines):
      lines = lines[-1:]  # a config file's own exception: keep its message
    text = " ".join(lines)
    if isinstance(e, (KeyError, AttributeError)):
      overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
      key = re.search(r"(\w+)", text).group(1)
      bad = next((a for a in overrides if a.endswith(f".{key}")), "--config")
      hint = re.search(r'Did you mean "(\w+)"', text)
      text = f"{bad}: unknown config key {key!r}" + (
          f" (did you mean {hint.group(1)!r}?)" if hint else "")
    fail(text)


def defines_get_config(path: str) -> bool:
  """Whether the file binds `get_config` at top level (True when it does not parse: the
  syntax error is reported, with its line, when ml_collections loads it)."""
  import ast
  try:
    with open(path, "rb") as f:
      tree = ast.parse(f.read(), path)
  except (SyntaxError, ValueError):
    return True
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      names = [node.name]
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      names = [(a.asname or a.name).split(".")[0] for a in node.names]
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      names = [t.id for t in targets if isinstance(t, ast.Name)]
    else:
      continue
    if "get_config" in names or "*" in names:
      return True
  return False


def config_file_line(e: BaseException, config_path: str | None = None) -> str | None:
  """'FILE:LINE: message' for an error inside a config file (a syntax error, an exception
  its get_config raised or one its top level raised, e.g. a failed import), found among the
  exception's causes; None otherwise."""
  config_path = config_path and os.path.abspath(config_path)
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, SyntaxError) and e.filename:
      return f"{e.filename}:{e.lineno}: {e.msg}"
    tb, last = e.__traceback__, None
    while tb is not None:  # the innermost frame that runs a config file (experiments/*.py)
      name = tb.tb_frame.f_code.co_filename
      if name.endswith(".py") and ("get_config" in tb.tb_frame.f_code.co_name
                                   or os.path.abspath(name) == config_path):
        last = (name, tb.tb_lineno)
      tb = tb.tb_next
    if last and not isinstance(e, (KeyError, AttributeError)):
      return f"{last[0]}:{last[1]}: {type(e).__name__}: {e}"
    e = e.__cause__ or e.__context__ or (e.args[0] if e.args and
                                          isinstance(e.args[0], BaseException) else None)
  return None


def init_distributed() -> None:
  import jax
  if FLAGS.coordinator_address or FLAGS.num_processes:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif any(v in os.environ for v in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")) and \
      int(os.environ.get("SLURM_NTASKS", os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))) > 1:
    jax.distributed.initialize()  # jax detects the cluster's coordinator and process ids


def main(argv):
  quiet_library_logs()
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.config is None:
    fail("--config is required, e.g. --config=experiments/base.py")
  if FLAGS.workdir is None:
    fail("--workdir is required, e.g. --workdir=runs/base")
  from lm import validate
  from lm import workdir as workdir_lib
  with one_line_errors():
    config = with_sample_flags(FLAGS.config)
    # Every field, then the workdir, before anything is created or computed.
    validate.check_config(config, FLAGS.mode)
    workdir_lib.check(FLAGS.workdir, FLAGS.mode)
    init_distributed()
    import jax
    if jax.process_index() != 0:  # one log per job: other processes report warnings only
      logging.set_verbosity(logging.WARNING)
    run_mode(config)


def run_mode(config) -> None:
  """--mode through the task registry: the task of config.train.task trains or evaluates."""
  from lm import runtime, sample, tasks
  if FLAGS.mode == "sample":
    sample.sample_workdir(config, FLAGS.workdir)
    return
  task = tasks.get(config.train.task)
  if FLAGS.mode == "train":
    runtime.train(config, FLAGS.workdir, task)
  else:
    runtime.evaluate(config, FLAGS.workdir, task, data_path=FLAGS.data_path)


def with_sample_flags(config):
  """The config with --prompt, --temperature, ... written into config.sample (validated with
  the rest)."""
  overrides = {k: getattr(FLAGS, k) for k in ("num_samples", "max_new_tokens", "temperature",
                                              "top_k", "top_p", "seed", "prompt", "stop_token",
                                              "num_beams")
               if getattr(FLAGS, k) is not None}
  if not overrides:
    return config
  import copy
  config = copy.deepcopy(config)
  with config.unlocked():
    for k, v in overrides.items():
      if k in config.sample and isinstance(config.sample[k], float):
        v = float(v)
      config.sample[k] = v
  return config

if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
