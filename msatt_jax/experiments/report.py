"""Table I from the evaluated runs: the numbers (table1.json), the cases (per_case.csv) and the
tables (table1.md), each computed once here from the runs' per-case scores.

The paper's numbers sit beside ours. Our copy of the paper's Table I is garbled: its per-region
rows of U-Net, Att-UNet and MSConvLSTM-Att are legible, FCN's are not, and its mean column is
mixed up, so the means are the abstract's (79.78 / 78.61 / 73.65 / 72.89; Section IV gives
79.87 for MSConvLSTM-Att).
"""

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from msatt_jax.experiments import stats

REFERENCE = "msconvlstm_att"  # What every model and ablation is compared with.
REGIONS = ("ET", "WT", "TC")  # The paper's column order.
COLUMNS = REGIONS + ("mean",)  # 'mean': per case, the mean of the three regions.
METRICS = ("dice", "hd95")
# BraTS 2023+ lesion-wise scores (msatt_jax.metrics), in the tables when the runs' evaluations
# hold them (table1 --lesion_rules).
LESION_METRICS = ("lesion_dice", "lesion_hd95")
# The paper's Dice (fractions): per region from Table I, the means from the abstract; None where
# our copy does not report it.
PAPER = {
    "msconvlstm_att": {"ET": 0.649, "WT": 0.881, "TC": 0.865, "mean": 0.7978},
    "unet": {"ET": 0.563, "WT": 0.848, "TC": 0.797, "mean": 0.7365},
    "attunet": {"ET": 0.637, "WT": 0.875, "TC": 0.845, "mean": 0.7861},
    "fcn": {"ET": None, "WT": None, "TC": None, "mean": 0.7289},
}
DISPLAY = {"msconvlstm_att": "MSConvLSTM-Att", "unet": "U-Net", "attunet": "Att-UNet",
           "fcn": "FCN"}
ABLATION_DISPLAY = {
    "no_convlstm": "without ConvLSTM (3x3 conv at scale 1)",
    "no_se": "without SE (Inception, ResNet)",
    "no_sam": "without SAM",
    "no_fusion": "without multi-scale fusion",
    "deepest_only": "scale-3 head only",
}
NOT_REPORTED = "not reported"


def variant_name(model: str, ablation: str = "none") -> str:
  """'unet', or 'msconvlstm_att-no_sam' for an ablation: a run folder's prefix."""
  return model if ablation == "none" else f"{model}-{ablation}"


def display_name(variant: str) -> str:
  model, _, ablation = variant.partition("-")
  name = DISPLAY.get(model, model)
  return f"{name} {ABLATION_DISPLAY.get(ablation, ablation)}" if ablation else name


@dataclasses.dataclass
class RunResult:
  """One trained and evaluated run, as the report reads it."""
  run: str  # Folder name under the experiment's workdir.
  variant: str
  seed: int
  checkpoint_step: int
  per_case_csv: str  # The evaluator's per_case.csv, relative to the experiment's workdir.
  rows: List[Dict[str, Any]]  # Its rows: 'case' and the metric_region scores.
  train_seconds: float
  slices_per_second: float


def has_lesion_scores(row: Mapping[str, Any]) -> bool:
  return all(f"{m}_{r}" in row for m in LESION_METRICS for r in REGIONS)


def case_scores(row: Mapping[str, Any]) -> Dict[str, float]:
  """A per-case row's dice_/hd95_ scores of the paper's regions, plus their per-case means;
  likewise its lesion-wise scores when it has them."""
  out = {}
  for metric in METRICS + (LESION_METRICS if has_lesion_scores(row) else ()):
    values = [float(row[f"{metric}_{r}"]) for r in REGIONS]
    out.update({f"{metric}_{r}": v for r, v in zip(REGIONS, values)})
    out[f"{metric}_mean"] = float(np.mean(values))
  return out


def per_case_rows(results: Sequence[RunResult]) -> List[Dict[str, Any]]:
  """Every run's every test case: the rows of per_case.csv."""
  return [{"variant": r.variant, "seed": r.seed, "run": r.run, "case": row["case"],
           **case_scores(row)} for r in results for row in r.rows]


def _values(runs: Sequence[RunResult], key: str, cases: Sequence[str]) -> np.ndarray:
  """(seeds, cases) values of one score, cases in the given order."""
  out = []
  for r in runs:
    by_case = {row["case"]: case_scores(row)[key] for row in r.rows}
    out.append([by_case[c] for c in cases])
  return np.asarray(out, np.float64)


