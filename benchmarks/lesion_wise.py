r"""Voxel-wise against lesion-wise scores on synthetic multi-lesion cases, before and after the
postprocessing chosen on validation for each objective, in one command.

  python -m benchmarks.lesion_wise [--workdir=runs/lesion_wise] [--config=configs/table1_demo.py]
      [--model=msconvlstm_att] [--cases=24] [--metastases=6] [--challenge=MET] \
      [--lesion_rules=auto] [--override KEY=VALUE ...]

1. data_pipelines.synthetic writes --cases cases (default: the config's synthetic_cases, of its
   synthetic_shape) in the 2023+ layout, named BraTS-<challenge>-NNNNN-000, each with its 1-2
   tumours and up to --metastases small metastases, into <workdir>/synthetic.
2. `python -m msatt_jax.train` prepares them and trains the config's model (<workdir>/run;
   --override KEY=VALUE becomes --config.KEY=VALUE).
3. The validation cases are predicted once (postprocess.predict_validation) and the rules
   chosen on them twice (postprocess.choose_rules): --objective=voxel, the command's default
   (mean ET/TC/WT Dice), and --objective=lesion (lesion-wise Dice under --lesion_rules).
4. The test cases are predicted once (inference.Predictor, TTA on as evaluate's default) and
   scored as evaluate scores them, as predicted and after each set of rules:
   metrics.region_scores (voxel-wise) and evaluate_folder.add_lesion_scores (lesion-wise).

Prints one table: per postprocessing (none, voxel-chosen, lesion-chosen), the mean voxel-wise
Dice of WT, TC and ET over the test cases and their mean, the lesion-wise Dice and HD95 (mean
over cases of the mean over the rule set's regions), and the lesions matched (TP), missed (FN)
and the false-positive components (FP), summed over cases and regions; then the rules chosen,
the wall time and the peak RSS. Everything is also written to <workdir>/lesion_wise.json. A
rerun in the same workdir reuses the data and the trained run.
"""

if __name__ == "__main__":
  # Before JAX loads, as in the commands (msatt_jax/runtime.py).
  from msatt_jax import runtime
  runtime.configure()

import argparse
import os
import resource
import subprocess
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from benchmarks import common
from data_pipelines import input_pipeline
from data_pipelines import synthetic
from msatt_jax import evaluate_folder
from msatt_jax import inference
from msatt_jax import metrics
from msatt_jax import postprocess
from msatt_jax import reporting
from msatt_jax.experiments import planning

POSTPROCESSING = ("none", "voxel-chosen", "lesion-chosen")  # The table's rows.
DICE_REGIONS = ("WT", "TC", "ET")
COLUMNS = ("postprocessing", "Dice WT", "Dice TC", "Dice ET", "Dice mean", "lesion Dice",
           "lesion HD95", "TP", "FN", "FP")
