"""The predictor: mirroring TTA, ensembles, probabilities in the volume, ensemble checks.

Small flax modules stand in for trained models (nothing is trained): one made of 1x1 layers,
flip-equivariant by construction, and one 3x3 convolution, which is not.
"""

import dataclasses

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from configs import tiny
from data_pipelines.brats import labels as labels_lib
from data_pipelines.brats import preprocess
from msatt_jax import evaluate
from msatt_jax import inference
from msatt_jax import losses

TRACES = []  # One entry per trace of a model's forward pass (a compilation's).


class Pointwise(nn.Module):
  """1x1 layers only: the output at a pixel depends on that pixel alone."""
  outputs: int = 4

  @nn.compact
  def __call__(self, x, train=False):
    TRACES.append(x.shape)
    return nn.Dense(self.outputs)(nn.relu(nn.Dense(8)(x)))


class Spatial(nn.Module):
  """A 3x3 convolution with random weights: not flip-equivariant."""
  outputs: int = 4

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Conv(self.outputs, (3, 3))(x)


def _images(batch=3, height=8, width=10, seed=0):
  return np.random.RandomState(seed).randn(batch, height, width, 4).astype(np.float32)


def _member(module, seed=1):
  return module, module.init(jax.random.key(seed), _images())


def _probabilities(module, variables, images, loss):
  logits = np.asarray(module.apply(variables, images), np.float64)
  if loss == "region_dice":
    return 1 / (1 + np.exp(-logits))
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("loss", ["dice_ce", "region_dice"])
def test_tta_keeps_the_labels_of_a_flip_equivariant_model(loss):
  member = _member(Pointwise(losses.num_outputs(loss)))
  images = _images()
  plain_labels, plain = inference.Predictor([member], loss, tta=False).with_probabilities(images)
  tta_labels, tta = inference.Predictor([member], loss, tta=True).with_probabilities(images)
  np.testing.assert_array_equal(tta_labels, plain_labels)
  np.testing.assert_allclose(tta, plain, atol=1e-6)
  assert tta_labels.shape == images.shape[:3] and tta_labels.dtype == np.uint8


@pytest.mark.parametrize("loss", ["dice_ce", "region_dice"])
def test_tta_averages_the_four_flips_by_hand(loss):
  module, variables = _member(Spatial(losses.num_outputs(loss)))
  images = _images(height=9)  # Odd and even sizes.
  expected = np.mean([np.flip(_probabilities(module, variables, np.flip(images, axes), loss),
                              axes)
                      for axes in [(), (1,), (2,), (1, 2)]], axis=0)
  labels, probs = inference.Predictor([(module, variables)], loss, tta=True).with_probabilities(
      images)
  np.testing.assert_allclose(probs, expected, atol=1e-5)
  plain = inference.Predictor([(module, variables)], loss, tta=False)(images)
  assert (labels != plain).any()  # The flips changed something: this model is not symmetric.
  np.testing.assert_array_equal(labels, inference.probabilities_to_labels(expected, loss))


@pytest.mark.parametrize("loss", ["dice_ce", "region_dice"])
def test_one_model_without_tta_gives_the_trainers_labels(loss):
  module, variables = _member(Spatial(losses.num_outputs(loss)))
  images = _images()
  expected = np.asarray(losses.logits_to_labels(module.apply(variables, images), loss))
  np.testing.assert_array_equal(inference.Predictor([(module, variables)], loss, tta=False)(images),
                                expected)


def test_an_ensemble_averages_its_members_probabilities_in_one_compilation():
  members = [_member(Pointwise(), seed=1), _member(Pointwise(), seed=2)]
  images = _images()
  expected = np.mean([_probabilities(m, v, images, "dice") for m, v in members], axis=0)
  TRACES.clear()
  predictor = inference.Predictor(members, "dice", tta=True)
  for seed in range(3):
    labels, probs = predictor.with_probabilities(_images(seed=seed))
    if seed == 0:
      np.testing.assert_allclose(probs, expected, atol=1e-5)
      np.testing.assert_array_equal(labels, expected.argmax(-1))
  # Traced once, for both members, with the four views batched: (4 x 3) images.
  assert TRACES == [(12, 8, 10, 4)] * 2


def test_segment_pastes_labels_and_probabilities_back_into_the_volume():
  config = tiny.get_config()
  config.data.crop_size, config.data.slice_start, config.data.slice_stop = 16, 3, 6
  member = _member(Spatial())
  seen = []

  def rules(volume):
    seen.append(volume.copy())
    return np.where(volume == labels_lib.ENHANCING, labels_lib.NCR_NET, volume).astype(np.uint8)

  predictor = inference.Predictor([member], "dice", tta=True, data_config=config.data,
                                  batch_size=3, rules=rules)
  image = np.random.RandomState(0).rand(20, 24, 10, 4).astype(np.float32) + 0.1

  result = predictor.segment(image, with_probabilities=True)
  probs = result.probabilities
  assert probs.shape == (4, 20, 24, 10) and probs.dtype == np.float16
  x0, y0 = preprocess.crop_offsets((20, 24), 16)
  inside = np.zeros((20, 24, 10), bool)
  inside[x0:x0 + 16, y0:y0 + 16, 3:7] = True
  # Outside the crop and the slices: background, with probability 1.
  assert (probs[0][~inside] == 1).all() and (probs[1:][:, ~inside] == 0).all()
  np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1, atol=3e-3)
  np.testing.assert_array_equal(result.unprocessed, seen[0])
  assert (result.unprocessed[~inside] == 0).all()
  top = np.sort(probs.astype(np.float32), axis=0)
  clear = inside & (top[-1] - top[-2] > 1e-3)  # float16 rounding cannot swap the top two.
  assert clear.sum() > inside.sum() // 2
  np.testing.assert_array_equal(probs.argmax(0)[clear], result.unprocessed[clear])
  assert not (result.labels == labels_lib.ENHANCING).any()
  plain = inference.Predictor([member], "dice", tta=True, data_config=config.data, batch_size=3)
  np.testing.assert_array_equal(plain.segment(image).labels, result.unprocessed)


