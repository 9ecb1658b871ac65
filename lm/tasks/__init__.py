"""The objectives a run can train, by name (config.train.task).

  from lm import tasks
  task = tasks.get(config.train.task)       # an lm.runtime.Task
  runtime.train(config, workdir, task)

One module per objective, each defining `TASK`; a new one is a file here (copy lm.py) and a
line in NAMES. Modules are imported on first use, so lm/validate.py reads NAMES without
importing JAX.
"""

from __future__ import annotations

import importlib

NAMES = {
    "lm": "lm.tasks.lm",  # next-token prediction (language modelling)
    "classify": "lm.tasks.classify",  # genre of a Shakespeare speech
    "mlm": "lm.tasks.mlm",  # masked language modelling (BERT), for encoders
    "seq2seq": "lm.tasks.seq2seq",  # input text -> target text, for encoder-decoders (T5)
    "span_corruption": "lm.tasks.span_corruption",  # T5's pre-training objective
}


def get(name: str):
  """The task registered as `name`; KeyError for an unknown name (lm/validate.py checks
  config.train.task against NAMES first)."""
  return importlib.import_module(NAMES[name]).TASK
