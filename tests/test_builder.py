"""The TFDS 'brats' builder: splits, config naming, what it writes, and TFDS's own checks."""

import importlib.util
import json
from pathlib import Path
import shutil
import subprocess
import sys
import tempfile

import ml_collections
import nibabel as nib
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import brats18
from data_pipelines import prepare as prepare_lib
from data_pipelines import synthetic
from data_pipelines.brats import builder as builder_lib
from data_pipelines.brats import layouts
from data_pipelines.brats import preprocess
from data_pipelines.errors import DataError

from conftest import SMALL_DATA, small_data_config

# Slices 10..17 with a 32x32 crop of the 48x48x40 fixtures: 8 small slices per case.


# ---- patient-level splits -------------------------------------------------------------------


def test_split_sizes_follow_the_paper_and_scale_down():
  assert builder_lib.split_sizes(285) == (225, 30, 30)
  assert builder_lib.split_sizes(3) == (1, 1, 1)
  assert builder_lib.split_sizes(4) == (2, 1, 1)
  assert builder_lib.split_sizes(100) == (78, 11, 11)  # round(100 * 30 / 285) = 11.
  assert builder_lib.split_sizes(484) == (382, 51, 51)  # The full MSD set.
  assert builder_lib.split_sizes(20, num_validation=5, num_test=2) == (13, 5, 2)
  for n in range(3, 60):
    train, val, test = builder_lib.split_sizes(n)
    assert train + val + test == n and min(train, val, test) >= 1


@pytest.mark.parametrize("kwargs", [dict(num_cases=2), dict(num_cases=0),
                                    dict(num_cases=5, num_validation=3, num_test=2),
                                    dict(num_cases=5, num_validation=0)])
def test_split_sizes_refuse_impossible_splits(kwargs):
  with pytest.raises(DataError):
    builder_lib.split_sizes(**kwargs)


def test_split_case_ids_are_disjoint_complete_and_seeded():
  ids = [f"BRATS_{i:03d}" for i in range(1, 286)]
  splits = builder_lib.split_case_ids(ids, seed=0)
  assert {k: len(v) for k, v in splits.items()} == {"train": 225, "validation": 30, "test": 30}
  sets = [set(v) for v in splits.values()]
  assert set.union(*sets) == set(ids) and sum(len(s) for s in sets) == len(ids)
  assert all(v == sorted(v) for v in splits.values())
  # Same seed: same split, whatever the input order; another seed: another split.
  assert builder_lib.split_case_ids(list(reversed(ids)), seed=0) == splits
  assert builder_lib.split_case_ids(ids, seed=1)["test"] != splits["test"]
  with pytest.raises(DataError, match="Duplicate"):
    builder_lib.split_case_ids(ids + ids[:1], seed=0)


# ---- configs ----------------------------------------------------------------------------------


def test_config_name_is_default_only_for_the_papers_preprocessing():
  paper = builder_lib.config_from_data_config(brats18.get_data_config())
  assert paper.name == "default"
  assert builder_lib.Brats.builder_configs["default"].name == "default"
  other = builder_lib.make_config(crop_size=160)
  assert other.name.startswith("p") and other.name != "default"
  # Stable: the same parameters give the same name; every content parameter changes it.
  assert builder_lib.make_config(crop_size=160).name == other.name
  names = {builder_lib.make_config(**kw).name for kw in [
      dict(slice_start=29), dict(slice_stop=119), dict(modalities=("t1ce", "flair")),
      dict(label_convention="brats"), dict(split_seed=1), dict(num_test_cases=20),
      dict(normalize="none"), dict(crop_center=(100, 120)), dict(storage_dtype="float32"),
      dict(compression="zlib")]}
  assert len(names) == 10 and "default" not in names
  # The layout says where files are, not what is written: same data, same folder.
  data = brats18.get_data_config()
  data.layout, data.source_dir = "msd", "/data/Task01_BrainTumour"
  assert builder_lib.builder_from_config(data).builder_config.name == "default"


def test_config_names_of_existing_prepared_data_do_not_change():
  # Computed before the parameters became one list: prepared folders keep their names.
  params = dict(crop_size=64, slice_start=20, slice_stop=40, modalities=("t1ce", "flair"),
                crop_center=(100, 110), storage_dtype="float32")
  assert builder_lib.make_config(**params).name == "pd407a25d53"
  data = brats18.get_data_config()
  data.update(params)
  assert builder_lib.config_from_data_config(data).name == "pd407a25d53"
  # Flag-style values (strings, lists) name the same content.
  assert builder_lib.make_config(**dict(params, crop_center=["100", "110"], slice_start="20",
                                        modalities=["t1ce", "flair"])).name == "pd407a25d53"
  assert builder_lib.make_config(compression="zlib", num_test_cases=2).name == "p46bc6e9dd3"


