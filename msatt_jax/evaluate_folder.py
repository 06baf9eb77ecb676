r"""Scores a folder of predicted segmentations against reference segmentations.

  python -m msatt_jax.evaluate_folder --pred=PRED_DIR --ref=REF_DIR [--labels=auto|brats|...] \
      [--out=OUT_DIR] [--allow_missing] [--hd95=official|max|surface] [--lesion_rules=auto|off|NAME]

Files are matched by case name: the file name without `.nii.gz`/`.nii` and without a trailing
`_seg` (`-seg` for BraTS 2023+ names). Either folder may be flat (`<case>.nii.gz`,
`<case>_seg.nii.gz`, `<case>-seg.nii.gz`), hold BraTS case folders (`<case>/<case>_seg.nii.gz`
or `<case>/<case>-seg.nii.gz`, also grouped under e.g. HGG/ and LGG/), or be one BraTS case
folder itself. Image files (`_flair`, `_t1`, `_t1ce`, `_t2`; 2023+: `-t1c`, `-t1n`, `-t2w`,
`-t2f`) and hidden files are ignored.

Both sides are read in the --labels convention (auto: `brats2023`, ET = 3, for 2023+ case names
such as BraTS-GLI-00000-000, else `brats`, ET = 4), converted to canonical labels, and scored
per case with Dice, HD95 (mm, the reference's voxel spacing; --hd95=official, the BraTS scorer's
pooled percentile, max, the larger directed one, or surface, surface_distance's area-weighted
one), sensitivity and specificity for ET, TC and WT, plus the Dice on axial slices 30..120; see
`msatt_jax.metrics` for the exact definitions. With lesion rules (--lesion_rules: auto = the
rule set of a 2023+ case name's challenge, BraTS-GLI-... -> gli2023, or gli2024 for files of the
2024 label sets (gli2024, ped2024 conventions), none for older names; off; or a rule set's name
for every case) each case also gets the BraTS 2023+ lesion-wise Dice and HD95 and its counts of
matched, missed and false-positive lesions per region.
Writes `<out>/per_case.csv` and `<out>/summary.json` (default out: the prediction folder), which
records the HD95 definition and lesion rules used, and with lesion rules `<out>/lesions.csv`
(one row per lesion) and `<out>/lesions.md` (each case's missed lesions).
"""

import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from absl import flags
from absl import logging
import numpy as np

from data_pipelines import files
from data_pipelines.brats import labels
from data_pipelines.brats import layouts
from data_pipelines.errors import DataError
from msatt_jax import cli
from msatt_jax import metrics
from msatt_jax import reporting

_NIFTI = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?$")
# Image files of every naming (layouts.NAMINGS over layouts.MODALITY_ALIASES), never labels.
_IMAGE_SUFFIXES = tuple(f"{n.separator}{alias}" for n in layouts.NAMINGS.values()
                        for aliases in layouts.MODALITY_ALIASES.values() for alias in aliases)
_SEG_SUFFIXES = tuple(f"{n.separator}{layouts.SEG}" for n in layouts.NAMINGS.values())
LESION_RULES_CHOICES = ("auto", "off", *metrics.LESION_RULES)
# Grouping folders (HGG/LGG, ...) are searched this many levels deep for case folders.
_MAX_DEPTH = 2
# Largest per-axis voxel-spacing difference (mm) accepted between prediction and reference.
DEFAULT_SPACING_TOL = 1e-3


def _case_name(filename: str) -> Optional[str]:
  """'<case>[_seg].nii[.gz]' -> '<case>'; None for non-NIfTI, hidden or image files."""
  match = _NIFTI.match(filename)
  if filename.startswith(".") or match is None:
    return None
  stem = match.group("stem")
  if stem.endswith(_IMAGE_SUFFIXES):
    return None
  for suffix in _SEG_SUFFIXES:
    if stem.endswith(suffix):
      stem = stem[:-len(suffix)]
  return stem or None


def _case_folder_file(folder: str) -> Optional[str]:
  """The segmentation of a BraTS case folder (`<name>/<name>_seg.nii.gz`, `-seg` or `.nii.gz`)."""
  name = os.path.basename(os.path.normpath(folder))
  for candidate in (f"{name}_seg.nii.gz", f"{name}_seg.nii", f"{name}-seg.nii.gz",
                    f"{name}-seg.nii", f"{name}.nii.gz", f"{name}.nii"):
    path = os.path.join(folder, candidate)
    if os.path.isfile(path):
      return path
  return None


