"""The main job end to end on tiny synthetic data: train, resume, evaluate, predict."""

import json
import os
import shutil

import jax
import nibabel as nib
import numpy as np
import pytest

from configs import tiny
from data_pipelines.brats import labels as labels_lib
from data_pipelines.brats import layouts
from msatt_jax import checkpointing
from msatt_jax import evaluate
from msatt_jax import inference
from msatt_jax import predict
from msatt_jax import train


def _read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One short training of the tiny U-Net, shared by the tests below."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  config = tiny.get_config()
  state = train.train_and_evaluate(config, workdir)
  return workdir, config, state


def test_training_learns_held_out_whole_tumour(trained):
  workdir, config, state = trained
  steps_per_epoch = int(state.step) // config.num_epochs
  assert int(state.step) == config.num_epochs * steps_per_epoch > 0
  result = evaluate.evaluate(workdir, "best", "test", num_figures=1)
  assert result["summary"]["dice_WT"]["mean"] >= 0.8
  out = result["out_dir"]
  for name in ("per_case.csv", "summary.json", "table.md"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  assert len(os.listdir(os.path.join(out, "figures"))) == 1
  assert "| Dice |" in open(os.path.join(out, "table.md")).read()
  logged = _read_metrics(workdir)
  assert any("val_dice_WT" in row for row in logged)
  assert logged[-1]["step"] == int(state.step)


def test_restored_checkpoint_evaluates_identically(trained):
  workdir, _, state = trained
  run = inference.restore_run(workdir, "latest")
  assert run.step == int(state.step)
  jax.tree.map(np.testing.assert_array_equal, run.variables["params"], state.params)
  first = evaluate.evaluate(workdir, "latest", "validation", num_figures=0)
  second = evaluate.evaluate(workdir, "latest", "validation", num_figures=0)
  assert first["per_case"] == second["per_case"]


def test_predict_keeps_shape_affine_and_label_convention(trained, tmp_path):
  workdir, config, _ = trained
  source = os.path.join(workdir, "synthetic")
  ref = layouts.find_cases(source)[0]
  case = layouts.load_case(ref)
  run = inference.restore_run(workdir, "best")
  out_brats = str(tmp_path / "seg_brats.nii.gz")
  seg = predict.predict_case(run, ref.image_paths["flair"], out_brats, "brats")
  written = nib.load(out_brats)
  assert written.shape == case.label.shape
  np.testing.assert_allclose(written.affine, case.affine)
  raw = np.asarray(written.dataobj)
  assert set(np.unique(raw)) <= {0, 1, 2, 4}
  np.testing.assert_array_equal(labels_lib.to_canonical(raw, "brats"), seg)
  out_msd = str(tmp_path / "seg_msd.nii.gz")
  predict.predict_case(run, ref.image_paths["flair"], out_msd, "msd")
  msd_raw = np.asarray(nib.load(out_msd).dataobj)
  np.testing.assert_array_equal(labels_lib.to_canonical(msd_raw, "msd"), seg)
  # 'train' segments only the training slice range, identically to the default whole-brain mode.
  s0, s1 = config.data.slice_start, config.data.slice_stop
  seg_train = predict.predict_case(run, ref.image_paths["flair"], str(tmp_path / "t.nii.gz"),
                                   slices="train")
  np.testing.assert_array_equal(seg_train[..., s0:s1 + 1], seg[..., s0:s1 + 1])
  assert not seg_train[..., :s0].any() and not seg_train[..., s1 + 1:].any()


def test_predict_rejects_unwritable_output_before_work(trained, tmp_path):
  workdir, _, _ = trained
  run = inference.restore_run(workdir, "best")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    predict.predict_case(run, "unused", str(tmp_path / "missing" / "seg.nii.gz"))
  with pytest.raises(ValueError, match=r"\.nii\.gz or \.nii"):
    predict.predict_case(run, "unused", str(tmp_path / "seg.png"))


def test_resume_continues_at_the_same_step_and_learning_rate(trained, tmp_path):
  workdir, config, state = trained
  copy = str(tmp_path / "resumed")
  shutil.copytree(workdir, copy)
  steps_per_epoch = int(state.step) // config.num_epochs
  config = tiny.get_config()
  config.num_epochs += 1
  config.lr_decay_epochs = config.num_epochs - 1  # The decay falls inside the resumed epoch.
  resumed = train.train_and_evaluate(config, copy)
  assert int(resumed.step) == int(state.step) + steps_per_epoch
  new_rows = _read_metrics(copy)[len(_read_metrics(workdir)):]
  assert min(r["step"] for r in new_rows) > int(state.step)  # Nothing re-trained.
  lr = [r["learning_rate"] for r in new_rows if "learning_rate" in r]
  assert lr[-1] == pytest.approx(config.learning_rate * config.lr_decay_factor)


def test_workdir_of_another_model_is_refused_untouched(trained, tmp_path):
  workdir, _, _ = trained
  copy = str(tmp_path / "other")
  shutil.copytree(workdir, copy)
  before = sorted(os.listdir(checkpointing.checkpoint_dir(copy)))
  config = tiny.get_config()
  config.model.base_width = 4
  with pytest.raises(checkpointing.CheckpointMismatchError, match="Use a new --workdir"):
    train.train_and_evaluate(config, copy)
  assert sorted(os.listdir(checkpointing.checkpoint_dir(copy))) == before


def test_missing_data_names_where_to_get_it(tmp_path):
  from configs import brats18
  with pytest.raises(FileNotFoundError, match="Task01_BrainTumour.*--config.data.source_dir"):
    train.prepare_data(brats18.get_config(), str(tmp_path))


REALDATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir,
                        "shared", "realdata", "BraTS2021_00006")


@pytest.mark.realdata
def test_real_case_through_predict_and_evaluate_folder(trained, tmp_path):
  """The real BraTS 2021 case: predict writes a BraTS-labelled volume that evaluate_folder scores.

  The tiny model never saw real data, so only the path is checked, not the scores.
  """
  if not os.path.isdir(REALDATA):
    pytest.skip("../shared/realdata is absent")
  from msatt_jax import evaluate_folder
  workdir, _, _ = trained
  run = inference.restore_run(workdir, "best")
  preds = tmp_path / "preds"
  preds.mkdir()
  out = str(preds / "BraTS2021_00006.nii.gz")
  predict.predict_case(run, REALDATA, out, "brats")
  reference = nib.load(os.path.join(REALDATA, "BraTS2021_00006_seg.nii.gz"))
  written = nib.load(out)
  assert written.shape == reference.shape == (240, 240, 155)
  np.testing.assert_allclose(written.affine, reference.affine)
  assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 4}
  rows, summary = evaluate_folder.evaluate_folders(str(preds), os.path.dirname(REALDATA),
                                                   "brats", out_dir=str(tmp_path / "scores"))
  assert [r["case"] for r in rows] == ["BraTS2021_00006"]
  for key in ("dice_ET", "dice_TC", "dice_WT"):
    assert 0.0 <= rows[0][key] <= 1.0
  assert os.path.isfile(tmp_path / "scores" / "per_case.csv")
