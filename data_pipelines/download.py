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
  * first N cases (`cases`): the tar's 512-byte member headers are read with Range requests, the
    member contents skipped, and only dataset.json and each chosen case's image and label
    fetched, into `extracted/FIRST<N>.<name>` (an MSD-layout folder). The archive's MD5 needs all
    its bytes, so these parts are checked instead by the archive's total size, each header's
    checksum and each file's gzip CRC. A server that ignores Range gets the whole archive
    (checked as above), from which the N cases are extracted.

Nothing is used before it is checked, and no folder appears under its final name half-written.
"""

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
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

import requests
from tensorflow_datasets.core.download import resource as tfds_resource

from data_pipelines import files
from data_pipelines.errors import DataError

Progress = Callable[[str], None]


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
  """Throttled progress lines: bytes done of the total, rate and time left."""

  def __init__(self, label: str, total: Optional[int], progress: Progress, done: int = 0,
               clock: Callable[[], float] = time.monotonic):
    self.label, self.total, self.progress, self.clock = label, total, progress, clock
    self.start_done, self.done = done, done
    self.start = self.last = clock()

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
    now = self.clock()
    if now - self.last >= _PROGRESS_SECONDS:
      self.last = now
      self.progress(self.line())

  def finish(self) -> None:
    self.progress(self.line())


# ---------------------------------------------------------------------------------------------
# HTTP with resumption.


class _Dropped(Exception):
  """The connection broke: the transfer can resume where it stopped."""


class _Http:
  """One keep-alive session to one URL; dropped connections are retried, then reported."""

  def __init__(self, url: str, progress: Progress):
    self.url, self.progress = url, progress
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
      yield from response.iter_content(_CHUNK)
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
    self.progress(f"Connection to {self.url} lost at {where} ({error}); resuming in "
                  f"{delay:.0f} s (retry {self.failures} of {_RETRIES}).")
    time.sleep(delay)

  def progressed(self) -> None:
    self.failures = 0


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


def _rehash(partial: Path, progress: Progress) -> Tuple["hashlib._Hash", int]:
  """The MD5 state of what a previous run downloaded (hashlib states cannot be saved)."""
  digest = hashlib.md5()
  size = partial.stat().st_size if partial.exists() else 0
  if size:
    progress(f"Resuming {partial} after its first {_bytes_text(size)}.")
    with partial.open("rb") as f:
      for block in iter(lambda: f.read(_CHUNK), b""):
        digest.update(block)
  return digest, size


def download_archive(request: Request, archive: Path, progress: Progress) -> None:
  """Downloads request.url to `archive`, checked against the size and MD5, via `.partial`."""
  partial = archive.with_name(archive.name + ".partial")
  digest, done = _rehash(partial, progress)
  if request.size is not None and done > request.size:
    partial.unlink()
    digest, done = hashlib.md5(), 0
  total = request.size
  hint = f"the transfer resumes from {partial}."
  http = _Http(request.url, progress)
  meter = Meter(f"Downloading {request.url}", total, progress, done)
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
              progress(f"{request.url} ignores Range requests: restarting from the first byte.")
              out.truncate(0)
              digest, done = hashlib.md5(), 0
            total = _content_range_total(response)
            _check_total(request, total, partial)
            for chunk in http.stream(response):
              _write(out, chunk)
              digest.update(chunk)
              done += len(chunk)
              http.progressed()
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
  progress(f"Checked {archive.name}: {done} bytes, MD5 {md5}.")


# ---------------------------------------------------------------------------------------------
# Folders written whole or not at all.


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


def _damaged_archive(archive: Path, error: BaseException) -> DownloadError:
  return DownloadError(f"{archive}: the archive is damaged or truncated ({error}); delete it "
                       "and rerun to download it again.")


def _extract_all(archive: Path, target: Path, progress: Progress) -> None:
  meter = Meter(f"Extracting {archive.name}", archive.stat().st_size, progress)
  with _folder(target) as tmp, _writing(target, "the extraction starts again."):
    try:
      with tarfile.open(archive, "r:") as tar:
        for member in tar:
          tar.extract(member, tmp, filter="data")
          meter.update(member.offset_data + member.size)
        end = tar.offset
      # tarfile takes a file cut between two members for a complete archive: look for the
      # end-of-archive marker.
      with archive.open("rb") as f:
        f.seek(end)
        if f.read(_BLOCK) != bytes(_BLOCK):
          raise tarfile.ReadError(f"no end-of-archive marker at byte {end}")
    except (tarfile.TarError, EOFError) as e:
      raise _damaged_archive(archive, e) from None
  meter.finish()


# ---------------------------------------------------------------------------------------------
# The first N cases.


@dataclasses.dataclass
class Member:
  """A file in a tar: its name, where its content starts and its size."""
  name: str
  offset: int
  size: int


def _field(block: bytes, start: int, length: int) -> bytes:
  return block[start:start + length].split(b"\0", 1)[0]


def _number(raw: bytes, where: str) -> int:
  """A tar numeric field: octal text, or GNU base-256 for large values."""
  if raw and raw[0] & 0x80:
    return int.from_bytes(bytes([raw[0] & 0x7F]) + raw[1:], "big")
  text = raw.split(b"\0", 1)[0].strip()
  try:
    return int(text, 8) if text else 0
  except ValueError:
    raise DownloadError(f"{where}: not a tar header (bad number {text!r}).") from None


def _pax_records(data: bytes) -> Dict[str, str]:
  """'len key=value\\n' records of a pax extended header."""
  records, pos = {}, 0
  while pos < len(data):
    space = data.find(b" ", pos)
    if space < 0:
      break
    length = int(data[pos:space])
    key, _, value = data[space + 1:pos + length - 1].partition(b"=")
    records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    pos += length
  return records


def _padded(size: int) -> int:
  return -(-size // _BLOCK) * _BLOCK


def scan_members(read: Callable[[int, int], bytes], where: str) -> Iterator[Member]:
  """The regular files of a tar, from its headers alone: `read(offset, n)` returns n bytes.

  Handles ustar name prefixes, GNU long names ('L') and pax headers ('x': path, size); member
  contents are never read, except those of the long-name and pax headers.
  """
  offset, long_name, pax = 0, None, {}
  while True:
    block = read(offset, _BLOCK)
    if len(block) < _BLOCK:
      raise DownloadError(f"{where}: the archive ends inside a header at byte {offset} "
                          "(truncated).")
    if block == bytes(_BLOCK):
      return  # End-of-archive marker.
    stored = _number(block[148:156], where)
    computed = sum(block) - sum(block[148:156]) + 8 * ord(" ")
    if stored != computed:
      raise DownloadError(f"{where}: the tar header at byte {offset} is damaged (checksum "
                          f"{stored}, computed {computed}).")
    kind = block[156:157]
    size = _number(block[124:136], where)
    data_offset = offset + _BLOCK
    if kind in (b"L", b"x", b"g", b"K"):
      content = read(data_offset, size)
      if kind == b"L":
        long_name = content.split(b"\0", 1)[0].decode("utf-8", "replace")
      elif kind == b"x":
        try:
          pax = _pax_records(content)
        except ValueError:
          raise DownloadError(f"{where}: the pax header at byte {offset} is damaged.") from None
      offset = data_offset + _padded(size)
      continue
    name = _field(block, 0, 100).decode("utf-8", "replace")
    if block[257:262] == b"ustar":
      prefix = _field(block, 345, 155).decode("utf-8", "replace")
      if prefix:
        name = f"{prefix}/{name}"
    name = pax.get("path", long_name or name)
    size = int(pax.get("size", size))
    if kind in (b"0", b"\0", b"7"):
      yield Member(name=name, offset=data_offset, size=size)
    offset = data_offset + _padded(size)
    long_name, pax = None, {}


def _parts(name: str) -> List[str]:
  return [p for p in name.split("/") if p not in ("", ".")]


class CaseSelector:
  """Picks dataset.json and the first N cases (image and label) from a stream of members.

  The cases are the first N images of imagesTr/ in archive order that have a label in labelsTr/;
  `done` says when no later member can change the choice.
  """

  def __init__(self, num_cases: int):
    self.num_cases = num_cases
    self.dataset_json: Optional[Member] = None
    self.images: Dict[str, Member] = {}  # In archive order.
    self.labels: Dict[str, Member] = {}

  def add(self, member: Member) -> None:
    parts = _parts(member.name)
    if not parts or ".." in parts or parts[-1].startswith("."):
      return  # Folders' '._*' resource forks and anything unsafe.
    if parts[-1] == "dataset.json" and len(parts) <= 2:
      self.dataset_json = member
    elif len(parts) >= 2 and re.search(r"\.nii(\.gz)?$", parts[-1]):
      table = {"imagesTr": self.images, "labelsTr": self.labels}.get(parts[-2])
      if table is not None:
        table.setdefault(parts[-1], member)

  def chosen(self) -> List[Tuple[Member, Member]]:
    return [(image, self.labels[name]) for name, image in self.images.items()
            if name in self.labels][:self.num_cases]

  @property
  def done(self) -> bool:
    first = list(self.images)[:self.num_cases]
    return (self.dataset_json is not None and len(first) == self.num_cases
            and all(name in self.labels for name in first))


class _RangeReader:
  """Reads byte ranges of the remote archive (with a small read-ahead for headers)."""

  def __init__(self, http: _Http, request: Request):
    self.http, self.request = http, request
    self.total: Optional[int] = None
    self.cache_start, self.cache = 0, b""
    self.fetched = 0  # Bytes received, to report.

  def _response(self, start: int, end: int) -> Optional[requests.Response]:
    """A 206 for start..end, or None when the server ignores Range (answers 200)."""
    response = self.http.get(start, end)
    if response.status_code != 206:
      response.close()
      return None
    total = _content_range_total(response)
    if self.request.size is not None and total is not None and total != self.request.size:
      response.close()
      raise DownloadError(f"{self.request.url}: the archive is {total} bytes, not "
                          f"{self.request.size}; the URL serves another file.")
    self.total = total
    return response

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
            self.http.progressed()
            yield chunk
        if done < size:
          raise _Dropped("the server closed the connection early")
      except _Dropped as e:
        self.http.dropped(e, done, size, "Rerun the same command to start again.")

  def fetch(self, start: int, size: int) -> Iterator[bytes]:
    """Like chunks(), but what the last header read brought along is not fetched again."""
    offset = start - self.cache_start
    if 0 <= offset < len(self.cache):
      head = self.cache[offset:offset + size]
      yield head
      start, size = start + len(head), size - len(head)
    if size:
      yield from self.chunks(start, size)

  def read(self, start: int, size: int) -> bytes:
    end = start + size
    if not (self.cache_start <= start and end <= self.cache_start + len(self.cache)):
      length = max(size, _HEADER_READ)
      if self.total is not None:
        length = min(length, max(self.total - start, 0))
      if length == 0:
        return b""
      self.cache_start, self.cache = start, b"".join(self.chunks(start, length))
    return self.cache[start - self.cache_start:end - self.cache_start]

  def honours_ranges(self) -> bool:
    response = self._response(0, _BLOCK - 1)
    if response is not None:
      response.close()
    return response is not None


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


def _write_subset(tmp: Path, selector: CaseSelector, copy: Callable[[Member, Path], None],
                  read_small: Callable[[Member], bytes], where: str) -> List[str]:
  """Writes the chosen cases and their dataset.json into tmp/<the archive's folder>/."""
  pairs = selector.chosen()
  if len(pairs) < selector.num_cases:
    raise DownloadError(f"{where}: the archive holds {len(pairs)} labelled cases, fewer than "
                        f"the {selector.num_cases} asked for (download_cases).")
  parts = _parts(pairs[0][0].name)
  root = tmp.joinpath(*parts[:-2])
  for image, label in pairs:
    for member, folder in ((image, "imagesTr"), (label, "labelsTr")):
      copy(member, root / folder / _parts(member.name)[-1])
  names = [_parts(image.name)[-1] for image, _ in pairs]
  original = read_small(selector.dataset_json) if selector.dataset_json else None
  files.atomic_write_text(root / "dataset.json", _subset_dataset_json(original, names, where))
  return names


