r"""Prepares the 'brats' TFDS data set from an MSD Task01 or BraTS challenge training folder.

Usage:
  python -m data_pipelines.prepare --src /data/Task01_BrainTumour [--data_dir /data/prepared] \
      [--slice_start 30 --slice_stop 120 --crop_size 190 --modalities flair,t1,t1ce,t2 \
       --label_convention auto --layout auto --split_seed 0 ...]
  msatt-prepare ...   (the same, installed as a console script)

With the paper's settings the TFDS command line builds the same data set (TFDS 4.9's `tfds`
command needs apache-beam installed, which it imports at start-up):
  tfds build data_pipelines/brats/builder.py --manual_dir=/data/Task01_BrainTumour \
      --data_dir=/data/prepared

Unset flags take their defaults from configs/brats18.py (config.data). Cases are processed one
at a time; the data set becomes readable only when every split is written (TFDS writes into an
`incomplete.*` folder and renames it at the end; leftovers of a killed run are removed by the
next run). Bad input stops with a message naming the file and a non-zero exit.
"""

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from absl import app
from absl import flags
import tensorflow as tf

try:
  # Preparation is CPU work; TensorFlow must not take accelerator memory from a trainer.
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:
  pass

# pylint: disable=g-import-not-at-top
import tensorflow_datasets as tfds

from configs import brats18
from data_pipelines.brats import builder as builder_lib
from data_pipelines.brats import layouts
from data_pipelines.errors import DataError
# pylint: enable=g-import-not-at-top

_FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only by the CLI, so importing this module is safe)."""
  flags.DEFINE_string("src", None, "Raw NIfTI folder: MSD Task01_BrainTumour or BraTS training.")
  flags.DEFINE_string("data_dir", None,
                      "Where the prepared data goes (default <src>/../prepared).")
  flags.DEFINE_enum("layout", None, ["auto", "msd", "brats"], "How the folder is laid out.")
  flags.DEFINE_enum("label_convention", None, ["auto", "msd", "brats"],
                    "Label values on disk; 'auto' = the layout's own.")
  flags.DEFINE_list("modalities", None, "Modalities in order, e.g. flair,t1,t1ce,t2.")
  flags.DEFINE_integer("slice_start", None, "First axial slice kept (inclusive).")
  flags.DEFINE_integer("slice_stop", None, "Last axial slice kept (inclusive).")
  flags.DEFINE_integer("crop_size", None, "Square in-plane crop size.")
  flags.DEFINE_list("crop_center", None, "Crop centre x,y (default: the volume centre).")
  flags.DEFINE_enum("normalize", None, ["zscore", "none"], "Intensity normalisation.")
  flags.DEFINE_integer("split_seed", None, "Seed of the patient-level split.")
  flags.DEFINE_integer("num_validation_cases", None, "-1: 30 of 285, proportional.")
  flags.DEFINE_integer("num_test_cases", None, "-1: 30 of 285, proportional.")
  flags.DEFINE_enum("storage_dtype", None, list(builder_lib.STORAGE_DTYPES),
                    "Dtype of the stored images.")
  flags.DEFINE_enum("compression", None, list(builder_lib.COMPRESSIONS),
                    "Compression of the stored images.")


_OVERRIDES = ("layout", "label_convention", "modalities", "slice_start", "slice_stop",
              "crop_size", "crop_center", "normalize", "split_seed", "num_validation_cases",
              "num_test_cases", "storage_dtype", "compression")


def _print(message: str) -> None:
  print(message, flush=True)


def _remove_empty_dirs(root: Path) -> None:
  """Removes root if it holds nothing but empty folders (TFDS's unused downloads/)."""
  if not root.is_dir():
    return
  if any(p.is_file() or p.is_symlink() for p in root.rglob("*")):
    return
  shutil.rmtree(root, ignore_errors=True)


def _check_same_source(builder, refs: List[layouts.CaseRef], source: str) -> None:
  """A prepared set must come from the same cases, or it is someone else's data."""
  recorded = builder.info.metadata.get("case_ids")
  found = sorted(r.case_id for r in refs)
  if recorded is not None and sorted(recorded) != found:
    raise DataError(
        f"{builder.data_path}: prepared from {builder.info.metadata.get('source_dir')} "
        f"({len(recorded)} cases), which differ from the {len(found)} cases in {source}. "
        "Choose another data_dir or delete that folder.")


def prepare(data_config, *, progress: Callable[[str], None] = _print):
  """Prepares config.data's data set unless it is already; returns a fresh, prepared builder.

  Cheap when the data is prepared (the trainer may call it at every start): it then only
  checks that the source folder, where present, holds the cases the data was made from. The
  source folder is checked before anything is written (an empty or wrong folder raises a
  DataError naming it).
  """
  builder = builder_lib.builder_from_config(data_config)
  source = data_config.get("source_dir", None)
  source = os.path.abspath(os.path.expanduser(source)) if source else None
  if builder.is_prepared():
    if source and os.path.isdir(source):
      _check_same_source(builder, layouts.find_cases(source, builder.layout), source)
    progress(f"Reusing prepared data at {builder.data_path}.")
    return builder
  if not source:
    raise DataError("config.data.source_dir is not set and no prepared data is at "
                    f"{builder.data_path}.\n{builder_lib.Brats.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  if not os.path.isdir(source):
    raise DataError(f"{source}: folder does not exist.\n"
                    f"{builder_lib.Brats.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  refs = layouts.find_cases(source, builder.layout)
  builder_lib.split_sizes(len(refs), data_config.get("num_validation_cases", -1),
                          data_config.get("num_test_cases", -1))
  progress(f"Preparing {len(refs)} cases from {source} into {builder.data_path} "
           f"(config '{builder.builder_config.name}').")
  builder.progress_fn = progress
  tfds.disable_progress_bar()  # Our own per-case lines instead of TFDS's progress bars.
  start = time.perf_counter()
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=source, try_download_gcs=False))
  _remove_empty_dirs(Path(builder.data_dir_root) / "downloads")
  report = dict(builder.report)
  report["wall_seconds"] = time.perf_counter() - start
  prepared = builder_lib.builder_from_config(data_config)
  if report.get("cases_done"):
    progress(summary(prepared, report))
  else:
    progress(f"Reusing prepared data at {prepared.data_path} (prepared by another process).")
  return prepared


def summary(builder, report: Optional[Dict] = None) -> str:
  """Examples per split, bytes on disk and the label-convention warnings of a prepared set."""
  info = builder.info
  lines = [f"Prepared {builder.data_path}"]
  splits = info.metadata.get("splits", {})
  for split in builder_lib.SPLITS:
    lines.append(f"  {split:<10} {info.splits[split].num_examples:>7} slices from "
                 f"{len(splits.get(split, []))} cases")
  total = builder_lib.prepared_bytes(builder)
  num_slices = sum(info.splits[s].num_examples for s in builder_lib.SPLITS)
  lines.append(f"  on disk    {total / 1e6:.1f} MB ({total / max(num_slices, 1) / 1e3:.1f} kB "
               "per slice)")
  if report and report.get("cases_done"):
    lines.append(f"  time       {report['wall_seconds']:.1f} s "
                 f"({report['seconds'] / report['cases_done']:.2f} s per case)")
  warnings = info.metadata.get("label_warnings", [])
  lines.append(f"  label-convention warnings (T1gd: ET not brighter than NCR/NET): "
               f"{len(warnings)}")
  lines.extend(f"    {w}" for w in warnings)
  return "\n".join(lines)


def data_config_from_flags():
  """config.data with the flags' overrides applied."""
  data = brats18.get_data_config()
  data.source_dir = _FLAGS.src
  if _FLAGS.data_dir:
    data.data_dir = _FLAGS.data_dir
  for name in _OVERRIDES:
    value = getattr(_FLAGS, name)
    if value is None:
      continue
    if name == "modalities":
      value = tuple(v.strip() for v in value if v.strip())
    elif name == "crop_center":
      try:
        value = tuple(int(v) for v in value)
      except ValueError:
        raise ValueError(f"--crop_center must be two integers x,y, got {value}.") from None
    setattr(data, name, value)
  return data


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  try:
    data = data_config_from_flags()
    # Builds and validates the BuilderConfig (unknown modality names, bad crops, ...).
    builder_lib.config_from_data_config(data)
    prepare(data)
  except (DataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


def run() -> None:
  """Console-script entry point (msatt-prepare)."""
  define_flags()
  flags.mark_flag_as_required("src")
  app.run(main)


if __name__ == "__main__":
  run()
