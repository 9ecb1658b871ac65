"""Runs experiments/run.py but SIGKILLs itself around a checkpoint save, to test recovery.

  python tests/crash_driver.py STEP after|during -- <run.py flags>
after:  killed right after the checkpoint of STEP is complete (a preempted machine).
during: killed while the checkpoint of STEP is being written (a crash mid-save).
"""

import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lm import checkpoint  # noqa: E402

step_to_kill, when = int(sys.argv[1]), sys.argv[2]
original_save = checkpoint.Checkpointer.save


def save(self, step, state, meta, wait=True):
  if step == step_to_kill and when == "during":
    # Start the write as Orbax does, then die before it is committed.
    import orbax.checkpoint as ocp
    from flax import nnx
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(nnx.to_pure_dict(state)), meta=ocp.args.JsonSave(meta)),
        force=True)
    os.kill(os.getpid(), signal.SIGKILL)
  original_save(self, step, state, meta, wait=wait or step == step_to_kill)
  if step == step_to_kill:
    os.kill(os.getpid(), signal.SIGKILL)


checkpoint.Checkpointer.save = save
import runpy  # noqa: E402

sys.argv = [os.path.join(ROOT, "experiments", "run.py")] + sys.argv[sys.argv.index("--") + 1:]
runpy.run_path(sys.argv[0], run_name="__main__")
