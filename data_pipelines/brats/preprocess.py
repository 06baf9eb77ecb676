"""The paper's preprocessing (Section IV), pure numpy, one case at a time.

Axial slices 30..120 inclusive, a 190x190 in-plane crop (offsets kept so predictions can be
pasted back), z-score per modality per volume over brain (non-zero) voxels with background 0.

Axis convention: volumes are (X, Y, Z, M); an axial slice is volume[:, :, z], so a slice's
height is X and its width Y. Slices come out as (S, H, W, M).
"""

import dataclasses
from typing import Optional, Sequence, Tuple

import numpy as np

NORMALIZATIONS = ("zscore", "none")


@dataclasses.dataclass
class Slices:
  """The kept axial slices of one case, cropped and normalised."""
  image: np.ndarray  # (S, H, W, M) float32.
  label: Optional[np.ndarray]  # (S, H, W) uint8 canonical labels, or None.
  slice_indices: np.ndarray  # (S,) int: the axial index z of each slice in the volume.
  offsets: Tuple[int, int]  # (x0, y0): where the crop starts in the volume.


def crop_offsets(in_plane_shape: Sequence[int], crop_size: int,
                 center: Optional[Sequence[int]] = None) -> Tuple[int, int]:
  """(x0, y0) of a crop_size x crop_size window: centred, or around `center` kept inside."""
  size_x, size_y = int(in_plane_shape[0]), int(in_plane_shape[1])
  if crop_size <= 0:
    raise ValueError(f"crop_size must be positive, got {crop_size}.")
  if crop_size > size_x or crop_size > size_y:
    raise ValueError(f"crop_size {crop_size} is larger than the {size_x}x{size_y} slices.")
  if center is None:
    return (size_x - crop_size) // 2, (size_y - crop_size) // 2
  cx, cy = int(center[0]), int(center[1])
  # A centre near the border moves the window inward rather than padding it.
  x0 = min(max(cx - crop_size // 2, 0), size_x - crop_size)
  y0 = min(max(cy - crop_size // 2, 0), size_y - crop_size)
  return x0, y0


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
                    slice_start: Optional[int] = 30, slice_stop: Optional[int] = 120,
                    crop_size: int = 190, crop_center: Optional[Sequence[int]] = None,
                    normalize: str = "zscore") -> Slices:
  """Normalise (whole-brain statistics), keep slices start..stop inclusive, crop in-plane.

  slice_start/slice_stop of None mean the first/last slice of the volume.
  """
  _check_image(image)
  if normalize not in NORMALIZATIONS:
    raise ValueError(f"Unknown normalize {normalize!r}; choose one of {NORMALIZATIONS}.")
  if label is not None and label.shape != image.shape[:3]:
    raise ValueError(f"Label shape {label.shape} differs from image shape {image.shape[:3]}.")
  lo, hi = _slice_range(image.shape[2], slice_start, slice_stop)
  x0, y0 = crop_offsets(image.shape[:2], crop_size, crop_center)
  window = (slice(x0, x0 + crop_size), slice(y0, y0 + crop_size), slice(lo, hi + 1))

  # Statistics come from the whole brain; only the kept window is normalised (same result as
  # normalising the whole volume first, without a second full-size copy).
  sub = image[window]
  if normalize == "zscore":
    sub = apply_zscore(sub, *zscore_stats(image))
  out_image = np.ascontiguousarray(sub.transpose(2, 0, 1, 3), dtype=np.float32)
  out_label = None
  if label is not None:
    out_label = np.ascontiguousarray(label[window].transpose(2, 0, 1), dtype=np.uint8)
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
  """Inverse of the slice selection and crop: (S,H,W) -> (X,Y,Z) uint8, zeros elsewhere."""
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
  if x0 < 0 or y0 < 0 or x0 + height > size_x or y0 + width > size_y:
    raise ValueError(f"A {height}x{width} crop at {(x0, y0)} does not fit {size_x}x{size_y}.")
  out = np.zeros((size_x, size_y, depth), np.uint8)
  out[x0:x0 + height, y0:y0 + width, slice_indices] = slice_labels.transpose(1, 2, 0)
  return out
