"""Segmentation metrics with the BraTS 2018 conventions (numpy/scipy, host side).

Regions: ET, TC and WT, built from canonical labels by `data_pipelines.brats.labels`.

Dice (`dice`, `dice_from_counts`): 2|P∩R| / (|P| + |R|). Both masks empty -> 1.0 (BraTS scores
a correctly empty prediction of an absent region, typically ET, as perfect, where the formula
would divide by zero); exactly one empty -> 0.0 (the formula's own value).

HD95 (`hd95`), in millimetres using the voxel spacing:
  * Surfaces are the mask's voxels minus its erosion by the 6-connected cross (voxels with a
    face neighbour outside the mask; the volume's own border counts as outside).
  * d(P->R) are the Euclidean distances from every surface voxel centre of P to the nearest
    surface voxel centre of R (`scipy.ndimage.distance_transform_edt` with
    `sampling=spacing`), d(R->P) likewise.
  * mode="official" (the default): the 95th percentile of d(P->R) and d(R->P) pooled together,
    with numpy's default linear interpolation. This is what the BraTS organisers' scorer
    (CaPTk) reports: its Hausdorff95 tool calls MedPy's `hd95`, which is this definition, so
    our numbers compare with published BraTS results. (That tool passes no spacing, i.e. voxel
    units, which are mm on the 1 mm isotropic BraTS data; we always use the spacing.)
  * mode="max": max(percentile95(d(P->R)), percentile95(d(R->P))), the classic Hausdorff
    distance (max of the two directed suprema) with each supremum made robust, as in
    DeepMind's surface-distance library. It does not let the larger surface dilute the other:
    a prediction that adds a far false-positive line making up 9% of its surface gets 10 mm
    here but 0 mm pooled (in the tests). Pooled is usually the lower of the two; it exceeds
    "max" only through the percentile's interpolation (also in the tests).
  * mode="surface": DeepMind's robust Hausdorff (`surface_distance.compute_robust_hausdorff`
    of `compute_surface_distances`, https://github.com/deepmind/surface-distance), the HD95 of
    the BraTS 2023+ lesion-wise scores. Surface elements live on the dual grid: every 2x2x2
    block of voxels that is neither all inside nor all outside the mask, weighted by the area
    of the marching-cubes surface through it (the library's per-block area table, scaled by
    the spacing, which we read from the library rather than copy). Each direction's robust
    distance is the smallest distance d with at least 95% of that surface's area within d
    (no interpolation); the score is the larger of the two directions.
  Both empty -> 0.0; exactly one empty -> HD95_EMPTY, the diagonal of the 240x240x155 BraTS
  volume (373.13), whatever the spacing, as in BraTS.
  Speed: the distance transform runs only on the bounding box of both masks plus a margin,
  which gives exactly the full-volume result (every surface voxel lies inside the box, and the
  margin keeps the erosion's border the same).

Sensitivity TP / (TP + FN) and specificity TN / (TN + FP) (`sensitivity`, `specificity`), over
the whole volume as BraTS computes them (so specificity is close to 1, background dominating).
A rate whose denominator is zero is 1.0 when the prediction agrees with the reference everywhere
and 0.0 otherwise: both masks empty -> both 1.0 (CaPTk's rule); empty reference with a non-empty
prediction -> sensitivity 0.0 (CaPTk; MedPy returns 0.0 for any empty reference) and the
specificity from the formula; empty prediction with a non-empty reference -> sensitivity 0.0
and specificity 1.0, both from the formula. A reference with no background (unreachable for
brain volumes) mirrors the rule for the specificity.

Slice Dice (`slice_dice`): the paper trains and reports on axial slices 30..120. We read that as
a 3D Dice on the volume restricted to the axial slices slice_start..slice_stop inclusive (last
array axis, 91 slices by default), with the same empty rules; not a mean of per-slice Dice,
which would be dominated by slices where a region is absent.

The CSV/JSON writers shared with the trainer's evaluator are in `msatt_jax.reporting`.
"""

import dataclasses
import functools
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage
from surface_distance import lookup_tables as surface_tables

from data_pipelines.brats import labels

# The 240x240x155 BraTS volume diagonal in voxels: HD95 when exactly one mask is empty.
HD95_EMPTY = math.sqrt(240.0**2 + 240.0**2 + 155.0**2)
HD95_PERCENTILE = 95.0
# hd95's modes, each with the one-line definition evaluators print and record with the scores.
HD95_DEFINITIONS = {
    "official": "95th percentile of both directions' surface-voxel distances (mm) pooled "
                "(BraTS/CaPTk, MedPy's hd95); both empty -> 0, one empty -> 373.13",
    "max": "max of the two directed 95th percentiles of surface-voxel distances (mm); "
           "both empty -> 0, one empty -> 373.13",
    "surface": "max of the two directed 95th percentiles of surface-element distances (mm) "
               "weighted by surface-element area (DeepMind surface_distance's robust "
               "Hausdorff, as BraTS 2023+ lesion-wise scoring); both empty -> 0, one empty -> "
               "373.13",
}
HD95_MODES = tuple(HD95_DEFINITIONS)
# Voxels of context kept around the masks' joint bounding box (>= 1 keeps the erosion exact).
_CROP_MARGIN = 2

