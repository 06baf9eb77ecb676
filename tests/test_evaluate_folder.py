"""evaluate_folder end to end on small NIfTI files, its layouts and its errors; the writers."""

import csv
import gzip
import json
import os

import nibabel as nib
import numpy as np
import pytest

from data_pipelines.brats import labels
from data_pipelines.errors import DataError
from msatt_jax import evaluate_folder as ef
from msatt_jax import metrics
from msatt_jax import reporting

import helpers

SHAPE = (6, 6, 5)
SLICES = (1, 3)  # The small volumes have 5 axial slices; 30..120 would not fit.
REAL_CASE = os.path.join(helpers.REPO, "..", "shared", "realdata", "BraTS2021_00006")


def _cases():
  """Canonical (pred, ref, spacing) per case, with hand-worked scores in the tests below."""
  ref1 = np.zeros(SHAPE, np.uint8)
  ref1[1:5, 1:5, 1:4] = 2  # Edema ...
  ref1[2:4, 2:4, 1:3] = 1  # ... around NCR/NET ...
  ref1[2:4, 2:4, 3] = 3  # ... and ET.
  pred2 = ref1.copy()
  pred2[pred2 == 3] = 1  # ET missed (called NCR/NET): TC and WT unchanged.
  ref3 = np.zeros(SHAPE, np.uint8)
  ref3[1:4, 1:4, 1] = 2  # One-slice edema slab ...
  pred3 = np.zeros(SHAPE, np.uint8)
  pred3[1:4, 1:4, 2] = 2  # ... predicted one slice higher, with 2.5 mm slices.
  return {"c1": (ref1, ref1, (1.0, 1.0, 1.0)), "c2": (pred2, ref1, (1.0, 1.0, 1.0)),
          "c3": (pred3, ref3, (1.0, 1.0, 2.5))}


