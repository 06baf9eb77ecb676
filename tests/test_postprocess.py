"""Postprocessing rules on hand-made volumes, their choice on validation Dice, their file."""

import json
import os

import numpy as np
import pytest
from scipy import ndimage

from msatt_jax import metrics
from msatt_jax import postprocess as pp

NCR, ED, ET = 1, 2, 3


def _volume(shape=(24, 24, 24)):
  return np.zeros(shape, np.uint8)


def _tumour(volume, corner=(2, 2, 2), size=14):
  """A nested tumour: an edema cube around a NCR/NET cube (inset 3) around an ET cube (inset
  size // 2 - 2, 4 voxels wide): of size 14, 2744 WT, 512 TC and 64 ET voxels."""
  x, y, z = corner
  volume[x:x + size, y:y + size, z:z + size] = ED
  volume[x + 3:x + size - 3, y + 3:y + size - 3, z + 3:z + size - 3] = NCR
  e = size // 2 - 2
  volume[x + e:x + e + 4, y + e:y + e + 4, z + e:z + e + 4] = ET
  return volume


# ---- the rules ------------------------------------------------------------------------------


def test_small_et_is_relabelled_below_the_threshold_only():
  labels = _tumour(_volume())
  assert [np.count_nonzero(np.isin(labels, r)) for r in ((1, 2, 3), (1, 3), (3,))] == [
      2744, 512, 64]
  below = pp.relabel_small_et(labels, 65)
  assert not (below == ET).any()
  np.testing.assert_array_equal(below[labels == ET], NCR)
  np.testing.assert_array_equal(below[labels != ET], labels[labels != ET])  # TC, WT unchanged.
  np.testing.assert_array_equal(pp.relabel_small_et(labels, 64), labels)  # Not below: kept.
  np.testing.assert_array_equal(pp.relabel_small_et(labels, 0), labels)
  no_et = np.where(labels == ET, NCR, labels).astype(np.uint8)
  np.testing.assert_array_equal(pp.relabel_small_et(no_et, 1000), no_et)
  assert labels.max() == ET  # The input is not changed.


def test_small_components_are_removed_per_region_into_the_enclosing_region():
  labels = _tumour(_volume())  # WT 2..15, TC 5..12, ET 7..10 on each axis.
  labels[20:22, 20:22, 20:22] = ED  # A small WT component (8 voxels) far away ...
  labels[21, 21, 21] = ET  # ... holding an ET voxel (a TC and an ET component of 1).
  labels[2:4, 2:4, 2:4] = NCR  # A small TC component (8) in the main WT's edema.
  labels[2, 2, 2] = ET
  labels[5, 5, 5] = ET  # An ET voxel of the main TC, two voxels from the ET cube.
  before = labels.copy()

  wt = pp.remove_small_components(labels, "WT", 9)
  np.testing.assert_array_equal(wt[20:22, 20:22, 20:22], 0)  # Background, ET voxel included.
  assert np.count_nonzero(wt != labels) == 8  # The main WT is kept whole.

  tc = pp.remove_small_components(labels, "TC", 9)
  np.testing.assert_array_equal(tc[2:4, 2:4, 2:4], ED)  # Still WT: edema.
  assert tc[21, 21, 21] == ED and tc[5, 5, 5] == ET  # The latter is part of the main TC.
  assert np.count_nonzero(tc != labels) == 9

  et = pp.remove_small_components(labels, "ET", 2)
  assert et[2, 2, 2] == et[5, 5, 5] == et[21, 21, 21] == NCR  # Still TC.
  assert np.count_nonzero(et != labels) == 3
  assert np.count_nonzero(et == ET) == 64  # The ET cube is kept.
  np.testing.assert_array_equal(pp.remove_small_components(labels, "ET", 0), labels)
  np.testing.assert_array_equal(labels, before)  # Copies, the input unchanged.


