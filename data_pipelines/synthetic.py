r"""Synthetic BraTS-like cases written as real NIfTI files in the MSD, BraTS 2018-2021 or BraTS
2023+ layout (any challenge prefix, label convention and geometry).

Skull-stripped head phantoms (an ellipsoidal brain, exactly 0 outside, with white matter, grey
matter and CSF) whose tissue contrast differs by modality, and 1-2 tumours whose sub-regions
carry the real signatures: ET bright on T1gd, NCR/NET dark on T1gd, edema bright on FLAIR and T2.
About one case in five has no ET. A smooth multiplicative bias field and Gaussian noise are
added; intensities are int16 with a 1 mm LPS affine as in BraTS. Every case depends only on
(seed, case index), so data sets are reproducible (voxel for voxel with the same numpy build)
and a bigger set extends a smaller one.

--metastases=N adds up to N small metastasis-like lesions per case (an enhancing sphere of 2-5 mm
radius, necrotic at its centre when large enough, in a thin edema shell), apart from each other
and from the tumours: multi-lesion cases for the lesion-wise scores (`msatt_jax.metrics`).

The 2023+ layout (`--layout brats2023`) writes BraTS-<CHALLENGE>-NNNNN-000 case folders
(`--challenge GLI|SSA|MEN|MET|PED`) in any convention of those names (`--labels brats2023`, 1 NCR,
2 ED, 3 ET; `gli2024`, which adds a resection cavity, label 4; `ped2024`, 1 ET, 2 NET, 3 CC,
4 ED, with a cyst in the core). A label set's fifth class (RC or CC) is fluid: dark on FLAIR, T1
and T1gd, bright on T2. `--geometry mni152` writes volumes in the MNI152 1 mm template's grid
and affine (182 x 218 x 182, RAS, unless --shape says otherwise) instead of BraTS's SRI24 LPS.

Usage:
  python -m data_pipelines.synthetic --out /tmp/syn --layout msd --cases 8 [--shape 240,240,155]
      [--metastases 4]
  python -m data_pipelines.synthetic --out /tmp/gli24 --layout brats2023 --labels gli2024 \
      --cases 8 [--challenge GLI --geometry mni152]
"""

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

from absl import flags
import nibabel as nib
import numpy as np

from data_pipelines import cli
from data_pipelines import files
from data_pipelines.brats import labels as labels_lib
from data_pipelines.brats import layouts
from data_pipelines.errors import DataError

DEFAULT_SHAPE = (240, 240, 155)
MIN_SIZE = 16  # Smallest edge that still holds a brain with a tumour.
MARKER = "synthetic.json"  # Written last: parameters of a complete data set in that folder.

# Tissue classes of the phantom (row indices of TISSUE_CONTRAST).
OUTSIDE, CSF, GREY, WHITE, NCR, EDEMA, ET, CAVITY = range(8)
# Canonical label of each tissue class (CAVITY: a 2024 label set's fifth class, RC or CC).
CLASS_TO_LABEL = np.array([0, 0, 0, 0, labels_lib.NCR_NET, labels_lib.EDEMA,
                           labels_lib.ENHANCING, labels_lib.EXTRA], np.uint8)
