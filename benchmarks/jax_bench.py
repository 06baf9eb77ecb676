"""JAX side of the benchmark (a worker process; see benchmarks/common.py).

Measures the project's own code: the state from `steps.create_train_state`, the trainer's step
(`steps.make_train_step`) jitted with the state donated (as the trainer does), and the model's
forward pass in inference mode. Batches are made on the device once, and a step's outputs are never
copied to the host: the worker only waits for them.
"""

import functools
import math
import os
import re
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections

from benchmarks import breakdown
from benchmarks import common
from configs import brats18
from data_pipelines.brats import labels as labels_lib
from msatt_jax import runtime
from msatt_jax import steps
from msatt_jax.summary import xla_flops

MODES = ("inference", "train")


def model_config(name: str, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The model's config from configs/brats18.py with `overrides` (strings are parsed)."""
  config = brats18.get_model_config(name)
  for key, value in overrides.items():
    if key not in config:
      raise KeyError(f"Model {name!r} has no config key {key!r}; it has {sorted(config)}.")
    config[key] = parse_value(value, config[key])
  return config


def parse_value(text: Any, like: Any) -> Any:
  """`text` converted to the type of the default value `like`."""
  if not isinstance(text, str) or isinstance(like, str):
    return text
  if isinstance(like, bool):
    return text.lower() in ("1", "true", "yes")
  if isinstance(like, int):
    return int(text)
  if isinstance(like, float):
    return float(text)
  return text


# ----------------------------------------------------------------------------------- FLOPs
def _sub_jaxprs(params: Mapping[str, Any]):
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jax.extend.core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax.extend.core.Jaxpr):
        yield v


def matmul_flops(jaxpr, loops_once: bool = False) -> float:
  """FLOPs of the convolutions and matrix products of a jaxpr (2 per multiply-add).

  Sub-computations are followed; a scan's body counts `length` times, or once with
  `loops_once` (what XLA's cost analysis does with the while loop a scan compiles to).
  """
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    elif name == "conv_general_dilated":
      rhs_spec = eqn.params["dimension_numbers"].rhs_spec
      rhs = eqn.invars[1].aval.shape
      taps = rhs[rhs_spec[1]] * math.prod(rhs[d] for d in rhs_spec[2:])
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * taps
    subs = [matmul_flops(j, loops_once) for j in _sub_jaxprs(eqn.params)]
    if not subs:
      continue
    if name == "cond":
      total += max(subs)  # One branch runs.
    elif name == "scan" and not loops_once:
      total += eqn.params["length"] * sum(subs)
    else:
      total += sum(subs)
  return total


def step_flops(fn: Callable, args: Tuple[Any, ...], compiled,
               platform: str = "cpu") -> Tuple[Optional[float], str]:
  """FLOPs of one call: XLA's cost analysis, with its while loops counted in full.

  On an accelerator XLA's cost analysis leaves out the library calls its convolutions become
  (cuDNN custom calls), so there the convolutions and matmuls are counted from the jaxpr alone
  (a fused attention kernel, a custom call too, is then not counted either).

  XLA's cost analysis counts a while loop's body once whatever its trip count; the scanned
  ConvLSTM compiles to one. When the compiled program has while loops, the convolution and
  matmul FLOPs of the remaining iterations, counted from the jaxpr, are added.
  """
  if platform != "cpu":
    return matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr), "jaxpr"
  flops = xla_flops(compiled)
  if flops is None:
    return None, "none"
  if not re.search(r"\bwhile\(", compiled.as_text()):
    return flops, "xla"
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return flops + matmul_flops(jaxpr) - matmul_flops(jaxpr, loops_once=True), "xla+loops"


