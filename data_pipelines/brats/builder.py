"""TFDS builder 'brats': one example per preprocessed axial slice, patient-level splits.

Reads an MSD `Task01_BrainTumour` folder or a BraTS challenge training folder (the manual
folder), runs the one preprocessing of `preprocess.py` on each case and writes, per slice,
`image` (H, W, M), `label` (H, W) uint8 canonical, `case_id`, `slice_index` and `crop_offset`.

The preprocessing parameters (preprocess.Preprocessing, the one list of them) make a
`BratsConfig`; its name is 'default' for the paper's values and `p<hash>` otherwise, so data
prepared with other settings lives in another folder and is never read by mistake. The split
case lists, the parameters and the label-convention warnings are stored in the data set's
metadata (metadata.json beside dataset_info.json).

The source is the manual folder, or the Decathlon's archive downloaded into TFDS's downloads
folder (data_pipelines/download.py: checked against its published size and MD5, resumable):
`download=Request` (config.data.download), or `tfds build` without --manual_dir.

Build with the paper's settings:
  tfds build data_pipelines/brats/builder.py --manual_dir=SRC --data_dir=OUT
  tfds build data_pipelines/brats/builder.py --data_dir=OUT     # downloads MSD Task01
(TFDS 4.9's `tfds` command imports apache_beam and mlcroissant at start-up: the `tfds-cli`
extra installs both) or, with preprocessing overrides and without them,
  python -m data_pipelines.prepare --src SRC --data_dir OUT [--crop_size ... --modalities ...]
  python -m data_pipelines.prepare --download msd_task01 [--download_cases 20] --data_dir OUT

Storage: float16 images, uncompressed by default (config.data.compression 'zlib' shrinks them
about 3x on synthetic data at ~0.5 ms of CPU per slice when reading), labels zlib-compressed:
289 kB per 190x190x4 slice, 7.5 GB for the 285 x 91 slices of BraTS'18.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle as tfds_shuffle

from data_pipelines import download as download_lib
from data_pipelines import locks
from data_pipelines.brats import labels as labels_lib
from data_pipelines.brats import layouts
from data_pipelines.brats import preprocess
from data_pipelines.errors import DataError

NAME = "brats"
VERSION = "1.0.0"
SPLITS = ("train", "validation", "test")  # The one list of the prepared data set's splits.
# The paper: 285 BraTS'18 cases split 225 / 30 / 30.
PAPER_NUM_CASES = 285
PAPER_NUM_HELD_OUT = 30
# TFDS holds up to 1 GB of serialized examples in memory before spilling them to temporary
# bucket files; a smaller buffer keeps preparation's peak RSS well under 2 GB.
_SHUFFLE_MEMORY_BYTES = 256 << 20
_LOCK_NAME = ".prepare.lock"

_INSTRUCTIONS = """\
Download one of:
  * the Medical Segmentation Decathlon's Task01_BrainTumour (the paper's source), and unpack
    it so that the folder holds dataset.json, imagesTr/ and labelsTr/;
  * the BraTS 2018 training data from the challenge's registration page, with one folder per
    case (<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz), optionally under HGG/ and LGG/.
Point `--manual_dir` (tfds build) or `--src` (python -m data_pipelines.prepare) or
`config.data.source_dir` (training) at that folder. Or let the Decathlon's archive be downloaded
and checked: `--download=msd_task01` (prepare), `--config.data.download=msd_task01` (training).
"""


@dataclasses.dataclass(eq=False)
class BratsConfig(preprocess.Preprocessing, tfds.core.BuilderConfig):
  """A TFDS config whose content fields are the preprocessing parameters (preprocess.py).

  The layout is not one of them: it only says how to find the files, so it is a builder
  argument instead.
  """


def _content_params(cfg: Any) -> Dict[str, Any]:
  """The content-defining parameters as plain JSON values (tuples -> lists)."""
  out = {}
  for field in preprocess.parameters():
    value = getattr(cfg, field.name)
    if isinstance(value, (tuple, list)):
      value = [v for v in value]
    out[field.name] = value
  return out


_DEFAULT_PARAMS = _content_params(preprocess.Preprocessing())


class _QuietCustomConfig:
  """Drops TFDS's 'Using custom data configuration' line (the whole config, at every load)."""

  def filter(self, record) -> bool:
    return not str(record.msg).startswith("Using custom data configuration")


