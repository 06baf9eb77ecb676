"""Orbax checkpoints of a run: the train state plus a JSON record of what produced it.

One `CheckpointManager` under `<workdir>/checkpoints` keeps the newest `max_to_keep` checkpoints
and, besides them, the one with the best validation mean Dice. Saves are asynchronous and atomic:
Orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it to `<step>` only once it is
complete, so a run killed mid-save (even by kill -9) resumes from the previous complete
checkpoint; a partial one is never listed or read, and the next (writable) start deletes it.
A save that fails (a full disk) raises CheckpointSaveError naming the step and the cause; Orbax
deletes old steps only after a save commits, so the previous checkpoints stay readable.
"""

import errno
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

BEST_METRIC = "val_dice_mean"


class CheckpointMismatchError(ValueError):
  """A workdir's checkpoints were written by another model or input shape."""


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (e.g. the disk is full); earlier ones are intact."""


def _cause(error: BaseException) -> str:
  """The short reason of a failed write: the OS error's text where one is known."""
  code = getattr(error, "errno", None)
  if code is None:  # TensorStore reports OS errors inside a ValueError's text.
    match = re.search(r"os_error_code='?(\d+)", str(error))
    code = int(match.group(1)) if match else None
  if code:
    return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
  text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return text if len(text) <= 300 else text[:300] + " ..."


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def _best_value(metrics: Mapping[str, float]) -> float:
  return float(metrics[BEST_METRIC])


class Checkpointer:
  """Latest + best checkpoints of one run."""

  def __init__(self, workdir: str, max_to_keep: int = 3, read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=max_to_keep),
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
    """Restores into the structure, shapes and shardings of `abstract_state`."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

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
    kept = (f"The complete checkpoints {steps} are intact; once the cause is fixed (e.g. disk "
            f"space freed), rerun the same command to resume from step {steps[-1]}." if steps
            else "No earlier checkpoint exists; once the cause is fixed, rerun the same command.")
    what = "a checkpoint" if step is None else f"the checkpoint of step {step}"
    raise CheckpointSaveError(
        f"Could not save {what} in {self.directory}: {_cause(error)}. The run stopped; the "
        f"unfinished save will never be read. {kept}") from error

  def close(self) -> None:
    self._manager.close()


def param_shapes(params: Any) -> Dict[str, list]:
  """'path/to/param' -> shape, the fingerprint that says whether a checkpoint fits a model."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): list(np.shape(leaf))
          for path, leaf in flat}


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
