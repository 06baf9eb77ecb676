"""Segment new scans with a trained run, or an ensemble of runs: one case or a whole folder.

  python -m msatt_jax.predict --workdir=runs/paper --input=BraTS_case_folder --output=seg.nii.gz
  python -m msatt_jax.predict --workdir=runs/paper --input=imagesTs/BRATS_485.nii.gz \
      --output=BRATS_485.nii.gz --labels=msd
  python -m msatt_jax.predict --workdir=runs/f0,runs/f1 --input=imagesTs --output=preds \
      [--save_probabilities] [--save_uncertainty] [--overwrite] [--notta] \
      [--postprocess=auto|none|PATH] [--num_parts=N --part_id=I]
  python -m msatt_jax.predict --model=packages/paper --input=imagesTs --output=preds

--model runs a model package (`python -m msatt_jax.export`) instead of --workdir runs: the
JAX runtime alone, no checkpoint restore, config file or TensorFlow; its TTA and
postprocessing rules are the package's unless --tta/--notta or --postprocess=none|PATH say
otherwise, and the labels are those of the runs it was exported from.

A folder's slices are split over this process's devices (one compilation), and its cases over
processes: --num_parts=N --part_id=I takes every N-th case from the I-th (nnU-Net's split);
under jax.distributed (--distributed, or --coordinator_address with --num_processes and
--process_id) each process takes its own share by itself. A rerun of any part, or of the whole
folder, skips the cases written, so it completes a folder a lost process left unfinished.
<output>/predict.json records what writes the folder (the runs or package, TTA, rules, labels);
a prediction by anything else into the same folder is refused (--overwrite takes it over).

One case: --input is a BraTS case folder (<case>_{flair,t1,t1ce,t2}.nii.gz) or an MSD 4D image,
--output a .nii.gz/.nii file. A folder: --input holds BraTS case folders (also under HGG/ and
LGG/) or MSD 4D images (an `imagesTs`/`imagesTr` folder); every case is written to
<output>/<case>.nii.gz with one restore and one compilation, cases already written are skipped
(unless --overwrite), and a case that cannot be read is named, skipped, and makes the exit
status non-zero once the others are written. Outputs have the input's shape, affine and header,
and its label convention (--labels=auto): BraTS 2018-2021 names get ET 4, 2023+ names ET 3 (and RC
4 from a model trained on GLI 2024, whose label set it outputs), MSD images the Decathlon's; or
--labels names a convention of the model's label set. 2023+ case folders
(BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t2f,t1n,t1c,t2w}.nii.gz) are read as 2018-2021 ones.

Mirroring test-time augmentation (--tta, the default) averages the probabilities over the four
in-plane flips; several --workdir runs average theirs too (they must share the input
preprocessing and output type). --save_probabilities also writes <case>.npz beside each
segmentation: 'probabilities', float16 of shape (C, X, Y, Z) in the input's geometry, and
'channels', their names (the 4 canonical classes background, NCR/NET, ED, ET of softmax runs,
or the 3 sigmoid regions ET, TC, WT of 'region_dice' runs). Averaging several such files and
taking the argmax (classes) or thresholding at 0.5 (nested regions) gives an ensemble's labels.

--save_uncertainty writes, beside each segmentation in uncertainty/, <case>_entropy.nii.gz: the
voxel-wise entropy (nats, float32, the input's geometry) of the probabilities averaged over the
TTA flips and the members (of the class distribution for softmax runs, summed over the three
regions for 'region_dice' runs), and for an ensemble <case>_disagreement.nii.gz: the fraction
of members whose own labels differ from the ensemble's; 0 outside the segmented slices and
crop. The console and, for a folder, <output>/uncertainty.csv give each case's predicted
tumour voxels and the maps' means inside them.

The postprocessing rules chosen on validation data (`python -m msatt_jax.postprocess`) apply
to the labels by default: --postprocess=auto reads the first workdir's postprocessing.json when
it exists, none skips them, a path names another such file; the console names the rules. The
probabilities are the network's, before the rules.
"""

