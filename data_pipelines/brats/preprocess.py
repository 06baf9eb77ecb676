"""The paper's preprocessing (Section IV), pure numpy, one case at a time, and `Preprocessing`,
the one list of the parameters of a prepared data set (what is kept and how it is stored).

Axial slices 30..120 inclusive, a 190x190 in-plane crop (offsets kept so predictions can be
pasted back), z-score per modality per volume over brain (non-zero) voxels with background 0.
Other geometries (MNI152's 182x218x182, any shape a challenge ships): a crop larger than the
volume pads it with zeros (a negative offset), `crop_around='brain'` centres the crop on the
brain's bounding box, and `slice_range='brain'` keeps the axial slices where the brain is.

Axis convention: volumes are (X, Y, Z, M); an axial slice is volume[:, :, z], so a slice's
height is X and its width Y. Slices come out as (S, H, W, M).
"""

import dataclasses
import typing
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from data_pipelines.brats import labels as labels_lib
from data_pipelines.brats import layouts

NORMALIZATIONS = ("zscore", "none")
CROP_AROUND = ("volume", "brain")
SLICE_RANGES = ("fixed", "brain")
LABEL_CONVENTIONS = ("auto",) + tuple(labels_lib.CONVENTIONS)
STORAGE_DTYPES = ("float16", "float32")
COMPRESSIONS = ("none", "zlib")


# ---------------------------------------------------------------------------------------------
# The parameters of a prepared data set.


def _param(default: Any, help_text: str, choices: Sequence[str] = (),
           named_at_default: bool = True) -> Any:
  """A field of Preprocessing: its default, its one line of help and its allowed values.

  named_at_default=False: a parameter added after data had been prepared; at its default it is
  left out of the content hash, so data prepared before it existed keep their folder names.
  """
  return dataclasses.field(default=default,
                           metadata={"help": help_text, "choices": tuple(choices),
                                     "named_at_default": named_at_default})


@dataclasses.dataclass(eq=False)
class Preprocessing:
  """What a prepared data set holds: the one list of the preprocessing parameters.

  Each parameter's default (the paper's) is written here only. The keys of config.data
  (data_pipelines/config.py), the flags of `python -m data_pipelines.prepare` with their help,
  the builder's config and the content hash naming a prepared data set's folder all follow from
  these fields, so a new parameter is one new field, its use, and its help line in
  get_data_config's comment (a test keeps that comment and the help the same). Values are
  converted and checked here too.
  """
  label_convention: str = _param(
      "auto", "Label values on disk: 'auto' (the one the file names decide), or brats, msd, "
      "brats2023, gli2024 (adds RC), ped2024 (labels.py).",
      LABEL_CONVENTIONS)
  modalities: Tuple[str, ...] = _param(
      layouts.MODALITIES, "Image channels: any subset and order of flair, t1, t1ce, t2 (or their "
      "2023 names t2f, t1n, t1c, t2w).")
  slice_start: int = _param(30, "First axial slice kept (inclusive).")
  slice_stop: int = _param(120, "Last axial slice kept (inclusive).")
  crop_size: int = _param(190, "Square in-plane crop of the 240x240 slices; larger than a "
                          "volume, it pads it with zeros.")
  crop_center: Optional[Tuple[int, int]] = _param(
      None, "(x, y) centre of the crop; unset: the centre of the volume (or of the brain).")
  normalize: str = _param(
      "zscore", "'zscore': per modality per volume over brain (non-zero) voxels, 0 stays 0; "
      "or 'none'.", NORMALIZATIONS)
  crop_around: str = _param(
      "volume", "Unset crop_center: centre the crop on the 'volume' (the paper) or on the "
      "'brain' (its in-plane bounding box, for volumes not centred like BraTS's).", CROP_AROUND,
      named_at_default=False)
  slice_range: str = _param(
      "fixed", "Axial slices kept: 'fixed', slice_start..slice_stop (the paper's 30..120), or "
      "'brain', every slice holding brain (any depth, e.g. MNI152's 182).", SLICE_RANGES,
      named_at_default=False)
  split_seed: int = _param(0, "Seed of the patient-level train/validation/test split.")
  num_validation_cases: int = _param(
      -1, "-1: 30 of 285 (the paper), proportional to the case count; ignored with num_folds.")
  num_test_cases: int = _param(-1, "-1: 30 of 285 (the paper), proportional to the case count.")
  num_folds: int = _param(
      0, "0: the fixed train/validation split (the paper's); K >= 2: K seeded patient-level "
      "folds of the non-test cases (num_validation_cases is then ignored), the test split the "
      "same in every fold.", named_at_default=False)
  fold: int = _param(
      0, "With num_folds K: the fold whose share is the validation split, 0..K-1; train is the "
      "other folds' cases.", named_at_default=False)
  storage_dtype: str = _param(
      "float16", "Stored images: 'float16' holds z-scores to ~3 significant digits at half "
      "the bytes of 'float32'.", STORAGE_DTYPES)
  compression: str = _param(
      "none", "'none': fastest to read (7.5 GB for 285 cases at float16); 'zlib': ~1/3 of "
      "that on disk for synthetic data, but ~0.5 ms of CPU per slice to inflate.", COMPRESSIONS)

  def __post_init__(self):
    """Converts config or flag values (strings, lists) to the fields' types and checks them."""
    for field in parameters():
      value = getattr(self, field.name)
      if field.type is int:
        try:
          value = int(value)
        except (TypeError, ValueError):
          raise ValueError(f"{field.name} must be an integer, got {value!r}.") from None
      choices = field.metadata["choices"]
      if choices and value not in choices:
        raise ValueError(f"Unknown {field.name} {value!r}; choose one of "
                         f"{', '.join(choices)}.")
      setattr(self, field.name, value)
    names = tuple(str(m) for m in self.modalities)
    unknown = [m for m in names if m.lower() not in layouts.MSD_MODALITY_NAMES]
    self.modalities = tuple(layouts.MSD_MODALITY_NAMES.get(m.lower(), m) for m in names)
    if not self.modalities or unknown or len(set(self.modalities)) != len(self.modalities):
      raise ValueError(f"modalities must be distinct names from "
                       f"{', '.join(layouts.MODALITIES)}; got {list(self.modalities)}.")
    if self.crop_size <= 0:
      raise ValueError(f"crop_size must be positive, got {self.crop_size}.")
    if self.slice_start > self.slice_stop:
      raise ValueError(f"slice_start {self.slice_start} is after slice_stop {self.slice_stop}.")
    check_folds(self.num_folds, self.fold)
    if self.crop_center is not None:
      try:
        center = tuple(int(c) for c in self.crop_center)
      except (TypeError, ValueError):
        center = ()
      if len(center) != 2:
        raise ValueError(f"crop_center must be two integers (x, y), got {self.crop_center}.")
      self.crop_center = center


