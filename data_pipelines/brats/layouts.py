"""Finding and reading BraTS cases in the two download layouts (MSD Task01 and the challenge's).

MSD `Task01_BrainTumour`:
  dataset.json, imagesTr/BRATS_###.nii.gz (4D, channel last, order given by dataset.json),
  labelsTr/BRATS_###.nii.gz (3D; 1 edema, 2 non-enhancing, 3 enhancing).
BraTS challenge:
  [HGG/|LGG/]<case>/<case>_{flair,t1,t1ce,t2,seg}.nii[.gz] (seg: 1 NCR/NET, 2 ED, 4 ET).

Everything returned is in the project's terms: canonical modality names (MODALITIES) and
canonical labels (labels.py). Bad input raises DataError naming the file and the problem.
"""

import dataclasses
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np

from data_pipelines.brats import labels as labels_lib
from data_pipelines.errors import DataError

MODALITIES = ("flair", "t1", "t1ce", "t2")
LAYOUTS = ("msd", "brats")
# MSD dataset.json modality names (and common spellings, lower-cased) -> canonical names.
MSD_MODALITY_NAMES = {
    "flair": "flair",
    "t1w": "t1", "t1": "t1",
    "t1gd": "t1ce", "t1ce": "t1ce", "t1c": "t1ce",
    "t2w": "t2", "t2": "t2",
}
# The Decathlon's own dataset.json 'modality' entry: channel -> name.
MSD_DATASET_MODALITIES = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
# Its channel order in canonical names, used when no dataset.json is at hand.
MSD_DEFAULT_ORDER = tuple(MSD_MODALITY_NAMES[MSD_DATASET_MODALITIES[str(c)].lower()]
                          for c in range(len(MSD_DATASET_MODALITIES)))
NIFTI_SUFFIXES = (".nii.gz", ".nii")
BRATS_GROUPS = ("HGG", "LGG")


@dataclasses.dataclass
class CaseRef:
  """Where one case's files are; nothing is read yet."""
  case_id: str
  layout: str  # 'msd' | 'brats'
  image_paths: Dict[str, str]  # modality -> file (MSD: the same 4D file for every modality).
  channel: Dict[str, int]  # MSD: modality -> channel of the 4D file; empty for 'brats'.
  label_path: Optional[str]


@dataclasses.dataclass
class Case:
  """One loaded case in the project's terms."""
  case_id: str
  image: np.ndarray  # (X, Y, Z, M) float32, modalities in `modalities` order.
  label: Optional[np.ndarray]  # (X, Y, Z) uint8 canonical labels, or None.
  affine: np.ndarray  # (4, 4) voxel -> world of the reference image.
  header: nib.Nifti1Header  # Reference image header with a 3D shape (for writing predictions).
  spacing: Tuple[float, float, float]  # Voxel size in mm.
  modalities: Tuple[str, ...] = MODALITIES  # Names of the image channels.


def _strip_nifti_suffix(name: str) -> Optional[str]:
  for suffix in NIFTI_SUFFIXES:
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return None


def _is_hidden(name: str) -> bool:
  # '._*' are macOS resource forks shipped in the Decathlon tarball; '.*' also covers the
  # temporary files of an interrupted writer.
  return name.startswith(".")


def _require_folder(folder) -> Path:
  path = Path(folder)
  if not path.exists():
    raise DataError(f"{path}: folder does not exist.")
  if not path.is_dir():
    raise DataError(f"{path}: is not a folder.")
  return path


def _brats_case_files(case_dir: Path) -> Dict[str, Path]:
  """`<case>_<kind>.nii[.gz]` files of a case folder, kind in MODALITIES + ('seg',)."""
  files: Dict[str, Path] = {}
  for kind in MODALITIES + ("seg",):
    found = [case_dir / f"{case_dir.name}_{kind}{suffix}" for suffix in NIFTI_SUFFIXES]
    found = [p for p in found if p.is_file()]
    if len(found) > 1:
      raise DataError(f"{case_dir}: both {found[0].name} and {found[1].name} exist; "
                      "keep one of them.")
    if found:
      files[kind] = found[0]
  return files


def _brats_case_dirs(root: Path) -> List[Path]:
  """Case folders directly under root and under root/HGG, root/LGG."""
  parents = [root] + [root / g for g in BRATS_GROUPS if (root / g).is_dir()]
  dirs = []
  for parent in parents:
    for child in sorted(parent.iterdir()):
      if child.is_dir() and not _is_hidden(child.name) and child.name not in BRATS_GROUPS:
        if _brats_case_files(child):
          dirs.append(child)
  return dirs


