"""Evaluate a trained run, or an ensemble of runs, on whole cases of a split (NIfTI files).

  python -m msatt_jax.evaluate --workdir=runs/paper [--checkpoint=best|latest|STEP] [--split=test]
      [--notta] [--hd95=official|max]
  python -m msatt_jax.evaluate --workdir=runs/f0,runs/f1,runs/f2   # an ensemble

Restores the checkpoint and the run's own config, segments every case of the split (the slices
the run was trained on, pasted back into the full volume), and reports Dice, HD95, sensitivity
and specificity of ET, TC and WT in 3D with the BraTS rules, plus Dice over the training slice
range. By default the probabilities are averaged over the four in-plane flips (mirroring TTA;
--notta: the plain forward pass) and HD95 is the BraTS scorer's (--hd95=official: both
directions' surface distances pooled; max: the larger directed percentile). Several runs
average their probabilities; they must share the input preprocessing, the output type and the
split's cases, which come from the first run. Writes into <workdir>/eval_<split>_step<N>/
(`_notta`, `_hd95max` appended for those options; `eval_<split>_ensemble<K>_step<N1-N2..>` for
an ensemble, under the first run; or --out): per_case.csv, summary.json (which records the
runs, TTA and the HD95 definition), table.md (laid out like the paper's Table I) and
figures/<case>.png (modalities, ground truth, prediction; Fig. 7).
"""

if __name__ == "__main__":
  # Before JAX loads: the XLA flags and allocator settings (msatt_jax/runtime.py) must be in
  # the environment from the start, which may re-execute this process once.
  from msatt_jax import runtime
  runtime.configure()

import os
import time
from typing import Any, Dict, List, Optional, Sequence, Union

from absl import flags
from absl import logging
import numpy as np

from data_pipelines import files
from data_pipelines import input_pipeline
from data_pipelines.brats import builder as builder_lib
from data_pipelines.brats import layouts
from msatt_jax import cli
from msatt_jax import evaluate_folder
from msatt_jax import inference
from msatt_jax import metrics
from msatt_jax import reporting
from msatt_jax import visualize

PAPER_MODEL_NAMES = {"msconvlstm_att": "MSConvLSTM-Att", "unet": "U-Net",
                     "attunet": "Att-UNet", "fcn": "FCN"}


def markdown_table(model_name: str, summary: Dict[str, Dict[str, float]], split: str,
                   num_cases: int, step: Union[int, str], hd95_mode: str = "official",
                   tta: bool = True) -> str:
  """Dice and HD95 per region as in the paper's Table I (ET, WT, TC, mean), then the rates."""
  order = ("ET", "WT", "TC")
  row = lambda name, key, fmt: f"| {name} | " + " | ".join(
      fmt.format(summary[f"{key}_{r}"]["mean"]) for r in order) + \
      f" | {fmt.format(float(np.mean([summary[f'{key}_{r}']['mean'] for r in order])))} |"
  inference_text = ("probabilities averaged over the four in-plane flips (mirroring TTA)" if tta
                    else "no test-time augmentation")
  return "\n".join([
      f"Evaluation of {model_name} on the {split} split ({num_cases} cases), checkpoint step "
      f"{step}, {inference_text}. Dice, HD95 (mm), sensitivity and specificity in 3D on the "
      "full volume with the BraTS rules; slice Dice on the training slice range only. HD95 "
      f"'{hd95_mode}': {metrics.HD95_DEFINITIONS[hd95_mode]}.",
      "",
      "| Metric | ET | WT | TC | Mean |",
      "|---|---|---|---|---|",
      row("Dice", "dice", "{:.3f}"),
      row("Dice (slice range)", "slice_dice", "{:.3f}"),
      row("HD95 (mm)", "hd95", "{:.2f}"),
      row("Sensitivity", "sensitivity", "{:.3f}"),
      row("Specificity", "specificity", "{:.4f}"),
      "",
  ])


def _data_config(run: inference.TrainedRun, source_dir: Optional[str] = None):
  """The run's data config pointing at its raw and prepared data as recorded at training."""
  data_config = run.config.data
  data_config.source_dir = source_dir or run.meta["data"]["source_dir"]
  data_config.data_dir = run.meta["data"]["data_dir"]
  return data_config


def _check_same_split(runs: Sequence[inference.TrainedRun], split: str,
                      case_ids: Sequence[str]) -> None:
  """An ensemble is scored on cases none of its members trained on: one shared split."""
  for run in runs[1:]:
    theirs = input_pipeline.split_cases(_data_config(run), split)
    if sorted(theirs) != sorted(case_ids):
      differ = sorted(set(theirs) ^ set(case_ids))
      raise ValueError(
          f"{run.workdir}: its {split} split differs from that of {runs[0].workdir} (cases "
          f"{', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}); an ensemble is "
          "evaluated on a split every run shares (same data, split_seed and split sizes).")


def _default_out_dir(runs: Sequence[inference.TrainedRun], split: str, tta: bool,
                     hd95_mode: str) -> str:
  steps = "-".join(str(r.step) for r in runs)
  name = f"eval_{split}_step{steps}" if len(runs) == 1 else \
      f"eval_{split}_ensemble{len(runs)}_step{steps}"
  name += ("" if tta else "_notta") + ("" if hd95_mode == "official" else f"_hd95{hd95_mode}")
  return os.path.join(runs[0].workdir, name)