def _variant_entry(variant: str, runs: Sequence[RunResult], cases: Sequence[str],
                   figures: Mapping[str, Any], metrics: Sequence[str]) -> Dict[str, Any]:
  entry = {"variant": variant, "name": display_name(variant),
           "seeds": [r.seed for r in runs], "runs": [r.run for r in runs],
           "num_params": figures.get("num_params"),
           "forward_gflop_per_slice": figures.get("forward_gflop_per_slice"),
           "train_seconds": float(np.mean([r.train_seconds for r in runs])),
           "train_slices_per_second": float(np.mean([r.slices_per_second for r in runs]))}
  for metric in metrics:
    entry[metric] = {c: stats.summarize(_values(runs, f"{metric}_{c}", cases)) for c in COLUMNS}
  return entry


def _comparisons(variants: Sequence[str], by_variant: Mapping[str, Sequence[RunResult]],
                 cases: Sequence[str], metric: str = "dice") -> List[Dict[str, Any]]:
  """A Dice (`metric`) of each variant against the reference's, per region and for the mean."""
  out = []
  for variant in variants:
    for column in COLUMNS:
      key = f"{metric}_{column}"
      values = _values(by_variant[variant], key, cases).mean(axis=0)
      reference = _values(by_variant[REFERENCE], key, cases).mean(axis=0)
      out.append({"variant": variant, "name": display_name(variant), "reference": REFERENCE,
                  "metric": metric, "region": column, **stats.paired(values, reference)})
  return out


def build(results: Sequence[RunResult], models: Sequence[str], ablations: Sequence[str],
          figures: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any]) -> Dict[str, Any]:
  """table1.json's content: every number the tables show, and where each comes from."""
  by_variant: Dict[str, List[RunResult]] = {}
  for r in results:
    by_variant.setdefault(r.variant, []).append(r)
  case_sets = {tuple(sorted(row["case"] for row in r.rows)) for r in results}
  if len(case_sets) != 1:
    raise ValueError("The runs were evaluated on different test cases; they cannot be "
                     "compared case by case.")
  cases = list(next(iter(case_sets)))
  scored = {has_lesion_scores(row) for r in results for row in r.rows}
  if len(scored) != 1:
    raise ValueError("Only some runs' test cases have lesion-wise scores; Table I needs them "
                     "for every case or none.")
  lesion = scored == {True}
  ablation_variants = [variant_name(REFERENCE, a) for a in ablations]
  entry = lambda v: _variant_entry(v, sorted(by_variant[v], key=lambda r: r.seed), cases,
                                   figures.get(v, {}), METRICS + (LESION_METRICS if lesion else ()))
  has_reference = REFERENCE in by_variant
  compared = [m for m in models if m != REFERENCE] if has_reference else []
  # Only with lesion-wise scores, so that older data's table1.json stays as it was.
  lesion_keys = {
      "lesion_comparisons": _comparisons(compared, by_variant, cases, "lesion_dice"),
      "ablation_lesion_comparisons": _comparisons(ablation_variants, by_variant, cases,
                                                  "lesion_dice"),
  } if lesion else {}
  return {
      **meta,
      "split": "test", "cases": cases, "num_cases": len(cases),
      "statistics": {"bootstrap_method": stats.BOOTSTRAP_METHOD,
                     "bootstrap_resamples": stats.BOOTSTRAP_RESAMPLES,
                     "bootstrap_seed": stats.BOOTSTRAP_SEED, "confidence": stats.CONFIDENCE,
                     "alpha": stats.ALPHA, "smallest_possible_p": stats.smallest_p(len(cases))},
      "models": [entry(v) for v in models],
      "paper": {m: PAPER[m] for m in models if m in PAPER},
      "comparisons": _comparisons(compared, by_variant, cases),
      "ablations": [entry(v) for v in ablation_variants],
      "ablation_comparisons": _comparisons(ablation_variants, by_variant, cases),
      **lesion_keys,
      "runs": [{"run": r.run, "variant": r.variant, "seed": r.seed,
                "checkpoint_step": r.checkpoint_step, "per_case_csv": r.per_case_csv,
                "train_seconds": r.train_seconds, "slices_per_second": r.slices_per_second}
               for r in results],
  }


# ------------------------------------------------------------------------------- markdown