def detect_layout(folder) -> str:
  """'msd' (dataset.json or imagesTr present) or 'brats' (case folders with a FLAIR file)."""
  root = _require_folder(folder)
  if (root / "dataset.json").is_file() or (root / "imagesTr").is_dir():
    return "msd"
  if any("flair" in _brats_case_files(d) for d in _brats_case_dirs(root)):
    return "brats"
  raise DataError(f"{root}: neither an MSD folder (dataset.json, imagesTr/) nor a BraTS folder "
                  "(<case>/<case>_flair.nii.gz, optionally under HGG/ and LGG/).")


def _msd_modality_channels(modality: dict, source: Path) -> Dict[str, int]:
  """dataset.json 'modality' {"0": "FLAIR", ...} -> {canonical name: channel}."""
  if not isinstance(modality, dict) or not modality:
    raise DataError(f"{source}: 'modality' must be a non-empty object such as "
                    f"{json.dumps(MSD_DATASET_MODALITIES)}.")
  channels: Dict[str, int] = {}
  for key, name in modality.items():
    canonical = MSD_MODALITY_NAMES.get(str(name).lower())
    if canonical is None:
      raise DataError(f"{source}: unknown modality name {name!r} (known: "
                      f"{', '.join(sorted(MSD_MODALITY_NAMES))}).")
    try:
      index = int(key)
    except ValueError:
      raise DataError(f"{source}: modality key {key!r} is not a channel index.") from None
    if canonical in channels:
      raise DataError(f"{source}: modality {canonical!r} is listed twice.")
    channels[canonical] = index
  if sorted(channels.values()) != list(range(len(channels))):
    raise DataError(f"{source}: modality channels {sorted(channels.values())} are not "
                    f"0..{len(channels) - 1}.")
  return channels


def _read_dataset_json(path: Path) -> dict:
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f"{path}: cannot read dataset.json ({e}).") from None
  if not isinstance(meta, dict):
    raise DataError(f"{path}: expected a JSON object.")
  return meta


def _msd_channels_for(image_dir: Path) -> Dict[str, int]:
  """Channel order from the dataset.json one level above image_dir, else the Decathlon's."""
  meta_path = image_dir.parent / "dataset.json"
  if meta_path.is_file():
    meta = _read_dataset_json(meta_path)
    if "modality" in meta:
      return _msd_modality_channels(meta["modality"], meta_path)
  return {m: i for i, m in enumerate(MSD_DEFAULT_ORDER)}


def _nifti_files(folder: Path) -> Dict[str, Path]:
  """case id -> NIfTI file of a folder, skipping hidden files."""
  files = {}
  if folder.is_dir():
    for p in sorted(folder.iterdir()):
      case_id = _strip_nifti_suffix(p.name)
      if case_id is None or _is_hidden(p.name) or not p.is_file():
        continue
      if case_id in files:
        raise DataError(f"{folder}: both {files[case_id].name} and {p.name} exist.")
      files[case_id] = p
  return files


def _msd_training_pairs(root: Path, meta: dict, meta_path: Path) -> Dict[str, Tuple[Path, Path]]:
  """dataset.json 'training' -> {case id: (image, label)}; every listed file must exist."""
  training = meta["training"]
  if not isinstance(training, list):
    raise DataError(f"{meta_path}: 'training' must be a list.")
  if "numTraining" in meta and meta["numTraining"] != len(training):
    raise DataError(f"{meta_path}: numTraining is {meta['numTraining']} but 'training' lists "
                    f"{len(training)} cases.")
  pairs = {}
  for entry in training:
    if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
      raise DataError(f"{meta_path}: training entry {entry!r} needs 'image' and 'label'.")
    image, label = root / entry["image"], root / entry["label"]
    for p in (image, label):
      if not p.is_file():
        raise DataError(f"{p}: listed in {meta_path.name} but missing.")
    case_id = _strip_nifti_suffix(image.name)
    if case_id is None:
      raise DataError(f"{meta_path}: {entry['image']} is not a .nii/.nii.gz file.")
    pairs[case_id] = (image, label)
  return pairs


