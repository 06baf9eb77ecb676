"""Readers of the MSD and BraTS layouts: discovery, label mapping and every kind of bad input."""

import gzip
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_pipelines import synthetic
from data_pipelines.brats import labels as labels_lib
from data_pipelines.brats import layouts
from data_pipelines.errors import DataError


def _save(data, path, affine=None):
  nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))


def _brats_case_dir(root: Path, case_id: str) -> Path:
  return next(root.glob(f"*/{case_id}"))


# ---- discovery and label mapping ----------------------------------------------------------


@pytest.mark.parametrize("layout", ["msd", "brats"])
def test_labels_and_images_match_what_the_generator_put_in(layout, request, synthetic_shape):
  root = request.getfixturevalue(f"synthetic_{layout}")
  assert layouts.detect_layout(root) == layout
  refs = layouts.find_cases(root)
  assert [r.case_id for r in refs] == synthetic.case_ids(layout, 4)
  for index, ref in enumerate(refs):
    case = layouts.load_case(ref)
    truth = synthetic.make_case(synthetic_shape, seed=0, index=index)
    assert case.image.shape == synthetic_shape + (4,) and case.image.dtype == np.float32
    assert case.label.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(case.label.ravel(), minlength=4),
                                  np.bincount(truth.label.ravel(), minlength=4))
    np.testing.assert_array_equal(case.label, truth.label)
    for channel, name in enumerate(layouts.MODALITIES):
      np.testing.assert_array_equal(case.image[..., channel], truth.images[name])
    assert case.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(case.affine, synthetic.lps_affine(synthetic_shape))
    assert case.header.get_data_shape() == synthetic_shape


def test_msd_raw_labels_really_differ_from_canonical(synthetic_msd):
  # Raw MSD 1 (edema) must land on canonical 2, raw 2 (non-enhancing) on canonical 1.
  ref = layouts.find_cases(synthetic_msd)[0]
  raw = np.asanyarray(nib.load(ref.label_path).dataobj)
  case = layouts.load_case(ref)
  assert np.count_nonzero(raw == 1) == np.count_nonzero(case.label == labels_lib.EDEMA) > 0
  assert np.count_nonzero(raw == 2) == np.count_nonzero(case.label == labels_lib.NCR_NET) > 0
  assert np.count_nonzero(raw == 1) != np.count_nonzero(raw == 2)


def test_msd_refs_point_at_channels_of_one_file(synthetic_msd):
  ref = layouts.find_cases(synthetic_msd)[0]
  assert ref.layout == "msd"
  assert ref.channel == {"flair": 0, "t1": 1, "t1ce": 2, "t2": 3}
  assert len(set(ref.image_paths.values())) == 1


def test_brats_cases_found_under_hgg_and_lgg(synthetic_brats):
  refs = layouts.find_cases(synthetic_brats)
  groups = {Path(r.label_path).parent.parent.name for r in refs}
  assert groups == {"HGG", "LGG"}
  assert all(r.channel == {} and set(r.image_paths) == set(layouts.MODALITIES) for r in refs)


def test_modality_subset_and_order(synthetic_brats, synthetic_msd):
  for root in (synthetic_brats, synthetic_msd):
    ref = layouts.find_cases(root)[0]
    full = layouts.load_case(ref)
    sub = layouts.load_case(ref, modalities=("t2", "flair"))
    assert sub.modalities == ("t2", "flair")
    np.testing.assert_array_equal(sub.image[..., 0], full.image[..., 3])
    np.testing.assert_array_equal(sub.image[..., 1], full.image[..., 0])


def test_msd_channel_order_follows_dataset_json(make_synthetic):
  root = make_synthetic("msd", 1)
  ref = layouts.find_cases(root)[0]
  original = layouts.load_case(ref)
  meta = json.loads((root / "dataset.json").read_text())
  meta["modality"] = {"0": "T2w", "1": "t1gd", "2": "T1w", "3": "FLAIR"}
  (root / "dataset.json").write_text(json.dumps(meta))
  reordered = layouts.load_case(layouts.find_cases(root)[0], modalities=("flair",))
  # 'flair' is now channel 3 of the file, which holds the original T2.
  np.testing.assert_array_equal(reordered.image[..., 0], original.image[..., 3])


