"""Training losses and the one mapping from model outputs to canonical labels.

Two output heads exist:
- 'softmax' (losses 'dice' and 'dice_ce'): K = 4 mutually exclusive canonical classes.
- 'regions' (loss 'region_dice'): 3 sigmoid outputs for the nested ET, TC, WT regions.
"""

from typing import Dict, Optional

import jax
import jax.numpy as jnp

from data_pipelines.brats import labels as labels_lib

LOSSES = ("dice", "dice_ce", "region_dice")
_EPS = 1e-5


def num_outputs(loss: str) -> int:
  """Channels the model must produce for a loss."""
  check_loss(loss)
  return len(labels_lib.REGIONS) if loss == "region_dice" else labels_lib.NUM_CLASSES


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


def region_targets(labels: jax.Array) -> jax.Array:
  """Canonical labels (...,) -> float (..., 3) ET/TC/WT masks (the one table in labels.py)."""
  return jnp.asarray(labels_lib.REGION_TABLE, jnp.float32)[labels.astype(jnp.int32)]


def segmentation_loss(logits: jax.Array, labels: jax.Array, loss: str,
                      ce_weight: float = 1.0, axis_name: Optional[str] = None) -> jax.Array:
  """The configured loss of float32 logits (B,H,W,C) against canonical labels (B,H,W).

  With `axis_name` (pmap) each device holds part of the batch and gets the global batch's loss.
  """
  logits = logits.astype(jnp.float32)
  if loss == "region_dice":
    return soft_dice(jax.nn.sigmoid(logits), region_targets(labels), axis_name)
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


def logits_to_labels(logits: jax.Array, loss: str) -> jax.Array:
  """Model outputs -> canonical uint8 labels (B,H,W); works on jax and numpy arrays."""
  if loss == "region_dice":
    # Nested regions: WT outside TC is edema, TC outside ET is NCR/NET.
    et, tc, wt = (logits[..., i] > 0 for i in range(3))
    out = jnp.where(wt, labels_lib.EDEMA, labels_lib.BACKGROUND)
    out = jnp.where(wt & tc, labels_lib.NCR_NET, out)
    out = jnp.where(wt & tc & et, labels_lib.ENHANCING, out)
    return out.astype(jnp.uint8)
  return jnp.argmax(logits, axis=-1).astype(jnp.uint8)


def region_counts(pred_labels: jax.Array, labels: jax.Array) -> Dict[str, jax.Array]:
  """Per-example ET/TC/WT intersection and sizes, (B, 3) each, for Dice over whole cases."""
  pred, ref = region_targets(pred_labels), region_targets(labels)
  axes = tuple(range(1, pred.ndim - 1))
  return {
      "intersection": jnp.sum(pred * ref, axes),
      "pred_sum": jnp.sum(pred, axes),
      "ref_sum": jnp.sum(ref, axes),
  }
