"""The one exception type for bad input: its message is the single line the user sees."""


class UsageError(Exception):
  """Bad data, config or arguments. experiments/run.py prints `error: <message>` and exits 2."""
