"""One training run per workdir: an exclusive OS lock on `<workdir>/train.lock`.

The lock is `flock(2)` on an open file, so the kernel drops it when the holder exits in any way
(kill -9 and reboots included): a lock is never stale and never needs removing by hand. The
file also records who holds it (host, process id, start time) for the message a second run
prints. Readers (evaluate, predict) never take it: they only read committed checkpoints.

Network file systems: flock is honoured on local disks and on NFSv4 mounts; on file systems
that ignore it (some FUSE mounts, old NFS without a lock daemon), two runs on different hosts
are not stopped, so give each run its own workdir there.
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket
from typing import Iterator

LOCK_NAME = "train.lock"


class WorkdirBusyError(OSError):
  """Another live process is training into this workdir."""


def _holder(f) -> str:
  f.seek(0)
  try:
    info = json.loads(f.read() or "{}")
  except ValueError:
    info = {}
  if not info:
    return "another process (its details are not recorded yet)"
  return (f"process {info.get('pid')} on host {info.get('host')}, started "
          f"{info.get('started')}")


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds the workdir's training lock for the block, or raises WorkdirBusyError at once."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_NAME)
  # 'a+' so that a failed attempt leaves the holder's record as it is.
  with open(path, "a+", encoding="utf-8") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirBusyError(
          f"{os.path.abspath(workdir)} is in use by a training run: {_holder(f)}. Wait for it "
          "to finish or stop it, or use another --workdir; this run changed nothing.") from None
    try:
      f.seek(0)
      f.truncate()
      f.write(json.dumps({
          "host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}))
      f.flush()
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
