"""Orbax checkpoints of a run: the train state plus a JSON record of what produced it.

One `CheckpointManager` under `<workdir>/checkpoints` keeps the newest `max_to_keep` checkpoints
of the periodic schedule, the one with the best validation mean Dice, and the newest of all (a
final or preemption save, which a restart resumes from). Saves are asynchronous and atomic:
Orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it to `<step>` only once it is
complete, so a run killed mid-save (even by kill -9) resumes from the previous complete
checkpoint; a partial one is never listed or read, and the next (writable) start deletes it.
A save that fails (a full disk) raises CheckpointSaveError naming the step and the cause; Orbax
deletes old steps only after a save commits, so the previous checkpoints stay readable.
"""

import dataclasses
import errno
import os
import re
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from absl import logging
from flax import traverse_util
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

BEST_METRIC = "val_dice_mean"


class CheckpointMismatchError(ValueError):
  """A workdir's checkpoints were written by another model or input shape."""


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (e.g. the disk is full); earlier ones are intact."""


class CheckpointRestoreError(ValueError):
  """A committed checkpoint could not be read back (a file truncated or missing)."""


DAMAGED_DIR = "damaged_checkpoints"  # Beside checkpoints/: damaged steps moved aside, kept.


def _error_code(error: BaseException) -> Optional[int]:
  """The OS error number behind a failed write, where one is known."""
  code = getattr(error, "errno", None)
  if code is None:  # TensorStore reports OS errors inside a ValueError's text.
    match = re.search(r"os_error_code='?(\d+)", str(error))
    code = int(match.group(1)) if match else None
  return code or None


def describe_error(error: BaseException) -> str:
  """The short reason of a failed write: the OS error's text where one is known."""
  code = _error_code(error)
  if code:
    return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
  text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return text if len(text) <= 300 else text[:300] + " ..."


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def _best_value(metrics: Mapping[str, float]) -> float:
  return float(metrics[BEST_METRIC])


@dataclasses.dataclass
class LatestPeriodic:
  """An Orbax preservation policy: the newest `n` checkpoints whose step is periodic."""
  n: int
  is_periodic: Callable[[int], bool]

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
    del context
    periodic = [i for i, c in enumerate(checkpoints) if self.is_periodic(c.step)]
    keep = set(periodic[-self.n:]) if self.n > 0 else set()
    return [i in keep for i in range(len(checkpoints))]


