r"""Fault injection: kills, preemption, a second launch, readers and damaged checkpoints.

  python -m benchmarks.faults --rounds 50 [--jobs 3] [--seed 0] [--workdir DIR]
      [--scenarios interrupts,second_launch,evaluate_during_training,damaged_checkpoint]
      [--max_minutes M]   (no round starts after M minutes: as many rounds as fit)

Trains a tiny U-Net (4 synthetic cases, batch 8: a checkpoint every 5 steps, 30 steps, random
augmentation on) once without interruption as the reference. Each round then trains the same run
in a fresh workdir under one scenario, taken in rotation:
  interrupts       the run is interrupted 1 to 3 times, each time one of
                     kill9          kill -9 at a random moment: anywhere in the process's life, or
                                    after a random step; half of the time saves are slowed (0.2 s
                                    before each commit) so the kill often lands inside one
                     kill9_in_save  kill -9 while the save of a random step is written but not yet
                                    committed
                     sigterm        SIGTERM after a random step (preemption)
                     sigint         SIGINT after a random step (Ctrl-C)
                   and then finishes
  second_launch    the same command again while the run trains (after a random step; half of the
                   time with the first process frozen by SIGSTOP, so that the check that the
                   second changed nothing is exact): it must stop at once with one error line
                   naming the holder's process id; the first finishes, and a third start resumes
  evaluate_during_training
                   `evaluate --checkpoint=latest` in a loop while the run trains and saves, one of
                   them while the save of a random step is held just before its commit: each
                   reads a committed step (the newest one while the other is in flight) or fails
                   with one error line; evaluate never takes the training lock
  damaged_checkpoint
                   SIGTERM after a random step, then the data files of the newest 1 to n-1
                   committed checkpoints are truncated (an interrupted copy of the run folder):
                   the rerun names each, moves them to damaged_checkpoints/ and resumes from the
                   newest intact one (a third of the time `evaluate --checkpoint=latest` is asked
                   first and must refuse, naming the step); a fifth of the time every checkpoint
                   is damaged: the rerun must stop with one error line listing them, moving and
                   writing nothing, and the round then moves the checkpoints folder away and
                   trains from scratch.
A round survives with nothing lost when
  - every start resumed from the newest complete (and intact) checkpoint on disk, never a
    partial one,
  - every SIGTERM/SIGINT exited with 128 + the signal after committing the step it had reached,
  - every refused start (a second launch, all checkpoints damaged) exited 1 and changed nothing,
  - no partial checkpoint folder is left once the run has finished, and
  - the final parameters and batch statistics are bit-identical to the reference's.
Prints one line per round, then the totals per scenario; the processes go through
tests/faults_run.py, which injects the slow and stalled saves. Compiled programs are shared
through a persistent JAX compilation cache, so only the reference run compiles. Everything runs
from a copy of the code taken at the start (<workdir>/code): edits to the working tree while the
benchmark runs cannot make the rounds differ from the reference.

The helpers that start the processes and read their checkpoints, and the checks of the second
launch, evaluation during training and damaged checkpoints, are tests/test_faults.py's too,
which imports them from here: the soak and the tests check a run the same way.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 300  # Seconds for any one process: a hang fails its check instead of blocking.
NUM_STEPS = 30
STEPS_PER_SAVE = 5  # 40 train slices / batch 8, a checkpoint every epoch.
SAVE_STEPS = tuple(range(STEPS_PER_SAVE, NUM_STEPS + 1, STEPS_PER_SAVE))
STEP_DELAY = 0.03  # Seconds added to each step: the training phase lasts about a second or two.
SLOW_SAVE = 0.2  # Seconds before each commit when saves are slowed.
KINDS = ("kill9", "kill9_in_save", "sigterm", "sigint")
SHAPE = (48, 48, 40)


class Lost(AssertionError):
  """A run lost something: a check failed (under pytest, a test failure)."""


# ------------------------------------------ shared with tests/test_faults.py: runs, checkpoints


def tiny_train_args(batch_size: int) -> List[str]:
  """Train flags of a U-Net of a few thousand parameters on 32x32 crops of slices 10..29, a
  checkpoint every epoch and no validation; augmentation on, so exact resume covers the random
  flips and intensity draws too."""
  return ["--config=configs/demo.py:unet", "--config.data.slice_start=10",
          "--config.data.slice_stop=29", "--config.data.crop_size=32",
          "--config.model.base_width=4", "--config.model.depth=2",
          f"--config.batch_size={batch_size}", "--config.checkpoint_every_epochs=1",
          "--config.eval_every_epochs=100", "--config.log_every_steps=1",
          "--config.data.augment=True"]


def process_env(cache_dir: Path) -> Dict[str, str]:
  """This environment with a persistent JAX compilation cache, which every process shares:
  only the first run compiles."""
  return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
          "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def train_command(*args: str, code: Path = REPO) -> List[str]:
  """The train command through the fault injector (a plain run without FAULTS_* variables)."""
  return [sys.executable, str(code / "tests" / "faults_run.py"), *args]


def start(argv: Sequence[str], env: Mapping[str, str], log: Path,
          faults: Optional[Mapping[str, str]] = None, cwd: Path = REPO) -> subprocess.Popen:
  """A command in `cwd`, its console (stdout and stderr) going to `log`."""
  with open(log, "w", encoding="utf-8") as f:
    return subprocess.Popen(list(argv), cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                            env={**env, **(faults or {})})


def wait(proc: subprocess.Popen, log: Optional[Path] = None) -> int:
  """The exit status; a process that runs over TIMEOUT is killed, and that is a Lost."""
  try:
    return proc.wait(TIMEOUT)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    console = f"; console:\n{log.read_text(errors='replace')[-3000:]}" if log else ""
    raise Lost(f"a process ran over {TIMEOUT} s{console}") from None


def finish(proc: subprocess.Popen, log: Path) -> str:
  """Waits for the process; its console."""
  wait(proc, log)
  return log.read_text(errors="replace")


def run(argv: Sequence[str], env: Mapping[str, str], log: Path,
        faults: Optional[Mapping[str, str]] = None, cwd: Path = REPO) -> Tuple[int, str]:
  """(exit status, console) of a command run to its end."""
  proc = start(argv, env, log, faults, cwd)
  text = finish(proc, log)
  return proc.returncode, text


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen) -> bool:
  """Polls until `condition()`; False if the process ended first or TIMEOUT passed."""
  deadline = time.monotonic() + TIMEOUT
  while not condition():
    if proc.poll() is not None or time.monotonic() > deadline:
      return False
    time.sleep(0.01)
  return True


def logged_step(log: Path, num_steps: int = NUM_STEPS) -> int:
  """The newest 'step N/num_steps' progress line of a console log (0 before the first)."""
  steps = [int(m.group(1)) for m in re.finditer(rf"step (\d+)/{num_steps}  epoch",
                                                 log.read_text(errors="replace"))]
  return max(steps, default=0)


def checkpoint_dir(workdir: Path) -> Path:
  return workdir / "checkpoints"


def complete_steps(workdir: Path) -> List[int]:
  from orbax.checkpoint._src.path import step as step_lib  # pylint: disable=g-import-not-at-top
  folder = checkpoint_dir(workdir)
  return sorted(step_lib.checkpoint_steps(folder)) if folder.exists() else []


def partial_saves(workdir: Path) -> List[str]:
  folder = checkpoint_dir(workdir)
  return sorted(p.name for p in folder.iterdir() if "tmp" in p.name) if folder.exists() else []


def restored(workdir: Path, which: Any = "latest") -> Tuple[int, Any]:
  """(step, variables) of a checkpoint, read the way evaluate and predict read it."""
  import jax  # pylint: disable=g-import-not-at-top
  from msatt_jax import inference  # pylint: disable=g-import-not-at-top
  trained = inference.restore_run(str(workdir), which)
  return trained.step, jax.device_get(trained.variables)


def bit_identical(a: Any, b: Any) -> bool:
  """The same tree of arrays, of the same dtypes, shapes and bytes."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  pairs = [(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b)]
  return tree_a == tree_b and all(x.dtype == y.dtype and x.shape == y.shape and
                                  x.tobytes() == y.tobytes() for x, y in pairs)


