"""Export a trained run, or an ensemble, as a model package that runs without this project's
training stack.

  python -m msatt_jax.export --workdir=runs/paper --output=packages/paper
  python -m msatt_jax.export --workdir=runs/f0,runs/f1,runs/f2 --output=packages/folds \
      [--platforms=cpu,cuda] [--format=savedmodel --savedmodel_batch=16] [--notta] \
      [--checkpoint=best|latest|STEP] [--postprocess=auto|none|PATH]
  python -m msatt_jax.predict --model=packages/paper --input=... --output=...

The package (layout in msatt_jax/package.py) holds each member's forward pass serialised with
`jax.export` (symbolic batch; one file per platform of --platforms: cpu by default, cuda,
rocm or tpu on request, lowered here without the device), its weights (flax msgpack) and
manifest.json: modalities, preprocessing, label set, TTA, the postprocessing rules (as
predict's --postprocess would apply them: auto = the first run's postprocessing.json), the
members and the versions, with a sha256 of every file. --format=savedmodel also writes
savedmodel/, the whole prediction of a fixed batch of --savedmodel_batch preprocessed slices
(members, TTA, probabilities and labels) as a TensorFlow SavedModel through jax2tf, for TF
runtimes (serving_default: images (N,H,W,M) float32 -> labels (N,H,W) uint8, probabilities
(N,H,W,C) float32). The folder is written under a temporary name and renamed when complete;
an existing --output is never written into.
"""

if __name__ == "__main__":
  from msatt_jax import runtime
  runtime.configure()

import os
import shutil
import tempfile
from typing import Any, Dict, Optional, Sequence

from absl import flags
from absl import logging
import jax

from msatt_jax import cli
from msatt_jax import inference
from msatt_jax import package as package_lib
from msatt_jax import postprocess as postprocess_lib
from msatt_jax import reporting

FORMATS = ("jax", "savedmodel")


def check_request(output: str, platforms: Sequence[str], fmt: str,
                  savedmodel_batch: int) -> None:
  """Fails before any work on a bad --output, --platforms, --format or --savedmodel_batch."""
  if os.path.exists(output):
    raise FileExistsError(f"{output}: exists; a package is written whole into a new folder, "
                          "so choose another --output (or remove this one).")
  reporting.check_writable_folder(os.path.dirname(os.path.abspath(output)))
  unknown = [p for p in platforms if p not in package_lib.PLATFORMS]
  if not platforms or unknown:
    raise ValueError(f"--platforms: unknown platform(s) {unknown or platforms}; choose from "
                     f"{', '.join(package_lib.PLATFORMS)}.")
  if fmt not in FORMATS:
    raise ValueError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}.")
  if savedmodel_batch < 1:
    raise ValueError(f"--savedmodel_batch must be at least 1, got {savedmodel_batch}.")