# Relative intensity per tissue class (rows) and modality (columns: flair, t1, t1ce, t2).
# Real signatures: CSF dark on FLAIR/T1, bright on T2; edema bright on FLAIR and T2; ET bright
# on T1gd only (contrast uptake); necrosis dark on T1/T1gd, bright on T2.
TISSUE_CONTRAST = np.array([
    [0.00, 0.00, 0.00, 0.00],  # outside the brain
    [0.25, 0.30, 0.32, 1.60],  # CSF
    [0.75, 0.72, 0.74, 0.75],  # grey matter
    [0.55, 1.00, 1.00, 0.50],  # white matter
    [0.85, 0.45, 0.35, 1.40],  # NCR/NET
    [1.50, 0.68, 0.70, 1.25],  # edema
    [1.10, 0.80, 1.65, 1.00],  # ET
    [0.20, 0.28, 0.30, 1.70],  # cavity / cyst: fluid
], np.float32)
# Scanner units of each modality (raw BraTS intensities are a few hundred to a few thousand).
MODALITY_SCALE = np.array([400.0, 500.0, 600.0, 700.0], np.float32)
NOISE_STD = 0.04  # Gaussian noise, relative to white matter.
BIAS_STRENGTH = 0.12  # Amplitude of the log bias field.
TEXTURE_STRENGTH = 0.05  # Smooth within-tissue intensity variation.
METASTASIS_RADIUS_MM = (2.0, 5.0)  # Enhancing radius of a small metastasis.
METASTASIS_EDEMA = 2.0  # Edema shell radius, as a multiple of the enhancing radius.
NO_ET_EVERY = 5  # Case i has no ET when i % NO_ET_EVERY == NO_ET_EVERY // 2 (20% of cases).

# The paper keeps axial slices 30..120 of 155 and a 190 crop of 240: tumours are placed inside.
Z_RANGE = (30 / 155, 120 / 155)
CROP_FRACTION = 190 / 240

GEOMETRIES = ("brats", "mni152")
# The MNI152 1 mm template grid (FSL's MNI152_T1_1mm): 182 x 218 x 182, RAS, origin at voxel
# (90, 126, 72).
MNI152_SHAPE = (182, 218, 182)
CHALLENGES = ("GLI", "SSA", "MEN", "MET", "PED")
# The conventions each layout is written in ('auto': the first; 2023+ names: per challenge,
# layouts.CHALLENGE_CONVENTIONS).
WRITTEN_CONVENTIONS = {"msd": ("msd",), "brats": ("brats",)}
# The cavity each 2024 convention's fifth class is: a resection cavity beside the tumour (RC) or
# a cyst inside its core (CC).
CAVITY_PLACEMENT = {"gli2024": "beside", "ped2024": "inside"}

MSD_LABEL_NAMES = {"0": "background", "1": "edema", "2": "non-enhancing tumor",
                   "3": "enhancing tumour"}


@dataclasses.dataclass
class SyntheticCase:
  """One phantom: raw int16 modalities, canonical labels and the affine."""
  images: Dict[str, np.ndarray]  # modality -> (X, Y, Z) int16.
  label: np.ndarray  # (X, Y, Z) uint8 canonical labels.
  affine: np.ndarray  # (4, 4).
  has_et: bool


def case_ids(layout: str, num_cases: int, challenge: str = "GLI") -> List[str]:
  """File names of the cases, numbered from 1 like the real data sets."""
  if layout == "msd":
    return [f"BRATS_{i + 1:03d}" for i in range(num_cases)]
  if layout == "brats2023":
    return [f"BraTS-{challenge}-{i + 1:05d}-000" for i in range(num_cases)]
  return [f"Brats18_SYN_{i + 1:04d}_1" for i in range(num_cases)]


def geometry_affine(geometry: str, shape: Sequence[int]) -> np.ndarray:
  """The affine of a geometry: BraTS's SRI24 LPS, or MNI152's RAS with the template's origin
  (scaled to the shape's centre when the shape is not the template's)."""
  if geometry == "brats":
    return lps_affine(shape)
  affine = np.diag([-1.0, 1.0, 1.0, 1.0])
  affine[:3, 3] = [90.0, -126.0, -72.0] if tuple(shape) == MNI152_SHAPE else \
      [(shape[0] - 1) / 2, -(shape[1] - 1) / 2, -(shape[2] - 1) / 2]
  return affine


def lps_affine(shape: Sequence[int]) -> np.ndarray:
  """1 mm voxels with BraTS's LPS orientation: diag(-1, -1, 1) and the y offset of SRI24."""
  affine = np.diag([-1.0, -1.0, 1.0, 1.0])
  affine[1, 3] = shape[1] - 1
  return affine