class Checkpointer:
  """Periodic + best + newest checkpoints of one run.

  is_periodic: which steps belong to the periodic schedule (default: every save).
  """

  def __init__(self, workdir: str, max_to_keep: int = 3, read_only: bool = False,
               is_periodic: Callable[[int], bool] = lambda step: True):
    self.directory = checkpoint_dir(workdir)
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=1),
        LatestPeriodic(n=max_to_keep, is_periodic=is_periodic),
        checkpoint_managers.BestN(get_metric_fn=_best_value, n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=_best_value, best_mode="max",
        read_only=read_only, create=not read_only, cleanup_tmp_directories=not read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))
    self._saving: Optional[int] = None  # Step of the save in flight, to name it if it fails.

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def best_step(self) -> Optional[int]:
    return self._manager.best_step()

  def best_metric(self) -> Optional[float]:
    """The best validation mean Dice among the checkpoints, None before the first validation."""
    step = self.best_step()
    metrics = None if step is None else self._manager.metrics(step)
    return None if not metrics else _best_value(metrics)

  def all_steps(self):
    return self._manager.all_steps()

  def resolve(self, which: Union[str, int]) -> int:
    """'latest' | 'best' | a step number -> a step that exists, or a clear error."""
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"{self.directory}: no complete checkpoint found.")
    if which == "latest":
      return self.latest_step()
    if which == "best":
      step = self.best_step()
      if step is None or self._manager.metrics(step) is None:
        raise FileNotFoundError(f"{self.directory}: no checkpoint has validation metrics yet; "
                                "use --checkpoint=latest.")
      return step
    try:
      step = int(which)
    except ValueError:
      raise ValueError(f"--checkpoint must be 'best', 'latest' or a step, not {which!r}.") from None
    if step not in steps:
      raise FileNotFoundError(f"{self.directory}: no checkpoint at step {step}; "
                              f"available: {sorted(steps)}.")
    return step

  def save(self, step: int, state: Any, meta: Dict[str, Any],
           metrics: Optional[Dict[str, float]] = None) -> None:
    """Starts an asynchronous save; `wait()` (or the next save) completes it.

    Raises CheckpointSaveError if this save or the previous one fails.
    """
    self.wait()  # A failure of the previous save is reported as that step's.
    self._saving = step
    try:
      self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)),
                         metrics=metrics, force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._raise_save_error(e)

  def restore_meta(self, step: int) -> Dict[str, Any]:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore(self, step: int, abstract_state: Any) -> Tuple[Any, Dict[str, Any]]:
    """Restores into the structure, shapes and shardings of `abstract_state`.

    Raises CheckpointRestoreError naming the step when its files cannot be read back.
    """
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointRestoreError(
          f"{os.path.join(self.directory, str(step))}: the checkpoint of step {step} cannot be "
          f"restored ({describe_error(e)}).") from e
    return restored.state, restored.meta

  def restore_newest_intact(self, abstract_state: Any,
                            check_meta: Callable[[Dict[str, Any]], None] = lambda meta: None
                            ) -> Tuple[int, Any, Dict[str, Any]]:
    """Restores the newest checkpoint that reads back whole; newer damaged ones are moved aside.

    `check_meta` may refuse a checkpoint (a different model): its error propagates at once,
    since the workdir is then someone else's, not damaged. When no checkpoint restores, nothing
    is moved and CheckpointRestoreError lists them all.
    """
    failures = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        meta = self.restore_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        failures.append((step, f"{os.path.join(self.directory, str(step))}: its record cannot "
                               f"be read ({describe_error(e)})"))
        continue
      check_meta(meta)
      try:
        state, meta = self.restore(step, abstract_state)
      except CheckpointRestoreError as e:
        failures.append((step, str(e)))
        continue
      for bad, reason in failures:
        moved = self._move_aside(bad)
        logging.warning("%s Moved it to %s and resumed from step %d instead.", reason, moved,
                        step)
      return step, state, meta
    raise CheckpointRestoreError(
        "No checkpoint in this workdir can be restored, so nothing was started over them: " +
        "; ".join(reason.rstrip(".") for _, reason in failures) +
        ". Restore the files from a copy, or move "
        "the checkpoints folder away to start from scratch.")

  def _move_aside(self, step: int) -> str:
    """Renames a damaged step folder out of Orbax's sight (never deletes it)."""
    target_dir = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, f"{step}.{time.strftime('%Y%m%d-%H%M%S')}")
    try:
      os.rename(os.path.join(self.directory, str(step)), target)
    except FileNotFoundError:  # Another process of the same multi-host run moved it first.
      pass
    self._manager.reload()
    return target

  def wait(self) -> None:
    """Blocks until the save in flight is committed; CheckpointSaveError if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._raise_save_error(e)
    self._saving = None

  def steps_on_disk(self) -> List[int]:
    """Complete checkpoints as a fresh reader sees them (what a restart would resume from)."""
    return sorted(ocp.path.step.checkpoint_steps(self.directory))

  def _raise_save_error(self, error: Exception) -> None:
    step, self._saving = self._saving, None
    try:
      steps = self.steps_on_disk()
    except Exception:  # pylint: disable=broad-except
      steps = []
    # Steps this run never saved (or saved and deleted) mean another process wrote here.
    foreign = sorted(set(steps) - set(self._manager.all_steps()) - {step})
    what = "a checkpoint" if step is None else f"the checkpoint of step {step}"
    if foreign:
      cause = (f"another process changed the checkpoint folder while this run was saving (it "
               f"holds steps {foreign} this run did not write): only one run may use a workdir")
      fix = "once the other run has stopped"
    elif _error_code(error) == errno.ENOSPC:
      cause, fix = describe_error(error), "once disk space is freed"
    else:
      cause, fix = describe_error(error), "once the cause is fixed"
    kept = (f"The complete checkpoints {steps} are intact; {fix}, rerun the same command to "
            f"resume from step {steps[-1]}." if steps
            else f"No earlier checkpoint exists; {fix}, rerun the same command.")
    raise CheckpointSaveError(
        f"Could not save {what} in {self.directory}: {cause}. The run stopped; the unfinished "
        f"save will never be read. {kept}") from error

  def close(self) -> None:
    self._manager.close()


def param_shapes(params: Any) -> Dict[str, list]:
  """'path/to/param' -> shape, the fingerprint that says whether a checkpoint fits a model."""
  return {path: list(np.shape(leaf))
          for path, leaf in traverse_util.flatten_dict(params, sep="/").items()}


def check_compatible(saved: Dict[str, Any], current: Dict[str, Any], where: str) -> None:
  """Raises CheckpointMismatchError naming the differences between two model fingerprints."""
  problems = []
  for key in ("model", "num_classes", "input_shape"):
    if saved.get(key) != current.get(key):
      problems.append(f"{key}: checkpoint has {saved.get(key)!r}, this run {current.get(key)!r}")
  saved_shapes, shapes = saved.get("param_shapes", {}), current["param_shapes"]
  if not problems and saved_shapes != shapes:
    changed = sorted(k for k in set(saved_shapes) | set(shapes)
                     if saved_shapes.get(k) != shapes.get(k))
    problems.append(f"{len(changed)} parameters differ, e.g. " + "; ".join(
        f"{k}: {saved_shapes.get(k)} vs {shapes.get(k)}" for k in changed[:3]))
  if problems:
    raise CheckpointMismatchError(
        f"{where} holds checkpoints of a different model or input: " + "; ".join(problems) +
        ". Use a new --workdir (nothing was overwritten).")
