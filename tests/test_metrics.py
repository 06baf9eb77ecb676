"""Metrics against hand-worked cases and MedPy: Dice, HD95 (both modes, empty rules,
anisotropy), sensitivity/specificity, regions."""

import math

import numpy as np
import pytest
from scipy import ndimage

from msatt_jax import metrics


def _mask(shape, *indices):
  m = np.zeros(shape, bool)
  for index in indices:
    m[index] = True
  return m


# --- Dice -------------------------------------------------------------------------------------


def test_dice_hand_worked():
  pred = _mask((4, 4, 4), (0, 0, 0), (0, 0, 1), (1, 1, 1))
  ref = _mask((4, 4, 4), (0, 0, 1), (3, 3, 3))
  # |P∩R| = 1, |P| = 3, |R| = 2 -> 2 / 5.
  assert metrics.dice(pred, ref) == pytest.approx(0.4)
  assert metrics.dice(pred, pred) == 1.0


def test_dice_empty_rules():
  empty = np.zeros((3, 3, 3), bool)
  some = _mask((3, 3, 3), (1, 1, 1))
  assert metrics.dice(empty, empty) == 1.0  # Both empty: a correct "absent".
  assert metrics.dice(some, empty) == 0.0  # Reference empty, prediction not.
  assert metrics.dice(empty, some) == 0.0  # Prediction empty, reference not.


def test_dice_shape_mismatch():
  with pytest.raises(ValueError, match="shapes differ"):
    metrics.dice(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool))


def test_dice_from_counts_scalar_and_array():
  assert metrics.dice_from_counts(1, 3, 2) == pytest.approx(0.4)
  assert isinstance(metrics.dice_from_counts(0, 0, 0), float)
  assert metrics.dice_from_counts(0, 0, 0) == 1.0
  assert metrics.dice_from_counts(0, 5, 0) == 0.0
  # Per-region counts as the trainer accumulates them (ET, TC, WT).
  np.testing.assert_allclose(
      metrics.dice_from_counts([1, 0, 0, 4], [3, 0, 2, 4], [2, 0, 0, 6]), [0.4, 1.0, 0.0, 0.8])
  with pytest.raises(ValueError):
    metrics.dice_from_counts(3, 2, 5)  # Intersection larger than the prediction.
  with pytest.raises(ValueError):
    metrics.dice_from_counts(0, -1, 0)


# --- HD95 -------------------------------------------------------------------------------------


def test_hd95_empty_rules():
  assert metrics.HD95_EMPTY == pytest.approx(373.1286641, abs=1e-6)
  assert metrics.HD95_EMPTY == pytest.approx(math.sqrt(240**2 + 240**2 + 155**2))
  empty = np.zeros((5, 5, 5), bool)
  some = _mask((5, 5, 5), (2, 2, 2))
  assert metrics.hd95(empty, empty, (1, 1, 1)) == 0.0
  assert metrics.hd95(some, empty, (1, 1, 1)) == metrics.HD95_EMPTY
  assert metrics.hd95(empty, some, (3, 3, 3)) == metrics.HD95_EMPTY  # Spacing-independent.


def test_hd95_parallel_planes_offset_k():
  shape = (10, 6, 7)
  pred = _mask(shape, (2, slice(None), slice(None)))
  ref = _mask(shape, (5, slice(None), slice(None)))
  # A one-voxel-thick plane is all surface; every voxel's nearest is straight across: 3 voxels.
  assert metrics.hd95(pred, ref, (1, 1, 1)) == pytest.approx(3.0)
  # Offset along an axis with spacing 2 doubles the distance; spacing elsewhere changes nothing.
  assert metrics.hd95(pred, ref, (2.0, 1.0, 1.0)) == pytest.approx(6.0)
  assert metrics.hd95(pred, ref, (1.0, 2.0, 0.5)) == pytest.approx(3.0)


def test_hd95_cubes_offset_two():
  shape = (9, 6, 6)
  pred = _mask(shape, (slice(1, 5), slice(1, 5), slice(1, 5)))
  ref = _mask(shape, (slice(3, 7), slice(1, 5), slice(1, 5)))
  # 56 surface voxels per cube; distances to the other surface: 24 x 0, 16 x 1, 16 x 2 (by
  # rows: the 12 rim rows give 2,1,0,0 along x; the 4 inner rows give 2 and 1). The 95th
  # percentile (sorted index 52.25) lies among the 2s, in both directions.
  d = metrics.directed_surface_distances(pred, ref, (1, 1, 1))
  assert sorted(np.unique(d, return_counts=True)[1].tolist()) == [16, 16, 24]
  # Pooled: 48 x 0, 32 x 1, 32 x 2; sorted index 0.95 * 111 = 105.45 is among the 2s too.
  for mode in metrics.HD95_MODES:
    assert metrics.hd95(pred, ref, (1, 1, 1), mode) == pytest.approx(2.0)
    assert metrics.hd95(pred, ref, (2.5, 1, 1), mode) == pytest.approx(5.0)