def duration(seconds: Optional[float]) -> str:
  if seconds is None:
    return "-"
  minutes, s = divmod(int(round(seconds)), 60)
  h, m = divmod(minutes, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _stat_cell(summary: Mapping[str, Any], digits: int) -> str:
  """mean ± SD over cases, then (± SD over seeds) with several seeds."""
  text = f"{summary['mean']:.{digits}f}"
  if summary["sd_cases"] is not None:
    text += f" ± {summary['sd_cases']:.{digits}f}"
  if summary["sd_seeds"] is not None:
    text += f" (± {summary['sd_seeds']:.{digits}f})"
  return text


def _row(cells: Sequence[str]) -> str:
  return "| " + " | ".join(cells) + " |"


def _dice_table(entries: Sequence[Mapping[str, Any]], paper: Mapping[str, Mapping[str, Any]],
                label: str) -> List[str]:
  lines = [_row([label, "ET", "WT", "TC", "Mean Dice", "Parameters", "GFLOP/slice",
                 "Train time", "Train slices/s"]), _row(["---"] * 9)]
  for e in entries:
    gflop = e["forward_gflop_per_slice"]
    lines.append(_row([f"{e['name']} (ours)"] +
                      [_stat_cell(e["dice"][c], 3) for c in COLUMNS] +
                      [f"{e['num_params']:,}" if e["num_params"] is not None else "-",
                       f"{gflop:.3g}" if gflop is not None else "-",
                       duration(e["train_seconds"]), f"{e['train_slices_per_second']:.1f}"]))
    if e["variant"] in paper:
      values = paper[e["variant"]]
      lines.append(_row([f"{e['name']} (paper)"] + [
          NOT_REPORTED if values[c] is None else
          (f"{values[c]:.4f}" if c == "mean" else f"{values[c]:.3f}") for c in COLUMNS] +
                        [""] * 4))
  return lines


def _hd95_table(entries: Sequence[Mapping[str, Any]], label: str) -> List[str]:
  lines = [_row([label, "ET", "WT", "TC", "Mean"]), _row(["---"] * 5)]
  lines += [_row([e["name"]] + [_stat_cell(e["hd95"][c], 2) for c in COLUMNS]) for e in entries]
  return lines


def _lesion_table(entries: Sequence[Mapping[str, Any]], label: str) -> List[str]:
  """Lesion-wise Dice and HD95 side by side, one row per model."""
  lines = [_row([label] + [f"{name} {c if c != 'mean' else 'Mean'}"
                           for name in ("Lesion Dice", "Lesion HD95") for c in COLUMNS]),
           _row(["---"] * (1 + 2 * len(COLUMNS)))]
  lines += [_row([e["name"]] + [_stat_cell(e["lesion_dice"][c], 3) for c in COLUMNS] +
                 [_stat_cell(e["lesion_hd95"][c], 2) for c in COLUMNS]) for e in entries]
  return lines


def _lesion_section(heading: str, entries: Sequence[Mapping[str, Any]],
                    comparisons: Sequence[Mapping[str, Any]], label: str,
                    num_cases: int) -> List[str]:
  lines = ["", heading, "", *_lesion_table(entries, label)]
  if comparisons:
    lines += ["", *_comparison_table(comparisons, label, "lesion-wise Dice"), "",
              _comparison_note("lesion-wise Dice"), "",
              significance_sentence(comparisons, num_cases, "lesion-wise Dice")]
  return lines


def _comparison_table(comparisons: Sequence[Mapping[str, Any]], label: str,
                      what: str = "") -> List[str]:
  lines = [_row([label, "Region", f"Mean {what + ' ' if what else ''}difference "
                                   f"({label.lower()} - {display_name(REFERENCE)})",
                 f"{int(stats.CONFIDENCE * 100)}% bootstrap CI", "Wilcoxon p", "Cases"]),
           _row(["---"] * 6)]
  for c in comparisons:
    lines.append(_row([c["name"], "Mean" if c["region"] == "mean" else c["region"],
                       f"{c['mean_difference']:+.4f}",
                       f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]", f"{c['p_value']:.3g}",
                       str(c["n"])]))
  return lines


def significance_sentence(comparisons: Sequence[Mapping[str, Any]], num_cases: int,
                          what: str = "Dice") -> str:
  """Which differences (of `what`) are distinguishable from zero at ALPHA, in one sentence."""
  alpha = stats.ALPHA
  found = [c for c in comparisons if c["significant"]]
  if found:
    parts = [f"{c['name']} {'mean' if c['region'] == 'mean' else c['region']} "
             f"({c['mean_difference']:+.4f}, p = {c['p_value']:.3g})" for c in found]
    text = (f"At {alpha}, the {what} differences distinguishable from zero (two-sided Wilcoxon "
            f"signed-rank test, uncorrected for the {len(comparisons)} comparisons) are: "
            + "; ".join(parts) + "; the others are not.")
  else:
    text = (f"At {alpha}, none of the {len(comparisons)} {what} differences is distinguishable "
            "from zero (two-sided Wilcoxon signed-rank test, uncorrected).")
  if stats.smallest_p(num_cases) >= alpha:
    text += (f" With {num_cases} test cases no difference can reach p < {alpha}: the smallest "
             f"p-value the test can give is {stats.smallest_p(num_cases):.3g}.")
  return text


