r"""Prepares the 'brats' TFDS data set from an MSD Task01 or BraTS challenge training folder.

Usage:
  python -m data_pipelines.prepare --src /data/Task01_BrainTumour [--data_dir /data/prepared] \
      [--layout auto --crop_size 160 --modalities flair,t1ce,t2 --split_seed 1 ...]
  python -m data_pipelines.prepare --download msd_task01 [--data_dir /data]  # the paper's data
  python -m data_pipelines.prepare --download msd_task01 --download_cases 20  # its first 20 cases
  msatt-prepare ...   (the same, installed as a console script)

--download fetches the Decathlon's Task01_BrainTumour archive (7.6 GB) into <data_dir>/downloads
(data_dir default: TFDS's, ~/tensorflow_datasets), checked against its published size and MD5,
resumable; --download_cases N fetches only the first N cases (a few hundred MB for 20) with HTTP
range requests, prepared into <data_dir>/msd_task01_first<N>. --download_url (a mirror) needs
--download_md5: a download is never used unchecked.

There is one flag per preprocessing parameter, the fields of preprocess.Preprocessing (`--help`
lists them with their defaults); an unset flag keeps that default.

With the paper's settings the TFDS command line builds the same data set (TFDS 4.9's `tfds`
command imports apache-beam and mlcroissant at start-up: `pip install -e ".[tfds-cli]"`):
  tfds build data_pipelines/brats/builder.py --manual_dir=/data/Task01_BrainTumour \
      --data_dir=/data/prepared

Cases are processed one at a time; the data set becomes readable only when every split is
written (TFDS writes into an `incomplete.*` folder and renames it at the end; leftovers of a
killed run are removed by the next run). Bad input stops with one `error: ...` line naming the
file, and exit status 1.
"""

import os
from pathlib import Path
import shutil
import time
from typing import Callable, Dict, List, Optional

from absl import flags
from absl import logging
import ml_collections
import tensorflow_datasets as tfds

from data_pipelines import cli
from data_pipelines import config as config_lib
from data_pipelines import download as download_lib
from data_pipelines import synthetic
from data_pipelines.brats import builder as builder_lib
from data_pipelines.brats import layouts
from data_pipelines.brats import preprocess
from data_pipelines.errors import DataError

_FLAGS = flags.FLAGS

# Flags that set the config.data key of their name (unset: the config's value stays):
# name -> (value type, choices, help).
_DATA_KEY_FLAGS = {
    "layout": (str, ("auto",) + layouts.LAYOUTS,
               "How the folder is laid out; 'auto' (the default) detects it."),
    "download": (str, tuple(download_lib.SOURCES),
                 "Download this archive (checked, resumable) instead of reading --src; the data "
                 "then go into --data_dir (default: TFDS's data folder)."),
    "download_url": (str, (), "A mirror of the --download archive; needs --download_md5 "
                     "unless it serves the same archive."),
    "download_md5": (str, (), "The MD5 the downloaded archive must have."),
    "download_cases": (int, (), "Fetch only the archive's first N cases, with HTTP range "
                       "requests (0: all). Default: 0."),
}


def define_flags() -> None:
  """The command-line flags (defined only by the CLI, so importing this module is safe).

  One flag per preprocessing parameter, named, typed and explained by its field of
  preprocess.Preprocessing; unset, it keeps config.data's value (the field's default).
  """
  flags.DEFINE_string("src", None, "Raw NIfTI folder: MSD Task01_BrainTumour or BraTS training.")
  flags.DEFINE_string("data_dir", None,
                      "Where the prepared data goes (default <src>/../prepared; with "
                      "--download, TFDS's data folder).")
  for name, (kind, choices, help_text) in _DATA_KEY_FLAGS.items():
    cli.define_typed_flag(name, kind, None, help_text, choices)
  for field in preprocess.parameters():
    cli.define_typed_flag(field.name, preprocess.value_type(field), None,
                          f"{field.metadata['help']} Default: {_flag_text(field.default)}.",
                          field.metadata["choices"])


