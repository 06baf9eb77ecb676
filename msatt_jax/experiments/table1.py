r"""Reproduce the paper's Table I, and test its claims, with one command.

  python -m msatt_jax.experiments.table1 --config=configs/brats18.py --workdir=runs/table1 \
      --config.data.source_dir=/data/Task01_BrainTumour \
      [--models=msconvlstm_att,unet,attunet,fcn] [--ablations=no_convlstm,no_se,no_sam,...] \
      [--seeds=0,1,2] [--lesion_rules=auto|off|NAME] [--config.<key>=<value> ...]
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
With lesion rules (--lesion_rules, as evaluate's: auto = the 2023 rule set of a 2023+ case
name's challenge, e.g. BraTS-MET-... -> met2023, none for older data; off; or a rule set's name
for every case) the tables also hold the BraTS 2023+ lesion-wise Dice and HD95 of every model,
with the same statistics and the paired comparisons of the lesion-wise Dice; table1.json and
per_case.csv hold their numbers. Older data's outputs are unchanged.
The statistics are described in msatt_jax/experiments/stats.py. This module is the command;
the experiment's parts sit beside it: planning.py (the runs and their configs), records.py (what
is recorded and checked on a rerun), runner.py (prepare, train, evaluate), outputs.py (the
tables, figures and model counts), report.py, stats.py and figures.py.

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

import os
from typing import Any, Dict, Sequence

from absl import flags
from ml_collections import config_flags

from msatt_jax import cli
from msatt_jax import evaluate_folder
from msatt_jax import preemption
from msatt_jax.experiments import planning
from msatt_jax.experiments import report
from msatt_jax.experiments import runner

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; defined only by run(), so importing this module registers none."""
  config_flags.DEFINE_config_file(
      "config", None, "Config file whose get_config(model) gives each model's run, e.g. "
      "configs/brats18.py; --config.<key>=<value> overrides apply to every run.",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Experiment folder: one subfolder per run, the tables "
                      "and figures.")
  flags.DEFINE_string("models", ",".join(planning.MODEL_NAMES),
                      f"Comma-separated models, of {', '.join(planning.MODEL_NAMES)}.")
  flags.DEFINE_string("ablations", "", "Comma-separated ablations of MSConvLSTM-Att, of "
                      f"{', '.join(planning.ABLATIONS)} (docs/architecture.md).")
  flags.DEFINE_string("seeds", "0", "Comma-separated seeds; each model trains once per seed.")
  flags.DEFINE_integer("fig7_cases", 3, "Test cases drawn in fig7.png (one slice each).")
  evaluate_folder.define_lesion_rules_flag()
  flags.adopt_module_key_flags(evaluate_folder)  # Listed in this command's --help.
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str]) -> Dict[str, Any]:
  del argv
  models = planning.parse_names("models", FLAGS.models, planning.MODEL_NAMES)
  ablations = planning.parse_names("ablations", FLAGS.ablations, planning.ABLATIONS,
                                   allow_empty=True)
  seeds = planning.parse_seeds(FLAGS.seeds)
  if FLAGS.fig7_cases < 1:
    raise ValueError(f"--fig7_cases: must be at least 1, not {FLAGS.fig7_cases}.")
  evaluate_folder.check_lesion_rules_flag(FLAGS.lesion_rules)
  flag = FLAGS["config"]
  runs = planning.plan(config_flags.get_config_filename(flag),
                       config_flags.get_override_values(flag), models, ablations, seeds,
                       FLAGS.workdir)
  try:
    table = runner.run_experiment(FLAGS.workdir, runs, models, ablations, seeds,
                                  FLAGS.fig7_cases, FLAGS.lesion_rules)
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