"""Downloads the paper's data (the Decathlon's Task01_BrainTumour) for the 'brats' builder.

The builder's `_split_generators` calls `fetch(request, dl_manager.download_dir)` and reads the
folder it returns, so the data land in TFDS's downloads folder (<data_dir>/downloads) under
TFDS's file naming, and a second build (another preprocessing, say) fetches nothing.

The transfer is written here rather than left to TFDS's DownloadManager, which checks a sha256
(the archive's published checksum is an MD5), cannot fetch part of a file, and restarts an
interrupted transfer from zero in a fresh temporary folder: too costly for 7.6 GB. So:

  * whole archive: streamed into `<name>.partial` with its MD5 computed on the way, resumed with
    an HTTP Range request after a dropped connection (or a rerun), checked against the expected
    size and MD5, renamed to `<name>`, extracted into `extracted/incomplete.*` and renamed to
    `extracted/TAR.<name>`; then the archive is removed (the extracted folder is the cache).
  * first N cases (`cases`): `tarfile` reads the remote archive as a seekable file whose reads
    are Range requests, so only the member headers (and the small members beside them) and each
    chosen case's image and label are fetched, into `extracted/FIRST<N>.<name>` (an MSD-layout
    folder). The archive's MD5 needs all its bytes, so these parts are checked instead by the
    archive's total size, tarfile's header checksums and each file's gzip CRC. A server that
    ignores Range gets the whole archive (checked as above), from which the N cases are taken.

Progress goes to the log (absl logging, INFO): a transfer's lines at most once a second.
Nothing is used before it is checked, and no folder appears under its final name half-written.
"""

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import os
from pathlib import Path
import re
import shutil
import tarfile
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple
import uuid
import zlib

from absl import logging
import requests
from tensorflow_datasets.core.download import resource as tfds_resource

from data_pipelines import files
from data_pipelines import locks
from data_pipelines.errors import DataError

@dataclasses.dataclass(frozen=True)
class Source:
  """A downloadable archive and the published checks of its bytes."""
  name: str
  url: str
  size: int
  md5: str
  description: str


# The values the MONAI project pins for its DecathlonDataset(download=True).
SOURCES = {
    "msd_task01": Source(
        name="msd_task01",
        url="https://msd-for-monai.s3-us-west-2.amazonaws.com/Task01_BrainTumour.tar",
        size=7_608_266_240, md5="240a19d752f0d9e9101544901065d872",
        description="the Medical Segmentation Decathlon's Task01_BrainTumour (484 labelled "
                    "cases, CC BY-SA 4.0)"),
}
DEFAULT_SOURCE = "msd_task01"

_CHUNK = 1 << 20  # Bytes per read and write while streaming.
_HEADER_READ = 16 << 10  # Bytes fetched per header lookup: small members come along for free.
_TIMEOUT = (30, 120)  # Seconds to connect, and to wait for the next bytes.
_RETRIES = 5  # Dropped connections in a row before giving up (a rerun still resumes).
_RETRY_SECONDS = 2.0  # First wait before resuming; doubled after each failure in a row.
_PROGRESS_SECONDS = 1.0  # At most one progress line per this many seconds.
_LOCK_NAME = ".download.lock"
_INCOMPLETE = "incomplete."  # TFDS's prefix of folders being written.
_BLOCK = 512
_REDOWNLOAD = "delete it and rerun to download it again."