def _save(path, canonical, spacing=(1.0, 1.0, 1.0), convention="brats"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  affine = np.diag(list(spacing) + [1.0])
  image = nib.Nifti1Image(labels.from_canonical(canonical, convention), affine)
  image.header.set_zooms(spacing)
  nib.save(image, path)
  return path


def _write_flat(tmp_path, convention="brats", ref_layout="flat"):
  """Predictions flat as <case>.nii.gz; references flat or as BraTS case folders (HGG/LGG)."""
  pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
  for i, (case, (pred, ref, spacing)) in enumerate(_cases().items()):
    _save(str(pred_dir / f"{case}.nii.gz"), pred, spacing, convention)
    if ref_layout == "flat":
      _save(str(ref_dir / f"{case}_seg.nii.gz"), ref, spacing, convention)
    else:
      group = "HGG" if i % 2 == 0 else "LGG"
      _save(str(ref_dir / group / case / f"{case}_seg.nii.gz"), ref, spacing, convention)
      # An image beside the segmentation must be ignored.
      _save(str(ref_dir / group / case / f"{case}_flair.nii.gz"), ref, spacing, "brats")
  return str(pred_dir), str(ref_dir)


def _check_scores(rows):
  by_case = {r["case"]: r for r in rows}
  assert list(by_case) == ["c1", "c2", "c3"]
  c1, c2, c3 = by_case["c1"], by_case["c2"], by_case["c3"]
  for region in labels.REGIONS:
    assert c1[f"dice_{region}"] == 1.0 and c1[f"hd95_{region}"] == 0.0
  assert c2["dice_ET"] == 0.0 and c2["hd95_ET"] == pytest.approx(metrics.HD95_EMPTY)
  assert c2["dice_TC"] == 1.0 and c2["dice_WT"] == 1.0 and c2["hd95_WT"] == 0.0
  # Case 3: no ET/TC on either side; 3x3 slabs one 2.5 mm slice apart, no overlap.
  assert c3["dice_ET"] == 1.0 and c3["hd95_ET"] == 0.0 and c3["dice_TC"] == 1.0
  assert c3["dice_WT"] == 0.0 and c3["hd95_WT"] == pytest.approx(2.5)
  # Slices 1..3 hold all of case 1's ET (slice 3) and case 3's slabs (slices 1 and 2).
  assert c2["slice_dice_ET"] == 0.0 and c3["slice_dice_WT"] == 0.0
  assert c1["slice_dice_TC"] == 1.0


@pytest.mark.parametrize("convention,ref_layout",
                         [("brats", "flat"), ("msd", "flat"), ("brats", "cases")])
def test_end_to_end(tmp_path, convention, ref_layout):
  pred_dir, ref_dir = _write_flat(tmp_path, convention, ref_layout)
  out = str(tmp_path / "out")
  rows, summary = ef.evaluate_folders(pred_dir, ref_dir, convention, out, slice_range=SLICES)
  _check_scores(rows)
  assert summary["num_cases"] == 3 and summary["labels"] == convention
  assert summary["metrics"]["dice_ET"]["mean"] == pytest.approx(2 / 3)
  assert summary["metrics"]["hd95_WT"]["mean"] == pytest.approx(2.5 / 3)

  with open(os.path.join(out, "per_case.csv")) as f:
    written = list(csv.DictReader(f))
  assert [r["case"] for r in written] == ["c1", "c2", "c3"]
  assert float(written[1]["hd95_ET"]) == metrics.HD95_EMPTY  # Full precision.
  assert float(written[2]["hd95_WT"]) == 2.5
  with open(os.path.join(out, "summary.json")) as f:
    saved = json.load(f)
  assert saved["metrics"]["dice_WT"]["mean"] == pytest.approx(2 / 3)
  assert sorted(os.listdir(out)) == ["per_case.csv", "summary.json"]  # No temp files left.


def test_hd95_definition_is_chosen_and_recorded(tmp_path):
  ref = np.zeros((12, 12, 6), np.uint8)
  ref[2:6, 2:6, 1:4] = 2  # An edema block ...
  pred = ref.copy()
  pred[10:12, 0:2, 2] = 2  # ... and a small far false positive: the two definitions differ.
  _save(str(tmp_path / "pred" / "c.nii.gz"), pred)
  _save(str(tmp_path / "ref" / "c_seg.nii.gz"), ref)
  scores = {}
  for mode in metrics.HD95_MODES:
    out = tmp_path / mode
    rows, summary = ef.evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "ref"),
                                        out_dir=str(out), slice_range=None, hd95_mode=mode)
    scores[mode] = rows[0]["hd95_WT"]
    assert scores[mode] == metrics.hd95(pred > 0, ref > 0, mode=mode)
    with open(out / "summary.json") as f:
      saved = json.load(f)
    assert saved["hd95_mode"] == mode and saved["hd95"] == metrics.HD95_DEFINITIONS[mode]
  assert scores["official"] == 0.0 and scores["max"] > 5.0
  with pytest.raises(DataError, match="Unknown --hd95 'mean'"):
    ef.evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "ref"), hd95_mode="mean")


def test_wrong_convention_is_a_clear_error(tmp_path):
  pred_dir, ref_dir = _write_flat(tmp_path, "msd")  # MSD's ET is 3: not a BraTS label.
  with pytest.raises(DataError, match=r"label values \[3\].*--labels"):
    ef.evaluate_folders(pred_dir, ref_dir, "brats", slice_range=SLICES)


def test_reference_as_one_case_folder(tmp_path):
  pred, ref, spacing = _cases()["c2"]
  _save(str(tmp_path / "pred" / "BraTS_X.nii.gz"), pred, spacing)
  _save(str(tmp_path / "BraTS_X" / "BraTS_X_seg.nii.gz"), ref, spacing)
  _save(str(tmp_path / "BraTS_X" / "BraTS_X_t1.nii.gz"), ref, spacing)
  rows, _ = ef.evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "BraTS_X"),
                                slice_range=None)
  assert [r["case"] for r in rows] == ["BraTS_X"]
  assert rows[0]["dice_ET"] == 0.0 and rows[0]["dice_WT"] == 1.0
  assert "slice_dice_WT" not in rows[0]