def _flag_text(value) -> str:
  """A default as one would write it on the command line."""
  if value is None:
    return "unset"
  if isinstance(value, tuple):
    return ",".join(map(str, value))
  return str(value)


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


def _check_same_download(builder, request: download_lib.Request) -> None:
  """Data prepared from another archive, a subset or a folder are not this download's."""
  recorded = builder.info.metadata.get("download")
  if recorded != request.identity():
    raise DataError(
        f"{builder.data_path}: prepared from {download_lib.describe_identity(recorded)}, not "
        f"from {request.describe()}. Choose another data_dir or delete that folder.")


def _checked_source(builder, source: Optional[str], data_config,
                    progress: Callable[[str], None]) -> str:
  """The manual folder, checked to hold enough cases before anything is written."""
  if not source:
    raise DataError("config.data.source_dir is not set and no prepared data is at "
                    f"{builder.data_path}.\n{builder_lib.Brats.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  if not os.path.isdir(source):
    raise DataError(f"{source}: folder does not exist.\n"
                    f"{builder_lib.Brats.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  refs = layouts.find_cases(source, builder.layout)
  cfg = builder.builder_config  # The convention and split are checked before anything is written.
  layouts.folder_convention(refs, cfg.label_convention)
  builder_lib.split_case_ids([r.case_id for r in refs], cfg.split_seed, cfg.num_validation_cases,
                             cfg.num_test_cases, cfg.num_folds, cfg.fold)
  progress(f"Preparing {len(refs)} cases from {source} into {builder.data_path} "
           f"(config '{builder.builder_config.name}').")
  return source


def prepare(data_config, *, progress: Callable[[str], None] = _print):
  """Prepares config.data's data set unless it is already; returns a fresh, prepared builder.

  Cheap when the data is prepared (the trainer may call it at every start): it then only
  checks that the source folder, where present, holds the cases the data was made from. The
  source folder is checked before anything is written (an empty or wrong folder raises a
  DataError naming it).
  """
  builder = builder_lib.builder_from_config(data_config)
  request = builder.download
  source = data_config.get("source_dir", None)
  source = os.path.abspath(os.path.expanduser(source)) if source else None
  if builder.is_prepared():
    if request is not None:
      _check_same_download(builder, request)
    elif source and os.path.isdir(source):
      _check_same_source(builder, layouts.find_cases(source, builder.layout), source)
    progress(f"Reusing prepared data at {builder.data_path}.")
    return builder
  if request is not None:
    # The download (checked before use) is the builder's, in TFDS's downloads folder.
    manual_dir = None
    progress(f"Preparing {request.describe()} into {builder.data_path} "
             f"(config '{builder.builder_config.name}').")
  else:
    manual_dir = _checked_source(builder, source, data_config, progress)
  builder.progress_fn = progress
  tfds.disable_progress_bar()  # Our own per-case lines instead of TFDS's progress bars.
  start = time.perf_counter()
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, try_download_gcs=False))
  _remove_empty_dirs(Path(builder.data_dir_root) / "downloads")
  report = dict(builder.report)
  report["wall_seconds"] = time.perf_counter() - start
  prepared = builder_lib.builder_from_config(data_config)
  if report.get("cases_done"):
    progress(summary(prepared, report))
  else:
    progress(f"Reusing prepared data at {prepared.data_path} (prepared by another process).")
  return prepared