def _fetch_subset_by_ranges(http: _Http, request: Request, target: Path,
                            progress: Progress) -> bool:
  """The first N cases by Range requests into target; False if the server ignores Range."""
  reader = _RangeReader(http, request)
  if not reader.honours_ranges():
    return False
  selector = CaseSelector(request.cases)
  progress(f"Reading the member headers of {request.url} to find its first {request.cases} "
           "cases.")
  last = time.monotonic()
  for count, member in enumerate(scan_members(reader.read, request.url), 1):
    selector.add(member)
    if selector.done:
      break
    if time.monotonic() - last >= _PROGRESS_SECONDS:
      last = time.monotonic()
      progress(f"Read {count} member headers; {len(selector.chosen())} of {request.cases} "
               "cases found.")
  pairs = selector.chosen()
  total = sum(m.size for pair in pairs for m in pair)
  meter = Meter(f"Fetching {request.cases} cases", total, progress)

  def copy(member: Member, path: Path) -> None:
    check = _gzip_check(member.name, request.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
      for chunk in reader.fetch(member.offset, member.size):
        check(chunk)
        _write(out, chunk)
        meter.update(meter.done + len(chunk))
    check(None)

  def read_small(member: Member) -> bytes:
    return b"".join(reader.fetch(member.offset, member.size))

  with _folder(target) as tmp, _writing(target, "the cases are fetched again."):
    _write_subset(tmp, selector, copy, read_small, request.url)
  meter.finish()
  progress(f"Fetched {request.cases} cases ({_bytes_text(reader.fetched)} of the "
           f"{_bytes_text(reader.total or 0)} archive).")
  return True


def _extract_subset(archive: Path, num_cases: int, target: Path, progress: Progress) -> None:
  """The first N cases of a downloaded (checked) archive into target."""
  selector = CaseSelector(num_cases)
  try:
    with tarfile.open(archive, "r:") as tar:
      by_name = {}
      for info in tar:
        if info.isfile():
          member = Member(info.name, info.offset_data, info.size)
          by_name[info.name] = info
          selector.add(member)
          if selector.done:
            break

      def copy(member: Member, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tar.extractfile(by_name[member.name]) as src, path.open("wb") as out:
          shutil.copyfileobj(src, out, _CHUNK)

      def read_small(member: Member) -> bytes:
        with tar.extractfile(by_name[member.name]) as src:
          return src.read()

      with _folder(target) as tmp, _writing(target, "the extraction starts again."):
        _write_subset(tmp, selector, copy, read_small, str(archive))
  except (tarfile.TarError, EOFError) as e:
    raise _damaged_archive(archive, e) from None
  progress(f"Extracted the first {num_cases} cases of {archive.name}.")


# ---------------------------------------------------------------------------------------------
# The entry point.


@contextlib.contextmanager
def _exclusive(folder: Path, progress: Progress) -> Iterator[None]:
  """One download into a folder at a time (two builds may share the downloads folder)."""
  folder.mkdir(parents=True, exist_ok=True)
  with (folder / _LOCK_NAME).open("w") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      progress(f"Waiting for another process downloading into {folder}.")
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def archive_name(request: Request) -> str:
  """TFDS's name of a download: the URL shortened, and the checksum."""
  return tfds_resource.get_dl_fname(request.url, request.md5)


def fetch(request: Request, download_dir, progress: Progress = print) -> Path:
  """The MSD folder of `request` under download_dir, downloaded and checked unless it is there.

  Raises DownloadError (one message naming the URL or file and what to do) on any failure,
  leaving only a resumable `.partial` file behind.
  """
  download_dir = Path(download_dir)
  extracted = download_dir / "extracted"
  name = archive_name(request)
  prefix = f"FIRST{request.cases}" if request.cases else "TAR"
  target = extracted / f"{prefix}.{name}"
  with _exclusive(download_dir, progress):
    if target.is_dir():
      progress(f"Using {target} (downloaded before).")
      return msd_root(target)
    for leftover in extracted.glob(f"{_INCOMPLETE}*"):  # Under the lock: a dead run's.
      shutil.rmtree(leftover, ignore_errors=True)
    progress(f"Downloading {request.describe()} into {download_dir}.")
    if request.cases:
      http = _Http(request.url, progress)
      try:
        if _fetch_subset_by_ranges(http, request, target, progress):
          return msd_root(target)
      finally:
        http.close()
      progress(f"{request.url} does not honour Range requests, so the first {request.cases} "
               "cases cannot be fetched alone: downloading the whole archive instead.")
    archive = download_dir / name
    if not archive.is_file():
      download_archive(request, archive, progress)
    if request.cases:
      _extract_subset(archive, request.cases, target, progress)
    else:
      _extract_all(archive, target, progress)
    archive.unlink()
    progress(f"Extracted into {target}; removed the archive.")
    return msd_root(target)