def _find_msd(root: Path) -> List[CaseRef]:
  images = _nifti_files(root / "imagesTr")
  labels = _nifti_files(root / "labelsTr")
  meta_path = root / "dataset.json"
  channels = {m: i for i, m in enumerate(MSD_DEFAULT_ORDER)}
  if meta_path.is_file():
    meta = _read_dataset_json(meta_path)
    if "modality" in meta:
      channels = _msd_modality_channels(meta["modality"], meta_path)
    if "training" in meta:
      pairs = _msd_training_pairs(root, meta, meta_path)
      unlisted = sorted(set(images) - set(pairs))
      if unlisted:
        raise DataError(f"{meta_path}: imagesTr/{images[unlisted[0]].name} (and "
                        f"{len(unlisted) - 1} more) not listed in 'training'; the file list "
                        "does not match dataset.json.")
      images = {c: p[0] for c, p in pairs.items()}
      labels = {c: p[1] for c, p in pairs.items()}
  if not images:
    raise DataError(f"{root}: no MSD images (imagesTr/*.nii.gz) found.")
  orphans = sorted(set(labels) - set(images))
  if orphans:
    raise DataError(f"{labels[orphans[0]]}: label without an image in imagesTr.")
  refs = []
  for case_id, image in images.items():
    # A labelsTr folder means a training set: then every image needs its label.
    if (root / "labelsTr").is_dir() and case_id not in labels:
      raise DataError(f"{root / 'labelsTr'}: no label for image {image.name}.")
    label = labels.get(case_id)
    refs.append(CaseRef(case_id=case_id, layout="msd",
                        image_paths={m: str(image) for m in channels},
                        channel=dict(channels),
                        label_path=str(label) if label is not None else None))
  return sorted(refs, key=lambda r: r.case_id)


def _brats_ref(case_dir: Path) -> CaseRef:
  files = _brats_case_files(case_dir)
  seg = files.pop("seg", None)
  return CaseRef(case_id=case_dir.name, layout="brats",
                 image_paths={m: str(p) for m, p in files.items()}, channel={},
                 label_path=str(seg) if seg is not None else None)


def _find_brats(root: Path) -> List[CaseRef]:
  refs, seen = [], {}
  for case_dir in _brats_case_dirs(root):
    if case_dir.name in seen:
      raise DataError(f"{case_dir}: case id also used by {seen[case_dir.name]}.")
    seen[case_dir.name] = case_dir
    refs.append(_brats_ref(case_dir))
  if not refs:
    raise DataError(f"{root}: no BraTS case folders (<case>/<case>_flair.nii.gz) found.")
  return sorted(refs, key=lambda r: r.case_id)


def find_cases(folder, layout: str = "auto") -> List[CaseRef]:
  """All cases of an MSD or BraTS folder, sorted by case id; consistency errors raise."""
  root = _require_folder(folder)
  if layout == "auto":
    layout = detect_layout(root)
  if layout == "msd":
    return _find_msd(root)
  if layout == "brats":
    return _find_brats(root)
  raise ValueError(f"Unknown layout {layout!r}; choose 'auto', 'msd' or 'brats'.")