if __name__ == "__main__":
  # Before JAX loads: the XLA flags and allocator settings (msatt_jax/runtime.py) must be in
  # the environment from the start, which may re-execute this process once.
  from msatt_jax import runtime
  runtime.configure()

from concurrent import futures
import dataclasses
import json
import os
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

from absl import flags
from absl import logging
import jax
import ml_collections
import nibabel as nib
import numpy as np

from data_pipelines import files
from data_pipelines.brats import labels as labels_lib
from data_pipelines.brats import layouts
from data_pipelines.brats import preprocess
from data_pipelines.errors import DataError
from msatt_jax import cli
from msatt_jax import inference
from msatt_jax import package as package_lib
from msatt_jax import parallel
from msatt_jax import postprocess as postprocess_lib
from msatt_jax import reporting

SLICE_MODES = ("brain", "train")
UNCERTAINTY_DIR = "uncertainty"  # --save_uncertainty's maps, beside the segmentations.
UNCERTAINTY_REPORT = "uncertainty.csv"  # A folder's per-case uncertainty, in the output.
RECORD = "predict.json"  # In an output folder: what writes its segmentations.
PROBABILITIES_SUFFIX = ".npz"
# What segments: restored runs (an ensemble), or a Predictor built from them or from a package.
Runs = Union[inference.TrainedRun, Sequence[inference.TrainedRun], inference.Predictor]


def check_output_path(path: str) -> None:
  """Fails before any work when the segmentation could not be written."""
  if not (path.endswith(".nii.gz") or path.endswith(".nii")):
    raise ValueError(f"{path}: the output must be a .nii.gz or .nii file (or, with a folder of "
                     "cases as --input, a folder).")
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{path}: the output folder {folder} does not exist.")
  if not os.access(folder, os.W_OK):
    raise PermissionError(f"{path}: the output folder {folder} is not writable.")
  if os.path.isdir(path):
    raise IsADirectoryError(f"{path}: is a folder, not an output file name.")


def probabilities_path(segmentation_path: str) -> str:
  """Where --save_probabilities writes a segmentation's probabilities: <name>.npz beside it."""
  for suffix in layouts.NIFTI_SUFFIXES:
    if segmentation_path.endswith(suffix):
      return segmentation_path[:-len(suffix)] + PROBABILITIES_SUFFIX
  raise ValueError(f"{segmentation_path}: not a .nii.gz or .nii file name.")


def uncertainty_paths(segmentation_path: str,
                      maps: Sequence[str] = inference.UNCERTAINTY_MAPS) -> Dict[str, str]:
  """Where --save_uncertainty writes a segmentation's maps: uncertainty/<name>_<map>.nii.gz
  beside it (a subfolder, so that a folder of segmentations holds segmentations only)."""
  stem = os.path.basename(probabilities_path(segmentation_path))[:-len(PROBABILITIES_SUFFIX)]
  folder = os.path.join(os.path.dirname(segmentation_path), UNCERTAINTY_DIR)
  return {m: os.path.join(folder, f"{stem}_{m}.nii.gz") for m in maps}


def _maps(predictor: inference.Predictor, save_uncertainty: bool) -> Tuple[str, ...]:
  """The uncertainty maps written: the entropy, and the disagreement of an ensemble."""
  if not save_uncertainty:
    return ()
  return inference.UNCERTAINTY_MAPS if predictor.num_members > 1 else ("entropy",)


def _outputs(segmentation_path: str, save_probabilities: bool,
             maps: Sequence[str] = ()) -> List[str]:
  return [segmentation_path] + ([probabilities_path(segmentation_path)]
                                if save_probabilities else []) + list(
                                    uncertainty_paths(segmentation_path, maps).values())


