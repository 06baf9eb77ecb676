"""The experiment's plan: every run of Table I with its config, from the config file, the
command line's overrides, the models, ablations and seeds. Nothing is read from or written to
disk but the config file.

Also what a run's config is compared by: `data_identity` (what decides the data) and
`comparable_config` (the config without the keys that change only how a run executes), which the
records (records.py) hold and a rerun is checked against.
"""

import dataclasses
import importlib.util
import json
import os
from typing import Any, Dict, List, Mapping, Sequence

from absl import logging
import ml_collections
from ml_collections.config_flags import config_path

from data_pipelines.brats import preprocess
from msatt_jax import models as models_lib
from msatt_jax.experiments import report
from msatt_jax.models import msconvlstm_att

MODEL_NAMES = tuple(models_lib.MODELS)
ABLATIONS = tuple(a for a in msconvlstm_att.ABLATIONS if a != "none")
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


def jsonable(value: Any) -> Any:
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
  return jsonable(identity)


def comparable_config(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """A run's config as flat JSON values, without the EXECUTION_KEYS."""
  flat = _flatten(jsonable(config.to_dict()))
  return {k: v for k, v in flat.items()
          if not any(k == e or k.startswith(e + ".") for e in EXECUTION_KEYS)}


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
  """'key: recorded X, now Y' for every flattened key that differs."""
  a, b = _flatten(recorded), _flatten(current)
  unset = object()
  return [f"{k}: recorded {a.get(k, 'unset')!r}, now {b.get(k, 'unset')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k, unset) != b.get(k, unset)]


def listed(items: Sequence[str], limit: int = 3) -> str:
  return "; ".join(items[:limit]) + (f"; and {len(items) - limit} more" if len(items) > limit
                                     else "")


def load_config(filename: str, model: str) -> ml_collections.ConfigDict:
  """The config file's get_config(model), as --config=<file>:<model> gives it."""
  spec = importlib.util.spec_from_file_location(
      "table1_config_" + os.path.splitext(os.path.basename(filename))[0], filename)
  if spec is None:
    raise ValueError(f"--config: {filename} is not a Python config file.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(model)


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
  """Every run of the experiment with its config; only the config file is read."""
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
                       f"{runs[0].variant} ({listed(found)}); Table I needs one data set.")
  return runs
