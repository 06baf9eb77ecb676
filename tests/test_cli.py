"""The one command-line convention (data_pipelines/cli.py; msatt_jax/cli.py adds JAX's runtime
defaults) as every command follows it: flags defined by `define_flags` alone, the work in `main`,
and a bad request reported as one `error: ...` line with exit status 1, never a traceback."""

import json
import os
import re
import shutil
import textwrap

import pytest

from data_pipelines import cli as base_cli
from data_pipelines import prepare
from data_pipelines import synthetic
from msatt_jax import cli as model_cli
from msatt_jax import evaluate
from msatt_jax import evaluate_folder
from msatt_jax import export
from msatt_jax import postprocess
from msatt_jax import predict
from msatt_jax import summary
from msatt_jax import train

from helpers import error_line, run_python

COMMANDS = {"train": train, "evaluate": evaluate, "evaluate_folder": evaluate_folder,
            "predict": predict, "postprocess": postprocess, "summary": summary,
            "prepare": prepare, "synthetic": synthetic, "export": export}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_commands_leave_the_process_set_up_to_cli(name, monkeypatch):
  """The entry point hands the command's own main and define_flags to the shared run_command
  (flags, logging, exit status and error line are its; the tests below run them)."""
  module = COMMANDS[name]
  calls = []
  for shared in (base_cli, model_cli):
    monkeypatch.setattr(shared, "run_command", lambda *args, **_: calls.append(args))
  module.run()
  assert calls == [(module.main, module.define_flags)]


def test_unknown_config_key_is_one_line(tmp_path):
  config = tmp_path / "config.py"
  config.write_text("import ml_collections\n\n\ndef get_config():\n"
                    "  return ml_collections.ConfigDict({'batch_size': 1})\n")
  command = textwrap.dedent("""
      from ml_collections import config_flags
      from msatt_jax import cli

      def define_flags():
        config_flags.DEFINE_config_file("config", None, "The config.", lock_config=True)

      cli.run_command(lambda argv: None, define_flags, runtime_defaults=False)
  """)
  line = error_line(run_python("-c", command, f"--config={config}",
                               "--config.batch_sizee=3"))
  assert line.startswith("error: --config.batch_sizee: the config has no key 'batch_sizee'")
  assert 'Did you mean "batch_size"' in line


_OPTIONS_FROM_FLAGS = textwrap.dedent("""
    import dataclasses, json, sys
    from absl import flags
    from msatt_jax import inference, predict
    predict.define_flags()
    flags.FLAGS(["predict"] + sys.argv[1:])
    print(json.dumps([dataclasses.asdict(inference.options_from_flags()),
                      dataclasses.asdict(inference.options_from_flags(postprocess="none")),
                      [f.name for f in flags.FLAGS.get_key_flags_for_module(predict)]]))
    """)


def test_inference_options_come_from_one_set_of_flags():
  """A command's --tta, --batch_size, --checkpoint and --postprocess make its Options; an
  option the command fixes (postprocess's 'none') overrides its flag. The shared flags are the
  command's own (its --help lists them)."""
  proc = run_python("-c", _OPTIONS_FROM_FLAGS, "--input=a", "--output=b", "--notta",
                    "--batch_size=4", "--checkpoint=latest")
  assert proc.returncode == 0, proc.stderr[-3000:]
  given, fixed, listed = json.loads(proc.stdout.splitlines()[-1])
  assert given == {"tta": False, "batch_size": 4, "postprocess": "auto", "checkpoint": "latest"}
  assert fixed == {**given, "postprocess": "none"}
  assert {"tta", "batch_size", "checkpoint", "input", "postprocess"} <= set(listed)


def test_flags_shared_between_commands_are_in_each_commands_help():
  """evaluate's --hd95 and --lesion_rules (defined by evaluate_folder) and --postprocess
  (defined by postprocess) are listed by `evaluate --help`, not only by --helpfull."""
  proc = run_python("-m", "msatt_jax.evaluate", "--help")  # absl's --help exits with 1.
  listed = re.findall(r"^\s+--(?:\[no\])?(\w+):", proc.stdout, re.M)
  assert {"hd95", "lesion_rules", "postprocess", "tta", "workdir"} <= set(listed), listed


@pytest.mark.slow
def test_bad_requests_are_one_error_line(tmp_path):
  nowhere = str(tmp_path / "nowhere")
  line = error_line(run_python("-m", "msatt_jax.evaluate", f"--workdir={nowhere}"))
  assert nowhere in line and "no complete checkpoint" in line
  output = tmp_path / "seg.png"
  line = error_line(run_python("-m", "msatt_jax.predict", f"--workdir={nowhere}",
                               f"--input={nowhere}", f"--output={output}"))
  assert str(output) in line and ".nii.gz or .nii" in line
  line = error_line(run_python("-m", "msatt_jax.evaluate_folder", f"--pred={nowhere}",
                               f"--ref={nowhere}"))
  assert nowhere in line and "does not exist" in line
  line = error_line(run_python("-m", "msatt_jax.evaluate_folder", f"--pred={nowhere}",
                               f"--ref={nowhere}", "extra"))
  assert "unexpected arguments: extra" in line
  assert not os.listdir(tmp_path)  # Nothing written by any of them.


@pytest.mark.slow
def test_bad_folder_requests_are_one_error_line(tmp_path, synthetic_msd):
  """Checked before the restore (the workdir does not even exist), nothing written."""
  work = tmp_path / "work"
  work.mkdir()
  nowhere, empty, out = str(work / "nowhere"), work / "empty", work / "out"
  empty.mkdir()
  predict_args = lambda source, target: ("-m", "msatt_jax.predict", f"--workdir={nowhere}",
                                         f"--input={source}", f"--output={target}")
  line = error_line(run_python(*predict_args(empty, out)))
  assert str(empty) in line and "no case found" in line
  a_file = work / "a_file"
  a_file.write_text("x")
  line = error_line(run_python(*predict_args(synthetic_msd / "imagesTr", a_file)))
  assert str(a_file) in line and "is a file" in line
  images = tmp_path / "images"
  shutil.copytree(synthetic_msd / "imagesTr", images)
  line = error_line(run_python(*predict_args(images, images)))
  assert str(images / "BRATS_001.nii.gz") in line and "would overwrite an input file" in line
  assert sorted(os.listdir(work)) == ["a_file", "empty"] and not os.listdir(empty)
  assert sorted(os.listdir(images)) == sorted(os.listdir(synthetic_msd / "imagesTr"))
