"""The trainer's settings: intervals that must be positive, options a model must support."""

import pytest

from configs import brats18
from configs import tiny
from msatt_jax import train


@pytest.mark.parametrize("key", ["eval_every_epochs", "checkpoint_every_epochs",
                                 "log_every_steps", "max_checkpoints_to_keep"])
@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_intervals_are_refused(key, value):
  config = tiny.get_config()
  config[key] = value
  with pytest.raises(ValueError, match=f"config.{key} must be a positive whole number"):
    train.check_config(config)


def test_deep_supervision_needs_a_model_with_per_scale_logits():
  config = brats18.get_config("unet")
  config.deep_supervision_weight = 0.5
  with pytest.raises(ValueError, match="deep_supervision_weight=0.5 needs per-scale logits.*"
                                       "'unet' has none"):
    train.check_config(config)
  config = brats18.get_config("msconvlstm_att")
  config.deep_supervision_weight = 0.5
  train.check_config(config)


def test_bad_nan_policy_and_loss_are_refused():
  config = tiny.get_config()
  config.nan_policy = "ignore"
  with pytest.raises(ValueError, match="nan_policy must be one of"):
    train.check_config(config)
  config = tiny.get_config()
  config.loss = "focal"
  with pytest.raises(ValueError, match="focal"):
    train.check_config(config)


def test_periodic_decisions_fire_on_their_interval_and_at_the_last_step():
  assert [s for s in range(1, 12) if train.is_due(s, 4, 11)] == [4, 8, 11]
  assert [s for s in range(1, 9) if train.is_due(s, 4, 8)] == [4, 8]
