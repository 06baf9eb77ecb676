"""Postprocessing rules chosen on a run's validation cases, as the strong BraTS pipelines do.

  python -m msatt_jax.postprocess --workdir=runs/paper [--checkpoint=best] [--notta]
  python -m msatt_jax.postprocess --workdir=runs/f0,runs/f1,runs/f2,runs/f3,runs/f4  # folds
  python -m msatt_jax.postprocess --workdir=runs/gli --objective=lesion [--lesion_rules=gli2023]

Predicts the validation cases once (TTA as evaluate's default; --notta without), keeps their
label volumes in memory, and tries two kinds of rule on them:
  * components: remove the 26-connected components (scipy.ndimage.label, a 3x3x3 structure) of
    a region smaller than N voxels, for WT, then TC, then ET;
  * small ET: relabel a case's whole predicted ET as NCR/NET when its volume is below T voxels
    (a case without ET scores Dice 1 when nothing is predicted, 0 for one stray voxel).
Removing from a nested region hands the voxels to the region around it, so the regions stay
nested and the enclosing one keeps its extent: a removed WT component becomes background, a
removed TC component (NCR/NET and ET voxels) becomes edema, a removed ET component NCR/NET.

The rules apply in that order (components WT, TC, ET, then the small-ET rule on the ET that is
left) and are chosen greedily in the same order: each size or threshold of its grid is tried
with the rules chosen before it applied, and the best is kept only if it raises the validation
mean Dice (the mean over cases of the mean of ET, TC and WT Dice) strictly; on a tie the
smaller value, the simpler rule, wins, and 0 means no rule. --objective=lesion chooses on the
BraTS 2023+ lesion-wise Dice instead (the mean over cases of the mean over the rule set's
regions; rule set per case from --lesion_rules, auto = the rule set of a 2023+ case name's
challenge, 2024 for a run of a 2024 label set, else 2023), the leaderboards' ranking since
2023, which stray components cost far more. The choice, the validation Dice
before and after, every trial, the cases, the runs and the TTA setting are written atomically
to <first workdir>/postprocessing.json, which evaluate and predict then apply by default
(--postprocess=auto; none skips it; or the path of another such file).

An ensemble (several workdirs): each validation case is predicted by the members whose
validation split holds it, averaged as the ensemble averages. For the folds of one
cross-validation that is the fold's own run alone, since every other fold trained on the case:
the pooled folds' validation cases are then predicted out of sample, as nnU-Net chooses its
postprocessing on its cross-validation predictions. Members sharing one split (other seeds)
predict their shared validation cases together, exactly as the ensemble will predict new cases.
"""

if __name__ == "__main__":
  # Before JAX loads: the XLA flags and allocator settings (msatt_jax/runtime.py) must be in
  # the environment from the start, which may re-execute this process once.
  from msatt_jax import runtime
  runtime.configure()

import dataclasses
import json
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from absl import flags
from absl import logging
import numpy as np
from scipy import ndimage

from data_pipelines.brats import labels as labels_lib
from msatt_jax import cli
from msatt_jax import evaluate_folder
from msatt_jax import inference
from msatt_jax import metrics
from msatt_jax import reporting

FILE_NAME = "postprocessing.json"
FORMAT_VERSION = 1
# The regions whose small components may be removed, in the order they apply (outside in).
COMPONENT_REGIONS = ("WT", "TC", "ET")
# What a removed component's voxels become: the label of the region around it.
REMOVED_TO = {"WT": 0, "TC": 2, "ET": 1}
# Classes 1 NCR/NET, 2 ED, 3 ET mean the same in every label set (labels.py), whose table says
# which classes each region holds.
ET_LABEL, NCR_LABEL = labels_lib.ENHANCING, labels_lib.NCR_NET
# The grids tried; 0 is "no rule" (nothing is below 0 voxels).
ET_THRESHOLDS = (0, 50, 100, 200, 300, 500, 750, 1000)
COMPONENT_SIZES = (0, 10, 20, 50, 100, 200, 300, 500, 1000)
CONNECTIVITY = 26
# What the greedy choice maximises (--objective), in words for the record.
OBJECTIVES = {
    "voxel": "mean over cases of the mean of ET, TC and WT Dice (voxel-wise)",
    "lesion": "mean over cases of the mean over the lesion rule set's regions of the BraTS "
              "2023+ lesion-wise Dice",
}
_RANKS = {6: 1, 18: 2, 26: 3}  # Neighbourhood -> generate_binary_structure's connectivity.
# Mean-Dice gains up to this are float rounding (the same Dice values summed in another
# order), so they count as ties.
_TIE = 1e-9