def check_folds(num_folds: int, fold: int) -> None:
  """num_folds 0 (the fixed split) or >= 2, and fold one of them (0 without folds)."""
  if num_folds < 0 or num_folds == 1:
    raise ValueError(f"num_folds must be 0 (the fixed split) or at least 2, got {num_folds}.")
  if num_folds == 0 and fold != 0:
    raise ValueError(f"fold={fold} needs num_folds >= 2 (num_folds is 0: the fixed split).")
  if num_folds and not 0 <= fold < num_folds:
    raise ValueError(f"fold must be one of 0..{num_folds - 1} with num_folds={num_folds}, "
                     f"got {fold}.")


def parameters() -> Tuple[dataclasses.Field, ...]:
  """The fields of Preprocessing, in their order."""
  return dataclasses.fields(Preprocessing)


def defaults() -> Dict[str, Any]:
  """Each parameter's default, in the fields' order."""
  return {field.name: field.default for field in parameters()}


def value_type(field: dataclasses.Field) -> type:
  """The plain type of a parameter's values (int, str or tuple), for flags and config keys."""
  kind = field.type
  if typing.get_origin(kind) is typing.Union:  # Optional[X]: None is the "unset" default.
    kind = next(a for a in typing.get_args(kind) if a is not type(None))
  return typing.get_origin(kind) or kind


@dataclasses.dataclass
class Slices:
  """The kept axial slices of one case, cropped and normalised."""
  image: np.ndarray  # (S, H, W, M) float32.
  label: Optional[np.ndarray]  # (S, H, W) uint8 canonical labels, or None.
  slice_indices: np.ndarray  # (S,) int: the axial index z of each slice in the volume.
  offsets: Tuple[int, int]  # (x0, y0): where the crop starts in the volume.


