"""Multi-device and multi-process scenarios for tests/test_parallel.py, run in subprocesses.

The device count must be forced before jax is imported, so the tests start this script with
XLA_FLAGS=--xla_force_host_platform_device_count=N. It runs the scenarios named in its JSON
argument, in order, in one process (compilations are shared), and prints one JSON line (the
last line of stdout): the list of their reports, the numbers the tests assert on.

  python tests/parallel_worker.py '[["modes", {}], ["bad_input", {}]]'
"""

import json
import os
import sys
from typing import Any, Dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import ml_collections
import numpy as np
import optax

from configs import tiny
from msatt_jax import checkpointing
from msatt_jax import parallel
from msatt_jax import steps
from msatt_jax import train

MODES = ("single", "pmap", "sharding")
SGD_LEARNING_RATE = 0.05


def tiny_config(**overrides: Any) -> ml_collections.ConfigDict:
  """A test-sized U-Net (4 widths, 2 poolings) on 32 x 32 slices, batch 8; flat overrides."""
  config = tiny.get_config("unet")
  config.data.crop_size = 32
  config.model.base_width, config.model.depth = 4, 2
  config.batch_size = 8
  config.learning_rate = 1e-3
  config.update_from_flattened_dict(overrides)
  return config


def random_batches(config, num: int, seed: int = 0):
  """Random images and blobby labels (every class present, the Dice terms non-trivial)."""
  rng = np.random.default_rng(seed)
  h, w, m = steps.input_shape(config)
  out = []
  for _ in range(num):
    image = rng.normal(size=(config.batch_size, h, w, m)).astype(np.float32)
    label = np.clip(np.round(image[..., 0] + image[..., 1]), 0, 3).astype(np.uint8)
    out.append({"image": image, "label": label})
  return out


def arrays(state: Any) -> Dict[str, Any]:
  """The array fields of a train state (its static fields differ between modes)."""
  return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
          "opt_state": state.opt_state}


def host(tree: Any) -> Any:
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float64), tree)


def worst(a: Any, b: Any, rtol: float = 1e-5, atol: float = 1e-6) -> float:
  """max |a - b| / (atol + rtol |b|) over all elements: <= 1 is np.allclose(a, b, rtol, atol)."""
  ratios = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y) / (atol + rtol * np.abs(y)))),
                        host(a), host(b))
  return max(jax.tree.leaves(ratios), default=0.0)


def max_abs(a: Any, b: Any) -> float:
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), host(a), host(b))
  return max(jax.tree.leaves(diffs), default=0.0)


# ---------------------------------------------------------------------------------------------
# Step-level equivalence and checkpoints across modes.


class Setup:
  """One mode's strategy, fresh state (SGD with momentum) and compiled step functions."""

  def __init__(self, config, mode: str):
    config = ml_collections.ConfigDict(config.to_dict())
    config.parallel = mode
    self.par = parallel.from_config(config)
    lr_fn = steps.create_learning_rate_fn(config, steps_per_epoch=10)
    model = steps.create_model(config, axis_name=self.par.axis_name)
    # SGD, not Adam: Adam divides out a wrong overall gradient scale, SGD shows it.
    tx = optax.sgd(SGD_LEARNING_RATE, momentum=0.9)

    def init(rng):
      state = steps.create_train_state(rng, config, model, lr_fn)
      return state.replace(tx=tx, opt_state=tx.init(state.params))
    # On the host: every use places its own copy (the train step donates what it is given).
    self.fresh = jax.device_get(self.par.create_state(init, jax.random.key(config.seed)))
    self.step = self.par.train_step_fn(steps.make_train_step(config, lr_fn))
    self.evaluate = self.par.eval_step_fn(steps.make_eval_step(config))

  def train(self, state, batches):
    """Canonical (or host) state -> canonical state after the batches, the losses, and the
    state in the step layout."""
    state = self.par.to_step_layout(state)
    losses = []
    for batch in batches:
      state, metrics = self.step(state, batch)
      losses.append(float(jax.device_get(metrics["loss"])))
    return self.par.to_canonical(state), losses, state


