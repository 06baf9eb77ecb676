"""tf.data input pipeline over the prepared 'brats' data set: numpy batches for JAX.

Device-agnostic: it returns per-process numpy batches; placing them on devices is the trainer's
job. TensorFlow is hidden from GPUs at import so that it never takes accelerator memory. The
pipeline is made of TensorFlow ops only (no Python generator inside tf.data), so its threads
never need the GIL and an iterator left open at exit cannot hang the process.

Training order. Epoch e reads the train shards in an order drawn from (seed, e), interleaves
them and shuffles the serialized slices through a buffer of data_config.shuffle_buffer seeded
by (seed, e) (on top of the global shuffle TFDS applies when writing). Global step s is batch
s % steps_per_epoch of epoch s // steps_per_epoch; the remainder of each epoch is dropped so
every batch has the same shape. Everything is a function of (seed, e), so an iterator started
at `start_step` replays epoch e up to its batch without decoding what it skips and then yields
exactly the batches an uninterrupted one yields. The augmentation draws come from stateless
random ops keyed by (seed, global step): reproducible on resume, and drawn for the whole
global batch. Process p of P takes rows [p * B/P, (p + 1) * B/P) of every global batch of B
(before decoding), so the processes' batches concatenate to the one-process batch.
"""

import os
import threading
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np
import tensorflow as tf

from data_pipelines.brats import builder as builder_lib
from data_pipelines.errors import DataError

SPLITS = builder_lib.SPLITS
# Augmentation (data_config.augment): a flip of each in-plane axis with probability 1/2, a
# per-modality intensity scale in [1 - MAX_SCALE, 1 + MAX_SCALE] and shift in
# [-MAX_SHIFT, MAX_SHIFT] applied to brain (non-zero) voxels only.
FLIP_PROBABILITY = 0.5
MAX_SCALE = 0.1
MAX_SHIFT = 0.1

# Bytes TFRecordDataset reads ahead per file (a slice record is ~290 kB).
_READ_BUFFER = 4 << 20
# Shards read at once by the interleave of an epoch.
_CYCLE_LENGTH = 16


# ---------------------------------------------------------------------------------------------
# The prepared data set.

_BUILDERS: Dict[Tuple[str, str], Any] = {}
_BUILDERS_LOCK = threading.Lock()


def prepared_builder(data_config):
  """The prepared 'brats' builder for config.data; a DataError saying how to prepare it."""
  builder = builder_lib.builder_from_config(data_config)
  key = (os.fspath(builder.data_path), builder.builder_config.name)
  with _BUILDERS_LOCK:
    if key in _BUILDERS:
      return _BUILDERS[key]
  if not builder.is_prepared():
    source = data_config.get("source_dir", None) or "SRC"
    raise DataError(
        f"{builder.data_path}: no prepared data for these preprocessing settings (config "
        f"'{builder.builder_config.name}'). Prepare it with\n"
        f"  python -m data_pipelines.prepare --src {source} --data_dir {builder.data_dir_root}\n"
        "and the same preprocessing flags, or call data_pipelines.prepare.prepare(config.data).")
  with _BUILDERS_LOCK:
    _BUILDERS.setdefault(key, builder)
    return _BUILDERS[key]


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}.")


def num_examples(data_config, split: str) -> int:
  """Number of slices in a split."""
  _check_split(split)
  return int(prepared_builder(data_config).info.splits[split].num_examples)


def steps_per_epoch(data_config, batch_size: int) -> int:
  """Global train batches per epoch (the remainder of each epoch is dropped)."""
  return num_examples(data_config, "train") // int(batch_size)


def buffer_bytes(data_config, batch_size: int) -> int:
  """Bytes the train iterator holds at most: the shuffle buffer of serialized slices, the
  shards' read-ahead, and the decoded float32 batches in flight (parallel decoding, which
  tf.data sizes to the cores, plus the prefetch)."""
  builder = prepared_builder(data_config)
  split = builder.info.splits["train"]
  record = int(split.num_bytes) / max(int(split.num_examples), 1)
  shuffle = min(max(1, int(data_config.get("shuffle_buffer", 4096))),
                int(split.num_examples)) * record
  read_ahead = min(_CYCLE_LENGTH, len(split.filepaths)) * _READ_BUFFER
  shape = builder.info.features["image"].shape
  decoded = int(batch_size) * (int(np.prod(shape)) * 4 + int(np.prod(shape[:2])))
  in_flight = (int(data_config.get("prefetch", 2)) + (os.cpu_count() or 1)) * decoded
  return int(shuffle + read_ahead + in_flight)


