"""Cross-validation folds: patient-level shares of the non-test cases, one test split for all."""

import pytest

from configs import brats18
from data_pipelines import prepare as prepare_lib
from data_pipelines.brats import builder as builder_lib
from data_pipelines.brats import layouts
from data_pipelines.errors import DataError

from conftest import small_data_config

IDS = [f"BraTS_{i:03d}" for i in range(1, 48)]


def _folds(num_folds, seed=0, ids=IDS, **kwargs):
  return [builder_lib.split_case_ids(ids, seed, num_folds=num_folds, fold=k, **kwargs)
          for k in range(num_folds)]


@pytest.mark.parametrize("num_folds", [2, 5, 7])
def test_folds_share_out_the_non_test_cases_exactly_once(num_folds):
  fixed = builder_lib.split_case_ids(IDS, seed=0)
  folds = _folds(num_folds)
  non_test = sorted(set(IDS) - set(fixed["test"]))
  shares = [f["validation"] for f in folds]
  assert sorted(c for share in shares for c in share) == non_test  # Disjoint and complete.
  assert max(map(len, shares)) - min(map(len, shares)) <= 1
  for fold in folds:
    assert fold["test"] == fixed["test"]  # The same test split in every fold and without folds.
    assert fold["train"] == sorted(set(non_test) - set(fold["validation"]))
    assert all(v == sorted(v) for v in fold.values())


def test_folds_are_seeded_and_ignore_the_validation_size():
  folds = _folds(5)
  assert _folds(5, ids=list(reversed(IDS))) == folds  # Any input order.
  assert _folds(5, seed=1) != folds
  assert _folds(5, num_validation=3) == folds  # num_validation_cases is ignored with folds.
  assert _folds(5, num_test=4)[0]["test"] == builder_lib.split_case_ids(IDS, 0, num_test=4)["test"]


@pytest.mark.parametrize("params, message", [
    (dict(num_folds=1), "num_folds must be 0 .* or at least 2, got 1"),
    (dict(num_folds=-2), "num_folds must be 0 .* or at least 2, got -2"),
    (dict(num_folds=3, fold=3), r"fold must be one of 0\.\.2 with num_folds=3, got 3"),
    (dict(num_folds=3, fold=-1), r"fold must be one of 0\.\.2 with num_folds=3, got -1"),
    (dict(fold=1), "fold=1 needs num_folds >= 2"),
])
def test_bad_fold_settings_are_refused(params, message):
  with pytest.raises(ValueError, match=message):
    builder_lib.make_config(**params)
  with pytest.raises(ValueError, match=message):
    builder_lib.split_case_ids(IDS, 0, **{"num_folds": 0, "fold": 0, **params})


def test_more_folds_than_non_test_cases_are_refused():
  ids = IDS[:6]  # 5 non-test cases.
  assert len(_folds(5, ids=ids)) == 5
  with pytest.raises(DataError, match="num_folds=6 is more folds than the 5 non-test case"):
    builder_lib.split_case_ids(ids, 0, num_folds=6, fold=0)


def test_each_fold_is_its_own_prepared_data_set():
  names = {builder_lib.make_config(num_folds=5, fold=k).name for k in range(5)}
  assert len(names) == 5 and "default" not in names
  # The fixed split spelled out is the paper's config.
  data = brats18.get_data_config()
  data.num_folds, data.fold = 0, 0
  assert builder_lib.config_from_data_config(data).name == "default"


def test_a_fold_is_prepared_with_its_split(make_synthetic, tmp_path):
  source = make_synthetic("msd", num_cases=5)
  data = small_data_config(source, tmp_path / "prepared", num_folds=2, fold=1)
  builder = prepare_lib.prepare(data, progress=lambda _: None)
  ids = [r.case_id for r in layouts.find_cases(source)]
  splits = builder.info.metadata["splits"]
  assert splits == builder_lib.split_case_ids(ids, 0, num_folds=2, fold=1)
  assert splits["test"] == builder_lib.split_case_ids(ids, 0)["test"]
  assert builder.info.metadata["preprocessing"]["num_folds"] == 2
  assert builder.builder_config.name == builder_lib.make_config(
      slice_start=10, slice_stop=17, crop_size=32, num_folds=2, fold=1).name