def test_hd95_single_voxels_anisotropic():
  pred = _mask((6, 6, 3), (0, 0, 1))
  ref = _mask((6, 6, 3), (3, 4, 1))
  assert metrics.hd95(pred, ref, (1, 1, 1)) == pytest.approx(5.0)
  assert metrics.hd95(pred, ref, (1, 0.5, 1)) == pytest.approx(math.sqrt(9 + 4))


def test_hd95_modes_differ_far_false_positive_line():
  shape = (13, 3, 100)
  ref = _mask(shape, (1, 1, slice(None)))  # A line of 100 voxels.
  # The prediction adds a far line of 10 voxels, 10 voxels away: 10 of its 110 surface voxels.
  pred = _mask(shape, (1, 1, slice(None)), (11, 1, slice(0, 10)))
  to_ref = metrics.directed_surface_distances(pred, ref, (1, 1, 1))
  to_pred = metrics.directed_surface_distances(ref, pred, (1, 1, 1))
  assert sorted(to_ref.tolist()) == [0.0] * 100 + [10.0] * 10
  assert to_pred.tolist() == [0.0] * 100
  # Official: pooled, 200 zeros and 10 tens; sorted index 0.95 * 209 = 198.55 is a zero.
  assert metrics.hd95(pred, ref, (1, 1, 1)) == 0.0
  assert metrics.hd95(pred, ref, (1, 1, 1), mode="official") == 0.0
  # Max: pred->ref alone, sorted index 0.95 * 109 = 103.55 falls among the 10s.
  assert metrics.hd95(pred, ref, (1, 1, 1), mode="max") == pytest.approx(10.0)
  assert metrics.hd95(pred, ref, (1, 2, 0.5), mode="max") == pytest.approx(10.0)


def test_hd95_linear_interpolated_percentile_modes_differ():
  # 1-D-like volume: WT voxels 1..6 vs 2..7 -> distances [1,0,0,0,0,0] each way.
  ref = _mask((1, 1, 8), (0, 0, slice(1, 7)))
  pred = _mask((1, 1, 8), (0, 0, slice(2, 8)))
  # Max: each direction's 95th percentile at sorted index 4.75 interpolates 0 -> 1: 0.75.
  assert metrics.hd95(pred, ref, (1, 1, 1), mode="max") == pytest.approx(0.75)
  assert metrics.hd95(pred, ref, (1, 1, 2), mode="max") == pytest.approx(1.5)
  # Official: pooled 10 zeros and 2 ones; sorted index 0.95 * 11 = 10.45 lies between the two
  # ones: 1.0. Interpolation lets the pooled value exceed both directed ones here.
  assert metrics.hd95(pred, ref, (1, 1, 1)) == pytest.approx(1.0)
  assert metrics.hd95(pred, ref, (1, 1, 2)) == pytest.approx(2.0)


def test_hd95_rejects_unknown_mode():
  m = _mask((3, 3, 3), (1, 1, 1))
  assert metrics.HD95_MODES == ("official", "max", "surface")
  assert set(metrics.HD95_DEFINITIONS) == set(metrics.HD95_MODES)
  with pytest.raises(ValueError, match="HD95 mode"):
    metrics.hd95(m, m, (1, 1, 1), mode="pooled")
  with pytest.raises(ValueError, match="HD95 mode"):
    metrics.region_scores(m.astype(np.uint8), m.astype(np.uint8), hd95_mode="mean")


def _brute_force_hd95(pred, ref, spacing, mode):
  """Independent check: explicit face-neighbour surfaces and all-pairs distances."""

  def surface(m):
    padded = np.pad(m, 1)
    inner = m.copy()
    for axis in range(3):
      for step in (-1, 1):
        inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return m & ~inner

  a = np.argwhere(surface(pred)) * np.asarray(spacing)
  b = np.argwhere(surface(ref)) * np.asarray(spacing)
  d = np.sqrt(((a[:, None, :] - b[None, :, :])**2).sum(-1))
  if mode == "official":
    return np.percentile(np.concatenate([d.min(1), d.min(0)]), 95)
  return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


