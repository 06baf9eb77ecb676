"""Lesion-wise scores (BraTS 2023+) on hand-made volumes, and the robust HD95 they use."""

import dataclasses
import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from msatt_jax import metrics

ED, ET = 2, 3  # Canonical labels: an edema blob is WT only; an ET blob is ET, TC and WT.
GLI, MEN, MET = (metrics.LESION_RULES[n] for n in ("gli2023", "men2023", "met2023"))
SHAPE = (16, 8, 8)


def _volume(*boxes, label=ED, shape=SHAPE):
  out = np.zeros(shape, np.uint8)
  for box in boxes:
    out[box] = label
  return out


# Two 4x4x4 lesions (64 voxels = 64 mm^3 each) on x 1..4 and 8..11: 4 voxels apart.
A = (slice(1, 5), slice(2, 6), slice(2, 6))
B = (slice(8, 12), slice(2, 6), slice(2, 6))
FAR = (slice(14, 16), slice(0, 2), slice(0, 2))  # 8 voxels, > 3 voxels from A and B.


def test_rule_sets_are_the_published_2023_parameters():
  table = {n: (r.dilation, r.min_volume_mm3, r.penalty_hd95, r.challenge)
           for n, r in metrics.LESION_RULES.items() if r.year == 2023}
  assert table == {"gli2023": (3, 50.0, 374.0, "GLI"), "ssa2023": (3, 50.0, 374.0, "SSA"),
                   "ped2023": (3, 50.0, 374.0, "PED"), "men2023": (1, 50.0, 374.0, "MEN"),
                   "met2023": (1, 2.0, 374.0, "MET")}
  for rules in (r for r in metrics.LESION_RULES.values() if r.year == 2023):
    assert rules.regions == ("WT", "TC", "ET") and rules.hd95 == "surface"
    assert rules.matching == "dilated_overlap" and not rules.per_region + rules.merge_touching
    assert "BraTS-2023-Metrics" in rules.source and rules.name in rules.describe()
  assert metrics.rules_for_challenge("MET") is MET and metrics.rules_for_challenge("GoAT") is None
  with pytest.raises(ValueError, match="unknown lesion rule set 'gli2030'"):
    metrics.lesion_rules("gli2030")
  with pytest.raises(dataclasses.FrozenInstanceError):
    GLI.dilation = 1


def test_lesions_four_voxels_apart_merge_at_d3_not_at_d1():
  ref = _volume(A, B)
  pred = _volume(A)  # Finds A exactly, misses B.
  scores, lesions = metrics.lesion_scores(pred, ref, (1, 1, 1), GLI)
  # d=3: A and B are one lesion of 128 voxels; A (64) matches it: Dice 2*64/(64+128).
  assert [(x.lesion_id, x.volume_mm3, x.status) for x in lesions] == [(1, 128.0, "matched")]
  assert scores["lesion_dice_WT"] == pytest.approx(2 / 3)
  assert scores["lesion_hd95_WT"] == metrics.hd95(pred > 0, ref > 0, (1, 1, 1), "surface") > 0
  assert (scores["lesions_tp_WT"], scores["lesions_fn_WT"], scores["lesions_fp_WT"]) == (1, 0, 0)
  # d=1: two lesions, A perfect (Dice 1, HD95 0), B missed (0, 374): means 0.5 and 187.
  scores, lesions = metrics.lesion_scores(pred, ref, (1, 1, 1), MEN)
  assert [(x.status, x.dice, x.hd95) for x in lesions] == [("matched", 1.0, 0.0),
                                                           ("missed", 0.0, 374.0)]
  assert scores["lesion_dice_WT"] == 0.5 and scores["lesion_hd95_WT"] == 187.0
  assert (scores["lesions_tp_WT"], scores["lesions_fn_WT"], scores["lesions_fp_WT"]) == (1, 1, 0)
  # Edema only: TC and ET are empty on both sides, 0/0 -> Dice 1, HD95 0.
  assert scores["lesion_dice_ET"] == 1.0 and scores["lesion_hd95_TC"] == 0.0
  assert scores["lesions_tp_ET"] == scores["lesions_fn_ET"] == scores["lesions_fp_ET"] == 0


