"""Training and validation of the segmentation models.

  python -m msatt_jax.train --config=configs/brats18.py --workdir=runs/paper \
      --config.data.source_dir=/data/Task01_BrainTumour

A workdir that already holds checkpoints of the same model resumes from the newest complete one,
with the same learning rate and data order.

Faults. SIGTERM (preemption) or SIGINT (Ctrl-C) during training saves a checkpoint of the step
reached, waits for it to commit, and exits with status 128 + the signal (143, 130); a kill -9
loses at most the steps since the last checkpoint (a save it interrupts is never read). Either
way, rerunning the same command continues bit for bit as if uninterrupted. A NaN or Inf loss
stops the run with exit status 1, naming the step, without saving that state (or skips the
update with --config.nan_policy=skip); so does a checkpoint that cannot be written (a full disk),
the earlier checkpoints staying intact.
"""

if __name__ == "__main__":
  # Before JAX loads: the XLA flags and allocator settings (msatt_jax/runtime.py) must be in
  # the environment from the start, which may re-execute this process once.
  from msatt_jax import runtime
  runtime.configure()

import contextlib
import itertools
import json
import os
import signal
import time
from typing import Any, Dict, Iterator, List, Optional

from absl import logging
import jax
import ml_collections
import numpy as np

from data_pipelines import input_pipeline
from data_pipelines import prepare as prepare_lib
from data_pipelines.brats import builder as builder_lib
from data_pipelines.brats import labels as labels_lib
from msatt_jax import checkpointing
from msatt_jax import losses
from msatt_jax import memory
from msatt_jax import models
from msatt_jax import parallel
from msatt_jax import preemption
from msatt_jax import steps
from msatt_jax import validation
from msatt_jax import workdir_lock
from msatt_jax import writers


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the bad state was not saved."""


NAN_POLICIES = ("stop", "skip")
# Intervals of the periodic decisions: each must be a positive whole number.
_INTERVAL_KEYS = ("eval_every_epochs", "checkpoint_every_epochs", "log_every_steps",
                  "max_checkpoints_to_keep")


def check_config(config: ml_collections.ConfigDict) -> None:
  """The training settings that no later step would catch with a clear message."""
  losses.check_loss(config.loss)
  # The preprocessing (folds included) before any synthetic case is generated or data prepared.
  builder_lib.config_from_data_config(config.data)
  if config.nan_policy not in NAN_POLICIES:
    raise ValueError(f"config.nan_policy must be one of {NAN_POLICIES}, "
                     f"not {config.nan_policy!r}.")
  for key in _INTERVAL_KEYS:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{key} must be a positive whole number, not {value!r}.")
  value = config.eval_every_steps
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"config.eval_every_steps must be 0 (use eval_every_epochs) or a positive "
                     f"whole number, not {value!r}.")
  if config.deep_supervision_weight and config.model.name not in models.DEEP_SUPERVISION_MODELS:
    raise ValueError(
        f"config.deep_supervision_weight={config.deep_supervision_weight} needs per-scale "
        f"logits, which only {', '.join(models.DEEP_SUPERVISION_MODELS)} produces; "
        f"{config.model.name!r} has none. Set it to 0.")


def is_due(step: int, every: int, last_step: int) -> bool:
  """The one rule of every periodic decision (log, validate, save): each `every` steps, and at
  the last step."""
  return step % every == 0 or step == last_step


def model_fingerprint(config: ml_collections.ConfigDict, params: Any) -> Dict[str, Any]:
  return {"model": config.model.name,
          "num_classes": losses.num_outputs(config.loss, losses.label_set_name(config)),
          "input_shape": list(steps.input_shape(config)),
          "param_shapes": checkpointing.param_shapes(params)}


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> steps.TrainState:
  """Trains `config` in `workdir` (resuming if it holds checkpoints) and returns the final state."""
  check_config(config)
  # First: jax.distributed must start before any computation, and bad device or batch settings
  # stop the run before data are prepared or anything is written.
  par = parallel.from_config(config)
  # One run per workdir: the primary process holds the lock (the processes of one run share it).
  with workdir_lock.hold(workdir) if par.is_primary else contextlib.nullcontext():
    return _train(config, workdir, par)


def _train(config: ml_collections.ConfigDict, workdir: str,
           par: parallel.Parallel) -> steps.TrainState:
  os.makedirs(workdir, exist_ok=True)
  data_config = par.primary_first(lambda: prepare_lib.prepare_for_training(config.data, workdir))
  steps_per_epoch = input_pipeline.steps_per_epoch(data_config, config.batch_size)
  num_steps = (config.num_train_steps if config.num_train_steps > 0
               else config.num_epochs * steps_per_epoch)
  eval_every = config.eval_every_steps or config.eval_every_epochs * steps_per_epoch
  checkpoint_every = config.checkpoint_every_epochs * steps_per_epoch

  learning_rate_fn = steps.create_learning_rate_fn(config, steps_per_epoch)
  model = steps.create_model(config, axis_name=par.axis_name)
  # In the canonical layout, the one checkpoints are written and restored in.
  state = par.create_state(lambda rng: steps.create_train_state(rng, config, model,
                                                                learning_rate_fn),
                           jax.random.key(config.seed))
  fingerprint = model_fingerprint(config, state.params)

  checkpointer = checkpointing.Checkpointer(
      workdir, config.max_checkpoints_to_keep,
      is_periodic=lambda step: step % checkpoint_every == 0)
  latest = checkpointer.latest_step()
  if latest is not None:
    # A damaged newest checkpoint is moved aside and the one before it resumed, with a warning.
    latest, state, _ = checkpointer.restore_newest_intact(
        state, lambda meta: checkpointing.check_compatible(meta["model"], fingerprint,
                                                           checkpointer.directory))
    logging.info("Resumed from the checkpoint at step %d.", latest)
  start_step = int(state.step)

  # The step functions take host batches (this process's rows for training, a whole global
  # batch for evaluation) and the state in the strategy's layout; the train step donates it.
  state = par.to_step_layout(state)
  p_train_step = par.train_step_fn(steps.make_train_step(config, learning_rate_fn))
  p_eval_step = par.eval_step_fn(steps.make_eval_step(config))
  # One copy of the logs; checkpoints are written by every process together.
  writer = writers.MetricWriter(workdir, start_step) if par.is_primary else writers.Discard()
  meta = {"config": json.loads(config.to_json_best_effort()), "model": fingerprint,
          "data": {"source_dir": data_config.source_dir, "data_dir": data_config.data_dir},
          "steps_per_epoch": steps_per_epoch}
  saves = _Saves(checkpointer, par, meta, saved_step=start_step if latest is not None else None)
  pending = _PendingMetrics(config.nan_policy, checkpointer)

  logging.info("Training %s for %d steps (%d per epoch, batch %d) from step %d in %s (%s).",
               config.model.name, num_steps, steps_per_epoch, config.batch_size, start_step,
               workdir, par.describe())
  # Each process reads only its own rows of every global batch.
  batches = input_pipeline.train_iterator(data_config, batch_size=config.batch_size,
                                          seed=config.seed, start_step=start_step,
                                          process_index=par.process_index,
                                          process_count=par.process_count)
  first_batch = next(batches)
  check_working_set(config, data_config, par, p_train_step, p_eval_step, state, first_batch)
  batches = itertools.chain([first_batch], batches)
  progress = _Progress(config, num_steps, steps_per_epoch, start_step, writer)
  # From here SIGTERM/SIGINT only set a flag, acted on at the next step boundary. Before, the
  # defaults apply: nothing needs saving, and data preparation is atomic on its own.
  with preemption.PreemptionGuard() as guard, _flush_and_wait(checkpointer, writer):
    for step in range(start_step, num_steps):
      state, step_metrics = p_train_step(state, next(batches))
      pending.append(step_metrics)
      done = step + 1
      validate = is_due(done, eval_every, num_steps)
      periodic_save = is_due(done, checkpoint_every, num_steps)
      if is_due(done, config.log_every_steps, num_steps) or validate or periodic_save:
        progress.log(done, pending.fetch_checked(done))
      val = None
      if validate:
        val = _validate(config, data_config, p_eval_step, state, done, writer)
        progress.pause()  # Validation time is not training throughput.
      saves.after_step(done, state, val, periodic_save)
      signum = preemption.agreed_signal(guard)
      if signum is not None and done < num_steps:  # At the last step the run is complete.
        pending.fetch_checked(done)  # Never saves past a non-finite loss under policy 'stop'.
        saves.before_exit(done, state)
        logging.warning("%s received: saved the checkpoint of step %d.",
                        preemption.signal_name(signum), done)
        raise preemption.Preempted(signum, done, checkpointer.directory)
  pending.fetch_checked(num_steps)
  checkpointer.close()
  writer.close()
  return par.to_canonical(state)


class _Saves:
  """Which steps are saved: the periodic ones (the latest N kept), each new best validation
  Dice, and the step reached when a signal stops the run."""

  def __init__(self, checkpointer: checkpointing.Checkpointer, par: parallel.Parallel,
               meta: Dict[str, Any], saved_step: Optional[int]):
    self._checkpointer, self._par, self._meta = checkpointer, par, meta
    self._best = checkpointer.best_metric()
    self._saved_step = saved_step  # Step of the newest save started.

  def _save(self, step: int, state: Any, val: Optional[Dict[str, float]] = None) -> None:
    self._checkpointer.save(step, self._par.to_canonical(state),
                            {**self._meta, "step": step, "metrics": val or {}}, val)
    self._saved_step = step

  def after_step(self, step: int, state: Any, val: Optional[Dict[str, float]],
                 periodic: bool) -> None:
    new_best = val is not None and (self._best is None or
                                    val[checkpointing.BEST_METRIC] > self._best)
    if periodic or new_best:
      self._save(step, state, val)
    if new_best:
      self._best = val[checkpointing.BEST_METRIC]

  def before_exit(self, step: int, state: Any) -> None:
    """Saves `step` unless it is saved already, and waits until the save is committed."""
    if self._saved_step != step:
      self._save(step, state)
    self._checkpointer.wait()


class _PendingMetrics:
  """Device-side metrics of recent steps, fetched to the host together (one transfer per log
  line, not per step) and checked against the non-finite-loss policy when fetched."""

  def __init__(self, nan_policy: str, checkpointer: checkpointing.Checkpointer):
    self._nan_policy, self._checkpointer = nan_policy, checkpointer
    self._pending: List[Dict[str, Any]] = []

  def append(self, step_metrics: Dict[str, Any]) -> None:
    self._pending.append(step_metrics)

  def fetch_checked(self, step: int) -> List[Dict[str, Any]]:
    fetched = jax.device_get(self._pending)
    self._pending = []
    _check_finite(fetched, step - len(fetched), self._nan_policy, self._checkpointer)
    return fetched


def _validate(config: ml_collections.ConfigDict, data_config: ml_collections.ConfigDict,
              eval_step: parallel.CompiledStep, state: Any, step: int,
              writer: Any) -> Dict[str, float]:
  """Validation Dice of the label set's regions: logged, summarised and returned."""
  regions = labels_lib.label_set(losses.label_set_name(config)).region_names
  val, sample = validation.evaluate_slices(
      eval_step, state, input_pipeline.eval_batches(data_config, "validation", config.batch_size),
      regions)
  writer.write_scalars(step, val)
  writer.write_images(step, validation.sample_overlays(sample))
  memory.release_free_heap()
  scores = "  ".join(f"{region} {val[f'val_dice_{region}']:.4f}" for region in regions)
  logging.info("step %d validation Dice  %s  mean %.4f  %s", step, scores,
               val["val_dice_mean"], memory.usage_text())
  return val


