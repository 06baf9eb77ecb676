"""The tf.data input pipeline: shapes, epoch order, exact resume, process shards, eval padding."""

import hashlib
import subprocess
import sys
import textwrap
from collections import Counter

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

# pylint: disable=g-import-not-at-top
from data_pipelines import input_pipeline as ip
from data_pipelines import prepare as prepare_lib
from data_pipelines.errors import DataError
# pylint: enable=g-import-not-at-top

# 4 cases of 48x48x40 (conftest) split 2/1/1; slices 10..17 with a 32x32 crop: 16 train slices.
BATCH = 4
STEPS = 4  # 16 train slices / 4.


@pytest.fixture(scope="module")
def data(prepared_small):
  return prepared_small


def _with(config, **changes):
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in changes.items():
    config[key] = value
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _fingerprint(image: np.ndarray) -> str:
  return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_sizes_and_split_cases(data):
  assert ip.num_examples(data, "train") == 16
  assert ip.num_examples(data, "validation") == ip.num_examples(data, "test") == 8
  assert ip.steps_per_epoch(data, BATCH) == STEPS
  assert ip.steps_per_epoch(data, 5) == 3  # The remainder is dropped.
  cases = {s: ip.split_cases(data, s) for s in ip.SPLITS}
  assert sorted(sum(cases.values(), [])) == [f"BRATS_{i:03d}" for i in range(1, 5)]
  with pytest.raises(ValueError, match="split"):
    ip.num_examples(data, "training")


def test_unprepared_settings_raise_a_clear_error(data):
  with pytest.raises(DataError, match="data_pipelines.prepare"):
    ip.num_examples(_with(data, crop_size=24), "train")


def test_train_batches_shapes_dtypes_and_epoch_coverage(data):
  train = {_fingerprint(b["image"][i]): (b["label"][i].copy())
           for b in ip.eval_batches(data, "train", 5) for i in np.flatnonzero(b["mask"])}
  assert len(train) == 16
  batches = _take(ip.train_iterator(data, batch_size=BATCH, seed=0), 3 * STEPS)
  for b in batches:
    assert b.keys() == {"image", "label"}
    assert b["image"].shape == (BATCH, 32, 32, 4) and b["image"].dtype == np.float32
    assert b["label"].shape == (BATCH, 32, 32) and b["label"].dtype == np.uint8
  epochs = [batches[e * STEPS:(e + 1) * STEPS] for e in range(3)]
  orders = []
  for epoch in epochs:
    prints = [_fingerprint(im) for b in epoch for im in b["image"]]
    # Every train slice exactly once per epoch, with its own label.
    assert Counter(prints) == Counter(train.keys())
    for b in epoch:
      for image, label in zip(b["image"], b["label"]):
        np.testing.assert_array_equal(label, train[_fingerprint(image)])
    orders.append(prints)
  assert orders[0] != orders[1] != orders[2]  # Reshuffled every epoch.


def test_order_depends_on_the_seed_only(data):
  a = _take(ip.train_iterator(data, batch_size=BATCH, seed=3), 6)
  b = _take(ip.train_iterator(data, batch_size=BATCH, seed=3), 6)
  c = _take(ip.train_iterator(data, batch_size=BATCH, seed=4), 6)
  _assert_same(a, b)
  assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))


@pytest.mark.parametrize("augment", [False, True])
def test_resume_yields_exactly_the_uninterrupted_batches(data, augment):
  config = _with(data, augment=augment)
  full = _take(ip.train_iterator(config, batch_size=BATCH, seed=7), 3 * STEPS)
  # Mid-epoch, at an epoch boundary and in a later epoch.
  for start in (1, STEPS, STEPS + 3, 2 * STEPS + 2):
    resumed = _take(ip.train_iterator(config, batch_size=BATCH, seed=7, start_step=start),
                    3 * STEPS - start)
    _assert_same(resumed, full[start:])


@pytest.mark.parametrize("augment", [False, True])
def test_process_shards_concatenate_to_the_global_batch(data, augment):
  config = _with(data, augment=augment)
  whole = _take(ip.train_iterator(config, batch_size=BATCH, seed=1, start_step=2), 5)
  parts = [_take(ip.train_iterator(config, batch_size=BATCH, seed=1, start_step=2,
                                   process_index=p, process_count=2), 5) for p in range(2)]
  for step, batch in enumerate(whole):
    for key in ("image", "label"):
      assert parts[0][step][key].shape[0] == BATCH // 2
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][key], parts[1][step][key]]), batch[key])
  with pytest.raises(ValueError, match="multiple"):
    ip.train_iterator(config, batch_size=5, seed=0, process_count=2)
  with pytest.raises(DataError, match="fewer than one batch"):
    ip.train_iterator(config, batch_size=32, seed=0)


def _flip(x, fx, fy):
  return x[::-1 if fx else 1, ::-1 if fy else 1]