def find_segmentations(root: str, side: str = "segmentation") -> Dict[str, str]:
  """Case name -> segmentation file under `root` (see the module docstring for layouts)."""
  if not os.path.isdir(root):
    raise DataError(f"{side} folder {root} does not exist or is not a folder.")
  own = _case_folder_file(root)
  if own is not None:  # `root` is one BraTS case folder.
    return {os.path.basename(os.path.normpath(root)): own}
  found: Dict[str, str] = {}

  def add(case: str, path: str) -> None:
    if case in found:
      raise DataError(f"Two {side} files for case {case!r}: {found[case]} and {path}.")
    found[case] = path

  def scan_folders(folder: str, depth: int) -> None:
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
      if entry.name.startswith(".") or not entry.is_dir():
        continue
      seg = _case_folder_file(entry.path)
      if seg is not None:
        add(entry.name, seg)
      elif depth < _MAX_DEPTH:
        scan_folders(entry.path, depth + 1)

  for entry in sorted(os.scandir(root), key=lambda e: e.name):
    if entry.is_file():
      case = _case_name(entry.name)
      if case is not None:
        add(case, entry.path)
  scan_folders(root, 1)
  if not found:
    raise DataError(f"No segmentation files found in the {side} folder {root} (expected "
                    "<case>.nii.gz, <case>_seg.nii.gz or <case>/<case>_seg.nii.gz).")
  return found