def test_a_window_larger_than_the_volume_pastes_back_every_output_inside_it():
  config = tiny.get_config()
  config.data.crop_size, config.data.slice_start, config.data.slice_stop = 16, 2, 5
  members = [_member(Spatial(), seed=1), _member(Spatial(), seed=2)]
  predictor = inference.Predictor(members, "dice", tta=False, data_config=config.data,
                                  batch_size=4)
  image = np.random.RandomState(0).rand(12, 14, 8, 4).astype(np.float32) + 0.1
  assert preprocess.crop_offsets((12, 14), 16) == (-2, -1)  # Padded on every side.
  result = predictor.segment(image, with_probabilities=True, with_uncertainty=True)
  assert result.entropy.shape == result.disagreement.shape == result.labels.shape == (12, 14, 8)
  probs = result.probabilities.astype(np.float64)
  by_hand = -(probs * np.log(np.where(probs > 0, probs, 1))).sum(0)  # 0 outside the slices.
  np.testing.assert_allclose(result.entropy, by_hand, atol=2e-3)
  assert result.entropy[..., 2:6].min() > 0 and not result.entropy[..., 6:].any()
  # Of two members, none, one or both may differ from the average's argmax.
  assert set(np.unique(result.disagreement)) <= {0.0, 0.5, 1.0}
  assert result.disagreement[..., 2:6].any() and not result.disagreement[..., 6:].any()


def _run(workdir, loss="dice_ce", **data):
  config = tiny.get_config()
  config.loss = loss
  for key, value in data.items():
    config.data[key] = value
  # As restored from a checkpoint's JSON: tuples become lists.
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.modalities = list(config.data.modalities)
  module, variables = _member(Pointwise(losses.num_outputs(loss)))
  return inference.TrainedRun(config=config, variables=variables, step=1,
                              meta={"data": {"source_dir": f"{workdir}/src",
                                             "data_dir": f"{workdir}/prepared"}},
                              model=module, workdir=workdir)


@pytest.mark.parametrize("change,phrase", [
    (dict(crop_size=40), "data.crop_size=40"),
    (dict(modalities=("flair", "t1", "t1ce")), "data.modalities"),
    (dict(slice_start=9), "data.slice_start=9"),
    (dict(normalize="none"), "data.normalize='none'"),
    (dict(loss="region_dice"), "output='sigmoid regions'"),
])
def test_an_ensemble_of_different_inputs_or_outputs_is_refused(change, phrase):
  first = _run("runs/f0")
  other = _run("runs/f1", **change)
  with pytest.raises(ValueError) as info:
    inference.Predictor.from_runs([first, other])
  message = str(info.value)
  assert message.startswith("runs/f1: trained with ") and phrase in message
  assert "runs/f0" in message and "\n" not in message
  inference.Predictor.from_runs([first, _run("runs/f2", loss="dice")])  # dice and dice_ce: softmax.


def test_an_ensemble_is_evaluated_only_on_a_shared_split(monkeypatch):
  splits = {"runs/f0/prepared": ["a", "b"], "runs/f1/prepared": ["b", "a"],
            "runs/f2/prepared": ["a", "c"]}
  monkeypatch.setattr(evaluate.input_pipeline, "split_cases",
                      lambda data_config, split: splits[data_config.data_dir])
  runs = [_run(f"runs/f{i}") for i in range(3)]
  evaluate._check_same_split(runs[:2], "test", ["a", "b"])  # The same cases in any order.
  with pytest.raises(ValueError, match=r"^runs/f2: its test split differs from that of runs/f0 "
                     r"\(cases b, c\)"):
    evaluate._check_same_split(runs, "test", ["a", "b"])


def test_run_data_config_leaves_the_runs_config_as_it_was():
  run = _run("runs/f0")
  before = run.config.data.to_dict()
  data = inference.run_data_config(run, source_dir="elsewhere")
  assert data.source_dir == "elsewhere" and data.data_dir == "runs/f0/prepared"
  assert run.config.data.to_dict() == before
  assert inference.run_data_config(run).source_dir == "runs/f0/src"


def test_options_are_frozen_and_checked():
  options = inference.Options(tta=False)
  with pytest.raises(dataclasses.FrozenInstanceError):
    options.tta = True
  with pytest.raises(ValueError, match="--batch_size must be at least 1, got 0"):
    inference.Options(batch_size=0)