def test_components_are_26_connected():
  labels = _volume((8, 8, 8))
  labels[2, 2, 2] = ET
  labels[3, 3, 3] = ET  # Touches the first at a corner only.
  _, count6 = ndimage.label(labels == ET)  # scipy's default: the 6-connected cross.
  assert count6 == 2
  # One component of 2 voxels under 26-connectivity: kept at min size 2, removed at 3.
  np.testing.assert_array_equal(pp.remove_small_components(labels, "ET", 2), labels)
  assert not (pp.remove_small_components(labels, "ET", 3) == ET).any()
  # Under 6-connectivity the same voxels would be two components of 1, both removed.
  assert not (pp.remove_small_components(labels, "ET", 2, connectivity=6) == ET).any()
  labels[4, 4, 3] = ET  # Shares an edge with (3, 3, 3): 18-connected too.
  by_edges = pp.remove_small_components(labels, "ET", 2, connectivity=18)
  assert by_edges[2, 2, 2] == NCR and by_edges[3, 3, 3] == by_edges[4, 4, 3] == ET


def test_rules_apply_components_then_the_et_threshold_and_round_trip_json():
  labels = _tumour(_volume())
  labels[20, 20, 20] = ET  # A 1-voxel WT component.
  rules = pp.Rules({"WT": 2, "TC": 0, "ET": 0}, et_min_voxels=65)
  out = rules(labels)
  assert out[20, 20, 20] == 0
  # The ET threshold counts the ET left after the component removal: 64 < 65 -> NCR/NET.
  assert not (out == ET).any() and np.count_nonzero(out == NCR) == 512
  assert pp.Rules({"WT": 2, "TC": 0, "ET": 0}, et_min_voxels=64)(labels)[8, 8, 8] == ET
  assert pp.Rules().is_identity and not rules.is_identity
  np.testing.assert_array_equal(pp.Rules()(labels), labels)
  again = pp.rules_from_json(json.loads(json.dumps(rules.to_json())))
  np.testing.assert_array_equal(again(labels), out)
  assert "WT components < 2 voxels -> background" in rules.describe()
  assert "ET -> NCR/NET when a case has < 65 ET voxels" in rules.describe()
  with pytest.raises(ValueError, match="unknown rule key"):
    pp.rules_from_json({"min_component_voxels": {"XX": 1}})
  with pytest.raises(ValueError, match="non-negative integers"):
    pp.rules_from_json({"et_min_voxels": -5})


# ---- choosing ---------------------------------------------------------------------------------


def test_the_et_rule_is_kept_when_it_raises_mean_dice():
  # Case 1: no ET in the reference, 30 stray predicted ET voxels (Dice ET 0 -> 1 relabelled).
  ref1 = _tumour(_volume())
  ref1[ref1 == ET] = NCR
  pred1 = ref1.copy()
  pred1[5:8, 5:7, 5:10] = ET  # 30 voxels, inside TC: TC and WT unchanged by the rule.
  # Case 2: a real ET of 216 voxels in eight blobs of 27, predicted exactly. Removing ET
  # components below 50 voxels would fix case 1 but cost case 2 as much; relabelling a case's
  # ET below 50 voxels costs it nothing.
  ref2 = _tumour(_volume(), size=22)
  ref2[ref2 == ET] = NCR
  for x, y, z in np.ndindex(2, 2, 2):
    ref2[6 + 5 * x:9 + 5 * x, 6 + 5 * y:9 + 5 * y, 6 + 5 * z:9 + 5 * z] = ET
  assert ndimage.label(ref2 == ET, np.ones((3, 3, 3)))[1] == 8
  rules, report = pp.choose_rules([pred1, ref2.copy()], [ref1, ref2])
  assert rules.et_min_voxels == 50  # The smallest threshold with the best Dice.
  assert rules.min_component_voxels == {"WT": 0, "TC": 0, "ET": 0}
  ties = [t for t in report["trials"] if t["rule"] == "min_component_voxels.ET"]
  assert [t["mean_dice"] for t in ties if t["value"] >= 50] == [report["dice_before"]["mean"]] * (
      len([n for n in pp.COMPONENT_SIZES if n >= 50]))
  assert report["dice_before"]["ET"] == pytest.approx(0.5)
  assert report["dice_after"]["ET"] == 1.0
  assert report["dice_after"]["mean"] > report["dice_before"]["mean"]
  assert {"rule": "et_min_voxels", "value": 50, "mean_dice": 1.0} in report["trials"]


