"""Data parallelism: pmap and jit over a mesh train like one device; several processes; refusals.

Multi-device code runs in subprocesses (tests/parallel_worker.py) with forced CPU devices, as
the device count is fixed when jax starts. Step-level equivalence with one device is checked on
random data with np.allclose(rtol=1e-5, atol=1e-6) on every parameter, BatchNorm statistic and
optimizer slot after three steps that move the parameters by ~0.1 (SGD with momentum, which,
unlike Adam, shows a wrong gradient scale). The trainer end to end runs on the synthetic set,
where the float32 gradient of the tiny U-Net depends on summation order (one device fed the same
rows reversed differs by ~1e-3 relative, and Adam turns that into ~lr-sized parameter
differences): there the two-process run is compared, just as tightly, with the one-process run
on the same 4 devices.
"""

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parallel_worker.py")
MODES = ("single", "pmap", "sharding")
STEPS = 4  # Train steps of the end-to-end runs (2 in pmap, then 2 more in sharding).
# The checkpoints they leave: the newest save and the periodic ones are kept, and both runs'
# final saves (steps 2 and 4) fall outside the 100-epoch schedule, so step 4's replaced step 2's.
KEPT_STEPS = [STEPS]


def _env(num_devices: int) -> Dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [os.path.dirname(os.path.dirname(WORKER)), env.get("PYTHONPATH", "")])
  return env


def _start(scenarios: List, num_devices: int) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, WORKER, json.dumps(scenarios)], env=_env(num_devices),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float) -> List[Dict[str, Any]]:
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    raise AssertionError(f"worker timed out after {timeout} s:\n{err[-3000:]}") from None
  assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{err[-4000:]}"
  return json.loads(out.strip().splitlines()[-1])


def _run(scenarios: List, num_devices: int, timeout: float = 600) -> List[Dict[str, Any]]:
  return _finish(_start(scenarios, num_devices), timeout)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _train_config(source: str, data_dir: str, **overrides: Any) -> Dict[str, Any]:
  """Flat overrides of the worker's tiny config for an end-to-end run on the synthetic set."""
  return {"data.source_dir": source, "data.data_dir": data_dir, "eval_every_epochs": 100,
          "checkpoint_every_epochs": 100, "log_every_steps": 1, **overrides}


def _load(path: str) -> Dict[str, np.ndarray]:
  with np.load(path) as f:
    return dict(f)


def _restored_for_inference(workdir) -> Dict[str, np.ndarray]:
  """What evaluate and predict restore (one device here), flattened like the worker's files."""
  import jax  # pylint: disable=g-import-not-at-top
  from msatt_jax import inference  # pylint: disable=g-import-not-at-top
  run = inference.restore_run(str(workdir), "latest")
  flat = jax.tree_util.tree_flatten_with_path(
      {"params": run.variables["params"], "batch_stats": run.variables["batch_stats"]})[0]
  return {jax.tree_util.keystr(path): np.asarray(value, np.float64) for path, value in flat}


def _assert_close_trees(got: Dict[str, np.ndarray], want: Dict[str, np.ndarray]) -> None:
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.fixture(scope="module")
def data(synthetic_msd, tmp_path_factory):
  """(source, prepared data dir) for the end-to-end runs; prepared by the first run."""
  return str(synthetic_msd), str(tmp_path_factory.mktemp("prepared"))


