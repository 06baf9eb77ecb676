"""Evaluate a trained run on whole cases of a split, from their NIfTI files.

  python -m msatt_jax.evaluate --workdir=runs/paper [--checkpoint=best|latest|STEP] [--split=test]

Restores the checkpoint and the run's own config, segments every case of the split (the slices
the run was trained on, pasted back into the full volume), and reports Dice and HD95 of ET, TC
and WT in 3D with the BraTS 2018 rules, plus Dice over the training slice range. Writes into
<workdir>/eval_<split>_step<N>/ (or --out): per_case.csv, summary.json, table.md (laid out like
the paper's Table I) and figures/<case>.png (modalities, ground truth, prediction; Fig. 7).
"""

if __name__ == "__main__":
  # Before JAX loads: the XLA flags and allocator settings (msatt_jax/runtime.py) must be in
  # the environment from the start, which may re-execute this process once.
  from msatt_jax import runtime
  runtime.configure()

import os
import time
from typing import Any, Dict, List, Optional

from absl import logging
import numpy as np

from data_pipelines import input_pipeline
from data_pipelines.brats import labels as labels_lib
from data_pipelines.brats import layouts
from msatt_jax import inference
from msatt_jax import metrics
from msatt_jax import reporting
from msatt_jax import visualize

SPLITS = ("train", "validation", "test")
PAPER_MODEL_NAMES = {"msconvlstm_att": "MSConvLSTM-Att", "unet": "U-Net",
                     "attunet": "Att-UNet", "fcn": "FCN"}


def markdown_table(model_name: str, summary: Dict[str, Dict[str, float]], split: str,
                   num_cases: int, step: int) -> str:
  """Dice and HD95 per region as in the paper's Table I (ET, WT, TC, mean)."""
  order = ("ET", "WT", "TC")
  dice = [summary[f"dice_{r}"]["mean"] for r in order]
  slice_dice = [summary[f"slice_dice_{r}"]["mean"] for r in order]
  hd = [summary[f"hd95_{r}"]["mean"] for r in order]
  row = lambda name, v, fmt: f"| {name} | " + " | ".join(fmt.format(x) for x in v) + \
      f" | {fmt.format(float(np.mean(v)))} |"
  return "\n".join([
      f"Evaluation of {model_name} on the {split} split ({num_cases} cases), checkpoint step "
      f"{step}. Dice and HD95 (mm) in 3D on the full volume with the BraTS 2018 rules; slice "
      "Dice on the training slice range only.",
      "",
      "| Metric | ET | WT | TC | Mean |",
      "|---|---|---|---|---|",
      row("Dice", dice, "{:.3f}"),
      row("Dice (slice range)", slice_dice, "{:.3f}"),
      row("HD95 (mm)", hd, "{:.2f}"),
      "",
  ])


def evaluate(workdir: str, checkpoint: str = "best", split: str = "test",
             out_dir: Optional[str] = None, num_figures: int = 3,
             source_dir: Optional[str] = None, batch_size: int = 16) -> Dict[str, Any]:
  """Evaluates a run on one split; returns {'per_case': [...], 'summary': {...}, 'out_dir'}."""
  if split not in SPLITS:
    raise ValueError(f"--split must be one of {SPLITS}, not {split!r}.")
  run = inference.restore_run(workdir, checkpoint)
  data_config = run.config.data
  data_config.source_dir = source_dir or run.meta["data"]["source_dir"]
  data_config.data_dir = run.meta["data"]["data_dir"]
  out_dir = out_dir or os.path.join(workdir, f"eval_{split}_step{run.step}")
  figures_dir = os.path.join(out_dir, "figures")
  os.makedirs(figures_dir, exist_ok=True)

  case_ids = input_pipeline.split_cases(data_config, split)
  refs = {ref.case_id: ref for ref in layouts.find_cases(data_config.source_dir,
                                                         data_config.layout)}
  missing = [c for c in case_ids if c not in refs]
  if missing:
    raise FileNotFoundError(f"{data_config.source_dir}: cases of the {split} split are missing: "
                            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
  predict = inference.predictor_for_run(run)
  rows: List[Dict[str, Any]] = []
  t0 = time.perf_counter()
  for i, case_id in enumerate(case_ids):
    case = layouts.load_case(refs[case_id], tuple(data_config.modalities),
                             data_config.label_convention)
    if case.label is None:
      raise FileNotFoundError(f"{case_id}: has no label file to evaluate against.")
    pred = inference.segment_volume(predict, case.image, data_config, batch_size=batch_size)
    row = {"case": case_id, **metrics.region_scores(pred, case.label, case.spacing),
           **metrics.slice_dice(pred, case.label, data_config.slice_start,
                                data_config.slice_stop)}
    rows.append(row)
    logging.info("[%d/%d] %s  Dice ET %.3f TC %.3f WT %.3f  (%.1fs elapsed)", i + 1,
                 len(case_ids), case_id, row["dice_ET"], row["dice_TC"], row["dice_WT"],
                 time.perf_counter() - t0)
    if i < num_figures:
      z = visualize.most_tumour_slice(case.label)
      figure = visualize.case_figure(case.image[:, :, z, :], case.label[:, :, z],
                                     pred[:, :, z], tuple(data_config.modalities),
                                     title=f"{case_id}, axial slice {z}")
      visualize.save_png(figure, os.path.join(figures_dir, f"{case_id}.png"))

  summary = metrics.summarize(rows)
  model_name = PAPER_MODEL_NAMES.get(run.config.model.name, run.config.model.name)
  reporting.write_csv(os.path.join(out_dir, "per_case.csv"), rows)
  reporting.write_json(os.path.join(out_dir, "summary.json"), {
      "model": run.config.model.name, "checkpoint_step": run.step, "split": split,
      "num_cases": len(rows), "metrics": summary})
  reporting.atomic_write_text(os.path.join(out_dir, "table.md"),
                              markdown_table(model_name, summary, split, len(rows), run.step))
  return {"per_case": rows, "summary": summary, "out_dir": out_dir, "step": run.step}


def main(argv):
  del argv
  from absl import flags
  from msatt_jax import cli
  cli.hide_accelerators_from_tensorflow()
  cli.setup_logging()
  f = flags.FLAGS

  def work():
    result = evaluate(f.workdir, f.checkpoint, f.split, f.out, f.num_figures, f.source_dir,
                      f.batch_size)
    columns = ["case"] + [f"{m}_{r}" for m in ("dice", "hd95") for r in labels_lib.REGIONS]
    print(reporting.format_table(result["per_case"], columns))
    mean = {"case": "mean", **{k: v["mean"] for k, v in result["summary"].items()}}
    print(reporting.format_table([mean], columns))
    print(f"Results in {result['out_dir']}")
    return result

  cli.run_or_exit(work)


def run():
  from msatt_jax import runtime
  runtime.configure()  # A no-op when the module's own guard above already ran it.
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "Run directory holding the checkpoints.")
  flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
  flags.DEFINE_enum("split", "test", list(SPLITS), "Which patient split to evaluate.")
  flags.DEFINE_string("out", None, "Output folder (default <workdir>/eval_<split>_step<N>).")
  flags.DEFINE_integer("num_figures", 3, "Cases drawn as PNG figures.")
  flags.DEFINE_string("source_dir", None, "Raw NIfTI folder, if it moved since training.")
  flags.DEFINE_integer("batch_size", 16, "Slices per forward pass.")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)


if __name__ == "__main__":
  run()
