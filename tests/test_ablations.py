"""The ablation switch of MSConvLSTM-Att: each variant removes exactly its block, pinned by its
parameter count; 'none' is the full model, parameter for parameter."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import brats18
from msatt_jax import checkpointing
from msatt_jax.models import MSConvLSTMAtt, create_model
from msatt_jax.models.msconvlstm_att import ABLATIONS

# Parameters of MSConvLSTMAtt(num_classes=4, ablation=...) at the paper's widths. A change here
# means an ablation (or the model) changed: update docs/architecture.md's "Ablations" with it.
PARAM_COUNTS = {
    "none": 1_568_191,
    "no_convlstm": 1_416_511,  # - 4 x ConvLSTM(32) + 4 x 3x3 conv-BN(32) on one channel.
    "no_se": 1_557_951,  # - 4 x (SE of 64 + SE of 128) at r = 16.
    "no_sam": 1_552_588,  # - 3 x SAM(64).
    "no_fusion": 1_305_727,  # - the multi-scale stack, refine convs of 64 instead of 128 inputs.
    "deepest_only": 1_409_557,  # - the scale-1 and scale-2 heads.
}
# The top-level modules and encoder blocks each ablation removes (or adds).
REMOVED = {
    "no_convlstm": ["encoders/encoder/convlstm"],
    "no_se": ["encoders/encoder/se_inception/se", "encoders/encoder/se_resnet/se"],
    "no_sam": ["sam1", "sam2", "sam3"],
    "no_fusion": ["multi_conv1", "multi_conv2", "multi_conv3"],
    "deepest_only": ["refine1", "refine2", "sam1", "sam2", "classifier1", "classifier2"],
}
TINY = dict(lstm_features=4, inception_features=8, resnet_features=8, fused_features=8,
            se_ratio=4)
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _shapes(ablation: str, **fields):
  model = MSConvLSTMAtt(num_classes=4, ablation=ablation, **fields)
  return jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 4))),
                        jax.random.key(0, impl="rbg"))


def _prefixes(params):
  return set(checkpointing.param_shapes(params))


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_parameter_count_of_each_variant(ablation):
  params = _shapes(ablation)["params"]
  n = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
  print(f"MSConvLSTMAtt ablation={ablation}: {n:,} parameters")
  assert n == PARAM_COUNTS[ablation]
  if ablation != "none":  # Every ablation removes a block, so parameters.
    assert n < PARAM_COUNTS["none"]
    full = _prefixes(_shapes("none")["params"])
    paths = _prefixes(params)
    for block in REMOVED[ablation]:
      assert any(p.startswith(block + "/") for p in full)
      assert not any(p.startswith(block + "/") for p in paths)


def test_none_is_the_full_model_and_the_config_default():
  """'none' builds the same parameter tree as a model built before the switch existed, so old
  checkpoints restore; the config's default is 'none', and an old config without the key
  builds the same model."""
  default = jax.tree.map(lambda s: (s.shape, s.dtype), _shapes("none"))
  model = MSConvLSTMAtt(num_classes=4)
  old = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 4))),
                       jax.random.key(0, impl="rbg"))
  assert jax.tree.map(lambda s: (s.shape, s.dtype), old) == default
  config = brats18.get_model_config("msconvlstm_att")
  assert config.ablation == "none"
  assert create_model(config, num_classes=4) == model
  del config["ablation"]  # A run saved before the switch.
  assert create_model(config, num_classes=4) == model


def test_unknown_ablation_names_the_choices():
  with pytest.raises(ValueError, match="Unknown ablation 'no_lstm'.*none, no_convlstm, no_se, "
                                       "no_sam, no_fusion, deepest_only"):
    _shapes("no_lstm")


@pytest.mark.parametrize("ablation", ["no_convlstm", "no_se", "no_sam", "no_fusion",
                                      "deepest_only"])
def test_each_variant_traces_and_sows_its_heads(ablation):
  """The training-mode forward of every variant on an odd size (shapes only: nothing runs)."""
  model = MSConvLSTMAtt(num_classes=4, ablation=ablation, **TINY)
  x = jax.ShapeDtypeStruct((2, 17, 23, 4), jnp.float32)

  def forward(key, x):
    variables = model.init(key, jnp.zeros((1, 16, 16, 4)))
    return model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"])

  out, state = jax.eval_shape(forward, jax.random.key(0, impl="rbg"), x)
  assert out.shape == (2, 17, 23, 4) and out.dtype == jnp.float32
  scale_logits = state["intermediates"]["scale_logits"]
  assert len(scale_logits) == (1 if ablation == "deepest_only" else 3)
  assert all(s.shape == out.shape for s in scale_logits)


@pytest.mark.slow
def test_deepest_only_predicts_with_the_scale3_head_alone():
  model = MSConvLSTMAtt(num_classes=4, ablation="deepest_only", **TINY)
  variables = _jit(lambda k: model.init(k, jnp.zeros((1, 16, 16, 4))))(
      jax.random.key(0, impl="rbg"))
  x = jax.random.normal(jax.random.key(1), (2, 17, 23, 4))
  out, state = _jit(lambda v, x: model.apply(v, x, train=True,
                                             mutable=["batch_stats", "intermediates"]))(
                                                 variables, x)
  assert bool(jnp.all(jnp.isfinite(out)))
  (scale3,) = state["intermediates"]["scale_logits"]
  np.testing.assert_array_equal(out, scale3)