ArrayLike = Union[np.ndarray, int, float]


def dice_from_counts(intersection: ArrayLike, pred_sum: ArrayLike,
                     ref_sum: ArrayLike) -> Union[float, np.ndarray]:
  """Dice from voxel counts with the BraTS empty rules; scalars -> float, arrays -> array.

  Shared by the trainer's validation (accumulated per-region counts) and the evaluators.
  """
  inter = np.asarray(intersection, np.float64)
  p = np.asarray(pred_sum, np.float64)
  r = np.asarray(ref_sum, np.float64)
  if np.any(inter < 0) or np.any(p < 0) or np.any(r < 0):
    raise ValueError("Dice counts must be non-negative.")
  if np.any(inter > np.minimum(p, r)):
    raise ValueError("Dice intersection cannot exceed either mask's size.")
  total = p + r
  # Both empty -> 1; otherwise the formula (0 when exactly one is empty).
  safe = np.where(total > 0, total, 1.0)
  result = np.where(total > 0, 2.0 * inter / safe, 1.0)
  return float(result) if result.ndim == 0 else result


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
  """Dice of two boolean masks of the same shape (BraTS empty rules)."""
  pred, ref = _check_masks(pred, ref)
  return dice_from_counts(np.count_nonzero(pred & ref), np.count_nonzero(pred),
                          np.count_nonzero(ref))


def _check_masks(pred: np.ndarray, ref: np.ndarray):
  pred = np.asarray(pred, bool)
  ref = np.asarray(ref, bool)
  if pred.shape != ref.shape:
    raise ValueError(f"Mask shapes differ: prediction {pred.shape}, reference {ref.shape}.")
  return pred, ref


def _check_spacing(spacing: Sequence[float], ndim: int) -> np.ndarray:
  spacing = np.asarray(spacing, np.float64).reshape(-1)
  if spacing.size != ndim:
    raise ValueError(f"Spacing {tuple(spacing)} does not match a {ndim}-D volume.")
  if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
    raise ValueError(f"Voxel spacing must be positive and finite, got {tuple(spacing)}.")
  return spacing


def _surface(mask: np.ndarray) -> np.ndarray:
  """Mask voxels with a face neighbour outside the mask (or on the array border)."""
  structure = ndimage.generate_binary_structure(mask.ndim, 1)
  return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _crop_to_union(pred: np.ndarray, ref: np.ndarray):
  """Crops both masks to their joint bounding box plus _CROP_MARGIN (clipped to the volume)."""
  coords = np.nonzero(pred | ref)
  box = tuple(
      slice(max(int(c.min()) - _CROP_MARGIN, 0), min(int(c.max()) + _CROP_MARGIN + 1, n))
      for c, n in zip(coords, pred.shape))
  return pred[box], ref[box]


def _surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: np.ndarray):
  """(d(pred->ref), d(ref->pred)) in mm for two non-empty masks, on their joint crop."""
  pred, ref = _crop_to_union(pred, ref)
  pred_surface, ref_surface = _surface(pred), _surface(ref)
  # The EDT of ~surface is each voxel's distance to the nearest surface voxel (its zeros).
  to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)[pred_surface]
  to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[ref_surface]
  return to_ref, to_pred


def directed_surface_distances(from_mask: np.ndarray, to_mask: np.ndarray,
                               spacing: Sequence[float]) -> np.ndarray:
  """Distances (mm) from each surface voxel of `from_mask` to the surface of `to_mask`.

  Both masks must be non-empty. Exposed for tests and other surface metrics.
  """
  from_mask, to_mask = _check_masks(from_mask, to_mask)
  spacing = _check_spacing(spacing, from_mask.ndim)
  if not from_mask.any() or not to_mask.any():
    raise ValueError("Surface distances need two non-empty masks.")
  return _surface_distances(from_mask, to_mask, spacing)[0]


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
         mode: str = "official") -> float:
  """95th-percentile Hausdorff distance in mm; `mode` is one of HD95_MODES.

  "official": percentile of both directions pooled (BraTS); "max": the larger directed
  percentile. Both empty -> 0.0; exactly one empty -> HD95_EMPTY. See the module docstring.
  """
  _check_hd95_mode(mode)
  pred, ref = _check_masks(pred, ref)
  spacing = _check_spacing(spacing, pred.ndim)
  has_pred, has_ref = bool(pred.any()), bool(ref.any())
  if not has_pred and not has_ref:
    return 0.0
  if has_pred != has_ref:
    return HD95_EMPTY
  if mode == "surface":
    return robust_hausdorff(pred, ref, spacing, HD95_PERCENTILE)
  to_ref, to_pred = _surface_distances(pred, ref, spacing)
  if mode == "official":
    return float(np.percentile(np.concatenate([to_ref, to_pred]), HD95_PERCENTILE))
  return float(max(np.percentile(to_ref, HD95_PERCENTILE),
                   np.percentile(to_pred, HD95_PERCENTILE)))