def scenario_modes(args: Dict[str, Any]) -> Dict[str, Any]:
  """Three steps per mode from one start and one set of batches; checkpoints across modes."""
  config = tiny_config(**args.get("config", {}))
  batches = random_batches(config, 4)
  setups = {mode: Setup(config, mode) for mode in MODES}
  runs = {}
  for mode, s in setups.items():
    final, losses, placed = s.train(s.fresh, batches[:3])
    runs[mode] = {"start": s.fresh, "final": final, "losses": losses,
                  "eval": s.evaluate(placed, batches[3])}
  ref = runs["single"]
  report = {"num_devices": {m: s.par.num_devices for m, s in setups.items()},
            "kind": {m: type(s.par).__name__ for m, s in setups.items()},
            # How far three steps moved the parameters: the scale the differences compare to.
            "moved": max_abs(ref["final"].params, ref["start"].params),
            "step": {}, "losses": {}, "params": {}, "batch_stats": {}, "opt_state": {},
            "params_abs": {}, "eval": {}}
  for mode, run in runs.items():
    report["step"][mode] = int(run["final"].step)
    report["losses"][mode] = run["losses"]
    report["params"][mode] = worst(run["final"].params, ref["final"].params)
    report["params_abs"][mode] = max_abs(run["final"].params, ref["final"].params)
    report["batch_stats"][mode] = worst(run["final"].batch_stats, ref["final"].batch_stats)
    report["opt_state"][mode] = worst(run["final"].opt_state, ref["final"].opt_state)
    report["eval"][mode] = max_abs(run["eval"], ref["eval"])
  report["eval_shapes"] = {k: list(v.shape) for k, v in ref["eval"].items()}

  # A checkpoint written in each mode, restored into each mode and trained one more step.
  checkpoints = {}
  after = {}
  for writer, run in runs.items():
    ckpt = checkpointing.Checkpointer(os.path.join(args["dir"], writer))
    ckpt.save(3, run["final"], {"mode": writer})
    ckpt.wait()
    for reader, s in setups.items():
      restored, meta = ckpt.restore(3, s.par.put_canonical(s.fresh))
      checkpoints[f"{writer}->{reader}"] = {
          "restored": max_abs(arrays(restored), arrays(run["final"])), "meta": meta["mode"],
          "step": int(restored.step)}
      stepped = s.train(restored, batches[3:])[0]
      after[(writer, reader)] = stepped
      checkpoints[f"{writer}->{reader}"]["next_step"] = int(stepped.step)
    ckpt.close()
  for (writer, reader), stepped in after.items():
    checkpoints[f"{writer}->{reader}"]["next_params"] = worst(
        stepped.params, after[("single", "single")].params)
  report["checkpoints"] = checkpoints
  return report


def scenario_bad_input(args: Dict[str, Any]) -> Dict[str, Any]:
  """The messages of bad parallel settings, and what 'auto' picks."""
  del args
  cases = {
      "indivisible": {"parallel": "sharding", "batch_size": 6},
      "indivisible_pmap": {"parallel": "pmap", "batch_size": 10},
      "too_many": {"parallel": "pmap", "num_devices": 64},
      "unknown_mode": {"parallel": "ddp"},
      "single_many": {"parallel": "single", "num_devices": 2},
  }
  report = {}
  for name, overrides in cases.items():
    try:
      parallel.from_config(tiny_config(**overrides))
      report[name] = None
    except ValueError as e:
      report[name] = str(e)
  report["auto"] = parallel.from_config(tiny_config(parallel="auto")).mode
  report["auto_one"] = parallel.from_config(tiny_config(parallel="auto", num_devices=1)).mode
  return report


# ---------------------------------------------------------------------------------------------
# The trainer end to end.


def scenario_train(args: Dict[str, Any]) -> Dict[str, Any]:
  """train_and_evaluate runs in turn (e.g. pmap to step 2, then sharding resumes to step 4)."""
  report = {}
  for i, overrides in enumerate(args["runs"]):
    state = train.train_and_evaluate(tiny_config(**overrides), args["workdir"])
    report[f"run{i}_step"] = int(state.step)
  out = args["out"].format(process=jax.process_index())
  flat = jax.tree_util.tree_flatten_with_path(host({"params": state.params,
                                                    "batch_stats": state.batch_stats}))[0]
  np.savez(out, **{jax.tree_util.keystr(path): value for path, value in flat})
  report.update({"out": out, "process_index": jax.process_index(),
                 "process_count": jax.process_count(), "devices": jax.device_count(),
                 "local_devices": jax.local_device_count()})
  return report


def scenario_refused_run(args: Dict[str, Any]) -> Dict[str, Any]:
  """Starts a run that must be refused: the error, and whether the workdir was created."""
  config = tiny_config(**args["config"])
  try:
    train.train_and_evaluate(config, args["workdir"])
    return {"error": None}
  except Exception as e:  # pylint: disable=broad-except
    return {"error": str(e), "type": type(e).__name__, "is_value_error": isinstance(e, ValueError),
            "workdir_exists": os.path.exists(args["workdir"])}


SCENARIOS = {"modes": scenario_modes, "bad_input": scenario_bad_input, "train": scenario_train,
             "refused_run": scenario_refused_run}


if __name__ == "__main__":
  print(json.dumps([SCENARIOS[name](arguments) for name, arguments in json.loads(sys.argv[1])]))
