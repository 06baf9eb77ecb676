"""Finding and reading BraTS cases in the download layouts: MSD Task01 and the challenge's namings.

MSD `Task01_BrainTumour`:
  dataset.json, imagesTr/BRATS_###.nii.gz (4D, channel last, order given by dataset.json),
  labelsTr/BRATS_###.nii.gz (3D; 1 edema, 2 non-enhancing, 3 enhancing).
BraTS 2018-2021 ('brats'):
  [HGG/|LGG/]<case>/<case>_{flair,t1,t1ce,t2,seg}.nii[.gz] (seg: 1 NCR/NET, 2 ED, 4 ET).
BraTS 2023-2025 ('brats2023'), every challenge (GLI, SSA, MEN, MET, PED, ...):
  BraTS-<CHALLENGE>-NNNNN-NNN/BraTS-<CHALLENGE>-NNNNN-NNN-{t2f,t1n,t1c,t2w,seg}.nii[.gz]
  (t2f FLAIR, t1n T1, t1c T1-Gd, t2w T2; seg values by challenge and year: labels.py).

The namings are rows of NAMINGS and the modality names one table, MODALITY_ALIASES, so a model
trained on one naming reads the other. Everything returned is in the project's terms: canonical
modality names (MODALITIES) and canonical labels (labels.py). A label convention is never
guessed: where the naming does not decide it (BraTS-PED: 2023 and 2024 give the values other
meanings) an explicit one is required, and one that contradicts the naming is refused. Bad input
raises DataError naming the file and the problem.
"""

import dataclasses
import json
import os
from pathlib import Path
import re
from typing import Dict, List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np

from data_pipelines.brats import labels as labels_lib
from data_pipelines.errors import DataError

# The one table of modality names: canonical name -> its spellings, in the order
# (BraTS 2018-2021 file suffix, BraTS 2023+ file suffix, other spellings of MSD's dataset.json).
MODALITY_ALIASES = {
    "flair": ("flair", "t2f"),
    "t1": ("t1", "t1n", "t1w"),
    "t1ce": ("t1ce", "t1c", "t1gd"),
    "t2": ("t2", "t2w"),
}
MODALITIES = tuple(MODALITY_ALIASES)
# Any spelling (lower-cased) -> canonical name.
MSD_MODALITY_NAMES = {alias: name for name, aliases in MODALITY_ALIASES.items()
                      for alias in aliases}
# The Decathlon's own dataset.json 'modality' entry: channel -> name.
MSD_DATASET_MODALITIES = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
# Its channel order in canonical names, used when no dataset.json is at hand.
MSD_DEFAULT_ORDER = tuple(MSD_MODALITY_NAMES[MSD_DATASET_MODALITIES[str(c)].lower()]
                          for c in range(len(MSD_DATASET_MODALITIES)))


def canonical_modality(name: str) -> str:
  """Any spelling of a modality (t2f, T1w, t1c, ...) -> its canonical name; ValueError else."""
  canonical = MSD_MODALITY_NAMES.get(str(name).lower())
  if canonical is None:
    raise ValueError(f"Unknown modality {name!r}; known: {', '.join(sorted(MSD_MODALITY_NAMES))}.")
  return canonical


@dataclasses.dataclass(frozen=True)
class Naming:
  """One challenge naming of case folders: `<case>/<case><separator><suffix>.nii[.gz]`."""
  layout: str
  years: str
  separator: str
  spelling: int  # Which spelling of MODALITY_ALIASES the files use.
  case_pattern: str  # Regular expression of the case folder names.
  # Label conventions files of this naming may hold (labels.CONVENTION_TABLE).
  conventions: Tuple[str, ...]

  def suffix(self, modality: str) -> str:
    return MODALITY_ALIASES[modality][self.spelling]