def test_augmentation_flips_and_scales_brain_voxels_only(data):
  plain = _take(ip.train_iterator(data, batch_size=BATCH, seed=5), 2 * STEPS)
  augmented = _take(ip.train_iterator(_with(data, augment=True), batch_size=BATCH, seed=5),
                    2 * STEPS)
  flips_seen, scales, shifts = set(), [], []
  for p, a in zip(plain, augmented):
    for image, label, aug_image, aug_label in zip(p["image"], p["label"], a["image"],
                                                  a["label"]):
      # The same slice (augmentation does not change the order), flipped like its label.
      brain = np.any(image != 0, axis=-1)
      matches = [(fx, fy) for fx in (False, True) for fy in (False, True)
                 if np.array_equal(_flip(brain, fx, fy), np.any(aug_image != 0, axis=-1))
                 and np.array_equal(_flip(label, fx, fy), aug_label)]
      assert matches
      fx, fy = matches[0]
      flips_seen.add((fx, fy))
      src = _flip(image, fx, fy)
      mask = _flip(brain, fx, fy)
      for m in range(4):
        x, y = src[..., m][mask], aug_image[..., m][mask]
        scale, shift = np.polyfit(x.astype(np.float64), y.astype(np.float64), 1)
        np.testing.assert_allclose(y, scale * x + shift, atol=1e-4)
        scales.append(scale)
        shifts.append(shift)
      assert np.all(aug_image[~mask] == 0)  # Background stays exactly 0.
  assert len(flips_seen) >= 3  # Both axes flip, independently.
  assert 0.9 - 1e-4 <= min(scales) and max(scales) <= 1.1 + 1e-4
  assert -0.1 - 1e-4 <= min(shifts) and max(shifts) <= 0.1 + 1e-4
  assert np.std(scales) > 0.02 and np.std(shifts) > 0.02  # Really random, per modality.


def test_eval_batches_pad_the_last_batch_and_mark_it(data):
  batches = list(ip.eval_batches(data, "test", 3))
  assert [int(b["mask"].sum()) for b in batches] == [3, 3, 2]
  for b in batches:
    assert b["image"].shape == (3, 32, 32, 4) and b["image"].dtype == np.float32
    assert b["label"].shape == (3, 32, 32) and b["mask"].dtype == np.bool_
    assert b["slice_index"].dtype == np.int32 and b["crop_offset"].shape == (3, 2)
  last = batches[-1]
  assert last["case_id"][2] == "" and last["slice_index"][2] == -1
  assert not last["image"][2].any() and not last["label"][2].any()
  (case,) = ip.split_cases(data, "test")
  real = [(c, int(z)) for b in batches for c, z, m in zip(b["case_id"], b["slice_index"],
                                                           b["mask"]) if m]
  assert sorted(real) == [(case, z) for z in range(10, 18)]
  assert all((b["crop_offset"][b["mask"]] == 8).all() for b in batches)  # (48 - 32) / 2.


def test_eval_process_shards_concatenate(data):
  whole = list(ip.eval_batches(data, "validation", 6))
  parts = [list(ip.eval_batches(data, "validation", 6, process_index=p, process_count=2))
           for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(whole) == 2
  for step, batch in enumerate(whole):
    for key in batch:
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][key], parts[1][step][key]]), batch[key])


def test_decoding_matches_tfds_and_zlib_storage(data, tmp_path):
  # The pipeline parses records itself; it must agree with TFDS's decoding of the same data,
  # and data stored zlib-compressed must read back identically.
  builder = ip.prepared_builder(data)
  reference = {(ex["case_id"].decode(), int(ex["slice_index"])): ex
               for ex in tfds.as_numpy(builder.as_dataset(split="validation"))}
  zlib_config = _with(data, data_dir=str(tmp_path / "zlib"), compression="zlib")
  prepare_lib.prepare(zlib_config, progress=lambda _: None)
  for config in (data, zlib_config):
    for b in ip.eval_batches(config, "validation", 4):
      for i in np.flatnonzero(b["mask"]):
        ex = reference[(b["case_id"][i], int(b["slice_index"][i]))]
        np.testing.assert_array_equal(b["image"][i], ex["image"].astype(np.float32))
        np.testing.assert_array_equal(b["label"][i], ex["label"])
        np.testing.assert_array_equal(b["crop_offset"][i], ex["crop_offset"])


@pytest.mark.slow
def test_a_process_with_an_open_iterator_exits_promptly(data):
  # tf.data pipelines with Python generators can deadlock at interpreter exit; this one has
  # none, so a trainer that ends with its iterator open must still exit.
  script = textwrap.dedent(f"""
      import ml_collections
      from data_pipelines import input_pipeline as ip
      config = ml_collections.ConfigDict({data.to_dict()!r})
      config.augment = True
      iterator = ip.train_iterator(config, batch_size={BATCH}, seed=0)
      next(iterator); next(iterator)
      print("done", flush=True)
      """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "done" in proc.stdout