# ------------------------------------------------------------------------------ one case
def case_latency(model_name: str, overrides: Mapping[str, Any], dtype: str,
                 case_shape: Tuple[int, int, int], case_batch: int = 0,
                 repeats: int = 5) -> Dict[str, Any]:
  """Seconds to segment one synthetic case with `inference.Predictor.segment`, after a first,
  compiling, call. The crop and slice range scale with the case as the paper's 190 and 30..120
  do with 240x240x155 (so that case gets exactly those)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
  from msatt_jax import inference  # pylint: disable=g-import-not-at-top

  config = brats18.get_config(model_name)
  config.model = model_config(model_name, overrides)
  config.dtype = dtype
  x, y, z = case_shape
  config.data.crop_size = min(x, y) * 190 // 240
  config.data.slice_start, config.data.slice_stop = z * 30 // 155, z * 120 // 155
  model = steps.create_model(config)
  dummy = np.zeros((1, *steps.input_shape(config)), np.float32)
  variables = steps.run_once(lambda k: model.init(k, dummy, train=False), jax.random.key(0))
  case = synthetic.make_case(case_shape, seed=0, index=0)
  image = np.stack([case.images[m] for m in config.data.modalities], -1).astype(np.float32)
  num_slices = config.data.slice_stop - config.data.slice_start + 1
  batch = case_batch or num_slices
  predictor = inference.Predictor([(model, variables)], config.loss, tta=False,
                                  data_config=config.data, batch_size=batch)

  def segment():
    return predictor.segment(image).labels

  t0 = time.perf_counter()
  labels = segment()
  first = time.perf_counter() - t0
  if labels.shape != image.shape[:3]:
    raise AssertionError(f"Predictor.segment returned {labels.shape} for a {image.shape} case")
  times = common.time_steps(segment, lambda _: None, repeats)
  return {"case_shape": list(case_shape), "slices": num_slices, "case_batch": batch,
          "first_call_s": first, "latency_s_median": float(np.median(times)),
          "latency_s_min": float(np.min(times)), "device": jax.devices()[0].device_kind,
          "dtype": dtype}


# ----------------------------------------------------------------------------------- worker
class JaxBench:
  """One model at one batch size: setup(mode) compiles, run(mode, n) times n steps.

  Inference must be measured before training: the train step donates the state whose
  parameters the forward pass reads.
  """

  def __init__(self, spec: Mapping[str, Any]):
    self.spec = dict(spec)
    config = brats18.get_config(spec["model"])
    config.model = model_config(spec["model"], spec.get("overrides", {}))
    config.data.crop_size = spec["size"]
    config.dtype = spec["dtype"]
    config.batch_size = spec["batch_size"]
    self.config = config
    self.model = steps.create_model(config)
    self.lr_fn = steps.create_learning_rate_fn(config, steps_per_epoch=1000)
    self.state = steps.run_once(functools.partial(
        steps.create_train_state, config=config, model=self.model,
        learning_rate_fn=self.lr_fn), jax.random.key(0))
    k_image, k_label = jax.random.split(jax.random.key(1))
    shape = (spec["batch_size"], *steps.input_shape(config))
    self.batch = {
        "image": jax.random.normal(k_image, shape, jnp.float32),
        "label": jax.random.randint(k_label, shape[:3], 0, labels_lib.NUM_CLASSES
                                    ).astype(jnp.uint8),
    }
    self.device = jax.devices()[0]
    self._steps: Dict[str, Callable[[], Any]] = {}
    self._compiled: Dict[str, Any] = {}
    self._rss = {mode: common.PeakRSS() for mode in MODES}

  def describe(self) -> Dict[str, Any]:
    params = sum(x.size for x in jax.tree.leaves(self.state.params))
    return {"framework": "jax", "version": jax.__version__, "device": self.device.device_kind,
            "platform": self.device.platform, "params": int(params),
            "threads": common.cpu_threads(), "runtime": runtime.describe()}

  def setup(self, mode: str) -> Dict[str, Any]:
    state, batch = self.state, self.batch
    if mode == "inference":
      variables = {"params": state.params, "batch_stats": state.batch_stats}
      fn = jax.jit(lambda v, x: self.model.apply(v, x, train=False))
      args = (variables, batch["image"])
    elif mode == "train":
      fn = jax.jit(steps.make_train_step(self.config, self.lr_fn), donate_argnums=(0,))
      args = (state, batch)
    else:
      raise ValueError(f"Unknown mode {mode!r}.")
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    flops, source = step_flops(fn, args, compiled, self.device.platform)
    self._compiled[mode] = compiled
    if mode == "inference":
      self._steps[mode] = lambda: compiled(*args)
    else:
      def step():
        self.state, metrics = compiled(self.state, self.batch)
        return metrics
      self._steps[mode] = step
    return {"compile_s": compile_s, "flops_per_step": flops, "flops_source": source}

  def run(self, mode: str, steps: int, window: int = 1) -> list:
    with self._rss[mode]:
      return common.time_steps(self._steps[mode], jax.block_until_ready, steps, window)

  def breakdown(self, mode: str, steps: int, trace_dir: Optional[str] = None) -> Dict[str, Any]:
    """Seconds per model part and per module path of one step, from a profiler trace."""
    step = self._steps[mode]
    hlo_text = self._compiled[mode].as_text()
    times = breakdown.trace_instruction_times(lambda: jax.block_until_ready(step()), steps,
                                              keep_dir=trace_dir)
    if trace_dir:
      with open(os.path.join(trace_dir, "step.hlo.txt"), "w") as f:
        f.write(hlo_text)
    parts = breakdown.PARTS.get(self.spec["model"], ())
    coarse, fine = breakdown.attribute(times, hlo_text, type(self.model).__name__, parts)
    return {"coarse": coarse, "fine": fine, "kinds": breakdown.by_kind(times, hlo_text),
            "traced_s": sum(times.values())}

  def memory(self, mode: str) -> Dict[str, Any]:
    stats = self.device.memory_stats() if self.device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
      # Device memory, cumulative over the process: inference is measured first.
      return {"peak_mem_mb": stats["peak_bytes_in_use"] / 2**20, "mem_kind": "device peak"}
    return {"peak_mem_mb": self._rss[mode].peak_bytes / 2**20, "mem_kind": "RSS"}


if __name__ == "__main__":
  common.serve(JaxBench)
