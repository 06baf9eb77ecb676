"""A normal train, evaluate and predict print the project's own lines and no library noise.

Every console line of the three commands must be a log line of a project module (absl's prefix
names the file), or a plain line printed by the project (tables, progress), or one of the
accepted warnings below. Library start-up chatter (TensorFlow's oneDNN and CPU-feature lines),
Orbax's read-only notices, TFDS's own preparation lines, Python warnings and XLA's
constant-folding alarms fail the test, with the offending lines in the message.
"""

import os
import re

import pytest

from helpers import REPO, run_module

# absl's prefix: I1203 08:31:30.207940 140668400544640 file.py:849] message
ABSL_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ ([\w.]+\.py):\d+\] ")
# Lines libraries write in other forms: C++ logs, absl's pre-init notice, Python warnings.
FOREIGN = re.compile(r"^([IWEF]\d{4} |WARNING: |ERROR: |INFO: )|\w+Warning: |^Traceback ")
# Warnings a user must see, though a library prints them (none today).
ACCEPTED: tuple = ()


def project_files():
  return {p.name for package in ("msatt_jax", "data_pipelines", "configs")
          for p in (REPO / package).rglob("*.py")}


def foreign_lines(output: str, own_files) -> list:
  bad = []
  for line in output.splitlines():
    if not line.strip() or any(re.search(a, line) for a in ACCEPTED):
      continue
    match = ABSL_LINE.match(line)
    if match:
      if match.group(1) not in own_files:
        bad.append(line)
    elif FOREIGN.search(line):
      bad.append(line)
  return bad


def test_the_check_tells_library_lines_from_the_projects():
  own = {"train.py"}
  output = "\n".join([
      "I1203 08:31:30.207940 140668400544640 train.py:12] step 10/36",
      "W1203 08:31:30.207940 140668400544640 checkpoint_manager.py:452] read_only=True",
      "I0000 00:00:1796286748.310997     404 port.cc:153] oneDNN custom operations are on.",
      "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
      "/x/y.py:3: DeprecationWarning: old",
      "case 1/8 BRATS_001: 0.02 s (ETA 0.0 min)",
  ])
  assert foreign_lines(output, own) == output.splitlines()[1:5]


def _run(args, cwd):
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "PYTHONWARNINGS")}
  out = run_module(*args, cwd=cwd, env=env, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  return out.stdout + out.stderr


@pytest.mark.slow
def test_train_evaluate_and_predict_print_only_the_projects_lines(tmp_path):
  workdir = tmp_path / "run"
  outputs = {
      "train": _run(["msatt_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
                     "--config.num_epochs=1", "--config.eval_every_epochs=1"], REPO),
      "evaluate": _run(["msatt_jax.evaluate", f"--workdir={workdir}"], REPO),
      "predict": _run(["msatt_jax.predict", f"--workdir={workdir}",
                       f"--input={workdir / 'synthetic' / 'imagesTr' / 'BRATS_001.nii.gz'}",
                       f"--output={tmp_path / 'BRATS_001_seg.nii.gz'}"], REPO),
  }
  own = project_files()
  noise = {name: foreign_lines(text, own) for name, text in outputs.items()}
  assert noise == {"train": [], "evaluate": [], "predict": []}
  assert "Working set:" in outputs["train"] and "rss" in outputs["train"]
