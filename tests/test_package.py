"""Model packages: export, predict --model with the JAX runtime alone, labels identical to the
runs', refusal of damaged, incomplete or newer packages, and the SavedModel."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import save_untrained_run
from data_pipelines import synthetic
from data_pipelines.errors import DataError
from msatt_jax import export
from msatt_jax import inference
from msatt_jax import package
from msatt_jax import postprocess as postprocess_lib
from msatt_jax import predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# predict's command in this process, then the heavy libraries it loaded, on the last line.
RUN_AND_LIST_MODULES = (
    "import sys\n"
    "from msatt_jax import predict\n"
    "sys.argv = ['predict'] + sys.argv[1:]\n"
    "try:\n"
    "  predict.run()\n"
    "except SystemExit as e:\n"
    "  code = e.code\n"
    "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'orbax', "
    "'tensorflow_datasets'}))\n"
    "sys.exit(code)\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two untrained tiny U-Nets of different seeds: an ensemble whose members disagree."""
  root = tmp_path_factory.mktemp("runs")
  return [save_untrained_run(root / f"f{seed}", seed=seed) for seed in (0, 1)]


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("packages") / "pkg")
  manifest = export.export(runs, out, platforms=("cpu", "cuda"))
  return out, manifest


def _labels(folder):
  return {name: np.asarray(nib.load(os.path.join(folder, name)).dataobj)
          for name in sorted(os.listdir(folder)) if name.endswith(".nii.gz")}


def test_the_manifest_holds_what_inference_needs(exported, runs):
  out, manifest = exported
  assert sorted(os.listdir(out)) == sorted(
      ["manifest.json", "weights_0.msgpack", "weights_1.msgpack", "forward_0.cpu.jax",
       "forward_0.cuda.jax", "forward_1.cpu.jax", "forward_1.cuda.jax"])
  with open(os.path.join(out, "manifest.json")) as f:
    assert json.load(f) == manifest
  assert manifest["format_version"] == package.FORMAT_VERSION
  assert [m["name"] for m in manifest["modalities"]] == ["flair", "t1", "t1ce", "t2"]
  assert "t1gd" in manifest["modalities"][2]["aliases"]
  assert manifest["preprocessing"] == {"crop_size": 32, "crop_center": None, "slice_start": 10,
                                       "slice_stop": 17, "normalize": "zscore",
                                       "crop_around": "volume", "slice_range": "fixed"}
  assert manifest["labels"]["label_set"] == "glioma"
  assert manifest["labels"]["output"] == "softmax classes"
  assert sorted(manifest["labels"]["conventions"]) == ["brats", "brats2023", "msd"]
  assert manifest["labels"]["default_convention"] == "brats"
  assert manifest["labels"]["conventions"]["brats"] == {"0": 0, "1": 1, "2": 2, "4": 3}
  assert manifest["labels"]["regions"] == {"ET": [3], "TC": [1, 3], "WT": [1, 2, 3]}
  assert manifest["tta"]["enabled"] is True and len(manifest["tta"]["flips"]) == 4
  assert manifest["postprocessing"] == {"rules": None, "description": "none"}
  assert [(m["name"], m["checkpoint_step"]) for m in manifest["members"]] == [("f0", 3),
                                                                               ("f1", 3)]
  assert set(manifest["files"]) == set(os.listdir(out)) - {"manifest.json"}
  assert manifest["files"]["weights_0.msgpack"] == package.sha256(
      os.path.join(out, "weights_0.msgpack"))
  assert manifest["written_by"]["jax"] and manifest["savedmodel"] is None


def test_predict_model_runs_without_orbax_or_tensorflow_and_matches_the_runs(
    exported, runs, synthetic_msd, tmp_path):
  out, _ = exported
  images = str(synthetic_msd / "imagesTr")
  from_runs = tmp_path / "from_runs"
  predict.predict_folder(inference.Predictor.from_runs(inference.restore_runs(runs)), images,
                         str(from_runs))
  from_package = tmp_path / "from_package"
  proc = subprocess.run([sys.executable, "-c", RUN_AND_LIST_MODULES, f"--model={out}",
                         f"--input={images}", f"--output={from_package}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == "[]"  # No tensorflow, orbax or tfds.
  assert "model package" in proc.stdout
  expected, got = _labels(from_runs), _labels(from_package)
  assert sorted(got) == sorted(expected) and len(got) == 4
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name])
  assert len({tuple(np.unique(v)) for v in got.values()}) >= 1 and any(
      len(np.unique(v)) > 1 for v in got.values())


