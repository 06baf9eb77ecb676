"""Faults end to end: kill -9, SIGTERM/SIGINT, NaN losses, a full disk, bad input via the CLIs,
a second launch into a busy workdir, evaluation while a run trains, damaged checkpoints.

Every scenario runs the real command lines in subprocesses (most need a process to die) on a
tiny U-Net and the 4 synthetic cases of conftest. Faults inside a process (a NaN batch, a
stalled or failing checkpoint commit) come from tests/faults_run.py, which patches the data
iterator and Orbax's commit and then runs the train command. Starting the processes, reading
their checkpoints and the checks of a second launch, evaluation during training and damaged
checkpoints are benchmarks/faults.py's, shared with the fault soak.

Cost: the processes share a persistent JAX compilation cache, so only the reference run
compiles. The scenarios are independent (each has its own folders) and execute CONCURRENCY at a
time, since most of a process's life is spent importing TensorFlow and JAX: first those that
need no reference (bad training data and flags) beside the reference run, then those that read
it (the few that run several processes one after another first). Each parametrized test
reports its own scenario's outcome.
"""

import concurrent.futures
import dataclasses
import functools
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import nibabel as nib
import numpy as np
import pytest

from benchmarks import faults as fault_lib
from data_pipelines import cli
from data_pipelines import prepare as prepare_lib
from msatt_jax import workdir_lock
from benchmarks.faults import (checkpoint_dir, complete_steps, finish, partial_saves, restored,
                               run, start, train_command)
from conftest import small_data_config

REPO = fault_lib.REPO

# Trains in subprocesses: the slow lane (`pytest -m "not slow"` leaves the module out).
pytestmark = pytest.mark.slow

NUM_STEPS = 30  # 10 steps per epoch (2 train cases x 20 slices / batch 4): saves at 10, 20, 30.
SAVE_STEPS = (10, 20, 30)
TIMEOUT = fault_lib.TIMEOUT
CONCURRENCY = 4
TINY = fault_lib.tiny_train_args(batch_size=4)


# ------------------------------------------------------------------------------ processes


def module_command(module: str, *args: str) -> List[str]:
  return [sys.executable, "-m", module, *args]


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen, log: Path,
               what: str) -> None:
  if not fault_lib.wait_for(condition, proc):
    if proc.poll() is None:
      proc.kill()
      pytest.fail(f"no {what} after {TIMEOUT}s")
    pytest.fail(f"exited ({proc.returncode}) before {what}; console:\n"
                f"{log.read_text()[-3000:]}")


def logged_step(log: Path) -> int:
  return fault_lib.logged_step(log, NUM_STEPS)


def error_line(text: str) -> str:
  """The one line a command's failure is reported in."""
  lines = [l for l in text.splitlines()
           if l.startswith(("error: ", "FATAL Flags parsing error: "))]
  assert len(lines) == 1, text[-3000:]
  return lines[0]


# ---------------------------------------------------------------------------- checkpoints


def assert_bit_identical(a: Any, b: Any) -> None:
  assert fault_lib.bit_identical(a, b)


def file_contents(folder: Path) -> Dict[str, bytes]:
  """Every file of a run folder but the lock, whose holder record each start rewrites."""
  return fault_lib.run_files(folder, skip=(workdir_lock.LOCK_NAME,))


# ------------------------------------------------------------------------------- fixtures


@dataclasses.dataclass
class Context:
  env: Dict[str, str]
  data_args: List[str]  # The shared synthetic source and prepared data.
  synthetic_msd: Path
  synthetic_brats: Path
  reference_dir: Path  # Workdir of the uninterrupted run.
  # Its final parameters and batch statistics, once it has trained (_train_reference).
  reference_run: Optional[concurrent.futures.Future] = None

  @property
  def reference(self) -> Path:
    """Workdir of the uninterrupted run; waits until it has trained."""
    self.reference_run.result()
    return self.reference_dir

  @property
  def reference_variables(self) -> Any:
    return self.reference_run.result()

  @property
  def base_args(self) -> List[str]:
    """The reference's train flags but --workdir."""
    return [*TINY, *self.data_args, f"--config.num_train_steps={NUM_STEPS}"]

  def train_args(self, workdir: Path, *extra: str) -> List[str]:
    return [*self.base_args, f"--workdir={workdir}", *extra]

  @property
  def trainer(self) -> fault_lib.Trainer:
    """The reference's command, for the checks shared with the fault soak."""
    return fault_lib.Trainer(self.base_args, self.env, NUM_STEPS, SAVE_STEPS,
                             self.reference_variables)