def markdown(table: Mapping[str, Any]) -> str:
  """table1.md: Table I in the paper's layout, HD95, the paired comparisons, the ablations."""
  n, seeds = table["num_cases"], table["seeds"]
  spread = (f"; in parentheses, ± SD over the {len(seeds)} seeds of the per-seed means"
            if len(seeds) > 1 else "")
  lines = [
      "# Table I: Dice of each model on the test split",
      "",
      f"{n} test cases of one patient split, the best-validation checkpoint of each run, "
      f"seed(s) {', '.join(map(str, seeds))}; 3D Dice and HD95 on the full volume with the "
      "BraTS 2018 rules.",
      "",
      *_dice_table(table["models"], table["paper"], "Model"),
      "",
      f"Ours: mean ± SD over the {n} test cases (per case, the mean over seeds){spread}. "
      "Mean Dice: per case, the mean of ET, WT and TC. GFLOP/slice: XLA's count of one forward "
      "pass of one slice. Train time: time in training steps (validation excluded, compilation "
      "included), and slices/s: the median logged training rate (the first, compiling, interval "
      "left out); both per run, from its metrics.jsonl. The paper's per-region values are "
      "its Table I; its means are the abstract's (Section IV gives 79.87 for MSConvLSTM-Att). "
      f"FCN's per-region values are {NOT_REPORTED}: they are missing from our copy of the "
      "paper's Table I.",
      "",
      "## HD95 (mm)",
      "",
      *_hd95_table(table["models"], "Model"),
      "",
      "Mean ± SD over test cases as above; a region absent from the prediction or the reference "
      "(not both) scores 373.13 mm. The paper reports no HD95.",
  ]
  if table["comparisons"]:
    lines += ["", f"## Paired comparisons with {display_name(REFERENCE)} (Dice)", "",
              *_comparison_table(table["comparisons"], "Model"), "",
              _comparison_note(), "",
              significance_sentence(table["comparisons"], n)]
  lesion = "lesion_comparisons" in table  # build's sign of lesion-wise scores.
  if lesion:
    lines += _lesion_section("## Lesion-wise Dice and HD95 (BraTS 2023+)", table["models"],
                             table["lesion_comparisons"], "Model", n)
    lines += ["", _lesion_note(table.get("lesion_rules"))]
  if table["ablations"]:
    variants = [e for e in table["models"] if e["variant"] == REFERENCE] + table["ablations"]
    lines += ["", f"## Ablations of {display_name(REFERENCE)}", "",
              "Each variant removes one block (docs/architecture.md, \"Ablations\"). Dice, as "
              "in Table I:", "",
              *_dice_table(variants, {}, "Variant"), "", "HD95 (mm):", "",
              *_hd95_table(variants, "Variant"), "",
              *_comparison_table(table["ablation_comparisons"], "Variant"), "",
              _comparison_note(), "",
              significance_sentence(table["ablation_comparisons"], n)]
    if lesion:
      lines += _lesion_section(f"## Ablations of {display_name(REFERENCE)}: lesion-wise Dice "
                               "and HD95", variants, table["ablation_lesion_comparisons"],
                               "Variant", n)
  return "\n".join(lines) + "\n"


def _lesion_note(lesion_rules: Optional[Mapping[str, Any]]) -> str:
  """lesion_rules: {'requested': the flag, 'rules': {name: description}}, if known."""
  text = ("Per case and region, the BraTS 2023+ lesion-wise score (msatt_jax/metrics.py): the "
          "mean over the reference's lesions and the predicted false-positive components, a "
          "missed lesion or a false positive scoring Dice 0 and the rule set's HD95 penalty; "
          "Mean: per case, the mean of ET, WT and TC. Mean ± SD over test cases as above.")
  if lesion_rules:
    text += (f" Lesion rules (--lesion_rules={lesion_rules['requested']}): "
             + "; ".join(lesion_rules["rules"].values()) + ".")
  return text


def _comparison_note(what: str = "Dice") -> str:
  return (f"Per test case, the model's {what} minus {display_name(REFERENCE)}'s (each the mean "
          f"over seeds); the CI is a bootstrap interval of the mean difference "
          f"(scipy.stats.bootstrap, method '{stats.BOOTSTRAP_METHOD}', "
          f"{stats.BOOTSTRAP_RESAMPLES:,} resamples of the cases, seed "
          f"{stats.BOOTSTRAP_SEED}); p: two-sided Wilcoxon signed-rank test "
          "(scipy.stats.wilcoxon, zero differences dropped; p = 1 when all are zero).")

