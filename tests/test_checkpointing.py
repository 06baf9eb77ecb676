"""The Orbax checkpointer: latest + best kept, clear errors, model fingerprints."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.faults import damage
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


def test_periodic_checkpoints_are_kept_apart_from_the_best_and_the_newest(tmp_path):
  # Periodic every 30 steps; the saves at 10, 20 and 50 carry validation metrics; 95 is a
  # preemption save.
  ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=2,
                                    is_periodic=lambda step: step % 30 == 0)
  saves = [(10, 0.4), (20, 0.8), (30, None), (50, 0.6), (60, None), (90, None), (95, None)]
  for step, dice in saves:
    metrics = None if dice is None else {checkpointing.BEST_METRIC: dice}
    ckpt.save(step, _state(step), {"step": step}, metrics)
  ckpt.wait()
  # Best (20), the two newest periodic (60, 90), the newest of all (95).
  assert ckpt.all_steps() == [20, 60, 90, 95]
  assert ckpt.best_metric() == 0.8 and ckpt.resolve("best") == 20
  assert ckpt.resolve("latest") == 95
  ckpt.close()


def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_restored(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=3)
  for step in (10, 20, 30):
    ckpt.save(step, _state(step), {"step": step})
  ckpt.wait()
  damage(tmp_path, 30)
  with pytest.raises(checkpointing.CheckpointRestoreError, match="step 30 cannot be restored"):
    ckpt.restore(30, _state(0))
  step, state, meta = ckpt.restore_newest_intact(_state(0))
  assert step == 20 and meta == {"step": 20}
  np.testing.assert_array_equal(state["params"]["conv"]["kernel"], 20)
  assert ckpt.all_steps() == [10, 20]
  moved = os.listdir(tmp_path / checkpointing.DAMAGED_DIR)
  assert len(moved) == 1 and moved[0].startswith("30.")  # Renamed, never deleted.
  ckpt.close()


def test_when_no_checkpoint_restores_nothing_is_moved_and_all_are_named(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=3)
  for step in (10, 20):
    ckpt.save(step, _state(step), {"step": step})
  ckpt.wait()
  for step in (10, 20):
    damage(tmp_path, step)
  with pytest.raises(checkpointing.CheckpointRestoreError,
                     match=r"No checkpoint .* can be restored.*step 20.*step 10"):
    ckpt.restore_newest_intact(_state(0))
  assert ckpt.all_steps() == [10, 20]
  assert not os.path.exists(tmp_path / checkpointing.DAMAGED_DIR)
  ckpt.close()


def test_a_different_model_is_refused_not_treated_as_damage(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=3)
  ckpt.save(10, _state(10), {"step": 10})
  ckpt.wait()

  def refuse(meta):
    raise checkpointing.CheckpointMismatchError("another model")

  with pytest.raises(checkpointing.CheckpointMismatchError):
    ckpt.restore_newest_intact(_state(0), refuse)
  assert ckpt.all_steps() == [10]
  ckpt.close()


def test_a_failed_save_names_the_real_cause(tmp_path):
  import errno
  ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=3)
  ckpt.save(10, _state(10), {"step": 10})
  ckpt.wait()
  ckpt._saving = 20  # pylint: disable=protected-access
  with pytest.raises(checkpointing.CheckpointSaveError,
                     match=r"step 20 .*No space left on device \(ENOSPC\).*once disk space is "
                           r"freed, rerun the same command to resume from step 10"):
    ckpt._raise_save_error(OSError(errno.ENOSPC, "full"))  # pylint: disable=protected-access
  # A second run on the same workdir writes a step this one never saved.
  other = checkpointing.Checkpointer(str(tmp_path), max_to_keep=3)
  other.save(15, _state(15), {"step": 15})
  other.wait()
  ckpt._saving = 20  # pylint: disable=protected-access
  with pytest.raises(checkpointing.CheckpointSaveError) as raised:
    ckpt._raise_save_error(ValueError("No ArrayMetadata found"))  # pylint: disable=protected-access
  message = str(raised.value)
  assert "another process changed the checkpoint folder" in message and "[15]" in message
  assert "disk space" not in message
  other.close()
  ckpt.close()


def test_a_reader_names_the_damaged_step_and_the_flag_to_pick_another(tmp_path):
  from msatt_jax import inference
  ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=3)
  for step in (10, 20):
    ckpt.save(step, _state(step), {"step": step})
  ckpt.wait()
  ckpt.close()
  damage(tmp_path, 20)
  reader = checkpointing.Checkpointer(str(tmp_path), read_only=True)
  try:
    reader.restore(20, _state(0))
  except checkpointing.CheckpointRestoreError as e:
    error = inference._damaged(reader, 20, e)  # pylint: disable=protected-access
  message = str(error)
  assert "checkpoint of step 20 is damaged" in message
  assert "--checkpoint=STEP (available: [10])" in message
  assert message.count("cannot be restored") == 1
  reader.close()


def test_unretrieved_errors_of_orbax_reads_do_not_reach_the_console(caplog):
  # What a failed restore leaves behind: sibling reads of the damaged checkpoint whose errors
  # nobody retrieves; asyncio logs each one when its task is collected. Other tasks still log.
  # The filter is part of every model command's console log.
  import asyncio  # pylint: disable=g-import-not-at-top
  import gc  # pylint: disable=g-import-not-at-top
  from msatt_jax import cli  # pylint: disable=g-import-not-at-top
  cli.setup_logging()

  async def async_deserialize():  # The name of Orbax's read coroutine.
    raise ValueError("DATA_LOSS: Error reading params/.zarray")

  async def some_other_task():
    raise ValueError("an unrelated failure")

  def orphan(coro_fn):
    loop = asyncio.new_event_loop()
    try:
      task = loop.create_task(coro_fn())
      loop.run_until_complete(asyncio.sleep(0.01))
      assert task.done()
    finally:
      loop.close()
    del task
    gc.collect()

  with caplog.at_level("ERROR", logger="asyncio"):
    orphan(async_deserialize)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    orphan(some_other_task)
    assert [r for r in caplog.records if "some_other_task" in r.getMessage()]

