"""Model summary: parameter count and table, and XLA-counted FLOPs per input slice.

Usage:
  python -m msatt_jax.models.summary --config=configs/brats18.py           # MSConvLSTM-Att
  python -m msatt_jax.models.summary --config=configs/brats18.py:unet      # also :attunet, :fcn
  python -m msatt_jax.models.summary --config=configs/brats18.py:unet --config.model.base_width=16

FLOPs are XLA's cost analysis of the compiled computation for one slice of
crop_size x crop_size x len(modalities) (batch 1): the forward pass in inference mode, and one
training step (forward in training mode, loss, backward, Adam update). XLA counts a
multiply-add as two FLOPs and leaves out the zero-padded taps of 'SAME' convolutions.
"""

import collections
from typing import Any, Callable, Dict, List, Mapping, Optional

from absl import app
from ml_collections import config_flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from msatt_jax import cli
from msatt_jax import losses as losses_lib
from msatt_jax.models import create_model


def xla_flops(compiled) -> Optional[float]:
  """'flops' from a cost analysis (a dict, or a one-element list of dicts in older JAX)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def _num_classes(config: ml_collections.ConfigDict) -> int:
  return losses_lib.num_outputs(config.loss)


def _loss_fn(config: ml_collections.ConfigDict) -> Callable[[jax.Array, jax.Array], jax.Array]:
  loss, ce_weight = config.loss, config.get("ce_weight", 1.0)
  return lambda logits, labels: losses_lib.segmentation_loss(logits, labels, loss, ce_weight)


def parameter_table(params: Mapping[str, Any]) -> List[Dict[str, Any]]:
  """One row per parameter array (path, shape, element count), in the dicts' own order.

  Flax builds its variable dicts in module-creation order, i.e. roughly the order of the
  forward pass; jax.tree_util would sort the keys instead.
  """
  rows = []

  def walk(tree: Any, prefix: str) -> None:
    if isinstance(tree, Mapping):
      for key, value in tree.items():
        walk(value, f"{prefix}/{key}" if prefix else str(key))
    else:
      rows.append({"path": prefix, "shape": tuple(tree.shape),
                   "count": int(np.prod(tree.shape, dtype=np.int64))})

  walk(params, "")
  return rows


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


def summarize(config: ml_collections.ConfigDict,
              print_fn: Optional[Callable[[str], None]] = print) -> Dict[str, Any]:
  """Builds config.model, prints its summary and returns the figures.

  Returns a dict with: model, num_params, num_batch_stats, param_table (list of rows),
  input_shape (one slice), forward_flops and train_step_flops (per slice), loss.
  """
  print_fn = print_fn or (lambda _: None)
  num_classes = _num_classes(config)
  model = create_model(config.model, num_classes=num_classes, dtype=config.get("dtype", "float32"))
  size = config.data.crop_size
  size = (size, size) if isinstance(size, int) else tuple(size)
  input_shape = (1, *size, len(config.data.modalities))
  x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  labels = jax.ShapeDtypeStruct(input_shape[:3], jnp.int32)

  # Shapes only: nothing is initialised or run, XLA compiles from abstract values.
  tables = {}

  def init() -> Any:
    variables = model.init(jax.random.key(0), jnp.zeros(input_shape, jnp.float32), train=False)
    # Read here, before eval_shape's output pytree re-sorts the dicts' keys.
    tables["params"] = parameter_table(variables["params"])
    tables["batch_stats"] = parameter_table(variables.get("batch_stats", {}))
    return variables

  variables = jax.eval_shape(init)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  tx = optax.adam(1e-3)
  opt_state = jax.eval_shape(tx.init, params)
  loss_fn = _loss_fn(config)

  def forward(variables, x):
    return model.apply(variables, x, train=False)

  def train_step(params, batch_stats, opt_state, x, labels):
    def loss(params):
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                    train=True, mutable=["batch_stats"])
      return loss_fn(logits, labels), updates["batch_stats"]
    (value, new_stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, value

  forward_flops = xla_flops(jax.jit(forward).lower(variables, x).compile())
  train_flops = xla_flops(jax.jit(train_step, donate_argnums=(0, 1, 2)).lower(
      params, batch_stats, opt_state, x, labels).compile())

  rows = tables["params"]
  num_params = sum(r["count"] for r in rows)
  num_stats = sum(r["count"] for r in tables["batch_stats"])
  loss_name = config.loss

  print_fn(f"Model {config.model.name} ({type(model).__name__}), compute dtype "
           f"{jnp.dtype(model.dtype).name}, {num_classes} outputs")
  print_fn(f"Parameters: {num_params:,} ({num_params * 4 / 2**20:.1f} MiB in float32); "
           f"BatchNorm statistics: {num_stats:,}")
  print_fn("")
  _print_table(rows, print_fn)
  print_fn("")
  def fmt(flops: Optional[float]) -> str:
    if flops is None:
      return "n/a (no cost analysis on this backend)"
    return f"{flops / 1e9:.2f} GFLOP"

  print_fn(f"Per slice of {input_shape[1]}x{input_shape[2]}x{input_shape[3]} "
           f"(XLA cost analysis on {jax.default_backend()}):")
  print_fn(f"  forward (inference): {fmt(forward_flops)}")
  print_fn(f"  train step (forward + {loss_name} loss + backward + Adam): {fmt(train_flops)}")
  return {
      "model": config.model.name,
      "num_params": num_params,
      "num_batch_stats": num_stats,
      "param_table": rows,
      "input_shape": input_shape,
      "forward_flops": forward_flops,
      "train_step_flops": train_flops,
      "loss": loss_name,
  }


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/brats18.py:unet")
  cli.setup_logging()
  cli.run_or_exit(lambda: summarize(config))


if __name__ == "__main__":
  # Defined only when run as a program, so importing this module (tests, other CLIs that have
  # their own --config) never registers a duplicate flag.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                            lock_config=True)
  app.run(main)