def check_not_an_input(outputs: Sequence[str], refs: Sequence[layouts.CaseRef]) -> None:
  """Refuses an output path that is one of the input files (an image it would overwrite)."""
  inputs = {}
  for ref in refs:
    for path in [*ref.image_paths.values(), ref.label_path]:
      if path is not None:
        inputs[os.path.realpath(path)] = ref.case_id
  for path in outputs:
    case_id = inputs.get(os.path.realpath(path))
    if case_id is not None:
      raise ValueError(f"{path}: would overwrite an input file of case {case_id}; choose "
                       "another --output.")


def write_segmentation(seg: np.ndarray, reference: layouts.Case, path: str) -> None:
  """Writes with the reference's affine and header; atomic, so no half-written file remains."""
  header = reference.header.copy()
  header.set_data_dtype(np.uint8)
  image = nib.Nifti1Image(seg.astype(np.uint8), reference.affine, header=header)
  with files.atomic_output(path) as tmp:
    nib.save(image, tmp)


def write_map(values: np.ndarray, reference: layouts.Case, path: str) -> None:
  """A float32 voxel map in the reference's geometry, atomically (its folder is created)."""
  header = reference.header.copy()
  header.set_data_dtype(np.float32)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with files.atomic_output(path) as tmp:
    nib.save(nib.Nifti1Image(values.astype(np.float32), reference.affine, header=header), tmp)


def tumour_uncertainty(labels: np.ndarray, maps: Dict[str, np.ndarray]) -> Dict[str, Any]:
  """A case's report row: predicted tumour voxels and each map's mean inside them (None
  without tumour)."""
  tumour = labels > 0
  row: Dict[str, Any] = {"tumour_voxels": int(tumour.sum())}
  for name in inference.UNCERTAINTY_MAPS:
    if name in maps:
      row[f"mean_{name}_in_tumour"] = float(maps[name][tumour].mean()) if tumour.any() else None
  return row


def write_uncertainty_report(output_dir: str, output: Dict[str, str],
                             conventions: Dict[str, str]) -> List[Dict[str, Any]]:
  """<output>/uncertainty.csv: every case whose maps are in the folder (whichever process or
  run wrote them), read back from the files, so a completed folder has a complete report;
  conventions: case id -> the label convention its segmentation was written in."""
  rows = []
  for case_id, seg_path in sorted(output.items()):
    paths = {m: p for m, p in uncertainty_paths(seg_path).items() if os.path.exists(p)}
    if "entropy" not in paths or not os.path.exists(seg_path):
      continue
    labels = labels_lib.to_canonical(np.asarray(nib.load(seg_path).dataobj),
                                     conventions[case_id], seg_path)
    maps = {m: np.asarray(nib.load(p).dataobj, np.float32) for m, p in paths.items()}
    rows.append({"case": case_id, **tumour_uncertainty(labels, maps)})
  if rows:
    reporting.write_csv(os.path.join(output_dir, UNCERTAINTY_REPORT), rows)
  return rows


def write_probabilities(probabilities: np.ndarray, channels: Sequence[str], path: str) -> None:
  """(C, X, Y, Z) float16 probabilities and their channel names as .npz, atomically."""
  with files.atomic_output(path) as tmp:
    with open(tmp, "wb") as f:
      np.savez_compressed(f, probabilities=probabilities.astype(np.float16),
                          channels=np.asarray(channels))


def _predictor(runs: Runs, options: inference.Options) -> inference.Predictor:
  if isinstance(runs, inference.Predictor):
    return runs
  return inference.Predictor.from_runs(runs, options)


def _check_request(label_convention: str, slices: str) -> None:
  if slices not in SLICE_MODES:
    raise ValueError(f"--slices must be one of {SLICE_MODES}, not {slices!r}.")
  if label_convention != "auto":
    labels_lib.check_convention(label_convention)


def _load(ref: layouts.CaseRef, predictor: inference.Predictor,
          slices: str) -> Tuple[layouts.Case, preprocess.Slices]:
  """Reads a case and prepares its slices (whole brain or the training range)."""
  # The images alone: a segmentation beside them is not read (nor its convention needed).
  case = layouts.load_case(dataclasses.replace(ref, label_path=None),
                           modalities=tuple(predictor.data_config.modalities))
  slice_range = preprocess.brain_slice_range(case.image) if slices == "brain" else None
  return case, predictor.prepare(case.image, slice_range)


