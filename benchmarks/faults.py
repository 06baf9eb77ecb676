r"""Fault injection: kill -9, SIGTERM and SIGINT at random moments of training, then resume.

  python -m benchmarks.faults --rounds 50 [--jobs 3] [--seed 0] [--workdir DIR]

Trains a tiny U-Net (4 synthetic cases, batch 8: a checkpoint every 5 steps, 30 steps, random
augmentation on) once without interruption as the reference. Each round then trains the same run
in a fresh workdir and interrupts it 1 to 3 times, each time one of:
  kill9          kill -9 at a random moment: anywhere in the process's life, or after a random
                 step; half of the time saves are slowed (0.2 s before each commit) so the kill
                 often lands inside one
  kill9_in_save  kill -9 while the save of a random step is written but not yet committed
  sigterm        SIGTERM after a random step (preemption)
  sigint         SIGINT after a random step (Ctrl-C)
and finally lets it run to the end. A round survives with nothing lost when
  - every start resumed from the newest complete checkpoint on disk (never a partial one),
  - every SIGTERM/SIGINT exited with 128 + the signal after committing the step it had reached,
  - no partial checkpoint folder is left once the run has finished, and
  - the final parameters and batch statistics are bit-identical to the reference's.
Prints one line per round and the totals; the processes go through tests/faults_run.py, which
injects the slow and stalled saves. Compiled programs are shared through a persistent JAX
compilation cache, so only the reference run compiles. Everything runs from a copy of the code
taken at the start (<workdir>/code): edits to the working tree while the benchmark runs cannot
make the rounds differ from the reference.

The helpers that start the processes and read their checkpoints are tests/test_faults.py's too,
which imports them from here: the soak and the tests check a run the same way.
"""

import argparse
import concurrent.futures
import dataclasses
import os
import random
import re
import shutil
import signal
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


# ------------------------------------------------------------------------------ the soak

TINY = [*tiny_train_args(batch_size=8), f"--config.num_train_steps={NUM_STEPS}"]


@dataclasses.dataclass
class Setup:
  root: Path
  code: Path  # The snapshot of the repository the processes run.
  env: Dict[str, str]
  data_args: List[str]
  reference: Any  # Final variables of the uninterrupted run.
  life: float  # Seconds from start to exit of an uninterrupted run.


def _start(setup: Setup, workdir: Path, log: Path, faults: Dict[str, str]) -> subprocess.Popen:
  return start(train_command(*TINY, *setup.data_args, f"--workdir={workdir}", code=setup.code),
               setup.env, log, faults, cwd=setup.code)


def _check_resume(log: Path, newest: Optional[int]) -> None:
  """A start resumes from the newest complete checkpoint there was, or starts from scratch."""
  text = log.read_text(errors="replace")
  resumed = re.search(r"Resumed from the checkpoint at step (\d+)\.", text)
  if resumed and int(resumed.group(1)) != newest:
    raise Lost(f"resumed from step {resumed.group(1)}, the newest complete was {newest}")
  if not resumed and newest is not None and "Training unet for" in text:
    raise Lost(f"started from scratch although step {newest} was complete")
  training = re.search(r"for \d+ steps .* from step (\d+) in", text)
  if training and int(training.group(1)) != (newest or 0):
    raise Lost(f"trained from step {training.group(1)} instead of {newest or 0}")


# --------------------------------------------------------------------------------- rounds


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
  proc = _start(setup, workdir, log, faults)
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
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  _check_resume(log, newest)
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


def run_round(index: int, seed: int, setup: Setup) -> Tuple[bool, str, float]:
  """(survived, description, seconds) of one round."""
  rng = random.Random(seed * 100_003 + index)
  workdir = setup.root / f"round_{index:03d}"
  t0 = time.perf_counter()
  events = []
  try:
    for j in range(rng.randint(1, 3)):
      if NUM_STEPS in complete_steps(workdir):
        break  # A kill came too late: the run had finished.
      events.append(_interrupt(rng.choice(KINDS), rng, setup, workdir,
                               workdir.parent / f"round_{index:03d}_{j}.log"))
    newest = (complete_steps(workdir) or [None])[-1]
    log = workdir.parent / f"round_{index:03d}_final.log"
    status = wait(_start(setup, workdir, log, {}))
    if status != 0:
      raise Lost(f"the final run exited with {status}")
    _check_resume(log, newest)
    if partial_saves(workdir):
      raise Lost(f"partial saves left: {partial_saves(workdir)}")
    step, variables = restored(workdir)
    if step != NUM_STEPS or not bit_identical(variables, setup.reference):
      raise Lost("the final parameters differ from the uninterrupted run's")
    events.append(f"resumed from {newest}: identical")
    shutil.rmtree(workdir)
    return True, "; ".join(events), time.perf_counter() - t0
  except Lost as e:
    events.append(f"LOST: {e}")
    return False, "; ".join(events), time.perf_counter() - t0


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
  env = process_env(root / "jax_cache")
  data_args = [f"--config.data.source_dir={source}",
               f"--config.data.data_dir={root / 'prepared'}"]
  setup = Setup(root, code, env, data_args, None, 0.0)
  reference = root / "reference"
  # Twice: the first run prepares the data and compiles; the second's life is a typical one.
  for _ in range(2):
    shutil.rmtree(reference, ignore_errors=True)
    t0 = time.perf_counter()
    status = wait(_start(setup, reference, root / "reference.log",
                         {"FAULTS_STEP_DELAY": str(STEP_DELAY)}))
    setup.life = time.perf_counter() - t0
    if status != 0:
      raise SystemExit(f"the reference run failed; see {root / 'reference.log'}")
  step, setup.reference = restored(reference)
  assert step == NUM_STEPS
  return setup


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--jobs", type=int, default=1, help="Rounds run at the same time.")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default=None, help="Default: a temporary folder.")
  args = parser.parse_args()
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)  # Orbax's notes about read-only restores.
  root = Path(args.workdir or tempfile.mkdtemp(prefix="msatt_faults_")).resolve()
  root.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  setup = prepare(root)
  print(f"reference: {NUM_STEPS} steps, saves at {list(SAVE_STEPS)}; an uninterrupted run "
        f"lives {setup.life:.1f} s (set-up {time.perf_counter() - t0:.0f} s); in {root}",
        flush=True)
  survived, times = 0, []
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
    futures = [pool.submit(run_round, i, args.seed, setup) for i in range(args.rounds)]
    for i, future in enumerate(futures):
      ok, what, seconds = future.result()
      survived += ok
      times.append(seconds)
      print(f"round {i + 1:3d}/{args.rounds}: {'survived' if ok else 'LOST    '}  "
            f"{seconds:5.1f} s  {what}", flush=True)
  wall = time.perf_counter() - t0
  print(f"\n{survived}/{args.rounds} rounds survived with nothing lost "
        f"({args.rounds - survived} lost); {sum(times) / max(len(times), 1):.1f} s per round "
        f"({args.jobs} at a time), {wall / 60:.1f} min in all.")
  sys.exit(0 if survived == args.rounds else 1)


if __name__ == "__main__":
  main()
