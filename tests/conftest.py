"""Shared fixtures: tiny synthetic data sets in both download layouts and one prepared data set
(each built once per session)."""

from pathlib import Path
from typing import Callable

import pytest

from data_pipelines import synthetic

# Small enough for fast CPU tests; every case still holds edema and NCR/NET (and ET but index 2).
SYNTHETIC_SHAPE = (48, 48, 40)
# Case index 2 has no ET, so every fixture holds cases with and without ET.
SYNTHETIC_CASES = 4
SYNTHETIC_SEED = 0


@pytest.fixture(scope="session")
def synthetic_shape():
  """Volume shape (X, Y, Z) of the synthetic fixtures."""
  return SYNTHETIC_SHAPE


@pytest.fixture(scope="session")
def synthetic_msd(tmp_path_factory) -> Path:
  """A Decathlon-layout folder (dataset.json, imagesTr, labelsTr) of 4 tiny cases. Read-only."""
  out = tmp_path_factory.mktemp("synthetic") / "msd"
  synthetic.generate_dataset(out, "msd", SYNTHETIC_CASES, SYNTHETIC_SHAPE, SYNTHETIC_SEED)
  return out


@pytest.fixture(scope="session")
def synthetic_brats(tmp_path_factory) -> Path:
  """A BraTS-challenge-layout folder (HGG/, LGG/ case folders) of 4 tiny cases. Read-only."""
  out = tmp_path_factory.mktemp("synthetic") / "brats"
  synthetic.generate_dataset(out, "brats", SYNTHETIC_CASES, SYNTHETIC_SHAPE, SYNTHETIC_SEED)
  return out


@pytest.fixture
def make_synthetic(tmp_path) -> Callable[..., Path]:
  """Factory for a fresh, writable data set (for tests that damage files on purpose)."""
  counter = iter(range(1_000_000))

  def make(layout: str, num_cases: int = 2, shape=SYNTHETIC_SHAPE, seed: int = 0) -> Path:
    out = tmp_path / f"{layout}_{next(counter)}"
    synthetic.generate_dataset(out, layout, num_cases, shape, seed)
    return out

  return make


# Small preprocessing for the synthetic cases: 8 slices of 32 x 32.
SMALL_DATA = dict(slice_start=10, slice_stop=17, crop_size=32)


def small_data_config(source, data_dir, **overrides):
  """The paper's data config over `source` -> `data_dir`, with SMALL_DATA and `overrides`.

  A plain function (test modules import it from conftest), so module-scoped fixtures use it too.
  """
  from configs import brats18  # pylint: disable=g-import-not-at-top
  data = brats18.get_data_config()
  data.source_dir, data.data_dir = str(source), str(data_dir)
  for key, value in {**SMALL_DATA, **overrides}.items():
    data[key] = value
  return data


def save_untrained_run(workdir, seed: int = 0, step: int = 3, label_convention: str = "auto"):
  """A run directory holding one 'best' checkpoint of a tiny U-Net at its initial weights
  (SMALL_DATA preprocessing; trained, as it were, on data of `label_convention`, whose label
  set it outputs), as train writes it: restore_run and export read it like a trained run's,
  without a training."""
  import json  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from msatt_jax import checkpointing, steps  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.model.base_width, config.model.depth = 4, 2
  for key, value in {**SMALL_DATA, "label_convention": label_convention}.items():
    config.data[key] = value
  model = steps.create_model(config)
  state = steps.create_train_state(jax.random.key(seed), config, model,
                                   steps.create_learning_rate_fn(config, 1))
  meta = {"config": json.loads(config.to_json_best_effort()), "model": {},
          "data": {"source_dir": f"{workdir}/source", "data_dir": f"{workdir}/prepared"},
          "steps_per_epoch": 1, "step": step, "metrics": {"val_dice_mean": 0.5}}
  checkpointer = checkpointing.Checkpointer(str(workdir))
  checkpointer.save(step, state, meta, {"val_dice_mean": 0.5})
  checkpointer.wait()
  checkpointer.close()
  return str(workdir)


@pytest.fixture(scope="session")
def prepared_small(synthetic_msd, tmp_path_factory):
  """The data config of `synthetic_msd` prepared with SMALL_DATA (16 train, 8 validation and 8
  test slices). Read-only: copy the config before changing it, prepare elsewhere."""
  from data_pipelines import prepare  # pylint: disable=g-import-not-at-top
  data = small_data_config(synthetic_msd, tmp_path_factory.mktemp("prepared"))
  prepare.prepare(data, progress=lambda _: None)
  return data