def _segment_and_write(predictor: inference.Predictor, case: layouts.Case,
                       prepared: preprocess.Slices, output_path: str, label_convention: str,
                       save_probabilities: bool,
                       save_uncertainty: bool = False) -> inference.Segmentation:
  """Segments prepared slices; writes the probabilities and uncertainty maps (if asked), then
  the segmentation (last: a case is done once it exists; label_convention: resolved,
  layouts.output_convention)."""
  result = predictor.segment(case.image, with_probabilities=save_probabilities, slices=prepared,
                             with_uncertainty=save_uncertainty)
  if save_probabilities:
    write_probabilities(result.probabilities, predictor.channels,
                        probabilities_path(output_path))
  for name, path in uncertainty_paths(output_path, _maps(predictor, save_uncertainty)).items():
    write_map(getattr(result, name), case, path)
  write_segmentation(labels_lib.from_canonical(result.labels, label_convention), case,
                     output_path)
  return result


def _uncertainty_text(result: inference.Segmentation) -> str:
  row = tumour_uncertainty(result.labels, {m: getattr(result, m)
                                           for m in inference.UNCERTAINTY_MAPS
                                           if getattr(result, m) is not None})
  return ", ".join(f"{k.replace('_', ' ')} {v:.4f}" if isinstance(v, float) else
                   f"{k.replace('_', ' ')} {v}" for k, v in row.items())


def predict_case(runs: Runs, input_path: str, output_path: str,
                 options: inference.Options = inference.Options(), *,
                 label_convention: str = "auto", slices: str = "brain",
                 save_probabilities: bool = False, save_uncertainty: bool = False) -> np.ndarray:
  """Segments one case and writes it; returns the canonical label volume.

  options: used to build the predictor from runs (a Predictor carries its own).
  """
  _check_request(label_convention, slices)
  check_output_path(output_path)
  ref = layouts.case_ref_from_path(input_path)
  check_not_an_input(_outputs(output_path, save_probabilities,
                              inference.UNCERTAINTY_MAPS if save_uncertainty else ()), [ref])
  predictor = _predictor(runs, options)
  convention = layouts.output_convention(ref, label_convention, predictor.label_set)
  case, prepared = _load(ref, predictor, slices)
  result = _segment_and_write(predictor, case, prepared, output_path, convention,
                              save_probabilities, save_uncertainty)
  if save_uncertainty:
    logging.info("%s: %s.", ref.case_id, _uncertainty_text(result))
  return result.labels


# ---------------------------------------------------------------------------------------------
# Whole folders.


def is_case_input(path: str) -> bool:
  """True for one case (an MSD image file or a BraTS case folder, or a path that does not
  exist, which the one-case path reports); False for a folder of cases."""
  if not os.path.isdir(path):
    return True
  try:
    layouts.case_ref_from_path(path)
  except DataError:
    return False
  return True


def find_input_cases(folder: str) -> List[layouts.CaseRef]:
  """The cases of a folder: BraTS case folders (also under HGG/, LGG/), else the MSD 4D images
  directly inside it (an `imagesTs`/`imagesTr` folder); sorted by case id."""
  if not os.path.isdir(folder):
    raise DataError(f"{folder}: is not a folder.")
  namings = layouts.folder_namings(folder)  # BraTS case folders of one naming.
  if namings:
    return layouts.find_cases(folder, namings[0])
  names = sorted(n for n in os.listdir(folder) if not n.startswith(".")
                 and n.endswith(layouts.NIFTI_SUFFIXES)
                 and os.path.isfile(os.path.join(folder, n)))
  refs = [layouts.case_ref_from_path(os.path.join(folder, n)) for n in names]
  if not refs:
    hint = (" (an MSD data set: pass its imagesTs/ or imagesTr/ folder)"
            if os.path.isdir(os.path.join(folder, "imagesTr")) else "")
    raise DataError(f"{folder}: no case found: neither BraTS case folders "
                    f"(<case>/<case>_flair.nii.gz) nor MSD 4D images (*.nii.gz){hint}.")
  seen: Dict[str, str] = {}
  for ref in refs:
    path = next(iter(ref.image_paths.values()))
    if ref.case_id in seen:
      raise DataError(f"{folder}: both {seen[ref.case_id]} and {path} are case "
                      f"{ref.case_id}; keep one of them.")
    seen[ref.case_id] = path
  return refs