class DownloadError(DataError):
  """A download that failed or did not pass its checks; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Request:
  """What to download (config.data.download*): the archive, its checks and the case count."""
  source: str
  url: str
  md5: str
  size: Optional[int]  # None: not published for this archive (a custom one, checked by MD5).
  cases: int = 0  # > 0: only the first `cases` cases of the archive.

  def identity(self) -> Dict[str, Any]:
    """What the prepared data were made from (stored with them; the URL may be a mirror)."""
    return {"source": self.source, "md5": self.md5, "cases": self.cases or "all"}

  def describe(self) -> str:
    what = f"the first {self.cases} cases of " if self.cases else ""
    return f"{what}{self.source} ({self.url})"


def describe_identity(identity: Optional[Dict[str, Any]]) -> str:
  """A stored identity() in words."""
  if not identity:
    return "a folder on disk"
  cases = identity.get("cases", "all")
  what = "" if cases == "all" else f"the first {cases} cases of "
  return f"{what}the {identity.get('source')} download (MD5 {identity.get('md5')})"


def _get(config, key: str) -> Any:
  return config.get(key, None) if hasattr(config, "get") else getattr(config, key, None)


def request_from_config(data_config) -> Optional[Request]:
  """config.data's download keys -> a Request, or None for a manual download (the default)."""
  name = _get(data_config, "download") or ""
  if not name:
    return None
  if name not in SOURCES:
    raise ValueError(f"Unknown download {name!r}; choose {', '.join(SOURCES)} (the BraTS "
                     "challenge data need registration: download them by hand and set "
                     "source_dir).")
  source = SOURCES[name]
  url = _get(data_config, "download_url") or source.url
  md5 = str(_get(data_config, "download_md5") or "").strip().lower()
  if md5 and not re.fullmatch(r"[0-9a-f]{32}", md5):
    raise ValueError(f"download_md5 {md5!r} is not an MD5 (32 hexadecimal digits).")
  if url != source.url and not md5:
    raise ValueError(f"download_url {url} without download_md5: a download is never used "
                     f"unchecked. Give the archive's MD5 (for a mirror of {source.url}: "
                     f"{source.md5}).")
  md5 = md5 or source.md5
  try:
    cases = int(_get(data_config, "download_cases") or 0)
  except (TypeError, ValueError):
    raise ValueError("download_cases must be a whole number.") from None
  if cases < 0:
    raise ValueError(f"download_cases must be 0 (all cases) or more, got {cases}.")
  if 0 < cases < 3:
    raise ValueError(f"download_cases {cases}: at least 3 cases are needed for the train, "
                     "validation and test splits.")
  return Request(source=name, url=url, md5=md5,
                 size=source.size if md5 == source.md5 else None, cases=cases)


def default_request() -> Request:
  """The paper's archive as published (what `tfds build` fetches without --manual_dir)."""
  return request_from_config({"download": DEFAULT_SOURCE})


def subset_folder_name(request: Request) -> str:
  """The folder of prepared data made from the first N cases, beside the full set's."""
  return f"{request.source}_first{request.cases}"


# ---------------------------------------------------------------------------------------------
# Progress lines.


def _bytes_text(n: float) -> str:
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{int(n)} B"