def region_mask(labels: np.ndarray, region: str,
                label_set: str = labels_lib.DEFAULT_LABEL_SET) -> np.ndarray:
  """The boolean mask of a region (ET, TC, WT, ...) of the label set in a canonical volume."""
  return np.isin(labels, labels_lib.label_set(label_set).region_classes(region))


@dataclasses.dataclass
class Components:
  """The connected components of one region of a label volume, labelled once and removed
  below any size (the choice tries many sizes)."""
  labels: np.ndarray
  region: str
  components: np.ndarray  # 0 outside the region, 1..K a component.
  sizes: np.ndarray  # (K + 1,) voxels per component; sizes[0] is outside.

  @classmethod
  def of(cls, labels: np.ndarray, region: str, connectivity: int = CONNECTIVITY,
         label_set: str = labels_lib.DEFAULT_LABEL_SET):
    structure = ndimage.generate_binary_structure(3, _RANKS[connectivity])
    components, _ = ndimage.label(region_mask(labels, region, label_set), structure)
    return cls(labels, region, components, np.bincount(components.ravel()))

  def without_smaller_than(self, min_voxels: int) -> np.ndarray:
    out = np.array(self.labels, np.uint8, copy=True)
    small = self.sizes < min_voxels
    small[0] = False  # Outside the region.
    if small.any():
      out[small[self.components]] = REMOVED_TO[self.region]
    return out


def remove_small_components(labels: np.ndarray, region: str, min_voxels: int,
                            connectivity: int = CONNECTIVITY,
                            label_set: str = labels_lib.DEFAULT_LABEL_SET) -> np.ndarray:
  """A copy of `labels` without the components of `region` smaller than min_voxels.

  The voxels of a removed component take the label of the region around it (REMOVED_TO):
  WT -> background, TC -> edema, ET -> NCR/NET; other voxels are unchanged. connectivity: 26
  (the rule's), or 18 / 6 neighbours.
  """
  labels = np.asarray(labels, np.uint8)
  if min_voxels <= 0:
    return labels.copy()
  return Components.of(labels, region, connectivity, label_set).without_smaller_than(min_voxels)


def relabel_small_et(labels: np.ndarray, min_voxels: int) -> np.ndarray:
  """A copy of `labels` with all ET relabelled NCR/NET when the case has fewer than
  min_voxels ET voxels (TC and WT are unchanged)."""
  out = np.array(labels, np.uint8, copy=True)
  et = out == ET_LABEL
  if 0 < np.count_nonzero(et) < min_voxels:
    out[et] = NCR_LABEL
  return out


@dataclasses.dataclass
class Rules:
  """Chosen postprocessing: a function of a canonical label volume (inference.LabelRules)."""
  min_component_voxels: Dict[str, int] = dataclasses.field(
      default_factory=lambda: {r: 0 for r in COMPONENT_REGIONS})
  et_min_voxels: int = 0
  source: Optional[str] = None  # The file they were read from, if any.
  label_set: str = labels_lib.DEFAULT_LABEL_SET  # Whose regions the rules act on.

  def __call__(self, labels: np.ndarray) -> np.ndarray:
    out = np.asarray(labels, np.uint8)
    for region in COMPONENT_REGIONS:
      out = remove_small_components(out, region, self.min_component_voxels.get(region, 0),
                                    label_set=self.label_set)
    return relabel_small_et(out, self.et_min_voxels)

  def to_json(self) -> Dict[str, Any]:
    return {"min_component_voxels": {r: int(self.min_component_voxels.get(r, 0))
                                     for r in COMPONENT_REGIONS},
            "et_min_voxels": int(self.et_min_voxels)}

  @property
  def is_identity(self) -> bool:
    return not self.et_min_voxels and not any(self.min_component_voxels.values())

  def describe(self) -> str:
    """One line naming what the rules do (for reports and the console)."""
    parts = [f"{r} components < {n} voxels -> {labels_lib.CLASS_NAMES[REMOVED_TO[r]]}"
             for r, n in self.to_json()["min_component_voxels"].items() if n]
    if self.et_min_voxels:
      parts.append(f"ET -> NCR/NET when a case has < {self.et_min_voxels} ET voxels")
    text = "; ".join(parts) if parts else "no rule (none raised the validation mean Dice)"
    return text + (f" [{self.source}]" if self.source else "")


