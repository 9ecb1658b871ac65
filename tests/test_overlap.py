"""The loop never waits on the host (issue 17): batches made ahead in a background thread, in
order; checkpoints written in the background with the same failure reports."""

import errno
import os
import threading
import time

import numpy as np
import pytest

from lm import checkpoint as ckpt_lib
from lm import train
from lm.data import Prefetcher
from lm.errors import UsageError
from tests.conftest import tiny_config


def test_prefetcher_hands_over_every_step_in_order_and_stays_ahead():
  """Items come in step order whatever the timing; the producer runs ahead of a slow
  consumer by at most the queue depth (plus the one it is making)."""
  made = []

  def make(step):
    made.append(step)
    return step * 10

  with Prefetcher(make, 3, 9, depth=2) as p:
    time.sleep(0.2)
    assert made == [3, 4, 5]  # two queued, one made and waiting for room
    assert [p.get(s) for s in range(3, 9)] == [30, 40, 50, 60, 70, 80]
  with pytest.raises(ValueError, match="the next step is 3"):
    Prefetcher(make, 3, 4).get(4)


def test_an_error_in_the_producer_is_raised_at_its_step_and_close_stops_the_thread():
  def make(step):
    if step == 2:
      raise OSError(errno.EIO, "disk gone")
    return step

  p = Prefetcher(make, 0, 10)
  assert p.get(0) == 0 and p.get(1) == 1
  with pytest.raises(OSError, match="disk gone"):
    p.get(2)
  p.close()
  blocked = Prefetcher(lambda s: s, 0, 10**6, depth=1)  # a producer waiting for room
  time.sleep(0.05)
  blocked.close()
  assert not any(t.name == "batch-prefetch" and t.is_alive() for t in threading.enumerate())


def test_a_background_save_that_fails_is_reported_with_its_own_step(tmp_path, monkeypatch):
  """ENOSPC in the background write of step 2 (wait=False) raises at the next save, naming
  step 2 and the latest complete checkpoint (1), which stays the latest. Checked to fail
  without Checkpointer.finish naming the pending step (the error named step 3)."""
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch
  run = train.make_run(tiny_config(), 11)
  state = train.init_state(run, 0)
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  ck.save(1, state, {"step": 1})
  real = jch.JsonCheckpointHandler._save_fn

  async def full(self, x, directory):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
  monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", full)
  ck.save(2, state, {"step": 2}, wait=False)
  monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", real)
  with pytest.raises(UsageError, match="saving checkpoint 2 .* latest complete checkpoint is 1"):
    ck.save(3, state, {"step": 3})
  ck.close()
  assert ckpt_lib.Checkpointer(str(tmp_path)).latest_step() == 1
  restored = ckpt_lib.Checkpointer(str(tmp_path)).restore(run.abstract_state(), 1)
  np.testing.assert_array_equal(np.asarray(restored[0]["embed"][...]),
                                np.asarray(state[0]["embed"][...]))
