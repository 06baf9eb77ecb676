"""One training run per workdir: a second `train` is refused while a live process holds it."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from msatt_jax import workdir_lock

import helpers

def _start_holder(workdir: Path) -> subprocess.Popen:
  return helpers.start_lock_holder("msatt_jax.workdir_lock", workdir)


@pytest.mark.slow
def test_second_run_is_refused_naming_the_holder_and_changes_nothing(tmp_path):
  workdir = tmp_path / "run"
  holder = _start_holder(workdir)
  try:
    before = sorted(os.listdir(workdir))
    start = time.monotonic()
    result = helpers.run_module("msatt_jax.train", "--config=configs/tiny.py",
                                f"--workdir={workdir}")
    errors = helpers.error_lines(result.stderr)
    assert result.returncode == 1, result.stderr[-2000:]
    assert len(errors) == 1
    assert f"is in use by a training run: process {holder.pid} on host" in errors[0]
    # Refused before any data were generated or prepared.
    assert sorted(os.listdir(workdir)) == before == [workdir_lock.LOCK_NAME]
    assert time.monotonic() - start < 120
  finally:
    holder.kill()
    holder.wait()


def test_the_kernel_releases_the_lock_of_a_killed_holder(tmp_path):
  holder = _start_holder(tmp_path)
  with pytest.raises(workdir_lock.WorkdirBusyError, match=f"process {holder.pid}"):
    with workdir_lock.hold(str(tmp_path)):
      pass
  os.kill(holder.pid, signal.SIGKILL)
  holder.wait()
  with workdir_lock.hold(str(tmp_path)):  # No stale lock to clean by hand.
    with pytest.raises(workdir_lock.WorkdirBusyError, match=f"process {os.getpid()}"):
      with workdir_lock.hold(str(tmp_path)):
        pass