def _smooth_1d(rng: np.random.Generator, n: int, max_freq: float) -> np.ndarray:
  """A random smooth profile in [-1, 1] over n samples (a few low-frequency cosines)."""
  t = np.linspace(0.0, 1.0, n, dtype=np.float32)
  out = np.zeros(n, np.float32)
  for _ in range(3):
    freq = rng.uniform(0.3, max_freq)
    out += rng.uniform(0.5, 1.0) * np.cos(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
  return out / max(float(np.abs(out).max()), 1e-6)


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], rank: int = 3,
                  max_freq: float = 1.5) -> np.ndarray:
  """A smooth random 3D field in about [-1, 1]: a sum of `rank` separable products."""
  size_x, size_y, size_z = shape
  profiles = [[_smooth_1d(rng, n, max_freq) for n in shape] for _ in range(rank)]
  # sum_k gx_k(x) gy_k(y) gz_k(z) as one (X*Y, rank) @ (rank, Z) product: one pass over the volume.
  xy = np.stack([(gx[:, None] * gy[None, :]).ravel() for gx, gy, _ in profiles], axis=1)
  z = np.stack([gz for _, _, gz in profiles], axis=0) / rank
  return (xy @ z).reshape(size_x, size_y, size_z)


def _ellipsoid_radius(shape: Sequence[int], center: Sequence[float], radii: Sequence[float],
                      box: Tuple[slice, slice, slice]) -> np.ndarray:
  """Normalised ellipsoidal radius (1 on the surface) over a box of the volume."""
  axes = []
  for axis, sl in enumerate(box):
    coords = np.arange(sl.start, sl.stop, dtype=np.float32)
    axes.append(((coords - center[axis]) / radii[axis]) ** 2)
  return np.sqrt(axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :])


def _box(shape: Sequence[int], center: Sequence[float], radii: Sequence[float],
         margin: float = 1.3) -> Tuple[slice, slice, slice]:
  return tuple(slice(max(int(c - margin * r), 0), min(int(np.ceil(c + margin * r)) + 1, n))
               for c, r, n in zip(center, radii, shape))


def _brain(rng: np.random.Generator, shape: Sequence[int]) -> Tuple[np.ndarray, tuple, tuple]:
  """Tissue classes of a head phantom, with the brain's centre and semi-axes."""
  size_x, size_y, size_z = shape
  center = (size_x * rng.uniform(0.48, 0.52), size_y * rng.uniform(0.48, 0.52),
            size_z * rng.uniform(0.46, 0.50))
  # About 145 x 170 x 140 mm in a 240 x 240 x 155 volume, like a skull-stripped adult brain.
  radii = (size_x * rng.uniform(0.28, 0.31), size_y * rng.uniform(0.34, 0.37),
           size_z * rng.uniform(0.42, 0.45))
  full = tuple(slice(0, n) for n in shape)
  radius = _ellipsoid_radius(shape, center, radii, full)
  # Gyri-like wobble of the surface and of the grey/white boundary.
  radius *= 1.0 + 0.04 * _smooth_field(rng, shape, max_freq=3.0)
  tissue = np.full(shape, OUTSIDE, np.uint8)
  tissue[radius < 1.0] = GREY
  tissue[radius < 0.80 + 0.05 * _smooth_field(rng, shape, max_freq=2.5)] = WHITE
  tissue[(radius >= 0.96) & (radius < 1.0)] = CSF  # Subarachnoid CSF at the brain surface.
  del radius
  # Two lateral ventricles beside the midline.
  for side in (-1.0, 1.0):
    v_center = (center[0] + side * 0.13 * radii[0], center[1] - 0.05 * radii[1],
                center[2] + 0.1 * radii[2])
    v_radii = (0.09 * radii[0], 0.35 * radii[1], 0.22 * radii[2])
    box = _box(shape, v_center, v_radii)
    ventricle = _ellipsoid_radius(shape, v_center, v_radii, box) < 1.0
    tissue[box][ventricle] = CSF
  return tissue, center, radii


