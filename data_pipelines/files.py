"""Atomic file writes: the one way the project writes a result a reader may look at.

Every writer (NIfTI volumes, PNG figures, CSV/JSON reports, metrics.jsonl rewrites, dataset.json)
goes through `atomic_output`: the file is written under a hidden temporary name in the same
folder and renamed over the target only once complete, so a reader, a crash or a kill -9 never
leaves a half-written file under the real name.
"""

import contextlib
import os
import tempfile
from typing import Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


def _suffix(name: str) -> str:
  # Keep the full extension: nibabel picks the format (and gzip) from '.nii.gz'.
  for ext in (".nii.gz", ".tar.gz"):
    if name.endswith(ext):
      return ext
  return os.path.splitext(name)[1]


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[str]:
  """Yields a temporary path beside `path`; on a clean exit it replaces `path`, else it goes."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  name = os.path.basename(path)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp" + _suffix(name))
  os.close(fd)
  try:
    yield tmp
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())
    # mkstemp creates files readable by the owner only; the result gets the usual mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write_text(path: PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  with atomic_output(path) as tmp:
    with open(tmp, "w", encoding="utf-8", newline="") as f:
      f.write(text)
