"""The experiment's work, in order: the one data set prepared, every run trained (resumed where
it stopped), every run's best checkpoint evaluated on the test split, then the outputs
(outputs.py). Each step skips what an earlier invocation finished.
"""

import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

from absl import logging
import ml_collections
import numpy as np

from data_pipelines import input_pipeline
from data_pipelines import prepare as prepare_lib
from data_pipelines.brats import builder as builder_lib
from data_pipelines.brats import labels as labels_lib
from msatt_jax import checkpointing
from msatt_jax import evaluate
from msatt_jax import evaluate_folder
from msatt_jax import inference
from msatt_jax import losses
from msatt_jax import metrics
from msatt_jax import reporting
from msatt_jax import train
from msatt_jax import workdir_lock
from msatt_jax.experiments import outputs
from msatt_jax.experiments import planning
from msatt_jax.experiments import records
from msatt_jax.experiments import report


def prepare_data(workdir: str, runs: Sequence[planning.Run], identity: Mapping[str, Any],
                 record: Optional[Dict[str, Any]]) -> ml_collections.ConfigDict:
  """Prepares the one data set (once), checks or records the split, points every run at it."""
  data = ml_collections.ConfigDict(runs[0].config.data.to_dict())
  data_root = os.path.join(workdir, "data")
  if not data.data_dir:
    data.data_dir = os.path.join(data_root, "prepared")
  data = prepare_lib.prepare_for_training(data, data_root)
  split = {s: input_pipeline.split_cases(data, s) for s in builder_lib.SPLITS}
  path = os.path.join(workdir, records.EXPERIMENT_RECORD)
  if record is None:
    reporting.write_json(path, {"data": identity, "split": split,
                                "source_dir": data.source_dir, "data_dir": data.data_dir})
  elif record["split"] != split:
    raise ValueError(f"{path}: the experiment's patient split differs from the one of the data "
                     f"prepared now in {data.data_dir}; its runs cannot be compared with new "
                     "ones. Use another --workdir; nothing was changed.")
  for run in runs:
    run.config.data.source_dir = data.source_dir
    run.config.data.data_dir = data.data_dir
  return data


def train_runs(runs: Sequence[planning.Run], identity: Mapping[str, Any]) -> None:
  """Trains every unfinished run (resuming any that stopped), each to its done marker."""
  todo = [run for run in runs if not records.is_done(run)]
  logging.info("[table1] %d runs: %d finished earlier (skipped), %d to train.", len(runs),
               len(runs) - len(todo), len(todo))
  spent: List[float] = []
  for i, run in enumerate(todo):
    eta = (f"; ETA of the remaining training about "
           f"{report.duration(np.mean(spent) * (len(todo) - i))}" if spent else "")
    logging.info("[table1] training %s (%d/%d to train; %d of %d runs done%s).", run.name,
                 i + 1, len(todo), len(runs) - len(todo) + i, len(runs), eta)
    os.makedirs(run.workdir, exist_ok=True)
    record_path = os.path.join(run.workdir, records.RUN_RECORD)
    if not os.path.exists(record_path):
      reporting.write_json(record_path, {
          "run": run.name, "variant": run.variant, "seed": run.seed,
          "config": planning.comparable_config(run.config), "data": identity})
    start = time.perf_counter()
    state = train.train_and_evaluate(run.config, run.workdir)
    reporting.write_json(os.path.join(run.workdir, records.DONE_MARKER), {
        "step": int(state.step),
        "steps_per_epoch": input_pipeline.steps_per_epoch(run.config.data,
                                                          run.config.batch_size)})
    spent.append(time.perf_counter() - start)
    logging.info("[table1] %s trained to step %d in %s.", run.name, int(state.step),
                 report.duration(spent[-1]))