logging.get_absl_logger().addFilter(_QuietCustomConfig())


def config_name(params: Dict[str, Any]) -> str:
  """'default' for the paper's parameters, else 'p' + a short stable hash of them.

  Parameters added later (named_at_default=False) enter the hash only when set, so the data
  sets prepared before they existed keep their names.
  """
  if params == _DEFAULT_PARAMS:
    return "default"
  late = {f.name for f in preprocess.parameters() if not f.metadata["named_at_default"]}
  named = {k: v for k, v in params.items() if k not in late or v != _DEFAULT_PARAMS[k]}
  digest = hashlib.sha256(json.dumps(named, sort_keys=True).encode()).hexdigest()
  return "p" + digest[:10]


def make_config(**params: Any) -> BratsConfig:
  """A validated BratsConfig of preprocessing parameters (others at their defaults), whose name
  encodes them."""
  unknown = sorted(set(params) - set(_DEFAULT_PARAMS))
  if unknown:
    raise ValueError(f"Unknown preprocessing parameter(s) {', '.join(unknown)}; the "
                     f"parameters are {', '.join(_DEFAULT_PARAMS)}.")
  cfg = BratsConfig(name="pending", version=VERSION, **params)
  content = _content_params(cfg)
  cfg.name = config_name(content)
  cfg.description = "Preprocessing: " + json.dumps(content, sort_keys=True)
  return cfg


def _get(data_config, key: str, default: Any) -> Any:
  """A key of config.data (a ConfigDict, a dict or any object with attributes)."""
  if hasattr(data_config, "get"):
    return data_config.get(key, default)
  return getattr(data_config, key, default)


def config_from_data_config(data_config) -> BratsConfig:
  """config.data -> BratsConfig (a missing key takes its parameter's default)."""
  return make_config(**{name: _get(data_config, name, default)
                        for name, default in preprocess.defaults().items()})


def default_data_dir(source_dir: str) -> str:
  """Where prepared data goes when config.data.data_dir is unset: <source_dir>/../prepared."""
  source = os.path.abspath(os.path.expanduser(source_dir)).rstrip(os.sep)
  return os.path.join(os.path.dirname(source), "prepared")


def download_data_dir(request: download_lib.Request, data_dir: Any) -> str:
  """Where data prepared from a download go: data_dir (default: TFDS's, ~/tensorflow_datasets),
  and the first N cases in its own folder inside it, so they are never taken for the full set."""
  base = os.path.abspath(os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR))
  subset = download_lib.subset_folder_name(request) if request.cases else None
  if subset is None or os.path.basename(base) == subset:  # Already resolved.
    return base
  return os.path.join(base, subset)


def builder_from_config(data_config) -> "Brats":
  """The one mapping config.data -> the 'brats' builder (used to prepare, train and evaluate)."""
  data_dir = _get(data_config, "data_dir", None)
  source_dir = _get(data_config, "source_dir", None)
  request = download_lib.request_from_config(data_config)
  if request is not None:
    data_dir = download_data_dir(request, data_dir)
  elif not data_dir:
    if not source_dir:
      raise DataError("config.data: set source_dir (the raw NIfTI folder) or data_dir (the "
                      "prepared data).\n" + _INSTRUCTIONS)
    data_dir = default_data_dir(source_dir)
  cfg = config_from_data_config(data_config)
  # TFDS refuses a custom config object that shares the name of a class config.
  config = cfg.name if cfg.name in Brats.builder_configs else cfg
  return Brats(config=config, data_dir=os.path.abspath(os.path.expanduser(data_dir)),
               layout=_get(data_config, "layout", "auto"), download=request)


# ---------------------------------------------------------------------------------------------
# Patient-level splits.