def test_dilation_is_18_connected():
  # Diagonal neighbours along two axes are 18-connected: one dilation bridges a one-voxel gap
  # along x (A ends at 4, C starts at 6), so with d=1 they are one lesion.
  c = (slice(6, 10), slice(2, 6), slice(2, 6))
  _, lesions = metrics.lesion_scores(_volume(A), _volume(A, c), (1, 1, 1), MEN)
  assert [(x.status, x.volume_mm3) for x in lesions] == [("matched", 128.0)]


def test_one_component_matches_several_lesions():
  ref = _volume(A, B)
  pred = _volume((slice(1, 12), slice(2, 6), slice(2, 6)))  # 176 voxels bridging both.
  scores, lesions = metrics.lesion_scores(pred, ref, (1, 1, 1), MEN)
  # Each lesion: its 64 voxels inside the 176-voxel component: 2*64/(176+64); no false positive.
  assert [x.status for x in lesions] == ["matched", "matched"]
  assert scores["lesion_dice_WT"] == pytest.approx(128 / 240)
  assert scores["lesions_fp_WT"] == 0


def test_false_positive_scores_zero_and_the_penalty():
  scores, lesions = metrics.lesion_scores(_volume(A, FAR), _volume(A), (1, 1, 1), GLI)
  assert [(x.status, x.volume_mm3, x.dice, x.hd95) for x in lesions] == [
      ("matched", 64.0, 1.0, 0.0), ("false_positive", 8.0, 0.0, 374.0)]
  assert scores["lesion_dice_WT"] == 0.5 and scores["lesion_hd95_WT"] == 187.0
  assert (scores["lesions_tp_WT"], scores["lesions_fn_WT"], scores["lesions_fp_WT"]) == (1, 0, 1)
  # Nothing in the reference: the stray blob alone, Dice 0 and HD95 374.
  scores, _ = metrics.lesion_scores(_volume(FAR), _volume(), (1, 1, 1), GLI)
  assert scores["lesion_dice_WT"] == 0.0 and scores["lesion_hd95_WT"] == 374.0


def test_lesion_under_the_threshold_leaves_sum_and_count():
  ref = _volume(A, FAR)  # FAR: 8 mm^3 <= 50.
  scores, lesions = metrics.lesion_scores(_volume(A), ref, (1, 1, 1), GLI)
  assert [(x.status, x.counted) for x in lesions] == [("matched", True), ("missed", False)]
  assert scores["lesion_dice_WT"] == 1.0 and scores["lesion_hd95_WT"] == 0.0
  assert (scores["lesions_tp_WT"], scores["lesions_fn_WT"]) == (1, 0)
  # A prediction on the small lesion is matched to it, so it is no false positive either.
  scores, _ = metrics.lesion_scores(_volume(A, FAR), ref, (1, 1, 1), GLI)
  assert scores["lesion_dice_WT"] == 1.0 and scores["lesions_fp_WT"] == 0
  # Only small lesions, none found: 0/0 as for an empty case.
  scores, _ = metrics.lesion_scores(_volume(), _volume(FAR), (1, 1, 1), GLI)
  assert scores["lesion_dice_WT"] == 1.0 and scores["lesion_hd95_WT"] == 0.0


def test_empty_case():
  empty = _volume()
  scores, lesions = metrics.lesion_scores(empty, empty, (1, 1, 1), GLI)
  assert lesions == []
  for region in ("WT", "TC", "ET"):
    assert scores[f"lesion_dice_{region}"] == 1.0 and scores[f"lesion_hd95_{region}"] == 0.0
  # A missed lesion alone: Dice 0, HD95 374.
  scores, _ = metrics.lesion_scores(empty, _volume(A, label=ET), (1, 1, 1), GLI)
  assert all(scores[f"lesion_dice_{r}"] == 0.0 and scores[f"lesion_hd95_{r}"] == 374.0
             for r in ("WT", "TC", "ET"))


