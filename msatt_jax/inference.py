"""Trained runs applied to whole volumes: restore, slice, segment, paste back.

The one path shared by `evaluate` and `predict`; it reuses the data pipeline's preprocessing so a
volume is prepared exactly as the training slices were. A `Predictor` is one jit-compiled
function of a batch of slices: the probabilities of every member of an ensemble (several runs
of the same input and output) under mirroring test-time augmentation (the identity and the
flips of each in-plane axis and of both, each flipped back), averaged, then turned into labels.
Softmax runs average the K class probabilities (argmax); 'region_dice' runs average the three
sigmoid region probabilities (ET/TC/WT > 0.5, i.e. a logit > 0 for one model without TTA).

Between the labels and the output sits one hook, `rules`: a function of the whole canonical
label volume (rules chosen on validation data, such as small-ET relabelling or removal of small
connected components, need the whole case), applied by `segment_slices`.

`run_data_config` and `labelled_cases` give a run's data and the labelled cases of a split, as
evaluate and postprocess read them.
"""

import dataclasses
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines.brats import labels as labels_lib
from data_pipelines.brats import layouts
from data_pipelines.brats import preprocess
from msatt_jax import checkpointing
from msatt_jax import losses
from msatt_jax import steps

# The in-plane flips of mirroring TTA, as axes of a (B, H, W, C) batch: identity, H, W, both.
TTA_FLIPS = ((), (1,), (2,), (1, 2))
# The preprocessing keys (config.data) that define a model's input: an ensemble's members share
# them, so that one prepared batch of slices means the same to each.
INPUT_KEYS = ("modalities", "crop_size", "crop_center", "slice_start", "slice_stop", "normalize",
              "crop_around", "slice_range")
# Canonical label volume -> canonical label volume (postprocessing rules).
LabelRules = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass
class TrainedRun:
  config: ml_collections.ConfigDict
  variables: Dict[str, Any]
  step: int
  meta: Dict[str, Any]
  model: Any
  workdir: Optional[str] = None  # Where it was restored from (named in errors).

  @property
  def label_set(self) -> str:
    """The classes and regions it outputs: those of its training data (labels.LABEL_SETS)."""
    return losses.label_set_name(self.config)


def restore_run(workdir: str, checkpoint: Union[str, int] = "best") -> TrainedRun:
  """Restores a run's config and the variables of its 'best' / 'latest' / numbered checkpoint."""
  checkpointer = checkpointing.Checkpointer(workdir, read_only=True)
  step = checkpointer.resolve(checkpoint)
  try:
    meta = checkpointer.restore_meta(step)
  except Exception as e:  # pylint: disable=broad-except
    raise _damaged(checkpointer, step, e) from e
  config = ml_collections.ConfigDict(meta["config"])
  model = steps.create_model(config)
  lr_fn = steps.create_learning_rate_fn(config, meta["steps_per_epoch"])
  # Onto this process's first device, whatever devices wrote the checkpoint (a multi-device
  # run's checkpoint records its layout, which Orbax would otherwise try to rebuild).
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      jax.eval_shape(lambda: steps.create_train_state(jax.random.key(0), config, model, lr_fn)))
  try:
    state, meta = checkpointer.restore(step, abstract)
  except checkpointing.CheckpointRestoreError as e:
    raise _damaged(checkpointer, step, e) from e
  checkpointer.close()
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return TrainedRun(config=config, variables=variables, step=step, meta=meta, model=model,
                    workdir=workdir)


def _damaged(checkpointer: checkpointing.Checkpointer, step: int,
             error: Exception) -> checkpointing.CheckpointRestoreError:
  """The error for a checkpoint that does not read back: which step, and how to pick another."""
  if isinstance(error, checkpointing.CheckpointRestoreError) and error.__cause__ is not None:
    error = error.__cause__  # The reader's own reason, not our wrapper's sentence.
  others = [s for s in checkpointer.all_steps() if s != step]
  hint = (f"pick another with --checkpoint=STEP (available: {others})" if others
          else "no other checkpoint exists")
  return checkpointing.CheckpointRestoreError(
      f"{checkpointer.directory}: the checkpoint of step {step} is damaged and cannot be "
      f"restored ({checkpointing.describe_error(error)}); {hint}.")