@pytest.mark.parametrize("mode", ["official", "max"])  # "surface": test_lesion_metrics.py.
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_matches_brute_force_on_random_blobs(seed, mode):
  rng = np.random.default_rng(seed)
  shape = (14, 12, 10)
  spacing = (1.0, 0.7, 2.5)
  blobs = [ndimage.gaussian_filter(rng.normal(size=shape), 1.5) for _ in range(2)]
  pred, ref = blobs[0] > 0.05, blobs[1] > 0.05  # Irregular, touching the volume border.
  assert pred.any() and ref.any()
  expected = _brute_force_hd95(pred, ref, spacing, mode)
  assert metrics.hd95(pred, ref, spacing, mode) == pytest.approx(expected, rel=1e-12)
  # The bounding-box crop gives the same number inside a larger volume.
  big_pred, big_ref = np.zeros((40, 30, 25), bool), np.zeros((40, 30, 25), bool)
  big_pred[20:34, 5:17, 9:19], big_ref[20:34, 5:17, 9:19] = pred, ref
  assert metrics.hd95(big_pred, big_ref, spacing, mode) == pytest.approx(expected, rel=1e-12)


def test_hd95_rejects_bad_spacing():
  m = _mask((3, 3, 3), (1, 1, 1))
  with pytest.raises(ValueError, match="spacing"):
    metrics.hd95(m, m, (1.0, 0.0, 1.0))
  with pytest.raises(ValueError, match="does not match"):
    metrics.hd95(m, m, (1.0, 1.0))


# --- Regions ----------------------------------------------------------------------------------


def test_region_scores_composition():
  # Canonical labels along one axis: 1 NCR/NET, 2 ED, 3 ET.
  ref = np.array([0, 2, 2, 1, 3, 1, 2, 0], np.uint8).reshape(1, 1, 8)
  pred = np.array([0, 0, 2, 1, 1, 3, 2, 2], np.uint8).reshape(1, 1, 8)
  scores = metrics.region_scores(pred, ref, (1.0, 1.0, 2.0))
  assert list(scores) == [f"{m}_{r}" for m in ("dice", "hd95", "sensitivity", "specificity")
                          for r in ("ET", "TC", "WT")]
  # ET = {3}: ref {4}, pred {5}: no overlap, one voxel (2 mm) apart.
  assert scores["dice_ET"] == 0.0
  assert scores["hd95_ET"] == pytest.approx(2.0)
  assert scores["sensitivity_ET"] == 0.0 and scores["specificity_ET"] == pytest.approx(6 / 7)
  # TC = {1, 3}: {3, 4, 5} on both sides, though NCR and ET are swapped inside.
  assert scores["dice_TC"] == 1.0
  assert scores["hd95_TC"] == 0.0
  assert scores["sensitivity_TC"] == 1.0 and scores["specificity_TC"] == 1.0
  # WT = {1, 2, 3}: ref 1..6, pred 2..7 -> 2 * 5 / 12; HD95 1 voxel x 2 mm (official, pooled;
  # 0.75 voxel with mode "max", see test_hd95_linear_interpolated_percentile_modes_differ).
  assert scores["dice_WT"] == pytest.approx(10 / 12)
  assert scores["hd95_WT"] == pytest.approx(2.0)
  # 5 of the 6 reference voxels found; 1 of the 2 background voxels (0 and 7) predicted.
  assert scores["sensitivity_WT"] == pytest.approx(5 / 6)
  assert scores["specificity_WT"] == pytest.approx(1 / 2)
  max_scores = metrics.region_scores(pred, ref, (1.0, 1.0, 2.0), hd95_mode="max")
  assert max_scores["hd95_WT"] == pytest.approx(1.5)
  assert {k: v for k, v in max_scores.items() if k != "hd95_WT"} == {
      k: v for k, v in scores.items() if k != "hd95_WT"}


def test_region_scores_absent_et_both_sides():
  ref = np.array([0, 2, 1, 1, 2, 0], np.uint8).reshape(1, 1, 6)
  scores = metrics.region_scores(ref, ref, (1, 1, 1))
  assert scores == {f"{m}_{r}": 0.0 if m == "hd95" else 1.0
                    for m in ("dice", "hd95", "sensitivity", "specificity")
                    for r in ("ET", "TC", "WT")}
  pred = ref.copy()
  pred[0, 0, 2] = 3  # ET predicted where the reference has none.
  scores = metrics.region_scores(pred, ref, (1, 1, 1))
  assert scores["dice_ET"] == 0.0 and scores["hd95_ET"] == metrics.HD95_EMPTY
  assert scores["sensitivity_ET"] == 0.0 and scores["specificity_ET"] == pytest.approx(5 / 6)
  assert scores["dice_TC"] == 1.0 and scores["dice_WT"] == 1.0


