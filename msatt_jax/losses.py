"""Training losses and the one mapping from model outputs to canonical labels.

Two output heads exist, sized by the label set of the training data (labels.LABEL_SETS):
- 'softmax' (losses 'dice' and 'dice_ce'): its K mutually exclusive classes (4 for BraTS 2018-2023,
  5 with GLI 2024's RC or PED 2024's CC).
- 'regions' (loss 'region_dice'): one sigmoid output per scored region (ET, TC, WT, and RC ...).
"""

from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp

from data_pipelines.brats import labels as labels_lib

LOSSES = ("dice", "dice_ce", "region_dice")
_EPS = 1e-5


def num_outputs(loss: str, label_set: str = labels_lib.DEFAULT_LABEL_SET) -> int:
  """Channels the model must produce for a loss and label set."""
  check_loss(loss)
  chosen = labels_lib.label_set(label_set)
  return len(chosen.regions) if loss == "region_dice" else chosen.num_classes


def label_set_name(config: Any) -> str:
  """The label set a run's model outputs: that of its training data's convention."""
  return labels_lib.label_set_of(config.data.get("label_convention", "auto")).name


def check_loss(loss: str) -> None:
  if loss not in LOSSES:
    raise ValueError(f"Unknown config.loss {loss!r}; choose one of {', '.join(LOSSES)}.")


def soft_dice(probs: jax.Array, targets: jax.Array,
              axis_name: Optional[str] = None) -> jax.Array:
  """Mean over channels of 1 - soft Dice, pooled over the whole batch.

  Pooling over the batch (rather than per slice) keeps slices without tumour from dominating:
  an absent class contributes only through its false positives. Under pmap (`axis_name`) the
  sums are pooled over the devices too, so the loss is that of the global batch.
  """
  axes = tuple(range(probs.ndim - 1))
  intersection = jnp.sum(probs * targets, axes)
  total = jnp.sum(probs, axes) + jnp.sum(targets, axes)
  if axis_name is not None:
    intersection, total = jax.lax.psum((intersection, total), axis_name)
  return jnp.mean(1.0 - (2.0 * intersection + _EPS) / (total + _EPS))


def region_targets(labels: jax.Array, label_set: str = labels_lib.DEFAULT_LABEL_SET) -> jax.Array:
  """Canonical labels (...,) -> float (..., R) region masks (the label set's table)."""
  table = labels_lib.label_set(label_set).region_table()
  return jnp.asarray(table, jnp.float32)[labels.astype(jnp.int32)]


def segmentation_loss(logits: jax.Array, labels: jax.Array, loss: str,
                      ce_weight: float = 1.0, axis_name: Optional[str] = None,
                      label_set: str = labels_lib.DEFAULT_LABEL_SET) -> jax.Array:
  """The configured loss of float32 logits (B,H,W,C) against canonical labels (B,H,W).

  With `axis_name` (pmap) each device holds part of the batch and gets the global batch's loss.
  """
  logits = logits.astype(jnp.float32)
  if loss == "region_dice":
    return soft_dice(jax.nn.sigmoid(logits), region_targets(labels, label_set), axis_name)
  one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  # Foreground classes only: background Dice is ~1 everywhere and would swamp the tumour terms.
  value = soft_dice(jax.nn.softmax(logits)[..., 1:], one_hot[..., 1:], axis_name)
  if loss == "dice_ce":
    # As a one-hot product: optax's integer-label form gathers, and the gradient of that
    # gather is a scatter-add that XLA:CPU spends seconds constant-folding at compile time.
    ce = -jnp.mean(jnp.sum(one_hot * jax.nn.log_softmax(logits), axis=-1))
    value += ce_weight * (ce if axis_name is None else jax.lax.pmean(ce, axis_name))
  elif loss != "dice":
    check_loss(loss)
  return value


def logits_to_labels(logits: jax.Array, loss: str,
                     label_set: str = labels_lib.DEFAULT_LABEL_SET) -> jax.Array:
  """Model outputs -> canonical uint8 labels (B,H,W); works on jax and numpy arrays.

  Regions: a class is possible where every region holding it is predicted, and the possible
  class in the most regions wins (background where none is): with ET, TC, WT, WT outside TC is
  edema and TC outside ET is NCR/NET; a disjoint region (RC) gives its own class.
  """
  if loss == "region_dice":
    member = jnp.asarray(labels_lib.label_set(label_set).region_table())  # (K, R)
    present = logits[..., None, :] > 0  # (..., 1, R)
    possible = jnp.all(present | ~member, axis=-1)  # (..., K)
    depth = member.sum(axis=-1)  # Background is in no region: depth 0.
    return jnp.argmax(jnp.where(possible, depth, 0), axis=-1).astype(jnp.uint8)
  return jnp.argmax(logits, axis=-1).astype(jnp.uint8)


def region_counts(pred_labels: jax.Array, labels: jax.Array,
                  label_set: str = labels_lib.DEFAULT_LABEL_SET) -> Dict[str, jax.Array]:
  """Per-example region intersection and sizes, (B, R) each, for Dice over whole cases."""
  pred, ref = region_targets(pred_labels, label_set), region_targets(labels, label_set)
  axes = tuple(range(1, pred.ndim - 1))
  return {
      "intersection": jnp.sum(pred * ref, axes),
      "pred_sum": jnp.sum(pred, axes),
      "ref_sum": jnp.sum(ref, axes),
  }
