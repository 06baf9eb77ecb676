r"""Reproduce the paper's Table I, and test its claims, with one command.

  python -m msatt_jax.experiments.table1 --config=configs/brats18.py --workdir=runs/table1 \
      --config.data.source_dir=/data/Task01_BrainTumour \
      [--models=msconvlstm_att,unet,attunet,fcn] [--ablations=no_convlstm,no_se,no_sam,...] \
      [--seeds=0,1,2] [--config.<key>=<value> ...]
  python -m msatt_jax.experiments.table1 --config=configs/table1_demo.py \
      --workdir=runs/table1_demo          # the CPU-sized preset on synthetic data

The config file's get_config(model) gives each model's config (as configs/brats18.py:unet does
for one run); the --config.<key> overrides are applied to every run's config, a `model.` key
only to the models that have it (the flags are parsed against the file's get_config(), which
is MSConvLSTM-Att's in the shipped configs). Every
(model, seed) trains in <workdir>/<model>_seed<k>/ (an ablation in
<workdir>/msconvlstm_att-<ablation>_seed<k>/), all on one prepared data set and one patient
split: the data are prepared once, into <workdir>/data/ unless config.data.data_dir names a
folder. Then every run's best-validation checkpoint is evaluated on the test split by the
evaluator (msatt_jax/evaluate.py), and <workdir> receives:
  table1.md     Table I in the paper's layout beside the paper's numbers, HD95, the paired
                comparisons with MSConvLSTM-Att (and, with --ablations, the ablation table)
  table1.json   every number of those tables; per_case.csv: every run's per-case scores
  curves.png    validation mean Dice against epoch for every run
  fig7.png      the paper's Fig. 7 with every model side by side (the first seed's runs)
The statistics are described in msatt_jax/experiments/stats.py.

Interrupted? Rerun the same command: finished runs (a done.json beside their checkpoints) are
skipped, an unfinished one resumes from its newest checkpoint, and evaluations already written
are reused. The experiment records its data settings and patient split in
<workdir>/experiment.json and each run's config in <run>/run.json; a rerun with other data
settings, or a run folder trained with another config or not by this command, stops with one
`error: ...` line naming the file or folder, and nothing is overwritten.
"""

if __name__ == "__main__":
  # Before JAX loads: the XLA flags and allocator settings (msatt_jax/runtime.py) must be in
  # the environment from the start, which may re-execute this process once.
  from msatt_jax import runtime
  runtime.configure()

import csv
import dataclasses
import json
import os
import statistics
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
from ml_collections.config_flags import config_flags as config_flags_lib
from ml_collections.config_flags import config_path
import numpy as np

from data_pipelines import files
from data_pipelines import input_pipeline
from data_pipelines import prepare as prepare_lib
from data_pipelines.brats import builder as builder_lib
from data_pipelines.brats import layouts
from data_pipelines.brats import preprocess
from msatt_jax import checkpointing
from msatt_jax import cli
from msatt_jax import evaluate
from msatt_jax import models as models_lib
from msatt_jax import inference
from msatt_jax import preemption
from msatt_jax import reporting
from msatt_jax import steps
from msatt_jax import summary
from msatt_jax import train
from msatt_jax import visualize
from msatt_jax import workdir_lock
from msatt_jax.experiments import figures
from msatt_jax.experiments import report
from msatt_jax.models import msconvlstm_att

FLAGS = flags.FLAGS
MODEL_NAMES = tuple(models_lib.MODELS)
ABLATIONS = tuple(a for a in msconvlstm_att.ABLATIONS if a != "none")
EXPERIMENT_RECORD = "experiment.json"  # The data settings and patient split of the experiment.
RUN_RECORD = "run.json"  # A run's config and data settings, written before it trains.
DONE_MARKER = "done.json"  # Written once a run has trained to its last step.
MODEL_FIGURES = "model_figures.json"  # Parameter and FLOP counts, per model config.
# Keys that change how a run executes, not what it computes: a rerun may change them. The data
# folders are compared as the experiment's data settings instead.
EXECUTION_KEYS = ("parallel", "num_devices", "distributed", "log_every_steps", "data.prefetch",
                  "data.source_dir", "data.data_dir", "model.attention_implementation",
                  "model.convlstm_gate_convs")


@dataclasses.dataclass
class Run:
  name: str  # Folder name: <variant>_seed<k>.
  variant: str  # report.variant_name(model, ablation).
  seed: int
  config: ml_collections.ConfigDict
  workdir: str


# ------------------------------------------------------------------------------ the plan