# --- Sensitivity and specificity ------------------------------------------------------------


def test_sensitivity_specificity_hand_worked():
  pred = _mask((4, 4, 4), (0, 0, 0), (0, 0, 1), (1, 1, 1))
  ref = _mask((4, 4, 4), (0, 0, 1), (3, 3, 3))
  # TP 1, FN 1, FP 2, TN 64 - 4 = 60.
  assert metrics.sensitivity(pred, ref) == pytest.approx(1 / 2)
  assert metrics.specificity(pred, ref) == pytest.approx(60 / 62)
  assert metrics.sensitivity(ref, ref) == 1.0 and metrics.specificity(ref, ref) == 1.0
  with pytest.raises(ValueError, match="shapes differ"):
    metrics.sensitivity(pred, ref[:3])


def test_sensitivity_specificity_empty_rules():
  empty = np.zeros((3, 3, 3), bool)
  some = _mask((3, 3, 3), (1, 1, 1))
  full = np.ones((3, 3, 3), bool)
  # Both empty: both perfect (BraTS).
  assert metrics.sensitivity(empty, empty) == 1.0 and metrics.specificity(empty, empty) == 1.0
  # Empty reference, prediction not: sensitivity 0 (its 0/0 resolved), specificity 26/27.
  assert metrics.sensitivity(some, empty) == 0.0
  assert metrics.specificity(some, empty) == pytest.approx(26 / 27)
  # Empty prediction, reference not: both from the formula.
  assert metrics.sensitivity(empty, some) == 0.0 and metrics.specificity(empty, some) == 1.0
  # A reference with no background: the specificity's 0/0 is resolved the same way.
  assert metrics.specificity(full, full) == 1.0 and metrics.specificity(some, full) == 0.0
  for value in (metrics.sensitivity(some, empty), metrics.specificity(some, full),
                metrics.sensitivity(some, some), metrics.specificity(some, some)):
    assert type(value) is float


# --- Against MedPy (the library behind the official BraTS HD95) -----------------------------

_MEDPY_CASES = [  # (shape, spacing, seed): thin and irregular volumes, anisotropic spacings.
    ((14, 12, 10), (1.0, 1.0, 1.0), 0),
    ((20, 16, 8), (1.0, 1.0, 5.0), 1),
    ((9, 17, 13), (0.5, 0.7, 2.5), 2),
    ((3, 22, 18), (3.0, 0.9, 1.2), 3),
    ((24, 24, 12), (0.9375, 0.9375, 3.0), 4),
]


def _random_masks(shape, seed):
  """Two irregular masks: independent blobs (seed even) or a perturbed copy (seed odd)."""
  rng = np.random.default_rng(seed)
  smooth = lambda: ndimage.gaussian_filter(rng.normal(size=shape), 1.2)
  ref = smooth() > 0.1
  pred = (smooth() > 0.1) if seed % 2 == 0 else ref ^ (rng.random(shape) < 0.05)
  return pred, ref


@pytest.mark.parametrize("shape,spacing,seed", _MEDPY_CASES)
def test_dice_hd95_sens_spec_match_medpy(shape, spacing, seed):
  binary = pytest.importorskip("medpy.metric.binary")
  pred, ref = _random_masks(shape, seed)
  assert pred.any() and ref.any() and not ref.all()
  assert metrics.dice(pred, ref) == pytest.approx(binary.dc(pred, ref), rel=1e-12)
  expected = binary.hd95(pred, ref, voxelspacing=spacing)
  assert metrics.hd95(pred, ref, spacing) == pytest.approx(expected, rel=1e-12, abs=1e-12)
  assert metrics.hd95(ref, pred, spacing) == pytest.approx(expected, rel=1e-12, abs=1e-12)
  assert metrics.sensitivity(pred, ref) == pytest.approx(binary.sensitivity(pred, ref))
  assert metrics.specificity(pred, ref) == pytest.approx(binary.specificity(pred, ref))
  # Inside a larger volume, away from its border (our crop vs MedPy's full volume).
  big = tuple(n + 9 for n in shape)
  inner = tuple(slice(4, 4 + n) for n in shape)
  big_pred, big_ref = np.zeros(big, bool), np.zeros(big, bool)
  big_pred[inner], big_ref[inner] = pred, ref
  expected = binary.hd95(big_pred, big_ref, voxelspacing=spacing)
  assert metrics.hd95(big_pred, big_ref, spacing) == pytest.approx(expected, rel=1e-12,
                                                                   abs=1e-12)


