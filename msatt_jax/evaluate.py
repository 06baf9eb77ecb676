"""Evaluate a trained run, or an ensemble of runs, on whole cases of a split (NIfTI files).

  python -m msatt_jax.evaluate --workdir=runs/paper [--checkpoint=best|latest|STEP] [--split=test]
      [--notta] [--hd95=official|max|surface] [--postprocess=auto|none|PATH]
      [--lesion_rules=auto|off|NAME]
  python -m msatt_jax.evaluate --workdir=runs/f0,runs/f1,runs/f2   # an ensemble

Restores the checkpoint and the run's own config, segments every case of the split (the slices
the run was trained on, pasted back into the full volume), and reports Dice, HD95, sensitivity
and specificity of ET, TC and WT in 3D with the BraTS rules, plus Dice over the training slice
range. By default the probabilities are averaged over the four in-plane flips (mirroring TTA;
--notta: the plain forward pass) and HD95 is the BraTS scorer's (--hd95=official: both
directions' surface distances pooled; max: the larger directed percentile). Several runs
average their probabilities; they must share the input preprocessing, the output type and the
split's cases, which come from the first run. The postprocessing rules chosen on validation
data (`python -m msatt_jax.postprocess`, the first run's postprocessing.json) apply by default
(--postprocess=auto; none skips them; or a file's path), and the scores are then reported
twice: after the rules and before them (the network's own labels). Writes into
<workdir>/eval_<split>_step<N>/ (`_notta`, `_hd95max`, `_nopostprocess` or
`_postprocess-<file>` appended for those options; `eval_<split>_ensemble<K>_step<N1-N2..>` for
an ensemble, under the first run; or --out): per_case.csv (after the rules, if any),
per_case_unprocessed.csv (before them, when rules applied), summary.json (which records the
runs, TTA, the HD95 definition and the rules applied; 'metrics' after them,
'metrics_unprocessed' before), table.md (laid out like the paper's Table I, one table after
and one before the rules) and figures/<case>.png (modalities, ground truth, prediction; Fig. 7).
With lesion rules (--lesion_rules, as in evaluate_folder: auto = the rule set of a 2023+ case
name's challenge, 2024 for a model of a 2024 label set, else 2023; off; or a rule set's name)
the scores after the rules also hold the BraTS 2023+ lesion-wise Dice, HD95 and lesion counts,
table.md their means, and lesions.csv and lesions.md list every lesion and each case's missed
ones.
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
from msatt_jax import cli
from msatt_jax import evaluate_folder
from msatt_jax import inference
from msatt_jax import metrics
from msatt_jax import postprocess as postprocess_lib
from msatt_jax import reporting
from msatt_jax import visualize

PAPER_MODEL_NAMES = {"msconvlstm_att": "MSConvLSTM-Att", "unet": "U-Net",
                     "attunet": "Att-UNet", "fcn": "FCN"}


def markdown_table(model_name: str, summary: Dict[str, Dict[str, float]], split: str,
                   num_cases: int, step: Union[int, str], hd95_mode: str = "official",
                   tta: bool = True, postprocessing: str = "none") -> str:
  """Dice and HD95 per region as in the paper's Table I (ET, WT, TC, mean), then the rates.

  postprocessing: the rules applied to the labels scored, in words.
  """
  order = ("ET", "WT", "TC") + tuple(  # The paper's order, then a label set's other regions.
      k[len("dice_"):] for k in summary if k.startswith("dice_") and
      k[len("dice_"):] not in ("ET", "WT", "TC"))
  # A cell a metric lacks for a region (lesion rules score ET, TC, WT only) stays empty.
  cell = lambda key, r, fmt: fmt.format(summary[f"{key}_{r}"]["mean"]) \
      if f"{key}_{r}" in summary else ""
  row = lambda name, key, fmt: f"| {name} | " + " | ".join(
      cell(key, r, fmt) for r in order) + " | " + fmt.format(float(np.mean(
          [summary[f"{key}_{r}"]["mean"] for r in order if f"{key}_{r}" in summary]))) + " |"
  inference_text = ("probabilities averaged over the four in-plane flips (mirroring TTA)" if tta
                    else "no test-time augmentation")
  lesion_rows = [row("Lesion-wise Dice", "lesion_dice", "{:.3f}"),
                 row("Lesion-wise HD95 (mm)", "lesion_hd95", "{:.2f}")] \
      if all(f"lesion_dice_{r}" in summary for r in ("ET", "WT", "TC")) else []
  return "\n".join([
      f"Evaluation of {model_name} on the {split} split ({num_cases} cases), checkpoint step "
      f"{step}, {inference_text}; postprocessing: {postprocessing}. Dice, HD95 (mm), "
      "sensitivity and specificity in 3D on the full volume with the BraTS rules; slice Dice on "
      f"the training slice range only. HD95 '{hd95_mode}': {metrics.HD95_DEFINITIONS[hd95_mode]}.",
      "",
      "| Metric | " + " | ".join(order) + " | Mean |",
      "|---|" + "---|" * (len(order) + 1),
      row("Dice", "dice", "{:.3f}"),
      row("Dice (slice range)", "slice_dice", "{:.3f}"),
      row("HD95 (mm)", "hd95", "{:.2f}"),
      *lesion_rows,
      row("Sensitivity", "sensitivity", "{:.3f}"),
      row("Specificity", "specificity", "{:.4f}"),
      "",
  ])


def _check_same_split(runs: Sequence[inference.TrainedRun], split: str,
                      case_ids: Sequence[str]) -> None:
  """An ensemble is scored on cases none of its members trained on: one shared split."""
  for run in runs[1:]:
    theirs = input_pipeline.split_cases(inference.run_data_config(run), split)
    if sorted(theirs) != sorted(case_ids):
      differ = sorted(set(theirs) ^ set(case_ids))
      raise ValueError(
          f"{run.workdir}: its {split} split differs from that of {runs[0].workdir} (cases "
          f"{', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}); an ensemble is "
          "evaluated on a split every run shares (same data, split_seed and split sizes).")


def _default_out_dir(runs: Sequence[inference.TrainedRun], split: str, tta: bool,
                     hd95_mode: str, postprocess: str = "auto") -> str:
  steps = "-".join(str(r.step) for r in runs)
  name = f"eval_{split}_step{steps}" if len(runs) == 1 else \
      f"eval_{split}_ensemble{len(runs)}_step{steps}"
  name += ("" if tta else "_notta") + ("" if hd95_mode == "official" else f"_hd95{hd95_mode}")
  name += postprocess_lib.output_suffix(postprocess, runs[0].workdir)
  return os.path.join(runs[0].workdir, name)


def _model_name(runs: Sequence[inference.TrainedRun]) -> str:
  names = [PAPER_MODEL_NAMES.get(r.config.model.name, r.config.model.name) for r in runs]
  if len(runs) == 1:
    return names[0]
  return f"an ensemble of {len(runs)} runs ({', '.join(sorted(set(names)))})"


def evaluate(workdir: Union[str, Sequence[str]], split: str = "test",
             options: inference.Options = inference.Options(), *,
             out_dir: Optional[str] = None, num_figures: int = 3,
             source_dir: Optional[str] = None, hd95_mode: str = "official",
             lesion_rules: str = "auto") -> Dict[str, Any]:
  """Evaluates a run (or an ensemble: several workdirs) on one split.

  options: the inference options (checkpoint, TTA, batch size; postprocess 'auto' = the first
  run's postprocessing.json, if any, 'none', or a file's path). Returns {'per_case': [...],
  'summary': {...}, 'out_dir', 'step', 'postprocessing'} (step: the first run's; the scores
  after the rules) and, when rules applied, 'per_case_unprocessed' and 'summary_unprocessed'
  (before them).
  """
  if split not in builder_lib.SPLITS:
    raise ValueError(f"--split must be one of {builder_lib.SPLITS}, not {split!r}.")
  if hd95_mode not in metrics.HD95_MODES:
    raise ValueError(f"--hd95 must be one of {metrics.HD95_MODES}, not {hd95_mode!r}.")
  evaluate_folder.check_lesion_rules_flag(lesion_rules)
  workdirs = [workdir] if isinstance(workdir, str) else list(workdir)
  if not workdirs:
    raise ValueError("--workdir: name at least one run directory.")
  tta, postprocess = options.tta, options.postprocess
  rules, record = postprocess_lib.resolve(postprocess, workdirs[0])  # Before any work.
  runs = inference.restore_runs(workdirs, options.checkpoint)
  postprocess_lib.warn_if_mismatched(rules, record, runs, tta)
  data_config = inference.run_data_config(runs[0], source_dir)
  case_ids = input_pipeline.split_cases(data_config, split)
  _check_same_split(runs, split, case_ids)
  out_dir = out_dir or _default_out_dir(runs, split, tta, hd95_mode, postprocess)
  figures_dir = os.path.join(out_dir, "figures")
  os.makedirs(figures_dir, exist_ok=True)

  cases = inference.labelled_cases(data_config, case_ids, split)
  predictor = inference.Predictor.from_runs(runs, options, rules)
  label_set = predictor.label_set  # The regions of the model's classes (its training data's).
  score = lambda pred, case: {
      "case": case.case_id,
      **metrics.region_scores(pred, case.label, case.spacing, hd95_mode, label_set),
      **metrics.slice_dice(pred, case.label, data_config.slice_start, data_config.slice_stop,
                           label_set)}
  rows: List[Dict[str, Any]] = []
  unprocessed_rows: List[Dict[str, Any]] = []
  lesion_list: List[Dict[str, Any]] = []
  t0 = time.perf_counter()
  for i, case in enumerate(cases):
    seg = predictor.segment(case.image)
    row, lesions = evaluate_folder.add_lesion_scores(
        score(seg.labels, case), seg.labels, case.label, case.spacing,
        evaluate_folder.case_lesion_rules(case.case_id, lesion_rules, label_set), label_set)
    rows.append(row)
    lesion_list.extend(evaluate_folder.lesion_rows(case.case_id, lesions))
    if rules is not None:
      unprocessed_rows.append(score(seg.unprocessed, case))
    logging.info("[%d/%d] %s  Dice ET %.3f TC %.3f WT %.3f  (%.1fs elapsed)", i + 1,
                 len(case_ids), case.case_id, row["dice_ET"], row["dice_TC"], row["dice_WT"],
                 time.perf_counter() - t0)
    if i < num_figures:
      z = visualize.most_tumour_slice(case.label)
      figure = visualize.case_figure(case.image[:, :, z, :], case.label[:, :, z],
                                     seg.labels[:, :, z], tuple(data_config.modalities),
                                     title=f"{case.case_id}, axial slice {z}")
      visualize.save_png(figure, os.path.join(figures_dir, f"{case.case_id}.png"))

  summary = metrics.summarize(rows)
  unprocessed = metrics.summarize(unprocessed_rows) if rules is not None else None
  applied = {"requested": postprocess, "file": rules.source if rules else None,
             "rules": rules.to_json() if rules else None,
             "description": rules.describe() if rules else "none"}
  step = ", ".join(str(r.step) for r in runs)
  reporting.write_csv(os.path.join(out_dir, "per_case.csv"), rows)
  unprocessed_csv = os.path.join(out_dir, "per_case_unprocessed.csv")
  if rules is not None:
    reporting.write_csv(unprocessed_csv, unprocessed_rows)
  elif os.path.exists(unprocessed_csv):  # An earlier evaluation's, into the same folder.
    os.remove(unprocessed_csv)
  evaluate_folder.write_lesion_reports(out_dir, rows, lesion_list,
                                       f"Lesion-wise scores, {split} split, step {step}")
  scored = {r["case"]: r["lesion_rules"] for r in rows if r.get("lesion_rules")}
  reporting.write_json(os.path.join(out_dir, "summary.json"), {
      "model": runs[0].config.model.name, "checkpoint_step": runs[0].step, "split": split,
      "label_set": label_set,
      "num_cases": len(rows), "tta": bool(tta), "hd95_mode": hd95_mode,
      "hd95": metrics.HD95_DEFINITIONS[hd95_mode],
      "runs": [{"workdir": r.workdir, "model": r.config.model.name, "checkpoint_step": r.step}
               for r in runs],
      "postprocessing": applied, "metrics": summary, "metrics_unprocessed": unprocessed,
      "lesion_rules": {"requested": lesion_rules, "cases": scored,
                       "rules": {n: metrics.LESION_RULES[n].describe()
                                 for n in sorted(set(scored.values()))}}})
  table = lambda scores, text: markdown_table(_model_name(runs), scores, split, len(rows), step,
                                              hd95_mode, tta, text)
  text = table(summary, applied["description"])
  if rules is not None:
    text += "\n" + table(unprocessed, "none (the network's labels, before the rules above)")
  files.atomic_write_text(os.path.join(out_dir, "table.md"), text)
  return {"per_case": rows, "summary": summary, "out_dir": out_dir, "step": runs[0].step,
          "postprocessing": applied,
          "per_case_unprocessed": unprocessed_rows if rules is not None else None,
          "summary_unprocessed": unprocessed}


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; defined by `run` only, so importing this module defines none."""
  flags.DEFINE_list("workdir", None, "Run directory holding the checkpoints; several "
                    "(comma-separated) are evaluated as an ensemble.")
  flags.DEFINE_enum("split", "test", list(builder_lib.SPLITS), "Which patient split to evaluate.")
  flags.DEFINE_string("out", None, "Output folder (default <workdir>/eval_<split>_step<N>).")
  flags.DEFINE_integer("num_figures", 3, "Cases drawn as PNG figures.")
  flags.DEFINE_string("source_dir", None, "Raw NIfTI folder, if it moved since training.")
  inference.define_option_flags()
  evaluate_folder.define_hd95_flag()
  evaluate_folder.define_lesion_rules_flag()
  postprocess_lib.define_postprocess_flag()
  # Flags defined by other commands' modules, listed in this command's --help.
  flags.adopt_module_key_flags(evaluate_folder)
  flags.adopt_module_key_flags(postprocess_lib)
  flags.mark_flags_as_required(["workdir"])


def main(argv: Sequence[str]) -> Dict[str, Any]:
  del argv
  result = evaluate(FLAGS.workdir, FLAGS.split, inference.options_from_flags(),
                    out_dir=FLAGS.out, num_figures=FLAGS.num_figures,
                    source_dir=FLAGS.source_dir, hd95_mode=FLAGS.hd95,
                    lesion_rules=FLAGS.lesion_rules)
  mean = lambda summary, name: {"case": name, **{k: v["mean"] for k, v in summary.items()}}
  rows = result["per_case"] + [mean(result["summary"], "mean")]
  if result["summary_unprocessed"] is not None:
    rows.append(mean(result["summary_unprocessed"], "mean, before postprocessing"))
  print(reporting.format_metric_tables(rows))
  print(f"\nHD95 ({FLAGS.hd95}): {metrics.HD95_DEFINITIONS[FLAGS.hd95]}; "
        f"TTA {'on' if FLAGS.tta else 'off'}; postprocessing: "
        f"{result['postprocessing']['description']}")
  print(f"Results in {result['out_dir']}")
  return result


def run() -> None:
  cli.run_command(main, define_flags)


if __name__ == "__main__":
  run()