NAMINGS: Dict[str, Naming] = {n.layout: n for n in (
    Naming("brats", "2018-2021", "_", 0, r".+", ("brats", "msd", "brats2023")),
    Naming("brats2023", "2023-2025", "-", 1, r"^BraTS-(?P<challenge>[A-Za-z]+)-\d{5}-\d{3}$",
           ("brats2023", "gli2024", "ped2024")),
)}
LAYOUTS = ("msd",) + tuple(NAMINGS)
SEG = "seg"
# The convention 'auto' means for a layout.
LAYOUT_CONVENTION = {"msd": "msd", "brats": "brats"}
# 2023+ names, per challenge: (what 'auto' means, or None where the names do not decide; the
# conventions its files may hold). GLI 2024 keeps 2023's values 1-3 and adds 4 (RC), which
# 'brats2023' refuses with a hint; BraTS-PED 2023 (1 NCR, 2 ED, 3 ET) and 2024 (1 ET, 2 NET,
# 3 CC, 4 ED) give 1-3 other meanings, so PED needs the choice. A challenge not listed needs it.
CHALLENGE_CONVENTIONS = {
    "GLI": ("brats2023", ("brats2023", "gli2024")),
    "SSA": ("brats2023", ("brats2023",)),
    "MEN": ("brats2023", ("brats2023",)),
    "MET": ("brats2023", ("brats2023",)),
    "PED": (None, ("brats2023", "ped2024")),
}
# Conventions of the MSD layout's labelsTr files.
MSD_CONVENTIONS = ("msd", "brats")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
BRATS_GROUPS = ("HGG", "LGG")


@dataclasses.dataclass
class CaseRef:
  """Where one case's files are; nothing is read yet."""
  case_id: str
  layout: str  # 'msd' | 'brats' | 'brats2023'
  image_paths: Dict[str, str]  # modality -> file (MSD: the same 4D file for every modality).
  channel: Dict[str, int]  # MSD: modality -> channel of the 4D file; empty otherwise.
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


def _naming_files(case_dir: Path, naming: Naming) -> Dict[str, Path]:
  """`<case><sep><suffix>.nii[.gz]` files of a case folder in one naming, by modality/'seg'."""
  files: Dict[str, Path] = {}
  kinds = {m: naming.suffix(m) for m in MODALITIES}
  kinds[SEG] = SEG
  for kind, suffix in kinds.items():
    found = [case_dir / f"{case_dir.name}{naming.separator}{suffix}{ext}"
             for ext in NIFTI_SUFFIXES]
    found = [p for p in found if p.is_file()]
    if len(found) > 1:
      raise DataError(f"{case_dir}: both {found[0].name} and {found[1].name} exist; "
                      "keep one of them.")
    if found:
      files[kind] = found[0]
  return files


def _case_naming(case_dir: Path) -> Tuple[Optional[Naming], Dict[str, Path]]:
  """(the naming, its files) of a case folder; (None, {}) without any; files of two namings
  in one folder are refused."""
  found = [(n, f) for n in NAMINGS.values() for f in [_naming_files(case_dir, n)]
           if any(m in f for m in MODALITIES)]
  if len(found) > 1:
    raise DataError(f"{case_dir}: holds files of two namings ({found[0][0].layout}: "
                    f"{sorted(p.name for p in found[0][1].values())[0]}, {found[1][0].layout}: "
                    f"{sorted(p.name for p in found[1][1].values())[0]}); keep one.")
  return found[0] if found else (None, {})


def _brats_case_files(case_dir: Path) -> Dict[str, Path]:
  """The modality and 'seg' files of a case folder in whichever naming it uses."""
  return _case_naming(case_dir)[1]


def _brats_case_dirs(root: Path) -> List[Path]:
  """Case folders directly under root and under root/HGG, root/LGG."""
  parents = [root] + [root / g for g in BRATS_GROUPS if (root / g).is_dir()]
  dirs = []
  for parent in parents:
    for child in sorted(parent.iterdir()):
      if child.is_dir() and not _is_hidden(child.name) and child.name not in BRATS_GROUPS:
        if _case_naming(child)[0] is not None:
          dirs.append(child)
  return dirs