def run_files(folder: Path, skip: Sequence[str] = ()) -> Dict[str, bytes]:
  """Every file under a run folder (path -> bytes) but those named in `skip`."""
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
          if p.is_file() and p.name not in skip}


def one_error_line(text: str, what: str) -> str:
  """The one `error: ` line a refused command reports its cause in."""
  lines = [l for l in text.splitlines() if l.startswith("error: ")]
  if len(lines) != 1:
    raise Lost(f"{what}: {len(lines)} error lines instead of one; console:\n{text[-3000:]}")
  return lines[0]


def damage(workdir: Path, step: int) -> None:
  """Truncates the data files of a committed step, as an interrupted copy of the run folder
  leaves them: the step is still listed, but its arrays cannot be read back."""
  for path in (checkpoint_dir(workdir) / str(step) / "state").rglob("*"):
    if path.is_file() and ("ocdbt" in path.parent.name or path.name.startswith("manifest")):
      path.write_bytes(b"")


def lock_holder(workdir: Path) -> Optional[int]:
  """The process id the workdir's training lock records (the last run that took it)."""
  from msatt_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  path = workdir / workdir_lock.LOCK_NAME
  return json.loads(path.read_text() or "{}").get("pid") if path.exists() else None


@dataclasses.dataclass
class Trainer:
  """The train command of a check, by workdir, and what its uninterrupted run ends with."""
  args: List[str]  # The train flags but --workdir.
  env: Dict[str, str]
  num_steps: int
  save_steps: Sequence[int]  # The steps of the periodic saves.
  reference: Any = None  # Final variables of the uninterrupted run.
  code: Path = REPO  # The copy of the code the processes run.

  def command(self, workdir: Path, *extra: str) -> List[str]:
    return train_command(*self.args, f"--workdir={workdir}", *extra, code=self.code)

  def start(self, workdir: Path, log: Path,
            faults: Optional[Mapping[str, str]] = None) -> subprocess.Popen:
    return start(self.command(workdir), self.env, log, faults, cwd=self.code)

  def run(self, workdir: Path, log: Path,
          faults: Optional[Mapping[str, str]] = None) -> Tuple[int, str]:
    return run(self.command(workdir), self.env, log, faults, cwd=self.code)

  def evaluate(self, workdir: Path, out: Path, checkpoint: str = "latest") -> Tuple[int, str]:
    """(exit status, console) of `evaluate` on the validation split, its results in `out`."""
    argv = [sys.executable, "-m", "msatt_jax.evaluate", f"--workdir={workdir}",
            f"--checkpoint={checkpoint}", "--split=validation", "--notta", "--num_figures=0",
            f"--out={out}"]
    return run(argv, self.env, out.with_suffix(".log"), cwd=self.code)

  def check_finished(self, workdir: Path, status: int, what: str) -> None:
    """The run ended normally with the reference's parameters and nothing half-written."""
    if status != 0:
      raise Lost(f"{what} exited with {status}")
    if partial_saves(workdir):
      raise Lost(f"{what}: partial saves left: {partial_saves(workdir)}")
    step, variables = restored(workdir)
    if step != self.num_steps or not bit_identical(variables, self.reference):
      raise Lost(f"{what}: the final parameters differ from the uninterrupted run's")


