"""BraTS 2023+ end to end on tiny synthetic data: train, evaluate, postprocess, predict and
evaluate_folder on a GLI 2023 folder in MNI152 geometry and on a GLI 2024 folder with RC; every
output in its input's geometry and convention."""

import os

import nibabel as nib
import numpy as np
import pytest

from conftest import small_data_config
from configs import tiny
from data_pipelines import prepare as prepare_lib
from data_pipelines import synthetic
from data_pipelines.brats import layouts
from data_pipelines.errors import DataError
from msatt_jax import evaluate
from msatt_jax import evaluate_folder
from msatt_jax import inference
from msatt_jax import postprocess
from msatt_jax import predict
from msatt_jax import train

# MNI152-like: x narrower than the crop (padded), y wider, the template's RAS affine.
SHAPE = (40, 52, 40)


def test_msd_convention_on_a_2023_folder_is_refused_before_anything_is_written(tmp_path):
  source = tmp_path / "gli"
  synthetic.generate_dataset(source, "brats2023", 3, (40, 44, 32))
  data = small_data_config(source, tmp_path / "out", label_convention="msd")
  with pytest.raises(DataError, match="BraTS-GLI-00001-000.*label convention 'msd' contradicts"):
    prepare_lib.prepare(data)
  assert not (tmp_path / "out").exists()


def _train(tmp_path_factory, labels):
  workdir = str(tmp_path_factory.mktemp(f"run_{labels}"))
  config = tiny.get_config()
  d = config.data
  d.synthetic_cases, d.synthetic_shape = 6, SHAPE
  d.synthetic_layout, d.synthetic_labels, d.synthetic_geometry = "brats2023", labels, "mni152"
  d.label_convention = labels
  d.crop_size, d.crop_around, d.slice_range = 48, "brain", "brain"
  config.num_epochs, config.eval_every_epochs, config.checkpoint_every_epochs = 3, 3, 3
  train.train_and_evaluate(config, workdir)
  return workdir, os.path.join(workdir, "synthetic")


@pytest.fixture(scope="module")
def gli2023(tmp_path_factory):
  return _train(tmp_path_factory, "brats2023")


@pytest.fixture(scope="module")
def gli2024(tmp_path_factory):
  return _train(tmp_path_factory, "gli2024")


def _check_outputs(source, out, values):
  for ref in layouts.find_cases(source):
    written = nib.load(os.path.join(out, f"{ref.case_id}.nii.gz"))
    image = nib.load(ref.image_paths["flair"])
    assert written.shape == image.shape == SHAPE
    np.testing.assert_allclose(written.affine, image.affine)
    assert set(np.unique(np.asarray(written.dataobj)).tolist()) <= values


@pytest.mark.slow
def test_gli2023_in_mni152_geometry_end_to_end(gli2023, tmp_path):
  workdir, source = gli2023
  run = inference.restore_run(workdir)
  assert run.label_set == "glioma" and run.config.data.crop_around == "brain"
  result = evaluate.evaluate(workdir, "test", num_figures=0, lesion_rules="off")
  assert "dice_RC" not in result["summary"] and result["summary"]["dice_WT"]["mean"] > 0.3
  record = postprocess.postprocess(workdir)
  assert record["label_set"] == "glioma"
  out = str(tmp_path / "preds")
  predict.predict_folder([run], source, out)
  _check_outputs(source, out, {0, 1, 2, 3})  # 2023 input: ET 3, never 4.
  rows, summary = evaluate_folder.evaluate_folders(out, source, "auto", str(tmp_path / "scores"),
                                                   lesion_rules="off")
  assert len(rows) == 6 and summary["metrics"]["dice_WT"]["mean"] > 0.3
  with pytest.raises(DataError, match="--labels=msd contradicts the 2023"):
    evaluate_folder.evaluate_folders(out, source, "msd", None, lesion_rules="off")


@pytest.mark.slow
def test_gli2024_with_rc_end_to_end(gli2024, tmp_path):
  workdir, source = gli2024
  run = inference.restore_run(workdir)
  assert run.label_set == "glioma_rc"
  assert run.model.num_classes == 5
  result = evaluate.evaluate(workdir, "test", num_figures=0, lesion_rules="off")
  assert {"dice_RC", "hd95_RC", "slice_dice_RC"} <= set(result["summary"])
  assert "| Metric | ET | WT | TC | RC | Mean |" in open(
      os.path.join(result["out_dir"], "table.md")).read()
  record = postprocess.postprocess(workdir)
  assert record["label_set"] == "glioma_rc" and "RC" in record["validation"]["dice_before"]
  out = str(tmp_path / "preds")
  predict.predict_folder([run], source, out, save_probabilities=True)
  _check_outputs(source, out, {0, 1, 2, 3, 4})
  with np.load(os.path.join(out, "BraTS-GLI-00001-000.npz")) as saved:
    assert list(saved["channels"]) == ["background", "NETC", "SNFH", "ET", "RC"]
  with pytest.raises(DataError, match="set the label convention explicitly"):
    evaluate_folder.evaluate_folders(out, source, "auto", None, lesion_rules="off")
  rows, summary = evaluate_folder.evaluate_folders(out, source, "gli2024",
                                                   str(tmp_path / "scores"), lesion_rules="off")
  assert "dice_RC" in summary["metrics"]
  # The RC model cannot write 2018-2021 labels, which have no RC.
  with pytest.raises(DataError, match="'glioma_rc' label set .* which the 'brats' convention"):
    predict.predict_folder([run], source, str(tmp_path / "old"), label_convention="brats")
  assert not os.path.exists(tmp_path / "old")
