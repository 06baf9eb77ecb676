"""Model packages: a trained run, or an ensemble, as one folder a bare JAX runtime can run.

`python -m msatt_jax.export` writes the folder; `python -m msatt_jax.predict --model=DIR` reads
it back into an `inference.Predictor` without Orbax, a config file or TensorFlow:

  manifest.json                everything inference needs (below) and each other file's sha256
  forward_<i>.<platform>.jax   member i's forward pass, (variables, (B,H,W,M) slices) -> logits:
                               `jax.export` serialised StableHLO, B symbolic, one per platform
  weights_<i>.msgpack          member i's variables ({'params', 'batch_stats'}), flax msgpack
  savedmodel/                  --format=savedmodel only: the whole prediction (members, TTA,
                               labels) as a TF SavedModel (jax2tf), at the manifest's fixed batch

The manifest holds the modalities in input order with the names they go by, the preprocessing
parameters, the label set (its name, output type, channel names, canonical classes, the on-disk
conventions and the regions), TTA, the postprocessing rules, the members (model, checkpoint
step, run config) and the versions that wrote it. The weights travel beside the program, not
inside it, so every member's StableHLO is a few hundred kilobytes whatever its width.

A package is read only whole: a missing file, a sha256 that differs, a format_version newer
than FORMAT_VERSION or a forward pass for another platform is refused with the file's name.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from flax import serialization
import jax
from jax import export as jax_export
import ml_collections
import numpy as np

from data_pipelines.brats import labels as labels_lib
from data_pipelines.brats import layouts
from data_pipelines.brats import preprocess
from msatt_jax import inference
from msatt_jax import postprocess as postprocess_lib

FORMAT = "msatt-jax model package"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # jax.export's names.
SAVEDMODEL_DIR = "savedmodel"
OWN_RULES = "package"  # load(): apply the package's own postprocessing rules.
# The preprocessing keys recorded (the modalities have their own entry).
PREPROCESSING_KEYS = tuple(k for k in inference.INPUT_KEYS if k != "modalities")


class PackageError(ValueError):
  """A package folder that cannot be used: names the file and the problem."""


def forward_name(member: int, platform: str) -> str:
  return f"forward_{member}.{platform}.jax"


def weights_name(member: int) -> str:
  return f"weights_{member}.msgpack"


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def current_platform() -> str:
  """jax.export's name for the platform of this process's default devices."""
  backend = jax.default_backend()
  if backend == "gpu":
    version = jax.local_devices()[0].client.platform_version.lower()
    return "rocm" if "rocm" in version else "cuda"
  return backend


def versions() -> Dict[str, Any]:
  """What wrote a package (and what reads one), for the manifest and its checks."""
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import msatt_jax  # pylint: disable=g-import-not-at-top
  return {"msatt_jax": msatt_jax.__version__, "jax": jax.__version__,
          "jaxlib": jaxlib.__version__, "flax": flax.__version__,
          "export_calling_convention": jax_export.maximum_supported_calling_convention_version}


def modality_entries(modalities: Sequence[str]) -> List[Dict[str, Any]]:
  """The input channels in order, each with the names its files and dataset.json use."""
  aliases: Dict[str, List[str]] = {}
  for alias, name in layouts.MSD_MODALITY_NAMES.items():
    aliases.setdefault(name, []).append(alias)
  return [{"channel": i, "name": name, "aliases": sorted(set(aliases.get(name, [])) - {name})}
          for i, name in enumerate(modalities)]


def label_entry(loss: str, label_set: str = labels_lib.DEFAULT_LABEL_SET) -> Dict[str, Any]:
  """The label set: its name, output type and channels, canonical classes, the on-disk
  conventions of that set, regions."""
  chosen = labels_lib.label_set(label_set)
  return {
      "label_set": chosen.name,
      "output": "sigmoid regions" if inference.is_region_output(loss) else "softmax classes",
      "loss": loss,
      "channels": list(inference.channel_names(loss, chosen.name)),
      "rule": ("ET/TC/WT present where the averaged probability > 0.5; labels built from the "
               "nested regions" if inference.is_region_output(loss)
               else "argmax of the averaged class probabilities"),
      "canonical_classes": {str(i): n for i, n in enumerate(chosen.classes)},
      "conventions": {c.name: {str(raw): v for raw, v in c.values.items()}
                      for c in labels_lib.CONVENTION_TABLE.values()
                      if c.label_set == chosen.name},
      "default_convention": labels_lib.default_convention(chosen.name),
      "regions": {r: [int(c) for c in members] for r, members in chosen.regions},
  }


def _plain(value: Any) -> Any:
  return list(value) if isinstance(value, tuple) else value


def manifest_for(runs: Sequence[inference.TrainedRun], tta: bool,
                 rules: Optional[Mapping[str, Any]], rules_description: str,
                 platforms: Sequence[str]) -> Dict[str, Any]:
  """The manifest of runs (checked to form an ensemble), without the file checksums."""
  config = runs[0].config
  defaults = preprocess.defaults()  # For keys older runs' configs lack.
  return {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "written_by": versions(),
      "modalities": modality_entries(tuple(config.data.modalities)),
      "preprocessing": {k: _plain(config.data.get(k, defaults[k])) for k in PREPROCESSING_KEYS},
      "labels": label_entry(config.loss, runs[0].label_set),
      "tta": {"enabled": bool(tta), "flips": [list(f) for f in inference.TTA_FLIPS]
              if tta else [[]], "axes": "of a (B, H, W, M) batch of slices"},
      "postprocessing": {"rules": dict(rules) if rules else None,
                         "description": rules_description},
      "platforms": list(platforms),
      "input": {"shape": ["B", config.data.crop_size, config.data.crop_size,
                          len(config.data.modalities)], "dtype": "float32",
                "batch": "symbolic (any B >= 1)"},
      "members": [{"name": os.path.basename(os.path.normpath(r.workdir or f"member{i}")),
                   "model": r.config.model.name, "checkpoint_step": int(r.step),
                   "weights": weights_name(i),
                   "forward": {p: forward_name(i, p) for p in platforms},
                   "config": r.config.to_dict()}
                  for i, r in enumerate(runs)],
      "savedmodel": None,
      "files": {},
  }


def export_member(run: inference.TrainedRun,
                  platforms: Sequence[str]) -> Tuple[bytes, Dict[str, bytes]]:
  """(the weights as msgpack, platform -> the serialised forward pass) of one run."""
  weights = serialization.msgpack_serialize(jax.device_get(run.variables))
  # The program's argument tree is the one a reader gets back from the msgpack file.
  restored = serialization.msgpack_restore(weights)
  spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), restored)
  batch, = jax_export.symbolic_shape("b")
  cfg = run.config.data
  images = jax.ShapeDtypeStruct((batch, cfg.crop_size, cfg.crop_size, len(cfg.modalities)),
                                np.float32)
  forward = jax.jit(lambda variables, x: run.model.apply(variables, x, train=False))
  programs = {p: bytes(jax_export.export(forward, platforms=(p,))(spec, images).serialize())
              for p in platforms}
  return bytes(weights), programs


# ---------------------------------------------------------------------------------------------
# Reading.


class ExportedModel:
  """A deserialised forward pass with the `apply` of a Flax model, for inference.Predictor."""

  def __init__(self, exported: jax_export.Exported):
    self.exported = exported

  def apply(self, variables: Any, images: jax.Array, train: bool = False) -> jax.Array:
    del train  # Exported for inference.
    return self.exported.call(variables, images)


@dataclasses.dataclass
class Package:
  path: str
  manifest: Dict[str, Any]
  predictor: inference.Predictor

  @property
  def description(self) -> str:
    members = ", ".join(f"{m['name']} ({m['model']}, step {m['checkpoint_step']})"
                        for m in self.manifest["members"])
    return f"model package {self.path}: {members}"


def _fail(path: str, problem: str) -> PackageError:
  return PackageError(f"{path}: {problem}")


def read_manifest(folder: str) -> Dict[str, Any]:
  """The manifest of a package folder, checked for format, version and files."""
  path = os.path.join(folder, MANIFEST)
  if not os.path.isdir(folder):
    raise _fail(folder, "--model names no folder (a model package written by "
                        "python -m msatt_jax.export).")
  if not os.path.isfile(path):
    raise _fail(path, "missing: not a model package, or an incomplete one (export it again).")
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise _fail(path, f"not a readable package manifest ({e}).") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise _fail(path, f"not a package manifest (its 'format' is not {FORMAT!r}).")
  version = manifest.get("format_version")
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise _fail(path, f"format_version {version!r} is newer than this msatt-jax reads "
                      f"({FORMAT_VERSION}; written by msatt-jax "
                      f"{manifest.get('written_by', {}).get('msatt_jax')}); update msatt-jax.")
  for name, digest in sorted(manifest.get("files", {}).items()):
    file_path = os.path.join(folder, name)
    if not os.path.isfile(file_path):
      raise _fail(file_path, f"missing (listed in {MANIFEST}): the package is incomplete.")
    if sha256(file_path) != digest:
      raise _fail(file_path, f"its sha256 differs from the one in {MANIFEST}: the file was "
                             "changed or damaged.")
  return manifest


def load(folder: str, batch_size: int = 16, tta: Optional[bool] = None,
         rules: Any = OWN_RULES) -> Package:
  """A package's Predictor: its own TTA unless `tta` says otherwise; `rules` OWN_RULES (the
  package's postprocessing), or the rules to apply instead (None: none)."""
  manifest = read_manifest(folder)
  platform = current_platform()
  members = []
  for member in manifest["members"]:
    name = member["forward"].get(platform)
    if name is None:
      raise _fail(folder, f"holds forward passes for {', '.join(member['forward'])} only, and "
                          f"this process runs on {platform}: export with "
                          f"--platforms={','.join([*member['forward'], platform])}.")
    path = os.path.join(folder, name)
    try:
      with open(path, "rb") as f:
        exported = jax_export.deserialize(bytearray(f.read()))
    except Exception as e:  # pylint: disable=broad-except
      raise _fail(path, f"cannot be read by jax {jax.__version__} ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:300]}); it was written by jax "
                        f"{manifest['written_by'].get('jax')}.") from None
    weights_path = os.path.join(folder, member["weights"])
    with open(weights_path, "rb") as f:
      variables = serialization.msgpack_restore(f.read())
    members.append((ExportedModel(exported), variables))
  label_set = manifest["labels"]["label_set"]
  if rules is OWN_RULES:
    recorded = manifest["postprocessing"]["rules"]
    # Chosen for the runs exported, so on their label set's regions.
    rules = (dataclasses.replace(postprocess_lib.rules_from_json(
        recorded, os.path.join(folder, MANIFEST)), label_set=label_set) if recorded else None)
  tta = manifest["tta"]["enabled"] if tta is None else tta
  data = {"modalities": [m["name"] for m in manifest["modalities"]],
          **manifest["preprocessing"]}
  predictor = inference.Predictor(members, manifest["labels"]["loss"], tta,
                                  ml_collections.ConfigDict(data), label_set=label_set,
                                  batch_size=batch_size, rules=rules, source={"package": sha256(
                                      os.path.join(folder, MANIFEST))})
  return Package(path=folder, manifest=manifest, predictor=predictor)