def check_resume(log: Path, newest: Optional[int]) -> None:
  """A start resumed from `newest` (the newest complete, intact checkpoint there was), or
  started from scratch when there was none."""
  text = log.read_text(errors="replace")
  resumed = re.search(r"Resumed from the checkpoint at step (\d+)\.", text)
  if resumed and int(resumed.group(1)) != newest:
    raise Lost(f"resumed from step {resumed.group(1)}, the newest complete was {newest}")
  if not resumed and newest is not None and "Training unet for" in text:
    raise Lost(f"started from scratch although step {newest} was complete")
  training = re.search(r"for \d+ steps .* from step (\d+) in", text)
  if training and int(training.group(1)) != (newest or 0):
    raise Lost(f"trained from step {training.group(1)} instead of {newest or 0}")


def _stopped(proc: subprocess.Popen) -> None:
  if proc.poll() is None:
    proc.kill()
    proc.wait()


def check_second_launch(trainer: Trainer, workdir: Path, prefix: Path, after: int,
                        freeze: bool = True, delay: float = 0.2) -> str:
  """The same command, started again while a run trains (after its step `after`), stops at once
  with one error line naming the holder and changes nothing; the first run ends as the
  reference; a third start, once the first has exited, resumes normally.

  The first run's next save is held before its commit until the second has exited, so that it is
  still alive then however long the second takes to start. freeze: the first run is also stopped
  (SIGSTOP) meanwhile, so that "changed nothing" compares every file of the workdir exactly.
  Files: `<prefix>_*`.
  """
  logs = [Path(f"{prefix}_{name}.log") for name in ("first", "second", "third")]
  release = Path(f"{prefix}_release")
  held = min(s for s in trainer.save_steps if s > after)
  proc = trainer.start(workdir, logs[0], {
      "FAULTS_STEP_DELAY": str(delay), "FAULTS_STALL_SAVE_AT": str(held),
      "FAULTS_RELEASE": str(release)})
  try:
    if not wait_for(lambda: logged_step(logs[0], trainer.num_steps) >= after, proc):
      raise Lost(f"the first run ended ({proc.returncode}) before step {after}")
    if freeze:
      proc.send_signal(signal.SIGSTOP)
    try:
      before = run_files(workdir)
      t0 = time.perf_counter()
      status, text = trainer.run(workdir, logs[1])
      seconds = time.perf_counter() - t0
      changed = freeze and run_files(workdir) != before
    finally:
      if freeze:
        proc.send_signal(signal.SIGCONT)
      release.touch()
    if status != 1:
      raise Lost(f"the second start exited with {status} while the first ran")
    error = one_error_line(text, "the second start")
    holder = f"in use by a training run: process {proc.pid} on host {socket.gethostname()}"
    if holder not in error:
      raise Lost(f"the second start did not name the holder: {error}")
    if "Training unet for" in text or changed:
      raise Lost("the second start trained or changed the workdir")
    status = wait(proc, logs[0])
  finally:
    release.touch()
    _stopped(proc)
  trainer.check_finished(workdir, status, "the first run")
  status, text = trainer.run(workdir, logs[2])
  check_resume(logs[2], trainer.num_steps)
  trainer.check_finished(workdir, status, "the third start")
  return (f"second start after step {after}{' (first frozen)' if freeze else ''} refused in "
          f"{seconds:.0f} s naming pid {proc.pid}; the first finished identical; a third "
          "start resumed")