def rules_from_json(obj: Mapping[str, Any], source: Optional[str] = None) -> Rules:
  """Rules from their JSON form ({'min_component_voxels': {...}, 'et_min_voxels': T})."""
  where = source or "postprocessing rules"
  try:
    sizes = dict(obj.get("min_component_voxels", {}))
    threshold = obj.get("et_min_voxels", 0)
    unknown = sorted(set(obj) - {"min_component_voxels", "et_min_voxels"}) + sorted(
        set(sizes) - set(COMPONENT_REGIONS))
    values = [threshold, *sizes.values()]
  except (AttributeError, TypeError, ValueError):
    raise ValueError(f"{where}: 'rules' must be an object of min_component_voxels and "
                     "et_min_voxels.") from None
  if unknown:
    raise ValueError(f"{where}: unknown rule key(s) {', '.join(unknown)}.")
  if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
    raise ValueError(f"{where}: rule sizes must be non-negative integers, got {values}.")
  return Rules({r: int(sizes.get(r, 0)) for r in COMPONENT_REGIONS}, int(threshold), source)


def load(path: str) -> Tuple[Rules, Dict[str, Any]]:
  """(the rules, the whole record) of a postprocessing.json; errors name the file."""
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not a postprocessing file ({e}).") from None
  if not isinstance(record, dict) or "rules" not in record:
    raise ValueError(f"{path}: not a postprocessing file (no 'rules').")
  rules = rules_from_json(record["rules"], path)
  rules.label_set = labels_lib.label_set(record.get("label_set", rules.label_set)).name
  return rules, record


def resolve(postprocess: str, workdir: str) -> Tuple[Optional[Rules], Optional[Dict[str, Any]]]:
  """--postprocess: 'auto' (workdir's postprocessing.json if present), 'none', or a file.

  Returns (rules or None, the file's record or None).
  """
  if postprocess == "none":
    return None, None
  path = os.path.join(workdir, FILE_NAME) if postprocess == "auto" else postprocess
  if postprocess == "auto" and not os.path.exists(path):
    return None, None
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: --postprocess names no file (use auto, none or the path "
                            "of a postprocessing.json).")
  return load(path)


def define_postprocess_flag() -> None:
  """--postprocess, shared by `evaluate` and `predict`."""
  flags.DEFINE_string("postprocess", "auto", "Rules chosen on validation data (python -m "
                      f"msatt_jax.postprocess): 'auto' = the first workdir's {FILE_NAME} when "
                      "it exists, 'none' = skip, or the path of such a file.")


def output_suffix(postprocess: str, workdir: str) -> str:
  """What a default output folder's name adds for --postprocess: nothing for the run's own
  rules (auto), '_nopostprocess' for none, '_postprocess-<file stem>' for another file."""
  if postprocess == "auto":
    return ""
  if postprocess == "none":
    return "_nopostprocess"
  if os.path.realpath(postprocess) == os.path.realpath(os.path.join(workdir, FILE_NAME)):
    return ""
  stem = os.path.basename(postprocess)
  stem = stem[:-len(".json")] if stem.endswith(".json") else stem
  return "_postprocess-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)


def mismatches(record: Mapping[str, Any], runs: Sequence[Any], tta: bool) -> List[str]:
  """How the runs/TTA of an evaluation differ from those the rules were chosen for."""
  chosen = [(os.path.abspath(r["workdir"]), r["checkpoint_step"]) for r in record.get("runs", [])]
  now = [(os.path.abspath(r.workdir), r.step) for r in runs]
  out = []
  if chosen != now:
    out.append(f"chosen for runs {chosen}, applied to {now}")
  if "tta" in record and bool(record["tta"]) != bool(tta):
    out.append(f"chosen with TTA {'on' if record['tta'] else 'off'}, applied with it "
               f"{'on' if tta else 'off'}")
  return out


def warn_if_mismatched(rules: Optional[Rules], record: Optional[Mapping[str, Any]],
                       runs: Sequence[Any], tta: bool) -> None:
  if rules is not None and record is not None:
    for difference in mismatches(record, runs, tta):
      logging.warning("Postprocessing %s: %s.", rules.source, difference)