def _seconds_text(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
  if seconds >= 60:
    return f"{seconds // 60} min {seconds % 60} s"
  return f"{seconds} s"


class Meter:
  """Progress lines of a transfer: bytes done of the total, rate and time left."""

  def __init__(self, label: str, total: Optional[int], done: int = 0,
               clock: Callable[[], float] = time.monotonic):
    self.label, self.total, self.clock = label, total, clock
    self.start_done, self.done = done, done
    self.start = clock()

  def line(self) -> str:
    elapsed = max(self.clock() - self.start, 1e-9)
    rate = (self.done - self.start_done) / elapsed
    text = f"{self.label}: {_bytes_text(self.done)}"
    if self.total:
      text += f" of {_bytes_text(self.total)} ({100 * self.done / self.total:.0f}%)"
    text += f", {_bytes_text(rate)}/s"
    if self.total and rate > 0 and self.done < self.total:
      text += f", ETA {_seconds_text((self.total - self.done) / rate)}"
    return text

  def update(self, done: int) -> None:
    self.done = done
    logging.log_every_n_seconds(logging.INFO, "%s", _PROGRESS_SECONDS, self.line())

  def finish(self) -> None:
    logging.info("%s", self.line())


# ---------------------------------------------------------------------------------------------
# HTTP with resumption.


class _Dropped(Exception):
  """The connection broke: the transfer can resume where it stopped."""


class _Http:
  """One keep-alive session to one URL; dropped connections are retried, then reported."""

  def __init__(self, url: str):
    self.url = url
    self.session = requests.Session()
    # Byte ranges count in the file's own bytes, never in a compressed transfer's.
    self.session.headers["Accept-Encoding"] = "identity"
    self.connected = False  # A first response came: later connection errors are drops.
    self.failures = 0

  def close(self) -> None:
    self.session.close()

  def get(self, start: int = 0, end: Optional[int] = None) -> requests.Response:
    """A streaming GET of bytes start..end (inclusive; None: to the end)."""
    headers = {}
    if start or end is not None:
      headers["Range"] = f"bytes={start}-{'' if end is None else end}"
    try:
      response = self.session.get(self.url, headers=headers, stream=True, timeout=_TIMEOUT)
    except requests.RequestException as e:
      if not self.connected:
        raise DownloadError(f"{self.url}: cannot connect ({_reason(e)}). Check the network "
                            "(and a proxy's HTTPS_PROXY setting) or the URL.") from None
      raise _Dropped(_reason(e)) from None
    self.connected = True
    if response.status_code == 416 and start:
      return response  # Nothing after `start`: the caller has every byte already.
    if response.status_code >= 400:
      response.close()
      raise DownloadError(f"{self.url}: the server answered HTTP {response.status_code} "
                          f"{response.reason}. Check the URL (download_url), or use another "
                          "mirror.")
    return response

  def stream(self, response: requests.Response) -> Iterator[bytes]:
    """The body's chunks; a broken connection becomes _Dropped."""
    try:
      for chunk in response.iter_content(_CHUNK):
        self.failures = 0
        yield chunk
    except (requests.RequestException, OSError) as e:
      raise _Dropped(_reason(e)) from None

  def dropped(self, error: _Dropped, done: int, total: Optional[int], resume_hint: str) -> None:
    """Waits before resuming after a drop, or raises after too many in a row."""
    self.failures += 1
    where = f"{done} of {total} bytes" if total else f"{done} bytes"
    if self.failures > _RETRIES:
      raise DownloadError(f"{self.url}: the transfer stopped at {where} after {_RETRIES} "
                          f"retries ({error}). {resume_hint}")
    delay = _RETRY_SECONDS * 2 ** (self.failures - 1)
    logging.warning("Connection to %s lost at %s (%s); resuming in %.0f s (retry %d of %d).",
                    self.url, where, error, delay, self.failures, _RETRIES)
    time.sleep(delay)


def _reason(error: BaseException) -> str:
  """The innermost cause of a requests/urllib3 error, in one line."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  reason = getattr(error, "reason", None)
  if isinstance(reason, BaseException):
    error = reason
  return " ".join(str(error).split()) or type(error).__name__


def _content_range_total(response: requests.Response) -> Optional[int]:
  """The full size from a 206's Content-Range ('bytes a-b/total'), or a 200's length."""
  if response.status_code == 206:
    match = re.match(r"bytes \d+-\d+/(\d+)", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None
  length = response.headers.get("Content-Length")
  return int(length) if length and length.isdigit() else None


def _write(out, data: bytes) -> None:
  """Writes to an open file (one place, so tests can fill the disk)."""
  out.write(data)


@contextlib.contextmanager
def _writing(path: Path, hint: str) -> Iterator[None]:
  """Turns a failed write (a full disk) into a DownloadError naming the file."""
  try:
    yield
  except OSError as e:
    if isinstance(e, requests.RequestException):  # requests' errors are OSErrors too.
      raise
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    what = "no space left on the device" if full else (e.strerror or str(e))
    raise DownloadError(f"{path}: cannot write ({what}). Free some space and rerun; "
                        f"{hint}") from None


# ---------------------------------------------------------------------------------------------
# The whole archive.


def _check_total(request: Request, total: Optional[int], partial: Path) -> None:
  if request.size is not None and total is not None and total != request.size:
    partial.unlink(missing_ok=True)
    raise DownloadError(f"{request.url}: the server offers {total} bytes, but the archive is "
                        f"{request.size} bytes; the URL serves another file. Check "
                        "download_url, or download the archive by hand.")


def _rehash(partial: Path) -> Tuple["hashlib._Hash", int]:
  """The MD5 state of what a previous run downloaded (hashlib states cannot be saved)."""
  digest = hashlib.md5()
  size = partial.stat().st_size if partial.exists() else 0
  if size:
    logging.info("Resuming %s after its first %s.", partial, _bytes_text(size))
    with partial.open("rb") as f:
      for block in iter(lambda: f.read(_CHUNK), b""):
        digest.update(block)
  return digest, size


def download_archive(request: Request, archive: Path) -> None:
  """Downloads request.url to `archive`, checked against the size and MD5, via `.partial`."""
  partial = archive.with_name(archive.name + ".partial")
  digest, done = _rehash(partial)
  if request.size is not None and done > request.size:
    partial.unlink()
    digest, done = hashlib.md5(), 0
  total = request.size
  hint = f"the transfer resumes from {partial}."
  http = _Http(request.url)
  meter = Meter(f"Downloading {request.url}", total, done)
  try:
    with partial.open("ab") as out, _writing(partial, hint):
      while total is None or done < total:
        try:
          response = http.get(done)
          if response.status_code == 416:
            response.close()
            total = done
            break
          with response:
            if done and response.status_code != 206:
              logging.info("%s ignores Range requests: restarting from the first byte.",
                           request.url)
              out.truncate(0)
              digest, done, meter = hashlib.md5(), 0, Meter(meter.label, total)
            total = _content_range_total(response)
            _check_total(request, total, partial)
            for chunk in http.stream(response):
              _write(out, chunk)
              digest.update(chunk)
              done += len(chunk)
              meter.update(done)
          if total is None:
            total = done  # No length given: the end of the body is the end of the file.
          elif done < total:
            raise _Dropped("the server closed the connection early")
        except _Dropped as e:
          out.flush()
          http.dropped(e, done, total, f"Rerun the same command: {hint}")
      out.flush()
      os.fsync(out.fileno())
  finally:
    http.close()
    if partial.exists() and partial.stat().st_size == 0:
      partial.unlink()  # Nothing to resume (a refused URL, no network).
  meter.finish()
  if done != total or (request.size is not None and done != request.size):
    partial.unlink()
    raise DownloadError(f"{request.url}: received {done} bytes, expected "
                        f"{request.size or total}; the partial file was removed. Rerun.")
  md5 = digest.hexdigest()
  if md5 != request.md5:
    partial.unlink()
    raise DownloadError(f"{request.url}: the MD5 of the {done} bytes received is {md5}, not "
                        f"{request.md5}: the file is damaged or another one, and was removed. "
                        "Rerun to download it again; if it recurs, check download_md5 or use "
                        "another mirror.")
  os.replace(partial, archive)
  logging.info("Checked %s: %d bytes, MD5 %s.", archive.name, done, md5)


# ---------------------------------------------------------------------------------------------
# Folders written whole or not at all, from archives read whole.


@contextlib.contextmanager
def _folder(target: Path) -> Iterator[Path]:
  """A temporary folder beside `target`, renamed to it on success and removed on failure."""
  tmp = target.with_name(f"{_INCOMPLETE}{uuid.uuid4().hex}_{target.name}")
  tmp.mkdir(parents=True)
  try:
    yield tmp
    os.replace(tmp, target)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def msd_root(folder: Path) -> Path:
  """The MSD folder (dataset.json, imagesTr/, labelsTr/) in an extracted archive."""
  if (folder / "dataset.json").is_file() or (folder / "imagesTr").is_dir():
    return folder
  inner = [p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")
           and ((p / "dataset.json").is_file() or (p / "imagesTr").is_dir())]
  if len(inner) != 1:
    raise DownloadError(f"{folder}: the archive holds no single MSD folder (dataset.json, "
                        "imagesTr/, labelsTr/). Delete this folder and check download_url.")
  return inner[0]


@contextlib.contextmanager
def _reading(where: str, hint: str) -> Iterator[None]:
  """Turns tarfile's complaints into a DownloadError naming the archive."""
  try:
    yield
  except (tarfile.TarError, EOFError) as e:
    raise DownloadError(f"{where}: the archive is damaged or truncated ({e}); {hint}") from None


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
  """tar's members, to the end-of-archive marker: tarfile ends its listing quietly at a
  damaged header, or at a cut between two members, as if the archive ended there."""
  yield from tar
  tar.fileobj.seek(tar.offset)
  if tar.fileobj.read(_BLOCK) != bytes(_BLOCK):
    raise tarfile.ReadError(f"no end-of-archive marker at byte {tar.offset}")


def _extract_all(archive: Path, target: Path) -> None:
  meter = Meter(f"Extracting {archive.name}", archive.stat().st_size)
  with _folder(target) as tmp, _writing(target, "the extraction starts again."), \
      _reading(str(archive), _REDOWNLOAD), tarfile.open(archive, "r:") as tar:
    for member in _members(tar):
      tar.extract(member, tmp, filter="data")
      meter.update(member.offset_data + member.size)
  meter.finish()


# ---------------------------------------------------------------------------------------------
# The first N cases.


def _parts(name: str) -> List[str]:
  return [p for p in name.split("/") if p not in ("", ".")]


class CaseSelector:
  """Picks dataset.json and the first N cases (image and label) from a stream of tar members.

  The cases are the first N images of imagesTr/ in archive order that have a label in labelsTr/;
  `done` says when no later member can change the choice.
  """

  def __init__(self, num_cases: int):
    self.num_cases = num_cases
    self.dataset_json: Optional[tarfile.TarInfo] = None
    self.images: Dict[str, tarfile.TarInfo] = {}  # In archive order.
    self.labels: Dict[str, tarfile.TarInfo] = {}

  def add(self, member: tarfile.TarInfo) -> None:
    parts = _parts(member.name)
    if not member.isfile() or not parts or ".." in parts or parts[-1].startswith("."):
      return  # Folders, '._*' resource forks and anything unsafe.
    if parts[-1] == "dataset.json" and len(parts) <= 2:
      self.dataset_json = member
    elif len(parts) >= 2 and re.search(r"\.nii(\.gz)?$", parts[-1]):
      table = {"imagesTr": self.images, "labelsTr": self.labels}.get(parts[-2])
      if table is not None:
        table.setdefault(parts[-1], member)

  def chosen(self) -> List[Tuple[tarfile.TarInfo, tarfile.TarInfo]]:
    return [(image, self.labels[name]) for name, image in self.images.items()
            if name in self.labels][:self.num_cases]

  @property
  def done(self) -> bool:
    first = list(self.images)[:self.num_cases]
    return (self.dataset_json is not None and len(first) == self.num_cases
            and all(name in self.labels for name in first))


class _RemoteArchive(io.RawIOBase):
  """The archive at request.url as a read-only seekable file: each read is one Range request.

  Wrapped in an io.BufferedReader of _HEADER_READ bytes for tarfile, so each header lookup
  brings the members that follow it when they are small.
  """

  def __init__(self, http: _Http, request: Request):
    super().__init__()
    self.http, self.request = http, request
    self.position, self.size, self.fetched = 0, 0, 0

  def readable(self) -> bool:
    return True

  def seekable(self) -> bool:
    return True

  def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
    self.position = offset + (0, self.position, self.size)[whence]
    return self.position

  def readinto(self, buffer) -> int:
    data = b"".join(self.chunks(self.position, min(len(buffer), self.size - self.position)))
    buffer[:len(data)] = data
    self.position += len(data)
    return len(data)

  def _response(self, start: int, end: int) -> Optional[requests.Response]:
    """A 206 for start..end, or None when the server ignores Range (answers 200)."""
    response = self.http.get(start, end)
    total = _content_range_total(response)
    if response.status_code != 206 or total is None:
      response.close()
      return None
    if self.request.size is not None and total != self.request.size:
      response.close()
      raise DownloadError(f"{self.request.url}: the archive is {total} bytes, not "
                          f"{self.request.size}; the URL serves another file.")
    self.size = total
    return response

  def honours_ranges(self) -> bool:
    response = self._response(0, _BLOCK - 1)
    if response is not None:
      response.close()
    return response is not None

  def chunks(self, start: int, size: int) -> Iterator[bytes]:
    """Bytes start..start+size-1, resumed after a dropped connection."""
    done = 0
    while done < size:
      try:
        response = self._response(start + done, start + size - 1)
        if response is None:
          raise DownloadError(f"{self.request.url}: the server stopped honouring Range "
                              "requests.")
        with response:
          for chunk in self.http.stream(response):
            chunk = chunk[:size - done]
            done += len(chunk)
            self.fetched += len(chunk)
            yield chunk
        if done < size:
          raise _Dropped("the server closed the connection early")
      except _Dropped as e:
        self.http.dropped(e, done, size, "Rerun the same command to start again.")


def _gzip_check(name: str, where: str) -> Callable[[Optional[bytes]], None]:
  """Feeds a .nii.gz's bytes through zlib (None: the end), which checks its CRC and length."""
  if not name.endswith(".gz"):
    return lambda _: None
  inflater = zlib.decompressobj(wbits=31)

  def feed(data: Optional[bytes]) -> None:
    try:
      if data is not None:
        inflater.decompress(data, 0)  # Discarded: only the check matters (max_length 0 = all).
      elif not inflater.eof:
        raise zlib.error("the gzip stream ends early")
    except zlib.error as e:
      raise DownloadError(f"{where}: {name} is damaged ({e}); rerun to fetch it again.") from None

  return feed


def _subset_dataset_json(original: Optional[bytes], names: List[str], where: str) -> str:
  """The archive's dataset.json limited to the chosen cases (and no test images)."""
  meta: Dict[str, Any] = {}
  if original is not None:
    try:
      meta = json.loads(original)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise DownloadError(f"{where}: its dataset.json is not JSON ({e}).") from None
  entries = [e for e in meta.get("training", []) if isinstance(e, dict)
             and os.path.basename(str(e.get("image", ""))) in names]
  if len(entries) != len(names):
    entries = [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in names]
  meta.update(training=entries, numTraining=len(entries), test=[], numTest=0)
  return json.dumps(meta, indent=4)


def _write_subset(tar: tarfile.TarFile, num_cases: int, target: Path, where: str,
                  content: Callable[[tarfile.TarInfo], Iterator[bytes]]) -> None:
  """The first num_cases cases of tar and their dataset.json into target/<its folder>/;
  `content(member)` yields a member's bytes."""
  selector = CaseSelector(num_cases)
  logging.info("Reading the member headers of %s to find its first %d cases.", where, num_cases)
  for count, member in enumerate(_members(tar), 1):
    selector.add(member)
    if selector.done:
      break
    logging.log_every_n_seconds(logging.INFO, "Read %d member headers; %d of %d cases found.",
                                _PROGRESS_SECONDS, count, len(selector.chosen()), num_cases)
  pairs = selector.chosen()
  if len(pairs) < num_cases:
    raise DownloadError(f"{where}: the archive holds {len(pairs)} labelled cases, fewer than "
                        f"the {num_cases} asked for (download_cases).")
  meter = Meter(f"Fetching {num_cases} cases", sum(m.size for pair in pairs for m in pair))
  with _folder(target) as tmp, _writing(target, "the cases are fetched again."):
    root = tmp.joinpath(*_parts(pairs[0][0].name)[:-2])
    for image, label in pairs:
      for member, folder in ((image, "imagesTr"), (label, "labelsTr")):
        path = root / folder / _parts(member.name)[-1]
        path.parent.mkdir(parents=True, exist_ok=True)
        check = _gzip_check(member.name, where)
        with path.open("wb") as out:
          for chunk in content(member):
            check(chunk)
            _write(out, chunk)
            meter.update(meter.done + len(chunk))
        check(None)
    names = [_parts(image.name)[-1] for image, _ in pairs]
    original = tar.extractfile(selector.dataset_json).read() if selector.dataset_json else None
    files.atomic_write_text(root / "dataset.json", _subset_dataset_json(original, names, where))
  meter.finish()


def _fetch_subset_by_ranges(request: Request, target: Path) -> bool:
  """The first N cases by Range requests into target; False if the server ignores Range."""
  http = _Http(request.url)
  remote = _RemoteArchive(http, request)
  try:
    if not remote.honours_ranges():
      return False
    with _reading(request.url, "rerun to fetch it again."), tarfile.open(
        fileobj=io.BufferedReader(remote, _HEADER_READ), mode="r:") as tar:
      _write_subset(tar, request.cases, target, request.url,
                    lambda member: remote.chunks(member.offset_data, member.size))
  finally:
    http.close()
  logging.info("Fetched %d cases (%s of the %s archive).", request.cases,
               _bytes_text(remote.fetched), _bytes_text(remote.size))
  return True


def _extract_subset(archive: Path, num_cases: int, target: Path) -> None:
  """The first N cases of a downloaded (checked) archive into target."""

  def content(member: tarfile.TarInfo) -> Iterator[bytes]:
    with tar.extractfile(member) as src:
      yield from iter(lambda: src.read(_CHUNK), b"")

  with _reading(str(archive), _REDOWNLOAD), tarfile.open(archive, "r:") as tar:
    _write_subset(tar, num_cases, target, str(archive), content)
  logging.info("Extracted the first %d cases of %s.", num_cases, archive.name)


# ---------------------------------------------------------------------------------------------
# The entry point.


def archive_name(request: Request) -> str:
  """TFDS's name of a download: the URL shortened, and the checksum."""
  return tfds_resource.get_dl_fname(request.url, request.md5)


def fetch(request: Request, download_dir) -> Path:
  """The MSD folder of `request` under download_dir, downloaded and checked unless it is there.

  Raises DownloadError (one message naming the URL or file and what to do) on any failure,
  leaving only a resumable `.partial` file behind.
  """
  download_dir = Path(download_dir)
  extracted = download_dir / "extracted"
  name = archive_name(request)
  prefix = f"FIRST{request.cases}" if request.cases else "TAR"
  target = extracted / f"{prefix}.{name}"
  # Two builds may share the downloads folder: one download into it at a time.
  with locks.hold(download_dir / _LOCK_NAME, on_busy=lambda holder: logging.info(
      "Waiting for %s, downloading into %s.", holder, download_dir)):
    if target.is_dir():
      logging.info("Using %s (downloaded before).", target)
      return msd_root(target)
    for leftover in extracted.glob(f"{_INCOMPLETE}*"):  # Under the lock: a dead run's.
      shutil.rmtree(leftover, ignore_errors=True)
    logging.info("Downloading %s into %s.", request.describe(), download_dir)
    if request.cases:
      if _fetch_subset_by_ranges(request, target):
        return msd_root(target)
      logging.info("%s does not honour Range requests, so the first %d cases cannot be fetched "
                   "alone: downloading the whole archive instead.", request.url, request.cases)
    archive = download_dir / name
    if not archive.is_file():
      download_archive(request, archive)
    if request.cases:
      _extract_subset(archive, request.cases, target)
    else:
      _extract_all(archive, target)
    archive.unlink()
    logging.info("Extracted into %s; removed the archive.", target)
    return msd_root(target)