def _evaluate_once(trainer: Trainer, workdir: Path, out: Path) -> Optional[int]:
  """The step `evaluate --checkpoint=latest` read, or None when it failed with one error
  line (no checkpoint yet, say)."""
  status, text = trainer.evaluate(workdir, out)
  if "orbax-checkpoint-tmp" in text:
    raise Lost(f"an evaluation named a partial save; console:\n{text[-3000:]}")
  if status == 1:
    one_error_line(text, "a failed evaluation")
    return None
  if status != 0:
    raise Lost(f"an evaluation exited with {status}; console:\n{text[-3000:]}")
  step = json.loads((out / "summary.json").read_text())["checkpoint_step"]
  if step not in trainer.save_steps:
    raise Lost(f"an evaluation read step {step}, which the run never saved")
  return step


def check_evaluate_during_training(trainer: Trainer, workdir: Path, prefix: Path, stall: int,
                                   delay: float = 0.3, before_stall: int = 2) -> str:
  """`evaluate --checkpoint=latest` in a loop while a run trains and saves: up to
  `before_stall` times from its start, once while the save of step `stall` is held just before
  its commit (it must read the newest committed step, not the one in flight), and once while the
  rest commits. Each reads a committed step or fails with one error line; evaluate never takes
  the training lock; the run ends as the reference. Files: `<prefix>_*`.
  """
  marker, release = Path(f"{prefix}_stalled"), Path(f"{prefix}_release")
  log = Path(f"{prefix}_train.log")
  proc = trainer.start(workdir, log, {
      "FAULTS_STEP_DELAY": str(delay), "FAULTS_STALL_SAVE_AT": str(stall),
      "FAULTS_MARKER": str(marker), "FAULTS_RELEASE": str(release)})
  read = []
  try:
    while not marker.exists() and proc.poll() is None and len(read) < before_stall:
      read.append(_evaluate_once(trainer, workdir, Path(f"{prefix}_eval{len(read)}")))
    if not wait_for(marker.exists, proc):
      raise Lost(f"the save of step {stall} was never reached")
    committed, in_flight = complete_steps(workdir), partial_saves(workdir)
    if not any(name.startswith(f"{stall}.") for name in in_flight):
      raise Lost(f"no partial save of step {stall} while its commit was held: {in_flight}")
    step = _evaluate_once(trainer, workdir, Path(f"{prefix}_eval{len(read)}"))
    read.append(step)
    if step != (committed or [None])[-1]:
      raise Lost(f"read step {step} while {committed} were committed and {stall} in flight")
    release.touch()
    read.append(_evaluate_once(trainer, workdir, Path(f"{prefix}_eval{len(read)}")))
    status = wait(proc, log)
  finally:
    release.touch()
    _stopped(proc)
  if lock_holder(workdir) != proc.pid:
    raise Lost(f"the training lock records process {lock_holder(workdir)}, not the trainer")
  trainer.check_finished(workdir, status, "the run evaluated during training")
  return (f"evaluations read {['none' if s is None else s for s in read]} (the save of {stall} "
          "held during one); training finished identical")