def restore_runs(workdirs: Sequence[str], checkpoint: Union[str, int] = "best") -> List[TrainedRun]:
  """Restores the runs of an ensemble (the same checkpoint name in each) and checks they fit."""
  if not workdirs:
    raise ValueError("--workdir: name at least one run directory.")
  runs = [restore_run(w, checkpoint) for w in workdirs]
  check_ensemble(runs)
  return runs


def is_region_output(loss: str) -> bool:
  """True for sigmoid region outputs (ET, TC, WT: the 'region_dice' loss), False for softmax
  classes; the same split as losses.logits_to_labels."""
  losses.check_loss(loss)
  return loss == "region_dice"


def channel_names(loss: str, label_set: str = labels_lib.DEFAULT_LABEL_SET) -> Tuple[str, ...]:
  """Names of the probability channels a run of this loss and label set produces."""
  chosen = labels_lib.label_set(label_set)
  return chosen.region_names if is_region_output(loss) else chosen.classes


def _plain(value: Any) -> Any:
  """Config values as restored (lists) and as written (tuples) compare equal."""
  return tuple(value) if isinstance(value, (list, tuple)) else value


def _input_signature(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  defaults = preprocess.defaults()  # For keys older runs' configs lack.
  signature = {f"data.{k}": _plain(config.data.get(k, defaults[k])) for k in INPUT_KEYS}
  signature["output"] = "sigmoid regions" if is_region_output(config.loss) else "softmax classes"
  signature["label set"] = losses.label_set_name(config)
  return signature


def check_ensemble(runs: Sequence[TrainedRun]) -> None:
  """Refuses runs whose inputs (modalities, crop, slices, normalization) or outputs differ."""
  first = _input_signature(runs[0].config)
  for run in runs[1:]:
    for key, value in _input_signature(run.config).items():
      if value != first[key]:
        raise ValueError(
            f"{run.workdir}: trained with {key}={value!r} but {runs[0].workdir} with "
            f"{first[key]!r}; an ensemble averages models of the same input and output.")


def _probabilities(logits: jax.Array, region_output: bool) -> jax.Array:
  logits = logits.astype(jnp.float32)
  return jax.nn.sigmoid(logits) if region_output else jax.nn.softmax(logits, axis=-1)


def probabilities_to_labels(probs: jax.Array, loss: str,
                            label_set: str = labels_lib.DEFAULT_LABEL_SET) -> jax.Array:
  """Averaged probabilities (..., C) -> canonical uint8 labels (...), as losses.logits_to_labels
  maps logits (a region is present where its probability exceeds 1/2)."""
  return losses.logits_to_labels(probs - 0.5 if is_region_output(loss) else probs, loss,
                                 label_set)


class Predictor:
  """One jit-compiled prediction of (B,H,W,M) slices by an ensemble, with or without TTA.

  Calling it returns (B,H,W) canonical uint8 labels; `with_probabilities` also returns the
  averaged (B,H,W,C) float32 probabilities. Both come from the same compiled function, which is
  compiled once per batch shape (callers keep the batch size fixed).
  """

  def __init__(self, members: Sequence[Tuple[Any, Dict[str, Any]]], loss: str, tta: bool,
               data_config: Optional[ml_collections.ConfigDict] = None,
               label_set: str = labels_lib.DEFAULT_LABEL_SET):
    losses.check_loss(loss)
    self.loss = loss
    self.label_set = labels_lib.label_set(label_set).name
    self.tta = bool(tta)
    self.data_config = data_config  # The members' preprocessing (the first run's config.data).
    models = [model for model, _ in members]
    self._variables = tuple(variables for _, variables in members)
    flips = TTA_FLIPS if self.tta else ((),)
    region_output = is_region_output(loss)

    @jax.jit
    def predict(variables, images):
      # The views are batched together: one forward pass per member over V x B images.
      views = jnp.concatenate([jnp.flip(images, f) if f else images for f in flips])
      total = None
      for model, member_variables in zip(models, variables):
        probs = _probabilities(model.apply(member_variables, views, train=False), region_output)
        probs = probs.reshape(len(flips), *images.shape[:3], probs.shape[-1])
        for v, f in enumerate(flips):
          view = jnp.flip(probs[v], f) if f else probs[v]
          total = view if total is None else total + view
      mean = total / (len(flips) * len(models))
      return probabilities_to_labels(mean, loss, self.label_set), mean

    self._predict = predict

  @property
  def channels(self) -> Tuple[str, ...]:
    return channel_names(self.loss, self.label_set)

  def with_probabilities(self, images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    labels, probs = self._predict(self._variables, jnp.asarray(images, jnp.float32))
    return np.asarray(labels), np.asarray(probs)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    labels, _ = self._predict(self._variables, jnp.asarray(images, jnp.float32))
    return np.asarray(labels)  # The probabilities stay on the device.


PredictFn = Union[Predictor, Callable[[np.ndarray], np.ndarray]]


def make_predictor(runs: Union[TrainedRun, Sequence[TrainedRun]], tta: bool = True) -> Predictor:
  """The predictor of one run or of an ensemble (checked to share input and output)."""
  runs = [runs] if isinstance(runs, TrainedRun) else list(runs)
  check_ensemble(runs)
  return Predictor([(r.model, r.variables) for r in runs], runs[0].config.loss, tta,
                   runs[0].config.data, runs[0].label_set)


def make_predict_fn(model: Any, variables: Dict[str, Any], loss: str,
                    tta: bool = False, label_set: str = labels_lib.DEFAULT_LABEL_SET) -> Predictor:
  """(B,H,W,M) float32 slices -> (B,H,W) canonical uint8 labels of one model, jit-compiled."""
  return Predictor([(model, variables)], loss, tta, label_set=label_set)


@dataclasses.dataclass
class Segmentation:
  """One case segmented, in the volume's geometry."""
  labels: np.ndarray  # (X, Y, Z) uint8 canonical labels, after the rules.
  unprocessed: np.ndarray  # The same before the rules (the same array when there are none).
  probabilities: Optional[np.ndarray] = None  # (C, X, Y, Z) float16, when asked for.


def predict_slices(predict: PredictFn, slices: np.ndarray, batch_size: int,
                   with_probabilities: bool = False):
  """Runs (S,H,W,M) slices through the model in fixed-size batches (one compilation).

  Returns (S,H,W) uint8 labels, or (labels, (S,H,W,C) float16 probabilities).
  """
  labels = np.zeros(slices.shape[:3], np.uint8)
  probs = None
  for start in range(0, len(slices), batch_size):
    chunk = slices[start:start + batch_size]
    padded = np.zeros((batch_size, *slices.shape[1:]), np.float32)
    padded[:len(chunk)] = chunk
    if with_probabilities:
      batch_labels, batch_probs = predict.with_probabilities(padded)
      if probs is None:
        probs = np.zeros((*slices.shape[:3], batch_probs.shape[-1]), np.float16)
      probs[start:start + len(chunk)] = batch_probs[:len(chunk)]
    else:
      batch_labels = predict(padded)
    labels[start:start + len(chunk)] = batch_labels[:len(chunk)]
  return (labels, probs) if with_probabilities else labels


def prepare_slices(image: np.ndarray, data_config: ml_collections.ConfigDict,
                   slice_range: Optional[Tuple[int, int]] = None) -> preprocess.Slices:
  """(X,Y,Z,M) raw intensities -> the model's slices, preprocessed as the training slices were.

  slice_range: inclusive axial range to segment; default the config's (the training range).
  """
  start, stop = slice_range or (data_config.slice_start, data_config.slice_stop)
  crop_center = data_config.crop_center
  # Keys a run trained before they existed lacks take their defaults (its preprocessing).
  defaults = preprocess.defaults()
  get = lambda key: data_config.get(key, defaults[key])
  return preprocess.preprocess_case(
      image, None, slice_start=start, slice_stop=stop, crop_size=data_config.crop_size,
      crop_center=tuple(crop_center) if crop_center is not None else None,
      normalize=data_config.normalize, crop_around=get("crop_around"),
      slice_range="fixed" if slice_range else get("slice_range"))


def paste_back_probabilities(probs: np.ndarray, slices: preprocess.Slices,
                             volume_shape: Sequence[int], channels: Sequence[str]) -> np.ndarray:
  """(S,H,W,C) slice probabilities -> (C,X,Y,Z) float16 in the volume; outside the segmented
  slices and crop, background has probability 1 (softmax classes) and every region 0."""
  outside = np.asarray([name == labels_lib.CLASS_NAMES[0] for name in channels], np.float16)
  out = np.empty((len(channels), *(int(s) for s in volume_shape)), np.float16)
  out[:] = outside[:, None, None, None]
  (x0, y0), (_, height, width, _) = slices.offsets, probs.shape
  # The part of a (padded) window inside the volume.
  (vx, wx) = preprocess.window_overlap(x0, height, out.shape[1])
  (vy, wy) = preprocess.window_overlap(y0, width, out.shape[2])
  out[:, vx, vy, slices.slice_indices] = probs.transpose(3, 1, 2, 0)[:, wx, wy]
  return out


def segment_slices(predict: PredictFn, slices: preprocess.Slices, volume_shape: Sequence[int],
                   batch_size: int = 16, with_probabilities: bool = False,
                   rules: Optional[LabelRules] = None) -> Segmentation:
  """Prepared slices -> a Segmentation of the volume (labels pasted back, then the rules)."""
  probs = None
  if with_probabilities:
    labels, slice_probs = predict_slices(predict, slices.image, batch_size, True)
    probs = paste_back_probabilities(slice_probs, slices, volume_shape, predict.channels)
  else:
    labels = predict_slices(predict, slices.image, batch_size)
  unprocessed = preprocess.paste_back(labels, slices.slice_indices, slices.offsets,
                                      volume_shape)
  processed = rules(unprocessed) if rules is not None else unprocessed
  return Segmentation(labels=processed, unprocessed=unprocessed, probabilities=probs)


def segment(predict: PredictFn, image: np.ndarray, data_config: ml_collections.ConfigDict,
            slice_range: Optional[Tuple[int, int]] = None, batch_size: int = 16,
            with_probabilities: bool = False,
            rules: Optional[LabelRules] = None) -> Segmentation:
  """(X,Y,Z,M) raw intensities -> Segmentation; zero labels outside the segmented slices."""
  slices = prepare_slices(image, data_config, slice_range)
  return segment_slices(predict, slices, image.shape[:3], batch_size, with_probabilities, rules)


def segment_volume(predict: PredictFn, image: np.ndarray, data_config: ml_collections.ConfigDict,
                   slice_range: Optional[Tuple[int, int]] = None,
                   batch_size: int = 16) -> np.ndarray:
  """(X,Y,Z,M) raw intensities -> (X,Y,Z) canonical labels; zero outside the segmented slices.

  slice_range: inclusive axial range to segment; default the config's (the training range).
  """
  return segment(predict, image, data_config, slice_range, batch_size).labels


def run_data_config(run: TrainedRun,
                    source_dir: Optional[str] = None) -> ml_collections.ConfigDict:
  """The run's data config pointing at its raw and prepared data as recorded at training
  (source_dir: the raw folder, if it moved since)."""
  data_config = run.config.data
  data_config.source_dir = source_dir or run.meta["data"]["source_dir"]
  data_config.data_dir = run.meta["data"]["data_dir"]
  return data_config


def labelled_cases(data_config: ml_collections.ConfigDict, case_ids: Sequence[str],
                   split: str) -> Iterator[layouts.Case]:
  """The labelled cases of a split, read one at a time; missing cases fail before the first."""
  refs = {ref.case_id: ref for ref in layouts.find_cases(data_config.source_dir,
                                                         data_config.layout)}
  missing = [c for c in case_ids if c not in refs]
  if missing:
    raise FileNotFoundError(f"{data_config.source_dir}: cases of the {split} split are missing: "
                            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")

  def read() -> Iterator[layouts.Case]:
    for case_id in case_ids:
      case = layouts.load_case(refs[case_id], tuple(data_config.modalities),
                               data_config.label_convention)
      if case.label is None:
        raise FileNotFoundError(f"{case_id}: has no label file to evaluate against.")
      yield case

  return read()