def read_label_volume(path: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reads a 3-D label NIfTI as stored -> (raw labels, voxel spacing (3,), affine)."""
  image, data = layouts.read_nifti(path)
  data = layouts.squeeze_to_ndim(data, 3, path)
  spacing = np.asarray(image.header.get_zooms()[:3], np.float64)
  return data, spacing, np.asarray(image.affine, np.float64)


def _check_pair(pred_path: str, ref_path: str, pred: np.ndarray, ref: np.ndarray,
                pred_spacing: np.ndarray, ref_spacing: np.ndarray, spacing_tol: float) -> None:
  if pred.shape != ref.shape:
    raise DataError(f"Shape mismatch: prediction {pred_path} is {pred.shape}, reference "
                    f"{ref_path} is {ref.shape}.")
  if np.max(np.abs(pred_spacing - ref_spacing)) > spacing_tol:
    raise DataError(f"Voxel spacing mismatch: prediction {pred_path} has "
                    f"{tuple(pred_spacing.tolist())} mm, reference {ref_path} has "
                    f"{tuple(ref_spacing.tolist())} mm.")


def case_convention(case: str, convention: str) -> str:
  """--labels for one case: 'auto' is what its name decides (2023+ names: by challenge, as
  layouts.CHALLENGE_CONVENTIONS; brats otherwise); a DataError where the name decides none or
  contradicts the explicit one (e.g. msd for a 2023+ name, which would swap NCR and ED)."""
  challenge = layouts.challenge(case)
  if challenge is None:
    return "brats" if convention == "auto" else convention
  default, allowed = layouts.CHALLENGE_CONVENTIONS.get(challenge, (None, layouts.NAMINGS[
      "brats2023"].conventions))
  if convention == "auto":
    if default is None:
      raise DataError(f"--labels=auto: the name {case} does not decide the label convention of "
                      f"BraTS-{challenge} files; pass --labels, one of {', '.join(allowed)}.")
    return default
  if convention not in allowed:
    raise DataError(f"--labels={convention} contradicts the 2023+ name {case}, whose files hold "
                    f"one of {', '.join(allowed)}.")
  return convention


def case_lesion_rules(case: str, requested: str, label_set: str = labels.DEFAULT_LABEL_SET
                      ) -> Optional[metrics.LesionRules]:
  """--lesion_rules for one case whose files are of `label_set`: None (off, or auto for a name
  without a rule set; auto takes the year metrics.LESION_AUTO_YEARS gives the label set)."""
  if requested == "off":
    return None
  if requested == "auto":
    challenge = layouts.challenge(case)
    return metrics.auto_lesion_rules(challenge, label_set) if challenge else None
  return metrics.lesion_rules(requested)


def check_lesion_rules_flag(requested: str) -> None:
  if requested not in LESION_RULES_CHOICES:
    raise DataError(f"--lesion_rules={requested}: unknown rule set; choose one of "
                    f"{', '.join(LESION_RULES_CHOICES)}.")


def lesion_rows(case: str, lesions: Sequence[metrics.Lesion]) -> List[dict]:
  """lesions.csv rows of one case."""
  return [{"case": case, "region": x.region, "lesion": x.lesion_id, "status": x.status,
           "volume_mm3": x.volume_mm3, "counted": x.counted, "dice": x.dice, "hd95": x.hd95}
          for x in lesions]


def missed_lesions_markdown(rows: Sequence[dict], lesion_list: Sequence[dict],
                            title: str) -> str:
  """Markdown: each lesion-scored case's lesion-wise Dice and its missed lesions."""
  lines = [f"# {title}", "",
           "Missed reference lesions (counted ones; those at or under the rule set's volume "
           "threshold in brackets) per case and region.", ""]
  for row in rows:
    if not row.get("lesion_rules"):
      continue
    missed = [x for x in lesion_list if x["case"] == row["case"] and x["status"] == "missed"]
    text = "; ".join(
        f"{x['region']} lesion {x['lesion']} ({x['volume_mm3']:g} mm^3)" if x["counted"] else
        f"[{x['region']} lesion {x['lesion']} ({x['volume_mm3']:g} mm^3)]" for x in missed)
    lines.append(f"- {row['case']} ({row['lesion_rules']}): {text or 'none missed'}")
  return "\n".join(lines) + "\n"


def evaluate_folders(pred_dir: str, ref_dir: str, convention: str = "auto",
                     out_dir: Optional[str] = None, allow_missing: bool = False,
                     slice_range: Optional[Tuple[int, int]] = (30, 120),
                     spacing_tol: float = DEFAULT_SPACING_TOL,
                     hd95_mode: str = "official",
                     lesion_rules: str = "auto") -> Tuple[List[dict], dict]:
  """Scores every reference case; returns (per-case rows, summary) and writes them to out_dir.

  Raises DataError for unusable input: missing predictions (unless allow_missing), unreadable
  files, shape or spacing mismatches, lesion rules the data cannot take (all cases are checked
  and every problem is reported); nothing is written then.
  """
  if convention != "auto" and convention not in labels.CONVENTIONS:
    raise DataError(f"Unknown label convention {convention!r}; choose one of auto, "
                    f"{', '.join(labels.CONVENTIONS)}.")
  check_lesion_rules_flag(lesion_rules)
  if hd95_mode not in metrics.HD95_MODES:
    raise DataError(f"Unknown --hd95 {hd95_mode!r}; choose one of "
                    f"{', '.join(metrics.HD95_MODES)}.")
  refs = find_segmentations(ref_dir, "reference")
  preds = find_segmentations(pred_dir, "prediction")
  if out_dir is not None:  # After the inputs are found: a mistyped --pred creates no folder.
    reporting.check_writable_folder(out_dir)
  missing = sorted(set(refs) - set(preds))
  extra = sorted(set(preds) - set(refs))
  if missing and not allow_missing:
    raise DataError(f"{len(missing)} reference case(s) have no prediction in {pred_dir}: "
                    f"{', '.join(missing)} (pass --allow_missing to score the rest).")
  if missing:
    logging.warning("Scoring without %d case(s) that have no prediction: %s", len(missing),
                    ", ".join(missing))
  if extra:
    logging.warning("Ignoring %d prediction(s) without a reference: %s", len(extra),
                    ", ".join(extra))
  cases = sorted(set(refs) & set(preds))
  if not cases:
    raise DataError(f"No case of {ref_dir} has a prediction in {pred_dir}.")

  rows, lesion_list, errors = [], [], []
  for case in cases:
    try:
      case_labels = case_convention(case, convention)
      row, lesions = _score_case(case, preds[case], refs[case], case_labels, slice_range,
                                 spacing_tol, hd95_mode, case_lesion_rules(
                                     case, lesion_rules, labels.label_set(case_labels).name))
      rows.append(row)
      lesion_list.extend(lesion_rows(case, lesions))
    except (DataError, ValueError) as e:
      errors.append(f"{case}: {e}")
  if errors:
    raise DataError(f"{len(errors)} case(s) could not be scored:\n  " + "\n  ".join(errors))
  scored = {r["case"]: r["lesion_rules"] for r in rows if r.get("lesion_rules")}

  summary = {
      "num_cases": len(rows),
      "labels": convention,
      "pred_dir": pred_dir,
      "ref_dir": ref_dir,
      "hd95_mode": hd95_mode,
      "hd95": metrics.HD95_DEFINITIONS[hd95_mode],
      "slice_range": list(slice_range) if slice_range else None,
      "lesion_rules": {"requested": lesion_rules, "cases": scored,
                       "rules": {n: metrics.LESION_RULES[n].describe()
                                 for n in sorted(set(scored.values()))}},
      "missing_predictions": missing,
      "extra_predictions": extra,
      "metrics": metrics.summarize(rows),
  }
  if out_dir is not None:
    reporting.write_csv(os.path.join(out_dir, "per_case.csv"), rows)
    write_lesion_reports(out_dir, rows, lesion_list, f"Lesion-wise scores of {pred_dir}")
    reporting.write_json(os.path.join(out_dir, "summary.json"), summary)
  return rows, summary


LESION_COLUMNS = ("case", "region", "lesion", "status", "volume_mm3", "counted", "dice", "hd95")


def write_lesion_reports(out_dir: str, rows: Sequence[dict], lesion_list: Sequence[dict],
                         title: str) -> None:
  """lesions.csv and lesions.md when any case was scored lesion-wise; else removes an earlier
  evaluation's, so that the folder never mixes two runs."""
  paths = [os.path.join(out_dir, n) for n in ("lesions.csv", "lesions.md")]
  if not any(r.get("lesion_rules") for r in rows):
    for path in paths:
      if os.path.exists(path):
        os.remove(path)
    return
  reporting.write_csv(paths[0], lesion_list, LESION_COLUMNS)
  files.atomic_write_text(paths[1], missed_lesions_markdown(rows, lesion_list, title))


def _score_case(case: str, pred_path: str, ref_path: str, convention: str,
                slice_range: Optional[Tuple[int, int]], spacing_tol: float,
                hd95_mode: str, rules: Optional[metrics.LesionRules] = None
                ) -> Tuple[dict, List[metrics.Lesion]]:
  pred, pred_spacing, pred_affine = read_label_volume(pred_path)
  ref, ref_spacing, ref_affine = read_label_volume(ref_path)
  try:
    pred = labels.to_canonical(pred, convention, source=pred_path)
    ref = labels.to_canonical(ref, convention, source=ref_path)
  except DataError as e:
    raise DataError(f"{e} Check --labels.") from e
  _check_pair(pred_path, ref_path, pred, ref, pred_spacing, ref_spacing, spacing_tol)
  label_set = labels.label_set(convention).name
  if not np.allclose(pred_affine, ref_affine, atol=1e-3):
    # Often just a header written without the input's affine; a flipped volume would show in
    # the scores, so warn rather than refuse.
    logging.warning("%s: affine differs from the reference %s.", pred_path, ref_path)
  row = {"case": case}
  row.update(metrics.region_scores(pred, ref, ref_spacing, hd95_mode, label_set))
  if slice_range is not None:
    row.update(metrics.slice_dice(pred, ref, *slice_range, label_set=label_set))
  return add_lesion_scores(row, pred, ref, ref_spacing, rules, label_set)


def add_lesion_scores(row: dict, pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                      rules: Optional[metrics.LesionRules],
                      label_set: str = labels.DEFAULT_LABEL_SET
                      ) -> Tuple[dict, List[metrics.Lesion]]:
  """(the row with 'lesion_rules' and the lesion-wise scores, the lesions) of one case; the
  row unchanged without rules. Shared with `evaluate`."""
  if rules is None:
    return row, []
  try:
    metrics.check_lesion_rules(rules, label_set)
  except ValueError as e:
    raise DataError(f"--lesion_rules={rules.name}: {e}") from e
  scores, lesions = metrics.lesion_scores(pred, ref, spacing, rules, label_set=label_set)
  return {**row, "lesion_rules": rules.name, **scores}, lesions


def summary_rows(summary: dict) -> List[dict]:
  """The summary's mean/std/median as table rows with the per-case columns."""
  stats = summary["metrics"]
  return [{"case": stat, **{k: v[stat] for k, v in stats.items()}}
          for stat in ("mean", "std", "median")]


FLAGS = flags.FLAGS


def define_hd95_flag() -> None:
  """--hd95, shared with `evaluate`."""
  flags.DEFINE_enum("hd95", "official", list(metrics.HD95_MODES),
                    "HD95 definition: 'official' (BraTS/CaPTk: the 95th percentile of both "
                    "directions' surface distances pooled), 'max' (the larger of the two "
                    "directed 95th percentiles) or 'surface' (the larger directed percentile "
                    "of area-weighted surface elements, DeepMind surface_distance's, as the "
                    "BraTS 2023+ lesion-wise HD95).")


def define_lesion_rules_flag() -> None:
  """--lesion_rules, shared with `evaluate`."""
  flags.DEFINE_string("lesion_rules", "auto", "BraTS 2023+ lesion-wise scores: 'auto' (the "
                      "rule set of a case named BraTS-<challenge>-NNNNN-NNN, e.g. GLI -> "
                      "gli2023, or gli2024 for files of a 2024 convention; none for older "
                      "names), 'off', or one rule set for every case: "
                      f"{', '.join(metrics.LESION_RULES)}.")


def define_flags() -> None:
  """The command's flags; defined by `run` only, so importing this module (tests, other
  tools) adds nothing to absl's global flags and cannot collide with their names."""
  flags.DEFINE_string("pred", None, "Folder of predicted segmentation NIfTI files.")
  flags.DEFINE_string("ref", None,
                      "Folder of reference segmentations (flat or BraTS case folders).")
  flags.DEFINE_enum("labels", "auto", ["auto", *sorted(labels.CONVENTIONS)],
                    "Label convention of both folders: brats (1 NCR, 2 ED, 4 ET), brats2023 "
                    "(1 NCR, 2 ED, 3 ET), msd (1 ED, 2 NCR, 3 ET), gli2024 (brats2023 + 4 RC, "
                    "scored as its own region), ped2024 (1 ET, 2 NET, 3 CC, 4 ED), or auto: "
                    "what a case name decides (BraTS-GLI-00000-000: brats2023; BraTS-PED: "
                    "none, pass it), brats otherwise.")
  flags.DEFINE_string("out", None, "Folder for per_case.csv and summary.json (default: --pred).")
  flags.DEFINE_bool("allow_missing", False, "Score the cases that have a prediction when some "
                    "reference cases have none (default: an error).")
  flags.DEFINE_integer("slice_start", 30, "First axial slice of the slice-level Dice.")
  flags.DEFINE_integer("slice_stop", 120, "Last axial slice (inclusive) of the slice-level Dice.")
  flags.DEFINE_bool("slice_dice", True, "Also report Dice on slices slice_start..slice_stop.")
  flags.DEFINE_float("spacing_tol", DEFAULT_SPACING_TOL,
                     "Largest voxel-spacing difference (mm) accepted between pred and ref.")
  define_hd95_flag()
  define_lesion_rules_flag()
  flags.mark_flags_as_required(["pred", "ref"])


def main(argv: Sequence[str]) -> None:
  del argv
  out_dir = FLAGS.out or FLAGS.pred
  slice_range = (FLAGS.slice_start, FLAGS.slice_stop) if FLAGS.slice_dice else None
  rows, summary = evaluate_folders(FLAGS.pred, FLAGS.ref, FLAGS.labels, out_dir,
                                   FLAGS.allow_missing, slice_range, FLAGS.spacing_tol,
                                   FLAGS.hd95, FLAGS.lesion_rules)
  print(reporting.format_metric_tables(rows + summary_rows(summary)))
  print(f"\nHD95 ({summary['hd95_mode']}): {summary['hd95']}")
  for description in summary["lesion_rules"]["rules"].values():
    print(f"Lesion rules {description}")
  print(f"{len(rows)} case(s); per-case scores and summary written to {out_dir}")


def run() -> None:
  # No JAX here: the XLA and allocator defaults (and their re-execution) would only cost time.
  cli.run_command(main, define_flags, runtime_defaults=False)


if __name__ == "__main__":
  run()