def prepare_for_training(data_config, workdir: str) -> ml_collections.ConfigDict:
  """A copy of config.data with its folders resolved, the data generated and prepared if need be.

  With `download` set (msd_task01), the archive is downloaded and checked, and the data
  prepared, into data_dir (default: TFDS's data folder); the copy names the folders used.
  Without `source_dir`, a config with `synthetic_cases > 0` (the demo) generates a synthetic
  BraTS-like set into <workdir>/synthetic, whole or not at all, and prepares it into
  <workdir>/prepared unless data_dir is set; any other config stops with a message saying
  where to get the data.
  """
  data_config = ml_collections.ConfigDict(data_config.to_dict())
  workdir = os.path.abspath(workdir)
  if data_config.get("download", None):
    return _prepare_download(data_config)
  if data_config.source_dir is None:
    if data_config.synthetic_cases <= 0:
      raise FileNotFoundError(
          "No training data: set --config.data.source_dir to the Medical Segmentation "
          "Decathlon Task01_BrainTumour folder (http://medicaldecathlon.com) or to the BraTS "
          "2018 training folder (registration on the BraTS challenge site), e.g. "
          "--config.data.source_dir=/data/Task01_BrainTumour; or download and check the "
          "Decathlon's archive with --config.data.download=msd_task01 (7.6 GB; add "
          "--config.data.download_cases=20 for its first 20 cases alone).")
    data_config.source_dir = os.path.join(workdir, "synthetic")
    if data_config.data_dir is None:
      data_config.data_dir = os.path.join(workdir, "prepared")
    if not os.path.isdir(data_config.source_dir):
      shape = tuple(data_config.synthetic_shape)
      logging.info("Generating %d synthetic cases of shape %s into %s.",
                   data_config.synthetic_cases, shape, data_config.source_dir)
      synthetic.generate_dataset_atomically(
          data_config.source_dir, data_config.synthetic_layout, data_config.synthetic_cases,
          shape=shape, seed=data_config.split_seed,
          labels=data_config.get("synthetic_labels", "auto"),
          geometry=data_config.get("synthetic_geometry", "brats"))
  elif not os.path.isdir(data_config.source_dir):
    raise FileNotFoundError(f"{data_config.source_dir}: --config.data.source_dir is not a folder.")
  prepare(data_config)
  return data_config


def _prepare_download(data_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Downloads (unless cached) and prepares config.data.download; names the folders used."""
  if data_config.source_dir:
    raise ValueError(f"config.data.download={data_config.download} and config.data.source_dir="
                     f"{data_config.source_dir} are both set; choose one.")
  builder = prepare(data_config)
  data_config.data_dir = str(builder.data_dir_root)
  data_config.source_dir = builder.info.metadata["source_dir"]
  return data_config


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
  spacings = info.metadata.get("non_1mm_spacing", {})
  lines.append(f"  voxel spacing not 1 mm: {len(spacings)} case(s)")
  lines.extend(f"    {case}: {' x '.join(f'{v:g}' for v in spacing)} mm"
               for case, spacing in sorted(spacings.items()))
  warnings = info.metadata.get("label_warnings", [])
  lines.append(f"  label-convention warnings (T1gd: ET not brighter than NCR/NET): "
               f"{len(warnings)}")
  lines.extend(f"    {w}" for w in warnings)
  return "\n".join(lines)


def data_config_from_flags() -> ml_collections.ConfigDict:
  """config.data with the flags' overrides applied."""
  data = config_lib.get_data_config()
  data.source_dir = _FLAGS.src
  if _FLAGS.data_dir:
    data.data_dir = _FLAGS.data_dir
  for name in _DATA_KEY_FLAGS:
    if _FLAGS[name].value is not None:
      data[name] = _FLAGS[name].value
  overrides = {}
  for name in preprocess.defaults():
    value = _FLAGS[name].value
    if isinstance(value, list):
      value = tuple(v for v in value if v)
    if value is not None:
      overrides[name] = value
  # Converted and checked by the one list of parameters (config.data holds their defaults).
  checked = preprocess.Preprocessing(**overrides)
  for name in overrides:
    data[name] = getattr(checked, name)
  return data


def main(argv) -> None:
  del argv  # The command line is all flags (run_command refuses other arguments).
  if _FLAGS.src and _FLAGS.download:
    raise ValueError("--src and --download are both given; choose one.")
  if not _FLAGS.src and not _FLAGS.download:
    raise ValueError("--src is required: the raw NIfTI folder (MSD Task01_BrainTumour or a "
                     "BraTS training folder); or --download=msd_task01 to download the paper's "
                     "data.")
  prepare(data_config_from_flags())


def run() -> None:
  """Console-script entry point (msatt-prepare)."""
  cli.run_command(main, define_flags)


if __name__ == "__main__":
  run()