def test_missing_and_extra_predictions(tmp_path):
  pred_dir, ref_dir = _write_flat(tmp_path)
  os.remove(os.path.join(pred_dir, "c2.nii.gz"))
  _save(os.path.join(pred_dir, "c9.nii.gz"), _cases()["c1"][0])
  with pytest.raises(DataError, match=r"1 reference case\(s\) have no prediction.*c2.*"
                     r"--allow_missing"):
    ef.evaluate_folders(pred_dir, ref_dir, slice_range=SLICES)
  rows, summary = ef.evaluate_folders(pred_dir, ref_dir, allow_missing=True, slice_range=SLICES)
  assert [r["case"] for r in rows] == ["c1", "c3"]
  assert summary["missing_predictions"] == ["c2"]
  assert summary["extra_predictions"] == ["c9"]


def test_shape_mismatch_names_both_files(tmp_path):
  pred_dir, ref_dir = _write_flat(tmp_path)
  bad = _save(os.path.join(pred_dir, "c1.nii.gz"), np.zeros((6, 6, 4), np.uint8))
  with pytest.raises(DataError) as info:
    ef.evaluate_folders(pred_dir, ref_dir, slice_range=SLICES)
  message = str(info.value)
  assert "Shape mismatch" in message and bad in message
  assert os.path.join(ref_dir, "c1_seg.nii.gz") in message
  assert "(6, 6, 4)" in message and "(6, 6, 5)" in message


def test_spacing_mismatch(tmp_path):
  pred_dir, ref_dir = _write_flat(tmp_path)
  _save(os.path.join(pred_dir, "c3.nii.gz"), _cases()["c3"][0], (1.0, 1.0, 1.0))
  with pytest.raises(DataError, match=r"spacing mismatch.*c3\.nii\.gz.*2\.5"):
    ef.evaluate_folders(pred_dir, ref_dir, slice_range=SLICES)