def _model_name(runs: Sequence[inference.TrainedRun]) -> str:
  names = [PAPER_MODEL_NAMES.get(r.config.model.name, r.config.model.name) for r in runs]
  if len(runs) == 1:
    return names[0]
  return f"an ensemble of {len(runs)} runs ({', '.join(sorted(set(names)))})"


def evaluate(workdir: Union[str, Sequence[str]], checkpoint: str = "best", split: str = "test",
             out_dir: Optional[str] = None, num_figures: int = 3,
             source_dir: Optional[str] = None, batch_size: int = 16, tta: bool = True,
             hd95_mode: str = "official",
             rules: Optional[inference.LabelRules] = None) -> Dict[str, Any]:
  """Evaluates a run (or an ensemble: several workdirs) on one split.

  Returns {'per_case': [...], 'summary': {...}, 'out_dir', 'step'} (step: the first run's).
  `rules` (canonical label volume -> label volume) are applied before scoring.
  """
  if split not in builder_lib.SPLITS:
    raise ValueError(f"--split must be one of {builder_lib.SPLITS}, not {split!r}.")
  if hd95_mode not in metrics.HD95_MODES:
    raise ValueError(f"--hd95 must be one of {metrics.HD95_MODES}, not {hd95_mode!r}.")
  workdirs = [workdir] if isinstance(workdir, str) else list(workdir)
  runs = inference.restore_runs(workdirs, checkpoint)
  data_config = _data_config(runs[0], source_dir)
  case_ids = input_pipeline.split_cases(data_config, split)
  _check_same_split(runs, split, case_ids)
  out_dir = out_dir or _default_out_dir(runs, split, tta, hd95_mode)
  figures_dir = os.path.join(out_dir, "figures")
  os.makedirs(figures_dir, exist_ok=True)

  refs = {ref.case_id: ref for ref in layouts.find_cases(data_config.source_dir,
                                                         data_config.layout)}
  missing = [c for c in case_ids if c not in refs]
  if missing:
    raise FileNotFoundError(f"{data_config.source_dir}: cases of the {split} split are missing: "
                            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
  predict = inference.make_predictor(runs, tta)
  rows: List[Dict[str, Any]] = []
  t0 = time.perf_counter()
  for i, case_id in enumerate(case_ids):
    case = layouts.load_case(refs[case_id], tuple(data_config.modalities),
                             data_config.label_convention)
    if case.label is None:
      raise FileNotFoundError(f"{case_id}: has no label file to evaluate against.")
    pred = inference.segment(predict, case.image, data_config, batch_size=batch_size,
                             rules=rules).labels
    row = {"case": case_id, **metrics.region_scores(pred, case.label, case.spacing, hd95_mode),
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
  step = ", ".join(str(r.step) for r in runs)
  reporting.write_csv(os.path.join(out_dir, "per_case.csv"), rows)
  reporting.write_json(os.path.join(out_dir, "summary.json"), {
      "model": runs[0].config.model.name, "checkpoint_step": runs[0].step, "split": split,
      "num_cases": len(rows), "tta": bool(tta), "hd95_mode": hd95_mode,
      "hd95": metrics.HD95_DEFINITIONS[hd95_mode],
      "runs": [{"workdir": r.workdir, "model": r.config.model.name, "checkpoint_step": r.step}
               for r in runs],
      "metrics": summary})
  files.atomic_write_text(os.path.join(out_dir, "table.md"),
                          markdown_table(_model_name(runs), summary, split, len(rows), step,
                                         hd95_mode, tta))
  return {"per_case": rows, "summary": summary, "out_dir": out_dir, "step": runs[0].step}


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; defined by `run` only, so importing this module defines none."""
  flags.DEFINE_list("workdir", None, "Run directory holding the checkpoints; several "
                    "(comma-separated) are evaluated as an ensemble.")
  flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
  flags.DEFINE_enum("split", "test", list(builder_lib.SPLITS), "Which patient split to evaluate.")
  flags.DEFINE_string("out", None, "Output folder (default <workdir>/eval_<split>_step<N>).")
  flags.DEFINE_integer("num_figures", 3, "Cases drawn as PNG figures.")
  flags.DEFINE_string("source_dir", None, "Raw NIfTI folder, if it moved since training.")
  flags.DEFINE_integer("batch_size", 16, "Slices per forward pass (x4 images with --tta).")
  flags.DEFINE_bool("tta", True, "Mirroring test-time augmentation: average over the four "
                    "in-plane flips (--notta: the plain forward pass).")
  evaluate_folder.define_hd95_flag()
  flags.mark_flags_as_required(["workdir"])


def main(argv: Sequence[str]) -> Dict[str, Any]:
  del argv
  result = evaluate(FLAGS.workdir, FLAGS.checkpoint, FLAGS.split, FLAGS.out, FLAGS.num_figures,
                    FLAGS.source_dir, FLAGS.batch_size, FLAGS.tta, FLAGS.hd95)
  mean = {"case": "mean", **{k: v["mean"] for k, v in result["summary"].items()}}
  print(reporting.format_metric_tables(result["per_case"] + [mean]))
  print(f"\nHD95 ({FLAGS.hd95}): {metrics.HD95_DEFINITIONS[FLAGS.hd95]}; "
        f"TTA {'on' if FLAGS.tta else 'off'}")
  print(f"Results in {result['out_dir']}")
  return result


def run() -> None:
  cli.run_command(main, define_flags)


if __name__ == "__main__":
  run()