FORMATS = {"lesion HD95": "{:.2f}", "TP": "{}", "FN": "{}", "FP": "{}", "postprocessing": "{}"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m benchmarks.lesion_wise",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="runs/lesion_wise")
  p.add_argument("--config", default="configs/table1_demo.py",
                 help="Config file; its get_config(--model) is trained.")
  p.add_argument("--model", default="msconvlstm_att")
  p.add_argument("--cases", type=int, default=None,
                 help="Synthetic cases (default: the config's data.synthetic_cases).")
  p.add_argument("--metastases", type=int, default=6,
                 help="Up to this many small metastases per case (data_pipelines.synthetic).")
  p.add_argument("--challenge", default="MET", choices=sorted(synthetic.CHALLENGES),
                 help="Case-name prefix, BraTS-<challenge>-NNNNN-000 (auto rules follow it).")
  p.add_argument("--seed", type=int, default=0, help="Seed of the synthetic cases.")
  p.add_argument("--lesion_rules", default="auto",
                 help="evaluate's --lesion_rules for scoring and the lesion objective: auto "
                      "(the challenge's 2023 rule set) or a rule set's name.")
  p.add_argument("--override", action="append", default=[],
                 help="A training config override KEY=VALUE (without --config.), repeatable.")
  args = p.parse_args(argv)
  # The trainer runs in the repository's root: the paths it gets are absolute.
  args.workdir, args.config = os.path.abspath(args.workdir), os.path.abspath(args.config)
  evaluate_folder.check_lesion_rules_flag(args.lesion_rules)
  if args.lesion_rules == "off":
    raise ValueError("--lesion_rules=off: the benchmark scores lesion-wise; give auto or a "
                     "rule set's name.")
  return args


def train_command(args: argparse.Namespace, source_dir: str, run_dir: str) -> List[str]:
  return [sys.executable, "-m", "msatt_jax.train", f"--config={args.config}:{args.model}",
          f"--workdir={run_dir}", f"--config.data.source_dir={source_dir}",
          f"--config.data.data_dir={os.path.join(args.workdir, 'prepared')}",
          *(f"--config.{o}" for o in args.override)]


def score_case(case_id: str, labels: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
               label_set: str, lesion_rules: str) -> Dict[str, Any]:
  """One case's voxel-wise and lesion-wise scores, as evaluate's per_case.csv holds them."""
  row = {"case": case_id, **metrics.region_scores(labels, ref, spacing, "official", label_set)}
  rules = evaluate_folder.case_lesion_rules(case_id, lesion_rules, label_set)
  row, _ = evaluate_folder.add_lesion_scores(row, labels, ref, spacing, rules, label_set)
  return row


def table_row(name: str, rows: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
  """The table's row of one postprocessing from its per-case scores."""
  regions = [k[len("lesion_dice_"):] for k in rows[0] if k.startswith("lesion_dice_")]
  mean = lambda key: float(np.mean([r[key] for r in rows]))
  out = {"postprocessing": name}
  out.update({f"Dice {g}": mean(f"dice_{g}") for g in DICE_REGIONS})
  out["Dice mean"] = float(np.mean([out[f"Dice {g}"] for g in DICE_REGIONS]))
  out["lesion Dice"] = float(np.mean([mean(f"lesion_dice_{g}") for g in regions]))
  out["lesion HD95"] = float(np.mean([mean(f"lesion_hd95_{g}") for g in regions]))
  for count in ("TP", "FN", "FP"):
    out[count] = int(sum(r[f"lesions_{count.lower()}_{g}"] for r in rows for g in regions))
  return out


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
  lines += ["| " + " | ".join(FORMATS.get(c, "{:.3f}").format(r[c]) for c in COLUMNS) + " |"
            for r in rows]
  return "\n".join(lines)


def peak_rss_gb() -> Dict[str, float]:
  """The kernel's high-water marks: this process's, and the largest of its finished children's
  (the trainer)."""
  kb = lambda who: resource.getrusage(who).ru_maxrss / 1e6  # Linux: kilobytes.
  return {"this_process": kb(resource.RUSAGE_SELF), "trainer": kb(resource.RUSAGE_CHILDREN)}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  start = time.perf_counter()
  args = parse_args(argv)
  config = planning.load_config(args.config, args.model)
  num_cases = args.cases or config.data.synthetic_cases
  source_dir = os.path.join(args.workdir, "synthetic")
  run_dir = os.path.join(args.workdir, "run")
  t0 = time.perf_counter()
  synthetic.generate_dataset_atomically(
      source_dir, "brats2023", num_cases, tuple(config.data.synthetic_shape), args.seed,
      metastases=args.metastases, challenge=args.challenge)
  seconds = {"generate": time.perf_counter() - t0}

  t0 = time.perf_counter()
  command = train_command(args, source_dir, run_dir)
  print("# " + " ".join(command), flush=True)
  if subprocess.run(command, cwd=common.REPO_ROOT, check=False).returncode != 0:
    raise RuntimeError(f"training failed: {' '.join(command)}")
  seconds["prepare_and_train"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  (run,) = inference.restore_runs([run_dir], "best")
  options = inference.Options(postprocess="none")  # TTA on, as evaluate's default.
  _, _, preds, refs, order = postprocess.predict_validation([run], options)
  chosen = {"voxel-chosen": postprocess.choose_rules(preds, refs, label_set=run.label_set),
            "lesion-chosen": postprocess.choose_rules(
                preds, refs, objective="lesion", spacings=[s for _, s in order],
                lesion_rules=postprocess.validation_lesion_rules(
                    [c for c, _ in order], args.lesion_rules, run.label_set),
                label_set=run.label_set)}
  rules = {"none": None, **{name: r for name, (r, _) in chosen.items()}}
  seconds["validation_and_choice"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  data_config = inference.run_data_config(run)
  case_ids = input_pipeline.split_cases(data_config, "test")
  predictor = inference.Predictor.from_runs(run, options)
  per_case: Dict[str, List[Dict[str, Any]]] = {name: [] for name in POSTPROCESSING}
  for case in inference.labelled_cases(data_config, case_ids, "test"):
    labels = predictor.segment(case.image).unprocessed
    for name in POSTPROCESSING:
      processed = labels if rules[name] is None else rules[name](labels)
      per_case[name].append(score_case(case.case_id, processed, case.label, case.spacing,
                                       run.label_set, args.lesion_rules))
  seconds["test"] = time.perf_counter() - t0

  rows = [table_row(name, per_case[name]) for name in POSTPROCESSING]
  lesion_sets = sorted({r["lesion_rules"] for r in per_case["none"]})
  result = {
      "command": "python -m benchmarks.lesion_wise " + " ".join(argv or sys.argv[1:]),
      "train_command": command, "cases": num_cases, "metastases": args.metastases,
      "challenge": args.challenge, "test_cases": case_ids, "table": rows,
      "rules": {name: {"rules": r.to_json(), "description": r.describe(),
                       "validation_objective_before": report["dice_before"],
                       "validation_objective_after": report["dice_after"]}
                for name, (r, report) in chosen.items()},
      "lesion_rules": {n: metrics.LESION_RULES[n].describe() for n in lesion_sets},
      "per_case": per_case, "seconds": seconds,
      "wall_s": time.perf_counter() - start, "peak_rss_gb": peak_rss_gb()}
  reporting.write_json(os.path.join(args.workdir, "lesion_wise.json"), result)
  print()
  print(f"{len(case_ids)} test cases (BraTS-{args.challenge}, up to {args.metastases} "
        f"metastases each), lesion rules {', '.join(lesion_sets)}:")
  print()
  print(markdown_table(rows))
  print()
  for name, (r, _) in chosen.items():
    print(f"{name}: {r.describe()}")
  rss = result["peak_rss_gb"]
  print(f"wall {result['wall_s']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}"
        f"); peak RSS {rss['this_process']:.2f} GB (this process), {rss['trainer']:.2f} GB "
        "(the trainer)")
  return result


if __name__ == "__main__":
  main()