def test_a_package_writes_its_runs_label_set_in_the_inputs_convention(exported, runs,
                                                                       synthetic_shape, tmp_path):
  gli2023 = tmp_path / "gli2023"
  synthetic.generate_dataset(gli2023, "brats2023", 2, synthetic_shape, seed=0)
  # A glioma package on 2023 names: the files --workdir writes (brats2023, ET 3).
  from_runs, from_package = tmp_path / "from_runs", tmp_path / "from_package"
  predict.predict_folder(inference.Predictor.from_runs(inference.restore_runs(runs)),
                         str(gli2023), str(from_runs))
  predict.predict_folder(package.load(exported[0]).predictor, str(gli2023), str(from_package))
  expected, got = _labels(from_runs), _labels(from_package)
  assert sorted(got) == sorted(expected) and len(got) == 2
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name])
  # A package of a run trained on GLI 2024 (RC): its label set, channels, regions and rules.
  rc_run = save_untrained_run(tmp_path / "rc", label_convention="gli2024")
  rules = tmp_path / "rules.json"
  rules.write_text(json.dumps({"rules": {"min_component_voxels": {"WT": 5},
                                         "et_min_voxels": 0}, "label_set": "glioma_rc"}))
  rc_dir = str(tmp_path / "rc_pkg")
  manifest = export.export([rc_run], rc_dir, inference.Options(postprocess=str(rules)))
  assert manifest["labels"]["label_set"] == "glioma_rc"
  assert manifest["labels"]["channels"] == ["background", "NETC", "SNFH", "ET", "RC"]
  assert list(manifest["labels"]["conventions"]) == ["gli2024"]
  assert manifest["labels"]["regions"]["RC"] == [4]
  loaded = package.load(rc_dir).predictor
  assert loaded.label_set == "glioma_rc" and loaded.rules.label_set == "glioma_rc"
  rc_out, rc_from_runs = tmp_path / "rc_out", tmp_path / "rc_from_runs"
  predict.predict_folder(loaded, str(gli2023), str(rc_out))
  predict.predict_folder(inference.Predictor.from_runs(
      inference.restore_runs([rc_run]), rules=postprocess_lib.load(str(rules))[0]),
                         str(gli2023), str(rc_from_runs))
  expected, got = _labels(rc_from_runs), _labels(rc_out)
  assert sorted(got) == sorted(expected) and len(got) == 2
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name])
  values = set(np.unique(np.concatenate([v.ravel() for v in got.values()])))
  assert 4 in values and values <= {0, 1, 2, 3, 4}  # RC 4 (gli2024).
  # 2018-2021 names cannot hold RC: refused before anything is written.
  old = tmp_path / "old"
  synthetic.generate_dataset(old, "brats", 1, synthetic_shape, seed=0)
  with pytest.raises(DataError, match=r"the model outputs the 'glioma_rc' label set"):
    predict.predict_folder(loaded, str(old), str(tmp_path / "old_out"))
  assert not (tmp_path / "old_out").exists()


