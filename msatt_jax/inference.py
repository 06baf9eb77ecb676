"""Trained models applied to whole volumes: the one way in is `Predictor`.

  runs = inference.restore_runs(["runs/f0", "runs/f1"])          # one run or an ensemble
  predictor = inference.Predictor.from_runs(runs, inference.Options(tta=True), rules)
  seg = predictor.segment(image)   # (X,Y,Z,M) raw intensities -> Segmentation in that geometry

`evaluate`, `predict` and `postprocess` all segment through it; a model package
(`msatt_jax.package`) builds the same Predictor from exported forward passes. It reuses the data
pipeline's preprocessing so a volume is prepared exactly as the training slices were. The
slices go through one jit-compiled function of a batch: the probabilities of every member of an
ensemble (several runs of the same input and output) under mirroring test-time augmentation
(the identity and the flips of each in-plane axis and of both, each flipped back), averaged,
then turned into labels. Softmax runs average the K class probabilities (argmax); 'region_dice'
runs average the three sigmoid region probabilities (ET/TC/WT > 0.5, i.e. a logit > 0 for one
model without TTA).

Every inference option travels in one frozen `Options`. Between the labels and the output sits
one hook, `rules`: a function of the whole canonical label volume (rules chosen on validation
data, such as small-ET relabelling or removal of small connected components, need the whole
case).

`run_data_config` and `labelled_cases` give a run's data and the labelled cases of a split, as
evaluate and postprocess read them.
"""

import dataclasses
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines import cli
from data_pipelines.brats import labels as labels_lib
from data_pipelines.brats import layouts
from data_pipelines.brats import preprocess
from msatt_jax import losses
from msatt_jax import steps

# The in-plane flips of mirroring TTA, as axes of a (B, H, W, C) batch: identity, H, W, both.
TTA_FLIPS = ((), (1,), (2,), (1, 2))
# The preprocessing keys (config.data) that define a model's input: an ensemble's members share
# them, so that one prepared batch of slices means the same to each.
INPUT_KEYS = ("modalities", "crop_size", "crop_center", "slice_start", "slice_stop", "normalize",
              "crop_around", "slice_range")
# The uncertainty maps segment(with_uncertainty=True) gives (disagreement: ensembles only).
UNCERTAINTY_MAPS = ("entropy", "disagreement")
# Canonical label volume -> canonical label volume (postprocessing rules).
LabelRules = Callable[[np.ndarray], np.ndarray]


def _option(default: Any, help_text: str) -> Any:
  """A field of Options with the help of its command-line flag."""
  return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class Options:
  """How volumes are segmented: every inference option, in one place."""
  tta: bool = _option(True, "Mirroring test-time augmentation: average over the four in-plane "
                      "flips (--notta: the plain forward pass).")
  batch_size: int = _option(16, "Slices per forward pass (x4 images with --tta); one "
                            "compilation.")
  # 'auto' (the run's postprocessing.json), 'none' or a file's path; its flag is
  # postprocess.define_postprocess_flag's, which names that command.
  postprocess: str = "auto"
  checkpoint: str = _option("best", "'best', 'latest' or a step number (of every run).")

  def __post_init__(self):
    if int(self.batch_size) < 1:
      raise ValueError(f"--batch_size must be at least 1, got {self.batch_size}.")


# The options every command that segments takes as flags of the same name.
OPTION_FLAGS = ("checkpoint", "batch_size", "tta")


# As in data_pipelines.cli: the option flags belong to the command that defines them (its --help).
flags.disclaim_key_flags()


def define_option_flags(names: Sequence[str] = OPTION_FLAGS) -> None:
  """A flag for each of Options' fields `names`, with the field's type, default and help."""
  fields = {field.name: field for field in dataclasses.fields(Options)}
  for name in names:
    field = fields[name]
    cli.define_typed_flag(name, field.type, field.default, field.metadata["help"])


def options_from_flags(**fixed: Any) -> Options:
  """The Options of the command's flags (a field without a flag keeps its default), with
  `fixed` values for the options the command does not let one choose."""
  given = {field.name: flags.FLAGS[field.name].value for field in dataclasses.fields(Options)
           if field.name in flags.FLAGS}
  return Options(**{**given, **fixed})


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
  # Imported here: a model package predicts through this module without Orbax.
  from msatt_jax import checkpointing  # pylint: disable=g-import-not-at-top
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