def test_the_et_rule_is_dropped_when_it_lowers_or_ties_mean_dice():
  # A small real ET (64 voxels), predicted exactly: relabelling it would cost Dice.
  ref = _tumour(_volume())
  rules, report = pp.choose_rules([ref.copy()], [ref])
  assert rules.is_identity
  assert report["dice_after"] == report["dice_before"]
  # One case gains what the other loses: 64 stray ET voxels, and 64 real ones predicted.
  ref1 = _tumour(_volume())
  ref1[ref1 == ET] = NCR
  pred1 = _tumour(_volume())
  rules, report = pp.choose_rules([pred1, ref.copy()], [ref1, ref])
  assert rules.et_min_voxels == 0  # Every threshold above 64 ties; none gains strictly.
  tried = [t for t in report["trials"] if t["rule"] == "et_min_voxels" and t["value"] > 64]
  assert tried and all(t["mean_dice"] == report["dice_before"]["mean"] for t in tried)
  # Nothing to gain anywhere (a perfect prediction without ET): no rule.
  rules, _ = pp.choose_rules([ref1.copy()], [ref1])
  assert rules.is_identity


def test_component_removal_is_kept_only_for_false_positive_blobs():
  ref = _tumour(_volume((32, 32, 32)))
  pred = ref.copy()
  pred[26:28, 26:28, 26:28] = ED  # A false-positive blob of 8 voxels.
  rules, report = pp.choose_rules([pred], [ref])
  assert rules.min_component_voxels["WT"] == 10  # The smallest size in the grid that helps.
  assert report["dice_after"]["WT"] == 1.0 > report["dice_before"]["WT"]
  # The same blob in the reference too: removing it would cost WT Dice, so it stays.
  rules, _ = pp.choose_rules([pred], [pred.copy()])
  assert rules.is_identity


def test_crop_to_tumour_keeps_dice_and_components():
  ref = _tumour(_volume((40, 40, 40)), corner=(10, 12, 14))
  pred = ref.copy()
  pred[35, 35, 35] = ED
  small_pred, small_ref = pp.crop_to_tumour(pred, ref)
  assert small_pred.shape == small_ref.shape == (26, 24, 22)
  assert pp.case_dice(small_pred, small_ref) == pp.case_dice(pred, ref)
  rules = pp.Rules({"WT": 2, "TC": 0, "ET": 0})
  assert pp.case_dice(rules(small_pred), small_ref) == pp.case_dice(rules(pred), ref)
  empty = _volume()
  assert pp.crop_to_tumour(empty, empty)[0].shape == (1, 1, 1)


def test_each_validation_case_is_predicted_by_the_members_that_hold_it():
  # Three folds: each case by its own fold's run alone (the others trained on it).
  folds = [["a", "d"], ["b", "e"], ["c"]]
  assert pp.assign_members(folds) == {(0,): ["a", "d"], (1,): ["b", "e"], (2,): ["c"]}
  # Two seeds of one split: every case by both together.
  assert pp.assign_members([["a", "b"], ["b", "a"]]) == {(0, 1): ["a", "b"]}


# ---- the file ---------------------------------------------------------------------------------