def _copy_package(out, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  copy = str(tmp_path / "copy")
  shutil.copytree(out, copy)
  return copy


def test_a_changed_incomplete_or_newer_package_is_refused_by_name(exported, tmp_path):
  out, manifest = exported
  changed = _copy_package(out, tmp_path)
  with open(os.path.join(changed, "weights_1.msgpack"), "r+b") as f:
    f.seek(100)
    f.write(b"\0\1\2")
  with pytest.raises(package.PackageError,
                     match=f"^{changed}/weights_1.msgpack: its sha256 differs from the one in "
                           "manifest.json"):
    package.load(changed)
  os.remove(os.path.join(changed, "forward_0.cpu.jax"))
  with pytest.raises(package.PackageError, match=f"^{changed}/forward_0.cpu.jax: missing "
                     r"\(listed in manifest.json\): the package is incomplete"):
    package.read_manifest(changed)
  newer = _copy_package(out, tmp_path / "n")
  with open(os.path.join(newer, "manifest.json"), "w") as f:
    json.dump({**manifest, "format_version": package.FORMAT_VERSION + 1}, f)
  with pytest.raises(package.PackageError, match=f"^{newer}/manifest.json: format_version "
                     f"{package.FORMAT_VERSION + 1} is newer than this msatt-jax reads"):
    package.load(newer)
  os.remove(os.path.join(newer, "manifest.json"))
  with pytest.raises(package.PackageError, match=f"^{newer}/manifest.json: missing"):
    package.load(newer)


def test_command_line_errors_are_one_line(exported, runs, synthetic_msd, tmp_path):
  out, _ = exported
  image = str(synthetic_msd / "imagesTr" / "BRATS_001.nii.gz")
  seg = tmp_path / "seg.nii.gz"
  for args, message in [
      ([f"--model={out}", f"--workdir={runs[0]}"], "error: --model and --workdir: pass one"),
      ([f"--model={tmp_path / 'nowhere'}"], f"error: {tmp_path / 'nowhere'}: --model names no "
                                            "folder")]:
    proc = subprocess.run([sys.executable, "-m", "msatt_jax.predict", *args, f"--input={image}",
                           f"--output={seg}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-2000:]
    assert not seg.exists()
  with pytest.raises(FileExistsError, match=f"^{out}: exists"):
    export.export(runs, out)
  with pytest.raises(ValueError, match=r"^--platforms: unknown platform\(s\) \['gpu'\]"):
    export.export(runs, str(tmp_path / "p"), platforms=("gpu",))
  assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_the_savedmodel_gives_the_predictors_labels(runs, tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "pkg")
  manifest = export.export(runs, out, fmt="savedmodel", savedmodel_batch=4)
  assert manifest["savedmodel"]["batch"] == 4 and manifest["savedmodel"]["batch_is_fixed"]
  assert any(name.startswith("savedmodel/") for name in manifest["files"])
  package.read_manifest(out)  # Its files are checked like the others.
  images = np.random.RandomState(0).randn(4, 32, 32, 4).astype(np.float32)
  labels, probs = inference.Predictor.from_runs(inference.restore_runs(runs)).with_probabilities(
      images)
  loaded = tf.saved_model.load(os.path.join(out, "savedmodel"))
  result = loaded.signatures["serving_default"](images=tf.constant(images))
  np.testing.assert_array_equal(result["labels"].numpy(), labels)
  np.testing.assert_allclose(result["probabilities"].numpy(), probs, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# A folder over devices and processes.


@pytest.fixture(scope="module")
def reference(exported, synthetic_msd, tmp_path_factory):
  """The package's labels of the MSD fixture on one device, in this process."""
  out = tmp_path_factory.mktemp("reference") / "preds"
  predict.predict_folder(package.load(exported[0]).predictor, str(synthetic_msd / "imagesTr"),
                         str(out))
  return _labels(out)


def _env(num_devices=1):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _predict_command(package_dir, images, out, *flags):
  return [sys.executable, "-m", "msatt_jax.predict", f"--model={package_dir}",
          f"--input={images}", f"--output={out}", *flags]


def test_two_devices_split_the_slices_with_the_one_device_labels(exported, reference,
                                                                 synthetic_msd, tmp_path):
  out = tmp_path / "preds"
  proc = subprocess.run(_predict_command(exported[0], synthetic_msd / "imagesTr", out,
                                         "--batch_size=3"),
                        cwd=ROOT, env=_env(2), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "on 2 device(s)" in proc.stderr
  got = _labels(out)
  assert sorted(got) == sorted(reference)
  for name in reference:
    np.testing.assert_array_equal(got[name], reference[name])


def test_parts_split_the_cases_and_a_rerun_completes_the_folder(exported, reference,
                                                                synthetic_msd, tmp_path):
  predictor = package.load(exported[0]).predictor
  images, out = str(synthetic_msd / "imagesTr"), str(tmp_path / "preds")
  part = predict.predict_folder(predictor, images, out, num_parts=2, part_id=1)
  cases = sorted(n[:-len(".nii.gz")] for n in reference)
  assert part.written == cases[1::2] and not part.skipped  # nnU-Net's split: every 2nd case.
  # The process of part 0 was lost: a rerun of the whole folder does only what is missing.
  rest = predict.predict_folder(predictor, images, out)
  assert rest.written == cases[0::2] and rest.skipped == cases[1::2]
  got = _labels(out)
  for name in reference:
    np.testing.assert_array_equal(got[name], reference[name])
  with pytest.raises(ValueError, match=r"^--part_id=2 must be in 0\.\.1 \(--num_parts=2\)"):
    predict.predict_folder(predictor, images, out, num_parts=2, part_id=2)
  # Another prediction (here without TTA) may not write into this folder.
  other = package.load(exported[0], tta=False).predictor
  before = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)}
  with pytest.raises(DataError, match=f"^{out}/predict.json: {out} holds the segmentations of "
                     "another prediction .*TTA on.*, not of this one .*TTA off"):
    predict.predict_folder(other, images, out)
  assert {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)} == before


def _free_port():
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_take_their_share_under_jax_distributed(exported, reference,
                                                              synthetic_msd, tmp_path):
  out = tmp_path / "preds"
  port = _free_port()
  procs = [subprocess.Popen(
      _predict_command(exported[0], synthetic_msd / "imagesTr", out,
                       f"--coordinator_address=localhost:{port}", "--num_processes=2",
                       f"--process_id={i}"),
      cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  results = [p.communicate(timeout=300) for p in procs]
  for proc, (_, err) in zip(procs, results):
    assert proc.returncode == 0, err[-3000:]
  for i, (_, err) in enumerate(results):
    assert f"Segmenting 2 of the 2 case(s) of {synthetic_msd / 'imagesTr'} (part {i} of 2)" in err
  got = _labels(out)
  assert sorted(got) == sorted(reference)
  for name in reference:
    np.testing.assert_array_equal(got[name], reference[name])