def _train_reference(ctx: Context) -> Any:
  """The uninterrupted reference run (it prepares the data and fills the compilation cache);
  its final variables."""
  workdir = ctx.reference_dir
  status, text = run(train_command(*ctx.train_args(workdir)), ctx.env, workdir / "console.txt")
  assert status == 0, text[-3000:]
  assert complete_steps(workdir) == [10, 20, 30]
  step, variables = restored(workdir)
  assert step == NUM_STEPS
  return variables


@pytest.fixture(scope="module")
def context(synthetic_msd, synthetic_brats, tmp_path_factory) -> Context:
  env = fault_lib.process_env(tmp_path_factory.mktemp("jax_cache"))
  data_args = [f"--config.data.source_dir={synthetic_msd}",
               f"--config.data.data_dir={tmp_path_factory.mktemp('prepared')}"]
  return Context(env, data_args, synthetic_msd, synthetic_brats,
                 tmp_path_factory.mktemp("reference"))


SCENARIOS: Dict[str, Callable[[Context, Path], None]] = {}
LONG: List[str] = []  # Scenarios of several processes one after another: started first.
NO_REFERENCE: List[str] = []  # Scenarios that read nothing of the reference: run beside it.


def scenario(fn: Callable[[Context, Path], None]) -> Callable[[Context, Path], None]:
  SCENARIOS[fn.__name__.lstrip("_")] = fn
  return fn


def long_scenario(fn: Callable[[Context, Path], None]) -> Callable[[Context, Path], None]:
  LONG.append(fn.__name__.lstrip("_"))
  return scenario(fn)


@pytest.fixture(scope="module")
def outcomes(request, context, tmp_path_factory) -> Dict[str, concurrent.futures.Future]:
  """The reference and the selected scenarios, run concurrently; a scenario's failure (or the
  reference's, in those that read it) surfaces in its test."""
  selected = sorted((item.callspec.params["name"] for item in request.session.items
                     if getattr(item, "originalname", None) == "test_fault"),
                    key=lambda name: (name not in NO_REFERENCE, name not in LONG))
  with concurrent.futures.ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
    context.reference_run = pool.submit(_train_reference, context)
    futures = {name: pool.submit(SCENARIOS[name], context, tmp_path_factory.mktemp(name))
               for name in selected}
    concurrent.futures.wait([context.reference_run, *futures.values()])
  return futures


# --------------------------------------------------------------- preemption and exact resume


def _signal_mid_run(ctx: Context, tmp: Path, signum: int) -> Tuple[Path, int]:
  """Signals a run between two saves; checks the save and exit; returns (workdir, step)."""
  workdir = tmp / "run"
  log = tmp / "first.txt"
  # Slow steps leave time to signal in the second epoch, between the saves of 10 and 20.
  proc = start(train_command(*ctx.train_args(workdir)), ctx.env, log,
               {"FAULTS_STEP_DELAY": "0.3"})
  wait_until(lambda: logged_step(log) >= 12, proc, log, "step 12")
  proc.send_signal(signum)
  text = finish(proc, log)
  assert proc.returncode == 128 + signum, text[-3000:]
  name = signal.Signals(signum).name
  line = next(l for l in text.splitlines() if l.startswith(f"Stopped by {name} at step "))
  stopped = int(line.split(" at step ")[1].split(";")[0])
  assert 12 <= stopped < NUM_STEPS, line
  assert f"the checkpoint of step {stopped} is saved in {checkpoint_dir(workdir)}" in line
  # The step the run had reached, committed; nothing half-written.
  assert complete_steps(workdir)[-1] == stopped and not partial_saves(workdir)
  assert restored(workdir)[0] == stopped
  return workdir, stopped