def _place_tumour(rng: np.random.Generator, shape: Sequence[int], brain_center, brain_radii,
                  radii: Sequence[float]) -> Tuple[float, float, float]:
  """A centre inside the brain, the paper's axial range and the central crop."""
  size_x, size_y, size_z = shape
  lo_xy = [(1 - CROP_FRACTION) / 2 * n for n in (size_x, size_y)]
  hi_xy = [(1 + CROP_FRACTION) / 2 * n for n in (size_x, size_y)]
  z_lo, z_hi = Z_RANGE[0] * size_z + 0.6 * radii[2], Z_RANGE[1] * size_z - 0.6 * radii[2]
  if z_lo > z_hi:
    z_lo = z_hi = 0.5 * (Z_RANGE[0] + Z_RANGE[1]) * size_z
  best = None
  for _ in range(100):
    c = (rng.uniform(lo_xy[0] + radii[0], hi_xy[0] - radii[0]),
         rng.uniform(lo_xy[1] + radii[1], hi_xy[1] - radii[1]),
         rng.uniform(z_lo, z_hi))
    # Keep the tumour centre well inside the brain so most of it is brain tissue.
    r = np.sqrt(sum(((ci - bi) / ri) ** 2 for ci, bi, ri in zip(c, brain_center, brain_radii)))
    if r < 0.55:
      return c
    if best is None or r < best[0]:
      best = (r, c)
  return best[1]


def _add_tumour(rng: np.random.Generator, tissue: np.ndarray, brain_center, brain_radii,
                with_et: bool, size_scale: float):
  """Paints one tumour (edema, core, optional ET rim around necrosis) into `tissue`."""
  shape = tissue.shape
  # Edema radius 12-28 mm in a 240-wide volume, at least a few voxels in small test volumes.
  base = rng.uniform(12.0, 28.0) * size_scale
  voxel_scale = (shape[0] / 240, shape[1] / 240, shape[2] / 155)
  radii = tuple(max(base * s * rng.uniform(0.8, 1.2), 5.0) for s in voxel_scale)
  center = _place_tumour(rng, shape, brain_center, brain_radii, radii)
  box = _box(shape, center, radii, margin=1.5)
  radius = _ellipsoid_radius(shape, center, radii, box)
  # Irregular outline: the radius is modulated by a smooth function of direction.
  coords = np.meshgrid(*[np.arange(sl.start, sl.stop, dtype=np.float32) - c
                         for sl, c in zip(box, center)], indexing="ij")
  norm = np.sqrt(sum(c * c for c in coords)) + 1e-6
  direction = [c / norm for c in coords]
  a, b = rng.normal(0, 0.15, 3), rng.normal(0, 0.12, (3, 3))
  wobble = sum(a[i] * direction[i] for i in range(3))
  wobble += sum(b[i, j] * direction[i] * direction[j] for i in range(3) for j in range(3))
  radius /= 1.0 + np.clip(wobble, -0.4, 0.4)
  core_fraction = rng.uniform(0.5, 0.75)
  # The core keeps at least ~2.5 voxels of radius so small volumes still hold every sub-region.
  core_fraction = max(core_fraction, 2.5 / min(radii))
  necrosis_fraction = core_fraction * rng.uniform(0.55, 0.8)
  inside_brain = tissue[box] != OUTSIDE
  region = tissue[box]
  # Edema never overwrites the core of an earlier tumour.
  region[(radius < 1.0) & inside_brain & (region < NCR)] = EDEMA
  if with_et:
    region[(radius < core_fraction) & inside_brain] = ET
    region[(radius < necrosis_fraction) & inside_brain] = NCR
  else:
    region[(radius < core_fraction) & inside_brain] = NCR  # Non-enhancing core only.
  return center, radii, core_fraction