def test_unreadable_files_are_named(tmp_path):
  pred_dir, ref_dir = _write_flat(tmp_path)
  truncated = os.path.join(pred_dir, "c1.nii.gz")
  with open(truncated, "rb") as f:
    data = f.read()
  with open(truncated, "wb") as f:
    f.write(data[:len(data) // 2])
  garbage = os.path.join(pred_dir, "c2.nii.gz")
  with gzip.open(garbage, "wb") as f:
    f.write(b"not a nifti header" * 20)
  with pytest.raises(DataError) as info:
    ef.evaluate_folders(pred_dir, ref_dir, slice_range=SLICES)
  message = str(info.value)
  assert "2 case(s) could not be scored" in message  # Every problem, not only the first.
  assert f"{truncated}: cannot read as NIfTI" in message
  assert f"{garbage}: cannot read as NIfTI" in message


def test_duplicate_case_and_empty_folder(tmp_path):
  pred_dir, ref_dir = _write_flat(tmp_path)
  _save(os.path.join(pred_dir, "c1_seg.nii.gz"), _cases()["c1"][0])
  with pytest.raises(DataError, match="Two prediction files for case 'c1'"):
    ef.evaluate_folders(pred_dir, ref_dir, slice_range=SLICES)
  os.makedirs(tmp_path / "empty")
  with pytest.raises(DataError, match="No segmentation files found"):
    ef.evaluate_folders(str(tmp_path / "empty"), ref_dir)
  with pytest.raises(DataError, match="does not exist"):
    ef.evaluate_folders(str(tmp_path / "nowhere"), ref_dir)


def test_unwritable_output_fails_before_work(tmp_path):
  pred_dir, ref_dir = _write_flat(tmp_path)
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(DataError, match="not writable"):
    ef.evaluate_folders(pred_dir, ref_dir, out_dir=str(blocker / "out"), slice_range=SLICES)


def _cli(*args):
  return helpers.run_module("msatt_jax.evaluate_folder", *args)


def test_cli_success_and_failure(tmp_path):
  pred_dir, ref_dir = _write_flat(tmp_path, "msd", "cases")
  out = str(tmp_path / "out")
  ok = _cli(f"--pred={pred_dir}", f"--ref={ref_dir}", "--labels=msd", f"--out={out}",
            "--slice_start=1", "--slice_stop=3")
  assert ok.returncode == 0, ok.stderr
  assert "c3" in ok.stdout and "373.1287" in ok.stdout and "mean" in ok.stdout
  assert "sensitivity_WT" in ok.stdout and "specificity_ET" in ok.stdout
  assert f"HD95 (official): {metrics.HD95_DEFINITIONS['official']}" in ok.stdout
  assert os.path.exists(os.path.join(out, "summary.json"))
  ok = _cli(f"--pred={pred_dir}", f"--ref={ref_dir}", "--labels=msd", f"--out={out}",
            "--slice_start=1", "--slice_stop=3", "--hd95=max")
  assert ok.returncode == 0 and "HD95 (max): " in ok.stdout, ok.stderr
  with open(os.path.join(out, "summary.json")) as f:
    assert json.load(f)["hd95_mode"] == "max"
  os.remove(os.path.join(pred_dir, "c2.nii.gz"))
  bad = _cli(f"--pred={pred_dir}", f"--ref={ref_dir}", "--labels=msd", f"--out={out}")
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  (error,) = helpers.error_lines(bad.stderr)
  assert "c2" in error and "--allow_missing" in error


@pytest.mark.skipif(not os.path.isdir(REAL_CASE), reason="real BraTS case not present")
def test_real_brats_case(tmp_path):
  ref_path = os.path.join(REAL_CASE, "BraTS2021_00006_seg.nii.gz")
  image = nib.load(ref_path)
  raw = np.asanyarray(image.dataobj)
  pred = raw.copy()
  pred[pred == 4] = 1  # ET called NCR/NET: ET lost, TC and WT intact.
  nib.save(nib.Nifti1Image(pred, image.affine, image.header),
           str(tmp_path / "BraTS2021_00006.nii.gz"))
  # The reference is the folder holding the case folder (the BraTS training layout).
  rows, summary = ef.evaluate_folders(str(tmp_path), os.path.dirname(REAL_CASE),
                                      out_dir=str(tmp_path / "out"))
  (row,) = rows
  assert row["dice_ET"] == 0.0 and row["hd95_ET"] == metrics.HD95_EMPTY
  assert row["dice_TC"] == 1.0 and row["dice_WT"] == 1.0
  assert row["hd95_TC"] == 0.0 and row["hd95_WT"] == 0.0
  assert row["slice_dice_WT"] == 1.0 and summary["slice_range"] == [30, 120]


def test_reporting_writers(tmp_path):
  path = str(tmp_path / "sub" / "s.json")
  reporting.write_json(path, {"a": np.float32(0.5), "b": float("nan"), "c": np.arange(2)})
  with open(path) as f:
    assert json.load(f) == {"a": 0.5, "b": None, "c": [0, 1]}
  csv_path = str(tmp_path / "rows.csv")
  reporting.write_csv(csv_path, [{"case": "x", "v": 0.1}, {"case": "y", "w": 2}])
  with open(csv_path) as f:
    assert f.read() == "case,v,w\nx,0.1,\ny,,2\n"
  table = reporting.format_table([{"case": "x", "v": 0.12345}]).splitlines()
  assert table[0].split() == ["case", "v"] and table[2].split() == ["x", "0.1235"]
  assert sorted(os.listdir(tmp_path)) == ["rows.csv", "sub"]


# --- BraTS 2023 names and lesion-wise scores. ------------------------------------------------

A23 = (slice(1, 5), slice(2, 6), slice(2, 6))  # 4x4x4 = 64 voxels.
B23 = (slice(8, 12), slice(2, 6), slice(2, 6))  # 4 voxels from A23: merged at d=3, not d=1.
FAR23 = (slice(14, 16), slice(0, 2), slice(0, 2))  # 8 voxels, far from both.


def _blocks(*boxes, label):
  out = np.zeros((16, 8, 8), np.uint8)
  for box in boxes:
    out[box] = label
  return out


def _write_2023(tmp_path):
  """2023-named cases: references as case folders (<case>-seg.nii.gz beside four images),
  predictions flat (<case>.nii.gz); labels stored with ET = 3."""
  cases = {  # (pred, ref), canonical.
      "BraTS-GLI-00001-000": (_blocks(A23, label=3), _blocks(A23, B23, label=3)),
      "BraTS-GLI-00002-000": (_blocks(A23, FAR23, label=2), _blocks(A23, label=2)),
      "BraTS-MET-00003-000": (_blocks(A23, label=3), _blocks(A23, B23, label=3)),
  }
  for case, (pred, ref) in cases.items():
    _save(str(tmp_path / "pred" / f"{case}.nii.gz"), pred, convention="brats2023")
    _save(str(tmp_path / "ref" / case / f"{case}-seg.nii.gz"), ref, convention="brats2023")
    for modality in ("t1c", "t1n", "t2w", "t2f"):  # Images are never taken for labels.
      image = nib.Nifti1Image(np.full((16, 8, 8), 7.5, np.float32), np.eye(4))
      nib.save(image, str(tmp_path / "ref" / case / f"{case}-{modality}.nii.gz"))
  return str(tmp_path / "pred"), str(tmp_path / "ref")


def _read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_2023_folder_lesion_wise_cli(tmp_path):
  pred_dir, ref_dir = _write_2023(tmp_path)
  out = tmp_path / "out"
  ok = _cli(f"--pred={pred_dir}", f"--ref={ref_dir}", "--lesion_rules=gli2023", f"--out={out}",
            "--noslice_dice")
  assert ok.returncode == 0, ok.stderr
  assert "lesion_dice_WT" in ok.stdout and "Lesion rules gli2023: BraTS 2023 GLI" in ok.stdout
  rows = {r["case"]: r for r in _read_csv(out / "per_case.csv")}
  assert list(rows) == ["BraTS-GLI-00001-000", "BraTS-GLI-00002-000", "BraTS-MET-00003-000"]
  for region in ("WT", "TC", "ET"):
    for key in ("lesion_dice", "lesion_hd95", "lesions_tp", "lesions_fn", "lesions_fp"):
      assert f"{key}_{region}" in rows["BraTS-GLI-00001-000"]
  first, second, met = rows.values()
  # Case 1: ET 3 read as ET; A and B one lesion at d=3, A found: Dice 2*64/(64+128).
  assert first["lesion_rules"] == "gli2023" and float(first["dice_ET"]) == pytest.approx(2 / 3)
  assert float(first["lesion_dice_ET"]) == pytest.approx(2 / 3)
  assert (first["lesions_tp_ET"], first["lesions_fn_ET"], first["lesions_fp_ET"]) == \
      ("1", "0", "0")
  # Case 2: edema found plus an 8-voxel stray blob: (1 + 0) / 2 and (0 + 374) / 2.
  assert float(second["lesion_dice_WT"]) == 0.5 and float(second["lesion_hd95_WT"]) == 187.0
  assert second["lesions_fp_WT"] == "1" and float(second["lesion_dice_ET"]) == 1.0
  assert float(second["dice_WT"]) == pytest.approx(128 / 136)  # Voxel-wise barely notices.
  # The MET case under the rules asked for (gli2023), not its own.
  assert met["lesion_rules"] == "gli2023"
  assert float(met["lesion_dice_ET"]) == pytest.approx(2 / 3)
  lesions = _read_csv(out / "lesions.csv")
  assert list(lesions[0]) == list(ef.LESION_COLUMNS)
  fp = [x for x in lesions if x["status"] == "false_positive"]
  assert [(x["case"], x["region"], x["volume_mm3"], x["dice"], x["hd95"]) for x in fp] == [
      ("BraTS-GLI-00002-000", "WT", "8.0", "0.0", "374.0")]
  assert len(lesions) == 2 * 3 + 2  # Cases 1 and 3: one lesion per region; case 2: WT, two.
  with open(out / "summary.json") as f:
    saved = json.load(f)
  assert saved["lesion_rules"]["requested"] == "gli2023"
  assert set(saved["lesion_rules"]["cases"].values()) == {"gli2023"}
  assert saved["metrics"]["lesion_dice_WT"]["mean"] == pytest.approx((2 / 3 + 0.5 + 2 / 3) / 3)
  assert sorted(os.listdir(out)) == ["lesions.csv", "lesions.md", "per_case.csv", "summary.json"]


def test_2023_auto_rules_and_missed_lesions_report(tmp_path):
  pred_dir, ref_dir = _write_2023(tmp_path)
  out = tmp_path / "out"
  rows, summary = ef.evaluate_folders(pred_dir, ref_dir, out_dir=str(out), slice_range=None)
  by_case = {r["case"]: r for r in rows}
  assert summary["lesion_rules"]["cases"] == {"BraTS-GLI-00001-000": "gli2023",
                                              "BraTS-GLI-00002-000": "gli2023",
                                              "BraTS-MET-00003-000": "met2023"}
  # met2023 (d=1): A and B are two lesions, B missed: (1 + 0) / 2, (0 + 374) / 2.
  met = by_case["BraTS-MET-00003-000"]
  assert met["lesion_dice_ET"] == 0.5 and met["lesion_hd95_ET"] == 187.0
  assert met["lesions_fn_ET"] == 1
  report = (out / "lesions.md").read_text()
  assert "- BraTS-MET-00003-000 (met2023): WT lesion 2 (64 mm^3); TC lesion 2 (64 mm^3); " \
         "ET lesion 2 (64 mm^3)" in report
  assert "- BraTS-GLI-00002-000 (gli2023): none missed" in report
  # Off: no lesion columns, and the earlier lesion files go.
  rows, _ = ef.evaluate_folders(pred_dir, ref_dir, out_dir=str(out), slice_range=None,
                                lesion_rules="off")
  assert not any(k.startswith("lesion") for k in rows[0])
  assert sorted(os.listdir(out)) == ["per_case.csv", "summary.json"]


def test_auto_lesion_rules_follow_the_label_set():
  # 2024 rule sets for files of a 2024 label set (their conventions say the year), else 2023.
  name = lambda case, label_set: getattr(ef.case_lesion_rules(case, "auto", label_set), "name",
                                         None)
  assert name("BraTS-GLI-00001-000", "glioma") == "gli2023"
  assert name("BraTS-GLI-00001-000", "glioma_rc") == "gli2024"
  assert name("BraTS-PED-00001-000", "ped") == "ped2024"
  assert name("BraTS-MET-00001-000", "glioma") == "met2023"
  assert name("BraTS2021_00000", "glioma") is None
  assert ef.case_lesion_rules("BraTS-MET-00001-000", "met2024").name == "met2024"


def test_old_names_get_no_lesion_rules_by_default(tmp_path):
  pred_dir, ref_dir = _write_flat(tmp_path)
  rows, summary = ef.evaluate_folders(pred_dir, ref_dir, out_dir=None, slice_range=SLICES)
  assert "lesion_rules" not in rows[0] and summary["lesion_rules"]["cases"] == {}
  rows, _ = ef.evaluate_folders(pred_dir, ref_dir, out_dir=None, slice_range=SLICES,
                                lesion_rules="men2023")
  assert rows[0]["lesion_rules"] == "men2023" and rows[0]["lesion_dice_WT"] == 1.0


def test_2023_bad_input(tmp_path, monkeypatch):
  pred_dir, ref_dir = _write_2023(tmp_path)
  out = tmp_path / "out"
  bad = _cli(f"--pred={pred_dir}", f"--ref={ref_dir}", "--lesion_rules=gli2030", f"--out={out}")
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  (error,) = helpers.error_lines(bad.stderr)
  assert "--lesion_rules=gli2030: unknown rule set" in error and "met2023" in error
  assert not out.exists()
  # A rule set whose regions the label set lacks: named with the case and the flag.
  rc = metrics.dataclasses.replace(metrics.LESION_RULES["gli2023"], regions=("WT", "RC"))
  monkeypatch.setitem(metrics.LESION_RULES, "gli2023", rc)
  with pytest.raises(DataError, match=r"BraTS-GLI-00001-000: --lesion_rules=gli2023: .*RC"):
    ef.evaluate_folders(pred_dir, ref_dir, out_dir=str(out), slice_range=None)
  monkeypatch.undo()
  assert not out.exists() or os.listdir(out) == []
  # Shape mismatch: named with the case; nothing written.
  _save(os.path.join(pred_dir, "BraTS-MET-00003-000.nii.gz"), np.zeros((16, 8, 7), np.uint8),
        convention="brats2023")
  bad = _cli(f"--pred={pred_dir}", f"--ref={ref_dir}", "--lesion_rules=gli2023", f"--out={out}")
  assert bad.returncode == 1
  assert "BraTS-MET-00003-000: Shape mismatch" in bad.stderr
  assert not out.exists() or os.listdir(out) == []