def test_anisotropic_spacing():
  one = (slice(8, 9), slice(4, 5), slice(4, 5))  # A one-voxel metastasis, missed.
  ref, pred = _volume(A, one, label=ET), _volume(A, label=ET)
  # 1 mm^3 <= 2: not counted; 3 mm^3 with 3 mm slices: counted (a miss).
  scores, _ = metrics.lesion_scores(pred, ref, (1, 1, 1), MET)
  assert scores["lesion_dice_ET"] == 1.0 and scores["lesions_fn_ET"] == 0
  scores, lesions = metrics.lesion_scores(pred, ref, (1, 1, 3), MET)
  assert [x.volume_mm3 for x in lesions if x.region == "ET"] == [192.0, 3.0]
  assert scores["lesion_dice_ET"] == 0.5 and scores["lesion_hd95_ET"] == 187.0
  assert scores["lesions_fn_ET"] == 1
  # Dilation counts voxels, not mm: the lesions 4 voxels apart merge at d=3 at any spacing.
  _, lesions = metrics.lesion_scores(_volume(A), _volume(A, B), (5, 5, 5), GLI)
  assert len(lesions) == 1
  # A lesion predicted one slice too high: HD95 in mm scales with the slice spacing.
  shifted = _volume((slice(1, 5), slice(2, 6), slice(3, 7)), label=ET)
  s1, _ = metrics.lesion_scores(shifted, _volume(A, label=ET), (1, 1, 1), GLI)
  s2, _ = metrics.lesion_scores(shifted, _volume(A, label=ET), (1, 1, 2.5), GLI)
  assert s1["lesion_hd95_ET"] == 1.0 and s2["lesion_hd95_ET"] == 2.5
  assert s1["lesion_dice_ET"] == s2["lesion_dice_ET"] == pytest.approx(2 * 48 / 128)


def test_scores_do_not_depend_on_the_volume_border():
  # The same case padded into a larger volume and touching the border gives the same scores.
  ref, pred = _volume(A, B, FAR), _volume(A, (slice(9, 12), slice(2, 6), slice(0, 3)))
  small, _ = metrics.lesion_scores(pred, ref, (1, 1, 1.5), MEN)
  big_ref, big_pred = np.zeros((30, 20, 20), np.uint8), np.zeros((30, 20, 20), np.uint8)
  big_ref[5:21, 6:14, 3:11], big_pred[5:21, 6:14, 3:11] = ref, pred
  big, _ = metrics.lesion_scores(big_pred, big_ref, (1, 1, 1.5), MEN)
  assert small == big


def test_bad_input():
  with pytest.raises(ValueError, match="one shape"):
    metrics.lesion_scores(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1), GLI)
  rc = dataclasses.replace(GLI, name="rc2024", regions=("WT", "RC"))
  with pytest.raises(ValueError, match="'rc2024' scores region.*RC.*lacks"):
    metrics.lesion_scores(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 1, 1), rc)
  with pytest.raises(ValueError, match="spacing"):
    metrics.lesion_scores(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 0, 1), GLI)


# --- BraTS 2024 rule sets. ------------------------------------------------------------------

GLI24, SSA24, MET24, PED24 = (metrics.LESION_RULES[n]
                              for n in ("gli2024", "ssa2024", "met2024", "ped2024"))
NETC, SNFH = 1, 2  # glioma_rc classes (ET = 3, RC = 4).