def check_output_folder(path: str) -> None:
  """Fails before any work when the output folder is a file or cannot be written."""
  if not os.path.isdir(path) and path.endswith(layouts.NIFTI_SUFFIXES):
    raise DataError(f"{path}: a folder of cases is segmented into an output folder, not a "
                    "file.")
  reporting.check_writable_folder(path)


def plan_folder(input_dir: str, output_dir: str, save_probabilities: bool,
                save_uncertainty: bool = False) -> Tuple[List[layouts.CaseRef], Dict[str, str]]:
  """(the input cases, case id -> its segmentation's path), once the request is checked."""
  refs = find_input_cases(input_dir)
  check_output_folder(output_dir)
  output = {r.case_id: os.path.join(output_dir, f"{r.case_id}.nii.gz") for r in refs}
  maps = inference.UNCERTAINTY_MAPS if save_uncertainty else ()
  check_not_an_input([p for r in refs for p in _outputs(output[r.case_id], save_probabilities,
                                                         maps)], refs)
  return refs, output


def check_part(num_parts: int, part_id: int) -> None:
  if num_parts < 1:
    raise ValueError(f"--num_parts must be at least 1, got {num_parts}.")
  if not 0 <= part_id < num_parts:
    raise ValueError(f"--part_id={part_id} must be in 0..{num_parts - 1} "
                     f"(--num_parts={num_parts}).")


def folder_record(predictor: inference.Predictor, label_convention: str,
                  slices: str) -> Dict[str, Any]:
  """What makes a folder's segmentations one prediction's: the processes of one share it."""
  rules = predictor.rules
  return {"source": predictor.source, "tta": predictor.tta,
          "rules": None if rules is None else getattr(rules, "to_json", lambda: repr(rules))(),
          "labels": label_convention, "slices": slices}


def _describe_record(record: Dict[str, Any]) -> str:
  source = record.get("source", {})
  what = (f"package sha256 {source['package'][:12]}" if "package" in source else
          "runs " + ", ".join(f"{r['workdir']}@{r['checkpoint_step']}"
                              for r in source.get("runs", [])))
  return (f"{what}, TTA {'on' if record.get('tta') else 'off'}, rules {record.get('rules')}, "
          f"labels {record.get('labels')}, slices {record.get('slices')}")


def claim_output_folder(output_dir: str, record: Dict[str, Any], overwrite: bool) -> None:
  """Records what writes into output_dir, or refuses a folder another prediction writes into.

  Several processes of one prediction race here harmlessly: the record is created once, whole
  (a hard link of a complete file), and the others find it equal to theirs.
  """
  path = os.path.join(output_dir, RECORD)
  text = json.dumps(record, indent=2, sort_keys=True) + "\n"
  if overwrite:
    files.atomic_write_text(path, text)
    return
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  try:
    os.link(tmp, path)
  except FileExistsError:
    pass
  finally:
    os.remove(tmp)
  try:
    with open(path, encoding="utf-8") as f:
      theirs = json.load(f)
  except ValueError:
    theirs = None
  if theirs != json.loads(text):
    raise DataError(f"{path}: {output_dir} holds the segmentations of another prediction "
                    f"({_describe_record(theirs) if isinstance(theirs, dict) else 'unreadable'})"
                    f", not of this one ({_describe_record(record)}); use another --output, or "
                    "--overwrite to redo every case with this one.")