def _held_out(num_cases: int, requested: int, name: str) -> int:
  """Cases of a held-out split: -1 proportional to the paper's 30 of 285 (rounded, >= 1)."""
  if num_cases < 3:
    raise DataError(f"{num_cases} labelled case(s): at least 3 are needed for the train, "
                    "validation and test splits.")
  if requested < 0:
    return max(1, int(round(num_cases * PAPER_NUM_HELD_OUT / PAPER_NUM_CASES)))
  if requested == 0:
    raise DataError(f"num_{name}_cases is 0: every split needs at least one case.")
  return int(requested)


def split_sizes(num_cases: int, num_validation: int = -1,
                num_test: int = -1) -> Tuple[int, int, int]:
  """(train, validation, test) case counts: 225/30/30 of 285, proportional otherwise.

  -1 means proportional to the paper's 30 of 285 (rounded), at least 1 each.
  """
  val = _held_out(num_cases, num_validation, "validation")
  test = _held_out(num_cases, num_test, "test")
  train = num_cases - val - test
  if train < 1:
    raise DataError(f"{val} validation + {test} test cases leave no training case of "
                    f"{num_cases}.")
  return train, val, test


def _case_rank(case_id: str, seed: int) -> str:
  # A hash instead of an RNG: the same on every platform and NumPy version, and a case's place
  # does not depend on which other cases exist.
  return hashlib.sha256(f"{seed}:{case_id}".encode()).hexdigest()


def split_case_ids(case_ids: Sequence[str], seed: int, num_validation: int = -1,
                   num_test: int = -1, num_folds: int = 0,
                   fold: int = 0) -> Dict[str, List[str]]:
  """Seeded patient-level split {'train', 'validation', 'test'} -> sorted case ids.

  The cases are ranked by a seeded hash; the first num_test are the test split. Without folds
  the next num_validation are the validation split and the rest train. With num_folds K >= 2
  the non-test cases are dealt in rank order to K folds (sizes differing by at most one): fold
  `fold` is the validation split and the others train (num_validation is ignored). The test
  split is the same in every fold and without folds, so folds are comparable.
  """
  ids = list(case_ids)
  if len(set(ids)) != len(ids):
    dupes = sorted({c for c in ids if ids.count(c) > 1})
    raise DataError(f"Duplicate case ids: {dupes}.")
  preprocess.check_folds(num_folds, fold)
  order = sorted(ids, key=lambda c: (_case_rank(c, seed), c))
  if not num_folds:
    _, val, test = split_sizes(len(ids), num_validation, num_test)
    validation, train = order[test:test + val], order[test + val:]
  else:
    test = _held_out(len(ids), num_test, "test")
    rest = order[test:]
    if num_folds > len(rest):
      raise DataError(f"num_folds={num_folds} is more folds than the {len(rest)} non-test "
                      f"case(s) of {len(ids)}; use at most {len(rest)} folds.")
    validation = rest[fold::num_folds]
    train = [c for i, c in enumerate(rest) if i % num_folds != fold]
  return {"test": sorted(order[:test]), "validation": sorted(validation),
          "train": sorted(train)}


# ---------------------------------------------------------------------------------------------
# Preparation safety: one preparer per config, leftovers of killed runs removed.


def incomplete_leftovers(config_dir: Path) -> List[Path]:
  """`incomplete.*` folders a killed preparation left in <data_dir>/brats/<config>/."""
  if not config_dir.is_dir():
    return []
  return sorted(p for p in config_dir.iterdir() if p.name.startswith("incomplete."))


@contextlib.contextmanager
def _small_shuffle_buffer() -> Iterator[None]:
  saved = tfds_shuffle.MAX_MEM_BUFFER_SIZE
  tfds_shuffle.MAX_MEM_BUFFER_SIZE = min(saved, _SHUFFLE_MEMORY_BYTES)
  try:
    yield
  finally:
    tfds_shuffle.MAX_MEM_BUFFER_SIZE = saved


