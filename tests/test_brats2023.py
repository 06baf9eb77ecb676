"""BraTS 2023-2025: the 2023+ naming of every challenge, label sets as data, the conventions
the names decide or refuse, and the geometries the challenges ship."""

import shutil

import nibabel as nib
import numpy as np
import pytest

from data_pipelines import synthetic
from data_pipelines.brats import labels as labels_lib
from data_pipelines.brats import layouts
from data_pipelines.brats import preprocess
from data_pipelines.errors import DataError

SHAPE = (40, 44, 32)


def _gen(tmp_path, name, layout="brats2023", cases=2, shape=SHAPE, **options):
  out = tmp_path / name
  synthetic.generate_dataset(out, layout, cases, shape, seed=0, **options)
  return out


@pytest.mark.parametrize("challenge", synthetic.CHALLENGES)
def test_2023_names_of_every_challenge_are_found_and_read(tmp_path, challenge):
  labels = "brats2023"
  root = _gen(tmp_path, challenge, challenge=challenge, labels=labels)
  assert layouts.detect_layout(root) == "brats2023"
  refs = layouts.find_cases(root)
  assert [r.case_id for r in refs] == [f"BraTS-{challenge}-0000{i}-000" for i in (1, 2)]
  ref = refs[0]
  assert ref.layout == "brats2023"
  assert {m: p.rsplit("-", 1)[1] for m, p in ref.image_paths.items()} == {
      "flair": "t2f.nii.gz", "t1": "t1n.nii.gz", "t1ce": "t1c.nii.gz", "t2": "t2w.nii.gz"}
  assert ref.label_path.endswith(f"{ref.case_id}-seg.nii.gz")
  case = layouts.load_case(ref, label_convention=labels)
  assert case.image.shape == SHAPE + (4,) and case.label.max() == labels_lib.ENHANCING


def test_one_case_in_both_namings_reads_the_same(tmp_path):
  old = _gen(tmp_path, "old", layout="brats", cases=1)
  new = _gen(tmp_path, "new", cases=1)
  a = layouts.load_case(layouts.find_cases(old)[0])
  b = layouts.load_case(layouts.find_cases(new)[0])
  np.testing.assert_array_equal(a.image, b.image)
  np.testing.assert_array_equal(a.label, b.label)  # ET 4 on disk there, 3 here.
  assert np.any(a.label == labels_lib.ENHANCING)
  # Modalities may be named either way: the one table of aliases.
  c = layouts.load_case(layouts.find_cases(new)[0], modalities=("t2f", "t1c"))
  np.testing.assert_array_equal(c.image, a.image[..., [0, 2]])
  assert c.modalities == ("flair", "t1ce")
  assert preprocess.Preprocessing(modalities=("t1c", "t2f")).modalities == ("t1ce", "flair")
  assert layouts.case_ref_from_path(layouts.find_cases(new)[0].label_path.rsplit("/", 1)[0]
                                    ).layout == "brats2023"


def test_a_folder_mixing_namings_is_refused(tmp_path):
  root = _gen(tmp_path, "mixed", cases=1)
  old = _gen(tmp_path, "old", layout="brats", cases=1)
  shutil.copytree(old / "HGG" / "Brats18_SYN_0001_1", root / "Brats18_SYN_0001_1")
  with pytest.raises(DataError, match=r"mixes namings: BraTS-GLI-00001-000 .*Brats18_SYN_0001_1"):
    layouts.find_cases(root)
  with pytest.raises(DataError, match="brats2023' \\(2023-2025 names\\) was asked for"):
    layouts.find_cases(old, "brats2023")


def test_a_case_folder_with_both_namings_is_refused(tmp_path):
  root = _gen(tmp_path, "both", cases=1)
  case = root / "BraTS-GLI-00001-000"
  shutil.copy(case / "BraTS-GLI-00001-000-t2f.nii.gz", case / "BraTS-GLI-00001-000_flair.nii.gz")
  with pytest.raises(DataError, match="holds files of two namings"):
    layouts.find_cases(root)


