"""The synthetic BraTS-like generator: determinism, MR signatures, placement, files and CLI."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from data_pipelines import synthetic
from data_pipelines.brats import labels as labels_lib
from data_pipelines.brats import layouts
from data_pipelines.errors import DataError

import helpers

# Half the real size in each direction: realistic proportions, still fast.
SHAPE = (120, 120, 78)


@pytest.fixture(scope="module")
def cases():
  return [synthetic.make_case(SHAPE, seed=0, index=i) for i in range(5)]


def test_deterministic_for_a_seed():
  a = synthetic.make_case((40, 40, 32), seed=3, index=1)
  b = synthetic.make_case((40, 40, 32), seed=3, index=1)
  c = synthetic.make_case((40, 40, 32), seed=4, index=1)
  np.testing.assert_array_equal(a.label, b.label)
  for name in layouts.MODALITIES:
    np.testing.assert_array_equal(a.images[name], b.images[name])
  assert not np.array_equal(a.images["flair"], c.images["flair"])


def test_same_seed_writes_the_same_voxels(tmp_path):
  for out in ("a", "b"):
    synthetic.generate_dataset(tmp_path / out, "msd", 2, (32, 32, 24), seed=7)
  for sub in ("imagesTr/BRATS_002.nii.gz", "labelsTr/BRATS_002.nii.gz"):
    a, b = (np.asanyarray(nib.load(tmp_path / out / sub).dataobj) for out in ("a", "b"))
    np.testing.assert_array_equal(a, b)


def test_volumes_look_like_skull_stripped_brats(cases):
  for case in cases:
    brain = case.images["flair"] != 0
    assert 0.15 < brain.mean() < 0.5
    for name in layouts.MODALITIES:
      volume = case.images[name]
      assert volume.dtype == np.int16 and volume.shape == SHAPE
      # Outside the brain exactly 0, inside never 0 (0 means background downstream).
      assert np.array_equal(volume != 0, brain)
    assert case.label.dtype == np.uint8 and set(np.unique(case.label)) <= {0, 1, 2, 3}
    assert np.all(brain[case.label > 0])
  np.testing.assert_array_equal(cases[0].affine[:3, :3], np.diag([-1.0, -1.0, 1.0]))
  assert nib.aff2axcodes(cases[0].affine) == ("L", "P", "S")


def test_tumour_signatures(cases):
  for case in cases:
    flair, t1, t1gd, t2 = (case.images[m].astype(np.float64) for m in layouts.MODALITIES)
    label = case.label
    normal = (flair != 0) & (label == 0)
    edema = label == labels_lib.EDEMA
    ncr = label == labels_lib.NCR_NET
    et = label == labels_lib.ENHANCING
    assert flair[edema].mean() > 1.3 * flair[normal].mean()
    assert t2[edema].mean() > 1.3 * t2[normal].mean()
    assert t1gd[ncr].mean() < 0.7 * t1gd[normal].mean()
    if et.any():
      assert t1gd[et].mean() > 1.3 * t1gd[ncr].mean()
      assert t1gd[et].mean() > 1.2 * t1gd[normal].mean()
      # Enhancement: bright on T1gd relative to plain T1.
      assert t1gd[et].mean() / t1[et].mean() > 1.5 * t1gd[normal].mean() / t1[normal].mean()


def test_cases_vary_and_some_have_no_et(cases):
  with_et = [bool((c.label == labels_lib.ENHANCING).any()) for c in cases]
  assert with_et == [True, True, False, True, True]
  assert [c.has_et for c in cases] == with_et
  sizes = [int((c.label > 0).sum()) for c in cases]
  assert len(set(sizes)) == len(sizes) and max(sizes) > 2 * min(sizes)
  components = [ndimage.label(c.label > 0)[1] for c in cases]
  assert set(components) == {1, 2}
  centres = [np.argwhere(c.label > 0).mean(axis=0) for c in cases]
  assert np.ptp(np.array(centres), axis=0).min() > 5


def test_tumours_lie_in_the_kept_slices_and_crop(cases):
  size_x, size_y, size_z = SHAPE
  for case in cases:
    tumour = case.label > 0
    z_lo, z_hi = int(30 / 155 * size_z), int(np.ceil(120 / 155 * size_z))
    assert tumour[:, :, z_lo:z_hi + 1].sum() >= 0.95 * tumour.sum()
    x0, y0 = (size_x - 95) // 2, (size_y - 95) // 2  # The 190/240 crop at this size.
    assert tumour[x0:x0 + 95, y0:y0 + 95].sum() == tumour.sum()


@pytest.mark.parametrize("layout", ["msd", "brats"])
def test_written_files_carry_layout_labels(synthetic_msd, synthetic_brats, layout):
  root = {"msd": synthetic_msd, "brats": synthetic_brats}[layout]
  ref = layouts.find_cases(root)[0]
  raw = np.asanyarray(nib.load(ref.label_path).dataobj)
  expected = {"msd": {0, 1, 2, 3}, "brats": {0, 1, 2, 4}}[layout]
  assert set(np.unique(raw)) == expected
  img = nib.load(next(iter(ref.image_paths.values())))
  assert img.get_data_dtype() == np.int16
  assert img.header.get_zooms()[:3] == (1.0, 1.0, 1.0)
  # No temporary files are left behind.
  assert not [p for p in root.rglob(".*")]


def test_msd_dataset_json(synthetic_msd):
  meta = json.loads((synthetic_msd / "dataset.json").read_text())
  assert meta["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
  assert meta["labels"]["1"] == "edema" and meta["labels"]["3"] == "enhancing tumour"
  assert meta["numTraining"] == len(meta["training"]) == 4
  assert meta["training"][0] == {"image": "./imagesTr/BRATS_001.nii.gz",
                                 "label": "./labelsTr/BRATS_001.nii.gz"}
  assert nib.load(synthetic_msd / "imagesTr" / "BRATS_001.nii.gz").shape == (48, 48, 40, 4)


def test_brats_groups(synthetic_brats):
  # Cases without ET are filed as LGG.
  assert sorted(p.name for p in (synthetic_brats / "LGG").iterdir()) == ["Brats18_SYN_0003_1"]
  assert len(list((synthetic_brats / "HGG").iterdir())) == 3


def test_output_folder_rules(tmp_path):
  ids = synthetic.generate_dataset(tmp_path / "d", "brats", 2, (32, 32, 24))
  assert ids == ["Brats18_SYN_0001_1", "Brats18_SYN_0002_1"]
  # The same parameters reuse the complete data set; different ones refuse to mix.
  before = os.path.getmtime(tmp_path / "d" / "synthetic.json")
  assert synthetic.generate_dataset(tmp_path / "d", "brats", 2, (32, 32, 24)) == ids
  assert os.path.getmtime(tmp_path / "d" / "synthetic.json") == before
  with pytest.raises(DataError, match="not empty"):
    synthetic.generate_dataset(tmp_path / "d", "brats", 3, (32, 32, 24))
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "x.txt").write_text("x")
  with pytest.raises(DataError, match="not empty"):
    synthetic.generate_dataset(tmp_path / "other", "msd", 1, (32, 32, 24))
  with pytest.raises(ValueError, match="at least 1"):
    synthetic.generate_dataset(tmp_path / "e", "msd", 0)
  with pytest.raises(ValueError, match="layout"):
    synthetic.generate_dataset(tmp_path / "e", "nifti", 1)
  with pytest.raises(ValueError, match="Shape"):
    synthetic.generate_dataset(tmp_path / "e", "msd", 1, (8, 32, 32))


def test_atomic_generation_replaces_a_killed_runs_leftover(tmp_path):
  out = tmp_path / "synthetic"
  leftover = tmp_path / "synthetic.incomplete"
  leftover.mkdir()
  (leftover / "imagesTr").mkdir()  # What a killed run may have left.
  ids = synthetic.generate_dataset_atomically(out, "msd", 2, (32, 32, 24), seed=3)
  assert not leftover.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]
  assert [r.case_id for r in layouts.find_cases(out)] == ids
  assert json.loads((out / synthetic.MARKER).read_text())["case_ids"] == ids
  # An existing folder is generate_dataset's: reused when complete, refused otherwise.
  assert synthetic.generate_dataset_atomically(out, "msd", 2, (32, 32, 24), seed=3) == ids
  with pytest.raises(DataError, match="not empty"):
    synthetic.generate_dataset_atomically(out, "msd", 3, (32, 32, 24), seed=3)
  with pytest.raises(ValueError, match="at least 1"):
    synthetic.generate_dataset_atomically(tmp_path / "bad", "msd", 0)
  assert not list(tmp_path.glob("bad*"))


def _cli(*args):
  return helpers.run_module("data_pipelines.synthetic", *args)


def test_cli_writes_a_loadable_data_set(tmp_path):
  out = tmp_path / "syn"
  result = _cli("--out", str(out), "--layout", "brats", "--cases", "2", "--shape", "32,32,24",
                "--seed", "1")
  assert result.returncode == 0, result.stderr
  refs = layouts.find_cases(out)
  assert len(refs) == 2
  case = layouts.load_case(refs[1])
  assert case.image.shape == (32, 32, 24, 4)
  truth = synthetic.make_case((32, 32, 24), seed=1, index=1)
  np.testing.assert_array_equal(case.label, truth.label)


@pytest.mark.parametrize("args, message", [
    (["--layout", "msd", "--cases", "0"], "at least 1"),
    (["--layout", "msd", "--cases", "1", "--shape", "32,32"], "--shape must be X,Y,Z"),
    (["--layout", "msd", "--cases", "1", "--shape", "32,x,32"], "--shape must be X,Y,Z"),
    (["--layout", "nifti", "--cases", "1"], "layout"),
    (["--layout", "msd"], "--cases is required"),
])
def test_cli_bad_arguments(tmp_path, args, message):
  result = _cli("--out", str(tmp_path / "syn"), *args)
  assert result.returncode != 0
  assert message in result.stderr
  assert not (tmp_path / "syn").exists()


def test_cli_requires_out():
  result = _cli("--layout", "msd")
  assert result.returncode != 0 and "--out" in result.stderr


def test_metastases_make_multi_lesion_cases(tmp_path):
  shape = (96, 96, 64)
  plain = synthetic.make_case(shape, seed=2, index=0)
  assert np.array_equal(plain.label, synthetic.make_case(shape, seed=2, index=0,
                                                         metastases=0).label)
  case = synthetic.make_case(shape, seed=2, index=0, metastases=5)
  structure = ndimage.generate_binary_structure(3, 3)
  count = lambda label: ndimage.label(label > 0, structure)[1]
  # Each metastasis is its own whole-tumour component beside the tumour(s), with ET inside.
  assert count(case.label) >= count(plain.label) + 4
  added = (case.label > 0) & (plain.label == 0)
  components, n = ndimage.label(added, structure)
  sizes = np.bincount(components.ravel())[1:]
  assert n >= 4 and sizes.max() < 2000  # Small: a few hundred voxels at most here.
  assert all((case.label[components == i] == labels_lib.ENHANCING).any() for i in range(1, n + 1))
  assert np.array_equal(case.label[plain.label > 0], plain.label[plain.label > 0])
  # Through the data set writer: recorded in the marker, refused below 0.
  ids = synthetic.generate_dataset(tmp_path / "met", "brats", 1, (48, 48, 32), seed=1,
                                   metastases=3)
  assert json.loads((tmp_path / "met" / synthetic.MARKER).read_text())["metastases"] == 3
  assert len(ids) == 1
  with pytest.raises(ValueError, match="--metastases must be 0 or more"):
    synthetic.generate_dataset(tmp_path / "bad", "brats", 1, (48, 48, 32), metastases=-1)