def check_evaluate_refuses_damaged(trainer: Trainer, workdir: Path, out: Path) -> str:
  """`evaluate --checkpoint=latest` on a workdir whose newest checkpoint is damaged: exit 1, one
  error line naming the step. Returns that line."""
  step = complete_steps(workdir)[-1]
  status, text = trainer.evaluate(workdir, out)
  if status != 1:
    raise Lost(f"evaluate of the damaged step {step} exited with {status}")
  error = one_error_line(text, "evaluate of a damaged checkpoint")
  if f"step {step}" not in error:
    raise Lost(f"evaluate did not name the damaged step {step}: {error}")
  return error


def check_damaged_resume(trainer: Trainer, workdir: Path, log: Path, count: int) -> str:
  """The newest `count` committed checkpoints damaged (an older one intact): the rerun warns
  naming each, moves them (unchanged) to damaged_checkpoints/, resumes from the newest intact
  one and ends as the reference."""
  from msatt_jax import checkpointing  # pylint: disable=g-import-not-at-top
  steps = complete_steps(workdir)
  damaged, intact = steps[-count:], steps[-count - 1]
  for step in damaged:
    damage(workdir, step)
  kept = {step: run_files(checkpoint_dir(workdir) / str(step)) for step in damaged}
  status, text = trainer.run(workdir, log)
  check_resume(log, intact)
  aside = workdir / checkpointing.DAMAGED_DIR
  for step in damaged:
    if not re.search(rf"the checkpoint of step {step} cannot be restored \(.*\)\. Moved it to "
                     rf"{re.escape(str(aside))}/{step}\.\S+ and resumed from step {intact} "
                     "instead", text):
      raise Lost(f"no warning naming the damaged step {step}")
    moved = list(aside.glob(f"{step}.*"))
    if len(moved) != 1 or run_files(moved[0]) != kept[step]:
      raise Lost(f"the damaged step {step} was not kept as it was: {moved}")
  trainer.check_finished(workdir, status, "the run resumed over damaged checkpoints")
  return f"{damaged} damaged: moved aside, resumed from {intact}, identical"