@functools.lru_cache(maxsize=16)
def _surfel_area_table(spacing: Tuple[float, ...]) -> np.ndarray:
  """Area (mm^2) of the surface through a 2x2x2 block, by the block's 8-bit corner code."""
  return surface_tables.create_table_neighbour_code_to_surface_area(spacing)


def _surfels(mask: np.ndarray, spacing: Tuple[float, ...]):
  """(surface-element positions as a boolean map, their areas) of a zero-padded 3-D mask."""
  # Each position's code is its 2x2x2 block of corners (the library's bit order).
  codes = ndimage.correlate(mask.astype(np.uint8), surface_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL,
                            mode="constant", cval=0)
  border = (codes != 0) & (codes != 255)
  return border, _surfel_area_table(spacing)[codes[border]]


def _area_percentile(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
  """The first distance, in (distance, area) order, at which the cumulated area reaches
  `percent` of the total; as surface_distance computes it (same order, same float sums)."""
  order = np.lexsort((areas, distances))
  distances, areas = distances[order], areas[order]
  cumulated = np.cumsum(areas) / np.sum(areas)
  index = int(np.searchsorted(cumulated, percent / 100.0))
  return float(distances[min(index, len(distances) - 1)])


def surface_element_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]):
  """((d(pred->ref), pred areas), (d(ref->pred), ref areas)) of two non-empty 3-D masks.

  surface_distance's surface elements (the module docstring); the masks are cropped to their
  joint bounding box padded by one empty voxel, which gives the full volume's numbers.
  """
  pred, ref = _check_masks(pred, ref)
  spacing = tuple(float(s) for s in _check_spacing(spacing, pred.ndim))
  if pred.ndim != 3 or not pred.any() or not ref.any():
    raise ValueError("Surface-element distances need two non-empty 3-D masks.")
  coords = np.nonzero(pred | ref)
  box = tuple(slice(int(c.min()), int(c.max()) + 1) for c in coords)
  pred, ref = np.pad(pred[box], 1), np.pad(ref[box], 1)
  pred_border, pred_areas = _surfels(pred, spacing)
  ref_border, ref_areas = _surfels(ref, spacing)
  to_ref = ndimage.distance_transform_edt(~ref_border, sampling=spacing)[pred_border]
  to_pred = ndimage.distance_transform_edt(~pred_border, sampling=spacing)[ref_border]
  return (to_ref, pred_areas), (to_pred, ref_areas)


def robust_hausdorff(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                     percent: float = HD95_PERCENTILE) -> float:
  """surface_distance's robust Hausdorff (mm) of two non-empty 3-D masks: the larger of the
  two directions' area-weighted `percent` percentiles."""
  (to_ref, pred_areas), (to_pred, ref_areas) = surface_element_distances(pred, ref, spacing)
  return max(_area_percentile(to_pred, ref_areas, percent),
             _area_percentile(to_ref, pred_areas, percent))


def _check_hd95_mode(mode: str) -> None:
  if mode not in HD95_MODES:
    raise ValueError(f"Unknown HD95 mode {mode!r}; expected one of {HD95_MODES}.")


def _rate(hits: int, total: int, agrees: bool) -> float:
  """hits / total; a zero total gives 1.0 if the prediction agrees everywhere, else 0.0."""
  return float(hits / total) if total else float(agrees)


def sensitivity(pred: np.ndarray, ref: np.ndarray) -> float:
  """TP / (TP + FN), the fraction of the reference found; empty rules in the module docstring."""
  pred, ref = _check_masks(pred, ref)
  return _rate(np.count_nonzero(pred & ref), np.count_nonzero(ref), not pred.any())


def specificity(pred: np.ndarray, ref: np.ndarray) -> float:
  """TN / (TN + FP), the fraction of the background kept; rules in the module docstring."""
  pred, ref = _check_masks(pred, ref)
  return _rate(np.count_nonzero(~pred & ~ref), ref.size - np.count_nonzero(ref), pred.all())


def region_scores(pred_labels: np.ndarray, ref_labels: np.ndarray,
                  spacing: Sequence[float] = (1.0, 1.0, 1.0),
                  hd95_mode: str = "official",
                  label_set: str = labels.DEFAULT_LABEL_SET) -> Dict[str, float]:
  """Dice, HD95 (`hd95_mode`), sensitivity and specificity of the label set's regions.

  From two canonical label volumes. Keys '<metric>_<region>' for the metrics dice, hd95,
  sensitivity and specificity (in that order) and the regions (ET, TC, WT, then any others of
  the label set, e.g. RC).
  """
  _check_hd95_mode(hd95_mode)
  pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
  if pred_labels.shape != ref_labels.shape:
    raise ValueError(f"Label volume shapes differ: prediction {pred_labels.shape}, "
                     f"reference {ref_labels.shape}.")
  pred_regions = labels.region_masks(pred_labels, label_set)
  ref_regions = labels.region_masks(ref_labels, label_set)
  metric_fns = {"dice": dice,
                "hd95": lambda p, r: hd95(p, r, spacing, hd95_mode),
                "sensitivity": sensitivity,
                "specificity": specificity}
  return {f"{name}_{region}": fn(pred_regions[..., i], ref_regions[..., i])
          for name, fn in metric_fns.items()
          for i, region in enumerate(labels.label_set(label_set).region_names)}


