"""predict on whole folders: one compilation, skip and overwrite, probabilities, broken cases,
bad requests. The model is a tiny U-Net at its initial weights (nothing is trained here; the
trained run's command-line paths are in tests/test_train.py)."""

import csv
import os
import shutil

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from configs import tiny
from conftest import SMALL_DATA
from data_pipelines.brats import labels as labels_lib
from data_pipelines.brats import layouts
from data_pipelines.errors import DataError
from msatt_jax import inference
from msatt_jax import predict
from msatt_jax import steps


class Counting:
  """A model whose forward passes are counted as they are traced (once per compilation)."""

  def __init__(self, model):
    self.model, self.traces = model, []

  def apply(self, variables, images, train=False):
    self.traces.append(images.shape)
    return self.model.apply(variables, images, train=train)


@pytest.fixture(scope="module")
def run():
  config = tiny.get_config()
  config.model.base_width, config.model.depth = 4, 2
  for key, value in SMALL_DATA.items():
    config.data[key] = value
  model = steps.create_model(config)
  variables = model.init(jax.random.key(0), np.zeros((1, *steps.input_shape(config)), np.float32),
                         train=False)
  return inference.TrainedRun(config=config, variables=variables, step=7, meta={}, model=model,
                              workdir="runs/tiny")


@pytest.fixture(scope="module")
def predictor(run):
  return inference.Predictor.from_runs(run)


def _canonical(path, convention="brats"):
  return labels_lib.to_canonical(np.asarray(nib.load(path).dataobj), convention)


def test_a_brats_folder_is_segmented_with_one_compilation(run, synthetic_brats, tmp_path):
  counting = Counting(run.model)
  predictor = inference.Predictor([(counting, run.variables)], run.config.loss, True,
                                  run.config.data, batch_size=4)
  out = tmp_path / "preds"
  result = predict.predict_folder(predictor, str(synthetic_brats), str(out))
  refs = layouts.find_cases(synthetic_brats)
  assert result.written == [r.case_id for r in refs] and not result.skipped
  assert sorted(os.listdir(out)) == sorted([f"{r.case_id}.nii.gz" for r in refs] +
                                           [predict.RECORD])
  # Whole-brain slice ranges differ per case; the jitted function saw one shape.
  assert counting.traces == [(4 * 4, 32, 32, 4)]
  ref = refs[0]
  written = nib.load(out / f"{ref.case_id}.nii.gz")
  flair = nib.load(ref.image_paths["flair"])
  assert written.shape == flair.shape
  np.testing.assert_allclose(written.affine, flair.affine)
  single = predict.predict_case(predictor, os.path.dirname(ref.image_paths["flair"]),
                                str(tmp_path / "one.nii.gz"))
  np.testing.assert_array_equal(_canonical(out / f"{ref.case_id}.nii.gz"), single)


def test_existing_outputs_are_skipped_unless_overwrite(predictor, synthetic_msd, tmp_path):
  images, out = synthetic_msd / "imagesTr", tmp_path / "preds"
  first = predict.predict_folder(predictor, str(images), str(out), label_convention="msd")
  assert len(first.written) == 4
  target = out / f"{first.written[0]}.nii.gz"
  original = nib.load(target)
  nib.save(nib.Nifti1Image(np.zeros(original.shape, np.uint8), original.affine), target)
  again = predict.predict_folder(predictor, str(images), str(out), label_convention="msd")
  assert again.skipped == first.written and not again.written
  assert not np.asarray(nib.load(target).dataobj).any()  # Left as it was.
  redone = predict.predict_folder(predictor, str(images), str(out), label_convention="msd",
                                    overwrite=True)
  assert redone.written == first.written
  np.testing.assert_array_equal(np.asarray(nib.load(target).dataobj),
                                np.asarray(original.dataobj))
  # Asking for probabilities redoes the cases that lack them.
  with_probs = predict.predict_folder(predictor, str(images), str(out),
                                      label_convention="msd", save_probabilities=True)
  assert with_probs.written == first.written