def split_cases(data_config, split: str) -> List[str]:
  """Case ids of a split, as stored with the prepared data."""
  _check_split(split)
  return list(prepared_builder(data_config).info.metadata["splits"][split])


# ---------------------------------------------------------------------------------------------
# Decoding (vectorised over a batch of serialized examples).


class _Decoder:
  """Parses a batch of serialized examples with the layout the builder wrote."""

  def __init__(self, builder):
    features = builder.info.features
    image = features["image"]
    self.shape = tuple(int(d) for d in image.shape)
    self.storage_dtype = tf.as_dtype(image.np_dtype)
    self.zlib = builder.builder_config.compression == "zlib"
    self.num_modalities = self.shape[-1]

  def __call__(self, serialized: tf.Tensor, with_info: bool = False) -> Dict[str, tf.Tensor]:
    spec = {"image": tf.io.FixedLenFeature([], tf.string),
            "label": tf.io.FixedLenFeature([], tf.string)}
    if with_info:
      spec.update({"case_id": tf.io.FixedLenFeature([], tf.string),
                   "slice_index": tf.io.FixedLenFeature([], tf.int64),
                   "crop_offset": tf.io.FixedLenFeature([2], tf.int64)})
    parsed = tf.io.parse_example(serialized, spec)
    n = tf.shape(serialized)[0]
    image = parsed["image"]
    if self.zlib:
      image = tf.io.decode_compressed(image, compression_type="ZLIB")
    image = tf.reshape(tf.io.decode_raw(image, self.storage_dtype), (n,) + self.shape)
    label = tf.io.decode_compressed(parsed["label"], compression_type="ZLIB")
    label = tf.reshape(tf.io.decode_raw(label, tf.uint8), (n,) + self.shape[:2])
    out = {"image": image, "label": label}
    if with_info:
      out["case_id"] = parsed["case_id"]
      out["slice_index"] = tf.cast(parsed["slice_index"], tf.int32)
      out["crop_offset"] = tf.cast(parsed["crop_offset"], tf.int32)
    return out


def _flip(x: tf.Tensor, flip: tf.Tensor, axis: int) -> tf.Tensor:
  """Reverses `axis` of the examples whose `flip` is set (x: (b, H, W, ...))."""
  cond = tf.reshape(flip, [-1] + [1] * (len(x.shape) - 1))
  return tf.where(cond, tf.reverse(x, [axis]), x)


# Integer types by byte size, to move a voxel's M values as one element.
_INT_OF_SIZE = {2: tf.int16, 4: tf.int32, 8: tf.int64}


