"""Losses, the logits -> labels mapping and the in-graph region counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msatt_jax import losses


def _labels():
  lab = np.zeros((2, 8, 8), np.uint8)
  lab[0, 2:5, 2:5] = 2
  lab[0, 3, 3] = 3
  lab[1, 1:3, 1:3] = 1
  return jnp.asarray(lab)


def _perfect_logits(labels, k=4):
  return 20.0 * (2 * jax.nn.one_hot(labels, k) - 1)


@pytest.mark.parametrize("loss", ["dice", "dice_ce"])
def test_softmax_losses_near_zero_for_perfect_logits(loss):
  labels = _labels()
  value = losses.segmentation_loss(_perfect_logits(labels), labels, loss)
  assert float(value) < 1e-4


def test_dice_loss_is_one_when_all_tumour_is_missed():
  labels = _labels()
  logits = _perfect_logits(jnp.zeros_like(labels))  # Predicts background everywhere.
  # Classes 1, 2, 3 all present in the batch and none predicted: every Dice term is ~0.
  assert float(losses.segmentation_loss(logits, labels, "dice")) == pytest.approx(1.0, abs=1e-3)


def test_region_dice_and_label_decoding_round_trip():
  labels = _labels()
  targets = losses.region_targets(labels)
  logits = 20.0 * (2 * targets - 1)
  assert float(losses.segmentation_loss(logits, labels, "region_dice")) < 1e-4
  np.testing.assert_array_equal(losses.logits_to_labels(logits, "region_dice"), labels)
  np.testing.assert_array_equal(losses.logits_to_labels(_perfect_logits(labels), "dice"), labels)


def test_region_counts_per_example():
  labels = _labels()
  pred = labels.at[0, 3, 3].set(2)  # ET voxel called edema: ET and TC lose it, WT keeps it.
  c = losses.region_counts(pred, labels)
  np.testing.assert_array_equal(c["ref_sum"][0], [1, 1, 9])
  np.testing.assert_array_equal(c["pred_sum"][0], [0, 0, 9])
  np.testing.assert_array_equal(c["intersection"][0], [0, 0, 9])
  np.testing.assert_array_equal(c["ref_sum"][1], [0, 4, 4])


def test_gradients_are_finite_and_unknown_loss_is_rejected():
  labels = _labels()
  grad = jax.grad(lambda l: losses.segmentation_loss(l, labels, "dice_ce"))(
      jnp.zeros((2, 8, 8, 4)))
  assert np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0
  assert losses.num_outputs("region_dice") == 3 and losses.num_outputs("dice") == 4
  with pytest.raises(ValueError, match="Unknown config.loss 'focal'"):
    losses.num_outputs("focal")