@dataclasses.dataclass
class FolderResult:
  written: List[str]  # Case ids segmented and written by this call.
  skipped: List[str]  # Case ids whose outputs already existed.
  failed: Dict[str, str]  # Case id -> why it could not be read.


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(int(round(seconds)), 60)
  return f"{minutes}:{seconds:02d}"


def predict_folder(runs: Runs, input_dir: str, output_dir: str,
                   options: inference.Options = inference.Options(), *,
                   label_convention: str = "auto", slices: str = "brain",
                   overwrite: bool = False, save_probabilities: bool = False,
                   save_uncertainty: bool = False, num_parts: int = 1,
                   part_id: int = 0) -> FolderResult:
  """Segments every case of input_dir into output_dir/<case>.nii.gz (one compilation).

  num_parts, part_id: this call segments the sorted cases part_id, part_id + num_parts, ...

  A case that cannot be read or prepared is logged by name and skipped; once the others are
  written, a DataError names every such case.
  """
  _check_request(label_convention, slices)
  check_part(num_parts, part_id)
  predictor = _predictor(runs, options)
  # Every case's output convention before anything is written, the output folder included (a
  # model's class the input's names cannot hold stops the folder); all parts', for the report
  # of the whole folder.
  conventions = {r.case_id: layouts.output_convention(r, label_convention, predictor.label_set)
                 for r in find_input_cases(input_dir)}
  all_refs, output = plan_folder(input_dir, output_dir, save_probabilities, save_uncertainty)
  refs = all_refs[part_id::num_parts]
  claim_output_folder(output_dir, folder_record(predictor, label_convention, slices), overwrite)
  maps = _maps(predictor, save_uncertainty)
  done = lambda r: all(os.path.exists(p) for p in _outputs(output[r.case_id],
                                                           save_probabilities, maps))
  todo = [r for r in refs if overwrite or not done(r)]
  result = FolderResult(written=[], skipped=[r.case_id for r in refs if r not in todo],
                        failed={})
  logging.info("Segmenting %d of the %d case(s) of %s%s into %s on %d device(s)%s.", len(todo),
               len(refs), input_dir,
               f" (part {part_id} of {num_parts})" if num_parts > 1 else "", output_dir,
               len(predictor.devices), f" ({len(result.skipped)} already written; "
               "--overwrite redoes them)" if result.skipped else "")
  t0 = time.perf_counter()
  # The next case is read and prepared while this one runs through the model.
  with futures.ThreadPoolExecutor(max_workers=1) as reader:
    load = lambda i: reader.submit(_load, todo[i], predictor, slices)
    pending = load(0) if todo else None
    for i, ref in enumerate(todo):
      current, pending = pending, load(i + 1) if i + 1 < len(todo) else None
      try:
        case, prepared = current.result()
      except (ValueError, OSError) as e:
        result.failed[ref.case_id] = " ".join(str(e).split())
        logging.error("[%d/%d] %s: skipped, cannot be segmented: %s", i + 1, len(todo),
                      ref.case_id, result.failed[ref.case_id])
        continue
      segmentation = _segment_and_write(predictor, case, prepared, output[ref.case_id],
                                        conventions[ref.case_id], save_probabilities,
                                        save_uncertainty)
      result.written.append(ref.case_id)
      elapsed = time.perf_counter() - t0
      logging.info("[%d/%d] %s -> %s  (%s elapsed, ETA %s)%s", i + 1, len(todo), ref.case_id,
                   output[ref.case_id], _duration(elapsed),
                   _duration(elapsed / (i + 1) * (len(todo) - i - 1)),
                   f"; {_uncertainty_text(segmentation)}" if save_uncertainty else "")
  if save_uncertainty:
    write_uncertainty_report(output_dir, output, conventions)
  if result.failed:
    raise DataError(f"{len(result.failed)} of {len(refs)} case(s) of {input_dir} could not be "
                    f"segmented: {', '.join(result.failed)} (named above); the other "
                    f"{len(result.written) + len(result.skipped)} are in {output_dir}.")
  return result


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; defined by `run` only, so importing this module defines none."""
  flags.DEFINE_list("workdir", None, "Run directory holding the checkpoints; several "
                    "(comma-separated) average their probabilities (an ensemble).")
  flags.DEFINE_string("model", None, "A model package folder (python -m msatt_jax.export), "
                      "instead of --workdir.")
  flags.DEFINE_string("input", None, "BraTS case folder or MSD 4D image; or a folder of them.")
  flags.DEFINE_string("output", None, "Output segmentation (.nii.gz); for a folder of cases, "
                      "the output folder (<case>.nii.gz each).")
  flags.DEFINE_enum("labels", "auto", ["auto", *labels_lib.CONVENTIONS], "Label convention of "
                    "the output: auto = the input's own (2018-2021 names: ET 4; 2023+: ET 3; "
                    "MSD: msd), in the model's label set (an RC model on GLI names: gli2024); "
                    "or a convention of that label set.")
  flags.DEFINE_enum("slices", "brain", list(SLICE_MODES),
                    "'brain': every axial slice containing brain; 'train': the training range.")
  inference.define_option_flags()
  flags.DEFINE_bool("save_probabilities", False, "Also write <case>.npz: float16 probabilities "
                    "(C, X, Y, Z) in the input's geometry.")
  flags.DEFINE_bool("save_uncertainty", False, "Also write uncertainty/<case>_entropy.nii.gz "
                    "(voxel-wise entropy of the averaged probabilities, nats) and, for an "
                    "ensemble, <case>_disagreement.nii.gz (the fraction of members whose "
                    "labels differ from the ensemble's); a folder's uncertainty.csv gives each "
                    "case's means inside the predicted tumour.")
  flags.DEFINE_bool("overwrite", False, "Folder input: redo cases whose outputs exist.")
  flags.DEFINE_integer("num_parts", 1, "Folder input: split the cases into this many parts "
                       "(default: the jax.distributed process count).")
  flags.DEFINE_integer("part_id", 0, "Folder input: the part this process segments, "
                       "0..num_parts-1 (default: the jax.distributed process index).")
  flags.DEFINE_bool("distributed", False, "Join a jax.distributed group (cluster environment, "
                    "or the three flags below); each process then takes its share of the cases.")
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (implies "
                      "--distributed).")
  flags.DEFINE_integer("num_processes", None, "Processes of the group.")
  flags.DEFINE_integer("process_id", None, "This process's index in the group.")
  postprocess_lib.define_postprocess_flag()
  flags.adopt_module_key_flags(postprocess_lib)  # Listed in this command's --help.
  flags.mark_flags_as_required(["input", "output"])


# Where the predictor comes from (_restore or _load_package): (predictor, what it is in words).
_Source = Callable[[], Tuple[inference.Predictor, str]]


def _restore() -> Tuple[inference.Predictor, str]:
  """The predictor of --workdir with the rules of --postprocess (named on the console), and
  what it is in words."""
  options = inference.options_from_flags()
  rules, record = postprocess_lib.resolve(options.postprocess, FLAGS.workdir[0])
  runs = inference.restore_runs(FLAGS.workdir, options.checkpoint)
  postprocess_lib.warn_if_mismatched(rules, record, runs, options.tta)
  logging.info("Postprocessing: %s.", rules.describe() if rules else "none")
  what = (f"checkpoint step {', '.join(str(r.step) for r in runs)}; postprocessing: "
          f"{rules.describe() if rules else 'none'}")
  return inference.Predictor.from_runs(runs, options, rules), what


def _load_package() -> Tuple[inference.Predictor, str]:
  """The predictor of --model: the package's TTA and rules unless the flags say otherwise."""
  tta = FLAGS.tta if FLAGS["tta"].present else None
  rules = {"auto": package_lib.OWN_RULES, "none": None}.get(FLAGS.postprocess)
  if FLAGS.postprocess not in ("auto", "none"):
    rules, _ = postprocess_lib.resolve(FLAGS.postprocess, FLAGS.model)
  loaded = package_lib.load(FLAGS.model, FLAGS.batch_size, tta, rules)
  rules = loaded.predictor.rules
  logging.info("Loaded %s; postprocessing: %s.", loaded.description,
               rules.describe() if rules else "none")
  return loaded.predictor, (f"{loaded.description}; postprocessing: "
                            f"{rules.describe() if rules else 'none'}")