def _flip_voxels(image: tf.Tensor, flips: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  """Flips (b, H, W, M) images per example (flips: (b, 2) bool for the H and W axes).

  Returns the flipped images and the brain mask (b, H, W, 1) float32: voxels where any
  modality is non-zero (background is exactly 0 after preprocessing).
  """
  # Viewing a voxel's M values as one integer makes reverse and select work on H*W elements
  # instead of H*W*M (about 3x faster on CPU), and gives the brain mask in one comparison.
  as_int = _INT_OF_SIZE.get(image.shape[-1] * image.dtype.size)
  packed = image if as_int is None else tf.bitcast(image, as_int)
  for axis in (1, 2):
    packed = _flip(packed, flips[:, axis - 1], axis)
  if as_int is None:
    brain = tf.reduce_any(tf.not_equal(packed, tf.zeros((), packed.dtype)), -1, keepdims=True)
    return packed, tf.cast(brain, tf.float32)
  brain = tf.cast(tf.not_equal(packed, 0), tf.float32)
  if brain.shape.rank == 3:  # (b, H, W) after packing M > 1 values.
    brain = brain[..., None]
  return tf.bitcast(packed, image.dtype), brain


def _augment(image: tf.Tensor, label: tf.Tensor, flips: tf.Tensor, scale: tf.Tensor,
             shift: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  """Flips (image and label together), then scale/shift of brain voxels; returns float32."""
  # Flips move data only: done in the storage dtype, before the cast to float32.
  image, brain = _flip_voxels(image, flips)
  # Select on uint8 is slow on CPU; int32 is not.
  label32 = tf.cast(label, tf.int32)
  for axis in (1, 2):
    label32 = _flip(label32, flips[:, axis - 1], axis)
  label = tf.cast(label32, tf.uint8)
  b, h, w, m = (tf.shape(image)[0],) + tuple(image.shape[1:])
  x = tf.reshape(tf.cast(image, tf.float32), (b, h * w, m))
  brain = tf.reshape(brain, (b, h * w, 1))
  # Per-example, per-modality affine maps as batched matmuls: much faster on CPU than
  # broadcasting multiplies. Background stays 0: 0 * scale, and no shift outside the brain.
  out = tf.linalg.matmul(x, tf.linalg.diag(scale)) + tf.linalg.matmul(brain, shift[:, None, :])
  return tf.reshape(out, (b, h, w, m)), label


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return options


def _split_files(builder, split: str) -> List[str]:
  files = [os.fspath(p) for p in builder.info.splits[split].filepaths]
  missing = [f for f in files if not os.path.isfile(f)]
  if missing:
    raise DataError(f"{missing[0]}: shard of the prepared '{split}' split is missing; prepare "
                    "the data again.")
  return files


def _read_records(files: tf.Tensor, cycle_length: int) -> tf.data.Dataset:
  """Serialized examples of `files`, interleaved one record at a time, deterministically."""
  # A sequential interleave: with the read-ahead buffer it keeps up, and parallel readers
  # cost ~15% more CPU per slice in thread hand-offs.
  return tf.data.Dataset.from_tensor_slices(files).interleave(
      lambda f: tf.data.TFRecordDataset(f, buffer_size=_READ_BUFFER),
      cycle_length=cycle_length, block_length=1)


def _rows(x: tf.Tensor, process_index: int, local: int) -> tf.Tensor:
  """This process's rows of a global batch (the whole batch, uncopied, for one process)."""
  if process_index == 0 and x.shape[0] is not None and x.shape[0] <= local:
    return x
  return x[process_index * local:(process_index + 1) * local]


# ---------------------------------------------------------------------------------------------
# Public iterators.


def train_iterator(data_config, *, batch_size: int, seed: int, start_step: int = 0,
                   process_index: int = 0,
                   process_count: int = 1) -> Iterator[Dict[str, np.ndarray]]:
  """Infinite per-process train batches {'image': f32 (b,H,W,M), 'label': u8 (b,H,W)}.

  b = batch_size // process_count; deterministic given (seed, start_step) (see module doc).
  """
  batch_size, start_step, seed = int(batch_size), int(start_step), int(seed)
  if batch_size <= 0 or process_count <= 0 or batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} must be a positive multiple of process_count "
                     f"{process_count}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}.")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  builder = prepared_builder(data_config)
  num = int(builder.info.splits["train"].num_examples)
  per_epoch = num // batch_size
  if per_epoch == 0:
    raise DataError(f"{builder.data_path}: the train split has {num} slices, fewer than one "
                    f"batch of {batch_size}.")
  files = tf.constant(_split_files(builder, "train"))
  local = batch_size // process_count
  decoder = _Decoder(builder)
  augment = bool(data_config.get("augment", False))
  buffer = max(1, int(data_config.get("shuffle_buffer", 4096)))
  cycle = min(_CYCLE_LENGTH, int(files.shape[0]))
  first_epoch, first_batch = divmod(start_step, per_epoch)
  seed_t = tf.constant(seed, tf.int64)

  def epoch_batches(epoch: tf.Tensor) -> tf.data.Dataset:
    """(epoch, batch index in the epoch, serialized global batch) of one epoch."""
    key = tf.stack([seed_t, epoch])
    order = tf.random.experimental.stateless_shuffle(files, seed=key)
    shuffle_seed = tf.random.stateless_uniform([], seed=key, minval=None, maxval=None,
                                               dtype=tf.int64)
    ds = _read_records(order, cycle).shuffle(buffer, seed=shuffle_seed)
    # Resuming inside this epoch: skip whole batches before batching (nothing is decoded).
    skip = tf.where(tf.equal(epoch, first_epoch), tf.constant(first_batch, tf.int64), 0)
    ds = ds.take(per_epoch * batch_size).skip(skip * batch_size)
    ds = ds.batch(batch_size, drop_remainder=True).enumerate(start=skip)
    return ds.map(lambda i, records: (epoch, i, records))

  def decode(epoch, index, records):
    out = decoder(_rows(records, process_index, local))
    if augment:
      step = epoch * per_epoch + index
      # Drawn for the whole global batch, then this process's rows: the same draws whatever
      # the number of processes.
      u = tf.random.stateless_uniform((batch_size, 2 + 2 * decoder.num_modalities),
                                      seed=tf.stack([seed_t, step]))
      u = _rows(u, process_index, local)
      m = decoder.num_modalities
      flips = u[:, :2] < FLIP_PROBABILITY
      scale = 1.0 + MAX_SCALE * (2.0 * u[:, 2:2 + m] - 1.0)
      shift = MAX_SHIFT * (2.0 * u[:, 2 + m:] - 1.0)
      out["image"], out["label"] = _augment(out["image"], out["label"], flips, scale, shift)
    else:
      out["image"] = tf.cast(out["image"], tf.float32)
    return out

  epochs = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max)
  ds = epochs.flat_map(epoch_batches)
  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.prefetch(int(data_config.get("prefetch", 2)) or tf.data.AUTOTUNE)
  return ds.with_options(_options()).as_numpy_iterator()