def crop_offsets(in_plane_shape: Sequence[int], crop_size: int,
                 center: Optional[Sequence[int]] = None) -> Tuple[int, int]:
  """(x0, y0) of a crop_size x crop_size window: centred, or around `center` kept inside.

  Along an axis shorter than crop_size the window is centred on the volume and starts before
  it (a negative offset): the volume is padded with zeros there.
  """
  if crop_size <= 0:
    raise ValueError(f"crop_size must be positive, got {crop_size}.")
  offsets = []
  for axis, size in enumerate(int(n) for n in in_plane_shape[:2]):
    if center is None or crop_size >= size:
      offsets.append((size - crop_size) // 2)
    else:
      # A centre near the border moves the window inward rather than padding it.
      offsets.append(min(max(int(center[axis]) - crop_size // 2, 0), size - crop_size))
  return offsets[0], offsets[1]


def brain_center(image: np.ndarray) -> Tuple[int, int]:
  """(x, y) centre of the in-plane bounding box of the non-zero voxels of (X, Y, Z[, M])."""
  axes = (2,) if image.ndim == 3 else (2, 3)
  plane = np.any(image != 0, axis=axes)
  xs, ys = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
  if xs.size == 0:
    raise ValueError("The volume has no non-zero voxels (no brain).")
  return (int(xs[0]) + int(xs[-1]) + 1) // 2, (int(ys[0]) + int(ys[-1]) + 1) // 2


def window_overlap(offset: int, size: int, extent: int) -> Tuple[slice, slice]:
  """(slice of the volume, slice of the window) where a window at `offset` meets the volume."""
  lo, hi = max(offset, 0), min(offset + size, extent)
  return slice(lo, hi), slice(lo - offset, hi - offset)


def _window(volume: np.ndarray, x0: int, y0: int, size: int, z: slice) -> np.ndarray:
  """volume[x0:x0+size, y0:y0+size, z], zeros where the window leaves the volume."""
  (vx, wx), (vy, wy) = window_overlap(x0, size, volume.shape[0]), window_overlap(y0, size, volume.shape[1])
  depth = len(range(*z.indices(volume.shape[2])))
  out = np.zeros((size, size, depth) + volume.shape[3:], volume.dtype)
  out[wx, wy] = volume[vx, vy, z]
  return out


def _check_image(image: np.ndarray) -> None:
  if image.ndim != 4:
    raise ValueError(f"Expected an (X, Y, Z, M) volume, got shape {image.shape}.")


def zscore_stats(image: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Per-modality mean and std over brain (non-zero) voxels; (1.0 std when undefined)."""
  _check_image(image)
  num = image.shape[-1]
  means, stds = np.zeros(num, np.float64), np.ones(num, np.float64)
  for m in range(num):
    brain = image[..., m][image[..., m] != 0]
    if brain.size:
      means[m] = brain.mean(dtype=np.float64)
      std = brain.std(dtype=np.float64)
      # A constant modality would divide by zero; centring it alone is enough.
      stds[m] = std if std > 0 else 1.0
  return means, stds


def apply_zscore(image: np.ndarray, means: np.ndarray, stds: np.ndarray) -> np.ndarray:
  """(v - mean) / std per modality on non-zero voxels; zero voxels stay exactly 0."""
  out = np.zeros(image.shape, np.float32)
  for m in range(image.shape[-1]):
    channel = image[..., m]
    brain = channel != 0
    out[..., m][brain] = ((channel[brain] - means[m]) / stds[m]).astype(np.float32)
  return out


def zscore(image: np.ndarray) -> np.ndarray:
  """Per modality per volume z-score over brain (non-zero) voxels; background stays 0."""
  return apply_zscore(image, *zscore_stats(image))


def _slice_range(depth: int, slice_start: Optional[int],
                 slice_stop: Optional[int]) -> Tuple[int, int]:
  start = 0 if slice_start is None else int(slice_start)
  stop = depth - 1 if slice_stop is None else int(slice_stop)
  if start > stop:
    raise ValueError(f"slice_start {start} is after slice_stop {stop}.")
  # Clipped to the volume; a range that misses it entirely is an error, not an empty case.
  lo, hi = max(start, 0), min(stop, depth - 1)
  if lo > hi:
    raise ValueError(f"Axial slices {start}..{stop} lie outside the volume's 0..{depth - 1}.")
  return lo, hi


def preprocess_case(image: np.ndarray, label: Optional[np.ndarray] = None, *,
                    slice_start: Optional[int] = Preprocessing.slice_start,
                    slice_stop: Optional[int] = Preprocessing.slice_stop,
                    crop_size: int = Preprocessing.crop_size,
                    crop_center: Optional[Sequence[int]] = Preprocessing.crop_center,
                    normalize: str = Preprocessing.normalize,
                    crop_around: str = Preprocessing.crop_around,
                    slice_range: str = Preprocessing.slice_range) -> Slices:
  """Normalise (whole-brain statistics), keep slices start..stop inclusive, crop in-plane.

  slice_start/slice_stop of None mean the first/last slice of the volume; slice_range='brain'
  keeps the slices holding brain instead, crop_around='brain' centres an unset crop_center on
  the brain's bounding box.
  """
  _check_image(image)
  if normalize not in NORMALIZATIONS:
    raise ValueError(f"Unknown normalize {normalize!r}; choose one of {NORMALIZATIONS}.")
  if label is not None and label.shape != image.shape[:3]:
    raise ValueError(f"Label shape {label.shape} differs from image shape {image.shape[:3]}.")
  if crop_around not in CROP_AROUND or slice_range not in SLICE_RANGES:
    raise ValueError(f"crop_around must be one of {CROP_AROUND} and slice_range one of "
                     f"{SLICE_RANGES}; got {crop_around!r}, {slice_range!r}.")
  lo, hi = (brain_slice_range(image) if slice_range == "brain"
            else _slice_range(image.shape[2], slice_start, slice_stop))
  if crop_center is None and crop_around == "brain":
    crop_center = brain_center(image)
  x0, y0 = crop_offsets(image.shape[:2], crop_size, crop_center)
  z = slice(lo, hi + 1)

  # Statistics come from the whole brain; only the kept window is normalised (same result as
  # normalising the whole volume first, without a second full-size copy; padding stays 0).
  sub = _window(image, x0, y0, crop_size, z)
  if normalize == "zscore":
    sub = apply_zscore(sub, *zscore_stats(image))
  out_image = np.ascontiguousarray(sub.transpose(2, 0, 1, 3), dtype=np.float32)
  out_label = None
  if label is not None:
    out_label = np.ascontiguousarray(_window(label, x0, y0, crop_size, z).transpose(2, 0, 1),
                                     dtype=np.uint8)
  return Slices(image=out_image, label=out_label, slice_indices=np.arange(lo, hi + 1),
                offsets=(x0, y0))


def brain_slice_range(image: np.ndarray) -> Tuple[int, int]:
  """Inclusive (start, stop) of the axial slices holding any non-zero voxel; (X,Y,Z[,M])."""
  if image.ndim not in (3, 4):
    raise ValueError(f"Expected an (X, Y, Z[, M]) volume, got shape {image.shape}.")
  axes = (0, 1) if image.ndim == 3 else (0, 1, 3)
  nonzero = np.flatnonzero(np.any(image != 0, axis=axes))
  if nonzero.size == 0:
    raise ValueError("The volume has no non-zero voxels (no brain).")
  return int(nonzero[0]), int(nonzero[-1])


def paste_back(slice_labels: np.ndarray, slice_indices: Sequence[int],
               offsets: Tuple[int, int], volume_shape: Sequence[int]) -> np.ndarray:
  """Inverse of the slice selection and crop: (S,H,W) -> (X,Y,Z) uint8, zeros elsewhere (a
  window padded beyond the volume gives back only its part inside)."""
  slice_labels = np.asarray(slice_labels)
  slice_indices = np.asarray(slice_indices, dtype=np.int64)
  if slice_labels.ndim != 3:
    raise ValueError(f"Expected (S, H, W) slice labels, got shape {slice_labels.shape}.")
  num, height, width = slice_labels.shape
  size_x, size_y, depth = (int(s) for s in volume_shape)
  x0, y0 = int(offsets[0]), int(offsets[1])
  if slice_indices.shape != (num,):
    raise ValueError(f"{num} slices but {slice_indices.size} slice indices.")
  if num and (slice_indices.min() < 0 or slice_indices.max() >= depth):
    raise ValueError(f"Slice indices outside the volume's 0..{depth - 1}.")
  (vx, wx), (vy, wy) = window_overlap(x0, height, size_x), window_overlap(y0, width, size_y)
  if vx.start >= vx.stop or vy.start >= vy.stop:
    raise ValueError(f"A {height}x{width} crop at {(x0, y0)} misses the {size_x}x{size_y} "
                     "volume.")
  out = np.zeros((size_x, size_y, depth), np.uint8)
  out[vx, vy, slice_indices] = slice_labels.transpose(1, 2, 0)[wx, wy]
  return out