def detect_layout(folder) -> str:
  """'msd' (dataset.json or imagesTr present), else the naming of its case folders."""
  root = _require_folder(folder)
  if (root / "dataset.json").is_file() or (root / "imagesTr").is_dir():
    return "msd"
  namings = folder_namings(root)
  if namings:
    return namings[0]
  raise DataError(f"{root}: neither an MSD folder (dataset.json, imagesTr/) nor a BraTS folder "
                  "(<case>/<case>_flair.nii.gz, optionally under HGG/ and LGG/; or 2023+ "
                  "BraTS-GLI-00000-000/BraTS-GLI-00000-000-t2f.nii.gz).")


def folder_namings(root) -> List[str]:
  """The one naming of a folder's cases (empty without cases); a folder mixing them raises."""
  root = Path(root)
  seen: Dict[str, Path] = {}
  for case_dir in _brats_case_dirs(root):
    naming, _ = _case_naming(case_dir)
    seen.setdefault(naming.layout, case_dir)
  if len(seen) > 1:
    (a, da), (b, db) = list(seen.items())[:2]
    raise DataError(f"{root}: mixes namings: {da.name} ({NAMINGS[a].years}, {a}) and {db.name} "
                    f"({NAMINGS[b].years}, {b}); keep one naming per folder.")
  return list(seen)


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
  naming, files = _case_naming(case_dir)
  if naming is None:
    raise DataError(f"{case_dir}: no modality files of any naming ({_naming_examples(case_dir)}).")
  if not re.match(naming.case_pattern, case_dir.name):
    raise DataError(f"{case_dir}: a {naming.years} case folder must be named like "
                    "BraTS-GLI-00000-000.")
  seg = files.pop(SEG, None)
  return CaseRef(case_id=case_dir.name, layout=naming.layout,
                 image_paths={m: str(p) for m, p in files.items()}, channel={},
                 label_path=str(seg) if seg is not None else None)


def _naming_examples(case_dir: Path) -> str:
  return " or ".join(f"{case_dir.name}{n.separator}{{{','.join(n.suffix(m) for m in MODALITIES)}}}"
                     ".nii.gz" for n in NAMINGS.values())


def _find_brats(root: Path, layout: str) -> List[CaseRef]:
  refs, seen = [], {}
  namings = folder_namings(root)
  if namings and namings[0] != layout:
    raise DataError(f"{root}: layout '{layout}' ({NAMINGS[layout].years} names) was asked for, "
                    f"but its cases use the {NAMINGS[namings[0]].years} names ('{namings[0]}').")
  for case_dir in _brats_case_dirs(root):
    if case_dir.name in seen:
      raise DataError(f"{case_dir}: case id also used by {seen[case_dir.name]}.")
    seen[case_dir.name] = case_dir
    refs.append(_brats_ref(case_dir))
  if not refs:
    raise DataError(f"{root}: no BraTS case folders (<case>/<case>_flair.nii.gz or "
                    "BraTS-GLI-00000-000/BraTS-GLI-00000-000-t2f.nii.gz) found.")
  return sorted(refs, key=lambda r: r.case_id)


def find_cases(folder, layout: str = "auto") -> List[CaseRef]:
  """All cases of an MSD or BraTS folder, sorted by case id; consistency errors raise."""
  root = _require_folder(folder)
  if layout == "auto":
    layout = detect_layout(root)
  if layout == "msd":
    return _find_msd(root)
  if layout in NAMINGS:
    return _find_brats(root, layout)
  raise ValueError(f"Unknown layout {layout!r}; choose 'auto' or one of {', '.join(LAYOUTS)}.")


def challenge(case_id: str) -> Optional[str]:
  """'GLI' for BraTS-GLI-00000-000 (a 2023+ case name), else None."""
  match = re.match(NAMINGS["brats2023"].case_pattern, case_id)
  return match.group("challenge").upper() if match else None


def layout_conventions(layout: str, case_id: Optional[str] = None) -> Tuple[str, ...]:
  """The label conventions files of a layout (and of a 2023+ case's challenge) may hold."""
  if layout == "msd":
    return MSD_CONVENTIONS
  if case_id is not None and challenge(case_id) in CHALLENGE_CONVENTIONS:
    return CHALLENGE_CONVENTIONS[challenge(case_id)][1]
  return NAMINGS[layout].conventions


