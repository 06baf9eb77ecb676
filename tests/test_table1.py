"""Table I in one command: the statistics, bad input, and the small preset end to end.

The end-to-end experiment (configs/table1_test.py: four tiny models, 6 steps each, 3 test
cases) runs the real command in subprocesses: killed with SIGKILL in the middle of its second
run, completed by the same command, then run once more, which must train nothing and rewrite
the same files. Every number of its table1.md and table1.json is then recomputed from the
runs' own per_case.csv files. The processes after the kill share a persistent JAX
compilation cache: most of their time is compilation, done once.
"""

import csv
import json
import re
import signal
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np
import pytest
from scipy import stats as scipy_stats

from benchmarks import faults as fault_lib
from configs import brats18
from msatt_jax.experiments import planning
from msatt_jax.experiments import records
from msatt_jax.experiments import report
from msatt_jax.experiments import runner
from msatt_jax.experiments import stats

import helpers

REPO = fault_lib.REPO
TEST_CONFIG = "configs/table1_test.py"
MODELS = ("msconvlstm_att", "unet", "attunet", "fcn")
OUTPUTS = ("table1.md", "table1.json", "per_case.csv", "curves.png", "fig7.png")


# ------------------------------------------------------------------------------ statistics


def test_summary_over_cases_and_seeds():
  s = stats.summarize([[0.5, 0.7, 0.9], [0.6, 0.8, 1.0]])
  assert s["mean"] == pytest.approx(0.75) and s["n"] == 3
  assert s["sd_cases"] == pytest.approx(np.std([0.55, 0.75, 0.95], ddof=1))
  assert s["sd_seeds"] == pytest.approx(np.std([0.7, 0.8], ddof=1))
  assert s["per_seed"] == pytest.approx([0.7, 0.8])
  assert stats.summarize([[0.5, 0.7]])["sd_seeds"] is None
  assert stats.summarize([[0.5], [0.7]])["sd_cases"] is None


def test_paired_comparison_matches_scipy_and_the_normal_interval():
  rng = np.random.default_rng(3)
  reference = rng.uniform(0.6, 0.9, 200)
  values = reference + rng.normal(0.02, 0.05, 200)
  result = stats.paired(values, reference)
  d = values - reference
  assert result["mean_difference"] == pytest.approx(d.mean())
  assert result["p_value"] == scipy_stats.wilcoxon(d).pvalue
  assert result["significant"] == (result["p_value"] < 0.05)
  # With 200 cases the bootstrap interval is close to the normal one, mean ± 1.96 SE.
  half = 1.96 * d.std(ddof=1) / np.sqrt(d.size)
  assert result["ci_low"] == pytest.approx(d.mean() - half, abs=0.15 * half)
  assert result["ci_high"] == pytest.approx(d.mean() + half, abs=0.15 * half)
  assert stats.paired(values, reference) == result  # Seeded: the same interval every time.
  constant = stats.paired([0.7, 0.8, 0.9], [0.6, 0.7, 0.8])
  assert constant["ci_low"] == pytest.approx(0.1) and constant["ci_high"] == pytest.approx(0.1)