def check_all_damaged(trainer: Trainer, workdir: Path, log: Path) -> str:
  """Every committed checkpoint damaged: the rerun exits 1 with one error line listing them,
  moves nothing and starts nothing over them."""
  from msatt_jax import checkpointing, workdir_lock  # pylint: disable=g-import-not-at-top
  steps = complete_steps(workdir)
  for step in steps:
    damage(workdir, step)
  before = run_files(workdir, skip=(workdir_lock.LOCK_NAME,))
  status, text = trainer.run(workdir, log)
  if status != 1:
    raise Lost(f"a start over damaged checkpoints {steps} exited with {status}")
  error = one_error_line(text, "a start over damaged checkpoints")
  if (not error.startswith("error: No checkpoint in this workdir can be restored") or
      any(f"step {step} cannot be restored" not in error for step in steps)):
    raise Lost(f"the error does not list the damaged checkpoints {steps}: {error}")
  if ("Training unet for" in text or (workdir / checkpointing.DAMAGED_DIR).exists() or
      run_files(workdir, skip=(workdir_lock.LOCK_NAME,)) != before):
    raise Lost("a start over damaged checkpoints trained, moved or wrote something")
  return f"all of {steps} damaged: refused, nothing moved or written"


# ------------------------------------------------------------------------------ the soak

TINY = [*tiny_train_args(batch_size=8), f"--config.num_train_steps={NUM_STEPS}"]
SCENARIOS = ("interrupts", "second_launch", "evaluate_during_training", "damaged_checkpoint")


@dataclasses.dataclass
class Setup:
  root: Path
  trainer: Trainer  # The run every round trains (in the code snapshot) and its reference.
  life: float  # Seconds from start to exit of an uninterrupted run.


def _interrupt(kind: str, rng: random.Random, setup: Setup, workdir: Path, log: Path) -> str:
  """One interrupted start; returns what happened, or raises Lost."""
  newest = (complete_steps(workdir) or [None])[-1]
  first = (newest or 0) + 1
  faults = {"FAULTS_STEP_DELAY": str(STEP_DELAY)}
  if kind == "kill9_in_save":
    later = [s for s in SAVE_STEPS[:-1] if s > (newest or 0)]
    if not later:
      kind = "kill9"
    else:
      stall = rng.choice(later)
      marker = log.with_suffix(".stalled")
      faults.update({"FAULTS_STALL_SAVE_AT": str(stall), "FAULTS_MARKER": str(marker),
                     "FAULTS_STALL_SECONDS": str(TIMEOUT)})
  if kind in ("sigterm", "sigint") and first >= NUM_STEPS:
    kind = "kill9"  # No step left to stop after.
  slow = kind == "kill9" and rng.random() < 0.5
  if slow:
    faults["FAULTS_SAVE_DELAY"] = str(SLOW_SAVE)
  proc = setup.trainer.start(workdir, log, faults)
  try:
    if kind == "kill9_in_save":
      if not wait_for(marker.exists, proc):
        raise Lost(f"the save of step {stall} was never reached")
      what = f"kill9 in the save of {stall}"
      proc.kill()
    elif kind == "kill9":
      if rng.random() < 0.3:  # Anywhere: start-up, compilation, training, saves, validation.
        moment = rng.uniform(0, setup.life)
        time.sleep(moment)
        what = f"kill9 at {moment:.1f}s"
      else:
        after = rng.randint(first, NUM_STEPS)
        wait_for(lambda: logged_step(log) >= after, proc)
        time.sleep(rng.uniform(0, 2 * STEP_DELAY))
        what = f"kill9 after step {logged_step(log)}"
      what += " (slow saves)" if slow else ""
      proc.kill()
    else:
      signum = signal.SIGTERM if kind == "sigterm" else signal.SIGINT
      after = rng.randint(first, NUM_STEPS - 1)
      if not wait_for(lambda: logged_step(log) >= after, proc):
        raise Lost(f"{kind}: the run ended before step {after}")
      proc.send_signal(signum)
      what = f"{kind} after step {after}"
    status = wait(proc)
  finally:
    _stopped(proc)
  check_resume(log, newest)
  if kind in ("sigterm", "sigint"):
    text = log.read_text(errors="replace")
    stopped = re.search(r"Stopped by SIG\w+ at step (\d+);", text)
    if status == 0 and NUM_STEPS in complete_steps(workdir):
      return what + ": the run had finished"
    if status != 128 + signum or not stopped:
      raise Lost(f"{what}: exit status {status}, expected {128 + signum}")
    step = int(stopped.group(1))
    if complete_steps(workdir)[-1:] != [step] or partial_saves(workdir):
      raise Lost(f"{what}: step {step} is not the newest complete checkpoint")
    return f"{what}: saved {step}"
  if status not in (-signal.SIGKILL, 0):
    raise Lost(f"{what}: exit status {status}")
  return f"{what}: newest complete {(complete_steps(workdir) or ['none'])[-1]}"