def resolve_convention(requested: str, ref: CaseRef) -> str:
  """The label convention of a case's files: 'auto' -> the one its naming decides (DataError
  when it decides none); an explicit one is checked against the names (DataError naming the
  case when they contradict it, e.g. msd on 2023 files, which would swap NCR and ED)."""
  where = ref.label_path or next(iter(ref.image_paths.values()), ref.case_id)
  allowed = layout_conventions(ref.layout, ref.case_id)
  if requested == "auto":
    if ref.layout in LAYOUT_CONVENTION:
      return LAYOUT_CONVENTION[ref.layout]
    name = challenge(ref.case_id)
    convention = CHALLENGE_CONVENTIONS.get(name, (None,))[0]
    if convention is None:
      raise DataError(f"{where} (case {ref.case_id}): the names do not decide the label "
                      f"convention of BraTS-{name} files (its years give the values other "
                      f"meanings); set it: one of {', '.join(allowed)}.")
    return convention
  labels_lib.check_convention(requested)
  if requested not in allowed:
    raise DataError(f"{where} (case {ref.case_id}): label convention '{requested}' contradicts "
                    f"the {ref.layout} names of this case, whose files hold one of "
                    f"{', '.join(allowed)}; reading them as '{requested}' would misread the "
                    "classes.")
  return requested


def output_convention(ref: CaseRef, requested: str, label_set: str) -> str:
  """The convention a model's labels of this case are written in: 'auto' -> the one the case's
  names decide if it holds the model's label set, else the names' convention that does (a 2023
  input gets ET 3, a 2021 input ET 4, a GLI input of an RC model gli2024). DataError naming the
  case when none does, or when an explicit one lacks classes the model outputs."""
  where = next(iter(ref.image_paths.values()), ref.case_id)
  fits = lambda c: labels_lib.label_set(c).name == label_set
  if requested != "auto":
    labels_lib.check_convention(requested)
    if not fits(requested):
      raise DataError(f"{where} (case {ref.case_id}): the model outputs the {label_set!r} label "
                      f"set ({', '.join(labels_lib.label_set(label_set).classes[1:])}), which "
                      f"the '{requested}' convention does not hold; choose one of that set.")
    return requested
  try:
    own = resolve_convention("auto", ref)
  except DataError:
    own = None
  candidates = ([own] if own else []) + list(layout_conventions(ref.layout, ref.case_id))
  for convention in candidates:
    if fits(convention):
      return convention
  raise DataError(f"{where} (case {ref.case_id}): the model outputs the {label_set!r} label set "
                  f"({', '.join(labels_lib.label_set(label_set).classes[1:])}), which no "
                  f"convention of these names ({', '.join(candidates)}) holds.")


def folder_convention(refs: Sequence[CaseRef], requested: str) -> str:
  """The one label convention of a folder's cases; a folder mixing conventions raises."""
  found: Dict[str, str] = {}
  for ref in refs:
    found.setdefault(resolve_convention(requested, ref), ref.case_id)
  if len(found) > 1:
    (a, ca), (b, cb) = list(found.items())[:2]
    raise DataError(f"cases {ca} ('{a}') and {cb} ('{b}') use different label conventions; "
                    "keep one convention per folder.")
  return next(iter(found))


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
  modalities = tuple(canonical_modality(m) for m in modalities)
  missing = [m for m in modalities if m not in ref.image_paths]
  if missing:
    raise DataError(f"case {ref.case_id}: missing modality {', '.join(missing)} (has "
                    f"{', '.join(sorted(ref.image_paths)) or 'none'}).")
  if ref.layout == "msd":
    ref_img, image = _load_msd_image(ref, modalities)
  elif ref.layout in NAMINGS:
    ref_img, image = _load_brats_image(ref, modalities)
  else:
    raise ValueError(f"Unknown layout {ref.layout!r}.")

  label = None
  if ref.label_path is not None:
    convention = resolve_convention(label_convention, ref)
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
      raise DataError(f"{p}: no {_naming_examples(p)} files in this case folder.")
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