def test_all_zero_differences_and_the_smallest_p():
  same = stats.paired([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
  assert same["p_value"] == 1.0 and not same["significant"]
  assert same["mean_difference"] == 0 and same["ci_low"] == same["ci_high"] == 0
  one = stats.paired([0.75], [0.5])  # One case: every resample is that case's difference.
  assert one["ci_low"] == one["ci_high"] == 0.25 and one["p_value"] == 1.0
  for n in (3, 6):
    assert stats.smallest_p(n) == pytest.approx(scipy_stats.wilcoxon(np.arange(1, n + 1)).pvalue)
  with pytest.raises(ValueError, match="equal, non-empty"):
    stats.paired([0.5, 0.6], [0.5])


# ------------------------------------------------------------------------ flags and the plan


def test_flag_lists_parse_or_name_the_flag():
  assert planning.parse_names("models", "unet, fcn", brats18.MODEL_NAMES) == ["unet", "fcn"]
  assert planning.parse_names("ablations", "", planning.ABLATIONS, allow_empty=True) == []
  for text, match in (("vnet", "--models: unknown name.*'vnet'"), ("", "--models: give"),
                      ("unet,unet", "--models: .* twice")):
    with pytest.raises(ValueError, match=match):
      planning.parse_names("models", text, brats18.MODEL_NAMES)
  with pytest.raises(ValueError, match="--ablations: unknown name.*'none'"):
    planning.parse_names("ablations", "no_sam,none", planning.ABLATIONS)
  assert planning.parse_seeds("0, 1,2") == [0, 1, 2]
  for text in ("0,a", "", "1.5", "0,,1", "1,1", "-1"):
    with pytest.raises(ValueError, match="--seeds"):
      planning.parse_seeds(text)


def test_plan_names_each_run_and_applies_the_overrides_to_every_config():
  runs = planning.plan(TEST_CONFIG, {"num_epochs": 1, "model.lstm_features": 2},
                     ["msconvlstm_att", "unet"], ["no_sam"], [0, 3], "/w")
  assert [r.name for r in runs] == [
      "msconvlstm_att_seed0", "msconvlstm_att_seed3", "unet_seed0", "unet_seed3",
      "msconvlstm_att-no_sam_seed0", "msconvlstm_att-no_sam_seed3"]
  assert [r.seed for r in runs] == [r.config.seed for r in runs] == [0, 3] * 3
  assert all(r.config.num_epochs == 1 and r.workdir == f"/w/{r.name}" for r in runs)
  assert [r.config.model.get("ablation") for r in runs] == ["none"] * 2 + [None] * 2 + \
      ["no_sam"] * 2
  assert runs[0].config.model.lstm_features == 2 and "lstm_features" not in runs[2].config.model
  assert runs[2].config.model.base_width == 4  # The config file's own value for the U-Net.
  for overrides, models, ablations, match in (
      ({"seed": 1}, ["unet"], [], "--config.seed: .* --seeds"),
      ({"model.ablation": "no_se"}, ["msconvlstm_att"], [], "--ablations"),
      ({"nothere": 1}, ["unet"], [], "--config.nothere"),
      ({}, ["unet"], ["no_sam"], "--ablations: .* must include msconvlstm_att")):
    with pytest.raises(ValueError, match=match):
      planning.plan(TEST_CONFIG, overrides, models, ablations, [0], "/w")
  with pytest.raises(ValueError, match="--config: give the file without"):
    planning.plan(TEST_CONFIG + ":unet", {}, ["unet"], [], [0], "/w")


def test_training_speed_from_the_logged_rates():
  rows = [{"step": 2, "slices_per_second": 1.0}, {"step": 2, "val_dice_mean": 0.5},
          {"step": 4, "slices_per_second": 8.0}, {"step": 6, "slices_per_second": 4.0}]
  seconds, rate = records.training_speed(rows, batch_size=4)
  assert seconds == pytest.approx(2 * 4 / 1 + 2 * 4 / 8 + 2 * 4 / 4)
  assert rate == 6.0  # The median without the first (compiling) interval.


# ------------------------------------------------------ checking a table against its cases


def _cells(markdown: str, first: str) -> List[str]:
  """The cells after the first of the table rows whose first cell is `first`."""
  rows = [line for line in markdown.splitlines()
          if line.startswith("| ") and line.split(" | ")[0][2:] == first]
  assert rows, f"no row {first!r} in:\n{markdown}"
  return [row[2:-2].split(" | ")[1:] for row in rows]


def _numbers(cell: str) -> List[float]:
  return [float(x) for x in re.findall(r"[-+]?\d+(?:\.\d+)?", cell.replace(",", ""))]


def _assert_shown(cell: str, expected: Sequence[float], decimals: int) -> None:
  shown = _numbers(cell)
  assert len(shown) == len(expected), (cell, expected)
  for s, e in zip(shown, expected):
    assert abs(s - e) <= 0.5 * 10**-decimals + 1e-12, (cell, expected)


def _recomputed(runs: Sequence[Mapping[str, Any]], key: str, cases: Sequence[str]) -> np.ndarray:
  """(seeds, cases) of one score; the region mean is recomputed from the three regions."""
  out = []
  for rows in runs:
    by_case = {r["case"]: r for r in rows}
    if key.endswith("_mean"):
      metric = key[:-len("_mean")]
      out.append([np.mean([by_case[c][f"{metric}_{r}"] for r in ("ET", "WT", "TC")])
                  for c in cases])
    else:
      out.append([by_case[c][key] for c in cases])
  return np.asarray(out)


def _sections(markdown: str) -> Tuple[str, str]:
  """(the voxel-wise part, the lesion-wise sections) of a table1.md."""
  voxel: List[str] = []
  lesion: List[str] = []
  part = voxel
  for line in markdown.splitlines():
    if line.startswith("#"):
      part = lesion if "lesion-wise" in line.lower() else voxel
    part.append(line)
  return "\n".join(voxel), "\n".join(lesion)


def check_table(table: Mapping[str, Any], markdown: str,
                per_run: Mapping[str, Sequence[Mapping[str, Any]]]) -> int:
  """Asserts that every number of table1.json and table1.md equals the one recomputed from
  the runs' per-case rows (`per_run`: run name -> rows), the lesion-wise ones too when the
  rows have them (and that no lesion-wise number appears when they do not); returns how many
  were checked."""
  lesion = all(f"lesion_dice_{r}" in row for rows in per_run.values() for row in rows
               for r in ("ET", "WT", "TC"))
  if not lesion:
    assert not [k for k in table if "lesion" in k] and "lesion" not in markdown.lower()
    for entry in table["models"] + table["ablations"]:
      assert not [k for k in entry if "lesion" in k]
  markdown, lesion_markdown = _sections(markdown)
  assert bool(lesion_markdown) == lesion
  runs_of = {}
  for r in table["runs"]:
    runs_of.setdefault(r["variant"], []).append(r)
  cases = sorted(next(iter(per_run.values())), key=lambda r: r["case"])
  cases = [r["case"] for r in cases]
  assert table["cases"] == cases
  rows_of = lambda v: [per_run[r["run"]] for r in sorted(runs_of[v], key=lambda r: r["seed"])]
  checked = 0
  for entry in table["models"] + table["ablations"]:
    v = entry["variant"]
    dice_cells = _cells(markdown, f"{entry['name']} (ours)")
    hd95_cells = [cells for cells in _cells(markdown, entry["name"]) if len(cells) == 4]
    assert hd95_cells
    # Lesion-wise Dice then HD95, side by side in one row.
    lesion_cells = ([cells for cells in _cells(lesion_markdown, entry["name"]) if len(cells) == 8]
                    if lesion else [])
    assert bool(lesion_cells) == lesion
    shown = {"dice": (3, dice_cells, 0), "hd95": (2, hd95_cells, 0),
             "lesion_dice": (3, lesion_cells, 0), "lesion_hd95": (2, lesion_cells, 4)}
    for metric in ("dice", "hd95") + (("lesion_dice", "lesion_hd95") if lesion else ()):
      decimals, rows, offset = shown[metric]
      for i, column in enumerate(report.COLUMNS):
        values = _recomputed(rows_of(v), f"{metric}_{column}", cases)
        s = entry[metric][column]
        assert s["mean"] == pytest.approx(values.mean(), rel=1e-12, abs=1e-12)
        expected = [values.mean()]
        sd_cases = np.std(values.mean(axis=0), ddof=1)
        assert s["sd_cases"] == pytest.approx(sd_cases, rel=1e-12, abs=1e-12)
        expected.append(sd_cases)
        if values.shape[0] > 1:
          assert s["sd_seeds"] == pytest.approx(np.std(values.mean(axis=1), ddof=1), rel=1e-12)
          expected.append(s["sd_seeds"])
        else:
          assert s["sd_seeds"] is None
        for cells in rows:
          _assert_shown(cells[offset + i], expected, decimals)
        checked += 1
    runs = runs_of[v]
    assert entry["train_seconds"] == pytest.approx(np.mean([r["train_seconds"] for r in runs]))
    for cells in dice_cells:
      _assert_shown(cells[4], [entry["num_params"]], 0)
      assert cells[5] == f"{entry['forward_gflop_per_slice']:.3g}"
      assert cells[6] == report.duration(entry["train_seconds"])
      _assert_shown(cells[7], [entry["train_slices_per_second"]], 1)
  for name, values in table["paper"].items():
    (cells,) = _cells(markdown, f"{report.display_name(name)} (paper)")
    for i, column in enumerate(report.COLUMNS):
      paper = report.PAPER[name][column]
      assert values[column] == paper
      if paper is None:
        assert cells[i] == "not reported"
      else:
        _assert_shown(cells[i], [paper], 4 if column == "mean" else 3)
  compared = [(c, markdown, "dice") for c in table["comparisons"] + table["ablation_comparisons"]]
  compared += [(c, lesion_markdown, "lesion_dice") for c in table.get("lesion_comparisons", [])
               + table.get("ablation_lesion_comparisons", [])]
  for c, text, metric in compared:
    assert c["metric"] == metric
    key = f"{c['metric']}_{c['region']}"
    d = (_recomputed(rows_of(c["variant"]), key, cases).mean(axis=0) -
         _recomputed(rows_of(report.REFERENCE), key, cases).mean(axis=0))
    assert c["mean_difference"] == pytest.approx(d.mean(), rel=1e-12, abs=1e-12)
    p = 1.0 if not np.any(d != 0) else scipy_stats.wilcoxon(d).pvalue
    assert c["p_value"] == p and c["significant"] == (p < 0.05) and c["n"] == len(cases)
    # The documented bootstrap: scipy's percentile interval, 10,000 resamples, default_rng(0).
    low, high = scipy_stats.bootstrap((d,), np.mean, n_resamples=10_000, method="percentile",
                                      rng=np.random.default_rng(0)).confidence_interval
    assert (c["ci_low"], c["ci_high"]) == pytest.approx((low, high), rel=1e-12, abs=1e-12)
    region = "Mean" if c["region"] == "mean" else c["region"]
    (cells,) = [cells for cells in _cells(text, c["name"])
                if len(cells) == 5 and cells[0] == region]
    _assert_shown(cells[1], [d.mean()], 4)
    _assert_shown(cells[2], [low, high], 4)
    assert cells[3] == f"{p:.3g}" and cells[4] == str(len(cases))
    checked += 1
  for comparisons, text, what in (
      (table["comparisons"], markdown, "Dice"),
      (table["ablation_comparisons"], markdown, "Dice"),
      (table.get("lesion_comparisons"), lesion_markdown, "lesion-wise Dice"),
      (table.get("ablation_lesion_comparisons"), lesion_markdown, "lesion-wise Dice")):
    if comparisons:
      assert report.significance_sentence(comparisons, len(cases), what) in text
      assert "scipy.stats.bootstrap, method 'percentile', 10,000 resamples" in text
  assert table["statistics"]["bootstrap_method"] == "percentile"
  return checked


def _fake_rows(rng, cases, quality, lesion=False):
  """Per-case rows as the evaluator writes them (with lesion=True, as under gli2023)."""
  metrics = ("dice", "hd95") + (("lesion_dice", "lesion_hd95") if lesion else ())
  rows = [{"case": c, **{f"{m}_{r}": (float(np.clip(quality + rng.normal(0, 0.05), 0, 1))
                                      if m.endswith("dice") else float(rng.uniform(2, 30)))
                         for m in metrics for r in ("ET", "TC", "WT")}}
          for c in cases]
  if lesion:
    for row in rows:
      row.update({"lesion_rules": "gli2023", **{f"lesions_{k}_{r}": float(rng.integers(0, 3))
                                                for k in ("tp", "fn", "fp")
                                                for r in ("ET", "TC", "WT")}})
  return rows


def _fake_results(rng, cases, lesion=False):
  results, per_run = [], {}
  for variant, quality in (("msconvlstm_att", 0.8), ("unet", 0.7),
                           ("msconvlstm_att-no_sam", 0.78)):
    for seed in (0, 1):
      rows = _fake_rows(rng, cases, quality, lesion)
      name = f"{variant}_seed{seed}"
      per_run[name] = rows
      results.append(report.RunResult(name, variant, seed, 10, f"{name}/per_case.csv", rows,
                                      100.0 + seed, 20.0 + seed))
  return results, per_run


FIGURES = {v: {"num_params": 1000, "forward_gflop_per_slice": 0.5}
           for v in ("msconvlstm_att", "unet", "msconvlstm_att-no_sam")}


def test_report_with_seeds_and_ablations_recomputes_from_the_cases():
  rng = np.random.default_rng(0)
  cases = [f"case_{i}" for i in range(8)]
  results, per_run = _fake_results(rng, cases)
  table = report.build(results, ["msconvlstm_att", "unet"], ["no_sam"], FIGURES,
                       {"seeds": [0, 1]})
  markdown = report.markdown(table)
  assert "## Ablations of MSConvLSTM-Att" in markdown and "(± " in markdown
  assert "MSConvLSTM-Att without SAM (ours)" in markdown
  assert check_table(table, markdown, per_run) == 2 * 4 * 3 + 4 + 4
  assert "distinguishable from zero" in markdown
  rows = report.per_case_rows(results)
  assert len(rows) == 6 * len(cases) and rows[0]["dice_mean"] == pytest.approx(
      np.mean([per_run["msconvlstm_att_seed0"][0][f"dice_{r}"] for r in ("ET", "WT", "TC")]))


def test_lesion_wise_scores_join_the_tables_with_the_same_statistics():
  rng = np.random.default_rng(1)
  cases = [f"BraTS-GLI-{i:05d}-000" for i in range(8)]
  results, per_run = _fake_results(rng, cases, lesion=True)
  rules = {"requested": "auto", "rules": {"gli2023": "gli2023: the rules in words"}}
  table = report.build(results, ["msconvlstm_att", "unet"], ["no_sam"], FIGURES,
                       {"seeds": [0, 1], "lesion_rules": rules})
  markdown = report.markdown(table)
  # Dice and HD95, voxel- and lesion-wise, 4 columns x 3 variants; Dice comparisons of U-Net and
  # the ablation, 4 columns each, voxel- and lesion-wise.
  assert check_table(table, markdown, per_run) == 4 * 4 * 3 + 2 * (4 + 4)
  assert table["lesion_rules"] == rules
  assert [c["variant"] for c in table["lesion_comparisons"]] == ["unet"] * 4
  assert "## Lesion-wise Dice and HD95 (BraTS 2023+)" in markdown
  assert "## Ablations of MSConvLSTM-Att: lesion-wise Dice and HD95" in markdown
  assert "Lesion rules (--lesion_rules=auto): gli2023: the rules in words." in markdown
  assert "| Model | Lesion Dice ET | Lesion Dice WT | Lesion Dice TC | Lesion Dice Mean | " \
         "Lesion HD95 ET |" in markdown
  rows = report.per_case_rows(results)
  first = per_run["msconvlstm_att_seed0"][0]
  assert rows[0]["lesion_dice_mean"] == pytest.approx(
      np.mean([first[f"lesion_dice_{r}"] for r in ("ET", "WT", "TC")]))
  assert sorted(k for k in rows[0] if "lesion" in k) == sorted(
      f"{m}_{c}" for m in ("lesion_dice", "lesion_hd95") for c in ("ET", "WT", "TC", "mean"))
  # With lesion-wise scores for only some cases the table refuses.
  results[0].rows[0] = {k: v for k, v in results[0].rows[0].items() if "lesion" not in k}
  with pytest.raises(ValueError, match="Only some runs' test cases have lesion-wise scores"):
    report.build(results, ["msconvlstm_att", "unet"], [], FIGURES, {"seeds": [0, 1]})


def test_per_case_csv_with_lesion_rules_reads_back(tmp_path):
  from msatt_jax import reporting  # pylint: disable=g-import-not-at-top
  path = tmp_path / "per_case.csv"
  reporting.write_csv(str(path), [
      {"case": "BraTS-MET-00001-000", "dice_ET": 0.5, "lesion_rules": "met2023",
       "lesion_dice_ET": 0.25},
      {"case": "BraTS-MET-00002-000", "dice_ET": 0.75}])  # A case without: empty cells.
  assert records.read_per_case(str(path)) == [
      {"case": "BraTS-MET-00001-000", "dice_ET": 0.5, "lesion_rules": "met2023",
       "lesion_dice_ET": 0.25},
      {"case": "BraTS-MET-00002-000", "dice_ET": 0.75}]


def test_lesion_rules_resolve_per_test_case_as_evaluate_does(monkeypatch):
  test_cases = {}
  monkeypatch.setattr(runner.input_pipeline, "split_cases", lambda data, split: test_cases[split])
  test_cases["test"] = ["BraTS-MET-00001-000", "BraTS-MET-00002-000"]
  assert runner.lesion_rules_of_test_cases(None, "auto") == {
      "BraTS-MET-00001-000": "met2023", "BraTS-MET-00002-000": "met2023"}
  assert runner.lesion_rules_of_test_cases(None, "gli2023") == {
      "BraTS-MET-00001-000": "gli2023", "BraTS-MET-00002-000": "gli2023"}
  assert runner.lesion_rules_of_test_cases(None, "off") == {}
  test_cases["test"] = ["BraTS-GLI-00001-000"]  # Runs of a 2024 label set: the 2024 rules.
  assert runner.lesion_rules_of_test_cases(None, "auto") == {"BraTS-GLI-00001-000": "gli2023"}
  assert runner.lesion_rules_of_test_cases(None, "auto", "glioma_rc") == {
      "BraTS-GLI-00001-000": "gli2024"}
  test_cases["test"] = ["BRATS_001", "BRATS_002"]  # Older names: auto scores none.
  assert runner.lesion_rules_of_test_cases(None, "auto") == {}
  assert runner.lesion_rules_of_test_cases(None, "met2023") == {
      "BRATS_001": "met2023", "BRATS_002": "met2023"}
  test_cases["test"] = ["BraTS-GLI-00001-000", "BRATS_002", "BRATS_003"]
  with pytest.raises(ValueError, match=re.escape(
      "--lesion_rules=auto gives a lesion rule set to 1 of the 3 test cases (not to BRATS_002, "
      "BRATS_003); Table I scores every case alike")):
    runner.lesion_rules_of_test_cases(None, "auto")


def test_an_evaluation_is_reused_only_under_the_same_lesion_rules(tmp_path):
  from msatt_jax import reporting  # pylint: disable=g-import-not-at-top
  scored = {"BraTS-GLI-00001-000": "gli2023"}
  assert not runner._evaluation_exists(str(tmp_path), {})  # Nothing there.
  reporting.write_csv(str(tmp_path / "per_case.csv"), [{"case": "BraTS-GLI-00001-000"}])
  reporting.write_json(str(tmp_path / "summary.json"), {"metrics": {}})  # Older: no rules.
  assert runner._evaluation_exists(str(tmp_path), {})
  assert not runner._evaluation_exists(str(tmp_path), scored)
  reporting.write_json(str(tmp_path / "summary.json"),
                       {"lesion_rules": {"requested": "auto", "cases": scored}})
  assert runner._evaluation_exists(str(tmp_path), scored)
  assert not runner._evaluation_exists(str(tmp_path), {})
  assert not runner._evaluation_exists(str(tmp_path), {"BraTS-GLI-00001-000": "met2023"})


# ------------------------------------------------------------------------ end to end


def _command(workdir: Path, *args: str) -> List[str]:
  return [sys.executable, "-m", "msatt_jax.experiments.table1", f"--config={TEST_CONFIG}",
          f"--workdir={workdir}", *args]


def _files(folder: Path) -> Dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
          if p.is_file()}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
  """The small preset: killed in its second run, completed, then run again. Returns
  (workdir, env, logs, files of the first run before the completion, outputs after it)."""
  root = tmp_path_factory.mktemp("table1")
  workdir = root / "runs"
  env = fault_lib.process_env(root / "jax_cache")
  logs = {name: root / f"{name}.log" for name in ("killed", "completed", "again")}
  # A cache of its own: JAX writes a cache entry in place, so a kill -9 in the middle of a write
  # would leave a truncated entry for the next process to read.
  killed_env = fault_lib.process_env(root / "jax_cache_killed")
  proc = fault_lib.start(_command(workdir), killed_env, logs["killed"], cwd=REPO)
  second = workdir / "unet_seed0" / records.RUN_RECORD
  if not fault_lib.wait_for(second.exists, proc):
    proc.kill()
    pytest.fail(f"the second run never started:\n{logs['killed'].read_text()[-3000:]}")
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  first_run = _files(workdir / "msconvlstm_att_seed0")
  rc, completed = fault_lib.run(_command(workdir), env, logs["completed"], cwd=REPO)
  assert rc == 0, completed[-3000:]
  outputs = {name: (workdir / name).read_bytes() for name in OUTPUTS}
  runs_after = {f"{m}_seed0": _files(workdir / f"{m}_seed0") for m in MODELS}
  rc, again = fault_lib.run(_command(workdir), env, logs["again"], cwd=REPO)
  assert rc == 0, again[-3000:]
  return {"workdir": workdir, "env": env, "killed": logs["killed"].read_text(),
          "completed": completed, "again": again, "first_run": first_run, "outputs": outputs,
          "runs_after": runs_after}


@pytest.mark.slow
def test_killed_experiment_completes_and_a_rerun_trains_nothing(experiment):
  workdir = experiment["workdir"]
  assert "killed" not in experiment["completed"]
  assert "4 runs: 1 finished earlier (skipped), 3 to train." in experiment["completed"]
  # The finished run was not touched by the completing invocation (only evaluated).
  after = experiment["runs_after"]["msconvlstm_att_seed0"]
  assert {k: v for k, v in after.items() if not k.startswith("eval_")} == experiment["first_run"]
  for model in MODELS:
    assert (workdir / f"{model}_seed0" / records.DONE_MARKER).exists()
  again = experiment["again"]
  assert "4 runs: 4 finished earlier (skipped), 0 to train." in again
  assert "Training " not in again and "evaluating " not in again
  assert {name: (workdir / name).read_bytes() for name in OUTPUTS} == experiment["outputs"]
  for model in MODELS:
    assert _files(workdir / f"{model}_seed0") == experiment["runs_after"][f"{model}_seed0"]
  assert "| MSConvLSTM-Att (ours) |" in again  # The table is printed.


@pytest.mark.slow
def test_every_number_equals_the_one_recomputed_from_the_runs_per_case_csv(experiment):
  workdir = experiment["workdir"]
  table = json.loads((workdir / "table1.json").read_text())
  markdown = (workdir / "table1.md").read_text()
  per_run = {r["run"]: records.read_per_case(str(workdir / r["per_case_csv"]))
             for r in table["runs"]}
  assert sorted(per_run) == sorted(f"{m}_seed0" for m in MODELS)
  assert check_table(table, markdown, per_run) == 4 * 4 * 2 + 3 * 4
  with open(workdir / "per_case.csv", newline="") as f:
    combined = list(csv.DictReader(f))
  assert len(combined) == 4 * table["num_cases"] == 12
  for row in combined:
    source = {r["case"]: r for r in per_run[row["run"]]}[row["case"]]
    for key in ("dice_ET", "dice_WT", "dice_TC", "hd95_ET", "hd95_WT", "hd95_TC"):
      assert float(row[key]) == source[key]
  for r in table["runs"]:
    assert r["checkpoint_step"] in (3, 6)
    seconds, rate = records.training_speed(records.read_metrics(str(workdir / r["run"])), 8)
    assert (r["train_seconds"], r["slices_per_second"]) == (seconds, rate) and seconds > 0
  assert "not reported" in markdown and "FCN (paper)" in markdown
  # Older data (MSD names, --lesion_rules=auto): no lesion-wise column anywhere.
  assert "lesion" not in markdown.lower() and "lesion" not in json.dumps(table)
  assert not [k for k in combined[0] if "lesion" in k]
  experiment_record = json.loads((workdir / records.EXPERIMENT_RECORD).read_text())
  assert experiment_record["split"]["test"] == table["cases"]
  for name in ("curves.png", "fig7.png"):
    assert (workdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_bad_input_is_one_error_line_and_changes_nothing(experiment, tmp_path):
  """The command line's error path (other data settings, a seed list that does not parse)."""
  workdir, env = experiment["workdir"], experiment["env"]
  before = _files(workdir)
  fresh = tmp_path / "fresh"
  cases = {
      "data": (_command(workdir, "--config.data.slice_start=9"),
               f"error: {workdir / records.EXPERIMENT_RECORD}: .* other data settings "
               r"\(preprocessing.slice_start: recorded 8, now 9\)"),
      "seeds": (_command(fresh, "--seeds=0,one"), "error: --seeds: '0,one' is not"),
  }
  procs = {name: fault_lib.start(argv, env, tmp_path / f"{name}.log", cwd=REPO)
           for name, (argv, _) in cases.items()}
  for name, (_, pattern) in cases.items():
    text = fault_lib.finish(procs[name], tmp_path / f"{name}.log")
    assert procs[name].returncode == 1, (name, text[-3000:])
    assert re.match(pattern, helpers.one_error_line(text)), (name, helpers.one_error_line(text))
  assert _files(workdir) == before
  assert not fresh.exists()


def _plan(workdir: Path, overrides=None, models=("unet",)):
  runs = planning.plan(TEST_CONFIG, overrides or {}, list(models), [], [0], str(workdir))
  return runs, planning.data_identity(runs[0].config.data)


@pytest.mark.slow
def test_run_folders_of_another_config_or_origin_and_another_split_are_refused(experiment,
                                                                               tmp_path):
  workdir = experiment["workdir"]
  other = tmp_path / "other"
  (other / "unet_seed0").mkdir(parents=True)
  (other / "unet_seed0" / records.RUN_RECORD).write_bytes(
      (workdir / "unet_seed0" / records.RUN_RECORD).read_bytes())
  runs, identity = _plan(other, {"num_epochs": 3})
  with pytest.raises(ValueError, match=re.escape(f"{other / 'unet_seed0'}: this run was trained "
                                                 "with another config (num_epochs: recorded 2, "
                                                 "now 3)")):
    records.check_workdir(str(other), runs, identity)
  assert records.check_workdir(str(other), *_plan(other)) is None  # The same config: accepted.
  foreign = tmp_path / "foreign"
  (foreign / "unet_seed0" / "checkpoints").mkdir(parents=True)
  with pytest.raises(ValueError, match="unet_seed0: holds files this experiment did not write"):
    records.check_workdir(str(foreign), *_plan(foreign))
  assert sorted(p.name for p in other.iterdir()) == sorted(p.name for p in foreign.iterdir()) \
      == ["unet_seed0"]
  # An experiment record whose split is not the prepared data's.
  record = json.loads((workdir / records.EXPERIMENT_RECORD).read_text())
  record["split"]["test"] = record["split"]["test"][:-1]
  moved = tmp_path / "moved"
  runs, identity = _plan(moved, {"data.data_dir": record["data_dir"]})
  with pytest.raises(ValueError, match="patient split differs"):
    runner.prepare_data(str(moved), runs, identity, record)
  assert not (moved / records.EXPERIMENT_RECORD).exists()


@pytest.mark.slow
def test_lesion_wise_table_on_2023_named_data_and_off_again(tmp_path):
  """One tiny model on 2023-named (GLI) synthetic cases: --lesion_rules=auto scores them
  under gli2023, every number recomputed from the run's per_case.csv; the same workdir with
  --lesion_rules=off evaluates again and shows no lesion-wise number."""
  workdir = tmp_path / "runs"
  env = fault_lib.process_env(tmp_path / "jax_cache")
  argv = _command(workdir, "--models=unet", "--config.data.synthetic_layout=brats2023")
  rc, text = fault_lib.run(argv, env, tmp_path / "auto.log", cwd=REPO)
  assert rc == 0, text[-3000:]
  table = json.loads((workdir / "table1.json").read_text())
  markdown = (workdir / "table1.md").read_text()
  assert table["lesion_rules"]["requested"] == "auto"
  assert list(table["lesion_rules"]["rules"]) == ["gli2023"]
  assert all(c.startswith("BraTS-GLI-") for c in table["cases"])
  (run,) = table["runs"]
  per_run = {run["run"]: records.read_per_case(str(workdir / run["per_case_csv"]))}
  assert check_table(table, markdown, per_run) == 4 * 4  # Dice, HD95, lesion Dice and HD95.
  for stat in ("lesion_dice", "lesion_hd95"):
    assert all(s["n"] == 3 for s in table["models"][0][stat].values())
  assert 0 <= table["models"][0]["lesion_dice"]["mean"]["mean"] <= 1
  assert "## Lesion-wise Dice and HD95 (BraTS 2023+)" in markdown
  with open(workdir / "per_case.csv", newline="") as f:
    combined = list(csv.DictReader(f))
  source = {r["case"]: r for r in per_run[run["run"]]}
  for row in combined:
    for r in ("ET", "WT", "TC"):
      assert float(row[f"lesion_dice_{r}"]) == source[row["case"]][f"lesion_dice_{r}"]
      assert float(row[f"lesion_hd95_{r}"]) == source[row["case"]][f"lesion_hd95_{r}"]

  rc, text = fault_lib.run(argv + ["--lesion_rules=off"], env, tmp_path / "off.log", cwd=REPO)
  assert rc == 0, text[-3000:]
  assert "1 finished earlier (skipped), 0 to train." in text
  assert "evaluating unet_seed0" in text  # The evaluation under gli2023 is not reused.
  table = json.loads((workdir / "table1.json").read_text())
  markdown = (workdir / "table1.md").read_text()
  per_run = {run["run"]: records.read_per_case(str(workdir / run["per_case_csv"]))}
  assert check_table(table, markdown, per_run) == 2 * 4  # Asserts no lesion-wise number too.
  assert "lesion" not in (workdir / "per_case.csv").read_text().splitlines()[0]
