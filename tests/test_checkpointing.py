"""The Orbax checkpointer: latest + best kept, clear errors, model fingerprints."""

import jax.numpy as jnp
import numpy as np
import pytest

from msatt_jax import checkpointing


def _state(value):
  return {"params": {"conv": {"kernel": jnp.full((3, 3, 1, 2), value)}}, "step": jnp.int32(value)}


def test_keeps_latest_and_best_and_restores(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=2)
  for step, dice in [(10, 0.5), (20, 0.9), (30, None), (40, 0.3), (50, None)]:
    metrics = None if dice is None else {checkpointing.BEST_METRIC: dice}
    ckpt.save(step, _state(step), {"step": step}, metrics)
  ckpt.wait()
  assert ckpt.all_steps() == [20, 40, 50]  # Best (20) + the two newest.
  assert ckpt.resolve("best") == 20 and ckpt.resolve("latest") == 50 and ckpt.resolve(40) == 40
  state, meta = ckpt.restore(20, _state(0))
  assert meta == {"step": 20}
  np.testing.assert_array_equal(state["params"]["conv"]["kernel"], 20)
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 30"):
    ckpt.resolve("30")
  with pytest.raises(ValueError, match="'best', 'latest' or a step"):
    ckpt.resolve("newest")
  ckpt.close()


def test_empty_workdir_and_best_without_metrics(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    ckpt.resolve("latest")
  ckpt.save(5, _state(5), {"step": 5})
  ckpt.wait()
  with pytest.raises(FileNotFoundError, match="use --checkpoint=latest"):
    ckpt.resolve("best")
  ckpt.close()


def test_fingerprint_mismatch_names_the_difference():
  params = {"enc": {"kernel": np.zeros((3, 3, 4, 8))}}
  saved = {"model": "unet", "num_classes": 4, "input_shape": [190, 190, 4],
           "param_shapes": checkpointing.param_shapes(params)}
  checkpointing.check_compatible(saved, dict(saved), "runs/x")
  with pytest.raises(checkpointing.CheckpointMismatchError, match="model: checkpoint has 'unet'"):
    checkpointing.check_compatible(saved, {**saved, "model": "fcn"}, "runs/x")
  wider = checkpointing.param_shapes({"enc": {"kernel": np.zeros((3, 3, 4, 16))}})
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"enc/kernel: \[3, 3, 4, 8\] vs \[3, 3, 4, 16\]"):
    checkpointing.check_compatible(saved, {**saved, "param_shapes": wider}, "runs/x")


def test_metric_log_drops_rows_a_resumed_run_replays(tmp_path):
  import json
  from msatt_jax import writers
  w = writers.MetricWriter(str(tmp_path))
  for step in (10, 20, 30):
    w.write_scalars(step, {"train_loss": step / 10})
  w.close()
  w = writers.MetricWriter(str(tmp_path), start_step=20)  # Resumed from the step-20 checkpoint.
  w.write_scalars(30, {"train_loss": 0.5})
  w.close()
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [(r["step"], r["train_loss"]) for r in rows] == [(10, 1.0), (20, 2.0), (30, 0.5)]
