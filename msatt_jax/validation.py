"""The trainer's validation: Dice per case over the prepared slices, and pictures for TensorBoard.

Whole-volume evaluation with HD95 and the BraTS rules is `msatt_jax.evaluate`; this is the cheap
periodic check that picks the best checkpoint, computed from the eval step's per-slice counts.
"""

from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import jax
import numpy as np

from data_pipelines.brats import labels as labels_lib
from msatt_jax import metrics as metrics_lib
from msatt_jax import visualize


def evaluate_slices(eval_step: Callable, state,
                    batches: Iterable[Dict[str, np.ndarray]],
                    regions: Optional[Sequence[str]] = None
                    ) -> Tuple[Dict[str, float], Optional[Dict[str, np.ndarray]]]:
  """Dice per case (3D over the prepared slices) averaged over cases; also a sample batch.

  regions: the names of the eval step's region counts; default those of the label set with
  that many regions (ET, TC, WT; + RC for glioma_rc; + NET, CC, ED for ped).
  """
  counts: Dict[str, np.ndarray] = {}
  sample = None
  for batch in batches:
    mask = np.asarray(batch["mask"], bool)
    out = jax.device_get(eval_step(state, {"image": batch["image"], "label": batch["label"]}))
    if sample is None:
      sample = {"image": batch["image"], "label": batch["label"], "pred": out["pred"]}
    stacked = np.stack([out["intersection"], out["pred_sum"], out["ref_sum"]], axis=1)
    for case_id, row in zip(np.asarray(batch["case_id"])[mask], stacked[mask]):
      key = case_id.decode() if isinstance(case_id, bytes) else str(case_id)
      counts[key] = counts.get(key, 0) + row
  if not counts:
    raise ValueError("The validation split is empty.")
  if regions is None:
    regions = labels_lib.label_set_with_regions(next(iter(counts.values())).shape[1]).region_names
  per_region = {region: [] for region in regions}
  for row in counts.values():
    for r, region in enumerate(regions):
      per_region[region].append(metrics_lib.dice_from_counts(*row[:, r]))
  summary = {f"val_dice_{region}": float(np.mean(v)) for region, v in per_region.items()}
  summary["val_dice_mean"] = float(np.mean([summary[f"val_dice_{r}"] for r in regions]))
  return summary, sample


def sample_overlays(sample: Dict[str, np.ndarray], limit: int = 4) -> Dict[str, np.ndarray]:
  """TensorBoard pictures: truth and prediction over the first modality of a few slices."""
  n = min(limit, len(sample["image"]))
  truth = [visualize.overlay(sample["image"][i, ..., 0], sample["label"][i]) for i in range(n)]
  pred = [visualize.overlay(sample["image"][i, ..., 0], sample["pred"][i]) for i in range(n)]
  return {"validation/truth": np.stack(truth), "validation/prediction": np.stack(pred)}
