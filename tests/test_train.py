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
from msatt_jax import metrics
from msatt_jax import predict
from msatt_jax import train

import helpers

LATEST = inference.Options(checkpoint="latest")
NOTTA = inference.Options(tta=False)
NOTTA_NOPP = inference.Options(tta=False, postprocess="none")

# Every test reads one training run: the slow lane (`pytest -m "not slow"` leaves the module out).
pytestmark = pytest.mark.slow



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
  result = evaluate.evaluate(workdir, "test", num_figures=1)
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
  first = evaluate.evaluate(workdir, "validation", LATEST, num_figures=0)
  second = evaluate.evaluate(workdir, "validation", LATEST, num_figures=0)
  assert first["per_case"] == second["per_case"]


def test_predict_keeps_shape_affine_and_label_convention(trained, tmp_path):
  workdir, config, _ = trained
  source = os.path.join(workdir, "synthetic")
  ref = layouts.find_cases(source)[0]
  case = layouts.load_case(ref)
  run = inference.restore_run(workdir, "best")
  out_brats = str(tmp_path / "seg_brats.nii.gz")
  seg = predict.predict_case(run, ref.image_paths["flair"], out_brats, label_convention="brats")
  written = nib.load(out_brats)
  assert written.shape == case.label.shape
  np.testing.assert_allclose(written.affine, case.affine)
  raw = np.asarray(written.dataobj)
  assert set(np.unique(raw)) <= {0, 1, 2, 4}
  np.testing.assert_array_equal(labels_lib.to_canonical(raw, "brats"), seg)
  out_msd = str(tmp_path / "seg_msd.nii.gz")
  predict.predict_case(run, ref.image_paths["flair"], out_msd, label_convention="msd")
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


def test_evaluate_records_tta_and_the_hd95_definition(trained):
  workdir, _, _ = trained
  result = evaluate.evaluate(workdir, "test", NOTTA, num_figures=0, hd95_mode="max")
  out = result["out_dir"]
  assert out == os.path.join(workdir, f"eval_test_step{result['step']}_notta_hd95max")
  with open(os.path.join(out, "summary.json")) as f:
    summary = json.load(f)
  assert summary["tta"] is False and summary["hd95_mode"] == "max"
  assert summary["hd95"] == metrics.HD95_DEFINITIONS["max"]
  assert summary["runs"] == [{"workdir": workdir, "model": "unet",
                              "checkpoint_step": result["step"]}]
  table = open(os.path.join(out, "table.md")).read()
  assert "no test-time augmentation" in table and metrics.HD95_DEFINITIONS["max"] in table
  assert "| Sensitivity |" in table and "| Specificity |" in table
  assert {"sensitivity_ET", "specificity_WT"} <= set(result["per_case"][0])


def test_an_ensemble_of_two_runs_averages_their_probabilities(trained, tmp_path):
  workdir, _, _ = trained
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  single = evaluate.evaluate(workdir, "test", NOTTA, num_figures=0)
  # Two copies of one model: the average is that model's probabilities, so the same scores.
  both = evaluate.evaluate([workdir, copy], "test", NOTTA, num_figures=0)
  assert both["per_case"] == single["per_case"]
  assert os.path.basename(both["out_dir"]) == (
      f"eval_test_ensemble2_step{single['step']}-{single['step']}_notta")
  with open(os.path.join(both["out_dir"], "summary.json")) as f:
    assert [r["workdir"] for r in json.load(f)["runs"]] == [workdir, copy]