def _add_cavity(tissue: np.ndarray, center, radii, core_fraction: float, placement: str) -> None:
  """A fluid cavity: a cyst inside the tumour core, or a resection cavity at the core's side
  (replacing part of the tumour, as surgery leaves residual tumour and edema around it)."""
  shape = tissue.shape
  scale = 0.5 * core_fraction
  if placement == "beside":
    center = (center[0] + core_fraction * radii[0], center[1], center[2])
    scale = 0.7 * core_fraction
  cavity_radii = tuple(max(scale * r, 2.0) for r in radii)
  box = _box(shape, center, cavity_radii)
  inside = (_ellipsoid_radius(shape, center, cavity_radii, box) < 1.0) & (tissue[box] != OUTSIDE)
  tissue[box][inside] = CAVITY


def _add_metastases(rng: np.random.Generator, tissue: np.ndarray, brain_center, brain_radii,
                    count: int) -> int:
  """Paints up to `count` small metastases into `tissue`, each clear of every lesion painted
  before it (so each is its own connected component); returns how many fitted."""
  shape = tissue.shape
  voxel_scale = (shape[0] / 240, shape[1] / 240, shape[2] / 155)
  placed = 0
  for _ in range(20 * count):  # Attempts: a crowded or tiny brain fits fewer.
    if placed == count:
      break
    radius_mm = rng.uniform(*METASTASIS_RADIUS_MM)
    radii = tuple(max(radius_mm * s, 1.0) for s in voxel_scale)
    shell = tuple(METASTASIS_EDEMA * r for r in radii)
    center = _place_tumour(rng, shape, brain_center, brain_radii, shell)
    box = _box(shape, center, shell, margin=1.0 + 2.0 / min(shell))  # Two voxels of clearance.
    if (tissue[box] >= NCR).any():
      continue
    radius = _ellipsoid_radius(shape, center, radii, box)
    region = tissue[box]
    inside_brain = region != OUTSIDE
    region[(radius < METASTASIS_EDEMA) & inside_brain] = EDEMA
    region[(radius < 1.0) & inside_brain] = ET
    if min(radii) >= 2.5:  # Large enough for a necrotic centre inside the enhancing rim.
      region[(radius < 0.45) & inside_brain] = NCR
    placed += 1
  return placed


def _intensities(rng: np.random.Generator, tissue: np.ndarray) -> Dict[str, np.ndarray]:
  """Raw int16 modalities from tissue classes: contrast x texture x bias + noise."""
  brain = tissue != OUTSIDE
  classes = tissue[brain]
  shape = tissue.shape
  texture = _smooth_field(rng, shape, max_freq=4.0)[brain]
  images = {}
  for m, name in enumerate(layouts.MODALITIES):
    scale = MODALITY_SCALE[m] * rng.uniform(0.8, 1.25)  # Scanner/sequence gain varies by case.
    bias = np.exp(BIAS_STRENGTH * _smooth_field(rng, shape, rank=2, max_freq=1.0)[brain])
    values = TISSUE_CONTRAST[classes, m] * (1.0 + TEXTURE_STRENGTH * texture) * bias
    values += rng.standard_normal(values.shape, dtype=np.float32) * NOISE_STD
    # Brain voxels stay non-zero: 0 means background to every consumer (z-score, cropping).
    values = np.clip(np.rint(values * scale), 1, np.iinfo(np.int16).max)
    volume = np.zeros(shape, np.int16)
    volume[brain] = values.astype(np.int16)
    images[name] = volume
  return images


