"""Building blocks of MSConvLSTM-Att: ConvLSTM, SE, SE-Inception, SE-ResNet, SAM."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msatt_jax.models import (ConvLSTM, SEInception, SEResNetBlock, SpatialAttention,
                              SqueezeExcitation)
from msatt_jax.models.blocks import resolve_attention_implementation


def _key(seed: int = 0) -> jax.Array:
  # 'rbg' keys: the default threefry initialisers take XLA:CPU many seconds to compile.
  return jax.random.key(seed, impl="rbg")


def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("unroll,channels,gate_convs",
                         [(1, 2, "separate"), (3, 1, "separate"), (1, 1, "stacked"),
                          (3, 2, "stacked")])
def test_scanned_convlstm_equals_hand_loop(unroll, channels, gate_convs):
  """Values and gradients equal nn.ConvLSTMCell stepped by hand on the same parameters."""
  x = _normal(1, (2, 3, 6, 5, channels))  # (B, T, H, W, C): odd T, H, W.
  model = ConvLSTM(4, (3, 3), unroll=unroll, gate_convs=gate_convs)
  variables = jax.jit(model.init)(_key(), x)
  cell = nn.ConvLSTMCell(4, (3, 3))

  def hand_loop(params):
    carry = cell.initialize_carry(jax.random.key(0), x[:, 0].shape)
    steps = []
    for t in range(x.shape[1]):
      carry, h = cell.apply({"params": params["cell"]}, carry, x[:, t])
      steps.append(h)
    return jnp.stack(steps, axis=1)

  scanned = jax.jit(model.apply)(variables, x)
  assert scanned.shape == (2, 3, 6, 5, 4)
  np.testing.assert_allclose(scanned, hand_loop(variables["params"]), rtol=1e-5, atol=1e-6)
  weights = _normal(2, scanned.shape)
  grads = [jax.grad(lambda p: jnp.sum(f(p) * weights))(variables["params"])
           for f in (lambda p: model.apply({"params": p}, x), hand_loop)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *grads)


def test_convlstm_gate_forms_agree_in_bfloat16_and_keep_a_float32_carry():
  x = _normal(1, (2, 4, 8, 8, 1))
  forms = [ConvLSTM(4, (3, 3), unroll=4, gate_convs=g, dtype=jnp.bfloat16)
           for g in ("separate", "stacked")]
  variables = jax.jit(forms[0].init)(_key(), x)
  outs = [jax.jit(m.apply)(variables, x) for m in forms]
  assert outs[0].dtype == outs[1].dtype == jnp.float32  # The hidden state stays float32.
  np.testing.assert_allclose(outs[0], outs[1], atol=2e-2)
  with pytest.raises(ValueError, match="gate_convs"):
    ConvLSTM(4, gate_convs="fused").init(_key(), x)



def test_se_gates_lie_in_unit_interval_and_scale_channels():
  x = 50.0 * _normal(2, (3, 5, 7, 8))  # Large inputs push the sigmoid towards its ends.
  se = SqueezeExcitation(ratio=16)
  variables = se.init(_key(), x)
  # Hidden width max(1, 8 // 16) = 1, no biases.
  assert variables["params"]["reduce"]["kernel"].shape == (8, 1)
  assert variables["params"]["expand"]["kernel"].shape == (1, 8)
  assert set(variables["params"]["reduce"]) == {"kernel"}
  gates = se.apply(variables, x, method=SqueezeExcitation.gates)
  assert gates.shape == (3, 8)
  assert bool(jnp.all((gates > 0) & (gates < 1)))
  np.testing.assert_allclose(se.apply(variables, x), x * gates[:, None, None, :], rtol=1e-6)


def test_se_inception_shape_and_batch_stats():
  x = _normal(3, (2, 9, 7, 5))
  block = SEInception(features=10, se_ratio=4)
  variables = jax.jit(block.init, static_argnums=2)(_key(), x, False)
  y, updates = block.apply(variables, x, True, mutable=["batch_stats"])
  assert y.shape == (2, 9, 7, 10)
  # Four branches (the last takes the remainder of 10 = 2 + 2 + 2 + 4), then SE on their concat.
  assert variables["params"]["b4_1x1"]["conv"]["kernel"].shape == (1, 1, 5, 4)
  assert variables["params"]["se"]["expand"]["kernel"].shape == (2, 10)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                         updates["batch_stats"])
  assert all(jax.tree.leaves(changed))
  assert bool(jnp.all(y >= 0))  # Every branch ends in ReLU and the SE gates are positive.


@pytest.mark.parametrize("strides,features,projection", [((2, 2), 12, True), ((1, 1), 6, False)])
def test_se_resnet_block(strides, features, projection):
  x = _normal(4, (2, 9, 8, 6))
  block = SEResNetBlock(features, strides, se_ratio=4)
  variables = jax.jit(block.init, static_argnums=2)(_key(), x, False)
  y = block.apply(variables, x, False)
  expected_hw = (5, 4) if strides == (2, 2) else (9, 8)
  assert y.shape == (2, *expected_hw, features)
  assert ("projection" in variables["params"]) == projection
  assert bool(jnp.all(y >= 0))
  if not projection:
    # With the residual branch's last BatchNorm scaled to zero, the block is ReLU(x).
    params = jax.tree.map(lambda a: a, variables["params"])
    params["conv2"]["bn"]["scale"] = jnp.zeros_like(params["conv2"]["bn"]["scale"])
    params["conv2"]["bn"]["bias"] = jnp.zeros_like(params["conv2"]["bn"]["bias"])
    y0 = block.apply({**variables, "params": params}, x, False)
    np.testing.assert_allclose(y0, nn.relu(x), rtol=1e-6, atol=1e-6)


def _sam_reference(params, v: jax.Array) -> jax.Array:
  """Eqs. (1)-(2) as plain einsums: O = lam * softmax_j(B0_i . B1_j) B2 + V."""
  conv = lambda p, t: jnp.einsum("bhwc,cd->bhwd", t, p["kernel"][0, 0]) + p["bias"]
  b, h, w, c = v.shape
  b0 = conv(params["b0"], v).reshape(b, h * w, -1)
  b1 = conv(params["b1"], v).reshape(b, h * w, -1)
  b2 = conv(params["b2"], v).reshape(b, h * w, c)
  s = jax.nn.softmax(jnp.einsum("bid,bjd->bij", b0, b1), axis=-1)
  r = jnp.einsum("bij,bjc->bic", s, b2).reshape(b, h, w, c)
  return params["lam"] * r + v


@pytest.fixture
def cudnn_path_with_xla(monkeypatch):
  """Runs SpatialAttention's 'cudnn' form on CPU: its code (B0, B1 zero-padded to C for
  jax.nn.dot_product_attention) with XLA's implementation of that function, the retired 'xla'
  form, in place of the GPU-only fused kernel."""
  dot_product_attention = jax.nn.dot_product_attention

  def xla(*args, implementation, **kwargs):
    assert implementation == "cudnn"
    return dot_product_attention(*args, implementation="xla", **kwargs)
  monkeypatch.setattr(jax.nn, "dot_product_attention", xla)


@pytest.mark.parametrize("implementation", ["auto", "einsum", "cudnn"])
def test_sam_is_identity_at_init_and_matches_einsum(implementation, request):
  if implementation == "cudnn":
    request.getfixturevalue("cudnn_path_with_xla")
  v = _normal(5, (2, 5, 7, 16))  # Odd H, W; C = 16 -> B0, B1 have 2 channels.
  sam = SpatialAttention(implementation=implementation)
  variables = sam.init(_key(), v)
  params = variables["params"]
  assert float(params["lam"]) == 0.0
  assert params["b0"]["kernel"].shape == (1, 1, 16, 2)
  assert params["b2"]["kernel"].shape == (1, 1, 16, 16)
  np.testing.assert_array_equal(sam.apply(variables, v), v)

  params = {**params, "lam": jnp.asarray(0.7, jnp.float32)}
  out = sam.apply({"params": params}, v)
  ref = _sam_reference(params, v)
  assert float(jnp.max(jnp.abs(out - v))) > 1e-2  # The attention term is really there.
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("platform, capability, dtype, expected", [
    ("gpu", "9.0", jnp.bfloat16, "cudnn"),  # H100 / H200.
    ("gpu", "8.0", jnp.float16, "cudnn"),  # A100.
    ("gpu", "9.0", jnp.float32, "einsum"),  # The fused kernel has no float32 form.
    ("gpu", "7.0", jnp.bfloat16, "einsum"),  # V100: no fused cuDNN attention.
    ("gpu", None, jnp.bfloat16, "einsum"),  # A GPU that does not say (not CUDA).
    ("cpu", None, jnp.bfloat16, "einsum"),
    ("tpu", None, jnp.bfloat16, "einsum"),
])
def test_sam_auto_picks_the_fused_kernel_only_where_it_runs(platform, capability, dtype,
                                                            expected):
  assert resolve_attention_implementation(platform, capability, dtype) == expected


@pytest.mark.parametrize("implementation", ["flash", "xla"])
def test_sam_rejects_unknown_implementation(implementation):
  with pytest.raises(ValueError, match="implementation"):
    SpatialAttention(implementation=implementation).init(_key(), jnp.ones((1, 4, 4, 8)))