def write_savedmodel(predictor: inference.Predictor, folder: str, batch: int,
                     input_shape: Sequence[int]) -> None:
  """The predictor's whole prediction of `batch` slices as a TF SavedModel (jax2tf)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  fn, variables = predictor.function  # -> labels, probabilities, entropy, disagreement.
  module = tf.Module()
  # Variables, not constants: the graph stays small and the weights are stored once.
  module.weights = tf.nest.map_structure(tf.Variable, jax.device_get(variables))
  converted = jax2tf.convert(fn, with_gradient=False)

  @tf.function(input_signature=[tf.TensorSpec((batch, *input_shape), tf.float32,
                                              name="images")], autograph=False)
  def serve(images):
    labels, probabilities, _, _ = converted(module.weights, images)
    return {"labels": labels, "probabilities": probabilities}

  module.serve = serve
  tf.saved_model.save(module, folder, signatures={"serving_default": serve})


def _files(folder: str) -> Dict[str, str]:
  """Every file under folder (relative path -> sha256), the manifest aside."""
  out = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, folder)
      if rel != package_lib.MANIFEST:
        out[rel] = package_lib.sha256(path)
  return dict(sorted(out.items()))


def export(workdirs: Sequence[str], output: str,
           options: inference.Options = inference.Options(),
           platforms: Sequence[str] = ("cpu",), fmt: str = "jax",
           savedmodel_batch: int = 16) -> Dict[str, Any]:
  """Writes the package of the runs into `output` (a new folder); returns its manifest."""
  check_request(output, platforms, fmt, savedmodel_batch)
  workdirs = list(workdirs)
  if not workdirs:
    raise ValueError("--workdir: name at least one run directory.")
  rules, record = postprocess_lib.resolve(options.postprocess, workdirs[0])
  runs = inference.restore_runs(workdirs, options.checkpoint)
  postprocess_lib.warn_if_mismatched(rules, record, runs, options.tta)
  manifest = package_lib.manifest_for(runs, options.tta, rules.to_json() if rules else None,
                                      rules.describe() if rules else "none", platforms)
  parent = os.path.dirname(os.path.abspath(output))
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(output)}.tmp-")
  try:
    for i, run in enumerate(runs):
      logging.info("Exporting %s (step %d) for %s.", run.workdir, run.step, ", ".join(platforms))
      weights, programs = package_lib.export_member(run, platforms)
      with open(os.path.join(tmp, package_lib.weights_name(i)), "wb") as f:
        f.write(weights)
      for platform, program in programs.items():
        with open(os.path.join(tmp, package_lib.forward_name(i, platform)), "wb") as f:
          f.write(program)
    if fmt == "savedmodel":
      # One device: jax2tf converts the plain program, not its split over devices.
      predictor = inference.Predictor.from_runs(runs, options, devices=jax.local_devices()[:1])
      data = runs[0].config.data
      shape = (data.crop_size, data.crop_size, len(data.modalities))
      write_savedmodel(predictor, os.path.join(tmp, package_lib.SAVEDMODEL_DIR),
                       savedmodel_batch, shape)
      manifest["savedmodel"] = {
          "path": package_lib.SAVEDMODEL_DIR, "signature": "serving_default",
          "batch": savedmodel_batch, "batch_is_fixed": True,
          "inputs": {"images": [savedmodel_batch, *shape]},
          "outputs": {"labels": "(N, H, W) uint8 canonical labels",
                      "probabilities": "(N, H, W, C) float32, averaged over members and TTA"},
          "note": "preprocessed slices in, as `preprocessing` says; no postprocessing rules"}
    manifest["files"] = _files(tmp)
    reporting.write_json(os.path.join(tmp, package_lib.MANIFEST), manifest)
    os.chmod(tmp, 0o755)
    os.rename(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; defined by `run` only, so importing this module defines none."""
  flags.DEFINE_list("workdir", None, "Run directory; several (comma-separated) are exported as "
                    "one ensemble.")
  flags.DEFINE_string("output", None, "The package folder to create (must not exist).")
  inference.define_option_flags(["checkpoint"])
  flags.DEFINE_list("platforms", ["cpu"], "Platforms to lower the forward pass for: "
                    f"{', '.join(package_lib.PLATFORMS)}.")
  flags.DEFINE_enum("format", "jax", list(FORMATS), "'jax': jax.export only; 'savedmodel': also "
                    "a TF SavedModel through jax2tf at --savedmodel_batch slices.")
  flags.DEFINE_integer("savedmodel_batch", 16, "The SavedModel's fixed batch of slices.")
  flags.DEFINE_bool("tta", True, "Record mirroring test-time augmentation as the package's "
                    "default (--notta: the plain forward pass).")
  postprocess_lib.define_postprocess_flag()
  flags.adopt_module_key_flags(postprocess_lib)  # Listed in this command's --help.
  flags.mark_flags_as_required(["workdir", "output"])


def main(argv: Sequence[str]) -> Dict[str, Any]:
  del argv
  manifest = export(FLAGS.workdir, FLAGS.output, inference.options_from_flags(), FLAGS.platforms,
                    FLAGS.format, FLAGS.savedmodel_batch)
  size = sum(os.path.getsize(os.path.join(FLAGS.output, n)) for n in manifest["files"])
  print(f"Wrote {FLAGS.output}: {len(manifest['members'])} member(s), platforms "
        f"{', '.join(manifest['platforms'])}{', SavedModel' if manifest['savedmodel'] else ''}; "
        f"{len(manifest['files'])} files, {size / 2**20:.1f} MiB; postprocessing: "
        f"{manifest['postprocessing']['description']}.")
  return manifest


def run() -> None:
  cli.run_command(main, define_flags)


if __name__ == "__main__":
  run()