def make_case(shape: Sequence[int] = DEFAULT_SHAPE, seed: int = 0, index: int = 0,
              metastases: int = 0, cavity: str = "none",
              geometry: str = "brats") -> SyntheticCase:
  """The phantom number `index` of the data set with this seed (independent of the others);
  metastases > 0 adds up to that many small metastases, cavity 'beside' / 'inside' a fluid
  cavity of class labels.EXTRA (RC / CC) to the first tumour (none of them: the same voxels as
  before)."""
  shape = tuple(int(s) for s in shape)
  rng = np.random.default_rng([seed, index])
  tissue, brain_center, brain_radii = _brain(rng, shape)
  has_et = index % NO_ET_EVERY != NO_ET_EVERY // 2
  num_tumours = 1 if rng.uniform() < 0.6 else 2
  for t in range(num_tumours):
    # A second tumour is smaller, like a satellite lesion.
    placed = _add_tumour(rng, tissue, brain_center, brain_radii, with_et=has_et,
                         size_scale=1.0 if t == 0 else 0.6)
    if t == 0 and cavity != "none":
      _add_cavity(tissue, *placed, cavity)
  if metastases > 0:
    _add_metastases(rng, tissue, brain_center, brain_radii, int(metastases))
  images = _intensities(rng, tissue)
  label = CLASS_TO_LABEL[tissue]
  return SyntheticCase(images=images, label=label, affine=geometry_affine(geometry, shape),
                       has_et=bool((label == labels_lib.ENHANCING).any()))