def _final_run(setup: Setup, workdir: Path, log: Path) -> str:
  """The run to its end, from the newest complete checkpoint: identical to the reference."""
  newest = (complete_steps(workdir) or [None])[-1]
  status = wait(setup.trainer.start(workdir, log), log)
  check_resume(log, newest)
  setup.trainer.check_finished(workdir, status, "the final run")
  return f"resumed from {newest}: identical"


def _interrupts_round(rng: random.Random, setup: Setup, workdir: Path, name: str) -> List[str]:
  events = []
  for j in range(rng.randint(1, 3)):
    if NUM_STEPS in complete_steps(workdir):
      break  # A kill came too late: the run had finished.
    events.append(_interrupt(rng.choice(KINDS), rng, setup, workdir,
                             workdir.parent / f"{name}_{j}.log"))
  return events + [_final_run(setup, workdir, workdir.parent / f"{name}_final.log")]


def _damaged_round(rng: random.Random, setup: Setup, workdir: Path, name: str) -> List[str]:
  logs = workdir.parent / name
  events = [_interrupt("sigterm", rng, setup, workdir, Path(f"{logs}_0.log"))]
  steps = complete_steps(workdir)
  if len(steps) == 1 or rng.random() < 0.2:
    events.append(check_all_damaged(setup.trainer, workdir, Path(f"{logs}_damaged.log")))
    # As the error advises: the checkpoints folder moved away, the run starts from scratch.
    checkpoint_dir(workdir).rename(workdir / "checkpoints.damaged")
  else:
    count = rng.randint(1, len(steps) - 1)
    if rng.random() < 1 / 3:
      for step in steps[-count:]:
        damage(workdir, step)
      error = check_evaluate_refuses_damaged(setup.trainer, workdir, Path(f"{logs}_eval"))
      events.append(f"evaluate refused: {error[:80]}...")
    events.append(check_damaged_resume(setup.trainer, workdir, Path(f"{logs}_resume.log"),
                                       count))
    return events
  return events + [_final_run(setup, workdir, Path(f"{logs}_final.log"))]


def run_round(index: int, seed: int, setup: Setup, scenarios: Sequence[str] = SCENARIOS,
              deadline: float = float("inf")) -> Optional[Tuple[str, bool, str, float]]:
  """(scenario, survived, description, seconds) of one round; None if it would start after
  `deadline` (a time.monotonic() value)."""
  if time.monotonic() > deadline:
    return None
  # A string seed is hashed (SHA-512): rounds of neighbouring numbers draw unrelated moments,
  # which small integer seeds would not give.
  rng = random.Random(f"faults-{seed}-{index}")
  kind = scenarios[index % len(scenarios)]
  name = f"round_{index:03d}"
  workdir = setup.root / name
  prefix = setup.root / name
  t0 = time.perf_counter()
  events = []
  try:
    if kind == "interrupts":
      events = _interrupts_round(rng, setup, workdir, name)
    elif kind == "second_launch":
      events = [check_second_launch(setup.trainer, workdir, prefix, rng.randint(1, NUM_STEPS - 1),
                                    freeze=rng.random() < 0.5, delay=STEP_DELAY)]
    elif kind == "evaluate_during_training":
      events = [check_evaluate_during_training(setup.trainer, workdir, prefix,
                                               rng.choice(SAVE_STEPS[1:-1]))]
    else:
      events = _damaged_round(rng, setup, workdir, name)
    shutil.rmtree(workdir)
    return kind, True, "; ".join(events), time.perf_counter() - t0
  except Lost as e:
    events.append(f"LOST: {e}")
    return kind, False, "; ".join(events), time.perf_counter() - t0


