"""Segment a new scan with a trained run.

  python -m msatt_jax.predict --workdir=runs/paper --input=BraTS_case_folder --output=seg.nii.gz
  python -m msatt_jax.predict --workdir=runs/paper --input=imagesTs/BRATS_485.nii.gz \
      --output=BRATS_485.nii.gz --labels=msd

CASE is a BraTS case folder (<case>_{flair,t1,t1ce,t2}.nii.gz) or an MSD 4D image. The output has
the input's shape, affine and header, in BraTS labels (0, 1, 2, 4) unless --labels=msd.
"""

if __name__ == "__main__":
  # Before JAX loads: the XLA flags and allocator settings (msatt_jax/runtime.py) must be in
  # the environment from the start, which may re-execute this process once.
  from msatt_jax import runtime
  runtime.configure()

import os
from typing import Optional

import nibabel as nib
import numpy as np

from data_pipelines.brats import labels as labels_lib
from data_pipelines.brats import layouts
from data_pipelines.brats import preprocess
from msatt_jax import inference

SLICE_MODES = ("brain", "train")


def check_output_path(path: str) -> None:
  """Fails before any work when the segmentation could not be written."""
  if not (path.endswith(".nii.gz") or path.endswith(".nii")):
    raise ValueError(f"{path}: the output must be a .nii.gz or .nii file.")
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{path}: the output folder {folder} does not exist.")
  if not os.access(folder, os.W_OK):
    raise PermissionError(f"{path}: the output folder {folder} is not writable.")
  if os.path.isdir(path):
    raise IsADirectoryError(f"{path}: is a folder, not an output file name.")


def write_segmentation(seg: np.ndarray, reference: layouts.Case, path: str) -> None:
  """Writes with the reference's affine and header; atomic, so no half-written file remains."""
  header = reference.header.copy()
  header.set_data_dtype(np.uint8)
  image = nib.Nifti1Image(seg.astype(np.uint8), reference.affine, header=header)
  suffix = ".nii.gz" if path.endswith(".nii.gz") else ".nii"
  tmp = path[:-len(suffix)] + ".partial" + suffix
  nib.save(image, tmp)
  os.replace(tmp, path)


def predict_case(run: inference.TrainedRun, input_path: str, output_path: str,
                 label_convention: str = "brats", slices: str = "brain",
                 batch_size: int = 16) -> np.ndarray:
  """Segments one case and writes it; returns the canonical label volume."""
  if slices not in SLICE_MODES:
    raise ValueError(f"--slices must be one of {SLICE_MODES}, not {slices!r}.")
  labels_lib.resolve_convention(label_convention, "brats")
  check_output_path(output_path)
  data_config = run.config.data
  case = layouts.load_case(layouts.case_ref_from_path(input_path),
                           modalities=tuple(data_config.modalities))
  slice_range = preprocess.brain_slice_range(case.image) if slices == "brain" else None
  predict = inference.predictor_for_run(run)
  seg = inference.segment_volume(predict, case.image, data_config, slice_range, batch_size)
  write_segmentation(labels_lib.from_canonical(seg, label_convention), case, output_path)
  return seg


def main(argv):
  del argv
  from absl import flags
  from msatt_jax import cli
  cli.hide_accelerators_from_tensorflow()
  cli.setup_logging()
  f = flags.FLAGS

  def work() -> Optional[np.ndarray]:
    check_output_path(f.output)  # Before the (slow) restore.
    run = inference.restore_run(f.workdir, f.checkpoint)
    seg = predict_case(run, f.input, f.output, f.labels, f.slices, f.batch_size)
    counts = {name: int((seg == i).sum()) for i, name in enumerate(labels_lib.CLASS_NAMES)}
    print(f"Wrote {f.output} (checkpoint step {run.step}); voxels per label: {counts}")
    return seg

  cli.run_or_exit(work)


def run():
  from msatt_jax import runtime
  runtime.configure()  # A no-op when the module's own guard above already ran it.
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "Run directory holding the checkpoints.")
  flags.DEFINE_string("input", None, "BraTS case folder or MSD 4D image.")
  flags.DEFINE_string("output", None, "Output segmentation (.nii.gz).")
  flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
  flags.DEFINE_enum("labels", "brats", ["brats", "msd"], "Label convention of the output.")
  flags.DEFINE_enum("slices", "brain", list(SLICE_MODES),
                    "'brain': every axial slice containing brain; 'train': the training range.")
  flags.DEFINE_integer("batch_size", 16, "Slices per forward pass.")
  flags.mark_flags_as_required(["workdir", "input", "output"])
  app.run(main)


if __name__ == "__main__":
  run()
