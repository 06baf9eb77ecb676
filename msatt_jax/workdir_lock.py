"""One training run per workdir: an exclusive OS lock on `<workdir>/train.lock`.

The lock is data_pipelines.locks' (flock: released by the kernel however the holder exits; the
file records the holder's host, process id and start time for the message a second run prints).
Readers (evaluate, predict) never take it: they only read committed checkpoints.
"""

import os
from typing import ContextManager

from data_pipelines import locks

LOCK_NAME = "train.lock"


class WorkdirBusyError(OSError):
  """Another live process is training into this workdir."""


def hold(workdir: str) -> ContextManager[None]:
  """Holds the workdir's training lock for the block, or raises WorkdirBusyError at once."""

  def refuse(holder: str) -> None:
    raise WorkdirBusyError(
        f"{os.path.abspath(workdir)} is in use by a training run: {holder}. Wait for it to "
        "finish or stop it, or use another --workdir; this run changed nothing.")

  return locks.hold(os.path.join(workdir, LOCK_NAME), on_busy=refuse)
