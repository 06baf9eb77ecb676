r"""Scores a folder of predicted segmentations against reference segmentations.

  python -m msatt_jax.evaluate_folder --pred=PRED_DIR --ref=REF_DIR [--labels=brats|msd] \
      [--out=OUT_DIR] [--allow_missing]

Files are matched by case name: the file name without `.nii.gz`/`.nii` and without a trailing
`_seg`. Either folder may be flat (`<case>.nii.gz`, `<case>_seg.nii.gz`), hold BraTS case
folders (`<case>/<case>_seg.nii.gz`, also grouped under e.g. HGG/ and LGG/), or be one BraTS
case folder itself. Image files (`_flair`, `_t1`, `_t1ce`, `_t2`) and hidden files are ignored.

Both sides are read in the --labels convention, converted to canonical labels, and scored per
case with Dice and HD95 (mm, the reference's voxel spacing) for ET, TC and WT, plus the Dice on
axial slices 30..120; see `msatt_jax.metrics` for the exact definitions. Writes
`<out>/per_case.csv` and `<out>/summary.json` (default out: the prediction folder).
"""

import os
import re
import sys
import tempfile
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import nibabel as nib
import numpy as np

from data_pipelines.brats import labels
from data_pipelines.errors import DataError
from msatt_jax import metrics
from msatt_jax import reporting

_NIFTI = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?$")
_IMAGE_SUFFIXES = ("_flair", "_t1", "_t1ce", "_t1gd", "_t2")
# Grouping folders (HGG/LGG, ...) are searched this many levels deep for case folders.
_MAX_DEPTH = 2
# Largest per-axis voxel-spacing difference (mm) accepted between prediction and reference.
DEFAULT_SPACING_TOL = 1e-3
HD95_DEFINITION = ("max of the two directed 95th percentiles of surface-voxel distances (mm); "
                   "both empty -> 0, one empty -> 373.13")


def _case_name(filename: str) -> Optional[str]:
  """'<case>[_seg].nii[.gz]' -> '<case>'; None for non-NIfTI, hidden or image files."""
  match = _NIFTI.match(filename)
  if filename.startswith(".") or match is None:
    return None
  stem = match.group("stem")
  if stem.endswith(_IMAGE_SUFFIXES):
    return None
  if stem.endswith("_seg"):
    stem = stem[:-len("_seg")]
  return stem or None


def _case_folder_file(folder: str) -> Optional[str]:
  """The segmentation of a BraTS case folder (`<name>/<name>_seg.nii.gz` or `<name>.nii.gz`)."""
  name = os.path.basename(os.path.normpath(folder))
  for candidate in (f"{name}_seg.nii.gz", f"{name}_seg.nii", f"{name}.nii.gz", f"{name}.nii"):
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
  try:
    image = nib.load(path)
    data = np.asanyarray(image.dataobj)
    spacing = np.asarray(image.header.get_zooms()[:3], np.float64)
    affine = np.asarray(image.affine, np.float64)
  except (nib.filebasedimages.ImageFileError, EOFError, zlib.error, OSError, ValueError) as e:
    raise DataError(f"{path}: cannot read as NIfTI ({type(e).__name__}: {e}).") from e
  # Some tools write (X, Y, Z, 1); trailing singleton axes carry no labels.
  while data.ndim > 3 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise DataError(f"{path}: expected a 3-D label volume, got shape {data.shape}.")
  return data, spacing, affine