def test_rule_sets_are_the_published_2024_parameters():
  params = lambda rules: {r: rules.params(r) for r in rules.regions}
  assert GLI24.regions == ("WT", "TC", "NETC", "SNFH", "ET", "RC")
  # d 5 for NETC and RC only (SNFH keeps 3), v 10 mm^3 for ET, 20 for the others; HD95 337.
  assert params(GLI24) == {"WT": (3, 20.0), "TC": (3, 20.0), "NETC": (5, 20.0),
                           "SNFH": (3, 20.0), "ET": (3, 10.0), "RC": (5, 20.0)}
  assert GLI24.penalty_hd95 == 337.0 and GLI24.partners("SNFH") == ("ET", "RC", "NETC")
  assert GLI24.partners("WT") == () and GLI24.names() == GLI24.regions
  assert params(SSA24) == {r: (3, 50.0) for r in ("WT", "TC", "ET")}
  assert params(MET24) == {r: (1, 2.0) for r in ("WT", "TC", "ET")}
  assert SSA24.names() == MET24.names() == ("WT", "TC", "ET", "NCR/NET")
  assert params(PED24) == {r: (5, 10.0) for r in ("WT", "TC", "ET", "NET", "CC", "ED")}
  for rules in (GLI24, SSA24, MET24, PED24):
    assert rules.year == 2024 and rules.matching == "dilated_groups"
    assert "BraTS-2024-Metrics" in rules.source and "9a0ab9c7" in rules.source
    assert rules.penalty_hd95 == (337.0 if rules is GLI24 else 374.0)
  assert "NETC: 5 dilation(s), <= 20 mm^3" in GLI24.describe()
  # auto: the 2024 row for files of a 2024 label set, else 2023.
  assert metrics.rules_for_challenge("GLI", 2024) is GLI24
  assert metrics.auto_lesion_rules("GLI", "glioma_rc") is GLI24
  assert metrics.auto_lesion_rules("GLI", "gli2024") is GLI24  # A convention's label set.
  assert metrics.auto_lesion_rules("GLI", "glioma") is GLI
  assert metrics.auto_lesion_rules("PED", "ped") is PED24
  assert metrics.auto_lesion_rules("PED").name == "ped2023"
  assert metrics.auto_lesion_rules("MET") is MET  # 2024 MET files hold the 2023 values.
  assert metrics.auto_lesion_rules("MEN", "ped") is None  # No MEN 2024 rule set.


def test_2024_penalty_and_per_region_threshold():
  # An SNFH lesion of 64 mm^3 missed: 337 in 2024, 374 in 2023 (same canonical volume).
  ref, empty = _volume(A, label=SNFH), _volume()
  s24, _ = metrics.lesion_scores(empty, ref, (1, 1, 1), GLI24, label_set="glioma_rc")
  s23, _ = metrics.lesion_scores(empty, ref, (1, 1, 1), GLI, label_set="glioma_rc")
  assert s24["lesion_hd95_WT"] == s24["lesion_hd95_SNFH"] == 337.0
  assert s23["lesion_hd95_WT"] == 374.0 and s24["lesion_dice_SNFH"] == 0.0
  # A missed ET lesion of 12 mm^3: over ET's 10, under TC's and WT's 20 (and 2023's 50).
  small = _volume((slice(1, 3), slice(2, 4), slice(2, 5)), label=ET)
  s24, _ = metrics.lesion_scores(empty, small, (1, 1, 1), GLI24, label_set="glioma_rc")
  assert s24["lesion_dice_ET"] == 0.0 and s24["lesion_hd95_ET"] == 337.0
  assert s24["lesion_dice_TC"] == s24["lesion_dice_WT"] == 1.0  # 0/0.
  s23, _ = metrics.lesion_scores(empty, small, (1, 1, 1), GLI, label_set="glioma_rc")
  assert s23["lesion_dice_ET"] == 1.0


def test_2024_predicted_lesions_are_merged_and_small_ones_dropped():
  # A stray 8-voxel blob: a false positive in 2023 (mean of 1 and 0), dropped in 2024
  # (<= 20 voxels once merged).
  s23, _ = metrics.lesion_scores(_volume(A, FAR), _volume(A), (1, 1, 1), GLI, label_set="glioma_rc")
  s24, _ = metrics.lesion_scores(_volume(A, FAR), _volume(A), (1, 1, 1), GLI24,
                                 label_set="glioma_rc")
  assert s23["lesion_dice_WT"] == 0.5 and s23["lesions_fp_WT"] == 1
  assert s24["lesion_dice_WT"] == s24["lesion_dice_SNFH"] == 1.0 and s24["lesions_fp_WT"] == 0
  # B, 3 empty voxels past A's dilation by 3, is a false positive in 2023; in 2024 the two
  # predicted components are one lesion (their dilations meet), matched to A: 2*64/(128+64).
  s23, _ = metrics.lesion_scores(_volume(A, B), _volume(A), (1, 1, 1), GLI, label_set="glioma_rc")
  s24, lesions = metrics.lesion_scores(_volume(A, B), _volume(A), (1, 1, 1), GLI24,
                                       label_set="glioma_rc")
  assert s23["lesion_dice_WT"] == 0.5 and s23["lesions_fp_WT"] == 1
  assert s24["lesion_dice_WT"] == pytest.approx(2 / 3) and s24["lesions_fp_WT"] == 0
  assert [x.status for x in lesions if x.region == "WT"] == ["matched"]