@scenario
def _sigterm_saves_the_current_step_and_the_resumed_run_is_bit_identical(ctx, tmp):
  workdir, stopped = _signal_mid_run(ctx, tmp, signal.SIGTERM)
  status, text = run(train_command(*ctx.train_args(workdir)), ctx.env, tmp / "second.txt")
  assert status == 0, text[-3000:]
  assert f"Resumed from the checkpoint at step {stopped}." in text
  assert_bit_identical(restored(workdir)[1], ctx.reference_variables)


@scenario
def _sigint_saves_the_current_step_and_exits_130(ctx, tmp):
  _signal_mid_run(ctx, tmp, signal.SIGINT)


@scenario
def _kill9_during_a_save_resumes_from_the_newest_complete_checkpoint(ctx, tmp):
  workdir = tmp / "run"
  marker = tmp / "stalled"
  log = tmp / "first.txt"
  # The save of step 20 is written but stops before its commit; there the process dies.
  proc = start(train_command(*ctx.train_args(workdir)), ctx.env, log,
               {"FAULTS_STALL_SAVE_AT": "20", "FAULTS_MARKER": str(marker)})
  try:
    wait_until(marker.exists, proc, log, "the save of step 20")
    assert complete_steps(workdir) == [10]
    assert any(name.startswith("20.") for name in partial_saves(workdir))
  finally:
    proc.kill()
    finish(proc, log)
  assert proc.returncode == -signal.SIGKILL

  status, text = run(train_command(*ctx.train_args(workdir)), ctx.env, tmp / "second.txt")
  assert status == 0, text[-3000:]
  assert "Resumed from the checkpoint at step 10." in text  # Not from the partial 20.
  assert not partial_saves(workdir)  # The leftover was deleted on start.
  assert complete_steps(workdir) == [10, 20, 30]
  assert_bit_identical(restored(workdir)[1], ctx.reference_variables)


# ----------------------------------------------------------------------------- NaN and Inf


@scenario
def _nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(ctx, tmp):
  workdir = tmp / "run"
  status, text = run(train_command(*ctx.train_args(workdir)), ctx.env, tmp / "console.txt",
                     {"FAULTS_NAN_AT_STEP": "15"})
  assert status == 1, text[-3000:]
  error = error_line(text)
  assert error.startswith("error: The loss became NaN or Inf at step 15;"), error
  assert "Last good checkpoint: step 10." in error
  assert complete_steps(workdir) == [10] and not partial_saves(workdir)
  step, variables = restored(workdir)
  assert step == 10
  assert_bit_identical(variables, restored(ctx.reference, 10)[1])


@scenario
def _nan_policy_skip_skips_only_that_update(ctx, tmp):
  workdir = tmp / "run"
  status, text = run(train_command(*ctx.train_args(workdir, "--config.nan_policy=skip")),
                     ctx.env, tmp / "console.txt", {"FAULTS_NAN_AT_STEP": "15"})
  assert status == 0, text[-3000:]
  assert "Skipped 1 update(s) with a non-finite loss at steps [15]." in text
  assert complete_steps(workdir) == [10, 20, 30]
  assert_bit_identical(restored(workdir, 10)[1], restored(ctx.reference, 10)[1])
  step, variables = restored(workdir)
  assert step == NUM_STEPS
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))
  # Later batches were the same as the reference's (the step still counted), but the end
  # result lacks the update of step 15.
  assert any(not np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(variables), jax.tree.leaves(ctx.reference_variables)))


# -------------------------------------------------------------------------------- full disk