def _damaged(checkpointer: Any, step: int, error: Exception) -> Exception:
  """The error for a checkpoint that does not read back: which step, and how to pick another."""
  from msatt_jax import checkpointing  # pylint: disable=g-import-not-at-top
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


def voxel_entropy(probs: jax.Array, region_output: bool) -> jax.Array:
  """(..., C) averaged probabilities -> (...) entropy in nats: of the class distribution
  (softmax classes, at most log C), or the summed entropies of the three region
  probabilities (sigmoid regions, each at most log 2)."""
  entropy = jax.scipy.special.entr(probs)
  if region_output:
    entropy = entropy + jax.scipy.special.entr(1 - probs)
  return entropy.sum(-1)


def probabilities_to_labels(probs: jax.Array, loss: str,
                            label_set: str = labels_lib.DEFAULT_LABEL_SET) -> jax.Array:
  """Averaged probabilities (..., C) -> canonical uint8 labels (...), as losses.logits_to_labels
  maps logits (a region is present where its probability exceeds 1/2)."""
  return losses.logits_to_labels(probs - 0.5 if is_region_output(loss) else probs, loss,
                                 label_set)


class Predictor:
  """An ensemble (or one model) applied to slices and whole volumes, with or without TTA.

  members: (model, variables) pairs, `model.apply(variables, images, train=False)` giving
  (B,H,W,C) logits; data_config: the members' preprocessing (INPUT_KEYS as attributes);
  label_set: the classes and regions their channels mean (labels.LABEL_SETS); rules: the
  postprocessing applied to each segmented volume. Calling it on (B,H,W,M) slices returns
  (B,H,W) canonical uint8 labels of that set; `with_probabilities` also returns the averaged
  (B,H,W,C) float32 probabilities. Both come from one jit-compiled function, compiled once per
  batch shape (`segment` keeps the batch size fixed).
  """

  def __init__(self, members: Sequence[Tuple[Any, Dict[str, Any]]], loss: str,
               tta: bool = True, data_config: Any = None, *,
               label_set: str = labels_lib.DEFAULT_LABEL_SET, batch_size: int = 16,
               rules: Optional[LabelRules] = None, source: Optional[Dict[str, Any]] = None,
               devices: Optional[Sequence[jax.Device]] = None):
    losses.check_loss(loss)
    self.loss = loss
    self.label_set = label_set = labels_lib.label_set(label_set).name
    self.tta = bool(tta)
    self.data_config = data_config
    self.rules = rules
    self.source = source or {}  # What predicts (runs and steps, or a package), for records.
    # The slices of a batch are split over this process's devices (never another process's:
    # processes share work by cases, not by slices); the batch is rounded up to divide evenly.
    self.devices = tuple(devices or jax.local_devices())
    n = len(self.devices)
    self.batch_size = -(-int(batch_size) // n) * n
    models = [model for model, _ in members]
    self._variables = tuple(variables for _, variables in members)
    flips = TTA_FLIPS if self.tta else ((),)
    region_output = is_region_output(loss)

    def predict(variables, images):
      # The views are batched together: one forward pass per member over V x B images.
      views = jnp.concatenate([jnp.flip(images, f) if f else images for f in flips])
      total, totals = None, []
      for model, member_variables in zip(models, variables):
        probs = _probabilities(model.apply(member_variables, views, train=False), region_output)
        probs = probs.reshape(len(flips), *images.shape[:3], probs.shape[-1])
        member = None
        for v, f in enumerate(flips):
          view = jnp.flip(probs[v], f) if f else probs[v]
          total = view if total is None else total + view
          member = view if member is None else member + view
        totals.append(member)
      mean = total / (len(flips) * len(models))
      labels = probabilities_to_labels(mean, loss, label_set)
      # Fetched only when asked for (segment(with_uncertainty=True)); cheap beside the models.
      disagreement = sum((probabilities_to_labels(m / len(flips), loss, label_set) != labels)
                         .astype(jnp.float32) for m in totals) / len(models)
      return labels, mean, voxel_entropy(mean, region_output), disagreement

    if n == 1:
      self._images = jax.sharding.SingleDeviceSharding(self.devices[0])
      self._predict = jax.jit(predict)
    else:
      # Each device runs the one-device program on its share of the slices: one compilation,
      # no communication, and the one-device arithmetic per slice.
      mesh = jax.sharding.Mesh(np.asarray(self.devices), ("slices",))
      self._images = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("slices"))
      self._predict = jax.jit(jax.shard_map(
          predict, mesh=mesh, in_specs=(jax.sharding.PartitionSpec(), self._images.spec),
          out_specs=self._images.spec, check_vma=False))

  @classmethod
  def from_runs(cls, runs: Union[TrainedRun, Sequence[TrainedRun]], options: Options = Options(),
                rules: Optional[LabelRules] = None,
                devices: Optional[Sequence[jax.Device]] = None) -> "Predictor":
    """The predictor of one restored run or of an ensemble (checked to share input, output and
    label set: the first run's is theirs); devices: where the slices go (default this
    process's devices)."""
    runs = [runs] if isinstance(runs, TrainedRun) else list(runs)
    check_ensemble(runs)
    source = {"runs": [{"workdir": os.path.abspath(r.workdir) if r.workdir else None,
                        "checkpoint_step": int(r.step)} for r in runs]}
    return cls([(r.model, r.variables) for r in runs], runs[0].config.loss, options.tta,
               runs[0].config.data, label_set=runs[0].label_set, batch_size=options.batch_size,
               rules=rules, source=source, devices=devices)

  @property
  def channels(self) -> Tuple[str, ...]:
    return channel_names(self.loss, self.label_set)

  @property
  def function(self) -> Tuple[Callable[..., Any], Tuple[Dict[str, Any], ...]]:
    """(the jit-compiled (variables, images) -> (labels, probabilities, entropy,
    disagreement), the members' variables): the whole prediction of a batch, for export."""
    return self._predict, self._variables

  @property
  def num_members(self) -> int:
    return len(self._variables)

  def _run(self, images: np.ndarray) -> Tuple[jax.Array, ...]:
    return self._predict(self._variables,
                         jax.device_put(np.asarray(images, np.float32), self._images))

  def with_probabilities(self, images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    labels, probs, _, _ = self._run(images)
    return np.asarray(labels), np.asarray(probs)

  def with_uncertainty(self, images: np.ndarray) -> Dict[str, np.ndarray]:
    """{'labels', 'probabilities', 'entropy' (B,H,W) nats of the averaged probabilities,
    'disagreement' (B,H,W) the fraction of members whose own labels differ from the
    ensemble's}."""
    outputs = self._run(images)
    return dict(zip(("labels", "probabilities", "entropy", "disagreement"),
                    (np.asarray(x) for x in outputs)))

  def __call__(self, images: np.ndarray) -> np.ndarray:
    return np.asarray(self._run(images)[0])  # The rest stays on the device.

  def prepare(self, image: np.ndarray,
              slice_range: Optional[Tuple[int, int]] = None) -> preprocess.Slices:
    """(X,Y,Z,M) raw intensities -> the model's slices, preprocessed as the training slices were.

    slice_range: inclusive axial range to segment; default the training range.
    """
    return prepare_slices(image, self.data_config, slice_range)

  def segment(self, image: np.ndarray, slice_range: Optional[Tuple[int, int]] = None,
              with_probabilities: bool = False,
              slices: Optional[preprocess.Slices] = None,
              with_uncertainty: bool = False) -> "Segmentation":
    """(X,Y,Z,M) raw intensities -> Segmentation (labels pasted back, then the rules); zero
    labels outside the segmented slices and crop.

    slices: `prepare(image, slice_range)` when the caller prepared it already (predict reads
    and prepares the next case while this one runs). with_uncertainty: also the voxel-wise
    entropy and (ensembles) the members' disagreement, 0 outside the segmented slices and crop.
    """
    slices = slices if slices is not None else self.prepare(image, slice_range)
    volume_shape = image.shape[:3]
    out = _predict_slices(self, slices.image, self.batch_size, with_probabilities,
                          with_uncertainty)
    probs = (paste_back_probabilities(out["probabilities"], slices, volume_shape, self.channels)
             if with_probabilities else None)
    unprocessed = preprocess.paste_back(out["labels"], slices.slice_indices, slices.offsets,
                                        volume_shape)
    processed = self.rules(unprocessed) if self.rules is not None else unprocessed
    uncertainty = {name: paste_back_map(out[name], slices, volume_shape)
                   for name in UNCERTAINTY_MAPS
                   if with_uncertainty and (name == "entropy" or self.num_members > 1)}
    return Segmentation(labels=processed, unprocessed=unprocessed, probabilities=probs,
                        entropy=uncertainty.get("entropy"),
                        disagreement=uncertainty.get("disagreement"))


@dataclasses.dataclass
class Segmentation:
  """One case segmented, in the volume's geometry."""
  labels: np.ndarray  # (X, Y, Z) uint8 canonical labels, after the rules.
  unprocessed: np.ndarray  # The same before the rules (the same array when there are none).
  probabilities: Optional[np.ndarray] = None  # (C, X, Y, Z) float16, when asked for.
  entropy: Optional[np.ndarray] = None  # (X, Y, Z) float32 nats, when asked for.
  disagreement: Optional[np.ndarray] = None  # (X, Y, Z) float32, ensembles, when asked for.


def _predict_slices(predict: Predictor, slices: np.ndarray, batch_size: int,
                    with_probabilities: bool,
                    with_uncertainty: bool = False) -> Dict[str, np.ndarray]:
  """Runs (S,H,W,M) slices through the model in fixed-size batches (one compilation).

  Returns {'labels': (S,H,W) uint8} and, when asked for, 'probabilities' (S,H,W,C) float16,
  'entropy' and 'disagreement' (S,H,W) float32.
  """
  dtypes = {"labels": np.uint8, "probabilities": np.float16, "entropy": np.float32,
            "disagreement": np.float32}
  wanted = ["labels"] + (["probabilities"] if with_probabilities else []) + (
      list(UNCERTAINTY_MAPS) if with_uncertainty else [])
  out: Dict[str, np.ndarray] = {}
  for start in range(0, len(slices), batch_size):
    chunk = slices[start:start + batch_size]
    padded = np.zeros((batch_size, *slices.shape[1:]), np.float32)
    padded[:len(chunk)] = chunk
    if len(wanted) == 1:
      batch = {"labels": predict(padded)}
    else:
      batch = predict.with_uncertainty(padded)
    for name in wanted:
      if name not in out:
        out[name] = np.zeros((len(slices), *batch[name].shape[1:]), dtypes[name])
      out[name][start:start + len(chunk)] = batch[name][:len(chunk)]
  return out


def prepare_slices(image: np.ndarray, data_config: Any,
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


def _inside(x0: int, y0: int, height: int, width: int, volume_shape: Sequence[int]):
  """((volume, window) slices along x, the same along y): the part of a (padded) window inside
  the volume."""
  return (preprocess.window_overlap(x0, height, volume_shape[0]),
          preprocess.window_overlap(y0, width, volume_shape[1]))


def paste_back_map(values: np.ndarray, slices: preprocess.Slices,
                   volume_shape: Sequence[int]) -> np.ndarray:
  """(S,H,W) float slice values -> (X,Y,Z) float32 in the volume, 0 outside the segmented
  slices and crop."""
  out = np.zeros(tuple(int(s) for s in volume_shape), np.float32)
  (x0, y0), (_, height, width) = slices.offsets, values.shape
  (vx, wx), (vy, wy) = _inside(x0, y0, height, width, out.shape)
  out[vx, vy, slices.slice_indices] = values.transpose(1, 2, 0)[wx, wy]
  return out


def paste_back_probabilities(probs: np.ndarray, slices: preprocess.Slices,
                             volume_shape: Sequence[int], channels: Sequence[str]) -> np.ndarray:
  """(S,H,W,C) slice probabilities -> (C,X,Y,Z) float16 in the volume; outside the segmented
  slices and crop, background has probability 1 (softmax classes) and every region 0."""
  outside = np.asarray([name == labels_lib.CLASS_NAMES[0] for name in channels], np.float16)
  out = np.empty((len(channels), *(int(s) for s in volume_shape)), np.float16)
  out[:] = outside[:, None, None, None]
  (x0, y0), (_, height, width, _) = slices.offsets, probs.shape
  (vx, wx), (vy, wy) = _inside(x0, y0, height, width, out.shape[1:])
  out[:, vx, vy, slices.slice_indices] = probs.transpose(3, 1, 2, 0)[:, wx, wy]
  return out


def run_data_config(run: TrainedRun,
                    source_dir: Optional[str] = None) -> ml_collections.ConfigDict:
  """A copy of the run's data config pointing at its raw and prepared data as recorded at
  training (source_dir: the raw folder, if it moved since); the run's own is left as it is."""
  data_config = run.config.data.copy_and_resolve_references()
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