def test_preprocessing_parameters_are_one_list():
  fields = preprocess.parameters()
  names = [f.name for f in fields]
  data = brats18.get_data_config()
  # config.data holds every parameter at its default, beside its own keys.
  assert all(data[f.name] == f.default for f in fields)
  # The content hash and the description cover exactly these parameters.
  described = json.loads(builder_lib.make_config().description.split(": ", 1)[1])
  assert sorted(described) == sorted(names)
  with pytest.raises(ValueError, match="Unknown preprocessing parameter.*crop_sise"):
    builder_lib.make_config(crop_sise=64)
  with pytest.raises(ValueError, match="Unknown storage_dtype 'int8'; choose one of float16"):
    builder_lib.make_config(storage_dtype="int8")
  with pytest.raises(ValueError, match="crop_center must be two integers"):
    builder_lib.make_config(crop_center=(1, 2, 3))
  with pytest.raises(ValueError, match="slice_start 40 is after slice_stop 20"):
    builder_lib.make_config(slice_start=40, slice_stop=20)


def test_builder_from_config_defaults_and_errors(tmp_path):
  data = brats18.get_data_config()
  data.source_dir = str(tmp_path / "Task01_BrainTumour")
  builder = builder_lib.builder_from_config(data)
  assert str(builder.data_dir_root) == str(tmp_path / "prepared")
  assert str(builder.data_path) == str(tmp_path / "prepared" / "brats" / "default" / "1.0.0")
  data.source_dir = None
  with pytest.raises(DataError, match="source_dir"):
    builder_lib.builder_from_config(data)
  with pytest.raises(ValueError, match="modalities"):
    builder_lib.make_config(modalities=("flair", "dwi"))


# ---- what gets written ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(prepared_small):
  """(data config, builder) of the session's prepared data, read back from disk."""
  return prepared_small, builder_lib.builder_from_config(prepared_small)


def test_splits_and_metadata_are_stored(prepared, synthetic_msd):
  _, builder = prepared
  meta = builder.info.metadata
  all_ids = [r.case_id for r in layouts.find_cases(synthetic_msd)]
  assert meta["splits"] == builder_lib.split_case_ids(all_ids, seed=0)
  assert meta["case_ids"] == sorted(all_ids)
  assert meta["layout"] == "msd" and meta["label_warnings"] == []
  assert meta["preprocessing"]["crop_size"] == 32
  assert meta["preprocessing"]["modalities"] == list(layouts.MODALITIES)
  for split in builder_lib.SPLITS:
    assert builder.info.splits[split].num_examples == 8 * len(meta["splits"][split])
  # The preprocessing parameters are also in dataset_info.json (the config description).
  info = json.loads((builder.data_path / "dataset_info.json").read_text())
  assert json.loads(info["configDescription"].split(": ", 1)[1])["slice_stop"] == 17


def test_examples_are_the_preprocessed_slices_of_their_split(prepared, synthetic_msd):
  _, builder = prepared
  splits = builder.info.metadata["splits"]
  refs = {r.case_id: r for r in layouts.find_cases(synthetic_msd)}
  expected = {}
  for case_id, ref in refs.items():
    case = layouts.load_case(ref)
    expected[case_id] = preprocess.preprocess_case(case.image, case.label, **SMALL_DATA)
  for split in builder_lib.SPLITS:
    seen = set()
    for ex in tfds.as_numpy(builder.as_dataset(split=split)):
      case_id, z = ex["case_id"].decode(), int(ex["slice_index"])
      assert case_id in splits[split]  # No case in another split.
      seen.add((case_id, z))
      want = expected[case_id]
      i = z - int(want.slice_indices[0])
      assert ex["image"].dtype == np.float16 and ex["image"].shape == (32, 32, 4)
      np.testing.assert_array_equal(ex["image"], want.image[i].astype(np.float16))
      np.testing.assert_array_equal(ex["label"], want.label[i])
      assert ex["label"].dtype == np.uint8 and ex["label"].max() <= 3
      np.testing.assert_array_equal(ex["crop_offset"], want.offsets)
    assert seen == {(c, z) for c in splits[split] for z in range(10, 18)}


def test_label_convention_warnings_are_counted(make_synthetic, tmp_path):
  source = make_synthetic("msd", num_cases=3)
  # Swap non-enhancing (2) and enhancing (3) in one case: T1gd then contradicts the labels.
  label_path = source / "labelsTr" / "BRATS_002.nii.gz"
  img = nib.load(str(label_path))
  raw = np.asarray(img.dataobj)
  swapped = raw.copy()
  swapped[raw == 2], swapped[raw == 3] = 3, 2
  nib.save(nib.Nifti1Image(swapped, img.affine, img.header), str(label_path))
  data = small_data_config(source, tmp_path / "out")
  messages = []
  builder = prepare_lib.prepare(data, progress=messages.append)
  warnings = builder.info.metadata["label_warnings"]
  assert len(warnings) == 1 and "BRATS_002" in warnings[0]
  text = "\n".join(messages)
  assert "warnings (T1gd: ET not brighter than NCR/NET): 1" in text
  assert "case 3/3" in text and "BRATS_002" in text