def _check_source() -> None:
  if FLAGS.model is not None and FLAGS.workdir:
    raise ValueError("--model and --workdir: pass one of them, not both (a package holds the "
                     "runs it was exported from).")
  if FLAGS.model is None and not FLAGS.workdir:
    raise ValueError("--workdir or --model: name the runs or the model package to predict "
                     "with.")


def _join_processes() -> Tuple[int, int]:
  """Joins jax.distributed when asked; (num_parts, part_id): the flags', else the group's."""
  if FLAGS.distributed or FLAGS.coordinator_address is not None:
    parallel.initialize_distributed(ml_collections.ConfigDict({
        "enabled": True, "coordinator_address": FLAGS.coordinator_address,
        "num_processes": FLAGS.num_processes, "process_id": FLAGS.process_id,
        "initialization_timeout": 300}))
  if FLAGS["num_parts"].present or FLAGS["part_id"].present:
    return FLAGS.num_parts, FLAGS.part_id
  return jax.process_count(), jax.process_index()


def _folder_input(source: _Source) -> FolderResult:
  """--input is a folder of cases: this process's share of them into the --output folder."""
  plan_folder(FLAGS.input, FLAGS.output, FLAGS.save_probabilities,
              FLAGS.save_uncertainty)  # Before the restore.
  num_parts, part_id = _join_processes()
  predictor, what = source()
  result = predict_folder(predictor, FLAGS.input, FLAGS.output, label_convention=FLAGS.labels,
                          slices=FLAGS.slices, overwrite=FLAGS.overwrite,
                          save_probabilities=FLAGS.save_probabilities,
                          save_uncertainty=FLAGS.save_uncertainty, num_parts=num_parts,
                          part_id=part_id)
  print(f"Wrote {len(result.written)} case(s) to {FLAGS.output} ({what}); "
        f"{len(result.skipped)} already there.")
  return result