def slice_dice(pred_labels: np.ndarray, ref_labels: np.ndarray, slice_start: int = 30,
               slice_stop: int = 120,
               label_set: str = labels.DEFAULT_LABEL_SET) -> Dict[str, float]:
  """Per-region Dice on axial slices slice_start..slice_stop inclusive (last axis).

  A slice_stop past the volume is clipped to its last slice; a slice_start outside the volume
  or after slice_stop is an error. Returns {'slice_dice_ET', 'slice_dice_TC', 'slice_dice_WT'}.
  """
  pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
  if pred_labels.shape != ref_labels.shape:
    raise ValueError(f"Label volume shapes differ: prediction {pred_labels.shape}, "
                     f"reference {ref_labels.shape}.")
  depth = pred_labels.shape[-1]
  if not 0 <= slice_start < depth:
    raise ValueError(f"slice_start={slice_start} is outside the volume's {depth} axial slices.")
  if slice_stop < slice_start:
    raise ValueError(f"slice_stop={slice_stop} is before slice_start={slice_start}.")
  stop = min(slice_stop, depth - 1) + 1
  pred_regions = labels.region_masks(pred_labels[..., slice_start:stop], label_set)
  ref_regions = labels.region_masks(ref_labels[..., slice_start:stop], label_set)
  return {f"slice_dice_{region}": dice(pred_regions[..., i], ref_regions[..., i])
          for i, region in enumerate(labels.label_set(label_set).region_names)}


def summarize(rows: List[Mapping[str, object]]) -> Dict[str, Dict[str, float]]:
  """Mean, std (population), median, min, max and count of every numeric metric over cases.

  Non-numeric fields (e.g. 'case') are skipped; a metric missing from some rows is summarized
  over the rows that have it.
  """
  columns: Dict[str, List[float]] = {}
  for row in rows:
    for key, value in row.items():
      if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        continue
      columns.setdefault(key, []).append(float(value))
  summary = {}
  for key, values in columns.items():
    v = np.asarray(values)
    summary[key] = {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "median": float(np.median(v)),
        "min": float(v.min()),
        "max": float(v.max()),
        "n": int(v.size),
    }
  return summary


# ---------------------------------------------------------------------------------------------
# Lesion-wise scores (BraTS 2023+).
#
# For each region of a rule set, as the BraTS organisers' metrics code defines them (2023:
# https://github.com/rachitsaluja/BraTS-2023-Metrics, metrics.py; 2024: the rows' sources
# below; read, not copied). d and v are the region's dilation and volume threshold
# (`LesionRules.params`):
#   1. Reference lesions: the reference mask is dilated by d iterations of the 18-connected
#      structuring element, and each voxel takes the id of the 26-connected component of the
#      dilated mask that it lies in (components near each other are one lesion; the lesions
#      themselves stay undilated). Ids follow each dilated component's first voxel in C order,
#      as cc3d numbers the source's dilated masks (scipy's binary_dilation returns them C-ordered).
#   2. Predicted lesions (`matching`, MATCHING_MODES): the prediction's 26-connected components
#      ('dilated_overlap', 2023), or those merged as in 1 with the lesions of at most v voxels
#      dropped ('dilated_groups', 2024; the source compares the voxel count with the mm^3
#      threshold, the same on BraTS's 1 mm grid).
#   3. Lesions merged across other tissues (`merge_touching`, 2024; reference and prediction
#      alike): for each partner region in turn, each lesion that touches (is 18-adjacent to)
#      partner lesions, made by 1 or 2 with the partner's own d and v and never merged
#      themselves, is keyed by the lowest-numbered one of them, and lesions of one key become one.
#      This is what the source's relabelling does (relabel_nifti_image maps each lesion through
#      its first sorted (lesion, partner) pair), so it is not transitive: lesions A and B that
#      share partner lesion P stay apart when A also touches a partner lesion numbered below P.
#      Its `len(touching_labels) > 1` condition skips the relabelling when a single pair
#      touches, which merges nothing either way, and its `for i in range(2)` loop rebuilds the
#      same files from the unmerged ones, so merging happens once.
#   4. Every predicted lesion that overlaps a reference lesion dilated by d is matched to it
#      (a predicted lesion may match several). The lesion's Dice and HD95 (`hd95` of the rule
#      set, surface_distance's robust HD95 for the published ones) are those of the union of
#      its matches against the lesion; a lesion with no match scores Dice 0 and `penalty_hd95`.
#   5. A predicted lesion matched to no reference lesion (of any size) is a false positive:
#      Dice 0, `penalty_hd95`.
#   6. Reference lesions of at most v mm^3 leave both the sum and the count (their matches are
#      not false positives).
#   7. Score = (sum over the counted lesions and the false positives) / (their number); 0/0
#      (nothing in either) -> Dice 1, HD95 0.

