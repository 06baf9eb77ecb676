"""`python -m msatt_jax.train` with faults injected (tests/test_faults.py, benchmarks/faults.py).

  python tests/faults_run.py --config=... --workdir=...   (the train command's own flags)

Environment variables choose the faults (all optional; without them this is the plain command):
  FAULTS_STEP_DELAY=S        sleep S seconds before each batch (time to send a signal mid-run)
  FAULTS_NAN_AT_STEP=K       the batch of step K (1-based, as logged) holds NaN voxels
  FAULTS_STALL_SAVE_AT=K     the save of step K stops just before its commit (the rename of its
                             temporary folder) for FAULTS_STALL_SECONDS (300): a window for
                             kill -9, or for reading the run while a save is in flight
  FAULTS_RELEASE=PATH        the stalled save goes on (and commits) as soon as PATH exists
  FAULTS_ENOSPC_AT_SAVE=K    the save of step K fails with "No space left on device"
  FAULTS_SAVE_DELAY=S        every save waits S seconds before its commit (slow storage: a
                             random kill then often lands in a save)
  FAULTS_MARKER=PATH         written when the stalled save of FAULTS_STALL_SAVE_AT is reached
The patches sit where the real faults would strike: the data iterator and Orbax's commit.
"""

import errno
import os
import sys
import time

# Importable as a script from any folder: the repository root is one level up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top
import numpy as np
from orbax.checkpoint._src.path import atomicity

from data_pipelines import input_pipeline
from msatt_jax import train
# pylint: enable=g-import-not-at-top


def _env_int(name: str) -> int:
  """A step number from the environment; 0 (never a step) when unset."""
  return int(os.environ.get(name, "0"))


def _patch_iterator(delay: float, nan_step: int) -> None:
  original = input_pipeline.train_iterator

  def train_iterator(*args, start_step: int = 0, **kwargs):
    for step, batch in enumerate(original(*args, start_step=start_step, **kwargs),
                                 start=start_step + 1):
      if delay > 0:
        time.sleep(delay)
      if step == nan_step:
        batch = dict(batch)
        image = np.array(batch["image"], copy=True)
        image[0, 0, 0, 0] = np.nan
        batch["image"] = image
      yield batch

  input_pipeline.train_iterator = train_iterator


def _step_of(tmp_path) -> int:
  """The step a temporary folder commits; 0 for an item's folder inside a step's."""
  name = os.path.basename(str(tmp_path.get_final()))
  return int(name) if name.isdigit() else 0


def _patch_commit(stall_step: int, enospc_step: int, delay: float, marker: str) -> None:
  """Orbax's atomic commit of a step: a rename of `<step>.orbax-checkpoint-tmp*` to `<step>`."""
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *args, **kwargs):
    step = _step_of(self)
    if step and delay > 0:
      time.sleep(delay)  # In Orbax's background thread: training goes on meanwhile.
    if step and step == stall_step:
      if marker:
        with open(marker, "w", encoding="utf-8") as f:
          f.write(str(self.get()))
      # Until the test kills the process or releases the save; bounded, so that a forgotten
      # one ends by itself.
      deadline = time.monotonic() + float(os.environ.get("FAULTS_STALL_SECONDS", "300"))
      release = os.environ.get("FAULTS_RELEASE", "")
      while time.monotonic() < deadline and not (release and os.path.exists(release)):
        time.sleep(0.05)
    if step and step == enospc_step:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.get()))
    return await original(self, *args, **kwargs)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize


def main() -> None:
  delay = float(os.environ.get("FAULTS_STEP_DELAY", "0"))
  nan_step = _env_int("FAULTS_NAN_AT_STEP")
  if delay > 0 or nan_step > 0:
    _patch_iterator(delay, nan_step)
  stall_step, enospc_step = _env_int("FAULTS_STALL_SAVE_AT"), _env_int("FAULTS_ENOSPC_AT_SAVE")
  save_delay = float(os.environ.get("FAULTS_SAVE_DELAY", "0"))
  if stall_step > 0 or enospc_step > 0 or save_delay > 0:
    _patch_commit(stall_step, enospc_step, save_delay, os.environ.get("FAULTS_MARKER", ""))
  train.run()


if __name__ == "__main__":
  main()