def _case_input(source: _Source) -> np.ndarray:
  """--input is one case: its segmentation into the --output file."""
  check_output_path(FLAGS.output)
  check_not_an_input(_outputs(FLAGS.output, FLAGS.save_probabilities,
                              inference.UNCERTAINTY_MAPS if FLAGS.save_uncertainty else ()),
                     [layouts.case_ref_from_path(FLAGS.input)])
  predictor, what = source()
  seg = predict_case(predictor, FLAGS.input, FLAGS.output, label_convention=FLAGS.labels,
                     slices=FLAGS.slices, save_probabilities=FLAGS.save_probabilities,
                     save_uncertainty=FLAGS.save_uncertainty)
  classes = labels_lib.label_set(predictor.label_set).classes
  counts = {name: int((seg == i).sum()) for i, name in enumerate(classes)}
  print(f"Wrote {FLAGS.output} ({what}); voxels per label: {counts}")
  return seg


def main(argv: Sequence[str]) -> Union[np.ndarray, FolderResult]:
  del argv
  _check_source()
  if FLAGS["num_parts"].present or FLAGS["part_id"].present:
    check_part(FLAGS.num_parts, FLAGS.part_id)  # Before joining or restoring anything.
  source = _load_package if FLAGS.model is not None else _restore
  segment = _case_input if is_case_input(FLAGS.input) else _folder_input
  return segment(source)


def run() -> None:
  cli.run_command(main, define_flags)


if __name__ == "__main__":
  run()
