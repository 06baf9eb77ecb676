"""The model summary: parameter table and XLA-counted FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import brats18
from msatt_jax.models import create_model
from msatt_jax.summary import parameter_table, summarize

import helpers


def _small_unet_config():
  config = brats18.get_config("unet")
  config.data.crop_size = 24
  config.model.base_width = 4
  config.model.depth = 2
  return config


def _conv_macs_unet(size: int, m: int, k: int, w: int) -> int:
  """Multiply-adds of the depth-2 U-Net's convolutions at full (zero-padded) 3x3 windows."""
  conv = lambda s, cin, cout, taps=9: s * s * cin * cout * taps  # noqa: E731
  s0, s1, s2 = size, size // 2, size // 4
  down = conv(s0, m, w) + conv(s0, w, w) + conv(s1, w, 2 * w) + conv(s1, 2 * w, 2 * w)
  bottom = conv(s2, 2 * w, 4 * w) + conv(s2, 4 * w, 4 * w)
  up = (conv(s2, 4 * w, 2 * w, 4) + conv(s1, 4 * w, 2 * w) + conv(s1, 2 * w, 2 * w)
        + conv(s1, 2 * w, w, 4) + conv(s0, 2 * w, w) + conv(s0, w, w))
  return down + bottom + up + conv(s0, w, k, 1)


@pytest.mark.slow
def test_summary_figures_of_a_small_unet():
  config = _small_unet_config()
  lines = []
  figures = summarize(config, print_fn=lines.append)

  model = create_model(config.model, num_classes=4)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 24, 24, 4)), train=False))
  expected = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))
  assert figures["num_params"] == expected
  assert figures["num_batch_stats"] == sum(
      int(np.prod(a.shape)) for a in jax.tree.leaves(variables["batch_stats"]))
  assert figures["input_shape"] == (1, 24, 24, 4)

  rows = figures["param_table"]
  assert sum(r["count"] for r in rows) == expected
  assert len({r["path"] for r in rows}) == len(rows)
  # Creation order (the forward pass), not alphabetical: the first encoder level comes first.
  assert rows[0]["path"].startswith("down0/") and rows[-1]["path"].startswith("head/")

  # XLA skips the zero-padded taps, so it counts a little under 2 x the dense multiply-adds.
  dense = 2 * _conv_macs_unet(24, 4, 4, 4)
  assert 0.8 * dense < figures["forward_flops"] < 1.5 * dense
  # Backward costs about twice the forward; Adam adds a few FLOPs per parameter.
  assert 2.0 * figures["forward_flops"] < figures["train_step_flops"]
  assert figures["train_step_flops"] < 6.0 * figures["forward_flops"]

  text = "\n".join(lines)
  assert f"{expected:,}" in text and "GFLOP" in text and "train step" in text


def test_parameter_table_keeps_dict_order():
  tree = {"b": {"w": np.zeros((2, 3))}, "a": {"w": np.zeros(4), "v": np.zeros(())}}
  rows = parameter_table(tree)
  assert [r["path"] for r in rows] == ["b/w", "a/w", "a/v"]
  assert [r["count"] for r in rows] == [6, 4, 1]
  assert rows[0]["shape"] == (2, 3)


@pytest.mark.slow
def test_summary_command():
  """`python -m msatt_jax.summary` under the shared command convention: figures on success, one
  `error: ...` line for an unknown config key."""
  command = ["-m", "msatt_jax.summary", "--config=configs/tiny.py"]
  proc = helpers.run_python(*command, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Parameters: " in proc.stdout and "train step (" in proc.stdout
  proc = helpers.run_python(*command, "--config.model.no_such_key=1", timeout=600)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "error: --config.model.no_such_key: the config has no key"), proc.stderr[-3000:]