def _start_two_processes(source: str, data_dir: str, tmp) -> List[subprocess.Popen]:
  """2 processes x 2 devices on localhost, training the runs of the 4-device worker."""
  port = _free_port()
  procs = []
  for pid in range(2):
    dist = {"distributed.enabled": True, "distributed.coordinator_address": f"localhost:{port}",
            "distributed.num_processes": 2, "distributed.process_id": pid,
            "distributed.initialization_timeout": 120}
    runs = [_train_config(source, data_dir, parallel="pmap", num_train_steps=STEPS // 2, **dist),
            _train_config(source, data_dir, parallel="sharding", num_train_steps=STEPS, **dist)]
    out = str(tmp / "two_processes_{process}.npz")
    procs.append(_start([["train", {"runs": runs, "workdir": str(tmp / "two_processes"),
                                    "out": out}]], 2))
  return procs


@pytest.fixture(scope="module")
def four_devices(request, data, tmp_path_factory) -> Dict[str, Any]:
  """One 4-device worker: refusals, step equivalence and checkpoints, and the trainer. When
  test_two_processes_train_like_one is selected, its two processes train meanwhile: the worker
  alone leaves much of a second core idle (it compiles one program at a time)."""
  tmp = tmp_path_factory.mktemp("parallel")
  source, data_dir = data
  selected = {getattr(item, "originalname", None) for item in request.session.items}
  two = (_start_two_processes(source, data_dir, tmp)
         if "test_two_processes_train_like_one" in selected else [])
  switched = [_train_config(source, data_dir, parallel="pmap", num_train_steps=STEPS // 2),
              _train_config(source, data_dir, parallel="sharding", num_train_steps=STEPS)]
  no_data = {"parallel": "sharding", "batch_size": 6, "data.synthetic_cases": 0}
  try:
    bad, refused, modes, switch = _run([
        ["bad_input", {}],
        ["refused_run", {"config": no_data, "workdir": str(tmp / "never")}],
        ["modes", {"dir": str(tmp / "checkpoints")}],
        ["train", {"runs": switched, "workdir": str(tmp / "switched"),
                   "out": str(tmp / "switched.npz")}],
    ], num_devices=4)
  except BaseException:
    for proc in two:
      proc.kill()
      proc.communicate()
    raise
  return {"bad": bad, "refused": refused, "modes": modes, "switch": switch, "tmp": tmp,
          "two_processes": two}


@pytest.mark.slow
def test_auto_picks_sharding_on_several_devices_and_single_on_one(four_devices):
  assert four_devices["bad"]["auto"] == "sharding"
  assert four_devices["bad"]["auto_one"] == "single"
  assert four_devices["modes"]["num_devices"] == {"single": 1, "pmap": 4, "sharding": 4}


@pytest.mark.slow
def test_three_steps_agree_with_one_device_in_every_mode(four_devices):
  report = four_devices["modes"]
  assert report["moved"] > 0.05  # The comparison is between parameters that really moved.
  for mode in MODES:
    assert report["step"][mode] == 3
    np.testing.assert_allclose(report["losses"][mode], report["losses"]["single"], rtol=1e-5)
    for part in ("params", "batch_stats", "opt_state"):
      assert report[part][mode] <= 1.0, (mode, part, report[part][mode])
    assert report["params_abs"][mode] < 1e-6
    # Validation outputs (labels, per-slice region counts) of every row, identical.
    assert report["eval"][mode] == 0.0
  assert report["eval_shapes"]["pred"] == [8, 32, 32]
  assert report["eval_shapes"]["intersection"] == [8, 3]


@pytest.mark.slow
def test_checkpoint_written_in_one_mode_restores_in_every_mode(four_devices):
  checkpoints = four_devices["modes"]["checkpoints"]
  assert len(checkpoints) == len(MODES) ** 2
  for pair, result in checkpoints.items():
    writer = pair.split("->")[0]
    assert result["restored"] == 0.0, pair  # Bit for bit, optimizer slots and step included.
    assert result["meta"] == writer and result["step"] == 3, pair
    assert result["next_step"] == 4, pair
    # Trained on in the reader's mode, it stays with one device trained on.
    assert result["next_params"] <= 1.0, (pair, result["next_params"])


def _logged_steps(workdir) -> List[int]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f if "train_loss" in line]


@pytest.mark.slow
def test_trainer_resumes_a_pmap_run_under_sharding(four_devices):
  """train_and_evaluate: 2 steps under pmap (checkpoint), then sharding resumes to step 4."""
  switch = four_devices["switch"]
  assert switch["run0_step"] == STEPS // 2 and switch["run1_step"] == STEPS
  assert switch["devices"] == 4 and switch["process_count"] == 1
  workdir = four_devices["tmp"] / "switched"
  assert _logged_steps(workdir) == list(range(1, STEPS + 1))
  steps = sorted(int(c) for c in os.listdir(workdir / "checkpoints") if c.isdigit())
  assert steps == KEPT_STEPS
  # evaluate / predict restore the 4-device checkpoint onto one device, bit for bit.
  final = _load(switch["out"])
  restored = _restored_for_inference(workdir)
  assert restored.keys() == final.keys()
  for key in final:
    np.testing.assert_array_equal(restored[key], final[key], err_msg=key)


@pytest.mark.slow
def test_bad_settings_are_refused_with_a_clear_message(four_devices):
  bad = four_devices["bad"]
  assert "config.batch_size=6" in bad["indivisible"]
  assert "multiple of the 4 devices" in bad["indivisible"]
  assert "config.batch_size=10" in bad["indivisible_pmap"]
  assert "config.num_devices=64" in bad["too_many"]
  assert "sees only 4 cpu device(s)" in bad["too_many"]
  assert "Unknown config.parallel 'ddp'" in bad["unknown_mode"]
  assert "'single' runs on one device" in bad["single_many"]


@pytest.mark.slow
def test_bad_batch_is_refused_before_any_work(four_devices):
  """Without data the run would fail on data; the batch check comes first, nothing written."""
  refused = four_devices["refused"]
  assert refused["type"] == "ValueError" and "config.batch_size=6" in refused["error"]
  assert not refused["workdir_exists"]


@pytest.mark.slow
def test_unreachable_coordinator_is_a_clear_error_before_any_work(tmp_path):
  workdir = tmp_path / "never"
  port = _free_port()  # Nobody listens there: process 1 waits for a coordinator that never comes.
  config = {"distributed.enabled": True, "distributed.coordinator_address": f"localhost:{port}",
            "distributed.num_processes": 2, "distributed.process_id": 1,
            "distributed.initialization_timeout": 3}
  start = time.perf_counter()
  (result,) = _run([["refused_run", {"config": config, "workdir": str(workdir)}]], 1)
  assert time.perf_counter() - start < 60
  assert result["type"] == "DistributedInitError" and result["is_value_error"]
  assert f"localhost:{port}" in result["error"] and "within 3 s" in result["error"]
  assert "process 0 is running" in result["error"]
  assert not result["workdir_exists"]


def test_coordinator_port_in_use_and_bad_addresses_are_refused():
  """Checked before jax.distributed starts, so safe in the test process."""
  from configs import brats18  # pylint: disable=g-import-not-at-top
  from msatt_jax import parallel  # pylint: disable=g-import-not-at-top

  def dist(**kw):
    d = brats18.get_distributed_config()
    d.update(enabled=True, num_processes=2, **kw)
    return d

  with socket.socket() as busy:
    busy.bind(("localhost", 0))
    busy.listen()
    port = busy.getsockname()[1]
    with pytest.raises(parallel.DistributedInitError, match=f"port {port}.*in use"):
      parallel.initialize_distributed(dist(coordinator_address=f"localhost:{port}", process_id=0))
  with pytest.raises(ValueError, match="must be HOST:PORT"):
    parallel.initialize_distributed(dist(coordinator_address="localhost", process_id=1))
  with pytest.raises(ValueError, match="process_id=2 must be in 0..num_processes-1"):
    parallel.initialize_distributed(dist(coordinator_address="localhost:1", process_id=2))
  assert parallel.split_address("[::1]:1234") == ("::1", 1234)


@pytest.mark.slow
def test_two_processes_train_like_one(four_devices):
  """2 processes x 2 devices on localhost (started beside the 4-device worker), the same runs
  as the one 4-device process."""
  workdir = four_devices["tmp"] / "two_processes"
  reports = [_finish(p, timeout=600)[0] for p in four_devices["two_processes"]]
  one_process = _load(four_devices["switch"]["out"])
  for pid, report in enumerate(reports):
    assert report["process_index"] == pid and report["process_count"] == 2
    assert report["devices"] == 4 and report["local_devices"] == 2
    assert report["run0_step"] == STEPS // 2 and report["run1_step"] == STEPS
    # Each process read only its rows; together they trained on the same global batches.
    _assert_close_trees(_load(report["out"]), one_process)
  # One checkpoint per save, written together; one copy of the logs (process 0's).
  steps = sorted(int(c) for c in os.listdir(workdir / "checkpoints") if c.isdigit())
  assert steps == KEPT_STEPS
  assert _logged_steps(workdir) == list(range(1, STEPS + 1))
  _assert_close_trees(_restored_for_inference(workdir), one_process)


def test_scaling_benchmark_efficiency_is_relative_to_one_device():
  from benchmarks import scaling  # pylint: disable=g-import-not-at-top
  rows = scaling.efficiency_table([
      {"mode": "sharding", "devices": 1, "slices_per_s": 100.0},
      {"mode": "sharding", "devices": 4, "slices_per_s": 300.0},
      {"mode": "pmap", "devices": 2, "slices_per_s": 50.0},
      {"mode": "pmap", "devices": 4, "slices_per_s": 50.0}])
  assert [round(r["speedup"], 3) for r in rows] == [1.0, 3.0, 1.0, 1.0]
  assert [round(r["efficiency"], 3) for r in rows] == [1.0, 0.75, 1.0, 0.5]