def parse_names(flag: str, text: str, choices: Sequence[str], allow_empty: bool = False
                ) -> List[str]:
  """A comma-separated flag of names from `choices`; ValueError naming the flag otherwise."""
  names = [n.strip() for n in text.split(",") if n.strip()]
  unknown = [n for n in names if n not in choices]
  if unknown:
    raise ValueError(f"--{flag}: unknown name(s) {', '.join(map(repr, unknown))}; choose from "
                     f"{', '.join(choices)}.")
  if not names and not allow_empty:
    raise ValueError(f"--{flag}: give at least one of {', '.join(choices)}.")
  if len(set(names)) != len(names):
    raise ValueError(f"--{flag}: {text!r} names a model twice.")
  return names


def parse_seeds(text: str) -> List[int]:
  """'0,1,2' -> [0, 1, 2]; ValueError naming --seeds for anything else."""
  try:
    seeds = [int(s) for s in text.split(",")]
  except ValueError:
    raise ValueError(f"--seeds: {text!r} is not a comma-separated list of whole numbers, "
                     "e.g. --seeds=0,1,2.") from None
  if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
    raise ValueError(f"--seeds: {text!r} must list distinct non-negative whole numbers.")
  return seeds


def _jsonable(value: Any) -> Any:
  """Plain JSON values (tuples become lists), as a record read back holds them."""
  return json.loads(json.dumps(value))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(_flatten(value, path + "."))
    else:
      out[path] = value
  return out


def data_identity(data: ml_collections.ConfigDict) -> Dict[str, Any]:
  """What decides the experiment's data: the preprocessing, the layout, and the source folder
  (or the synthetic set generated in its place)."""
  identity = {"preprocessing": {name: data.get(name) for name in preprocess.defaults()},
              "layout": data.layout}
  if data.source_dir:
    identity["source_dir"] = os.path.abspath(os.path.expanduser(data.source_dir))
  else:
    identity["synthetic"] = {"cases": data.synthetic_cases, "shape": data.synthetic_shape,
                             "layout": data.synthetic_layout}
  return _jsonable(identity)


