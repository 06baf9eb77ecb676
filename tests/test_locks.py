"""The one exclusive lock (data_pipelines.locks) of workdirs, preparations and downloads."""

import json
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from data_pipelines import locks

import helpers

def start_holder(path: Path) -> subprocess.Popen:
  return helpers.start_lock_holder("data_pipelines.locks", path)


def release(proc: subprocess.Popen) -> None:
  proc.stdin.write("\n")
  proc.stdin.flush()
  assert proc.wait(timeout=60) == 0


def test_a_second_holder_is_told_who_holds_the_lock_and_waits_for_it(tmp_path):
  path = tmp_path / "a" / "b.lock"  # The folder is created.
  holder = start_holder(path)
  told, held = [], threading.Event()

  def second():
    with locks.hold(path, on_busy=told.append):
      held.set()

  thread = threading.Thread(target=second)
  thread.start()
  try:
    assert not held.wait(1.0)  # Still waiting a second later.
    assert told == [f"process {holder.pid} on host {socket.gethostname()}, started "
                    f"{json.loads(path.read_text())['started']}"]
  finally:
    release(holder)
  thread.join(timeout=60)
  assert held.is_set()
  assert json.loads(path.read_text())["pid"] == os.getpid()  # The new holder's record.


def test_on_busy_may_refuse_at_once_leaving_the_holder_record(tmp_path):
  path = tmp_path / "x.lock"
  holder = start_holder(path)
  record = path.read_text()

  def refuse(who):
    raise RuntimeError(f"busy: {who}")

  try:
    with pytest.raises(RuntimeError, match=f"busy: process {holder.pid} on host"):
      with locks.hold(path, on_busy=refuse):
        pass
    assert path.read_text() == record
  finally:
    release(holder)
  with locks.hold(path, on_busy=refuse):  # Released: taken without a word.
    pass