def snapshot(root: Path) -> Path:
  """A copy of the code as it is now, which every process of the benchmark runs."""
  code = root / "code"
  shutil.rmtree(code, ignore_errors=True)
  patterns = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".pytest_cache", "runs")

  def ignore(folder: str, names: List[str]) -> set:
    # Never the benchmark's own folder, should it lie inside the repository.
    return set(patterns(folder, names)) | {n for n in names if Path(folder, n) == root}

  shutil.copytree(REPO, code, ignore=ignore)
  sys.path.insert(0, str(code))  # Restores in this process read with the same code.
  return code


def prepare(root: Path) -> Setup:
  """The code snapshot, synthetic data, the compilation cache and the reference run."""
  code = snapshot(root)
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
  source = root / "source"
  if not source.exists():
    synthetic.generate_dataset(source, "msd", 4, SHAPE, 0)
  data_args = [f"--config.data.source_dir={source}",
               f"--config.data.data_dir={root / 'prepared'}"]
  trainer = Trainer([*TINY, *data_args], process_env(root / "jax_cache"), NUM_STEPS,
                    SAVE_STEPS, code=code)
  setup = Setup(root, trainer, 0.0)
  reference = root / "reference"
  # Twice: the first run prepares the data and compiles; the second's life is a typical one.
  # Then an evaluation, to compile its programs too.
  for _ in range(2):
    shutil.rmtree(reference, ignore_errors=True)
    t0 = time.perf_counter()
    status = wait(trainer.start(reference, root / "reference.log",
                                {"FAULTS_STEP_DELAY": str(STEP_DELAY)}))
    setup.life = time.perf_counter() - t0
    if status != 0:
      raise SystemExit(f"the reference run failed; see {root / 'reference.log'}")
  step, trainer.reference = restored(reference)
  assert step == NUM_STEPS
  if trainer.evaluate(reference, root / "reference_eval")[0] != 0:
    raise SystemExit(f"the reference evaluation failed; see {root / 'reference_eval.log'}")
  return setup


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--jobs", type=int, default=1, help="Rounds run at the same time.")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default=None, help="Default: a temporary folder.")
  parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                      help="Comma-separated, taken in rotation (default: all).")
  parser.add_argument("--max_minutes", type=float, default=None,
                      help="No round starts after this many minutes (those started finish).")
  args = parser.parse_args()
  scenarios = args.scenarios.split(",")
  unknown = sorted(set(scenarios) - set(SCENARIOS))
  if unknown:
    parser.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)  # Orbax's notes about read-only restores.
  root = Path(args.workdir or tempfile.mkdtemp(prefix="msatt_faults_")).resolve()
  root.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  setup = prepare(root)
  print(f"reference: {NUM_STEPS} steps, saves at {list(SAVE_STEPS)}; an uninterrupted run "
        f"lives {setup.life:.1f} s (set-up {time.perf_counter() - t0:.0f} s); in {root}",
        flush=True)
  survived = {kind: [0, 0] for kind in scenarios}  # Survived, run.
  times = []
  deadline = time.monotonic() + 60 * (args.max_minutes or float("inf"))
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
    futures = [pool.submit(run_round, i, args.seed, setup, scenarios, deadline)
               for i in range(args.rounds)]
    for i, future in enumerate(futures):
      if future.result() is None:
        continue  # Past --max_minutes.
      kind, ok, what, seconds = future.result()
      survived[kind][0] += ok
      survived[kind][1] += 1
      times.append(seconds)
      print(f"round {i + 1:3d}/{args.rounds}: {'survived' if ok else 'LOST    '}  "
            f"{seconds:5.1f} s  {kind}: {what}", flush=True)
  wall = time.perf_counter() - t0
  total, rounds = sum(ok for ok, _ in survived.values()), len(times)
  cut = f" (of {args.rounds}: --max_minutes {args.max_minutes:g} ran out)" \
      if rounds < args.rounds else ""
  print(f"\n{total}/{rounds} rounds survived with nothing lost{cut} "
        f"({rounds - total} lost); {sum(times) / max(rounds, 1):.1f} s per round "
        f"({args.jobs} at a time), {wall / 60:.1f} min in all.")
  for kind, (ok, count) in survived.items():
    print(f"  {kind:26s} {ok}/{count}")
  sys.exit(0 if total == rounds else 1)


if __name__ == "__main__":
  main()