def comparable_config(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """A run's config as flat JSON values, without the EXECUTION_KEYS."""
  flat = _flatten(_jsonable(config.to_dict()))
  return {k: v for k, v in flat.items()
          if not any(k == e or k.startswith(e + ".") for e in EXECUTION_KEYS)}


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
  """'key: recorded X, now Y' for every flattened key that differs."""
  a, b = _flatten(recorded), _flatten(current)
  unset = object()
  return [f"{k}: recorded {a.get(k, 'unset')!r}, now {b.get(k, 'unset')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k, unset) != b.get(k, unset)]


def _listed(items: Sequence[str], limit: int = 3) -> str:
  return "; ".join(items[:limit]) + (f"; and {len(items) - limit} more" if len(items) > limit
                                     else "")


def load_config(filename: str, model: str) -> ml_collections.ConfigDict:
  """The config file's get_config(model), unlocked, as --config=<file>:<model> would give it."""
  return config_flags_lib.ConfigFileFlagParser("config", lock_config=False).parse(
      f"{filename}:{model}")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    variant: str) -> None:
  """The command line's --config.<key> values, into one run's config."""
  for path, value in overrides.items():
    try:
      config_path.get_value(path, config)
    except (KeyError, AttributeError):
      if path.startswith("model."):
        logging.info("--config.%s does not apply to %s: its model has no such key.", path,
                     variant)
        continue
      raise ValueError(f"--config.{path}: the config of {variant} has no such key.") from None
    config_path.set_value(path, config, value)


def plan(filename: str, overrides: Mapping[str, Any], models: Sequence[str],
         ablations: Sequence[str], seeds: Sequence[int], workdir: str) -> List[Run]:
  """Every run of the experiment with its config; nothing is read from or written to disk."""
  if ":" in filename:
    raise ValueError(f"--config: give the file without ':<model>' ({filename!r}); --models "
                     "chooses the models.")
  for path, flag in (("seed", "--seeds"), ("model.ablation", "--ablations"),
                     ("model.name", "--models")):
    if path in overrides:
      raise ValueError(f"--config.{path}: set by the experiment for each run; use {flag}.")
  if ablations and report.REFERENCE not in models:
    raise ValueError(f"--ablations: the ablations are compared with the full model, so "
                     f"--models must include {report.REFERENCE}.")
  runs = []
  for model, ablation in [(m, "none") for m in models] + [(report.REFERENCE, a)
                                                          for a in ablations]:
    variant = report.variant_name(model, ablation)
    base = load_config(filename, model)
    apply_overrides(base, overrides, variant)
    if ablation != "none":
      base.model.ablation = ablation
    for seed in seeds:
      config = base.copy_and_resolve_references()
      config.seed = seed
      name = f"{variant}_seed{seed}"
      runs.append(Run(name, variant, seed, config, os.path.join(workdir, name)))
  first = data_identity(runs[0].config.data)
  for run in runs:
    found = differences(first, data_identity(run.config.data))
    if found:
      raise ValueError(f"--config: {filename} gives {run.variant} other data settings than "
                       f"{runs[0].variant} ({_listed(found)}); Table I needs one data set.")
  return runs


# ------------------------------------------------------------------------------- records


def _read_json(path: str) -> Optional[Any]:
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except ValueError as e:
    raise ValueError(f"{path}: not a readable JSON record ({e}).") from None


def check_workdir(workdir: str, runs: Sequence[Run],
                  identity: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
  """Refuses a workdir whose records say its runs were made otherwise; returns the experiment
  record (None for a new experiment). Reads only."""
  path = os.path.join(workdir, EXPERIMENT_RECORD)
  record = _read_json(path)
  if record is not None:
    found = differences(record["data"], identity)
    if found:
      raise ValueError(f"{path}: this experiment's runs were made with other data settings "
                       f"({_listed(found)}). Rerun with those, or use another --workdir; "
                       "nothing was changed.")
  for run in runs:
    if not os.path.isdir(run.workdir):
      continue
    run_record = _read_json(os.path.join(run.workdir, RUN_RECORD))
    if run_record is None:
      if set(os.listdir(run.workdir)) - {workdir_lock.LOCK_NAME}:
        raise ValueError(f"{run.workdir}: holds files this experiment did not write (no "
                         f"{RUN_RECORD}), which would be mixed in silently. Move the folder "
                         "away or use another --workdir; nothing was changed.")
      continue
    found = differences(run_record["data"], identity)
    what = "other data settings"
    if not found:
      found = differences(run_record["config"], comparable_config(run.config))
      what = "another config"
    if found:
      raise ValueError(f"{run.workdir}: this run was trained with {what} "
                       f"({_listed(found)}). Rerun with the same settings, move the folder "
                       "away, or use another --workdir; nothing was changed.")
  return record


def prepare_data(workdir: str, runs: Sequence[Run], identity: Mapping[str, Any],
                 record: Optional[Dict[str, Any]]) -> ml_collections.ConfigDict:
  """Prepares the one data set (once), checks or records the split, points every run at it."""
  data = ml_collections.ConfigDict(runs[0].config.data.to_dict())
  data_root = os.path.join(workdir, "data")
  if not data.data_dir:
    data.data_dir = os.path.join(data_root, "prepared")
  data = prepare_lib.prepare_for_training(data, data_root)
  split = {s: input_pipeline.split_cases(data, s) for s in builder_lib.SPLITS}
  path = os.path.join(workdir, EXPERIMENT_RECORD)
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


# ---------------------------------------------------------------------- train and evaluate


def _is_done(run: Run) -> bool:
  return os.path.exists(os.path.join(run.workdir, DONE_MARKER))


def train_runs(runs: Sequence[Run], identity: Mapping[str, Any]) -> None:
  """Trains every unfinished run (resuming any that stopped), each to its done marker."""
  todo = [run for run in runs if not _is_done(run)]
  logging.info("[table1] %d runs: %d finished earlier (skipped), %d to train.", len(runs),
               len(runs) - len(todo), len(todo))
  spent: List[float] = []
  for i, run in enumerate(todo):
    eta = (f"; ETA of the remaining training about "
           f"{report.duration(np.mean(spent) * (len(todo) - i))}" if spent else "")
    logging.info("[table1] training %s (%d/%d to train; %d of %d runs done%s).", run.name,
                 i + 1, len(todo), len(runs) - len(todo) + i, len(runs), eta)
    os.makedirs(run.workdir, exist_ok=True)
    record_path = os.path.join(run.workdir, RUN_RECORD)
    if not os.path.exists(record_path):
      reporting.write_json(record_path, {
          "run": run.name, "variant": run.variant, "seed": run.seed,
          "config": comparable_config(run.config), "data": identity})
    start = time.perf_counter()
    state = train.train_and_evaluate(run.config, run.workdir)
    reporting.write_json(os.path.join(run.workdir, DONE_MARKER), {
        "step": int(state.step),
        "steps_per_epoch": input_pipeline.steps_per_epoch(run.config.data,
                                                          run.config.batch_size)})
    spent.append(time.perf_counter() - start)
    logging.info("[table1] %s trained to step %d in %s.", run.name, int(state.step),
                 report.duration(spent[-1]))


def read_per_case(path: str) -> List[Dict[str, Any]]:
  """The evaluator's per_case.csv: 'case' as text, every other column as a float."""
  with open(path, encoding="utf-8", newline="") as f:
    return [{k: (v if k == "case" else float(v)) for k, v in row.items()}
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


def evaluate_runs(runs: Sequence[Run], workdir: str) -> List[report.RunResult]:
  """Each run's best checkpoint on the test split, evaluated once (then read back)."""
  results = []
  for i, run in enumerate(runs):
    checkpointer = checkpointing.Checkpointer(run.workdir, read_only=True)
    step = checkpointer.resolve("best")
    checkpointer.close()
    out_dir = os.path.join(run.workdir, f"eval_test_step{step}")
    csv_path = os.path.join(out_dir, "per_case.csv")
    if os.path.exists(csv_path) and os.path.exists(os.path.join(out_dir, "summary.json")):
      logging.info("[table1] %s: the test evaluation of step %d exists (%d/%d).", run.name,
                   step, i + 1, len(runs))
    else:
      logging.info("[table1] evaluating %s, checkpoint %d, on the test split (%d/%d).",
                   run.name, step, i + 1, len(runs))
      evaluate.evaluate(workdir=run.workdir, checkpoint=str(step), split="test",
                        out_dir=out_dir, num_figures=0)
    seconds, rate = training_speed(read_metrics(run.workdir), run.config.batch_size)
    results.append(report.RunResult(
        run=run.name, variant=run.variant, seed=run.seed, checkpoint_step=step,
        per_case_csv=os.path.relpath(csv_path, workdir), rows=read_per_case(csv_path),
        train_seconds=seconds, slices_per_second=rate))
  return results


# ---------------------------------------------------------------------- figures and tables


def count_model(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """Parameters, and GFLOP of one forward pass of one slice (summary.py's XLA count)."""
  model = steps.create_model(config)
  image = jax.ShapeDtypeStruct((1, *steps.input_shape(config)), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), image)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  flops = summary.xla_flops(forward.lower(variables, image).compile())
  return {"num_params": sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"])),
          "forward_gflop_per_slice": None if flops is None else flops / 1e9}


def model_figures(runs: Sequence[Run], workdir: str) -> Dict[str, Dict[str, Any]]:
  """count_model of each variant, cached in MODEL_FIGURES under the config it was counted for."""
  path = os.path.join(workdir, MODEL_FIGURES)
  cache = _read_json(path) or {}
  out = {}
  for run in runs:
    if run.variant in out:
      continue
    key = _jsonable({"model": run.config.model.to_dict(), "loss": run.config.loss,
                     "input_shape": steps.input_shape(run.config)})
    entry = cache.get(run.variant)
    if entry is None or entry["key"] != key:
      logging.info("[table1] counting the parameters and FLOPs of %s.", run.variant)
      entry = {"key": key, **count_model(run.config)}
    out[run.variant] = entry
  if any(cache.get(v) != e for v, e in out.items()):
    reporting.write_json(path, {**cache, **out})
  return out


def curves(runs: Sequence[Run]) -> figures.Image.Image:
  series = []
  for run in runs:
    per_epoch = _read_json(os.path.join(run.workdir, DONE_MARKER))["steps_per_epoch"]
    points = [(r["step"] / per_epoch, r["val_dice_mean"]) for r in read_metrics(run.workdir)
              if "val_dice_mean" in r]
    series.append((run.name, [p[0] for p in points], [p[1] for p in points]))
  return figures.curves_figure(series, "Validation mean Dice (ET, TC, WT) of every run",
                               "epoch", "validation mean Dice")


def _figure_slice(label: np.ndarray, data: ml_collections.ConfigDict) -> int:
  """The axial slice with the most tumour within the segmented range."""
  start, stop = data.slice_start, min(data.slice_stop, label.shape[-1] - 1)
  return start + visualize.most_tumour_slice(label[..., start:stop + 1])


def fig7(results: Sequence[report.RunResult], runs: Sequence[Run], models: Sequence[str],
         data: ml_collections.ConfigDict, case_ids: Sequence[str]) -> figures.Image.Image:
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
    predict = inference.make_predict_fn(trained.model, trained.variables, trained.config.loss)
    predictions.append([
        inference.segment_volume(predict, case.image, data, slice_range=(z, z),
                                 batch_size=1)[:, :, z] for case, z in zip(cases, slices)])
  rows = [(f"{c}, axial slice {z}", case.image[:, :, z, :], case.label[:, :, z],
           [p[i] for p in predictions])
          for i, (c, case, z) in enumerate(zip(case_ids, cases, slices))]
  return figures.comparison_figure(rows, tuple(data.modalities),
                                   [report.display_name(m) for m in models])


def write_outputs(workdir: str, runs: Sequence[Run], results: Sequence[report.RunResult],
                  models: Sequence[str], ablations: Sequence[str], seeds: Sequence[int],
                  data: ml_collections.ConfigDict, num_figure_cases: int) -> Dict[str, Any]:
  """table1.md, table1.json, per_case.csv, curves.png and fig7.png (each written atomically)."""
  out = lambda name: os.path.join(workdir, name)
  test_cases = sorted(input_pipeline.split_cases(data, "test"))[:num_figure_cases]
  fig7_key = {"runs": sorted([r.run, r.checkpoint_step] for r in results
                             if r.variant in models), "cases": test_cases}
  table = report.build(results, models, ablations, model_figures(runs, workdir),
                       {"models_compared": list(models), "ablations_compared": list(ablations),
                        "seeds": list(seeds), "fig7": fig7_key})
  previous = _read_json(out("table1.json")) or {}
  if not (os.path.exists(out("fig7.png")) and previous.get("fig7") == _jsonable(fig7_key)):
    visualize.save_png(fig7(results, runs, models, data, test_cases), out("fig7.png"))
  visualize.save_png(curves(runs), out("curves.png"))
  reporting.write_csv(out("per_case.csv"), report.per_case_rows(results))
  reporting.write_json(out("table1.json"), table)
  files.atomic_write_text(out("table1.md"), report.markdown(table))
  return table


def run_experiment(workdir: str, runs: Sequence[Run], models: Sequence[str],
                   ablations: Sequence[str], seeds: Sequence[int],
                   num_figure_cases: int) -> Dict[str, Any]:
  # Before the runs' configs point at the prepared data (the folders are no data setting).
  identity = data_identity(runs[0].config.data)
  record = check_workdir(workdir, runs, identity)
  with workdir_lock.hold(workdir):
    data = prepare_data(workdir, runs, identity, record)
    train_runs(runs, identity)
    results = evaluate_runs(runs, workdir)
    table = write_outputs(workdir, runs, results, models, ablations, seeds, data,
                          num_figure_cases)
  return table


# ---------------------------------------------------------------------------- command line


def define_flags() -> None:
  """The command's flags; defined only by run(), so importing this module registers none."""
  config_flags.DEFINE_config_file(
      "config", None, "Config file whose get_config(model) gives each model's run, e.g. "
      "configs/brats18.py; --config.<key>=<value> overrides apply to every run.",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Experiment folder: one subfolder per run, the tables "
                      "and figures.")
  flags.DEFINE_string("models", ",".join(MODEL_NAMES),
                      f"Comma-separated models, of {', '.join(MODEL_NAMES)}.")
  flags.DEFINE_string("ablations", "", "Comma-separated ablations of MSConvLSTM-Att, of "
                      f"{', '.join(ABLATIONS)} (docs/architecture.md).")
  flags.DEFINE_string("seeds", "0", "Comma-separated seeds; each model trains once per seed.")
  flags.DEFINE_integer("fig7_cases", 3, "Test cases drawn in fig7.png (one slice each).")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str]) -> Dict[str, Any]:
  del argv
  models = parse_names("models", FLAGS.models, MODEL_NAMES)
  ablations = parse_names("ablations", FLAGS.ablations, ABLATIONS, allow_empty=True)
  seeds = parse_seeds(FLAGS.seeds)
  if FLAGS.fig7_cases < 1:
    raise ValueError(f"--fig7_cases: must be at least 1, not {FLAGS.fig7_cases}.")
  flag = FLAGS["config"]
  runs = plan(config_flags.get_config_filename(flag), config_flags.get_override_values(flag),
              models, ablations, seeds, FLAGS.workdir)
  try:
    table = run_experiment(FLAGS.workdir, runs, models, ablations, seeds, FLAGS.fig7_cases)
  except preemption.Preempted as e:
    raise cli.CommandExit(f"{e} Rerun the same command to complete the experiment.",
                          e.exit_status) from e
  print(report.markdown(table))
  print(f"Table I, statistics and figures in {os.path.abspath(FLAGS.workdir)}")
  return table


def run() -> None:
  cli.run_command(main, define_flags)


if __name__ == "__main__":
  run()