def test_hd95_hand_made_cases_match_medpy():
  binary = pytest.importorskip("medpy.metric.binary")
  line = _mask((13, 3, 100), (1, 1, slice(None)))
  line_plus = _mask((13, 3, 100), (1, 1, slice(None)), (11, 1, slice(0, 10)))
  ref = _mask((1, 1, 8), (0, 0, slice(1, 7)))
  pred = _mask((1, 1, 8), (0, 0, slice(2, 8)))
  for p, r, spacing in ((line_plus, line, (1, 1, 1)), (pred, ref, (1, 1, 2))):
    official = metrics.hd95(p, r, spacing)
    assert official == pytest.approx(binary.hd95(p, r, voxelspacing=spacing))
    assert official != pytest.approx(metrics.hd95(p, r, spacing, mode="max"))


# --- Slice Dice -------------------------------------------------------------------------------


def _column(shape_z, ones_at):
  v = np.zeros((1, 1, shape_z), np.uint8)
  v[0, 0, list(ones_at)] = 2  # Edema: WT only.
  return v


def test_slice_dice_restricts_to_inclusive_range():
  ref = _column(10, range(2, 7))
  pred = _column(10, range(4, 9))
  # Slices 3..5: ref {3, 4, 5}, pred {4, 5} -> 2 * 2 / 5 (whole volume would be 0.6).
  scores = metrics.slice_dice(pred, ref, slice_start=3, slice_stop=5)
  assert scores == {"slice_dice_ET": 1.0, "slice_dice_TC": 1.0,
                    "slice_dice_WT": pytest.approx(0.8)}
  assert metrics.dice(pred > 0, ref > 0) == pytest.approx(0.6)
  assert metrics.slice_dice(pred, ref, 4, 4)["slice_dice_WT"] == 1.0  # One slice.


def test_slice_dice_default_range_is_30_to_120_inclusive():
  ref = _column(155, [30, 120])
  pred = _column(155, [29, 30, 120, 121])  # 29 and 121 lie outside the range.
  assert metrics.slice_dice(pred, ref)["slice_dice_WT"] == 1.0
  assert metrics.slice_dice(pred, ref, 29, 121)["slice_dice_WT"] == pytest.approx(4 / 6)


def test_slice_dice_range_errors_and_clipping():
  ref = _column(10, [1])
  pred = _column(10, [1, 8])
  # A stop past the volume is clipped to its last slice: slices 8, 9 -> ref empty, pred not.
  assert metrics.slice_dice(pred, ref, 8, 120)["slice_dice_WT"] == 0.0
  with pytest.raises(ValueError, match="outside"):
    metrics.slice_dice(pred, ref, 10, 20)
  with pytest.raises(ValueError, match="outside"):
    metrics.slice_dice(pred, ref, -1, 5)
  with pytest.raises(ValueError, match="before"):
    metrics.slice_dice(pred, ref, 5, 4)


# --- Summary ----------------------------------------------------------------------------------


def test_summarize():
  rows = [{"case": "a", "dice_ET": 0.5, "hd95_ET": 1.0},
          {"case": "b", "dice_ET": 1.0, "hd95_ET": 3.0},
          {"case": "c", "dice_ET": 0.0}]
  summary = metrics.summarize(rows)
  assert set(summary) == {"dice_ET", "hd95_ET"}
  assert summary["dice_ET"] == {"mean": 0.5, "std": pytest.approx(math.sqrt(1 / 6)),
                                "median": 0.5, "min": 0.0, "max": 1.0, "n": 3}
  assert summary["hd95_ET"] == {"mean": 2.0, "std": 1.0, "median": 2.0, "min": 1.0,
                                "max": 3.0, "n": 2}


def test_summarize_region_scores_has_every_metric():
  ref = np.array([0, 2, 2, 1, 3, 1, 2, 0], np.uint8).reshape(1, 1, 8)
  rows = [{"case": "a", **metrics.region_scores(ref, ref)},
          {"case": "b", **metrics.region_scores(np.zeros_like(ref), ref)}]
  summary = metrics.summarize(rows)
  assert set(summary) == set(rows[0]) - {"case"}
  assert summary["sensitivity_WT"]["mean"] == 0.5 and summary["specificity_WT"]["mean"] == 1.0
