"""The model's train state and its pure step functions: the trainer's, the benchmarks' and
inference's one definition of them.

Nothing here reads data or writes files, so this module needs only JAX, Flax and optax (a GPU
benchmark runs it without TensorFlow).
"""

import functools
from typing import Any, Callable, Dict, Optional, Tuple

from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import optax

from msatt_jax import losses
from msatt_jax import models


class TrainState(train_state.TrainState):
  batch_stats: Any


def input_shape(config: ml_collections.ConfigDict) -> Tuple[int, int, int]:
  """(H, W, M) of one preprocessed slice."""
  return (config.data.crop_size, config.data.crop_size, len(config.data.modalities))


def create_model(config: ml_collections.ConfigDict, axis_name: Optional[str] = None):
  return models.create_model(
      config.model, num_classes=losses.num_outputs(config.loss, losses.label_set_name(config)),
      dtype=config.dtype, axis_name=axis_name)


def create_learning_rate_fn(config: ml_collections.ConfigDict,
                            steps_per_epoch: int) -> optax.Schedule:
  """The paper's step decay: x lr_decay_factor every lr_decay_epochs epochs."""
  return optax.exponential_decay(
      init_value=config.learning_rate,
      transition_steps=max(1, config.lr_decay_epochs * steps_per_epoch),
      decay_rate=config.lr_decay_factor, staircase=True)


def run_once(fn: Callable[..., Any], *args: Any) -> Any:
  """fn(*args) compiled as one program without backend optimisation, for code that runs once.

  XLA's CPU backend otherwise spends tens of seconds optimising a model's random initialisers
  (more on jax 0.12 than on 0.10: BENCHMARKS.md), and op-by-op initialisation compiles every
  layer on its own.
  """
  return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict, model: Any,
                       learning_rate_fn: optax.Schedule) -> TrainState:
  dummy = jnp.zeros((1, *input_shape(config)), jnp.float32)
  # Jitted: an eager init dispatches every initializer op by op (tens of seconds on a CPU).
  variables = jax.jit(functools.partial(model.init, train=False))(rng, dummy)
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables.get("batch_stats", {}),
                           tx=optax.adam(learning_rate_fn))


def train_step(state: TrainState, batch: Dict[str, jax.Array], *,
               learning_rate_fn: optax.Schedule, loss: str, ce_weight: float,
               deep_supervision_weight: float, axis_name: Optional[str] = None,
               label_set: str = "glioma") -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One Adam step; a non-finite loss or gradient leaves all but the step unchanged (counted)."""
  collections = ["batch_stats"] + (["intermediates"] if deep_supervision_weight else [])

  def loss_fn(params):
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                     batch["image"], train=True, mutable=collections)
    # Under pmap the batch-pooled Dice sums are pooled over the devices as well.
    value = losses.segmentation_loss(logits, batch["label"], loss, ce_weight, axis_name,
                                     label_set)
    if deep_supervision_weight:
      scale_logits = updates["intermediates"]["scale_logits"]
      value += deep_supervision_weight * sum(
          losses.segmentation_loss(s, batch["label"], loss, ce_weight, axis_name, label_set)
          for s in scale_logits)
    return value, updates["batch_stats"]

  (value, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    grads, value, batch_stats = jax.lax.pmean((grads, value, batch_stats), axis_name)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  finite = jnp.isfinite(value) & jnp.all(jnp.array(
      [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  # Keep the previous state on a bad step so it can never reach a checkpoint. (Not
  # optax.apply_if_finite: it checks the gradients alone, leaves batch_stats to us, and adds
  # counters to opt_state, which the checkpoints saved so far do not hold.)
  new_state = optax.tree_utils.tree_where(finite, new_state, state)
  # The step still advances: it is the data position a resumed run continues from, so a
  # skipped batch ('skip' policy) is skipped the same way with or without an interruption.
  new_state = new_state.replace(step=state.step + 1)
  metrics = {"loss": value, "learning_rate": learning_rate_fn(state.step),
             "nonfinite": 1 - finite.astype(jnp.int32)}
  return new_state, metrics


def make_train_step(config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule):
  """`train_step` with the config's loss settings bound: the one step every caller runs (the
  trainer, the benchmarks, the scaling script, the FLOP count of the summary command). The
  parallel strategy binds `axis_name` where it needs one."""
  return functools.partial(train_step, learning_rate_fn=learning_rate_fn, loss=config.loss,
                           ce_weight=config.ce_weight,
                           deep_supervision_weight=config.deep_supervision_weight,
                           label_set=losses.label_set_name(config))


def make_eval_step(config: ml_collections.ConfigDict):
  """`eval_step` with the config's loss bound."""
  return functools.partial(eval_step, loss=config.loss, label_set=losses.label_set_name(config))


def eval_step(state: TrainState, batch: Dict[str, jax.Array], *, loss: str,
              label_set: str = "glioma") -> Dict[str, Any]:
  """Per-example region counts (the label set's regions) and predicted labels of a batch."""
  logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                          batch["image"], train=False)
  pred = losses.logits_to_labels(logits, loss, label_set)
  return {"pred": pred, **losses.region_counts(pred, batch["label"], label_set)}