def lesion_rules_of_test_cases(data: ml_collections.ConfigDict, requested: str,
                               label_set: str = labels_lib.DEFAULT_LABEL_SET) -> Dict[str, str]:
  """Test case -> the name of its lesion rule set under --lesion_rules for runs of `label_set`
  (evaluate's resolution); {} when none has one. ValueError when only some have one: Table I
  scores every case alike."""
  cases = input_pipeline.split_cases(data, "test")
  scored = {}
  for case in cases:
    rules = evaluate_folder.case_lesion_rules(case, requested, label_set)
    if rules is not None:
      scored[case] = rules.name
  if scored and len(scored) != len(cases):
    without = sorted(set(cases) - set(scored))
    raise ValueError(f"--lesion_rules={requested} gives a lesion rule set to {len(scored)} of "
                     f"the {len(cases)} test cases (not to {', '.join(without[:3])}"
                     f"{' ...' if len(without) > 3 else ''}); Table I scores every case alike: "
                     "pass a rule set's name or off.")
  return scored


def _evaluation_exists(out_dir: str, lesion_rules: Mapping[str, str]) -> bool:
  """An earlier evaluation in out_dir scored the cases under the same lesion rules (an older
  one, written without lesion rules, records none)."""
  summary = records.read_json(os.path.join(out_dir, "summary.json"))
  return (os.path.exists(os.path.join(out_dir, "per_case.csv")) and summary is not None and
          summary.get("lesion_rules", {}).get("cases", {}) == dict(lesion_rules))


def evaluate_runs(runs: Sequence[planning.Run], workdir: str, lesion_rules: str,
                  scored: Mapping[str, str]) -> List[report.RunResult]:
  """Each run's best checkpoint on the test split, evaluated once (then read back) with
  --lesion_rules=lesion_rules; scored: lesion_rules_of_test_cases' answer for it."""
  results = []
  for i, run in enumerate(runs):
    checkpointer = checkpointing.Checkpointer(run.workdir, read_only=True)
    step = checkpointer.resolve("best")
    checkpointer.close()
    out_dir = os.path.join(run.workdir, f"eval_test_step{step}")
    csv_path = os.path.join(out_dir, "per_case.csv")
    if _evaluation_exists(out_dir, scored):
      logging.info("[table1] %s: the test evaluation of step %d exists (%d/%d).", run.name,
                   step, i + 1, len(runs))
    else:
      logging.info("[table1] evaluating %s, checkpoint %d, on the test split (%d/%d).",
                   run.name, step, i + 1, len(runs))
      evaluate.evaluate(run.workdir, "test", inference.Options(checkpoint=str(step)),
                        out_dir=out_dir, num_figures=0, lesion_rules=lesion_rules)
    seconds, rate = records.training_speed(records.read_metrics(run.workdir),
                                           run.config.batch_size)
    results.append(report.RunResult(
        run=run.name, variant=run.variant, seed=run.seed, checkpoint_step=step,
        per_case_csv=os.path.relpath(csv_path, workdir), rows=records.read_per_case(csv_path),
        train_seconds=seconds, slices_per_second=rate))
  return results


def run_experiment(workdir: str, runs: Sequence[planning.Run], models: Sequence[str],
                   ablations: Sequence[str], seeds: Sequence[int],
                   num_figure_cases: int, lesion_rules: str = "auto") -> Dict[str, Any]:
  """The whole experiment in the workdir (held by one process); returns table1.json's content.
  lesion_rules: evaluate's --lesion_rules for the test split (auto: a 2023+ case name's rules)."""
  evaluate_folder.check_lesion_rules_flag(lesion_rules)
  # Before the runs' configs point at the prepared data (the folders are no data setting).
  identity = planning.data_identity(runs[0].config.data)
  record = records.check_workdir(workdir, runs, identity)
  with workdir_lock.hold(workdir):
    data = prepare_data(workdir, runs, identity, record)
    # Before any training; the label set is the runs' (they share their data settings).
    scored = lesion_rules_of_test_cases(data, lesion_rules, losses.label_set_name(runs[0].config))
    train_runs(runs, identity)
    results = evaluate_runs(runs, workdir, lesion_rules, scored)
    used = {"requested": lesion_rules,
            "rules": {n: metrics.LESION_RULES[n].describe() for n in sorted(set(scored.values()))}}
    table = outputs.write_outputs(workdir, runs, results, models, ablations, seeds, data,
                                  num_figure_cases, used if scored else None)
  return table
