"""Downloads of the paper's archive, served from 127.0.0.1 inside the test: a good archive, a
corrupt one, a connection dropped half-way, a server without Range support, a missing URL.

The archives are synthetic MSD-layout cases tarred here, their MD5 computed here; no test
reaches outside the machine.
"""

import errno
import hashlib
import http.server
import io
import json
import logging
import re
import socket
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

from data_pipelines import download
from data_pipelines import input_pipeline as ip
from data_pipelines import prepare as prepare_lib
from data_pipelines import synthetic
from data_pipelines.brats import builder as builder_lib
from data_pipelines.brats import layouts
from data_pipelines.errors import DataError

from conftest import SMALL_DATA, SYNTHETIC_SHAPE, small_data_config
from test_locks import release, start_holder
import helpers

NUM_CASES = 5
ARCHIVE = "/Task01_BrainTumour.tar"
SMALL_FLAGS = [f"--{key}={value}" for key, value in SMALL_DATA.items()]


# ---- the archives ---------------------------------------------------------------------------


def _tar(root: Path, fmt: int) -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
    tar.add(root, arcname=root.name)  # Members in sorted order: every image before any label.
  return buf.getvalue()


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
  """{name: tar bytes}: 5 synthetic cases in the Decathlon's layout, with what real archives
  carry besides (macOS '._' resource forks, a name too long for a plain ustar header)."""
  root = tmp_path_factory.mktemp("archive") / "Task01_BrainTumour"
  synthetic.generate_dataset(root, "msd", NUM_CASES, SYNTHETIC_SHAPE, seed=0)
  (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\0\5\26\7 resource fork")
  (root / "notes").mkdir()
  (root / "notes" / ("a_long_file_name_" * 8 + ".txt")).write_text("read me")
  return {"pax": _tar(root, tarfile.PAX_FORMAT), "gnu": _tar(root, tarfile.GNU_FORMAT)}


def _md5(data: bytes) -> str:
  return hashlib.md5(data).hexdigest()


def _members(data: bytes) -> list:
  """The regular files of a tar, as tarfile lists them."""
  with tarfile.open(fileobj=io.BytesIO(data)) as tar:
    return [m for m in tar if m.isfile()]


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"  # Keep-alive, as real servers.

  def log_message(self, *args):  # pylint: disable=arguments-differ
    pass

  def do_GET(self):  # pylint: disable=invalid-name
    server = self.server.owner
    server.requests.append((self.path, self.headers.get("Range")))
    data = server.files.get(self.path)
    if data is None:
      self.send_response(404)
      self.send_header("Content-Length", "0")
      self.end_headers()
      return
    if server.mode == "corrupt":
      at = len(data) // 2 if server.corrupt_at is None else server.corrupt_at
      data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
    start, end, status = 0, len(data) - 1, 200
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
    if match and server.mode != "no_range":
      start, status = int(match[1]), 206
      end = min(int(match[2]) if match[2] else end, end)
    body = data[start:end + 1]
    self.send_response(status)
    self.send_header("Content-Length", str(len(body)))
    if status == 206:
      self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
    self.end_headers()
    if server.mode == "drop_once" and len(body) > 100_000:
      server.mode = "normal"
      body = body[:len(body) // 2]  # Then the connection closes: a transfer cut half-way.
      self.close_connection = True
    self.wfile.write(body)
    server.bytes_sent += len(body)


class _QuietServer(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def handle_error(self, request, client_address):
    pass  # A client that stops reading (a refused size, an ignored Range) is expected here.


class ArchiveServer:
  """Serves `files` on 127.0.0.1 with Range support; `mode` breaks it on purpose: 'corrupt'
  (the byte at corrupt_at, default the middle, flipped), 'drop_once' (the next large transfer
  stops half-way), 'no_range' (Range ignored: whole files with status 200)."""

  def __init__(self):
    self.files, self.requests, self.bytes_sent, self.mode = {}, [], 0, "normal"
    self.corrupt_at = None
    self.httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    self.httpd.owner = self
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def url(self, path: str = ARCHIVE) -> str:
    return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server(archives):
  s = ArchiveServer()
  s.files[ARCHIVE] = archives["pax"]
  yield s
  s.close()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
  monkeypatch.setattr(download, "_RETRY_SECONDS", 0.01)


@pytest.fixture
def log(caplog):
  """The log lines (INFO and up) the download writes: `log.messages`."""
  caplog.set_level(logging.INFO, logger="absl")
  return caplog


def _request(server, archives, cases: int = 0, **kwargs) -> download.Request:
  config = {"download": "msd_task01", "download_url": server.url(),
            "download_md5": _md5(archives["pax"]), "download_cases": cases, **kwargs}
  return download.request_from_config(config)


def _files_under(folder: Path) -> list:
  return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _nothing_but_the_lock(download_dir: Path) -> bool:
  return _files_under(download_dir) in ([], [download._LOCK_NAME])


# ---- requests and their checks ----------------------------------------------------------------


def test_requests_are_checked_before_anything_is_fetched():
  published = download.request_from_config({"download": "msd_task01"})
  assert (published.size, published.md5) == (7_608_266_240, "240a19d752f0d9e9101544901065d872")
  assert published.url == "https://msd-for-monai.s3-us-west-2.amazonaws.com/Task01_BrainTumour.tar"
  assert download.request_from_config({"download": None}) is None
  # A mirror of the same archive keeps the published checks.
  mirror = download.request_from_config({"download": "msd_task01", "download_url": "http://m/t.tar",
                                         "download_md5": published.md5.upper()})
  assert (mirror.size, mirror.md5) == (published.size, published.md5)
  custom = download.request_from_config({"download": "msd_task01", "download_url": "http://m/t",
                                         "download_md5": "0" * 32})
  assert custom.size is None  # Checked by its MD5 alone.
  for config, message in [
      ({"download_url": "http://m/t.tar"}, "never used unchecked"),
      ({"download_md5": "xyz"}, "not an MD5"),
      ({"download_cases": 2}, "at least 3 cases"),
      ({"download_cases": -1}, "0 \\(all cases\\) or more"),
      ({"download": "brats2018"}, "Unknown download 'brats2018'.*registration")]:
    with pytest.raises(ValueError, match=message):
      download.request_from_config({"download": "msd_task01", **config})


def test_progress_lines_show_bytes_rate_and_eta_at_most_once_a_second(log):
  now = [0.0]
  meter = download.Meter("Downloading x", 4_000_000_000, clock=lambda: now[0])
  now[0] = 10.0
  time.sleep(1.1)  # A second since any line of this call site: the first update logs.
  for _ in range(100):
    meter.update(1_000_000_000)
  assert log.messages == ["Downloading x: 1.00 GB of 4.00 GB (25%), 100.00 MB/s, ETA 30 s"]


@pytest.mark.parametrize("fmt", ["pax", "gnu"])
def test_remote_archive_is_read_by_tarfile_as_the_local_one(server, archives, fmt):
  server.files[ARCHIVE] = archives[fmt]
  request = _request(server, archives, download_md5=_md5(archives[fmt]))
  http = download._Http(request.url)
  remote = download._RemoteArchive(http, request)
  assert remote.honours_ranges() and remote.size == len(archives[fmt])
  with tarfile.open(fileobj=io.BufferedReader(remote, 1024), mode="r:") as tar:
    members = [(m.name, m.offset_data, m.size) for m in download._members(tar) if m.isfile()]
  http.close()
  assert members == [(m.name, m.offset_data, m.size) for m in _members(archives[fmt])]
  assert any(len(name) > 100 for name, _, _ in members)  # The long name's own header came.
  assert all(r is not None for _, r in server.requests)  # Range requests alone.


# ---- the whole archive ------------------------------------------------------------------------


def test_archive_is_checked_extracted_and_then_served_from_the_cache(server, archives, tmp_path,
                                                                      log):
  folder = download.fetch(_request(server, archives), tmp_path)
  assert folder.name == "Task01_BrainTumour"
  assert folder.parent.parent == tmp_path / "extracted"
  assert folder.parent.name.startswith("TAR.")
  assert [r.case_id for r in layouts.find_cases(folder)] == [
      f"BRATS_{i:03d}" for i in range(1, NUM_CASES + 1)]
  assert any(line.startswith("Checked ") and _md5(archives["pax"]) in line
             for line in log.messages)
  # The archive goes once extracted; no partial file is left.
  assert [p.name for p in tmp_path.iterdir() if p.is_file()] == [download._LOCK_NAME]
  before = len(server.requests)
  assert download.fetch(_request(server, archives), tmp_path) == folder
  assert len(server.requests) == before  # Nothing fetched again.


def test_corrupt_archive_is_refused_and_nothing_is_kept(server, archives, tmp_path):
  server.mode = "corrupt"
  with pytest.raises(download.DownloadError) as e:
    download.fetch(_request(server, archives), tmp_path)
  assert server.url() in str(e.value) and "MD5" in str(e.value) and "Rerun" in str(e.value)
  assert _nothing_but_the_lock(tmp_path)


def test_wrong_size_is_refused_before_the_transfer(server, archives, tmp_path):
  published_md5 = download.SOURCES["msd_task01"].md5
  request = _request(server, archives, download_md5=published_md5)  # Claims to be the 7.6 GB.
  with pytest.raises(download.DownloadError, match="offers .* bytes, but the archive is "
                     "7608266240 bytes"):
    download.fetch(request, tmp_path)
  assert _nothing_but_the_lock(tmp_path)


def test_dropped_connection_resumes_with_a_range_request(server, archives, tmp_path,
                                                         monkeypatch, log):
  monkeypatch.setattr(download, "_CHUNK", 16 * 1024)  # A read cut short loses its bytes.
  server.mode = "drop_once"
  folder = download.fetch(_request(server, archives), tmp_path)
  assert len(layouts.find_cases(folder)) == NUM_CASES
  (_, first), (_, resumed) = server.requests
  assert first is None and 0 < int(resumed[len("bytes="):-1]) <= len(archives["pax"]) // 2
  assert any("lost at" in line and "resuming" in line for line in log.messages)


def test_a_rerun_resumes_the_partial_file(server, archives, tmp_path):
  request = _request(server, archives)
  data = archives["pax"]
  partial = tmp_path / (download.archive_name(request) + ".partial")
  partial.write_bytes(data[:len(data) // 3])  # Left by a killed run.
  folder = download.fetch(request, tmp_path)
  assert len(layouts.find_cases(folder)) == NUM_CASES
  assert server.requests == [(ARCHIVE, f"bytes={len(data) // 3}-")]
  assert server.bytes_sent == len(data) - len(data) // 3


def test_full_disk_keeps_only_the_resumable_partial_file(server, archives, tmp_path, monkeypatch):
  written = []

  def write(out, data):
    if sum(written) > 200_000:
      raise OSError(errno.ENOSPC, "No space left on device")
    written.append(len(data))
    out.write(data)

  monkeypatch.setattr(download, "_write", write)
  monkeypatch.setattr(download, "_CHUNK", 16 * 1024)
  request = _request(server, archives)
  with pytest.raises(download.DownloadError, match=r"\.partial: cannot write \(no space left"):
    download.fetch(request, tmp_path)
  name = download.archive_name(request)
  assert _files_under(tmp_path) == sorted([download._LOCK_NAME, name + ".partial"])
  monkeypatch.undo()
  download.fetch(request, tmp_path)  # Space freed: the rerun resumes.
  assert server.requests[-1][1] == f"bytes={sum(written)}-"


def test_truncated_archive_is_not_extracted(server, archives, tmp_path):
  data = archives["pax"]
  members = _members(data)
  # Cut inside a member, and between two members (tarfile alone takes that for complete).
  for cut in (members[3].offset_data + 1000, members[3].offset):
    server.files[ARCHIVE] = data[:cut]
    request = _request(server, archives, download_md5=_md5(data[:cut]))
    with pytest.raises(download.DownloadError, match="damaged or truncated"):
      download.fetch(request, tmp_path / str(cut))
    assert list((tmp_path / str(cut) / "extracted").iterdir()) == []


def test_missing_url_and_no_network_are_clear_errors(server, archives, tmp_path):
  with pytest.raises(download.DownloadError, match=r"/nothing\.tar: the server answered HTTP "
                     "404"):
    download.fetch(_request(server, archives, download_url=server.url("/nothing.tar")),
                   tmp_path)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    closed_port = s.getsockname()[1]  # Nothing listens there once closed.
  url = f"http://127.0.0.1:{closed_port}/Task01_BrainTumour.tar"
  with pytest.raises(download.DownloadError, match=f"{re.escape(url)}: cannot connect"):
    download.fetch(_request(server, archives, download_url=url), tmp_path)
  assert _nothing_but_the_lock(tmp_path)


def test_a_second_download_into_the_folder_waits_for_the_first(server, archives, tmp_path, log):
  holder = start_holder(tmp_path / download._LOCK_NAME)
  folders = []
  thread = threading.Thread(target=lambda: folders.append(
      download.fetch(_request(server, archives), tmp_path)))
  thread.start()
  try:
    deadline = time.monotonic() + 30
    while not any(line.startswith(f"Waiting for process {holder.pid} on host ") and
                  line.endswith(f", downloading into {tmp_path}.") for line in log.messages):
      assert time.monotonic() < deadline, log.messages
      time.sleep(0.05)
    assert server.requests == []
  finally:
    release(holder)
  thread.join(timeout=60)
  assert len(layouts.find_cases(folders[0])) == NUM_CASES


# ---- the first N cases ------------------------------------------------------------------------


def test_first_cases_are_fetched_alone_with_range_requests(server, archives, tmp_path,
                                                           monkeypatch):
  monkeypatch.setattr(download, "_HEADER_READ", 1024)  # Read-ahead smaller than these files.
  folder = download.fetch(_request(server, archives, cases=3), tmp_path)
  assert folder.parent.name.startswith("FIRST3.")
  assert _files_under(folder) == ["dataset.json"] + [
      f"{d}/BRATS_00{i}.nii.gz" for d in ("imagesTr", "labelsTr") for i in (1, 2, 3)]
  meta = json.loads((folder / "dataset.json").read_text())
  assert meta["numTraining"] == 3 and meta["modality"]["0"] == "FLAIR"
  assert [r.case_id for r in layouts.find_cases(folder)] == ["BRATS_001", "BRATS_002",
                                                             "BRATS_003"]
  # Byte for byte the archive's files, and only headers besides them were fetched.
  with tarfile.open(fileobj=io.BytesIO(archives["pax"])) as tar:
    original = tar.extractfile("Task01_BrainTumour/labelsTr/BRATS_002.nii.gz").read()
    wanted = sum(m.size for m in tar if m.isfile() and re.search(r"Tr/BRATS_00[123]", m.name))
  assert (folder / "labelsTr" / "BRATS_002.nii.gz").read_bytes() == original
  assert all(r is not None for _, r in server.requests)
  assert wanted < server.bytes_sent < wanted + 1024 * len(server.requests)
  assert server.bytes_sent < len(archives["pax"]) * 0.8
  assert not any(p.is_file() for p in tmp_path.iterdir() if p.name != download._LOCK_NAME)


def test_first_cases_fall_back_to_the_whole_archive_without_range_support(server, archives,
                                                                         tmp_path, log):
  server.mode = "no_range"
  folder = download.fetch(_request(server, archives, cases=3), tmp_path)
  assert any("does not honour Range requests" in line for line in log.messages)
  assert [r.case_id for r in layouts.find_cases(folder)] == ["BRATS_001", "BRATS_002",
                                                             "BRATS_003"]
  assert any(line.startswith("Checked ") for line in log.messages)  # The whole archive's MD5.


def test_damaged_case_file_is_refused(server, archives, tmp_path):
  data = archives["pax"]
  label = next(m for m in _members(data) if m.name.endswith("labelsTr/BRATS_002.nii.gz"))
  server.mode, server.corrupt_at = "corrupt", label.offset_data + label.size // 2
  with pytest.raises(download.DownloadError, match="labelsTr/BRATS_002.nii.gz is damaged"):
    download.fetch(_request(server, archives, cases=3), tmp_path)
  assert not (tmp_path / "extracted").exists() or list((tmp_path / "extracted").iterdir()) == []


def test_damaged_or_cut_header_stops_the_first_cases(server, archives, tmp_path):
  # tarfile alone would end its listing there quietly, as at the end of the archive.
  data = archives["pax"]
  second = _members(data)[1]
  server.mode, server.corrupt_at = "corrupt", second.offset + 10  # In its header's name.
  with pytest.raises(download.DownloadError, match="damaged or truncated.*end-of-archive"):
    download.fetch(_request(server, archives, cases=3), tmp_path / "damaged")
  server.mode, server.files[ARCHIVE] = "normal", data[:second.offset + 100]
  with pytest.raises(download.DownloadError, match="damaged or truncated"):
    download.fetch(_request(server, archives, cases=3, download_md5=_md5(data[:1])),
                   tmp_path / "cut")
  assert _nothing_but_the_lock(tmp_path / "damaged") and _nothing_but_the_lock(tmp_path / "cut")


# ---- through the builder, prepare and training ------------------------------------------------


def _cli(*args) -> subprocess.CompletedProcess:
  return helpers.run_module("data_pipelines.prepare", *args)


@pytest.mark.slow
def test_prepare_command_downloads_prepares_and_then_fetches_nothing(server, archives, tmp_path):
  out = tmp_path / "out"
  args = ["--download=msd_task01", f"--download_url={server.url()}",
          f"--download_md5={_md5(archives['pax'])}", f"--data_dir={out}", *SMALL_FLAGS]
  first = _cli(*args)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "Checked " in first.stderr and f"case {NUM_CASES}/{NUM_CASES}" in first.stdout
  assert [p.name[:4] for p in (out / "downloads" / "extracted").iterdir()] == ["TAR."]
  count = len(server.requests)
  second = _cli(*args)
  assert second.returncode == 0 and "Reusing prepared data" in second.stdout, second.stderr
  assert len(server.requests) == count
  # Another preprocessing of the same download reads the cached folder.
  data = small_data_config(None, out, download="msd_task01", download_url=server.url(),
                           download_md5=_md5(archives["pax"]), crop_size=24)
  data.source_dir = None
  builder = prepare_lib.prepare(data, progress=lambda _: None)
  assert builder.info.metadata["download"]["cases"] == "all"
  assert len(server.requests) == count


@pytest.mark.parametrize("extra, message", [
    (["--download_url=URL/nothing.tar", "--download_md5=" + "0" * 32], "nothing.tar: the "
     "server answered HTTP 404"),
    (["--download_url=URL/nothing.tar"], "download_url URL/nothing.tar without download_md5"),
    (["--src=/data/x"], "--src and --download are both given"),
])
def test_prepare_command_failures_are_one_error_line(server, tmp_path, extra, message):
  base = server.url("")
  out = tmp_path / "out"
  proc = _cli("--download=msd_task01", f"--data_dir={out}",
              *[a.replace("URL", base) for a in extra])
  errors = helpers.error_lines(proc.stderr)
  assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
  assert message.replace("URL", base) in errors[0] and "Traceback" not in proc.stderr
  if "404" in message:
    assert "by hand" in proc.stderr and "Task01_BrainTumour" in proc.stderr
  assert not list(out.rglob("dataset_info.json")) and not list(out.rglob("*.tfrecord*"))


def test_training_config_downloads_a_subset_into_its_own_folder(server, archives, tmp_path):
  data = small_data_config(None, tmp_path / "data", download="msd_task01",
                           download_url=server.url(), download_md5=_md5(archives["pax"]),
                           download_cases=3)
  data.source_dir = None
  resolved = prepare_lib.prepare_for_training(data, str(tmp_path / "workdir"))
  subset_dir = tmp_path / "data" / "msd_task01_first3"
  assert resolved.data_dir == str(subset_dir)
  assert Path(resolved.source_dir).is_relative_to(subset_dir / "downloads" / "extracted")
  assert [ip.num_examples(resolved, s) for s in ip.SPLITS] == [8, 8, 8]
  assert sorted(sum((ip.split_cases(resolved, s) for s in ip.SPLITS), [])) == [
      "BRATS_001", "BRATS_002", "BRATS_003"]
  # The builder's config name is the preprocessing's alone: the download keys are not in it.
  assert builder_lib.builder_from_config(resolved).builder_config.name == (
      builder_lib.config_from_data_config(small_data_config("x", "y")).name)
  # The full set goes elsewhere, and data prepared from one archive are not another's.
  full = prepare_lib.prepare_for_training(dict_replace(data, download_cases=0),
                                          str(tmp_path / "workdir"))
  assert full.data_dir == str(tmp_path / "data")
  assert sum(ip.num_examples(full, s) for s in ip.SPLITS) == 8 * NUM_CASES
  server.files["/other.tar"] = archives["gnu"]
  other = dict_replace(data, download_cases=0, download_url=server.url("/other.tar"),
                       download_md5=_md5(archives["gnu"]))
  with pytest.raises(DataError, match="prepared from the msd_task01 download .*Choose another"):
    prepare_lib.prepare_for_training(other, str(tmp_path / "workdir"))
  with pytest.raises(ValueError, match="both set"):
    prepare_lib.prepare_for_training(dict_replace(data, source_dir="/data/x"), str(tmp_path))


def dict_replace(config, **changes):
  copy = config.copy_and_resolve_references()
  copy.update(changes)
  return copy


def test_tfds_build_without_a_manual_folder_downloads_the_archive(server, archives, tmp_path,
                                                                   monkeypatch):
  # What `tfds build data_pipelines/brats/builder.py --data_dir=OUT` does, against our server.
  source = download.SOURCES["msd_task01"]
  monkeypatch.setitem(download.SOURCES, "msd_task01", download.Source(
      name=source.name, url=server.url(), size=len(archives["pax"]),
      md5=_md5(archives["pax"]), description=source.description))
  config = builder_lib.make_config(**SMALL_DATA)
  builder = builder_lib.Brats(config=config, data_dir=str(tmp_path))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig())
  assert builder.info.metadata["download"] == {"source": "msd_task01",
                                               "md5": _md5(archives["pax"]), "cases": "all"}
  assert sum(builder.info.splits[s].num_examples for s in builder_lib.SPLITS) == 8 * NUM_CASES
  # An explicit manual folder that is missing is an error, not a download.
  other_config = builder_lib.make_config(**{**SMALL_DATA, "crop_size": 24})
  missing = builder_lib.Brats(config=other_config, data_dir=str(tmp_path / "other"))
  count = len(server.requests)
  with pytest.raises(AssertionError, match="does not exist or is empty"):
    missing.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(tmp_path / "nowhere")))
  assert len(server.requests) == count