def eval_batches(data_config, split: str, batch_size: int, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Dict[str, np.ndarray]]:
  """One pass over a split in fixed-shape batches; the last one padded with zeros.

  Yields image f32 (b,H,W,M), label u8 (b,H,W), mask bool (b,) (True: a real slice),
  case_id (b,) str ('' for padding), slice_index int32 (b,) (-1 for padding) and
  crop_offset int32 (b, 2). With several processes each takes its rows of every global batch.
  """
  _check_split(split)
  batch_size = int(batch_size)
  if batch_size <= 0 or process_count <= 0 or batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} must be a positive multiple of process_count "
                     f"{process_count}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}.")
  builder = prepared_builder(data_config)
  local = batch_size // process_count
  decoder = _Decoder(builder)
  files = tf.constant(_split_files(builder, split))
  # Files one after the other: the stored order, the same in every process.
  records = tf.data.Dataset.from_tensor_slices(files).flat_map(
      lambda f: tf.data.TFRecordDataset(f, buffer_size=_READ_BUFFER))

  def decode(batch):
    # The global batch is padded to batch_size first, so every process keeps its own rows.
    real = tf.shape(batch)[0]
    mask = _rows(tf.range(batch_size) < real, process_index, local)
    mine = _rows(batch, process_index, local)
    count = tf.shape(mine)[0]
    # Decode the real rows only; padding rows are filled in below.
    out = decoder(mine, with_info=True)
    out["image"] = tf.cast(out["image"], tf.float32)
    padded = {}
    for key, value in out.items():
      paddings = [[0, local - count]] + [[0, 0]] * (len(value.shape) - 1)
      fill = {"slice_index": -1, "case_id": ""}.get(key, 0)
      padded[key] = tf.pad(value, paddings, constant_values=fill)
    padded["mask"] = mask
    return padded

  ds = records.batch(batch_size).map(decode, num_parallel_calls=tf.data.AUTOTUNE,
                                     deterministic=True)
  ds = ds.prefetch(2).with_options(_options())

  def as_numpy():
    for batch in ds.as_numpy_iterator():
      batch["case_id"] = np.array([c.decode() for c in batch["case_id"]], dtype=object)
      yield batch

  return as_numpy()