def test_msd_hidden_resource_forks_are_skipped(make_synthetic):
  root = make_synthetic("msd", 2)
  (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 resource fork")
  (root / "labelsTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 resource fork")
  refs = layouts.find_cases(root)
  assert [r.case_id for r in refs] == ["BRATS_001", "BRATS_002"]
  layouts.load_case(refs[0])


def test_msd_without_dataset_json_uses_decathlon_order(make_synthetic):
  root = make_synthetic("msd", 2)
  os.remove(root / "dataset.json")
  assert layouts.detect_layout(root) == "msd"
  refs = layouts.find_cases(root)
  assert refs[0].channel == {"flair": 0, "t1": 1, "t1ce": 2, "t2": 3}
  assert refs[0].label_path.endswith("labelsTr/BRATS_001.nii.gz")


# ---- dataset.json that does not match the files --------------------------------------------


def test_listed_image_missing(make_synthetic):
  root = make_synthetic("msd", 2)
  os.remove(root / "imagesTr" / "BRATS_002.nii.gz")
  with pytest.raises(DataError, match=r"BRATS_002\.nii\.gz.*missing"):
    layouts.find_cases(root)


def test_listed_label_missing(make_synthetic):
  root = make_synthetic("msd", 2)
  os.remove(root / "labelsTr" / "BRATS_001.nii.gz")
  with pytest.raises(DataError, match=r"labelsTr/BRATS_001\.nii\.gz.*missing"):
    layouts.find_cases(root)


def test_unlisted_image(make_synthetic):
  root = make_synthetic("msd", 2)
  shutil.copy(root / "imagesTr" / "BRATS_001.nii.gz", root / "imagesTr" / "BRATS_999.nii.gz")
  with pytest.raises(DataError, match=r"BRATS_999\.nii\.gz.*not listed"):
    layouts.find_cases(root)


@pytest.mark.parametrize("change, message", [
    ({"numTraining": 7}, "numTraining is 7"),
    ({"modality": {"0": "FLAIR", "1": "T1w", "2": "DWI", "3": "T2w"}},
     "unknown modality name 'DWI'"),
    ({"modality": {"0": "FLAIR", "1": "FLAIR"}}, "listed twice"),
])
def test_inconsistent_dataset_json(make_synthetic, change, message):
  root = make_synthetic("msd", 2)
  meta = json.loads((root / "dataset.json").read_text())
  meta.update(change)
  (root / "dataset.json").write_text(json.dumps(meta))
  with pytest.raises(DataError, match=message) as info:
    layouts.find_cases(root)
  assert "dataset.json" in str(info.value)


def test_dataset_json_not_json(make_synthetic):
  root = make_synthetic("msd", 1)
  (root / "dataset.json").write_text("{ not json")
  with pytest.raises(DataError, match="dataset.json"):
    layouts.find_cases(root)


def test_channel_count_differs_from_dataset_json(make_synthetic):
  root = make_synthetic("msd", 1)
  path = root / "imagesTr" / "BRATS_001.nii.gz"
  data = np.asanyarray(nib.load(path).dataobj)[..., :3]
  _save(data, path)
  with pytest.raises(DataError, match=r"BRATS_001\.nii\.gz: 3 channels"):
    layouts.load_case(layouts.find_cases(root)[0])


# ---- broken files ---------------------------------------------------------------------------


def test_missing_modality_names_the_case(make_synthetic):
  root = make_synthetic("brats", 1)
  case_dir = _brats_case_dir(root, "Brats18_SYN_0001_1")
  os.remove(case_dir / "Brats18_SYN_0001_1_t1ce.nii.gz")
  ref = layouts.find_cases(root)[0]
  with pytest.raises(DataError, match=r"Brats18_SYN_0001_1.*missing modality t1ce"):
    layouts.load_case(ref)
  # Without T1gd requested the case still loads.
  case = layouts.load_case(ref, modalities=("flair", "t2"))
  assert case.image.shape[-1] == 2
  assert layouts.check_label_convention(case) is None


def test_modalities_of_different_shapes(make_synthetic):
  root = make_synthetic("brats", 1)
  path = _brats_case_dir(root, "Brats18_SYN_0001_1") / "Brats18_SYN_0001_1_t1.nii.gz"
  _save(np.ones((48, 48, 39), np.int16), path)
  with pytest.raises(DataError, match=r"_t1\.nii\.gz: shape \(48, 48, 39\) of t1 differs"):
    layouts.load_case(layouts.find_cases(root)[0])


def test_label_of_different_shape(make_synthetic):
  root = make_synthetic("brats", 1)
  path = _brats_case_dir(root, "Brats18_SYN_0001_1") / "Brats18_SYN_0001_1_seg.nii.gz"
  _save(np.zeros((40, 48, 40), np.uint8), path)
  with pytest.raises(DataError, match=r"_seg\.nii\.gz: label shape"):
    layouts.load_case(layouts.find_cases(root)[0])


def test_truncated_gzip(make_synthetic):
  root = make_synthetic("brats", 1)
  path = _brats_case_dir(root, "Brats18_SYN_0001_1") / "Brats18_SYN_0001_1_flair.nii.gz"
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(DataError, match=r"_flair\.nii\.gz: cannot read as NIfTI"):
    layouts.load_case(layouts.find_cases(root)[0])


def test_truncated_uncompressed_nifti(make_synthetic):
  root = make_synthetic("brats", 1)
  case_dir = _brats_case_dir(root, "Brats18_SYN_0001_1")
  gz = case_dir / "Brats18_SYN_0001_1_t2.nii.gz"
  raw = gzip.decompress(gz.read_bytes())
  os.remove(gz)
  (case_dir / "Brats18_SYN_0001_1_t2.nii").write_bytes(raw[:len(raw) - 1000])
  with pytest.raises(DataError, match=r"_t2\.nii: cannot read as NIfTI"):
    layouts.load_case(layouts.find_cases(root)[0])


@pytest.mark.parametrize("content", [b"this is not a NIfTI file\n" * 20, b""])
def test_not_nifti(make_synthetic, content):
  root = make_synthetic("brats", 1)
  path = _brats_case_dir(root, "Brats18_SYN_0001_1") / "Brats18_SYN_0001_1_t1.nii.gz"
  path.write_bytes(gzip.compress(content))
  with pytest.raises(DataError, match=r"_t1\.nii\.gz: cannot read as NIfTI"):
    layouts.load_case(layouts.find_cases(root)[0])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_voxels(make_synthetic, bad):
  root = make_synthetic("brats", 1)
  path = _brats_case_dir(root, "Brats18_SYN_0001_1") / "Brats18_SYN_0001_1_flair.nii.gz"
  data = np.asanyarray(nib.load(path).dataobj).astype(np.float32)
  data[10, 10, 10] = bad
  _save(data, path)
  with pytest.raises(DataError, match=r"_flair\.nii\.gz: 1 NaN or Inf voxels"):
    layouts.load_case(layouts.find_cases(root)[0])


def test_nan_in_msd_image(make_synthetic):
  root = make_synthetic("msd", 1)
  path = root / "imagesTr" / "BRATS_001.nii.gz"
  data = np.asanyarray(nib.load(path).dataobj).astype(np.float32)
  data[5, 5, 5, 1] = np.nan
  _save(data, path)
  with pytest.raises(DataError, match=r"BRATS_001\.nii\.gz: 1 NaN"):
    layouts.load_case(layouts.find_cases(root)[0])


@pytest.mark.parametrize("layout, value", [("brats", 3), ("msd", 4)])
def test_unknown_label_values(make_synthetic, layout, value):
  root = make_synthetic(layout, 1)
  ref = layouts.find_cases(root)[0]
  data = np.asanyarray(nib.load(ref.label_path).dataobj).copy()
  data[0, 0, 0] = value
  _save(data, ref.label_path)
  with pytest.raises(DataError, match=rf"{Path(ref.label_path).name}: label values \[{value}\]"):
    layouts.load_case(ref)


def test_wrong_convention_is_caught(synthetic_msd):
  # Decathlon files read with the challenge convention: raw 3 is not a BraTS label.
  ref = layouts.find_cases(synthetic_msd)[0]
  with pytest.raises(DataError, match="not in the 'brats' convention"):
    layouts.load_case(ref, label_convention="brats")


def test_both_nii_and_nii_gz_is_ambiguous(make_synthetic):
  root = make_synthetic("brats", 1)
  case_dir = _brats_case_dir(root, "Brats18_SYN_0001_1")
  shutil.copy(case_dir / "Brats18_SYN_0001_1_t1.nii.gz", case_dir / "Brats18_SYN_0001_1_t1.nii")
  with pytest.raises(DataError, match="keep one of them"):
    layouts.find_cases(root)


# ---- folders --------------------------------------------------------------------------------


def test_empty_folder(tmp_path):
  with pytest.raises(DataError, match=str(tmp_path)):
    layouts.find_cases(tmp_path)


def test_wrong_folder(tmp_path):
  (tmp_path / "notes.txt").write_text("hello")
  (tmp_path / "case1").mkdir()
  (tmp_path / "case1" / "scan.nii.gz").write_bytes(b"x")
  with pytest.raises(DataError, match="neither an MSD folder"):
    layouts.detect_layout(tmp_path)
  with pytest.raises(DataError, match="does not exist"):
    layouts.find_cases(tmp_path / "absent")
  with pytest.raises(DataError, match="is not a folder"):
    layouts.find_cases(tmp_path / "notes.txt")


def test_msd_folder_without_images(tmp_path):
  (tmp_path / "imagesTr").mkdir()
  with pytest.raises(DataError, match="no MSD images"):
    layouts.find_cases(tmp_path)


# ---- one new scan and the label sanity check ------------------------------------------------


def test_case_ref_from_brats_folder_without_seg(make_synthetic, synthetic_shape):
  root = make_synthetic("brats", 1)
  case_dir = _brats_case_dir(root, "Brats18_SYN_0001_1")
  os.remove(case_dir / "Brats18_SYN_0001_1_seg.nii.gz")
  ref = layouts.case_ref_from_path(case_dir)
  assert ref.case_id == "Brats18_SYN_0001_1" and ref.label_path is None
  case = layouts.load_case(ref)
  assert case.label is None and case.image.shape == synthetic_shape + (4,)


def test_case_ref_from_msd_file(synthetic_msd):
  path = synthetic_msd / "imagesTr" / "BRATS_002.nii.gz"
  ref = layouts.case_ref_from_path(path)
  assert (ref.case_id, ref.layout, ref.label_path) == ("BRATS_002", "msd", None)
  np.testing.assert_array_equal(layouts.load_case(ref).image,
                                layouts.load_case(layouts.find_cases(synthetic_msd)[1]).image)


def test_case_ref_from_loose_msd_file_uses_decathlon_order(synthetic_msd, tmp_path):
  path = tmp_path / "scan.nii.gz"
  shutil.copy(synthetic_msd / "imagesTr" / "BRATS_001.nii.gz", path)
  ref = layouts.case_ref_from_path(path)
  assert ref.case_id == "scan" and ref.channel == {"flair": 0, "t1": 1, "t1ce": 2, "t2": 3}


def test_case_ref_from_bad_paths(tmp_path):
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(DataError, match="notes.txt"):
    layouts.case_ref_from_path(tmp_path / "notes.txt")
  with pytest.raises(DataError, match="does not exist"):
    layouts.case_ref_from_path(tmp_path / "absent.nii.gz")
  with pytest.raises(DataError, match="no .*flair"):
    layouts.case_ref_from_path(tmp_path)


def test_label_convention_check(synthetic_brats):
  refs = layouts.find_cases(synthetic_brats)
  case = layouts.load_case(refs[0])
  assert layouts.check_label_convention(case) is None
  # Swapping ET and NCR/NET (the classic convention mistake) is reported by case id.
  swapped = case.label.copy()
  swapped[case.label == labels_lib.ENHANCING] = labels_lib.NCR_NET
  swapped[case.label == labels_lib.NCR_NET] = labels_lib.ENHANCING
  case.label = swapped
  warning = layouts.check_label_convention(case)
  assert warning is not None and case.case_id in warning and "swapped" in warning
  # A case without ET (index 2) cannot be checked.
  assert layouts.check_label_convention(layouts.load_case(refs[2])) is None
