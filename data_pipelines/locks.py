"""Exclusive locks: one process at a time in a training workdir, a preparation, a download.

The lock is `flock(2)` on an open file, so the kernel drops it when the holder exits in any way
(kill -9 and reboots included): a lock is never stale and never needs removing by hand. The
file also records who holds it (host, process id, start time) for the message of a process
that finds it taken.

Network file systems: flock is honoured on local disks and on NFSv4 mounts; on file systems
that ignore it (some FUSE mounts, old NFS without a lock daemon), processes on different hosts
are not kept apart.
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket
from typing import Callable, Iterator, TextIO

from data_pipelines import files


def _holder(f: TextIO) -> str:
  """Who holds the lock, from its record, in words."""
  f.seek(0)
  try:
    info = json.loads(f.read() or "{}")
  except ValueError:
    info = {}
  if not info:
    return "another process (its details are not recorded yet)"
  return (f"process {info.get('pid')} on host {info.get('host')}, started "
          f"{info.get('started')}")


def _wait_quietly(holder: str) -> None:
  del holder


@contextlib.contextmanager
def hold(path: files.PathLike, on_busy: Callable[[str], None] = _wait_quietly) -> Iterator[None]:
  """Holds an exclusive lock on the file `path` (created, with its folder) for the block.

  When another process holds it, `on_busy(the holder in words)` is called first: it may raise
  to refuse at once (the holder's record is left as it is), or return to wait for the lock.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # 'a+' so that a process that waits or refuses leaves the holder's record as it is.
  with open(path, "a+", encoding="utf-8") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      on_busy(_holder(f))
      fcntl.flock(f, fcntl.LOCK_EX)
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
