"""Metrics against hand-worked cases: Dice, HD95 (incl. empty rules, anisotropy), regions."""

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
  assert metrics.hd95(pred, ref, (1, 1, 1)) == pytest.approx(2.0)
  assert metrics.hd95(pred, ref, (2.5, 1, 1)) == pytest.approx(5.0)


def test_hd95_single_voxels_anisotropic():
  pred = _mask((6, 6, 3), (0, 0, 1))
  ref = _mask((6, 6, 3), (3, 4, 1))
  assert metrics.hd95(pred, ref, (1, 1, 1)) == pytest.approx(5.0)
  assert metrics.hd95(pred, ref, (1, 0.5, 1)) == pytest.approx(math.sqrt(9 + 4))


def test_hd95_is_max_of_directed_percentiles_not_pooled():
  shape = (13, 3, 100)
  ref = _mask(shape, (1, 1, slice(None)))  # A line of 100 voxels.
  # The prediction adds a far line of 10 voxels, 10 voxels away: 10 of its 110 surface voxels.
  pred = _mask(shape, (1, 1, slice(None)), (11, 1, slice(0, 10)))
  to_ref = metrics.directed_surface_distances(pred, ref, (1, 1, 1))
  to_pred = metrics.directed_surface_distances(ref, pred, (1, 1, 1))
  assert sorted(to_ref.tolist()) == [0.0] * 100 + [10.0] * 10
  assert to_pred.tolist() == [0.0] * 100
  # pred->ref: sorted index 0.95 * 109 = 103.55 falls among the 10s.
  assert metrics.hd95(pred, ref, (1, 1, 1)) == pytest.approx(10.0)
  # Pooling both directions (200 zeros, 10 tens) would hide the blob entirely.
  assert np.percentile(np.concatenate([to_ref, to_pred]), 95) == 0.0


def test_hd95_linear_interpolated_percentile():
  # 1-D-like volume: WT voxels 1..6 vs 2..7 -> distances [1,0,0,0,0,0] each way; the 95th
  # percentile at sorted index 4.75 interpolates 0 -> 1: 0.75.
  ref = _mask((1, 1, 8), (0, 0, slice(1, 7)))
  pred = _mask((1, 1, 8), (0, 0, slice(2, 8)))
  assert metrics.hd95(pred, ref, (1, 1, 1)) == pytest.approx(0.75)
  assert metrics.hd95(pred, ref, (1, 1, 2)) == pytest.approx(1.5)


def _brute_force_hd95(pred, ref, spacing):
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
  return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_matches_brute_force_on_random_blobs(seed):
  rng = np.random.default_rng(seed)
  shape = (14, 12, 10)
  spacing = (1.0, 0.7, 2.5)
  blobs = [ndimage.gaussian_filter(rng.normal(size=shape), 1.5) for _ in range(2)]
  pred, ref = blobs[0] > 0.05, blobs[1] > 0.05  # Irregular, touching the volume border.
  assert pred.any() and ref.any()
  expected = _brute_force_hd95(pred, ref, spacing)
  assert metrics.hd95(pred, ref, spacing) == pytest.approx(expected, rel=1e-12)
  # The bounding-box crop gives the same number inside a larger volume.
  big_pred, big_ref = np.zeros((40, 30, 25), bool), np.zeros((40, 30, 25), bool)
  big_pred[20:34, 5:17, 9:19], big_ref[20:34, 5:17, 9:19] = pred, ref
  assert metrics.hd95(big_pred, big_ref, spacing) == pytest.approx(expected, rel=1e-12)


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
  assert list(scores) == ["dice_ET", "dice_TC", "dice_WT", "hd95_ET", "hd95_TC", "hd95_WT"]
  # ET = {3}: ref {4}, pred {5}: no overlap, one voxel (2 mm) apart.
  assert scores["dice_ET"] == 0.0
  assert scores["hd95_ET"] == pytest.approx(2.0)
  # TC = {1, 3}: {3, 4, 5} on both sides, though NCR and ET are swapped inside.
  assert scores["dice_TC"] == 1.0
  assert scores["hd95_TC"] == 0.0
  # WT = {1, 2, 3}: ref 1..6, pred 2..7 -> 2 * 5 / 12; HD95 0.75 voxel x 2 mm.
  assert scores["dice_WT"] == pytest.approx(10 / 12)
  assert scores["hd95_WT"] == pytest.approx(1.5)


def test_region_scores_absent_et_both_sides():
  ref = np.array([0, 2, 1, 1, 2, 0], np.uint8).reshape(1, 1, 6)
  scores = metrics.region_scores(ref, ref, (1, 1, 1))
  assert scores == {"dice_ET": 1.0, "dice_TC": 1.0, "dice_WT": 1.0,
                    "hd95_ET": 0.0, "hd95_TC": 0.0, "hd95_WT": 0.0}
  pred = ref.copy()
  pred[0, 0, 2] = 3  # ET predicted where the reference has none.
  scores = metrics.region_scores(pred, ref, (1, 1, 1))
  assert scores["dice_ET"] == 0.0 and scores["hd95_ET"] == metrics.HD95_EMPTY
  assert scores["dice_TC"] == 1.0 and scores["dice_WT"] == 1.0


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