def test_probabilities_are_saved_in_the_input_geometry(predictor, synthetic_msd, tmp_path,
                                                       synthetic_shape):
  out = tmp_path / "preds"
  result = predict.predict_folder(predictor, str(synthetic_msd / "imagesTr"), str(out),
                                  save_probabilities=True)
  case_id = result.written[0]
  with np.load(out / f"{case_id}.npz") as saved:
    probs, channels = saved["probabilities"], list(saved["channels"])
  assert probs.dtype == np.float16 and probs.shape == (4, *synthetic_shape)
  assert channels == list(labels_lib.CLASS_NAMES)
  np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1, atol=3e-3)
  labels = _canonical(out / f"{case_id}.nii.gz", "msd")  # MSD input: MSD labels by default.
  # The labels are the argmax, wherever float16 rounding (< 2.5e-4 here) cannot swap the top two.
  top = np.sort(probs.astype(np.float32), axis=0)
  clear = top[-1] - top[-2] > 1e-3
  assert clear.mean() > 0.5
  np.testing.assert_array_equal(probs.argmax(0)[clear], labels[clear])
  assert sorted(os.listdir(out)) == sorted([f"{c}{s}" for c in result.written
                                            for s in (".nii.gz", ".npz")] + [predict.RECORD])


def test_unreadable_cases_are_named_and_skipped(predictor, make_synthetic, tmp_path):
  folder = make_synthetic("brats", num_cases=3)
  refs = layouts.find_cases(folder)
  flair = refs[0].image_paths["flair"]
  with open(flair, "r+b") as f:
    f.truncate(os.path.getsize(flair) // 2)
  os.remove(refs[1].image_paths["t1ce"])
  out = tmp_path / "preds"
  with pytest.raises(DataError) as info:
    predict.predict_folder(predictor, str(folder), str(out))
  message = str(info.value)
  assert message.startswith(f"2 of 3 case(s) of {folder} could not be segmented: "
                            f"{refs[0].case_id}, {refs[1].case_id}")
  # The other case, and nothing else but the folder's record.
  assert sorted(os.listdir(out)) == [f"{refs[2].case_id}.nii.gz", predict.RECORD]


def test_bad_folder_requests_fail_before_any_work(predictor, synthetic_msd, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  out = tmp_path / "preds"
  with pytest.raises(DataError, match=f"^{empty}: no case found"):
    predict.predict_folder(predictor, str(empty), str(out))
  with pytest.raises(DataError, match=r"pass its imagesTs/ or imagesTr/ folder"):
    predict.predict_folder(predictor, str(synthetic_msd), str(out))
  assert not out.exists()
  images = synthetic_msd / "imagesTr"
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  with pytest.raises(DataError, match=f"Output folder {a_file} is a file"):
    predict.predict_folder(predictor, str(images), str(a_file))
  with pytest.raises(DataError, match=f"Output folder {a_file}/out is not writable"):
    predict.predict_folder(predictor, str(images), str(a_file / "out"))
  with pytest.raises(DataError, match=r"seg\.nii\.gz: a folder of cases is segmented into"):
    predict.predict_folder(predictor, str(images), str(tmp_path / "seg.nii.gz"))
  # Writing into the image folder would replace the images by their segmentations.
  copy = tmp_path / "images"
  shutil.copytree(images, copy)
  before = {p.name: p.read_bytes() for p in copy.iterdir()}
  with pytest.raises(ValueError, match=f"^{copy}/BRATS_001.nii.gz: would overwrite an input "
                     "file of case BRATS_001"):
    predict.predict_folder(predictor, str(copy), str(copy), save_probabilities=True)
  assert {p.name: p.read_bytes() for p in copy.iterdir()} == before
  assert a_file.read_text() == "x" and not (tmp_path / "seg.nii.gz").exists()


def test_a_single_case_may_not_overwrite_its_image(predictor, synthetic_msd, tmp_path):
  image = tmp_path / "BRATS_001.nii.gz"
  shutil.copy(synthetic_msd / "imagesTr" / image.name, image)
  before = image.read_bytes()
  with pytest.raises(ValueError, match="would overwrite an input file of case BRATS_001"):
    predict.predict_case(predictor, str(image), str(image))
  assert image.read_bytes() == before
  # Beside it, with its probabilities, is fine.
  predict.predict_case(predictor, str(image), str(tmp_path / "seg.nii"), save_probabilities=True)
  assert sorted(os.listdir(tmp_path)) == ["BRATS_001.nii.gz", "seg.nii", "seg.npz"]


def test_folder_or_case_inputs(synthetic_brats, synthetic_msd, tmp_path):
  case_dir = os.path.dirname(layouts.find_cases(synthetic_brats)[0].image_paths["flair"])
  assert predict.is_case_input(case_dir)
  assert predict.is_case_input(str(synthetic_msd / "imagesTr" / "BRATS_001.nii.gz"))
  assert predict.is_case_input(str(tmp_path / "nowhere"))  # Reported by the one-case path.
  assert not predict.is_case_input(str(synthetic_brats))
  assert not predict.is_case_input(str(synthetic_msd / "imagesTr"))
  assert predict.probabilities_path("out/BraTS_1.nii.gz") == "out/BraTS_1.npz"


class ByIntensity:
  """A hand-made member with one-hot logits: the class is set by the FLAIR z-score
  (clip(floor(z) + 2, 0, 3)), moved one class up where `shift` is set and the T1 z-score is
  positive. Members that agree give an entropy of 0; where two disagree, log 2 nats."""

  def apply(self, variables, images, train=False):
    del train
    classes = jnp.clip(jnp.floor(images[..., 0]) + 2, 0, 3).astype(jnp.int32)
    classes = (classes + variables["shift"] * (images[..., 1] > 0)) % 4
    return 1e4 * jax.nn.one_hot(classes, 4)


def _read(path):
  return np.asarray(nib.load(path).dataobj)


@pytest.mark.parametrize("agree", [True, False])
def test_uncertainty_maps_and_report(run, agree, synthetic_msd, tmp_path, synthetic_shape):
  members = [(ByIntensity(), {"shift": jnp.int32(0)}),
             (ByIntensity(), {"shift": jnp.int32(0 if agree else 1)})]
  predictor = inference.Predictor(members, "dice_ce", tta=False, data_config=run.config.data)
  out = tmp_path / "preds"
  result = predict.predict_folder(predictor, str(synthetic_msd / "imagesTr"), str(out),
                                  save_probabilities=True, save_uncertainty=True)
  case = result.written[0]
  paths = predict.uncertainty_paths(str(out / f"{case}.nii.gz"))
  assert paths["entropy"] == str(out / "uncertainty" / f"{case}_entropy.nii.gz")
  entropy, disagreement = _read(paths["entropy"]), _read(paths["disagreement"])
  assert entropy.shape == disagreement.shape == synthetic_shape and entropy.dtype == np.float32
  np.testing.assert_allclose(nib.load(paths["entropy"]).affine,
                             nib.load(out / f"{case}.nii.gz").affine)
  # The entropy of the saved (float16) probabilities, worked out here.
  with np.load(out / f"{case}.npz") as saved:
    probs = saved["probabilities"].astype(np.float64)
  by_hand = -(probs * np.log(np.where(probs > 0, probs, 1))).sum(0)
  np.testing.assert_allclose(entropy, by_hand, atol=1e-3)
  labels = _canonical(out / f"{case}.nii.gz", "msd")  # MSD input: MSD labels by default.
  tumour = labels > 0
  assert tumour.sum() > 100
  assert set(np.unique(disagreement)) <= {0.0, 0.5}
  if agree:  # One-hot members that agree: no entropy anywhere.
    assert not disagreement.any() and not entropy.any()
  else:  # Where one member says one class and the other another: log 2 nats.
    split = disagreement == 0.5
    assert 100 < split.sum() < tumour.sum()
    np.testing.assert_allclose(entropy[split], np.log(2), rtol=1e-6)
    assert not entropy[~split].any()
  with open(out / predict.UNCERTAINTY_REPORT) as f:
    rows = {r["case"]: r for r in csv.DictReader(f)}
  assert sorted(rows) == sorted(result.written)
  assert int(rows[case]["tumour_voxels"]) == tumour.sum()
  assert float(rows[case]["mean_entropy_in_tumour"]) == pytest.approx(
      np.log(2) * split[tumour].mean() if not agree else 0.0, rel=1e-5, abs=1e-9)
  assert float(rows[case]["mean_disagreement_in_tumour"]) == pytest.approx(
      disagreement[tumour].mean(), rel=1e-5, abs=1e-9)
  # One model: the entropy only (no members to disagree).
  single = inference.Predictor(members[:1], "dice_ce", tta=False, data_config=run.config.data)
  seg = tmp_path / "one.nii.gz"
  predict.predict_case(single, str(synthetic_msd / "imagesTr" / f"{case}.nii.gz"), str(seg),
                       save_uncertainty=True)
  assert sorted(os.listdir(tmp_path / "uncertainty")) == ["one_entropy.nii.gz"]
