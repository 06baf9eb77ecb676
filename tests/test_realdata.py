"""One real BraTS 2021 case (kept beside the repository, never in it) through readers and
preprocessing. Skipped where that folder is absent, as on a user's machine."""

from pathlib import Path
import shutil

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from data_pipelines.brats import labels as labels_lib
from data_pipelines.brats import layouts
from data_pipelines.brats import preprocess
from data_pipelines.errors import DataError

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
CASE_ID = "BraTS2021_00006"
# Expert label counts of the case (README of the folder): raw 1 / 2 / 4.
RAW_COUNTS = {1: 25_506, 2: 85_957, 4: 26_448}

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def case():
  if not (REALDATA / CASE_ID).is_dir():
    pytest.skip(f"real BraTS case not available at {REALDATA / CASE_ID}")
  refs = layouts.find_cases(REALDATA)
  assert [r.case_id for r in refs] == [CASE_ID]
  assert layouts.detect_layout(REALDATA) == "brats"
  return layouts.load_case(refs[0])


def test_real_case_shapes_and_spacing(case):
  assert case.image.shape == (240, 240, 155, 4) and case.image.dtype == np.float32
  assert case.label.shape == (240, 240, 155) and case.label.dtype == np.uint8
  assert case.spacing == (1.0, 1.0, 1.0)
  assert case.modalities == layouts.MODALITIES
  # Skull-stripped: a real background of exact zeros around the brain.
  assert 0.05 < np.mean(case.image[..., 0] != 0) < 0.5


def test_real_case_label_mapping(case):
  counts = np.bincount(case.label.ravel(), minlength=labels_lib.NUM_CLASSES)
  assert counts[labels_lib.NCR_NET] == RAW_COUNTS[1]
  assert counts[labels_lib.EDEMA] == RAW_COUNTS[2]
  assert counts[labels_lib.ENHANCING] == RAW_COUNTS[4]
  assert counts.sum() == 240 * 240 * 155


def test_real_case_passes_the_t1gd_check(case):
  assert layouts.check_label_convention(case) is None
  # The check really looks at the data: the swapped convention is caught.
  swapped = case.label.copy()
  swapped[case.label == labels_lib.ENHANCING] = labels_lib.NCR_NET
  swapped[case.label == labels_lib.NCR_NET] = labels_lib.ENHANCING
  warning = layouts.check_label_convention(
      layouts.Case(case.case_id, case.image, swapped, case.affine, case.header, case.spacing,
                   case.modalities))
  assert warning is not None and CASE_ID in warning


def test_real_case_preprocessing(case):
  slices = preprocess.preprocess_case(case.image, case.label)
  assert slices.image.shape == (91, 190, 190, 4)
  assert slices.label.shape == (91, 190, 190)
  assert slices.offsets == (25, 25)
  np.testing.assert_array_equal(slices.slice_indices, np.arange(30, 121))
  brain = slices.image[..., 0] != 0
  assert abs(slices.image[..., 0][brain].mean()) < 0.5
  # Tumour on 68 axial slices, all inside the paper's window and crop.
  tumour_slices = np.flatnonzero(case.label.any(axis=(0, 1)))
  assert tumour_slices.size == 68
  assert np.count_nonzero(slices.label) == np.count_nonzero(case.label)
  pasted = preprocess.paste_back(slices.label, slices.slice_indices, slices.offsets,
                                 case.label.shape)
  np.testing.assert_array_equal(pasted, case.label)


@pytest.fixture(scope="module")
def renamed(case, tmp_path_factory):
  """The real case copied (outside the repository) into 2023 naming, ET relabelled 3."""
  root = tmp_path_factory.mktemp("brats2023")
  new_id = "BraTS-GLI-00006-000"
  folder = root / new_id
  folder.mkdir()
  naming = layouts.NAMINGS["brats2023"]
  for modality in layouts.MODALITIES:
    shutil.copy(REALDATA / CASE_ID / f"{CASE_ID}_{modality}.nii.gz",
                folder / f"{new_id}-{naming.suffix(modality)}.nii.gz")
  seg = nib.load(str(REALDATA / CASE_ID / f"{CASE_ID}_seg.nii.gz"))
  raw = np.asarray(seg.dataobj).copy()
  raw[raw == 4] = 3
  nib.save(nib.Nifti1Image(raw, seg.affine, seg.header), str(folder / f"{new_id}-seg.nii.gz"))
  return root


def test_real_case_in_2023_naming_matches_its_2021_twin(case, renamed):
  refs = layouts.find_cases(renamed)
  assert layouts.detect_layout(renamed) == "brats2023"
  assert layouts.folder_convention(refs, "auto") == "brats2023"
  twin = layouts.load_case(refs[0])
  np.testing.assert_array_equal(twin.image, case.image)
  np.testing.assert_array_equal(twin.label, case.label)
  np.testing.assert_array_equal(twin.affine, case.affine)
  a, b = preprocess.preprocess_case(case.image, case.label), preprocess.preprocess_case(
      twin.image, twin.label)
  np.testing.assert_array_equal(a.image, b.image)
  np.testing.assert_array_equal(a.label, b.label)
  # The swap the names now refuse: read as MSD, NCR and ED would trade places.
  with pytest.raises(DataError, match="label convention 'msd' contradicts"):
    layouts.load_case(refs[0], label_convention="msd")


def test_real_case_scores_the_same_in_both_namings(case, renamed, tmp_path):
  from msatt_jax import evaluate_folder  # pylint: disable=g-import-not-at-top
  # A "prediction": the reference with its ET eroded, written in each naming's convention.
  pred = case.label.copy()
  pred[ndimage.binary_erosion(case.label == labels_lib.ENHANCING) ^
       (case.label == labels_lib.ENHANCING)] = labels_lib.NCR_NET
  scores = {}
  for convention, case_id, ref_dir in (("brats", CASE_ID, REALDATA),
                                       ("brats2023", "BraTS-GLI-00006-000", renamed)):
    out = tmp_path / convention
    out.mkdir()
    nib.save(nib.Nifti1Image(labels_lib.from_canonical(pred, convention), case.affine),
             str(out / f"{case_id}.nii.gz"))
    rows, _ = evaluate_folder.evaluate_folders(str(out), str(ref_dir), "auto", None,
                                               lesion_rules="off")
    scores[convention] = {k: v for k, v in rows[0].items() if k != "case"}
  assert scores["brats"] == scores["brats2023"]
  assert scores["brats"]["dice_WT"] == 1.0 and scores["brats"]["dice_ET"] < 1.0
