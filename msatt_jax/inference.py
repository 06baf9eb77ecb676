"""A trained run applied to whole volumes: restore, slice, segment, paste back.

The one path shared by `evaluate` and `predict`; it reuses the data pipeline's preprocessing so a
volume is prepared exactly as the training slices were.
"""

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines.brats import preprocess
from msatt_jax import checkpointing
from msatt_jax import losses
from msatt_jax import steps

PredictFn = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass
class TrainedRun:
  config: ml_collections.ConfigDict
  variables: Dict[str, Any]
  step: int
  meta: Dict[str, Any]
  model: Any


def restore_run(workdir: str, checkpoint: Union[str, int] = "best") -> TrainedRun:
  """Restores a run's config and the variables of its 'best' / 'latest' / numbered checkpoint."""
  checkpointer = checkpointing.Checkpointer(workdir, read_only=True)
  step = checkpointer.resolve(checkpoint)
  meta = checkpointer.restore_meta(step)
  config = ml_collections.ConfigDict(meta["config"])
  model = steps.create_model(config)
  lr_fn = steps.create_learning_rate_fn(config, meta["steps_per_epoch"])
  # Onto this process's first device, whatever devices wrote the checkpoint (a multi-device
  # run's checkpoint records its layout, which Orbax would otherwise try to rebuild).
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      jax.eval_shape(lambda: steps.create_train_state(jax.random.key(0), config, model, lr_fn)))
  state, meta = checkpointer.restore(step, abstract)
  checkpointer.close()
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return TrainedRun(config=config, variables=variables, step=step, meta=meta, model=model)


def make_predict_fn(model: Any, variables: Dict[str, Any], loss: str) -> PredictFn:
  """(B,H,W,M) float32 slices -> (B,H,W) canonical uint8 labels, jit-compiled."""

  @jax.jit
  def predict(images):
    logits = model.apply(variables, images, train=False)
    return losses.logits_to_labels(logits, loss)

  return lambda images: np.asarray(predict(jnp.asarray(images, jnp.float32)))


def predict_slices(predict: PredictFn, slices: np.ndarray, batch_size: int) -> np.ndarray:
  """Runs (S,H,W,M) slices through the model in fixed-size batches (one compilation)."""
  out = np.zeros(slices.shape[:3], np.uint8)
  for start in range(0, len(slices), batch_size):
    chunk = slices[start:start + batch_size]
    padded = np.zeros((batch_size, *slices.shape[1:]), np.float32)
    padded[:len(chunk)] = chunk
    out[start:start + len(chunk)] = predict(padded)[:len(chunk)]
  return out


def segment_volume(predict: PredictFn, image: np.ndarray, data_config: ml_collections.ConfigDict,
                   slice_range: Optional[Tuple[int, int]] = None,
                   batch_size: int = 16) -> np.ndarray:
  """(X,Y,Z,M) raw intensities -> (X,Y,Z) canonical labels; zero outside the segmented slices.

  slice_range: inclusive axial range to segment; default the config's (the training range).
  """
  start, stop = slice_range or (data_config.slice_start, data_config.slice_stop)
  crop_center = data_config.crop_center
  slices = preprocess.preprocess_case(
      image, None, slice_start=start, slice_stop=stop, crop_size=data_config.crop_size,
      crop_center=tuple(crop_center) if crop_center is not None else None,
      normalize=data_config.normalize)
  labels = predict_slices(predict, slices.image, batch_size)
  return preprocess.paste_back(labels, slices.slice_indices, slices.offsets, image.shape[:3])


def predictor_for_run(run: TrainedRun) -> PredictFn:
  return make_predict_fn(run.model, run.variables, run.config.loss)