def _check_disk_full(ctx: Context, status: int, text: str, workdir: Path,
                     failed_step: Optional[int] = 20) -> None:
  """The run stopped at the save of `failed_step` (None: whichever save the error names) and
  every earlier checkpoint is intact and readable, exactly as it was written."""
  assert status == 1, text[-3000:]
  error = error_line(text)
  match = re.match(r"error: Could not save the checkpoint of step (\d+) in ", error)
  assert match, error
  step = int(match.group(1))
  if failed_step is not None:
    assert step == failed_step, error
  assert step > 10, error  # The first checkpoint was written.
  earlier = list(range(10, step, 10))
  assert error.startswith(f"error: Could not save the checkpoint of step {step} in "
                          f"{checkpoint_dir(workdir)}: No space left on device (ENOSPC)."), error
  assert f"The complete checkpoints {earlier} are intact" in error
  assert complete_steps(workdir) == earlier
  restored_step, variables = restored(workdir)
  assert restored_step == earlier[-1]
  assert_bit_identical(variables, restored(ctx.reference, earlier[-1])[1])


@scenario
def _disk_full_during_a_save_stops_and_keeps_the_previous_checkpoint(ctx, tmp):
  """The commit of step 20 fails with ENOSPC (injected where Orbax renames the folder)."""
  workdir = tmp / "run"
  status, text = run(train_command(*ctx.train_args(workdir)), ctx.env, tmp / "console.txt",
                     {"FAULTS_ENOSPC_AT_SAVE": "20"})
  _check_disk_full(ctx, status, text, workdir)


def _can_mount_tmpfs(tmp: Path) -> bool:
  """Whether an unprivileged user and mount namespace can mount a tmpfs here (Linux)."""
  if not shutil.which("unshare"):
    return False
  probe = tmp / "probe"
  probe.mkdir()
  result = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs "
                           f"'{probe}'"], capture_output=True, timeout=60, check=False)
  return result.returncode == 0