# ---------------------------------------------------------------------------------------------
# The builder.


class Brats(tfds.core.GeneratorBasedBuilder):
  """BraTS / MSD Task01 brain tumour slices, preprocessed as in the paper (Section IV)."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): "One example per axial slice; patient-level splits."}
  BUILDER_CONFIGS = [make_config()]
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

  # TFDS prints its own "Downloading and preparing dataset Unknown size ..." and "Subsequent
  # calls will reuse this data." lines; `prepare` reports the cases, sizes and folder itself.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def __init__(self, *args, layout: str = "auto",
               download: Optional[download_lib.Request] = None, **kwargs):
    if layout not in ("auto",) + layouts.LAYOUTS:
      raise ValueError(f"Unknown layout {layout!r}; choose 'auto' or one of "
                       f"{', '.join(layouts.LAYOUTS)}.")
    self.layout = layout  # How the manual folder is laid out: 'auto' or a layouts.LAYOUTS one.
    # The archive to download instead of reading a manual folder; None: the manual folder, or,
    # when none was given (`tfds build` without --manual_dir), the Decathlon's archive.
    self.download = download
    self._manual_dir_given = False
    super().__init__(*args, **kwargs)
    # Filled while preparing: per-case progress and the label-convention warnings.
    self.progress_fn = lambda message: logging.info("%s", message)
    self.report: Dict[str, Any] = {}

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    size, num_modalities = cfg.crop_size, len(cfg.modalities)
    encoding = (tfds.features.Encoding.ZLIB if cfg.compression == "zlib"
                else tfds.features.Encoding.BYTES)
    return self.dataset_info_from_configs(
        description=("Preprocessed axial slices of BraTS brain MRI (FLAIR, T1, T1gd, T2) with "
                     "canonical labels 0 background, 1 NCR/NET, 2 ED, 3 ET."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(size, size, num_modalities),
                                          dtype=np.dtype(cfg.storage_dtype), encoding=encoding),
            # Labels are mostly background: zlib stores 36 kB of them in a few hundred bytes.
            "label": tfds.features.Tensor(shape=(size, size), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.ZLIB),
            "case_id": tfds.features.Text(),
            "slice_index": np.int32,
            "crop_offset": tfds.features.Tensor(shape=(2,), dtype=np.int32),
        }),
        supervised_keys=("image", "label"),
        homepage="http://medicaldecathlon.com/",
        metadata=tfds.core.MetadataDict(),
    )

  def download_and_prepare(self, **kwargs) -> None:
    """TFDS's preparation under a lock, after removing what a killed run left behind."""
    download_config = kwargs.get("download_config")
    self._manual_dir_given = bool(download_config and download_config.manual_dir)
    config_dir = Path(self.data_path).parent
    with locks.hold(config_dir / _LOCK_NAME):
      # Under the lock no other preparation runs: any incomplete.* folder is a dead run's.
      for leftover in incomplete_leftovers(config_dir):
        logging.warning("Removing %s, left by an interrupted preparation.", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
      with _small_shuffle_buffer():
        super().download_and_prepare(**kwargs)

  def _source_dir(self, dl_manager: tfds.download.DownloadManager) -> Tuple[Path, Any]:
    """The folder of NIfTI cases and the identity of the download it came from (or None)."""
    request = self.download
    if request is None:
      try:
        return Path(dl_manager.manual_dir), None
      except AssertionError:  # TFDS's 'does not exist or is empty'.
        if self._manual_dir_given:
          raise
        request = download_lib.default_request()
        self.progress_fn("No manual folder given: downloading the Decathlon's Task01 archive.")
    try:
      source = download_lib.fetch(request, Path(dl_manager.download_dir))
    except download_lib.DownloadError as e:
      published = download_lib.SOURCES[request.source]
      raise download_lib.DownloadError(
          f"{e}\nOr download {published.url} by hand ({published.size} bytes, MD5 "
          f"{published.md5}), unpack it, and prepare from that folder:\n{_INSTRUCTIONS}"
      ) from None
    return source, request.identity()

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    cfg = self.builder_config
    source, downloaded = self._source_dir(dl_manager)
    refs = layouts.find_cases(source, self.layout)
    case_ids = [r.case_id for r in refs]
    splits = split_case_ids(case_ids, cfg.split_seed, cfg.num_validation_cases,
                            cfg.num_test_cases, cfg.num_folds, cfg.fold)
    layout = refs[0].layout
    convention = layouts.folder_convention(refs, cfg.label_convention)
    self.report = {"num_cases": len(refs), "cases_done": 0, "seconds": 0.0, "warnings": [],
                   "spacings": {}}
    metadata = self.info.metadata
    metadata.clear()
    metadata.update({
        "source_dir": str(source.resolve()),
        "download": downloaded,
        "layout": layout,
        # The labels' meaning: the convention read and the label set a model trained on
        # these data outputs (labels.py).
        "label_convention": convention,
        "label_set": labels_lib.label_set(convention).name,
        "preprocessing": _content_params(cfg),
        "splits": splits,
        "case_ids": sorted(case_ids),
        "label_warnings": self.report["warnings"],
        # Cases whose voxels are not 1 mm (the model sees voxels, not millimetres): case ->
        # spacing (mm); scores in mm use each case's own.
        "non_1mm_spacing": self.report["spacings"],
    })
    by_id = {r.case_id: r for r in refs}
    return {split: self._generate_examples([by_id[c] for c in splits[split]])
            for split in SPLITS}

  def _generate_examples(self, refs: Sequence[layouts.CaseRef]):
    # One case in memory at a time; its arrays are dropped before the next one is read.
    for ref in refs:
      start = time.perf_counter()
      slices, warning = self._load_slices(ref)
      if warning:
        self.report["warnings"].append(warning)
        logging.warning("%s", warning)
      dtype = np.dtype(self.builder_config.storage_dtype)
      offset = np.asarray(slices.offsets, np.int32)
      for i, z in enumerate(slices.slice_indices):
        yield f"{ref.case_id}_{int(z):04d}", {
            "image": slices.image[i].astype(dtype),
            "label": slices.label[i],
            "case_id": ref.case_id,
            "slice_index": np.int32(z),
            "crop_offset": offset,
        }
      del slices
      elapsed = time.perf_counter() - start
      self.report["cases_done"] += 1
      self.report["seconds"] += elapsed
      done, total = self.report["cases_done"], self.report["num_cases"]
      eta = self.report["seconds"] / done * (total - done)
      self.progress_fn(f"case {done}/{total} {ref.case_id}: {elapsed:.2f} s "
                       f"(ETA {eta / 60:.1f} min)")

  def _load_slices(self, ref: layouts.CaseRef):
    cfg = self.builder_config
    case = layouts.load_case(ref, cfg.modalities, cfg.label_convention)
    if case.label is None:
      raise DataError(f"case {ref.case_id}: no label file (labelsTr/ or <case>_seg.nii.gz); "
                      "training data needs labels.")
    warning = layouts.check_label_convention(case)
    if not np.allclose(case.spacing, 1.0, atol=1e-3):
      self.report["spacings"][ref.case_id] = list(case.spacing)
      logging.warning("case %s: voxel spacing %s mm, not 1 mm.", ref.case_id, case.spacing)
    try:
      slices = preprocess.preprocess_case(
          case.image, case.label, slice_start=cfg.slice_start, slice_stop=cfg.slice_stop,
          crop_size=cfg.crop_size, crop_center=cfg.crop_center, normalize=cfg.normalize,
          crop_around=cfg.crop_around, slice_range=cfg.slice_range)
    except ValueError as e:
      source = next(iter(ref.image_paths.values()))
      raise DataError(f"{source} (case {ref.case_id}): {e}") from None
    return slices, warning


def prepared_bytes(builder: tfds.core.DatasetBuilder) -> int:
  """Bytes on disk of a prepared data set's folder."""
  return sum(p.stat().st_size for p in Path(builder.data_path).rglob("*") if p.is_file())
