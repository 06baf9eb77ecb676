"""Preparation: the CLI, bad input, and a run killed midway (nothing reads as complete)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import ml_collections
import pytest

from data_pipelines import input_pipeline as ip
from data_pipelines import prepare as prepare_lib
from data_pipelines.brats import builder as builder_lib
from data_pipelines.errors import DataError

from conftest import small_data_config
import helpers
from helpers import REPO

SMALL_FLAGS = ["--slice_start", "10", "--slice_stop", "17", "--crop_size", "32"]


def _cli(*args) -> subprocess.CompletedProcess:
  return helpers.run_module("data_pipelines.prepare", *args)


def _leftovers(data) -> list:
  builder = builder_lib.builder_from_config(data)
  return builder_lib.incomplete_leftovers(Path(builder.data_path).parent)


def test_cli_rejects_an_empty_folder_naming_it(tmp_path):
  empty = tmp_path / "empty_source"
  empty.mkdir()
  out = tmp_path / "out"
  proc = _cli("--src", empty, "--data_dir", out)
  assert proc.returncode != 0
  assert str(empty) in proc.stderr and "error:" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (out / "brats").exists()  # Nothing written at all.


@pytest.mark.parametrize("args, message", [
    ([], "error: --src is required"),
    (["--src=/data/src", "--crop_center=1,x"], "error: crop_center must be two integers"),
])
def test_cli_errors_are_one_line(args, message):
  proc = _cli(*args)
  assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-3000:]
  errors = helpers.error_lines(proc.stderr)
  assert len(errors) == 1 and errors[0].startswith(message) and "Traceback" not in proc.stderr


def test_missing_folder_and_bad_settings_are_clear_errors(tmp_path, synthetic_msd):
  with pytest.raises(DataError, match="does not exist"):
    prepare_lib.prepare(small_data_config(tmp_path / "nowhere", tmp_path / "out"))
  with pytest.raises(ValueError, match="modalities"):
    prepare_lib.prepare(small_data_config(synthetic_msd, tmp_path / "out", modalities=("flair",
                                                                                  "pd")))
  with pytest.raises(DataError, match="at least one case"):
    prepare_lib.prepare(small_data_config(synthetic_msd, tmp_path / "out", num_test_cases=0))


def test_corrupt_file_stops_preparation_and_leaves_nothing(make_synthetic, tmp_path):
  source = make_synthetic("msd", num_cases=3)
  bad = source / "imagesTr" / "BRATS_003.nii.gz"
  bad.write_bytes(bad.read_bytes()[:2000])  # Truncated download.
  data = small_data_config(source, tmp_path / "out")
  with pytest.raises(DataError, match="BRATS_003.nii.gz"):
    prepare_lib.prepare(data, progress=lambda _: None)
  assert not builder_lib.builder_from_config(data).is_prepared()
  assert _leftovers(data) == []  # TFDS removes its incomplete folder on an exception.
  with pytest.raises(DataError, match="prepare"):
    ip.num_examples(data, "train")


def test_prepared_data_is_reused_and_guarded_against_other_sources(prepared_small,
                                                                   synthetic_brats):
  data = prepared_small
  info_file = Path(builder_lib.builder_from_config(data).data_path) / "dataset_info.json"
  before = info_file.stat().st_mtime_ns
  messages = []
  prepare_lib.prepare(data, progress=messages.append)
  assert info_file.stat().st_mtime_ns == before and "Reusing" in messages[0]
  # Another data set pointed at the same folder with the same settings must not be mixed up.
  other = small_data_config(synthetic_brats, data.data_dir)
  with pytest.raises(DataError, match="differ"):
    prepare_lib.prepare(other, progress=lambda _: None)


_KILLABLE = textwrap.dedent("""
    import sys, time
    import ml_collections
    from data_pipelines import prepare
    config = ml_collections.ConfigDict({config!r})

    def progress(message):
      print(message, flush=True)
      if message.startswith("case 2/"):
        # Two cases written into TFDS's temporary folder: wait here to be killed.
        print("READY", flush=True)
        time.sleep(600)

    prepare.prepare(config, progress=progress)
    """)


@pytest.mark.slow
def test_killed_preparation_is_not_readable_and_a_rerun_completes_it(synthetic_msd, tmp_path):
  out = tmp_path / "out"
  data = small_data_config(synthetic_msd, out)
  script = _KILLABLE.format(config=data.to_dict())
  proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True, cwd=REPO)
  try:
    deadline = time.monotonic() + 120
    lines = []
    for line in proc.stdout:
      lines.append(line)
      if line.strip() == "READY" or time.monotonic() > deadline:
        break
    assert lines and lines[-1].strip() == "READY", "".join(lines)
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait(timeout=30)
  assert proc.returncode == -signal.SIGKILL

  # What the killed run left: an incomplete.* folder and no readable data set.
  assert _leftovers(data), list(out.rglob("*"))
  assert not builder_lib.builder_from_config(data).is_prepared()
  with pytest.raises(DataError, match="prepare"):
    ip.num_examples(data, "train")

  # A rerun through the CLI removes the leftovers and completes the data set.
  rerun = _cli("--src", synthetic_msd, "--data_dir", out, *SMALL_FLAGS)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "case 4/4" in rerun.stdout and "label-convention warnings" in rerun.stdout
  assert "on disk" in rerun.stdout
  assert _leftovers(data) == []
  assert builder_lib.builder_from_config(data).is_prepared()
  assert [ip.num_examples(data, s) for s in ip.SPLITS] == [16, 8, 8]


_FLAGS_TO_CONFIG = textwrap.dedent("""
    import json, sys
    from absl import flags
    from data_pipelines import prepare
    prepare.define_flags()
    flags.FLAGS(["prepare"] + sys.argv[1:])
    print(json.dumps(prepare.data_config_from_flags().to_dict()))
    """)


def test_flags_are_the_preprocessing_parameters():
  from configs import brats18  # pylint: disable=g-import-not-at-top
  args = ["--src=/data/src", "--layout=brats", "--modalities=t1ce,,flair", "--crop_center=20,24",
          "--slice_start=3", "--normalize=none", "--compression=zlib", "--download_cases=3"]
  proc = helpers.run_python("-c", _FLAGS_TO_CONFIG, *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  data = ml_collections.ConfigDict(json.loads(proc.stdout.splitlines()[-1]))
  expected = brats18.get_data_config()
  expected.update(source_dir="/data/src", layout="brats", modalities=("t1ce", "flair"),
                  crop_center=(20, 24), slice_start=3, normalize="none", compression="zlib",
                  download_cases=3)
  assert data.to_dict() == ml_collections.ConfigDict(
      json.loads(json.dumps(expected.to_dict()))).to_dict()
  assert builder_lib.config_from_data_config(data).name == (
      builder_lib.config_from_data_config(expected).name)


def test_prepare_for_training_without_data_says_where_to_get_it(tmp_path):
  from configs import brats18  # pylint: disable=g-import-not-at-top
  data = brats18.get_data_config()
  with pytest.raises(FileNotFoundError, match="Task01_BrainTumour.*--config.data.source_dir"
                     ".*--config.data.download=msd_task01"):
    prepare_lib.prepare_for_training(data, str(tmp_path))
  data.source_dir = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere: --config.data.source_dir is not a folder"):
    prepare_lib.prepare_for_training(data, str(tmp_path))
  assert list(tmp_path.iterdir()) == []


def test_prepare_for_training_generates_and_prepares_the_synthetic_set(tmp_path, capsys):
  data = small_data_config("unused", "unused", slice_start=5, slice_stop=8, crop_size=16)
  data.source_dir, data.data_dir = None, None
  data.synthetic_cases, data.synthetic_shape = 3, (32, 32, 20)
  (tmp_path / "synthetic.incomplete").mkdir()  # Left by a killed run.
  resolved = prepare_lib.prepare_for_training(data, str(tmp_path))
  assert data.source_dir is None  # The caller's config is left as it was.
  assert resolved.source_dir == str(tmp_path / "synthetic")
  assert resolved.data_dir == str(tmp_path / "prepared")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "synthetic"]
  assert [ip.num_examples(resolved, s) for s in ip.SPLITS] == [4, 4, 4]
  assert "case 3/3" in capsys.readouterr().out
  prepare_lib.prepare_for_training(data, str(tmp_path))  # Reuses both.
  assert "Reusing prepared data" in capsys.readouterr().out