MATCHING_MODES = {
    "dilated_overlap": "each predicted component overlapping a reference lesion dilated by d "
                       "matches it (several components per lesion, several lesions per "
                       "component)",
    "dilated_groups": "predicted components merged by d dilations as the reference's, merged "
                      "lesions of at most the volume threshold in voxels dropped, then matched "
                      "as in dilated_overlap",
}
_STRUCTURE_18 = ndimage.generate_binary_structure(3, 2)
_STRUCTURE_26 = ndimage.generate_binary_structure(3, 3)


@dataclasses.dataclass(frozen=True)
class LesionRules:
  """One challenge's lesion-wise scoring parameters (a row of LESION_RULES)."""
  name: str  # --lesion_rules value.
  challenge: str  # Case-name prefix: BraTS-<challenge>-NNNNN-NNN.
  year: int
  regions: Tuple[str, ...]  # Scored: regions, or single classes, of the label set.
  dilation: int  # Iterations of the 18-connected structuring element.
  min_volume_mm3: float  # Reference lesions of at most this volume are not scored.
  penalty_hd95: float  # HD95 of a missed lesion or a false positive.
  matching: str = "dilated_overlap"  # A key of MATCHING_MODES.
  hd95: str = "surface"  # A key of HD95_DEFINITIONS.
  source: str = ""
  # (region, dilation, min_volume_mm3) for the regions whose d and v differ from the above.
  per_region: Tuple[Tuple[str, int, float], ...] = ()
  # (region, partner regions in turn): step 3 above; a partner need not be scored.
  merge_touching: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()

  def params(self, region: str) -> Tuple[int, float]:
    """(dilation, min_volume_mm3) of a region."""
    own = {r: (d, v) for r, d, v in self.per_region}
    return own.get(region, (self.dilation, self.min_volume_mm3))

  def partners(self, region: str) -> Tuple[str, ...]:
    return dict(self.merge_touching).get(region, ())

  def names(self) -> Tuple[str, ...]:
    """Every region the rules read: the scored ones, then merge partners."""
    out = list(self.regions)
    for _, partners in self.merge_touching:
      out.extend(p for p in partners if p not in out)
    return tuple(out)

  def describe(self) -> str:
    own = "".join(f"; {r}: {d} dilation(s), <= {v:g} mm^3" for r, d, v in self.per_region)
    merges = "".join(f"; {r} lesions merged across touching {'/'.join(p)} lesions"
                     for r, p in self.merge_touching)
    return (f"{self.name}: BraTS {self.year} {self.challenge} lesion-wise rules, regions "
            f"{'/'.join(self.regions)}, reference lesions merged by {self.dilation} dilation(s) "
            f"(18-connected), lesions <= {self.min_volume_mm3:g} mm^3 not scored{own}{merges}, "
            f"missed lesions and false positives Dice 0 / HD95 {self.penalty_hd95:g}, matching "
            f"'{self.matching}', HD95 '{self.hd95}' [{self.source}]")


_SOURCE_2023 = ("BraTS 2023 organisers' lesion-wise metrics code, "
                "https://github.com/rachitsaluja/BraTS-2023-Metrics (metrics.py: dilation "
                "factor and volume threshold per challenge, HD95 374 for misses and false "
                "positives, surface_distance's robust HD95)")


def _source_2024(script: str) -> str:
  return ("BraTS 2024 organisers' lesion-wise metrics code, "
          f"https://github.com/rachitsaluja/BraTS-2024-Metrics {script} at commit 9a0ab9c7, the "
          "version the 2024 scoring harness pinned (https://github.com/Sage-Bionetworks-"
          "Challenges/brats-infra, evaluation/lesionwise/score.py)")


