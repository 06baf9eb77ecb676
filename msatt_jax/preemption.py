"""Preemption (SIGTERM) and Ctrl-C (SIGINT) during training: save the current step, then exit.

Orbax's own preemption detection needs `jax.distributed`; a one-process run handles the signals
itself. The handler only records the signal: Python runs it between two bytecodes of the main
thread, possibly inside an Orbax or TensorFlow call, where saving would not be safe. The training
loop polls `PreemptionGuard.requested` at every step boundary, saves that step, waits for the
save to commit and raises `Preempted`; the command line turns that into exit status 128 + the
signal number (143 for SIGTERM, 130 for SIGINT).

Why not 0: schedulers (SLURM, Kubernetes) and shells read 128 + N as "stopped by signal N",
which is what happened; a 0 would mark an unfinished run as done, and `train && evaluate` would
evaluate a half-trained model. The checkpoint is complete either way, and rerunning the same
command continues from it.
"""

import signal
import threading
import types
from typing import Dict, Optional, Sequence

from absl import logging
import jax
import numpy as np

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """Training stopped on a signal after the checkpoint of `step` was committed."""

  def __init__(self, signum: int, step: int, directory: str):
    self.signum = signum
    self.step = step
    self.directory = directory
    super().__init__(
        f"Stopped by {signal_name(signum)} at step {step}; the checkpoint of step {step} is "
        f"saved in {directory}. Rerun the same command to continue from there.")

  @property
  def exit_status(self) -> int:
    """128 + the signal number, as a shell reports a process the signal stopped."""
    return 128 + int(self.signum)


def signal_name(signum: int) -> str:
  try:
    return signal.Signals(signum).name
  except ValueError:
    return f"signal {signum}"


class PreemptionGuard:
  """Within `with PreemptionGuard() as guard:`, SIGTERM and SIGINT only set `guard.signum`.

  Later signals while the run saves are recorded too and change nothing: the save always
  finishes (a kill -9 stays safe, as Orbax commits a checkpoint atomically). Outside the block
  the previous handlers apply again. Off the main thread, where Python cannot install signal
  handlers, the guard does nothing and says so.
  """

  def __init__(self, signals: Sequence[int] = HANDLED_SIGNALS):
    self._signals = tuple(signals)
    self._previous: Dict[int, object] = {}
    self.signum: Optional[int] = None
    self.count = 0

  def _handle(self, signum: int, frame: Optional[types.FrameType]) -> None:
    del frame
    if self.signum is None:
      self.signum = signum
    self.count += 1

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def __enter__(self) -> "PreemptionGuard":
    if threading.current_thread() is not threading.main_thread():
      logging.warning("Training runs off the main thread: SIGTERM/SIGINT keep their default "
                      "action (no save on preemption).")
      return self
    for signum in self._signals:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}


def agreed_signal(guard: PreemptionGuard) -> Optional[int]:
  """The signal any process of the run got, or None: all must stop and save at the same step."""
  if jax.process_count() == 1:
    return guard.signum
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  received = multihost_utils.process_allgather(np.int32(guard.signum or 0))
  return int(np.max(received)) or None