def test_resolve_reads_auto_none_and_a_path(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  assert pp.resolve("auto", str(workdir)) == (None, None)  # No file: nothing to apply.
  record = {"rules": {"min_component_voxels": {"WT": 20, "TC": 0, "ET": 0},
                      "et_min_voxels": 100}, "tta": True, "runs": []}
  path = workdir / pp.FILE_NAME
  path.write_text(json.dumps(record))
  rules, read = pp.resolve("auto", str(workdir))
  assert rules.min_component_voxels["WT"] == 20 and rules.et_min_voxels == 100
  assert rules.source == str(path) and read == record
  assert pp.resolve("none", str(workdir)) == (None, None)
  other = tmp_path / "other.json"
  other.write_text(json.dumps({"rules": {"et_min_voxels": 7}}))
  assert pp.resolve(str(other), str(workdir))[0].et_min_voxels == 7
  with pytest.raises(FileNotFoundError, match="missing.json: --postprocess names no file"):
    pp.resolve(str(tmp_path / "missing.json"), str(workdir))
  (tmp_path / "bad.json").write_text("{")
  with pytest.raises(ValueError, match="bad.json: not a postprocessing file"):
    pp.resolve(str(tmp_path / "bad.json"), str(workdir))
  assert pp.output_suffix("auto", str(workdir)) == ""
  assert pp.output_suffix(str(path), str(workdir)) == ""
  assert pp.output_suffix("none", str(workdir)) == "_nopostprocess"
  assert pp.output_suffix(str(other), str(workdir)) == "_postprocess-other"


def test_the_record_is_written_atomically(tmp_path, monkeypatch):
  path = tmp_path / pp.FILE_NAME
  path.write_text('{"rules": {"et_min_voxels": 1}}')

  def fail(_):
    raise OSError("disk full")

  monkeypatch.setattr(os, "fsync", fail)  # The write fails after the content, before the rename.
  with pytest.raises(OSError, match="disk full"):
    pp.reporting.write_json(str(path), {"rules": {"et_min_voxels": 2}})
  assert json.loads(path.read_text()) == {"rules": {"et_min_voxels": 1}}
  assert os.listdir(tmp_path) == [pp.FILE_NAME]  # No temporary file left.


def test_lesion_objective_removes_stray_components_the_voxel_dice_keeps():
  """Case 1: a found 9-voxel metastasis that the rule would remove; case 2: four 1-voxel false
  positives. Voxel-wise the removal costs more than it gains; lesion-wise (met2023, lesions
  over 2 mm^3 counted) it gains more."""
  shape = (16, 8, 8)
  a = (slice(1, 5), slice(2, 6), slice(2, 6))  # 64 voxels.
  small = (slice(13, 16), slice(0, 3), slice(0, 1))  # 9 voxels, far from a.
  ref1 = np.zeros(shape, np.uint8)
  ref1[a] = ref1[small] = 2
  ref2 = np.zeros(shape, np.uint8)
  ref2[a] = 2
  pred2 = ref2.copy()
  for corner in ((15, 0, 7), (15, 7, 0), (15, 7, 7), (10, 7, 7)):
    pred2[corner] = 2
  preds, refs = [ref1.copy(), pred2], [ref1, ref2]
  voxel, report = pp.choose_rules(preds, refs, component_sizes=(0, 10), et_thresholds=(0,))
  assert voxel.is_identity
  # Before: case 1 perfect, case 2 WT 128/132; with the rule: 128/137 and 1 (ET, TC: 1).
  assert report["dice_before"]["mean"] == pytest.approx((1 + (2 + 128 / 132) / 3) / 2)
  assert report["trials"][0]["mean_dice"] == pytest.approx(((2 + 128 / 137) / 3 + 1) / 2)
  met = metrics.LESION_RULES["met2023"]
  lesion, report = pp.choose_rules(preds, refs, component_sizes=(0, 10), et_thresholds=(0,),
                                   objective="lesion", spacings=[(1, 1, 1)] * 2,
                                   lesion_rules=[met, met])
  assert lesion.min_component_voxels == {"WT": 10, "TC": 0, "ET": 0}
  # Lesion-wise WT: case 1 two lesions found (1), case 2 one lesion and four false positives
  # (1/5); with the rule 1/2 (the small lesion missed) and 1.
  assert report["dice_before"]["WT"] == pytest.approx((1 + 0.2) / 2)
  assert report["dice_after"]["WT"] == pytest.approx((0.5 + 1) / 2)
  assert report["dice_after"]["mean"] == pytest.approx(((2 + 0.5) / 3 + 1) / 2)
  with pytest.raises(ValueError, match="objective=lesion needs"):
    pp.choose_rules(preds, refs, objective="lesion")
  with pytest.raises(ValueError, match="--objective must be one of voxel, lesion"):
    pp.choose_rules(preds, refs, objective="hd95")


def test_validation_lesion_rules_by_case_name():
  names = pp.validation_lesion_rules(["BraTS-MET-00001-000", "BraTS-GLI-00002-001"], "auto")
  assert [r.name for r in names] == ["met2023", "gli2023"]
  assert [r.name for r in pp.validation_lesion_rules(["case1"], "ped2023")] == ["ped2023"]
  with pytest.raises(ValueError, match="case1: --objective=lesion needs a lesion rule set"):
    pp.validation_lesion_rules(["case1"], "auto")