def check_working_set(config: ml_collections.ConfigDict, data_config: ml_collections.ConfigDict,
                      par: parallel.Parallel, train_step: parallel.CompiledStep,
                      eval_step: parallel.CompiledStep, state: Any,
                      batch: Dict[str, np.ndarray]) -> memory.WorkingSet:
  """Logs the run's working-set estimate; refuses a run that would not fit (config.memory_check).

  Compiles both steps (the loop then finds them in the jit cache).
  """
  on_device = jax.local_devices()[0].platform != "cpu"
  working_set = memory.WorkingSet(
      process=memory.rss_bytes(),
      train_step=memory.step_bytes(train_step.memory(state, batch)),
      # Validation batches are whole global batches on every process.
      eval_step=memory.step_bytes(eval_step.memory(
          state, {k: np.concatenate([v] * par.process_count) for k, v in batch.items()})),
      pipeline=input_pipeline.buffer_bytes(data_config, config.batch_size // par.process_count),
      on_device=on_device)
  logging.info("Working set: %s.", working_set.describe())
  reason = memory.check_fits(working_set, refuse=config.memory_check)
  if reason:
    logging.warning("Going ahead although %s (config.memory_check=False).", reason)
  return working_set


class _Progress:
  """The training log line (console, TensorBoard, metrics.jsonl): loss, rate and ETA."""

  def __init__(self, config: ml_collections.ConfigDict, num_steps: int, steps_per_epoch: int,
               start_step: int, writer: Any):
    self._batch_size, self._num_steps = config.batch_size, num_steps
    self._steps_per_epoch, self._start_step, self._writer = steps_per_epoch, start_step, writer
    self._t_start = self._t_log = time.perf_counter()
    self._step_log = start_step

  def pause(self) -> None:
    """Time until now (validation, say) does not count towards the next rate."""
    self._t_log = time.perf_counter()

  def log(self, step: int, fetched: List[Dict[str, Any]]) -> None:
    now = time.perf_counter()
    rate = (step - self._step_log) * self._batch_size / max(now - self._t_log, 1e-9)
    loss = float(np.mean([m["loss"] for m in fetched if not m["nonfinite"]] or [np.nan]))
    learning_rate = fetched[-1]["learning_rate"]
    self._writer.write_scalars(step, {"train_loss": loss, "learning_rate": learning_rate,
                                      "slices_per_second": rate})
    eta = (self._num_steps - step) * (now - self._t_start) / max(step - self._start_step, 1)
    logging.info("step %d/%d  epoch %.1f  loss %.4f  lr %.2e  %.1f slices/s  ETA %s  %s", step,
                 self._num_steps, step / self._steps_per_epoch, loss, learning_rate, rate,
                 _format_seconds(eta), memory.usage_text())
    self._t_log, self._step_log = now, step


@contextlib.contextmanager
def _flush_and_wait(checkpointer: checkpointing.Checkpointer, writer: Any) -> Iterator[None]:
  """On any exit of the loop: the save in flight commits, the logs reach the disk."""
  try:
    yield
  finally:
    try:
      checkpointer.wait()
    finally:
      writer.flush()


def _check_finite(fetched, first_step: int, policy: str, checkpointer) -> None:
  """Stops the run at the first non-finite loss (policy 'stop'), or logs skipped steps."""
  bad = [first_step + i + 1 for i, m in enumerate(fetched) if m["nonfinite"]]
  if not bad:
    return
  if policy == "skip":
    logging.warning("Skipped %d update(s) with a non-finite loss at steps %s.", len(bad), bad)
    return
  checkpointer.wait()
  last = checkpointer.latest_step()
  raise NonFiniteLossError(
      f"The loss became NaN or Inf at step {bad[0]}; the run stopped without saving that "
      f"state. Last good checkpoint: {'none' if last is None else f'step {last}'}. "
      "Lower the learning rate, check the data, or set --config.nan_policy=skip.")


# ----------------------------------------------------------------------------- command line
def define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and summaries.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from msatt_jax import cli  # pylint: disable=g-import-not-at-top
  try:
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except preemption.Preempted as e:
    # Not a failure and not a success: the shell's status for "stopped by this signal".
    raise cli.CommandExit(str(e), e.exit_status) from e
  except KeyboardInterrupt:
    # Ctrl-C before the training loop (data preparation, compilation): nothing to save.
    raise cli.CommandExit("Interrupted before training started; no checkpoint was written by "
                          "this run. Rerun the same command to start again.",
                          128 + signal.SIGINT) from None


def run() -> None:
  from msatt_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run_command(main, define_flags)


if __name__ == "__main__":
  run()