def read_segmentation(path: str, convention: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reads a 3-D label NIfTI -> (canonical labels, voxel spacing (3,), affine)."""
  data, spacing, affine = read_label_volume(path)
  return labels.to_canonical(data, convention, source=path), spacing, affine


def _check_pair(pred_path: str, ref_path: str, pred: np.ndarray, ref: np.ndarray,
                pred_spacing: np.ndarray, ref_spacing: np.ndarray, spacing_tol: float) -> None:
  if pred.shape != ref.shape:
    raise DataError(f"Shape mismatch: prediction {pred_path} is {pred.shape}, reference "
                    f"{ref_path} is {ref.shape}.")
  if np.max(np.abs(pred_spacing - ref_spacing)) > spacing_tol:
    raise DataError(f"Voxel spacing mismatch: prediction {pred_path} has "
                    f"{tuple(pred_spacing.tolist())} mm, reference {ref_path} has "
                    f"{tuple(ref_spacing.tolist())} mm.")


def evaluate_folders(pred_dir: str, ref_dir: str, convention: str = "brats",
                     out_dir: Optional[str] = None, allow_missing: bool = False,
                     slice_range: Optional[Tuple[int, int]] = (30, 120),
                     spacing_tol: float = DEFAULT_SPACING_TOL) -> Tuple[List[dict], dict]:
  """Scores every reference case; returns (per-case rows, summary) and writes them to out_dir.

  Raises DataError for unusable input: missing predictions (unless allow_missing), unreadable
  files, shape or spacing mismatches (all cases are checked and every problem is reported).
  """
  if convention not in labels.CONVENTIONS:
    raise DataError(f"Unknown label convention {convention!r}; choose one of "
                    f"{', '.join(labels.CONVENTIONS)}.")
  if out_dir is not None:
    _check_writable(out_dir)
  refs = find_segmentations(ref_dir, "reference")
  preds = find_segmentations(pred_dir, "prediction")
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

  rows, errors = [], []
  for case in cases:
    try:
      rows.append(_score_case(case, preds[case], refs[case], convention, slice_range,
                              spacing_tol))
    except (DataError, ValueError) as e:
      errors.append(str(e))
  if errors:
    raise DataError(f"{len(errors)} case(s) could not be scored:\n  " + "\n  ".join(errors))

  summary = {
      "num_cases": len(rows),
      "labels": convention,
      "pred_dir": pred_dir,
      "ref_dir": ref_dir,
      "hd95": HD95_DEFINITION,
      "slice_range": list(slice_range) if slice_range else None,
      "missing_predictions": missing,
      "extra_predictions": extra,
      "metrics": metrics.summarize(rows),
  }
  if out_dir is not None:
    reporting.write_csv(os.path.join(out_dir, "per_case.csv"), rows)
    reporting.write_json(os.path.join(out_dir, "summary.json"), summary)
  return rows, summary


def _score_case(case: str, pred_path: str, ref_path: str, convention: str,
                slice_range: Optional[Tuple[int, int]], spacing_tol: float) -> dict:
  pred, pred_spacing, pred_affine = read_label_volume(pred_path)
  ref, ref_spacing, ref_affine = read_label_volume(ref_path)
  try:
    pred = labels.to_canonical(pred, convention, source=pred_path)
    ref = labels.to_canonical(ref, convention, source=ref_path)
  except DataError as e:
    raise DataError(f"{e} Check --labels.") from e
  _check_pair(pred_path, ref_path, pred, ref, pred_spacing, ref_spacing, spacing_tol)
  if not np.allclose(pred_affine, ref_affine, atol=1e-3):
    # Often just a header written without the input's affine; a flipped volume would show in
    # the scores, so warn rather than refuse.
    logging.warning("%s: affine differs from the reference %s.", pred_path, ref_path)
  row = {"case": case}
  row.update(metrics.region_scores(pred, ref, ref_spacing))
  if slice_range is not None:
    row.update(metrics.slice_dice(pred, ref, *slice_range))
  return row


def _check_writable(out_dir: str) -> None:
  """Fails before any scoring when the output folder cannot be created or written."""
  try:
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryFile(dir=out_dir):
      pass
  except OSError as e:
    raise DataError(f"Output folder {out_dir} is not writable ({e.strerror or e}).") from e


def summary_rows(summary: dict) -> List[dict]:
  """The summary's mean/std/median as table rows with the per-case columns."""
  stats = summary["metrics"]
  return [{"case": stat, **{k: v[stat] for k, v in stats.items()}}
          for stat in ("mean", "std", "median")]


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the CLI flags; called by run() only, so importing this module (tests, other
  tools) adds nothing to absl's global flags and cannot collide with their names."""
  flags.DEFINE_string("pred", None, "Folder of predicted segmentation NIfTI files.")
  flags.DEFINE_string("ref", None,
                      "Folder of reference segmentations (flat or BraTS case folders).")
  flags.DEFINE_enum("labels", "brats", sorted(labels.CONVENTIONS),
                    "Label convention of both folders: brats (1,2,4) or msd (1 ED, 2 NCR, 3 ET).")
  flags.DEFINE_string("out", None, "Folder for per_case.csv and summary.json (default: --pred).")
  flags.DEFINE_bool("allow_missing", False, "Score the cases that have a prediction when some "
                    "reference cases have none (default: an error).")
  flags.DEFINE_integer("slice_start", 30, "First axial slice of the slice-level Dice.")
  flags.DEFINE_integer("slice_stop", 120, "Last axial slice (inclusive) of the slice-level Dice.")
  flags.DEFINE_bool("slice_dice", True, "Also report Dice on slices slice_start..slice_stop.")
  flags.DEFINE_float("spacing_tol", DEFAULT_SPACING_TOL,
                     "Largest voxel-spacing difference (mm) accepted between pred and ref.")
  flags.mark_flags_as_required(["pred", "ref"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  out_dir = FLAGS.out or FLAGS.pred
  slice_range = (FLAGS.slice_start, FLAGS.slice_stop) if FLAGS.slice_dice else None
  try:
    rows, summary = evaluate_folders(FLAGS.pred, FLAGS.ref, FLAGS.labels, out_dir,
                                     FLAGS.allow_missing, slice_range, FLAGS.spacing_tol)
  except DataError as e:
    print(f"evaluate_folder: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(reporting.format_table(rows + summary_rows(summary)))
  print(f"\n{len(rows)} case(s); per-case scores and summary written to {out_dir}")


def run() -> None:
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