def read_nifti(path: str) -> Tuple[nib.Nifti1Image, np.ndarray]:
  """Reads header and voxels; any failure (truncated, not NIfTI) is a DataError naming path."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: file does not exist.")
  try:
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
  except Exception as e:  # nibabel/gzip/zlib raise many types for corrupt files.
    raise DataError(f"{path}: cannot read as NIfTI ({type(e).__name__}: {e}).") from None
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    raise DataError(f"{path}: is a {type(img).__name__}, not a NIfTI image.")
  return img, data


def squeeze_to_ndim(data: np.ndarray, ndim: int, path: str) -> np.ndarray:
  # Some writers add trailing singleton axes (X, Y, Z, 1).
  while data.ndim > ndim and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim != ndim:
    raise DataError(f"{path}: expected a {ndim}D volume, got shape {data.shape}.")
  return data


def _check_finite(data: np.ndarray, path: str) -> None:
  if data.dtype.kind == "f":
    bad = np.count_nonzero(~np.isfinite(data))
    if bad:
      raise DataError(f"{path}: {bad} NaN or Inf voxels.")


def _load_msd_image(ref: CaseRef, modalities: Sequence[str]):
  paths = {ref.image_paths[m] for m in modalities}
  if len(paths) != 1:
    raise DataError(f"case {ref.case_id}: MSD modalities point at several files {sorted(paths)}.")
  path = paths.pop()
  img, data = read_nifti(path)
  data = squeeze_to_ndim(data, 4, path)
  num_channels = len(ref.channel)
  if data.shape[3] != num_channels:
    raise DataError(f"{path}: {data.shape[3]} channels but dataset.json lists {num_channels} "
                    "modalities.")
  image = np.empty(data.shape[:3] + (len(modalities),), np.float32)
  for i, m in enumerate(modalities):
    image[..., i] = data[..., ref.channel[m]]
  del data
  _check_finite(image, path)
  return img, image


def _load_brats_image(ref: CaseRef, modalities: Sequence[str]):
  image, ref_img, first = None, None, None
  for i, m in enumerate(modalities):
    path = ref.image_paths[m]
    img, data = read_nifti(path)
    data = squeeze_to_ndim(data, 3, path)
    _check_finite(data, path)
    if image is None:
      # One float32 volume for the case; each modality is read, copied in and dropped.
      image = np.empty(data.shape + (len(modalities),), np.float32)
      ref_img, first = img, (m, path)
    elif data.shape != image.shape[:3]:
      raise DataError(f"{path}: shape {data.shape} of {m} differs from {image.shape[:3]} of "
                      f"{first[0]} ({first[1]}).")
    image[..., i] = data
  return ref_img, image


def load_case(ref: CaseRef, modalities: Sequence[str] = MODALITIES,
              label_convention: str = "auto") -> Case:
  """Reads a case: image (X,Y,Z,M) float32 in `modalities` order, canonical uint8 label."""
  modalities = tuple(modalities)
  if not modalities:
    raise ValueError("At least one modality must be requested.")
  unknown = [m for m in modalities if m not in MODALITIES]
  if unknown:
    raise ValueError(f"Unknown modalities {unknown}; choose from {', '.join(MODALITIES)}.")
  missing = [m for m in modalities if m not in ref.image_paths]
  if missing:
    raise DataError(f"case {ref.case_id}: missing modality {', '.join(missing)} (has "
                    f"{', '.join(sorted(ref.image_paths)) or 'none'}).")
  if ref.layout == "msd":
    ref_img, image = _load_msd_image(ref, modalities)
  elif ref.layout == "brats":
    ref_img, image = _load_brats_image(ref, modalities)
  else:
    raise ValueError(f"Unknown layout {ref.layout!r}.")

  label = None
  if ref.label_path is not None:
    convention = labels_lib.resolve_convention(label_convention, ref.layout)
    _, raw = read_nifti(ref.label_path)
    raw = squeeze_to_ndim(raw, 3, ref.label_path)
    if raw.shape != image.shape[:3]:
      raise DataError(f"{ref.label_path}: label shape {raw.shape} differs from image shape "
                      f"{image.shape[:3]}.")
    label = labels_lib.to_canonical(raw, convention, source=ref.label_path)

  header = ref_img.header.copy()
  header.set_data_shape(image.shape[:3])
  spacing = tuple(float(z) for z in ref_img.header.get_zooms()[:3])
  return Case(case_id=ref.case_id, image=image, label=label, affine=np.array(ref_img.affine),
              header=header, spacing=spacing, modalities=modalities)


def case_ref_from_path(path) -> CaseRef:
  """A CaseRef for one new scan: a BraTS case folder or an MSD 4D image file (no label needed)."""
  p = Path(path)
  if p.is_dir():
    files = _brats_case_files(p)
    if not any(m in files for m in MODALITIES):
      raise DataError(f"{p}: no {p.name}_{{flair,t1,t1ce,t2}}.nii[.gz] files in this case folder.")
    return _brats_ref(p)
  if p.is_file():
    case_id = _strip_nifti_suffix(p.name)
    if case_id is None:
      raise DataError(f"{p}: expected a BraTS case folder or an MSD .nii/.nii.gz 4D image.")
    channels = _msd_channels_for(p.parent)
    return CaseRef(case_id=case_id, layout="msd", image_paths={m: str(p) for m in channels},
                   channel=channels, label_path=None)
  raise DataError(f"{p}: does not exist.")


def check_label_convention(case: Case) -> Optional[str]:
  """A warning naming the case when ET is not brighter than NCR/NET on T1gd (swapped labels?)."""
  if case.label is None or "t1ce" not in case.modalities:
    return None
  t1gd = case.image[..., case.modalities.index("t1ce")]
  contrast = labels_lib.t1gd_contrast(t1gd, case.label)
  if contrast is None:
    return None
  et_mean, ncr_mean = contrast
  if et_mean > ncr_mean:
    return None
  return (f"case {case.case_id}: mean T1gd in ET ({et_mean:.1f}) <= in NCR/NET "
          f"({ncr_mean:.1f}); the label convention may be swapped.")
