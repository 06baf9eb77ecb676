"""`benchmarks.run --compare-torch` in the project's own environment (where TensorFlow is
installed too), with torch and MONAI from the `bench` extra. Skipped where they are not
installed (as in CI, which installs `.[test,tfds-cli]`)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from msatt_jax import runtime

import helpers
from helpers import REPO

_MISSING = [m for m in ("torch", "monai") if importlib.util.find_spec(m) is None]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    bool(_MISSING), reason=f"{' and '.join(_MISSING)} not installed (pip install -e '.[bench]')")]


def _env() -> dict:
  env = helpers.with_repo_on_path(os.environ)
  env.pop(runtime.REEXEC_MARK, None)  # The driver applies the runtime defaults itself.
  return env


def test_the_pytorch_worker_keeps_tensorflow_out():
  """MONAI's import would pull TensorFlow in (through torch.utils.tensorboard) where it is
  installed; in the worker it must not, or creating Adam crashes it (issue 27)."""
  probe = ("import sys; from benchmarks import torch_bench; import monai.networks.nets; "
           "import torch; torch.optim.Adam(torch.nn.Linear(2, 2).parameters()); "
           "print(sys.modules.get('tensorflow', 'absent'))")
  out = subprocess.run([sys.executable, "-c", probe], env=_env(), capture_output=True,
                       text=True, cwd=REPO, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ["None"]


def test_compare_torch_end_to_end(tmp_path):
  """The comparison command at tiny sizes: every side runs both modes to the end (before the
  fix the PyTorch worker died with SIGSEGV, 'the worker exited (code -11)')."""
  out_json = tmp_path / "out.jsonl"
  cmd = [sys.executable, "-m", "benchmarks.run", "--models", "unet", "--compare-torch",
         "--set", "base_width=2", "--size", "32", "--batch_sizes", "2", "--steps", "3",
         "--warmup", "1", "--json", str(out_json)]
  proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  rows = [json.loads(line) for line in out_json.read_text().splitlines()]
  assert sorted((r["framework"], r["mode"]) for r in rows) == [
      ("jax", "inference"), ("jax", "train"), ("pytorch", "inference"), ("pytorch", "train")]
  torch_rows = [r for r in rows if r["framework"] == "pytorch"]
  for r in torch_rows:
    assert len(r["step_times_s"]) == 3 and r["slices_per_s"] > 0
    assert r["params"] > 0 and r["flops_per_step"] > 0 and r["peak_mem_mb"] > 0
    assert r["framework_version"].startswith("2.")
    assert r["settings"] == {"mkldnn": True, "memory_format": "channels_last", "adam": "fused"}
    assert r["threads"] == next(j["threads"] for j in rows if j["framework"] == "jax")
  # The same U-Net on both sides: 30,778 parameters in JAX; MONAI's convolutions before
  # BatchNorm keep their (redundant) biases, 254 more.
  jax_params = next(r["params"] for r in rows if r["framework"] == "jax")
  assert torch_rows[0]["params"] - jax_params == 254
  for mode in ("inference", "train"):
    assert f"unet batch 2 {mode}: jax / pytorch = " in proc.stdout
  assert "load average" in proc.stdout
