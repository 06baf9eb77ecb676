"""The experiment's outputs from its evaluated runs: table1.md, table1.json, per_case.csv (the
numbers from report.py), curves.png and fig7.png (drawn by figures.py), and each variant's
parameter and FLOP counts (msatt_jax/summary.py's), cached in model_figures.json.
"""

import os
from typing import Any, Dict, Mapping, Optional, Sequence

from absl import logging
import ml_collections
import numpy as np

from data_pipelines import files
from data_pipelines import input_pipeline
from data_pipelines.brats import layouts
from msatt_jax import inference
from msatt_jax import reporting
from msatt_jax import steps
from msatt_jax import summary
from msatt_jax import visualize
from msatt_jax.experiments import figures
from msatt_jax.experiments import planning
from msatt_jax.experiments import records
from msatt_jax.experiments import report

MODEL_FIGURES = "model_figures.json"  # Parameter and FLOP counts, per model config.


def count_model(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """Parameters, and GFLOP of one forward pass of one slice (summary.py's XLA count)."""
  counted = summary.summarize(config, print_fn=None, train_step=False)
  flops = counted["forward_flops"]
  return {"num_params": counted["num_params"],
          "forward_gflop_per_slice": None if flops is None else flops / 1e9}


def model_figures(runs: Sequence[planning.Run], workdir: str) -> Dict[str, Dict[str, Any]]:
  """count_model of each variant, cached in MODEL_FIGURES under the config it was counted for."""
  path = os.path.join(workdir, MODEL_FIGURES)
  cache = records.read_json(path) or {}
  out = {}
  for run in runs:
    if run.variant in out:
      continue
    key = planning.jsonable({"model": run.config.model.to_dict(), "loss": run.config.loss,
                             "input_shape": steps.input_shape(run.config)})
    entry = cache.get(run.variant)
    if entry is None or entry["key"] != key:
      logging.info("[table1] counting the parameters and FLOPs of %s.", run.variant)
      entry = {"key": key, **count_model(run.config)}
    out[run.variant] = entry
  if any(cache.get(v) != e for v, e in out.items()):
    reporting.write_json(path, {**cache, **out})
  return out


def curves(runs: Sequence[planning.Run]) -> figures.Image.Image:
  series = []
  for run in runs:
    done = records.read_json(os.path.join(run.workdir, records.DONE_MARKER))
    points = [(r["step"] / done["steps_per_epoch"], r["val_dice_mean"])
              for r in records.read_metrics(run.workdir) if "val_dice_mean" in r]
    series.append((run.name, [p[0] for p in points], [p[1] for p in points]))
  return figures.curves_figure(series, "Validation mean Dice (ET, TC, WT) of every run",
                               "epoch", "validation mean Dice")


def _figure_slice(label: np.ndarray, data: ml_collections.ConfigDict) -> int:
  """The axial slice with the most tumour within the segmented range."""
  start, stop = data.slice_start, min(data.slice_stop, label.shape[-1] - 1)
  return start + visualize.most_tumour_slice(label[..., start:stop + 1])


def fig7(results: Sequence[report.RunResult], runs: Sequence[planning.Run],
         models: Sequence[str], data: ml_collections.ConfigDict,
         case_ids: Sequence[str]) -> figures.Image.Image:
  """The paper's Fig. 7 with every model: each model's first-seed run, on the same slices."""
  refs = {ref.case_id: ref for ref in layouts.find_cases(data.source_dir, data.layout)}
  cases = [layouts.load_case(refs[c], tuple(data.modalities), data.label_convention)
           for c in case_ids]
  slices = [_figure_slice(case.label, data) for case in cases]
  steps_by_run = {r.run: r.checkpoint_step for r in results}
  predictions = []
  for model in models:
    run = min((r for r in runs if r.variant == model), key=lambda r: r.seed)
    logging.info("[table1] drawing %s's predictions for fig7.png.", run.name)
    trained = inference.restore_run(run.workdir, str(steps_by_run[run.name]))
    predictor = inference.Predictor.from_runs(trained, inference.Options(tta=False,
                                                                          batch_size=1))
    predictions.append([predictor.segment(case.image, slice_range=(z, z)).labels[:, :, z]
                        for case, z in zip(cases, slices)])
  rows = [(f"{c}, axial slice {z}", case.image[:, :, z, :], case.label[:, :, z],
           [p[i] for p in predictions])
          for i, (c, case, z) in enumerate(zip(case_ids, cases, slices))]
  return figures.comparison_figure(rows, tuple(data.modalities),
                                   [report.display_name(m) for m in models])


def write_outputs(workdir: str, runs: Sequence[planning.Run],
                  results: Sequence[report.RunResult], models: Sequence[str],
                  ablations: Sequence[str], seeds: Sequence[int],
                  data: ml_collections.ConfigDict, num_figure_cases: int,
                  lesion_rules: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """table1.md, table1.json, per_case.csv, curves.png and fig7.png (each written atomically).
  lesion_rules: the lesion rules the test cases were scored under ({'requested', 'rules'}),
  None when none were."""
  out = lambda name: os.path.join(workdir, name)
  test_cases = sorted(input_pipeline.split_cases(data, "test"))[:num_figure_cases]
  fig7_key = {"runs": sorted([r.run, r.checkpoint_step] for r in results
                             if r.variant in models), "cases": test_cases}
  table = report.build(results, models, ablations, model_figures(runs, workdir),
                       {"models_compared": list(models), "ablations_compared": list(ablations),
                        "seeds": list(seeds), "fig7": fig7_key,
                        **({"lesion_rules": dict(lesion_rules)} if lesion_rules else {})})
  previous = records.read_json(out("table1.json")) or {}
  fig7_done = previous.get("fig7") == planning.jsonable(fig7_key)
  if not (os.path.exists(out("fig7.png")) and fig7_done):
    visualize.save_png(fig7(results, runs, models, data, test_cases), out("fig7.png"))
  visualize.save_png(curves(runs), out("curves.png"))
  reporting.write_csv(out("per_case.csv"), report.per_case_rows(results))
  reporting.write_json(out("table1.json"), table)
  files.atomic_write_text(out("table1.md"), report.markdown(table))
  return table
