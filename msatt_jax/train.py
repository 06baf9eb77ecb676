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
import functools
import json
import os
import shutil
import signal
import sys
import time
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

from absl import logging
import jax
import ml_collections
import numpy as np

from data_pipelines import input_pipeline
from data_pipelines import synthetic
from data_pipelines.brats import labels as labels_lib
from data_pipelines.prepare import prepare as prepare_dataset
from msatt_jax import checkpointing
from msatt_jax import losses
from msatt_jax import metrics as metrics_lib
from msatt_jax import parallel
from msatt_jax import preemption
from msatt_jax.steps import (TrainState, create_learning_rate_fn, create_model,
                              create_train_state, eval_step, input_shape, train_step)
from msatt_jax import visualize
from msatt_jax import writers


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the bad state was not saved."""


NAN_POLICIES = ("stop", "skip")


def check_nan_policy(policy: str) -> None:
  if policy not in NAN_POLICIES:
    raise ValueError(f"config.nan_policy must be one of {NAN_POLICIES}, not {policy!r}.")


def evaluate_slices(p_eval_step, state: TrainState, batches: Iterator[Dict[str, np.ndarray]]
                    ) -> Tuple[Dict[str, float], Optional[Dict[str, np.ndarray]]]:
  """Dice per case (3D over the prepared slices) averaged over cases; also a sample batch."""
  counts: Dict[str, np.ndarray] = {}
  sample = None
  for batch in batches:
    mask = np.asarray(batch["mask"], bool)
    out = jax.device_get(p_eval_step(state, {"image": batch["image"], "label": batch["label"]}))
    if sample is None:
      sample = {"image": batch["image"], "label": batch["label"], "pred": out["pred"]}
    stacked = np.stack([out["intersection"], out["pred_sum"], out["ref_sum"]], axis=1)
    for case_id, row in zip(np.asarray(batch["case_id"])[mask], stacked[mask]):
      key = case_id.decode() if isinstance(case_id, bytes) else str(case_id)
      counts[key] = counts.get(key, 0) + row
  if not counts:
    raise ValueError("The validation split is empty.")
  per_region = {region: [] for region in labels_lib.REGIONS}
  for row in counts.values():
    for r, region in enumerate(labels_lib.REGIONS):
      per_region[region].append(metrics_lib.dice_from_counts(*row[:, r]))
  summary = {f"val_dice_{region}": float(np.mean(v)) for region, v in per_region.items()}
  summary["val_dice_mean"] = float(np.mean([summary[f"val_dice_{r}"]
                                            for r in labels_lib.REGIONS]))
  return summary, sample


def sample_overlays(sample: Dict[str, np.ndarray], limit: int = 4) -> Dict[str, np.ndarray]:
  """TensorBoard pictures: truth and prediction over the first modality of a few slices."""
  n = min(limit, len(sample["image"]))
  truth = [visualize.overlay(sample["image"][i, ..., 0], sample["label"][i]) for i in range(n)]
  pred = [visualize.overlay(sample["image"][i, ..., 0], sample["pred"][i]) for i in range(n)]
  return {"validation/truth": np.stack(truth), "validation/prediction": np.stack(pred)}


def model_fingerprint(config: ml_collections.ConfigDict, params: Any) -> Dict[str, Any]:
  return {"model": config.model.name, "num_classes": losses.num_outputs(config.loss),
          "input_shape": list(input_shape(config)),
          "param_shapes": checkpointing.param_shapes(params)}


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """The data config with its folders resolved, the data generated and prepared if need be.

  Without `data.source_dir`, a config with `data.synthetic_cases > 0` (the demo) generates a
  synthetic BraTS-like set into <workdir>/synthetic; any other config stops with a message
  saying where to get the data.
  """
  data_config = ml_collections.ConfigDict(config.data.to_dict())
  if data_config.source_dir is None:
    if config.data.synthetic_cases <= 0:
      raise FileNotFoundError(
          "No training data: set --config.data.source_dir to the Medical Segmentation "
          "Decathlon Task01_BrainTumour folder (http://medicaldecathlon.com) or to the BraTS "
          "2018 training folder (registration on the BraTS challenge site), e.g. "
          "--config.data.source_dir=/data/Task01_BrainTumour.")
    data_config.source_dir = os.path.join(os.path.abspath(workdir), "synthetic")
    if data_config.data_dir is None:
      data_config.data_dir = os.path.join(os.path.abspath(workdir), "prepared")
    if not os.path.isdir(data_config.source_dir):
      _generate_synthetic(data_config)
  elif not os.path.isdir(data_config.source_dir):
    raise FileNotFoundError(f"{data_config.source_dir}: --config.data.source_dir is not a folder.")
  prepare_dataset(data_config)
  return data_config


def _generate_synthetic(data_config: ml_collections.ConfigDict) -> None:
  """Generates into a temporary folder renamed at the end: a killed run leaves no partial set."""
  tmp = data_config.source_dir + ".incomplete"
  if os.path.isdir(tmp):
    shutil.rmtree(tmp)
  logging.info("Generating %d synthetic cases of shape %s into %s.", data_config.synthetic_cases,
               tuple(data_config.synthetic_shape), data_config.source_dir)
  synthetic.generate_dataset(tmp, data_config.synthetic_layout, data_config.synthetic_cases,
                             shape=tuple(data_config.synthetic_shape), seed=data_config.split_seed)
  os.replace(tmp, data_config.source_dir)


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains `config` in `workdir` (resuming if it holds checkpoints) and returns the final state."""
  losses.check_loss(config.loss)
  check_nan_policy(config.nan_policy)
  # First: jax.distributed must start before any computation, and bad device or batch settings
  # stop the run before data are prepared or anything is written.
  par = parallel.from_config(config)
  os.makedirs(workdir, exist_ok=True)
  data_config = par.primary_first(lambda: prepare_data(config, workdir))
  steps_per_epoch = input_pipeline.steps_per_epoch(data_config, config.batch_size)
  num_steps = (config.num_train_steps if config.num_train_steps > 0
               else config.num_epochs * steps_per_epoch)
  eval_every = max(1, config.eval_every_epochs) * steps_per_epoch
  checkpoint_every = max(1, config.checkpoint_every_epochs) * steps_per_epoch

  learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch)
  model = create_model(config, axis_name=par.axis_name)
  rng = jax.random.key(config.seed)
  # In the canonical layout, the one checkpoints are written and restored in.
  state = par.create_state(functools.partial(create_train_state, config=config, model=model,
                                             learning_rate_fn=learning_rate_fn), rng)
  fingerprint = model_fingerprint(config, state.params)

  checkpointer = checkpointing.Checkpointer(workdir, config.max_checkpoints_to_keep)
  latest = checkpointer.latest_step()
  if latest is not None:
    checkpointing.check_compatible(checkpointer.restore_meta(latest)["model"], fingerprint,
                                   checkpointer.directory)
    state, _ = checkpointer.restore(latest, state)
    logging.info("Resumed from the checkpoint at step %d.", latest)
  start_step = int(state.step)

  # The step functions take host batches (this process's rows for training, a whole global
  # batch for evaluation) and the state in the strategy's layout; the train step donates it.
  state = par.place_state(state)
  p_train_step = par.train_step_fn(
      functools.partial(train_step, learning_rate_fn=learning_rate_fn, loss=config.loss,
                        ce_weight=config.ce_weight,
                        deep_supervision_weight=config.deep_supervision_weight))
  p_eval_step = par.eval_step_fn(functools.partial(eval_step, loss=config.loss))
  # One copy of the logs; checkpoints are written by every process together.
  writer = writers.MetricWriter(workdir, start_step) if par.is_primary else parallel.Discard()
  meta_base = {"config": json.loads(config.to_json_best_effort()), "model": fingerprint,
               "data": {"source_dir": data_config.source_dir, "data_dir": data_config.data_dir},
               "steps_per_epoch": steps_per_epoch}

  saved = [start_step if latest is not None else None]  # Step of the newest save started.

  def save(step: int, val: Optional[Dict[str, float]] = None) -> None:
    checkpointer.save(step, par.unreplicate(state),
                      {**meta_base, "step": step, "metrics": val or {}}, val)
    saved[0] = step

  logging.info("Training %s for %d steps (%d per epoch, batch %d) from step %d in %s (%s).",
               config.model.name, num_steps, steps_per_epoch, config.batch_size, start_step,
               workdir, par.describe())
  # Each process reads only its own rows of every global batch.
  batches = input_pipeline.train_iterator(data_config, batch_size=config.batch_size,
                                          seed=config.seed, start_step=start_step,
                                          process_index=par.process_index,
                                          process_count=par.process_count)
  pending = []  # Device-side metrics of recent steps, fetched together at log time.
  t_log, step_log = time.perf_counter(), start_step
  t_start = time.perf_counter()
  step = start_step
  # From here SIGTERM/SIGINT only set a flag, acted on at the next step boundary. Before, the
  # defaults apply: nothing needs saving, and data preparation is atomic on its own.
  with preemption.PreemptionGuard() as guard, _flush_and_wait(checkpointer, writer):
    for step in range(start_step, num_steps):
      batch = next(batches)
      state, step_metrics = p_train_step(state, batch)
      pending.append(step_metrics)
      done = step + 1
      is_eval = done % eval_every == 0 or done == num_steps
      if done % config.log_every_steps == 0 or is_eval or done % checkpoint_every == 0:
        fetched = jax.device_get(pending)
        pending = []
        _check_finite(fetched, done - len(fetched), config.nan_policy, checkpointer)
        now = time.perf_counter()
        rate = (done - step_log) * config.batch_size / max(now - t_log, 1e-9)
        loss_value = float(np.mean([m["loss"] for m in fetched if not m["nonfinite"]] or [np.nan]))
        writer.write_scalars(done, {"train_loss": loss_value,
                                    "learning_rate": fetched[-1]["learning_rate"],
                                    "slices_per_second": rate})
        eta = (num_steps - done) * (now - t_start) / max(done - start_step, 1)
        logging.info("step %d/%d  epoch %.1f  loss %.4f  lr %.2e  %.1f slices/s  ETA %s", done,
                     num_steps, done / steps_per_epoch, loss_value,
                     fetched[-1]["learning_rate"], rate, _format_seconds(eta))
        t_log, step_log = now, done
      val = None
      if is_eval:
        val, sample = evaluate_slices(p_eval_step, state, input_pipeline.eval_batches(
            data_config, "validation", config.batch_size))
        writer.write_scalars(done, val)
        writer.write_images(done, sample_overlays(sample))
        t_log = time.perf_counter()  # Validation time is not training throughput.
        logging.info("step %d validation Dice  ET %.4f  TC %.4f  WT %.4f  mean %.4f", done,
                     val["val_dice_ET"], val["val_dice_TC"], val["val_dice_WT"],
                     val["val_dice_mean"])
      if is_eval or done % checkpoint_every == 0:
        save(done, val)
      signum = preemption.agreed_signal(guard)
      if signum is not None and done < num_steps:  # At the last step the run is complete.
        # Never saves past a non-finite loss under policy 'stop' (raises instead).
        _check_finite(jax.device_get(pending), done - len(pending), config.nan_policy,
                      checkpointer)
        pending = []
        if saved[0] != done:
          save(done)
        checkpointer.wait()  # The checkpoint is committed before the process exits.
        logging.warning("%s received: saved the checkpoint of step %d.",
                        preemption.signal_name(signum), done)
        raise preemption.Preempted(signum, done, checkpointer.directory)
  if pending:
    _check_finite(jax.device_get(pending), num_steps - len(pending), config.nan_policy,
                  checkpointer)
  checkpointer.close()
  writer.close()
  return par.unreplicate(state)


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
def main(argv):
  del argv
  from absl import flags
  from msatt_jax import cli
  cli.hide_accelerators_from_tensorflow()
  cli.setup_logging()
  config = flags.FLAGS.config
  try:
    cli.run_or_exit(lambda: train_and_evaluate(config, flags.FLAGS.workdir))
  except preemption.Preempted as e:
    # Not a failure and not a success: the shell's status for "stopped by this signal".
    print(str(e), file=sys.stderr)
    sys.exit(e.exit_status)
  except checkpointing.CheckpointSaveError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    # Ctrl-C before the training loop (data preparation, compilation): nothing to save.
    print("Interrupted before training started; no checkpoint was written by this run. Rerun "
          "the same command to start again.", file=sys.stderr)
    sys.exit(128 + signal.SIGINT)


def _config_key_error(argv: Sequence[str], error: Exception) -> str:
  """One line naming the --config.<key> override that names no key of the config."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]  # ml_collections wraps a KeyError into an AttributeError.
  text = " ".join(str(error.args[0] if error.args else error).split())
  overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
  key = text.split("'")[1] if text.count("'") >= 2 else ""
  culprit = next((o for o in overrides if o.split(".")[-1] == key), None)
  where = culprit or (", ".join(overrides) if overrides else "--config")
  return f"{where}: the config has no key {text}"


def _parse_flags(argv: Sequence[str]) -> Sequence[str]:
  """absl's flag parsing, with an unknown --config key reported in one line, not a traceback."""
  from absl import app, flags
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    print(f"FATAL Flags parsing error: {_config_key_error(argv, e)}", file=sys.stderr)
    sys.exit(1)


def run():
  from msatt_jax import runtime
  runtime.configure()  # A no-op when the module's own guard above already ran it.
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and summaries.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