# ---------------------------------------------------------------------------------------------
# Choosing the rules.


def crop_to_tumour(pred: np.ndarray, ref: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Both volumes cropped to the bounding box of their non-zero voxels.

  Exact for choosing rules: the rules only remove predicted voxels, Dice counts only voxels
  inside pred or ref, and no predicted component reaches outside the box.
  """
  nonzero = np.nonzero((pred > 0) | (ref > 0))
  if not nonzero[0].size:
    return np.zeros((1, 1, 1), np.uint8), np.zeros((1, 1, 1), np.uint8)
  box = tuple(slice(int(c.min()), int(c.max()) + 1) for c in nonzero)
  return np.ascontiguousarray(pred[box]), np.ascontiguousarray(ref[box])


def case_dice(pred: np.ndarray, ref: np.ndarray,
              label_set: str = labels_lib.DEFAULT_LABEL_SET) -> Dict[str, float]:
  """Dice of each region of the label set (ET, TC, WT, ...) of one case (BraTS empty rules)."""
  return {r: metrics.dice(region_mask(pred, r, label_set), region_mask(ref, r, label_set))
          for r in labels_lib.label_set(label_set).region_names}


def dice_summary(preds: Sequence[np.ndarray], refs: Sequence[np.ndarray],
                 label_set: str = labels_lib.DEFAULT_LABEL_SET) -> Dict[str, float]:
  """Mean Dice per region over the cases, and 'mean', their mean (the selection criterion)."""
  regions = labels_lib.label_set(label_set).region_names
  rows = [case_dice(p, r, label_set) for p, r in zip(preds, refs)]
  out = {r: float(np.mean([row[r] for row in rows])) for r in regions}
  out["mean"] = float(np.mean([out[r] for r in regions]))
  return out


def lesion_dice_summary(preds: Sequence[np.ndarray], refs: Sequence[np.ndarray],
                        spacings: Sequence[Sequence[float]],
                        rules: Sequence[metrics.LesionRules],
                        label_set: str = labels_lib.DEFAULT_LABEL_SET) -> Dict[str, float]:
  """Mean lesion-wise Dice per region over the cases, and 'mean', their mean (per-case rule
  sets; the regions of the first)."""
  rows = [metrics.lesion_scores(p, r, s, rule, with_hd95=False, label_set=label_set)[0]
          for p, r, s, rule in zip(preds, refs, spacings, rules)]
  regions = rules[0].regions
  out = {g: float(np.mean([row[f"lesion_dice_{g}"] for row in rows])) for g in regions}
  out["mean"] = float(np.mean([out[g] for g in regions]))
  return out


def _best(candidates: Sequence[int], score_of, current: float) -> Tuple[int, float, List[Any]]:
  """The first (smallest) candidate with the highest score, if it beats `current` strictly."""
  best, best_score, trials = 0, current, []
  for value in candidates:
    if value <= 0:
      continue
    score = score_of(value)
    trials.append((value, score))
    if score > best_score + _TIE:
      best, best_score = value, score
  return best, best_score, trials


def choose_rules(preds: Sequence[np.ndarray], refs: Sequence[np.ndarray],
                 component_sizes: Sequence[int] = COMPONENT_SIZES,
                 et_thresholds: Sequence[int] = ET_THRESHOLDS, objective: str = "voxel",
                 spacings: Optional[Sequence[Sequence[float]]] = None,
                 lesion_rules: Optional[Sequence[metrics.LesionRules]] = None,
                 label_set: str = labels_lib.DEFAULT_LABEL_SET
                 ) -> Tuple[Rules, Dict[str, Any]]:
  """Greedy choice of the rules on predicted and reference canonical label volumes.

  objective: a key of OBJECTIVES; 'lesion' needs each case's spacing and lesion rule set.
  Returns (the rules, a report: the objective's Dice before and after per region and 'mean',
  and every trial).
  """
  if not preds or len(preds) != len(refs):
    raise ValueError("Choosing postprocessing needs validation predictions and references.")
  if objective not in OBJECTIVES:
    raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}.")
  if objective == "lesion":
    if spacings is None or lesion_rules is None or not (
        len(spacings) == len(lesion_rules) == len(preds)):
      raise ValueError("--objective=lesion needs each case's spacing and lesion rule set.")
  summarize = (lambda ps, rs: dice_summary(ps, rs, label_set)) if objective == "voxel" else (
      lambda ps, rs: lesion_dice_summary(ps, rs, spacings, lesion_rules, label_set))
  current = [np.asarray(p, np.uint8) for p in preds]
  before = summarize(current, refs)
  score, rules, trials = before["mean"], Rules(label_set=label_set), []
  for region in COMPONENT_REGIONS:
    components = [Components.of(p, region, label_set=label_set) for p in current]
    candidate = lambda n: [c.without_smaller_than(n) for c in components]
    n, score, tried = _best(sorted(component_sizes),
                            lambda n: summarize(candidate(n), refs)["mean"], score)
    trials += [{"rule": f"min_component_voxels.{region}", "value": v, "mean_dice": s}
               for v, s in tried]
    if n:
      rules.min_component_voxels[region] = n
      current = candidate(n)
  candidate = lambda t: [relabel_small_et(p, t) for p in current]
  t, score, tried = _best(sorted(et_thresholds),
                          lambda t: summarize(candidate(t), refs)["mean"], score)
  trials += [{"rule": "et_min_voxels", "value": v, "mean_dice": s} for v, s in tried]
  rules.et_min_voxels = t
  after = summarize([rules(p) for p in preds], refs)
  return rules, {"dice_before": before, "dice_after": after, "trials": trials}


def assign_members(validation_splits: Sequence[Sequence[str]]) -> Dict[Tuple[int, ...], List[str]]:
  """Members (indices) -> the validation cases they predict together.

  Each case is predicted by the members whose validation split holds it, none of which trained
  on it (the module docstring says why).
  """
  holders: Dict[str, List[int]] = {}
  for member, cases in enumerate(validation_splits):
    for case_id in cases:
      holders.setdefault(case_id, []).append(member)
  groups: Dict[Tuple[int, ...], List[str]] = {}
  for case_id in sorted(holders):
    groups.setdefault(tuple(holders[case_id]), []).append(case_id)
  return groups


def predict_validation(runs: Sequence[Any], options: inference.Options = inference.Options(),
                       source_dir: Optional[str] = None):
  """(case ids, {case: member workdirs}, predictions, references, [(case id, spacing)] in the
  predictions' order) of the pooled validation cases, each volume cropped to its tumour box
  (crop_to_tumour; exact for the lesion-wise scores too, see `metrics`)."""
  # Imported here: predict applies rules without TensorFlow (a model package's path).
  from data_pipelines import input_pipeline  # pylint: disable=g-import-not-at-top
  data_configs = [inference.run_data_config(r, source_dir) for r in runs]
  groups = assign_members([input_pipeline.split_cases(c, "validation") for c in data_configs])
  total = sum(len(cases) for cases in groups.values())
  predicted_by, preds, refs, order, t0 = {}, [], [], [], time.perf_counter()
  for members, case_ids in groups.items():
    predictor = inference.Predictor.from_runs([runs[m] for m in members], options)
    data_config = data_configs[members[0]]
    for case in inference.labelled_cases(data_config, case_ids, "validation"):
      labels = predictor.segment(case.image).unprocessed
      pred, ref = crop_to_tumour(labels, case.label)
      preds.append(pred)
      refs.append(ref)
      predicted_by[case.case_id] = [runs[m].workdir for m in members]
      order.append((case.case_id, tuple(float(s) for s in case.spacing)))
      logging.info("[%d/%d] %s predicted (%.1fs elapsed)", len(preds), total, case.case_id,
                   time.perf_counter() - t0)
  return sorted(predicted_by), predicted_by, preds, refs, order


def validation_lesion_rules(case_ids: Sequence[str], requested: str,
                            label_set: str = labels_lib.DEFAULT_LABEL_SET
                            ) -> List[metrics.LesionRules]:
  """Each case's lesion rule set for --objective=lesion; ValueError naming a case without."""
  out = []
  for case_id in case_ids:
    rules = evaluate_folder.case_lesion_rules(case_id, requested, label_set)
    if rules is None:
      raise ValueError(f"{case_id}: --objective=lesion needs a lesion rule set, and "
                       f"--lesion_rules={requested} gives this case none (pass a rule set's "
                       f"name: {', '.join(metrics.LESION_RULES)}).")
    out.append(rules)
  return out


def postprocess(workdir: Union[str, Sequence[str]],
                options: inference.Options = inference.Options(postprocess="none"), *,
                source_dir: Optional[str] = None, out: Optional[str] = None,
                objective: str = "voxel", lesion_rules: str = "auto") -> Dict[str, Any]:
  """Chooses the rules on the validation cases and writes them; returns the record written.

  options: checkpoint, TTA and batch size (the rules are chosen on the network's own labels,
  so options.postprocess is not applied).
  """
  if objective not in OBJECTIVES:
    raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}.")
  evaluate_folder.check_lesion_rules_flag(lesion_rules)
  workdirs = [workdir] if isinstance(workdir, str) else list(workdir)
  runs = inference.restore_runs(workdirs, options.checkpoint)
  out = out or os.path.join(runs[0].workdir, FILE_NAME)
  reporting.check_writable_folder(os.path.dirname(os.path.abspath(out)))
  case_ids, predicted_by, preds, refs, order = predict_validation(runs, options, source_dir)
  per_case_rules = (validation_lesion_rules([c for c, _ in order], lesion_rules,
                                            runs[0].label_set)
                    if objective == "lesion" else None)
  rules, report = choose_rules(preds, refs, objective=objective,
                               spacings=[s for _, s in order], lesion_rules=per_case_rules,
                               label_set=runs[0].label_set)
  record = {
      "format_version": FORMAT_VERSION,
      "rules": rules.to_json(),
      "label_set": rules.label_set,
      "description": rules.describe(),
      "validation": {"num_cases": len(case_ids), "cases": case_ids,
                     "predicted_by": predicted_by,
                     "dice_before": report["dice_before"], "dice_after": report["dice_after"]},
      "runs": [{"workdir": r.workdir, "model": r.config.model.name, "checkpoint_step": r.step}
               for r in runs],
      "checkpoint": str(options.checkpoint),
      "tta": bool(options.tta),
      "objective": objective,
      "objective_description": OBJECTIVES[objective],
      "lesion_rules": ({c: r.name for (c, _), r in zip(order, per_case_rules)}
                       if per_case_rules else None),
      "connectivity": CONNECTIVITY,
      "order": "components of WT, TC, ET, then the small-ET rule",
      "removed_voxels_become": {r: labels_lib.CLASS_NAMES[v] for r, v in REMOVED_TO.items()},
      "grids": {"min_component_voxels": list(COMPONENT_SIZES),
                "et_min_voxels": list(ET_THRESHOLDS)},
      "trials": report["trials"],
  }
  reporting.write_json(out, record)
  return {**record, "path": out}


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; defined by `run` only, so importing this module defines none."""
  flags.DEFINE_list("workdir", None, "Run directory; several (comma-separated) are an ensemble "
                    "whose rules are chosen on their pooled validation cases.")
  inference.define_option_flags()  # As evaluate and predict take them.
  flags.DEFINE_string("source_dir", None, "Raw NIfTI folder, if it moved since training.")
  flags.DEFINE_string("out", None, f"Output file (default <first workdir>/{FILE_NAME}).")
  flags.DEFINE_enum("objective", "voxel", list(OBJECTIVES), "What the rules maximise: 'voxel' "
                    "(mean ET/TC/WT Dice) or 'lesion' (BraTS 2023+ lesion-wise Dice).")
  evaluate_folder.define_lesion_rules_flag()
  flags.adopt_module_key_flags(evaluate_folder)  # Listed in this command's --help.
  flags.mark_flags_as_required(["workdir"])


def main(argv: Sequence[str]) -> Dict[str, Any]:
  del argv
  # The rules are chosen on the network's own labels.
  options = inference.options_from_flags(postprocess="none")
  record = postprocess(FLAGS.workdir, options, source_dir=FLAGS.source_dir, out=FLAGS.out,
                       objective=FLAGS.objective, lesion_rules=FLAGS.lesion_rules)
  before, after = record["validation"]["dice_before"], record["validation"]["dice_after"]
  dice = lambda d: " ".join(f"{r} {v:.4f}" for r, v in d.items())
  print(f"Objective: {record['objective_description']}")
  print(f"Validation ({record['validation']['num_cases']} cases, TTA "
        f"{'on' if record['tta'] else 'off'}): Dice before {dice(before)}")
  print(f"{' ' * len('Validation')} after  {dice(after)}")
  print(f"Rules: {record['description']}")
  print(f"Written to {record['path']}")
  return record


def run() -> None:
  cli.run_command(main, define_flags)


if __name__ == "__main__":
  run()
