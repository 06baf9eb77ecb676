"""Model summary: parameter count and table, and XLA-counted FLOPs per input slice.

  python -m msatt_jax.summary --config=configs/brats18.py           # MSConvLSTM-Att
  python -m msatt_jax.summary --config=configs/brats18.py:unet      # also :attunet, :fcn
  python -m msatt_jax.summary --config=configs/brats18.py:unet --config.model.base_width=16

FLOPs are XLA's cost analysis of the compiled computation for one slice of
crop_size x crop_size x len(modalities) (batch 1): the forward pass in inference mode, and the
trainer's own step (`steps.make_train_step`: forward in training mode, the config's loss,
backward, Adam, the finiteness checks), lowered from abstract values, so nothing is initialised
or run. XLA counts a multiply-add as two FLOPs and leaves out the zero-padded taps of 'SAME'
convolutions.
"""

if __name__ == "__main__":
  # Before JAX loads: the runtime defaults (msatt_jax/runtime.py) may re-execute the process.
  from msatt_jax import runtime
  runtime.configure()

import collections
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from msatt_jax import cli
from msatt_jax import losses
from msatt_jax import steps


def xla_flops(compiled) -> Optional[float]:
  """'flops' from a cost analysis (a dict, or a one-element list of dicts in older JAX)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def parameter_table(params: Mapping[str, Any]) -> List[Dict[str, Any]]:
  """One row per parameter array (path, shape, element count), in the dicts' own order.

  Flax builds its variable dicts in module-creation order, i.e. roughly the order of the
  forward pass, which flatten_dict keeps (jax.tree_util would sort the keys instead).
  """
  return [{"path": path, "shape": tuple(leaf.shape),
           "count": int(np.prod(leaf.shape, dtype=np.int64))}
          for path, leaf in traverse_util.flatten_dict(params, sep="/").items()]


def _print_table(rows: List[Dict[str, Any]], print_fn: Callable[[str], None]) -> None:
  """Rows grouped by top-level module, each group headed by its subtotal."""
  groups: Dict[str, List[Dict[str, Any]]] = collections.OrderedDict()
  for row in rows:
    groups.setdefault(row["path"].split("/")[0], []).append(row)
  width = max([len(r["path"]) for r in rows] + [9]) + 2
  print_fn(f"{'parameter':<{width}}{'shape':<24}{'count':>12}")
  for group, members in groups.items():
    total = sum(r["count"] for r in members)
    print_fn(f"{group:<{width}}{'':<24}{total:>12,}")
    for r in members:
      if len(members) == 1 and r["path"] == group:
        continue
      print_fn(f"  {r['path'][len(group) + 1:]:<{width - 2}}{str(r['shape']):<24}"
               f"{r['count']:>12,}")


def _format_flops(flops: Optional[float]) -> str:
  if flops is None:
    return "n/a (no cost analysis on this backend)"
  return f"{flops / 1e9:.2f} GFLOP"


def summarize(config: ml_collections.ConfigDict,
              print_fn: Optional[Callable[[str], None]] = print, *,
              train_step: bool = True) -> Dict[str, Any]:
  """Builds config.model, prints its summary and returns the figures.

  Returns a dict with: model, num_params, num_batch_stats, param_table (list of rows),
  input_shape (one slice), forward_flops and train_step_flops (per slice; None without
  `train_step`, which skips compiling the step), loss.
  """
  print_fn = print_fn or (lambda _: None)
  model = steps.create_model(config)
  input_shape = (1, *steps.input_shape(config))
  image = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  batch = {"image": image, "label": jax.ShapeDtypeStruct(input_shape[:3], jnp.uint8)}

  # The table is read from the model's own init, inside the trace: the train state's
  # variables come out of a jit, whose pytree output has its dicts' keys sorted.
  tables = {}

  def init() -> None:
    variables = model.init(jax.random.key(0), jnp.zeros(input_shape, jnp.float32), train=False)
    tables["params"] = parameter_table(variables["params"])
    tables["batch_stats"] = parameter_table(variables.get("batch_stats", {}))

  jax.eval_shape(init)
  # The schedule's values do not change the step's FLOPs.
  learning_rate_fn = steps.create_learning_rate_fn(config, steps_per_epoch=1)
  state = jax.eval_shape(lambda rng: steps.create_train_state(rng, config, model,
                                                              learning_rate_fn),
                         jax.random.key(0))
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  forward = jax.jit(lambda variables, x: model.apply(variables, x, train=False))
  forward_flops = xla_flops(forward.lower(variables, image).compile())
  train_flops = None
  if train_step:
    step = jax.jit(steps.make_train_step(config, learning_rate_fn), donate_argnums=(0,))
    train_flops = xla_flops(step.lower(state, batch).compile())

  rows = tables["params"]
  num_params = sum(r["count"] for r in rows)
  num_stats = sum(r["count"] for r in tables["batch_stats"])
  print_fn(f"Model {config.model.name} ({type(model).__name__}), compute dtype "
           f"{jnp.dtype(model.dtype).name}, {losses.num_outputs(config.loss)} outputs")
  print_fn(f"Parameters: {num_params:,} ({num_params * 4 / 2**20:.1f} MiB in float32); "
           f"BatchNorm statistics: {num_stats:,}")
  print_fn("")
  _print_table(rows, print_fn)
  print_fn("")
  print_fn(f"Per slice of {input_shape[1]}x{input_shape[2]}x{input_shape[3]} "
           f"(XLA cost analysis on {jax.default_backend()}):")
  print_fn(f"  forward (inference): {_format_flops(forward_flops)}")
  if train_step:
    print_fn(f"  train step (forward + {config.loss} loss + backward + Adam): "
             f"{_format_flops(train_flops)}")
  return {
      "model": config.model.name,
      "num_params": num_params,
      "num_batch_stats": num_stats,
      "param_table": rows,
      "input_shape": input_shape,
      "forward_flops": forward_flops,
      "train_step_flops": train_flops,
      "loss": config.loss,
  }


def define_flags() -> None:
  """The command's flags; defined only by run(), so importing this module registers none."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Training config file, e.g. "
                                  "configs/brats18.py:unet.", lock_config=True)
  flags.mark_flags_as_required(["config"])


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  summarize(flags.FLAGS.config)


def run() -> None:
  cli.run_command(main, define_flags)


if __name__ == "__main__":
  run()