# 2024 (each challenge's script, its labels read through the project's conventions):
#   GLI (metrics_GLI.py; convention gli2024: 1 NETC, 2 SNFH, 3 ET, 4 RC): WT (1-3), TC (1, 3),
#     NETC, SNFH, ET and RC; d 5 for NETC and RC and 3 for the others, SNFH included (the code
#     tests for the name "SFNH", which never occurs); v 10 mm^3 for ET, 20 for the others; HD95
#     337; NETC, ET, RC and SNFH lesions merged across ET then RC, NETC then RC, ET then NETC,
#     and ET, RC then NETC lesions (combine_lesions_*). NETC and SNFH are glioma_rc classes
#     scored as lesion regions; they are not voxel-wise regions, which would add channels to
#     that set's region-output models.
#   SSA and MET (metrics_SSA.py, metrics_MET.py; 2023 values): WT, TC, ET; d 3 / 1, v 50 / 2,
#     HD95 374; ET lesions merged across NETC (class 1, NCR/NET) lesions.
#   PED (metrics_PED.py; convention ped2024: 1 ET, 2 NETC (the ped set's NET), 3 CC, 4 ED):
#     WT (1-4), TC (1-3), ET, NET, CC and ED; d 5, v 10, HD95 374; no merging across tissues.
#   All four use 'dilated_groups'. Not here: MEN-RT (metrics_MEN_RT.py: one GTV label, false
#   positives not counted, HD95 of a miss = the volume's diagonal; the project has no GTV label
#   set), and no MEN row: the 2024 harness scored no MEN task (its later BraTS-MEN case runs the
#   2023 code, men2023).
# 2025 is not here: the harness's 2025 scoring ran BraTS-2024-Metrics at 9e8879a9 (the 2024
# parameters plus normalised surface Dice; MET adds RC) and, for MET, panoptica through GaNDLF
# with a configuration the harness does not hold; which of them ranked the test phase is not
# recorded there.
LESION_RULES: Dict[str, LesionRules] = {r.name: r for r in (
    LesionRules("gli2023", "GLI", 2023, ("WT", "TC", "ET"), 3, 50.0, 374.0, source=_SOURCE_2023),
    LesionRules("ssa2023", "SSA", 2023, ("WT", "TC", "ET"), 3, 50.0, 374.0, source=_SOURCE_2023),
    LesionRules("ped2023", "PED", 2023, ("WT", "TC", "ET"), 3, 50.0, 374.0, source=_SOURCE_2023),
    LesionRules("men2023", "MEN", 2023, ("WT", "TC", "ET"), 1, 50.0, 374.0, source=_SOURCE_2023),
    LesionRules("met2023", "MET", 2023, ("WT", "TC", "ET"), 1, 2.0, 374.0, source=_SOURCE_2023),
    LesionRules("gli2024", "GLI", 2024, ("WT", "TC", "NETC", "SNFH", "ET", "RC"), 3, 20.0, 337.0,
                matching="dilated_groups", source=_source_2024("metrics_GLI.py"),
                per_region=(("NETC", 5, 20.0), ("RC", 5, 20.0), ("ET", 3, 10.0)),
                merge_touching=(("NETC", ("ET", "RC")), ("ET", ("NETC", "RC")),
                                ("RC", ("ET", "NETC")), ("SNFH", ("ET", "RC", "NETC")))),
    LesionRules("ssa2024", "SSA", 2024, ("WT", "TC", "ET"), 3, 50.0, 374.0,
                matching="dilated_groups", source=_source_2024("metrics_SSA.py"),
                merge_touching=(("ET", ("NCR/NET",)),)),
    LesionRules("met2024", "MET", 2024, ("WT", "TC", "ET"), 1, 2.0, 374.0,
                matching="dilated_groups", source=_source_2024("metrics_MET.py"),
                merge_touching=(("ET", ("NCR/NET",)),)),
    LesionRules("ped2024", "PED", 2024, ("WT", "TC", "ET", "NET", "CC", "ED"), 5, 10.0, 374.0,
                matching="dilated_groups", source=_source_2024("metrics_PED.py")),
)}
LESION_STATUSES = ("matched", "missed", "false_positive")
# The year of the rule sets --lesion_rules=auto gives files of a label set: the 2024 sets hold
# only 2024 files; all others are scored as 2023 (MET and SSA files of 2024 hold the 2023
# values, so nothing tells their year: name met2024 or ssa2024 for them).
LESION_AUTO_YEARS = {"glioma_rc": 2024, "ped": 2024}


def lesion_rules(name: str) -> LesionRules:
  """The rule set called `name`; ValueError naming the choices otherwise."""
  if name not in LESION_RULES:
    raise ValueError(f"unknown lesion rule set {name!r}; choose one of "
                     f"{', '.join(LESION_RULES)}.")
  return LESION_RULES[name]


def rules_for_challenge(challenge: str, year: int = 2023) -> Optional[LesionRules]:
  """The rule set of a challenge ('GLI', 'MET', ...) and year, or None."""
  for rules in LESION_RULES.values():
    if rules.challenge == challenge and rules.year == year:
      return rules
  return None


def auto_lesion_rules(challenge: str,
                      label_set: str = labels.DEFAULT_LABEL_SET) -> Optional[LesionRules]:
  """--lesion_rules=auto: the rule set of a challenge for files of a label set, or None."""
  year = LESION_AUTO_YEARS.get(labels.label_set(label_set).name, 2023)
  return rules_for_challenge(challenge, year)