@scenario
def _disk_full_on_a_real_tiny_filesystem(ctx, tmp):
  """Checkpoints on a tmpfs with room for one: the second save really runs out of space."""
  if not _can_mount_tmpfs(tmp):
    pytest.skip("unshare cannot mount a tmpfs here (no user namespaces)")
  workdir = tmp / "run"
  checkpoint_dir(workdir).mkdir(parents=True)
  kept = tmp / "checkpoints_kept"
  # Room for one checkpoint and 60% of another, in the 4 KiB pages a tmpfs allocates: the
  # first save (with its transient files) fits, the second cannot.
  size = sum(-(-p.stat().st_size // 4096) * 4096
             for p in (checkpoint_dir(ctx.reference) / "10").rglob("*") if p.is_file())
  command = " ".join(f"'{a}'" for a in train_command(*ctx.train_args(workdir)))
  # The tmpfs lives as long as its namespace: copy out what it holds before that ends.
  script = (f"mount -t tmpfs -o size={size * 8 // 5} tmpfs '{checkpoint_dir(workdir)}' && "
            f"{{ {command}; rc=$?; cp -a '{checkpoint_dir(workdir)}' '{kept}'; exit $rc; }}")
  status, text = run(["unshare", "-rm", "sh", "-c", script], ctx.env, tmp / "console.txt")
  checkpoint_dir(workdir).rmdir()
  shutil.copytree(kept, checkpoint_dir(workdir), symlinks=True)
  # Usually the second save runs out of space; compressed checkpoint sizes and the timing of
  # the asynchronous saves' cleanup can leave room for one more, so any later save may be it.
  _check_disk_full(ctx, status, text, workdir, failed_step=None)


# ------------------------------------------------------------------- another model's workdir


@scenario
def _checkpoints_of_another_model_are_refused_and_nothing_is_overwritten(ctx, tmp):
  workdir = tmp / "run"
  shutil.copytree(ctx.reference, workdir, symlinks=True)
  before = file_contents(workdir)
  status, text = run(module_command("msatt_jax.train",
                                    *ctx.train_args(workdir, "--config.model.base_width=8")),
                     ctx.env, tmp / "console.txt")
  assert status == 1, text[-3000:]
  error = error_line(text)
  assert error.startswith(f"error: {checkpoint_dir(workdir)} holds checkpoints of a different "
                          "model or input: "), error
  assert "Use a new --workdir (nothing was overwritten)." in error
  assert file_contents(workdir) == before


# ------------------------------------------------------------------ bad input through the CLIs


def _save_nifti(data: np.ndarray, path: Path) -> None:
  nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def _truncate(path: Path) -> Path:
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  return path


def _brats_case(ctx: Context, dest: Path) -> Path:
  """A writable copy of the first BraTS-layout case folder."""
  case = sorted(p for p in ctx.synthetic_brats.glob("*/*") if p.is_dir())[0]
  return Path(shutil.copytree(case, dest / case.name))


def _corrupt_nifti(src: Path) -> Tuple[str, str]:
  return str(_truncate(src / "imagesTr" / "BRATS_002.nii.gz")), "cannot read as NIfTI"


def _missing_modality(src: Path) -> Tuple[str, str]:
  # The MSD layout stores modalities as channels: drop one channel of one case.
  path = src / "imagesTr" / "BRATS_003.nii.gz"
  _save_nifti(np.asarray(nib.load(str(path)).dataobj)[..., :3], path)
  return str(path), "3 channels"


def _shape_mismatch(src: Path) -> Tuple[str, str]:
  path = src / "labelsTr" / "BRATS_003.nii.gz"
  _save_nifti(np.zeros((40, 48, 40), np.uint8), path)
  return str(path), "differs from image shape"


def _nan_voxels(src: Path) -> Tuple[str, str]:
  path = src / "imagesTr" / "BRATS_001.nii.gz"
  image = np.asarray(nib.load(str(path)).dataobj, np.float32)
  image[20, 20, 20, 1] = np.nan
  _save_nifti(image, path)
  return str(path), "NaN or Inf voxels"


def _unknown_labels(src: Path) -> Tuple[str, str]:
  path = src / "labelsTr" / "BRATS_004.nii.gz"
  label = np.asarray(nib.load(str(path)).dataobj).astype(np.uint8)
  label[0, 0, 0] = 7
  _save_nifti(label, path)
  return str(path), "label values [7]"


def _empty_folder(src: Path) -> Tuple[str, str]:
  shutil.rmtree(src)
  src.mkdir()
  return str(src), "neither an MSD folder"


BAD_SOURCES = {f.__name__.lstrip("_"): f for f in (
    _corrupt_nifti, _missing_modality, _shape_mismatch, _nan_voxels, _unknown_labels,
    _empty_folder)}


def _prepared_sets(data_dir: Path) -> List[Path]:
  """Data sets under data_dir that read as complete (TFDS writes dataset_info.json last)."""
  return [p for p in data_dir.rglob("dataset_info.json") if "incomplete" not in str(p)]


def _bad_training_data(damage: Callable[[Path], Tuple[str, str]], ctx: Context,
                       tmp: Path) -> None:
  src = Path(shutil.copytree(ctx.synthetic_msd, tmp / "source"))
  names, phrase = damage(src)
  workdir, data_dir = tmp / "run", tmp / "prepared"
  status, text = run(module_command(
      "msatt_jax.train", *TINY, f"--workdir={workdir}", f"--config.data.source_dir={src}",
      f"--config.data.data_dir={data_dir}"), ctx.env, tmp / "console.txt")
  assert status == 1, text[-3000:]
  assert "Traceback" not in text, text[-3000:]
  error = error_line(text)
  assert names in error and phrase in error, error
  # Nothing that a later run would read as prepared data, and no run output.
  assert not _prepared_sets(data_dir)
  assert not checkpoint_dir(workdir).exists() and not (workdir / "metrics.jsonl").exists()


# One damaged source through the train command: the others end it the same way, with the kind
# of error that test_preparation_refuses_bad_training_data checks each of them raises.
SCENARIOS["train_refuses_corrupt_nifti"] = functools.partial(_bad_training_data, _corrupt_nifti)
NO_REFERENCE.append("train_refuses_corrupt_nifti")


# An unknown key is tests/test_cli.py's (the command convention reports it, whatever the config).
BAD_OVERRIDES = {
    "wrong_type": ("--config.batch_size=abc",
                   "flag --config.batch_size=abc: invalid literal for int()"),
    "bad_nan_policy": ("--config.nan_policy=sometimes",
                       "config.nan_policy must be one of ('stop', 'skip'), not 'sometimes'"),
}


def _bad_override(name: str, ctx: Context, tmp: Path) -> None:
  override, message = BAD_OVERRIDES[name]
  workdir = tmp / "run"
  status, text = run(module_command("msatt_jax.train", *ctx.train_args(workdir), override),
                     ctx.env, tmp / "console.txt")
  assert status == 1, text[-3000:]
  assert "Traceback" not in text, text[-3000:]
  assert message in error_line(text)
  assert not checkpoint_dir(workdir).exists()


for _name in BAD_OVERRIDES:
  SCENARIOS[f"train_refuses_override_{_name}"] = functools.partial(_bad_override, _name)
  NO_REFERENCE.append(f"train_refuses_override_{_name}")


def _predict_input(kind: str, ctx: Context, tmp: Path) -> Tuple[Path, str, str]:
  """(input, the file the error must name, a phrase of it) for predict."""
  if kind == "corrupt_input":
    path = tmp / "BRATS_001.nii.gz"
    shutil.copy(ctx.synthetic_msd / "imagesTr" / path.name, path)
    return path, str(_truncate(path)), "cannot read as NIfTI"
  case = _brats_case(ctx, tmp)
  if kind == "missing_modality":
    next(case.glob("*_t1ce.nii*")).unlink()
    return case, case.name, "missing modality t1ce"
  if kind == "shape_mismatch":
    path = next(case.glob("*_t2.nii*"))
    _save_nifti(np.zeros((48, 40, 40), np.int16), path)
    return case, str(path), "differs from"
  raise ValueError(kind)


def _bad_predict(kind: str, ctx: Context, tmp: Path) -> None:
  output = tmp / "out" / "seg.nii.gz"
  output.parent.mkdir()
  if kind in ("missing_output_folder", "output_under_a_file"):
    case = _brats_case(ctx, tmp)
    if kind == "missing_output_folder":
      output = tmp / "no_such_folder" / "seg.nii.gz"
    else:
      (tmp / "a_file").write_text("not a folder")
      output = tmp / "a_file" / "seg.nii.gz"
    names, phrase = str(output.parent), "does not exist"
  else:
    case, names, phrase = _predict_input(kind, ctx, tmp)
  status, text = run(module_command(
      "msatt_jax.predict", f"--workdir={ctx.reference}", f"--input={case}",
      f"--output={output}", "--checkpoint=latest"), ctx.env, tmp / "console.txt")
  assert status == 1, text[-3000:]
  assert "Traceback" not in text, text[-3000:]
  error = error_line(text)
  assert names in error and phrase in error, error
  assert not output.exists()
  if output.parent.is_dir():
    # No temporary file of an atomic write is left (they are hidden: '.<name>.*.tmp*').
    assert not [p.name for p in output.parent.iterdir() if p.name.startswith(".")]


# The reader's other checks (NaN voxels, empty folders, ...) are the ones train hits above, and
# tests/test_layouts.py covers each at the reader level.
BAD_PREDICTIONS = ("corrupt_input", "missing_modality", "shape_mismatch",
                   "missing_output_folder", "output_under_a_file")
for _name in BAD_PREDICTIONS:
  SCENARIOS[f"predict_refuses_{_name}"] = functools.partial(_bad_predict, _name)


@scenario
def _evaluate_names_a_corrupt_case_and_writes_no_results(ctx, tmp):
  src = Path(shutil.copytree(ctx.synthetic_msd, tmp / "source"))
  for image in (src / "imagesTr").iterdir():
    _truncate(image)  # Whichever case the test split holds, it is unreadable.
  out = tmp / "eval"
  status, text = run(module_command(
      "msatt_jax.evaluate", f"--workdir={ctx.reference}", "--checkpoint=latest",
      f"--source_dir={src}", f"--out={out}"), ctx.env, tmp / "console.txt")
  assert status == 1, text[-3000:]
  error = error_line(text)
  assert str(src / "imagesTr") in error and "cannot read as NIfTI" in error, error
  assert not (out / "summary.json").exists() and not (out / "per_case.csv").exists()


# --------------------------------------------------- one run per workdir, readers, damaged runs


def assert_clean_consoles(tmp: Path) -> None:
  """No command of a scenario printed a traceback (the refusals are one error line each)."""
  for log in sorted(tmp.glob("*.log")):
    assert "Traceback" not in log.read_text(errors="replace"), (log.name, log.read_text()[-3000:])


@long_scenario
def _a_second_launch_during_a_run_is_refused_and_changes_nothing(ctx, tmp):
  # The first run is frozen while the second starts: every file of the workdir is compared.
  fault_lib.check_second_launch(ctx.trainer, tmp / "run", tmp / "console", after=3)
  error = error_line((tmp / "console_second.log").read_text())
  assert error.startswith(f"error: {tmp / 'run'} is in use by a training run: process "), error
  assert error.endswith("this run changed nothing."), error
  assert_clean_consoles(tmp)


@long_scenario
def _evaluation_during_training_reads_only_committed_checkpoints(ctx, tmp):
  # Three evaluations: from the start, while the save of step 20 is held before its commit (it
  # reads step 10), while the rest commits.
  fault_lib.check_evaluate_during_training(ctx.trainer, tmp / "run", tmp / "console", stall=20,
                                           before_stall=1)
  assert_clean_consoles(tmp)


@scenario
def _when_every_checkpoint_is_damaged_nothing_starts_over_them(ctx, tmp):
  workdir = Path(shutil.copytree(ctx.reference, tmp / "run", symlinks=True))
  fault_lib.check_all_damaged(ctx.trainer, workdir, tmp / "console.log")
  error = error_line((tmp / "console.log").read_text())
  assert error.index("step 30") < error.index("step 20") < error.index("step 10"), error
  assert "move the checkpoints folder away to start from scratch" in error, error
  assert_clean_consoles(tmp)


@long_scenario
def _a_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_previous(ctx, tmp):
  workdir = Path(shutil.copytree(ctx.reference, tmp / "run", symlinks=True))
  fault_lib.damage(workdir, 30)
  # evaluate/predict name the damaged step and the flag that picks another.
  error = fault_lib.check_evaluate_refuses_damaged(ctx.trainer, workdir, tmp / "eval")
  assert str(checkpoint_dir(workdir)) in error and "step 30" in error, error
  assert "cannot be restored" in error and "--checkpoint=" in error, error
  # The rerun of the same command resumes from step 20 and ends as the uninterrupted run.
  fault_lib.check_damaged_resume(ctx.trainer, workdir, tmp / "resume.log", count=1)
  assert complete_steps(workdir) == [10, 20, 30]
  assert_clean_consoles(tmp)


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", list(BAD_SOURCES))
def test_preparation_refuses_bad_training_data(name, synthetic_msd, tmp_path):
  """What train meets in each damaged source (train_refuses_corrupt_nifti runs the command on
  one): an error the commands report as one line, naming the file and the problem, and nothing
  that a later run would read as prepared data."""
  src = Path(shutil.copytree(synthetic_msd, tmp_path / "source"))
  names, phrase = BAD_SOURCES[name](src)
  data_dir = tmp_path / "prepared"
  with pytest.raises(cli.USER_ERRORS) as error:
    prepare_lib.prepare_for_training(small_data_config(src, data_dir), str(tmp_path / "run"))
  assert names in str(error.value) and phrase in str(error.value), error.value
  assert not _prepared_sets(data_dir)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fault(name, outcomes):
  outcomes[name].result()  # Re-raises the scenario's failure (or skip) here.