def _bars(*runs, shape=(30, 5, 5)):
  """A volume of 3x3 bars along x: (label, first x, last x) each."""
  out = np.zeros(shape, np.uint8)
  for label, start, stop in runs:
    out[start:stop + 1, 1:4, 1:4] = label
  return out


def test_2024_lesions_merge_across_a_touching_tissue():
  # NETC bars 16 voxels apart (two lesions at d=5) both touch one ET bar: one NETC lesion.
  ref = _bars((NETC, 1, 4), (ET, 5, 20), (NETC, 21, 24))
  pred = _bars((NETC, 1, 4), (ET, 5, 20))  # Finds the first NETC bar only.
  apart = dataclasses.replace(GLI24, merge_touching=())
  s, lesions = metrics.lesion_scores(pred, ref, (1, 1, 1), apart, label_set="glioma_rc")
  assert s["lesion_dice_NETC"] == 0.5 and s["lesion_hd95_NETC"] == 337.0 / 2
  s, lesions = metrics.lesion_scores(pred, ref, (1, 1, 1), GLI24, label_set="glioma_rc")
  netc = [x for x in lesions if x.region == "NETC"]
  assert [(x.status, x.volume_mm3) for x in netc] == [("matched", 72.0)]
  assert s["lesion_dice_NETC"] == pytest.approx(2 * 36 / (36 + 72))
  # MET 2024: two ET rims 6 voxels apart (two lesions at d=1) around one necrosis (class 1).
  ref = _bars((ET, 1, 2), (1, 3, 8), (ET, 9, 10))
  pred = _bars((ET, 1, 2), (1, 3, 8))
  s23, _ = metrics.lesion_scores(pred, ref, (1, 1, 1), MET)
  s24, _ = metrics.lesion_scores(pred, ref, (1, 1, 1), MET24)
  assert s23["lesion_dice_ET"] == 0.5 and s24["lesion_dice_ET"] == pytest.approx(2 / 3)


def test_2024_merging_follows_the_lowest_numbered_partner():
  # NETC bar n1 touches ET bars e1 and e2, NETC bar n2 touches e2 only (NETC 11 voxels apart,
  # ET 10: no dilation merges them). n1 joins the lower-numbered (first in C order) of e1, e2:
  # here e1, so n1 and n2 stay apart; mirrored along x, e2 comes first and they merge.
  layout = [(ET, 1, 2), (NETC, 3, 12), (ET, 13, 23), (NETC, 24, 26)]
  ref = _bars(*layout)
  mirrored = _bars(*[(label, 29 - stop, 29 - start) for label, start, stop in layout])
  netc = lambda v: [x.volume_mm3 for x in metrics.lesion_scores(
      v, v, (1, 1, 1), GLI24, label_set="glioma_rc")[1] if x.region == "NETC"]
  assert netc(ref) == [90.0, 27.0] and netc(mirrored) == [117.0]
  # The same case padded into a larger volume scores the same (cropping keeps the numbering).
  big = np.zeros((40, 9, 9), np.uint8)
  big[4:34, 2:7, 2:7] = mirrored
  assert netc(big) == [117.0]