def check_lesion_rules(rules: LesionRules, label_set: str = labels.DEFAULT_LABEL_SET) -> None:
  """ValueError when the rule set needs a region the label set lacks, or is malformed."""
  chosen = labels.label_set(label_set)
  lacks = lambda names: [r for r in names if chosen.classes_of(r) is None]
  missing = lacks(rules.regions)
  partners = lacks(rules.names()[len(rules.regions):])
  if missing or partners:
    needs = ", ".join(([f"scores region(s) {', '.join(missing)}"] if missing else []) +
                      ([f"merges across region(s) {', '.join(partners)}"] if partners else []))
    raise ValueError(f"lesion rule set {rules.name!r} {needs}, which the label set lacks (it "
                     f"has {', '.join(chosen.region_names)} and the classes "
                     f"{', '.join(chosen.classes[1:])}).")
  if rules.matching not in MATCHING_MODES:
    raise ValueError(f"lesion rule set {rules.name!r}: unknown matching {rules.matching!r}.")
  _check_hd95_mode(rules.hd95)


@dataclasses.dataclass(frozen=True)
class Lesion:
  """One scored reference lesion or false-positive component of one region."""
  region: str
  lesion_id: int  # Merged reference lesion id, or the predicted lesion's id.
  volume_mm3: float
  status: str  # One of LESION_STATUSES.
  counted: bool  # False for a reference lesion at or under the volume threshold.
  dice: float
  hd95: float


def _components(mask: np.ndarray) -> Tuple[np.ndarray, int]:
  return ndimage.label(mask, _STRUCTURE_26)


def _dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
  if iterations <= 0:
    return mask
  return ndimage.binary_dilation(mask, _STRUCTURE_18, iterations=iterations)


def _box(coords: Sequence[np.ndarray], shape: Sequence[int], margin: int) -> Tuple[slice, ...]:
  return tuple(slice(max(int(c.min()) - margin, 0), min(int(c.max()) + margin + 1, n))
               for c, n in zip(coords, shape))


def _around(box: Tuple[slice, ...], shape: Sequence[int], margin: int) -> Tuple[slice, ...]:
  return _box([np.array([s.start, s.stop - 1]) for s in box], shape, margin)


def _consecutive(ids: np.ndarray) -> np.ndarray:
  """Ids renumbered 1..n in their order (0 stays background)."""
  present = np.flatnonzero(np.bincount(ids.ravel()))
  present = present[present > 0]
  table = np.zeros(int(ids.max()) + 1, np.int64)
  table[present] = np.arange(1, present.size + 1)
  return table[ids]


def _lesion_ids(mask: np.ndarray, dilation: int) -> np.ndarray:
  """Step 1 of the comment above LESION_RULES: each voxel's merged lesion id."""
  ids, _ = _components(_dilate(mask, dilation))
  return np.where(mask, ids, 0)


def _grouped_ids(mask: np.ndarray, dilation: int, min_volume: float) -> np.ndarray:
  """Step 2, 'dilated_groups': merged as the reference, lesions of <= min_volume voxels gone."""
  ids = _lesion_ids(mask, dilation)
  return _consecutive(np.where(np.bincount(ids.ravel())[ids] <= min_volume, 0, ids))


# Step 2 per matching mode: (mask, d, v) -> predicted lesion ids.
_PREDICTED_LESIONS = {
    "dilated_overlap": lambda mask, dilation, min_volume: _lesion_ids(mask, 0),
    "dilated_groups": _grouped_ids,
}


def _merge_touching(ids: np.ndarray, partner_ids: np.ndarray) -> np.ndarray:
  """Step 3 for one partner: lesions keyed by the lowest-numbered partner lesion they touch,
  those of one key merged, ids renumbered in order."""
  table = np.arange(int(ids.max()) + 1)
  first_of_key: Dict[int, int] = {}
  for lesion, box in enumerate(ndimage.find_objects(ids), start=1):
    around = _around(box, ids.shape, 1)
    touched = partner_ids[around][_dilate(ids[around] == lesion, 1)]
    touched = touched[touched > 0]
    if touched.size:
      table[lesion] = first_of_key.setdefault(int(touched.min()), lesion)
  return _consecutive(table[ids])


def _lesion_maps(pred_masks: np.ndarray, ref_masks: np.ndarray, rules: LesionRules
                 ) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """{scored region: (predicted, reference) lesion ids after steps 1-3} from the (..., names)
  masks of rules.names(), on their joint box plus the largest dilation + 1: exact, since no
  dilation reaches the box's sides (the volume's own border clips as the full volume does)."""
  names = rules.names()
  found = np.nonzero(pred_masks.any(-1) | ref_masks.any(-1))
  if not found[0].size:
    empty = np.zeros((1, 1, 1), np.int64)
    return {region: (empty, empty) for region in rules.regions}
  box = _box(found, pred_masks.shape[:-1], max(rules.params(n)[0] for n in names) + 1)
  pred_masks, ref_masks = pred_masks[box], ref_masks[box]
  base = {}
  for i, name in enumerate(names):
    dilation, min_volume = rules.params(name)
    base[name] = (_PREDICTED_LESIONS[rules.matching](pred_masks[..., i], dilation, min_volume),
                  _lesion_ids(ref_masks[..., i], dilation))
  out = {}
  for region in rules.regions:
    pred_ids, ref_ids = base[region]
    for partner in rules.partners(region):
      pred_ids = _merge_touching(pred_ids, base[partner][0])
      ref_ids = _merge_touching(ref_ids, base[partner][1])
    out[region] = (pred_ids, ref_ids)
  return out