def _nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
  img = nib.Nifti1Image(data, affine)
  img.header.set_xyzt_units("mm", "sec")
  img.header.set_qform(affine, code=1)
  img.header.set_sform(affine, code=1)
  return img


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def _folder_renamed_into_place(tmp: Path, final: Path) -> Iterator[Path]:
  """Yields the new folder `tmp`, renamed over `final` once the block completes, else removed:
  a reader never sees a partly written folder under the final name."""
  try:
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes folders private; the data set is not.
    yield tmp
    if final.exists():
      shutil.rmtree(final)
    os.replace(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _msd_dataset_json(ids: Sequence[str]) -> dict:
  return {
      "name": "BRATS",
      "description": "Synthetic BraTS-like phantoms in the Decathlon Task01 layout",
      "reference": "generated by data_pipelines.synthetic",
      "licence": "CC-BY-SA 4.0",
      "tensorImageSize": "4D",
      "modality": layouts.MSD_DATASET_MODALITIES,
      "labels": MSD_LABEL_NAMES,
      "numTraining": len(ids),
      "numTest": 0,
      "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                   for c in ids],
      "test": [],
  }


def _write_msd_case(out: Path, case_id: str, case: SyntheticCase) -> None:
  image = np.stack([case.images[m] for m in layouts.MSD_DEFAULT_ORDER], axis=-1)
  label = labels_lib.from_canonical(case.label, "msd")
  for folder, volume in (("labelsTr", label), ("imagesTr", image)):
    with files.atomic_output(out / folder / f"{case_id}.nii.gz") as tmp:
      nib.save(_nifti(volume, case.affine), tmp)


def _write_brats_case(out: Path, case_id: str, case: SyntheticCase) -> None:
  # Cases without ET go to LGG, like most lower-grade gliomas; the case folder appears only
  # when complete (renamed from a hidden temporary folder).
  group = out / ("HGG" if case.has_et else "LGG")
  group.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{case_id}.", dir=group))
  with _folder_renamed_into_place(tmp, group / case_id):
    seg = labels_lib.from_canonical(case.label, "brats")
    nib.save(_nifti(seg, case.affine), str(tmp / f"{case_id}_seg.nii.gz"))
    for name in layouts.MODALITIES:
      nib.save(_nifti(case.images[name], case.affine), str(tmp / f"{case_id}_{name}.nii.gz"))


def _write_brats2023_case(out: Path, case_id: str, case: SyntheticCase, convention: str) -> None:
  # No grouping folders in the 2023+ releases; the case folder appears only when complete.
  tmp = Path(tempfile.mkdtemp(prefix=f".{case_id}.", dir=out))
  naming = layouts.NAMINGS["brats2023"]
  with _folder_renamed_into_place(tmp, out / case_id):
    seg = labels_lib.from_canonical(case.label, convention)
    nib.save(_nifti(seg, case.affine), str(tmp / f"{case_id}-{layouts.SEG}.nii.gz"))
    for name in layouts.MODALITIES:
      nib.save(_nifti(case.images[name], case.affine),
               str(tmp / f"{case_id}-{naming.suffix(name)}.nii.gz"))


def _resolve_labels(layout: str, labels: str, challenge: str) -> str:
  """The convention files are written in: 'auto' is the layout's own (2023+: brats2023)."""
  if challenge not in CHALLENGES:
    raise ValueError(f"Unknown challenge {challenge!r}; choose one of {', '.join(CHALLENGES)}.")
  allowed = (layouts.CHALLENGE_CONVENTIONS[challenge][1] if layout == "brats2023"
             else WRITTEN_CONVENTIONS[layout])
  if labels == "auto":
    return allowed[0]
  if labels not in allowed:
    raise ValueError(f"The {layout} layout is not written with {labels!r} labels; choose one of "
                     f"{', '.join(allowed)}.")
  return labels


def _check_args(layout: str, num_cases: int, shape: Sequence[int]) -> Tuple[int, ...]:
  if layout not in layouts.LAYOUTS:
    raise ValueError(f"Unknown layout {layout!r}; choose one of {', '.join(layouts.LAYOUTS)}.")
  if int(num_cases) < 1:
    raise ValueError(f"The number of cases must be at least 1, got {num_cases}.")
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3 or min(shape) < MIN_SIZE:
    raise ValueError(f"Shape must be three sizes of at least {MIN_SIZE}, got {shape}.")
  return shape


def generate_dataset(out_dir, layout: str, num_cases: int,
                     shape: Sequence[int] = DEFAULT_SHAPE, seed: int = 0,
                     metastases: int = 0, labels: str = "auto", challenge: str = "GLI",
                     geometry: str = "brats") -> List[str]:
  """Writes num_cases phantoms in the given layout under out_dir; returns the case ids.

  labels: the convention written ('auto': the layout's own); challenge: the 2023+ case-name
  prefix; geometry: 'brats' (SRI24 LPS affine) or 'mni152' (the template's RAS affine).

  out_dir must be new or empty, or hold a complete data set of the same parameters (then it
  is reused as it is). Cases are written one at a time, each file atomically.
  """
  shape = _check_args(layout, num_cases, shape)
  out = Path(out_dir)
  params = {"layout": layout, "num_cases": int(num_cases), "shape": list(shape),
            "seed": int(seed)}
  if int(metastases) < 0:
    raise ValueError(f"--metastases must be 0 or more, got {metastases}.")
  if metastases:  # Only then: earlier data sets' markers stay valid.
    params["metastases"] = int(metastases)
  convention = _resolve_labels(layout, labels, challenge)
  if geometry not in GEOMETRIES:
    raise ValueError(f"Unknown geometry {geometry!r}; choose one of {', '.join(GEOMETRIES)}.")
  # Only when not the defaults, for the same reason.
  if labels != "auto":
    params["labels"] = convention
  if layout == "brats2023":
    params["challenge"] = challenge
  if geometry != "brats":
    params["geometry"] = geometry
  ids = case_ids(layout, int(num_cases), challenge)
  if out.exists() and not out.is_dir():
    raise DataError(f"{out}: exists and is not a folder.")
  if out.is_dir() and any(out.iterdir()):
    marker = out / MARKER
    if marker.is_file():
      try:
        previous = json.loads(marker.read_text())
      except (OSError, json.JSONDecodeError):
        previous = None
      if previous == dict(params, case_ids=ids):
        return ids
    raise DataError(f"{out}: folder is not empty (and holds no synthetic data set of these "
                    "parameters); choose a new folder.")
  out.mkdir(parents=True, exist_ok=True)
  if layout == "msd":
    (out / "imagesTr").mkdir(exist_ok=True)
    (out / "labelsTr").mkdir(exist_ok=True)
    # dataset.json first: until every listed file exists, readers report the missing ones.
    files.atomic_write_text(out / "dataset.json", json.dumps(_msd_dataset_json(ids), indent=2))
  for index, case_id in enumerate(ids):
    case = make_case(shape, seed, index, metastases, CAVITY_PLACEMENT.get(convention, "none"),
                     geometry)
    if layout == "msd":
      _write_msd_case(out, case_id, case)
    elif layout == "brats2023":
      _write_brats2023_case(out, case_id, case, convention)
    else:
      _write_brats_case(out, case_id, case)
    del case
  files.atomic_write_text(out / MARKER, json.dumps(dict(params, case_ids=ids), indent=2))
  return ids


def generate_dataset_atomically(out_dir, layout: str, num_cases: int,
                                shape: Sequence[int] = DEFAULT_SHAPE, seed: int = 0,
                                **options) -> List[str]:
  """generate_dataset, with a new out_dir appearing only once the whole data set is written.

  It is written into `<out_dir>.incomplete` and renamed at the end, so a killed run leaves no
  partial data set under out_dir (the next call removes that leftover). An existing out_dir is
  generate_dataset's to reuse or refuse.
  """
  out = Path(out_dir)
  if out.exists():
    return generate_dataset(out, layout, num_cases, shape, seed, **options)
  shape = _check_args(layout, num_cases, shape)
  tmp = out.with_name(out.name + ".incomplete")
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)
  with _folder_renamed_into_place(tmp, out):
    return generate_dataset(tmp, layout, num_cases, shape, seed, **options)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined only when run as a command, so importing this module adds no global flags."""
  flags.DEFINE_string("out", None, "Output folder (new or empty).")
  flags.DEFINE_enum("layout", "msd", list(layouts.LAYOUTS), "File layout to write: msd, brats "
                    "(2018-2021 names) or brats2023 (2023+ names).")
  flags.DEFINE_integer("cases", None, "Number of cases.")
  flags.DEFINE_string("shape", None, "Volume shape X,Y,Z (default 240,240,155; with "
                      "--geometry mni152, 182,218,182).")
  flags.DEFINE_enum("labels", "auto", ["auto", *labels_lib.CONVENTIONS], "Label convention "
                    "written: auto (the layout's own), or for brats2023 names gli2024 / ped2024.")
  flags.DEFINE_enum("challenge", "GLI", list(CHALLENGES), "2023+ case-name prefix.")
  flags.DEFINE_enum("geometry", "brats", list(GEOMETRIES), "brats: SRI24 LPS affine; mni152: "
                    "the MNI152 1 mm template's RAS affine.")
  flags.DEFINE_integer("seed", 0, "Seed; the same seed gives the same voxels.")
  flags.DEFINE_integer("metastases", 0, "Up to this many small metastasis-like lesions per "
                       "case besides the tumours (multi-lesion cases); 0: none.")


def parse_shape(text: str) -> Tuple[int, int, int]:
  """'240,240,155' -> (240, 240, 155)."""
  try:
    shape = tuple(int(s) for s in text.split(","))
  except ValueError:
    raise ValueError(f"--shape must be X,Y,Z integers, got {text!r}.") from None
  if len(shape) != 3:
    raise ValueError(f"--shape must be X,Y,Z integers, got {text!r}.")
  return shape


def main(argv: Sequence[str]) -> None:
  del argv  # The command line is all flags (run_command refuses other arguments).
  for name in ("out", "cases"):
    if FLAGS[name].value is None:
      raise ValueError(f"--{name} is required.")
  default = MNI152_SHAPE if FLAGS.geometry == "mni152" else DEFAULT_SHAPE
  shape = parse_shape(FLAGS.shape) if FLAGS.shape else default
  ids = generate_dataset(FLAGS.out, FLAGS.layout, FLAGS.cases, shape, FLAGS.seed,
                         FLAGS.metastases, FLAGS.labels, FLAGS.challenge, FLAGS.geometry)
  print(f"Wrote {len(ids)} synthetic cases ({FLAGS.layout} layout) to {FLAGS.out}")


def run() -> None:
  """Console-script entry point (msatt-synthetic)."""
  cli.run_command(main, define_flags)


if __name__ == "__main__":
  run()