def test_predict_command_segments_a_folder_with_an_ensemble(trained, tmp_path):
  """Progress lines, probabilities, a broken case named and skipped, exit status 1."""
  workdir, _, _ = trained
  images = tmp_path / "images"
  shutil.copytree(os.path.join(workdir, "synthetic", "imagesTr"), images)
  broken = sorted(images.iterdir())[1]
  broken.write_bytes(broken.read_bytes()[:1000])
  out = tmp_path / "preds"
  proc = helpers.run_module("msatt_jax.predict", f"--workdir={workdir},{workdir}",
                            f"--input={images}", f"--output={out}", "--save_probabilities",
                            timeout=600)
  assert proc.returncode == 1, proc.stderr[-3000:]
  case_ids = sorted(p.name[:-len(".nii.gz")] for p in images.iterdir())
  broken_id = broken.name[:-len(".nii.gz")]
  others = [c for c in case_ids if c != broken_id]
  assert sorted(os.listdir(out)) == sorted([f"{c}{s}" for c in others for s in (".nii.gz", ".npz")]
                                           + [predict.RECORD])
  assert f"[{len(case_ids)}/{len(case_ids)}] {case_ids[-1]} -> " in proc.stderr
  assert "ETA" in proc.stderr
  assert len([line for line in proc.stderr.splitlines() if broken_id in line and "skipped"
              in line]) == 1
  (error,) = helpers.error_lines(proc.stderr)
  assert f"1 of {len(case_ids)} case(s)" in error and broken_id in error
  written = nib.load(out / f"{others[0]}.nii.gz")
  assert written.shape == nib.load(images / f"{others[0]}.nii.gz").shape[:3]


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


def test_periodic_saves_are_independent_of_validation(trained):
  """Periodic saves every checkpoint_every_epochs; validation keeps only its best as 'best'."""
  workdir, config, state = trained
  steps_per_epoch = int(state.step) // config.num_epochs
  validations = [(r["step"], r["val_dice_mean"]) for r in _read_metrics(workdir)
                 if "val_dice_mean" in r]
  assert [s for s, _ in validations] == [
      e * steps_per_epoch for e in range(config.eval_every_epochs, config.num_epochs + 1,
                                         config.eval_every_epochs)]
  best_step = max(validations, key=lambda v: v[1])[0]  # The first of equal bests.
  periodic = [e * steps_per_epoch for e in range(config.checkpoint_every_epochs,
                                                 config.num_epochs + 1,
                                                 config.checkpoint_every_epochs)]
  ckpt = checkpointing.Checkpointer(workdir, read_only=True)
  assert ckpt.all_steps() == sorted(set(periodic[-config.max_checkpoints_to_keep:]) |
                                    {best_step})
  assert ckpt.resolve("best") == best_step
  assert ckpt.best_metric() == pytest.approx(max(v for _, v in validations))
  ckpt.close()


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
  predict.predict_case(run, REALDATA, out, label_convention="brats")
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