def _region_lesions(pred_ids: np.ndarray, ref_ids: np.ndarray, spacing: Tuple[float, ...],
                    rules: LesionRules, region: str, with_hd95: bool) -> List[Lesion]:
  """Steps 4-6 for one region's lesion ids (consecutive, 0 background)."""
  if not pred_ids.any() and not ref_ids.any():
    return []
  dilation, min_volume = rules.params(region)
  voxel_mm3 = float(np.prod(spacing))
  pred_boxes = ndimage.find_objects(pred_ids)
  matched = set()
  out = []
  for lesion_id, lesion_box in enumerate(ndimage.find_objects(ref_ids), start=1):
    around = _around(lesion_box, ref_ids.shape, dilation)
    lesion = ref_ids[around] == lesion_id
    matches = np.unique(pred_ids[around][_dilate(lesion, dilation)])
    matches = matches[matches > 0]
    matched.update(matches.tolist())
    volume = float(np.count_nonzero(lesion)) * voxel_mm3
    counted = volume > min_volume
    if not matches.size:
      out.append(Lesion(region, lesion_id, volume, "missed", counted, 0.0, rules.penalty_hd95))
      continue
    # The lesion and its matches, on their joint box.
    joint = tuple(slice(min([s.start] + [pred_boxes[m - 1][i].start for m in matches]),
                        max([s.stop] + [pred_boxes[m - 1][i].stop for m in matches]))
                  for i, s in enumerate(lesion_box))
    lesion_mask = ref_ids[joint] == lesion_id
    union = np.isin(pred_ids[joint], matches)
    distance = hd95(union, lesion_mask, spacing, rules.hd95) if with_hd95 else float("nan")
    out.append(Lesion(region, lesion_id, volume, "matched", counted, dice(union, lesion_mask),
                      distance))
  sizes = np.bincount(pred_ids.ravel())
  for component in range(1, len(sizes)):
    if component not in matched:
      out.append(Lesion(region, component, float(sizes[component]) * voxel_mm3,
                        "false_positive", True, 0.0, rules.penalty_hd95))
  return out


def _lesion_summary(lesions: Sequence[Lesion]) -> Dict[str, float]:
  counted = [x for x in lesions if x.counted]
  count = lambda status: sum(1 for x in counted if x.status == status)
  if not counted:  # Nothing in either, or only lesions under the threshold: 0/0.
    return {"dice": 1.0, "hd95": 0.0, "tp": 0, "fn": 0, "fp": 0}
  return {"dice": float(np.mean([x.dice for x in counted])),
          "hd95": float(np.mean([x.hd95 for x in counted])),
          "tp": count("matched"), "fn": count("missed"), "fp": count("false_positive")}


def lesion_scores(pred_labels: np.ndarray, ref_labels: np.ndarray, spacing: Sequence[float],
                  rules: LesionRules, with_hd95: bool = True,
                  label_set: str = labels.DEFAULT_LABEL_SET
                  ) -> Tuple[Dict[str, float], List[Lesion]]:
  """Lesion-wise Dice and HD95 of two canonical label volumes under a rule set.

  Returns ({'lesion_dice_<R>', 'lesion_hd95_<R>', 'lesions_tp_<R>', 'lesions_fn_<R>',
  'lesions_fp_<R>'} for each region R of the rules, [every Lesion]). with_hd95=False skips
  the distances (HD95 NaN), for choices made on the Dice alone.
  """
  check_lesion_rules(rules, label_set)
  pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
  if pred_labels.shape != ref_labels.shape or pred_labels.ndim != 3:
    raise ValueError(f"Label volumes must be 3-D of one shape: prediction {pred_labels.shape}, "
                     f"reference {ref_labels.shape}.")
  spacing = tuple(float(s) for s in _check_spacing(spacing, 3))
  maps = _lesion_maps(labels.masks(pred_labels, rules.names(), label_set),
                      labels.masks(ref_labels, rules.names(), label_set), rules)
  scores: Dict[str, float] = {}
  lesions: List[Lesion] = []
  for region in rules.regions:
    found = _region_lesions(*maps[region], spacing, rules, region, with_hd95)
    summary = _lesion_summary(found)
    scores[f"lesion_dice_{region}"] = summary["dice"]
    scores[f"lesion_hd95_{region}"] = summary["hd95"]
    for key in ("tp", "fn", "fp"):
      scores[f"lesions_{key}_{region}"] = summary[key]
    lesions.extend(found)
  return scores, lesions