def test_2024_rules_need_their_regions_in_the_label_set():
  zeros = np.zeros((4, 4, 4), np.uint8)
  with pytest.raises(ValueError, match="'gli2024' scores region.s. NETC, SNFH, RC, which the "
                                       "label set lacks"):
    metrics.lesion_scores(zeros, zeros, (1, 1, 1), GLI24)  # The glioma set.
  with pytest.raises(ValueError, match=r"'ssa2024' merges across region\(s\) NCR/NET"):
    metrics.lesion_scores(zeros, zeros, (1, 1, 1), SSA24, label_set="glioma_rc")
  with pytest.raises(ValueError, match="'ped2024' scores region.s. NET, CC, which"):
    metrics.lesion_scores(zeros, zeros, (1, 1, 1), PED24)
  scores, _ = metrics.lesion_scores(zeros, zeros, (1, 1, 1), PED24, label_set="ped")
  assert scores["lesion_dice_CC"] == 1.0 and len(scores) == 6 * 5


# --- The robust HD95 ("surface"): DeepMind's surface_distance definition. -------------------


def _brute_force_robust_hd95(pred, ref, spacing, percent=95.0):
  """Independent of metrics.py: every 2x2x2 block by explicit loops, all-pairs distances,
  and the percentile as 'the smallest distance within which `percent` of the area lies'."""
  from surface_distance import lookup_tables
  areas = lookup_tables.create_table_neighbour_code_to_surface_area(spacing)
  weights = lookup_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL

  def surfels(mask):
    padded = np.pad(mask, 1).astype(int)
    points, surfel_areas = [], []
    for i in range(padded.shape[0] - 1):
      for j in range(padded.shape[1] - 1):
        for k in range(padded.shape[2] - 1):
          code = int((padded[i:i + 2, j:j + 2, k:k + 2] * weights).sum())
          if code not in (0, 255):
            points.append((i, j, k))
            surfel_areas.append(areas[code])
    return np.asarray(points) * np.asarray(spacing), np.asarray(surfel_areas)

  (p, pa), (r, ra) = surfels(pred), surfels(ref)
  d = np.sqrt(((p[:, None, :] - r[None, :, :])**2).sum(-1))

  def directed(dist, area):
    for value in np.unique(dist):
      if area[dist <= value].sum() / area.sum() >= percent / 100 - 1e-12:
        return value

  return max(directed(d.min(1), pa), directed(d.min(0), ra))


def test_robust_hd95_hand_worked():
  pred, ref = np.zeros((8, 3, 3), bool), np.zeros((8, 3, 3), bool)
  pred[1, 1, 1] = ref[4, 1, 1] = True
  # Each voxel's 8 surrounding blocks have one corner set: equal areas. Half of them are 2
  # voxels from the other voxel's blocks, half 3: the 95% of the area is reached at 3.
  assert metrics.hd95(pred, ref, (1, 1, 1), "surface") == 3.0
  assert metrics.hd95(pred, ref, (2, 1, 1), "surface") == 6.0
  assert metrics.hd95(pred, pred, (1, 1, 1), "surface") == 0.0
  assert metrics.hd95(pred, ~np.ones_like(pred), (1, 1, 1), "surface") == metrics.HD95_EMPTY


def _blobs(seed, shape=(12, 10, 9)):
  rng = np.random.default_rng(seed)
  pred, ref = [ndimage.gaussian_filter(rng.normal(size=shape), 1.5) > 0.05 for _ in range(2)]
  assert pred.any() and ref.any()
  return pred, ref


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 0.7, 2.5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_robust_hd95_matches_brute_force(seed, spacing):
  pred, ref = _blobs(seed)  # Irregular, touching the volume border.
  expected = _brute_force_robust_hd95(pred, ref, spacing)
  assert metrics.hd95(pred, ref, spacing, "surface") == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 0.7, 2.5), (0.9, 1.2, 3.0)])
@pytest.mark.parametrize("seed", [3, 4, 5, 6])
def test_robust_hd95_equals_surface_distance_library(seed, spacing):
  import surface_distance
  pred, ref = _blobs(seed, (20, 16, 14))
  with warnings.catch_warnings():  # The library imports scipy.ndimage.filters (deprecated).
    warnings.simplefilter("ignore", DeprecationWarning)
    theirs = surface_distance.compute_robust_hausdorff(
        surface_distance.compute_surface_distances(ref, pred, spacing), 95)
  assert metrics.hd95(pred, ref, spacing, "surface") == theirs
  assert math.isfinite(theirs)