def test_missing_modality_names_case_and_modality(tmp_path):
  root = _gen(tmp_path, "missing", cases=1)
  (root / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-t1c.nii.gz").unlink()
  ref = layouts.find_cases(root)[0]
  with pytest.raises(DataError, match="case BraTS-GLI-00001-000: missing modality t1ce"):
    layouts.load_case(ref)
  layouts.load_case(ref, modalities=("flair", "t2"))  # A run that does not need it.


def test_msd_convention_on_2023_names_is_refused_not_swapped(tmp_path):
  # Today's bug: values 1 and 2 mean NCR and ED in 2023 files, ED and NCR in MSD's.
  root = _gen(tmp_path, "gli", cases=1)
  ref = layouts.find_cases(root)[0]
  with pytest.raises(DataError, match=r"BraTS-GLI-00001-000-seg.nii.gz \(case BraTS-GLI-00001-000"
                                      r"\): label convention 'msd' contradicts the brats2023 names"):
    layouts.load_case(ref, label_convention="msd")
  with pytest.raises(DataError, match="label convention 'brats' contradicts"):
    layouts.load_case(ref, label_convention="brats")
  with pytest.raises(DataError, match="'ped2024' contradicts"):  # A PED convention on GLI.
    layouts.load_case(ref, label_convention="ped2024")
  assert layouts.folder_convention([ref], "auto") == "brats2023"


def test_value_sets_decide_the_rest(tmp_path):
  # GLI 2024's RC (4) under the 2023 reading: refused, with the way out.
  root = _gen(tmp_path, "gli24", cases=1, labels="gli2024")
  ref = layouts.find_cases(root)[0]
  with pytest.raises(DataError, match=r"label values \[4\] are not in the 'brats2023' .*"
                                      "gli2024.*set the label convention explicitly"):
    layouts.load_case(ref)
  case = layouts.load_case(ref, label_convention="gli2024")
  raw = np.asarray(nib.load(ref.label_path).dataobj)
  np.testing.assert_array_equal(case.label, raw)  # The same values, the glioma_rc classes.
  assert np.count_nonzero(case.label == labels_lib.EXTRA) > 0
  # The 2021 reading of 2021 files with a 2023 value.
  old = _gen(tmp_path, "old", layout="brats", cases=1)
  assert layouts.folder_convention(layouts.find_cases(old), "auto") == "brats"


def test_ped_needs_an_explicit_convention(tmp_path):
  root = _gen(tmp_path, "ped", cases=1, challenge="PED", labels="ped2024")
  ref = layouts.find_cases(root)[0]
  with pytest.raises(DataError, match="do not decide the label convention of BraTS-PED"):
    layouts.load_case(ref)
  case = layouts.load_case(ref, label_convention="ped2024")
  raw = np.asarray(nib.load(ref.label_path).dataobj)
  # 1 ET, 2 NET, 3 CC, 4 ED on disk -> classes 3 ET, 1 NET, 4 CC, 2 ED.
  for value, cls in {1: 3, 2: 1, 3: 4, 4: 2}.items():
    np.testing.assert_array_equal(case.label == cls, raw == value)
  assert layouts.check_label_convention(case) is None  # ET brighter than NET on T1gd.


def test_a_folder_mixing_conventions_is_refused(tmp_path):
  root = _gen(tmp_path, "gli", cases=1)
  ped = _gen(tmp_path, "ped", cases=1, challenge="PED", labels="ped2024")
  shutil.copytree(ped / "BraTS-PED-00001-000", root / "BraTS-PED-00001-000")
  refs = layouts.find_cases(root)
  with pytest.raises(DataError, match="BraTS-PED-00001-000"):
    layouts.folder_convention(refs, "auto")  # PED undecided.
  with pytest.raises(DataError, match="'ped2024' contradicts"):
    layouts.folder_convention(refs, "ped2024")  # Not GLI's.


# ---------------------------------------------------------------------------------------------
# Label sets through the model's outputs, the scores and the written files.


def test_label_sets_size_the_outputs_and_keep_classes_1_to_3():
  from msatt_jax import losses  # pylint: disable=g-import-not-at-top
  assert [losses.num_outputs(l, s) for s in ("glioma", "glioma_rc", "ped")
          for l in ("dice", "region_dice")] == [4, 3, 5, 4, 5, 6]
  for chosen in labels_lib.LABEL_SETS.values():
    assert chosen.region_names[:3] == ("ET", "TC", "WT")
    assert chosen.region_classes("ET") == (labels_lib.ENHANCING,)
    assert labels_lib.label_set_with_regions(len(chosen.regions)) is chosen
  assert labels_lib.label_set_of("auto").name == "glioma"
  assert labels_lib.label_set_of("gli2024").name == "glioma_rc"
  # 'auto' only ever resolves to conventions of the glioma set: a run's class count is known
  # from its config before any file is read.
  defaults = list(layouts.LAYOUT_CONVENTION.values()) + [
      d for d, _ in layouts.CHALLENGE_CONVENTIONS.values() if d]
  assert {labels_lib.label_set(c).name for c in defaults} == {"glioma"}


def test_region_outputs_decode_to_classes_of_any_label_set():
  from msatt_jax import losses  # pylint: disable=g-import-not-at-top
  # Every ET/TC/WT combination: as the nested rule (WT outside TC is ED, TC outside ET NCR).
  combos = np.array([[et, tc, wt] for et in (0, 1) for tc in (0, 1) for wt in (0, 1)], bool)
  got = np.asarray(losses.logits_to_labels(np.where(combos, 1.0, -1.0), "region_dice"))
  want = [0 if not wt else (2 if not tc else (1 if not et else 3)) for et, tc, wt in combos]
  np.testing.assert_array_equal(got, want)
  # glioma_rc: RC alone is class 4; every class's own regions give it back.
  table = labels_lib.label_set("glioma_rc").region_table()
  got = np.asarray(losses.logits_to_labels(np.where(table, 1.0, -1.0), "region_dice",
                                           "glioma_rc"))
  np.testing.assert_array_equal(got, [0, 1, 2, 3, 4])
  got = np.asarray(losses.logits_to_labels(np.where(labels_lib.label_set("ped").region_table(),
                                                    1.0, -1.0), "region_dice", "ped"))
  np.testing.assert_array_equal(got, [0, 1, 2, 3, 4])


def test_rc_is_scored_as_its_own_region():
  from msatt_jax import metrics  # pylint: disable=g-import-not-at-top
  ref = np.zeros((8, 8, 8), np.uint8)
  ref[1:3, 1:3, 1:3] = 3  # 8 ET voxels.
  ref[5:7, 5:7, 5:7] = 4  # 8 RC voxels.
  pred = ref.copy()
  pred[5, 5, 5:7] = 0  # 6 of the 8 RC voxels found.
  scores = metrics.region_scores(pred, ref, label_set="glioma_rc")
  assert scores["dice_RC"] == pytest.approx(2 * 6 / (6 + 8))
  assert scores["dice_ET"] == scores["dice_TC"] == scores["dice_WT"] == 1.0  # RC in none.
  glioma = np.where(ref == 4, 0, ref)
  assert "dice_RC" not in metrics.region_scores(glioma, glioma)
  # PED: the cyst (class 4) is tumour core.
  ped = np.zeros((4, 4, 4), np.uint8)
  ped[0, 0, 0] = 4
  assert labels_lib.region_masks(ped, "ped")[0, 0, 0].tolist() == [False, True, True, False,
                                                                    True, False]
  with pytest.raises(ValueError, match="class 4 is not in the 'glioma' label set"):
    labels_lib.region_masks(ped)


def test_outputs_are_written_in_the_input_convention_of_the_models_label_set(tmp_path):
  new = layouts.find_cases(_gen(tmp_path, "new", cases=1))[0]
  old = layouts.find_cases(_gen(tmp_path, "old", layout="brats", cases=1))[0]
  ped = layouts.find_cases(_gen(tmp_path, "ped", cases=1, challenge="PED"))[0]
  out = layouts.output_convention
  assert out(old, "auto", "glioma") == "brats"  # ET 4.
  assert out(new, "auto", "glioma") == "brats2023"  # ET 3.
  assert out(new, "auto", "glioma_rc") == "gli2024"  # RC 4.
  assert out(ped, "auto", "ped") == "ped2024"
  assert out(ped, "auto", "glioma") == "brats2023"
  with pytest.raises(DataError, match=r"case Brats18_SYN_0001_1\): the model outputs the "
                                      r"'glioma_rc' label set \(NETC, SNFH, ET, RC\)"):
    out(old, "auto", "glioma_rc")
  with pytest.raises(DataError, match="the 'brats2023' convention does not hold"):
    out(new, "brats2023", "glioma_rc")
  with pytest.raises(ValueError, match=r"classes \[4\] have no value in the 'brats2023'"):
    labels_lib.from_canonical(np.array([0, 4]), "brats2023")