# ---- TFDS's own builder checks ------------------------------------------------------------------


try:
  # tfds.testing imports dill (the project's test extra); without it only this check skips.
  from tensorflow_datasets.testing import dataset_builder_testing
except ImportError as e:  # pragma: no cover - depends on the environment.
  dataset_builder_testing = None
  _MISSING = str(e)


if dataset_builder_testing is not None:

  class BratsBuilderTest(dataset_builder_testing.DatasetBuilderTestCase):
    """Builds the paper's config and a small custom one from a generated manual folder."""

    DATASET_CLASS = builder_lib.Brats
    # Three cases split 1/1/1; 192x192x34 volumes keep 4 slices (30..33) of the paper's range
    # and fit its 190x190 crop.
    SPLITS = {"train": 4, "validation": 4, "test": 4}
    BUILDER_CONFIG_NAMES_TO_TEST = [
        "default", builder_lib.make_config(slice_start=10, slice_stop=13, crop_size=64)]
    SKIP_CHECKSUMS = True

    @classmethod
    def setUpClass(cls):
      super().setUpClass()
      cls._tmp = tempfile.mkdtemp()
      cls.EXAMPLE_DIR = f"{cls._tmp}/msd"
      synthetic.generate_dataset(cls.EXAMPLE_DIR, "msd", 3, (192, 192, 34), seed=1)

    @classmethod
    def tearDownClass(cls):
      super().tearDownClass()
      shutil.rmtree(cls._tmp, ignore_errors=True)

else:

  def test_tfds_dataset_builder_test_case():
    pytest.skip(f"tensorflow_datasets.testing is unavailable ({_MISSING}); install the test "
                "extra.")


# ---- the `tfds build` command line --------------------------------------------------------------

# TFDS 4.9's command line imports these at start-up, whatever the command.
_TFDS_CLI_NEEDS = ("apache_beam", "mlcroissant")
_TFDS_CLI_MISSING = [m for m in _TFDS_CLI_NEEDS if importlib.util.find_spec(m) is None]
_TFDS_CLI = ("import sys; from tensorflow_datasets.scripts.cli.main import launch_cli; "
             "sys.exit(launch_cli())")  # What the `tfds` script runs.


@pytest.mark.skipif(bool(_TFDS_CLI_MISSING), reason=(
    f"`tfds build` imports {' and '.join(_TFDS_CLI_NEEDS)} at start-up; "
    f"{', '.join(_TFDS_CLI_MISSING)} not installed (pip install -e .[tfds-cli]; .ci/run does)."))
@pytest.mark.slow
def test_tfds_build_command_line_builds_the_papers_config(tmp_path):
  # The paper's crop (190) and slices (30..) need volumes of at least 190 x 190 x 31.
  source = tmp_path / "msd"
  synthetic.generate_dataset(source, "msd", 3, (192, 192, 34), seed=1)
  script = Path(builder_lib.__file__)
  proc = subprocess.run(
      [sys.executable, "-c", _TFDS_CLI, "build", str(script), f"--manual_dir={source}",
       f"--data_dir={tmp_path / 'out'}"],
      capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  builder = builder_lib.Brats(data_dir=str(tmp_path / "out"))
  assert builder.builder_config.name == "default" and builder.is_prepared()
  assert [builder.info.splits[s].num_examples for s in builder_lib.SPLITS] == [4, 4, 4]
  assert builder.info.metadata["download"] is None


def test_config_names_stay_the_same_with_the_fold_parameters():
  # Computed before num_folds and fold existed: at their defaults they leave the names alone.
  data = brats18.get_data_config()
  assert (data.num_folds, data.fold) == (0, 0)
  assert builder_lib.config_from_data_config(data).name == "default"
  assert builder_lib.make_config(num_folds=0, fold=0).name == "default"
  assert builder_lib.make_config(split_seed=3, num_validation_cases=2).name == "p26e811045a"
  assert builder_lib.make_config(crop_size=48, slice_start=8, slice_stop=31,
                                 num_folds=0).name == "p68fe1a4c1c"  # configs/tiny.py's.
  assert builder_lib.make_config(crop_size=32, slice_start=10, slice_stop=17).name == (
      "p81f65e1786")  # The tests' small data.
  assert builder_lib.make_config(crop_size=48, slice_start=8, slice_stop=31, num_folds=5,
                                 fold=2).name not in ("p68fe1a4c1c", "default")