def test_postprocess_command_then_evaluate_and_predict_apply_the_rules(trained, tmp_path):
  """postprocessing.json chosen on the validation split, then applied (or not) by default."""
  from data_pipelines import input_pipeline
  from msatt_jax import postprocess
  workdir, _, _ = trained
  run_dir = str(tmp_path / "run")
  shutil.copytree(workdir, run_dir)
  proc = helpers.run_module("msatt_jax.postprocess", f"--workdir={run_dir}", timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  path = os.path.join(run_dir, postprocess.FILE_NAME)
  with open(path) as f:
    record = json.load(f)
  run = inference.restore_run(run_dir, "best")
  validation = input_pipeline.split_cases(inference.run_data_config(run), "validation")
  assert record["validation"]["cases"] == sorted(validation)
  assert record["runs"] == [{"workdir": run_dir, "model": "unet", "checkpoint_step": run.step}]
  assert record["tta"] is True and record["connectivity"] == 26
  assert record["objective"] == "voxel" and record["lesion_rules"] is None
  before, after = record["validation"]["dice_before"], record["validation"]["dice_after"]
  assert after["mean"] >= before["mean"]
  assert (after["mean"] > before["mean"]) != postprocess.rules_from_json(
      record["rules"]).is_identity
  assert f"Rules: {record['description']}" in proc.stdout
  assert not [n for n in os.listdir(run_dir) if n.endswith(".tmp")]

  # evaluate applies the run's file by default and scores before and after it.
  result = evaluate.evaluate(run_dir, "test", num_figures=0)
  assert result["out_dir"] == os.path.join(run_dir, f"eval_test_step{run.step}")
  assert result["postprocessing"]["file"] == path
  plain = evaluate.evaluate(run_dir, "test", inference.Options(postprocess="none"),
                            num_figures=0)
  assert plain["out_dir"].endswith("_nopostprocess") and plain["summary_unprocessed"] is None
  assert result["per_case_unprocessed"] == plain["per_case"]
  with open(os.path.join(result["out_dir"], "summary.json")) as f:
    summary = json.load(f)
  assert summary["postprocessing"]["rules"] == record["rules"]
  assert summary["metrics_unprocessed"]["dice_WT"] == plain["summary"]["dice_WT"]
  table = open(os.path.join(result["out_dir"], "table.md")).read()
  assert table.count("| Dice |") == 2 and "postprocessing: none (the network's" in table
  assert os.path.isfile(os.path.join(result["out_dir"], "per_case_unprocessed.csv"))

  # Rules that remove every WT component: applied by evaluate and by predict, skipped by none.
  remove_all = tmp_path / "remove_all.json"
  remove_all.write_text(json.dumps({"rules": {"min_component_voxels": {"WT": 10**7}}}))
  result = evaluate.evaluate(run_dir, "test",
                             inference.Options(tta=False, postprocess=str(remove_all)),
                             num_figures=0)
  assert result["out_dir"].endswith("_notta_postprocess-remove_all")
  assert [r["dice_WT"] for r in result["per_case"]] == [0.0] * len(result["per_case"])
  assert all(r["dice_WT"] > 0.5 for r in result["per_case_unprocessed"])
  image = layouts.find_cases(os.path.join(workdir, "synthetic"))[0].image_paths["flair"]
  out = tmp_path / "seg.nii.gz"
  proc = helpers.run_module("msatt_jax.predict", f"--workdir={run_dir}", f"--input={image}",
                            f"--output={out}", f"--postprocess={remove_all}", timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "WT components < 10000000 voxels -> background" in proc.stdout
  assert not np.asarray(nib.load(str(out)).dataobj).any()
  seg = predict.predict_case(run, image, str(tmp_path / "plain.nii.gz"))
  assert seg.any()


def test_evaluate_and_postprocess_lesion_wise(trained, tmp_path):
  """--lesion_rules in evaluate (columns, lesions.csv/md, table rows) and
  postprocess --objective=lesion (recorded with each case's rule set)."""
  from msatt_jax import postprocess
  workdir, _, _ = trained
  out = str(tmp_path / "eval")
  result = evaluate.evaluate(workdir, "test", NOTTA_NOPP, out_dir=out, num_figures=0,
                             lesion_rules="gli2023")
  for row in result["per_case"]:
    assert row["lesion_rules"] == "gli2023" and 0.0 <= row["lesion_dice_WT"] <= 1.0
    assert row["lesions_tp_WT"] + row["lesions_fn_WT"] >= 0 and "lesion_hd95_ET" in row
  assert {"lesions.csv", "lesions.md", "per_case.csv"} <= set(os.listdir(out))
  table = open(os.path.join(out, "table.md")).read()
  assert "| Lesion-wise Dice |" in table and "| Lesion-wise HD95 (mm) |" in table
  with open(os.path.join(out, "summary.json")) as f:
    assert json.load(f)["lesion_rules"]["requested"] == "gli2023"
  plain = evaluate.evaluate(workdir, "test", NOTTA_NOPP, out_dir=out, num_figures=0,
                            lesion_rules="off")
  assert "lesion_dice_WT" not in plain["per_case"][0] and "lesions.csv" not in os.listdir(out)
  record = postprocess.postprocess(workdir, NOTTA, out=str(tmp_path / "pp.json"),
                                   objective="lesion", lesion_rules="met2023")
  assert record["objective"] == "lesion" and set(record["lesion_rules"].values()) == {"met2023"}
  assert sorted(record["lesion_rules"]) == record["validation"]["cases"]
  assert record["validation"]["dice_after"]["mean"] >= record["validation"]["dice_before"]["mean"]
