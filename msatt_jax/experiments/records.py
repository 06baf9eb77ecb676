"""What the experiment writes beside its runs, and reads back: the experiment's record (data
settings and patient split), each run's record (its config) and done marker, and the run's own
logs (metrics.jsonl, the evaluator's per_case.csv). A workdir whose records say its runs were
made otherwise is refused before anything is written.
"""

import csv
import json
import os
import statistics
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from msatt_jax import workdir_lock
from msatt_jax.experiments import planning

EXPERIMENT_RECORD = "experiment.json"  # The data settings and patient split of the experiment.
RUN_RECORD = "run.json"  # A run's config and data settings, written before it trains.
DONE_MARKER = "done.json"  # Written once a run has trained to its last step.


def read_json(path: str) -> Optional[Any]:
  """A record's content; None where it does not exist; ValueError naming it if unreadable."""
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except ValueError as e:
    raise ValueError(f"{path}: not a readable JSON record ({e}).") from None


def check_workdir(workdir: str, runs: Sequence[planning.Run],
                  identity: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
  """Refuses a workdir whose records say its runs were made otherwise; returns the experiment
  record (None for a new experiment). Reads only."""
  path = os.path.join(workdir, EXPERIMENT_RECORD)
  record = read_json(path)
  if record is not None:
    found = planning.differences(record["data"], identity)
    if found:
      raise ValueError(f"{path}: this experiment's runs were made with other data settings "
                       f"({planning.listed(found)}). Rerun with those, or use another "
                       "--workdir; nothing was changed.")
  for run in runs:
    if not os.path.isdir(run.workdir):
      continue
    run_record = read_json(os.path.join(run.workdir, RUN_RECORD))
    if run_record is None:
      if set(os.listdir(run.workdir)) - {workdir_lock.LOCK_NAME}:
        raise ValueError(f"{run.workdir}: holds files this experiment did not write (no "
                         f"{RUN_RECORD}), which would be mixed in silently. Move the folder "
                         "away or use another --workdir; nothing was changed.")
      continue
    found = planning.differences(run_record["data"], identity)
    what = "other data settings"
    if not found:
      found = planning.differences(run_record["config"], planning.comparable_config(run.config))
      what = "another config"
    if found:
      raise ValueError(f"{run.workdir}: this run was trained with {what} "
                       f"({planning.listed(found)}). Rerun with the same settings, move the "
                       "folder away, or use another --workdir; nothing was changed.")
  return record


def is_done(run: planning.Run) -> bool:
  return os.path.exists(os.path.join(run.workdir, DONE_MARKER))


# The evaluator's per_case.csv columns that hold names: the case, its lesion rule set.
TEXT_COLUMNS = ("case", "lesion_rules")


def read_per_case(path: str) -> List[Dict[str, Any]]:
  """The evaluator's per_case.csv: the TEXT_COLUMNS as text, every other column as a float; an
  empty cell (a score the case has not) left out."""
  with open(path, encoding="utf-8", newline="") as f:
    return [{k: (v if k in TEXT_COLUMNS else float(v)) for k, v in row.items() if v != ""}
            for row in csv.DictReader(f)]


def read_metrics(workdir: str) -> List[Dict[str, Any]]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def training_speed(rows: Sequence[Mapping[str, Any]], batch_size: int) -> Tuple[float, float]:
  """(seconds in training steps, median slices/s) from a run's logged training rates.

  Each logged rate covers the steps since the previous log (validation excluded); the median
  leaves out the first interval, which holds the compilation.
  """
  logged = sorted((r for r in rows if "slices_per_second" in r), key=lambda r: r["step"])
  seconds, previous = 0.0, 0
  for r in logged:
    seconds += (r["step"] - previous) * batch_size / max(r["slices_per_second"], 1e-12)
    previous = r["step"]
  rates = [r["slices_per_second"] for r in logged]
  return seconds, float(statistics.median(rates[1:] or rates)) if rates else float("nan")
