"""U-Net, Attention U-Net and FCN-8s: shapes, parameter counts, gates, dtypes, overfitting."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import brats18
from msatt_jax.models import AttentionUNet, FCN, UNet, create_model
from msatt_jax.models.attention_unet import AttentionGate
from msatt_jax.models.common import UpsampleConv2x2, max_pool
from msatt_jax.models.fcn import bilinear_upsample_init

# Small widths keep compilation and steps cheap on CPU.
SMALL = {
    "unet": lambda **kw: UNet(num_classes=4, base_width=8, depth=2, **kw),
    "attunet": lambda **kw: AttentionUNet(num_classes=4, base_width=8, depth=2, **kw),
    "fcn": lambda **kw: FCN(num_classes=4, base_width=8, fc_width=32, **kw),
}


def _count(tree) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _abstract_init(model: nn.Module, shape):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _key(seed: int) -> jax.Array:
  # XLA's own generator: compiling threefry for every parameter shape dominated test time.
  return jax.random.key(seed, impl="rbg")


def _normal(shape, seed: int = 0) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _init(model: nn.Module, *args, **kwargs):
  return jax.jit(functools.partial(model.init, **kwargs))(_key(1), *args)


def _apply(model: nn.Module, **kwargs):
  return jax.jit(functools.partial(model.apply, **kwargs))


@pytest.mark.parametrize("name", ["unet", "attunet", "fcn"])
@pytest.mark.parametrize("hw", [(16, 16), (17, 23), (37, 20), (190, 190)])
def test_output_shape_odd_and_even_sizes(name, hw):
  model = SMALL[name]()
  variables = _abstract_init(model, (1, 16, 16, 4))
  out, updates = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables,
      jnp.zeros((2, *hw, 4)))
  assert out.shape == (2, *hw, 4) and out.dtype == jnp.float32
  assert set(updates) == {"batch_stats"}


def test_default_depth_pads_and_crops_any_size():
  # depth 4 pads to a multiple of 16 (FCN: 32); the logits come back at the input size.
  for model in (UNet(num_classes=3, base_width=4), FCN(num_classes=3, base_width=4, fc_width=8)):
    variables = _abstract_init(model, (1, 16, 16, 2))
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 33, 19, 2))), variables)
    assert out.shape == (1, 33, 19, 3)


# Counted once from the models at the config defaults (4 modalities, 4 classes).
PARAM_COUNTS = {"unet": 7_763_428, "attunet": 8_025_032, "fcn": 20_498_444}


@pytest.mark.parametrize("name", ["unet", "attunet", "fcn"])
def test_parameter_count_at_config_defaults(name):
  model = create_model(brats18.get_model_config(name), num_classes=4)
  variables = _abstract_init(model, (1, 190, 190, 4))
  assert _count(variables["params"]) == PARAM_COUNTS[name]
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))


def test_unet_widths_and_structure():
  variables = _abstract_init(UNet(num_classes=4), (1, 32, 32, 4))
  params = variables["params"]
  assert params["down0"]["conv0"]["conv"]["kernel"].shape == (3, 3, 4, 32)
  assert params["bottleneck"]["conv1"]["conv"]["kernel"].shape == (3, 3, 512, 512)
  assert params["upconv3"]["kernel"].shape == (2, 2, 512, 256)
  # Decoder level 0 sees the concatenated skip (32) and upsampled features (32).
  assert params["up0"]["conv0"]["conv"]["kernel"].shape == (3, 3, 64, 32)
  assert params["head"]["kernel"].shape == (1, 1, 32, 4)
  assert "gate0" not in params


def test_upsample_conv_matmul_equals_the_transposed_convolution():
  x = _normal((2, 5, 7, 6), 0)
  up = UpsampleConv2x2(3)
  variables = _init(up, x)
  variables = jax.tree.map(lambda a: a + 0.1, variables)  # A non-zero bias too.
  y_mm = up.apply(variables, x)
  kernel, bias = variables["params"]["kernel"], variables["params"]["bias"]
  y_ref = jnp.einsum("bhwc,ijcd->bhiwjd", x, kernel).reshape(2, 10, 14, 3) + bias
  # The retired 'conv_transpose' form: lax.conv_transpose, an input-dilated convolution, which
  # without transpose_kernel maps input pixel h to outputs 2h + (1 - i), so the kernel is flipped.
  y_ct = jax.lax.conv_transpose(x, kernel[::-1, ::-1], (2, 2), "VALID",
                                dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
  # nn.ConvTranspose stores the same layer with its kernel flipped.
  y_flax = nn.ConvTranspose(3, (2, 2), (2, 2), padding="VALID").apply(
      {"params": {"kernel": kernel[::-1, ::-1], "bias": bias}}, x)
  for y in (y_mm, y_ct, y_flax):
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,window,strides,padding", [
    ((2, 8, 6, 3), (2, 2), None, "VALID"),  # reshape + max
    ((2, 7, 6, 3), (3, 3), (1, 1), "SAME"),  # separable shifted maxima
    ((2, 7, 5, 3), (2, 2), None, "VALID"),  # H not divisible: nn.max_pool
    ((2, 8, 8, 3), (3, 3), (2, 2), "SAME"),  # overlapping strided: nn.max_pool
])
def test_max_pool_equals_flax_in_values_and_gradients(shape, window, strides, padding):
  x = _normal(shape, 1)
  flax_pool = lambda x: nn.max_pool(x, window, strides=strides or window, padding=padding)
  ours = lambda x: max_pool(x, window, strides, padding)
  np.testing.assert_array_equal(ours(x), flax_pool(x))
  # Random inputs have no ties: the gradient goes to the same maxima, weighted alike.
  weights = _normal(flax_pool(x).shape, 2)
  grad = lambda f, x: jax.grad(lambda x: jnp.sum(f(x) * weights))(x)
  np.testing.assert_allclose(grad(ours, x), grad(flax_pool, x), rtol=1e-6, atol=1e-6)
  # Where inputs tie (ReLU zeros), each output's gradient is shared, none is lost or doubled.
  np.testing.assert_allclose(grad(ours, jnp.zeros(shape)).sum(), weights.sum(), rtol=1e-5)


@pytest.mark.slow
def test_attention_gates_lie_in_unit_interval_and_identity_gates_give_the_unet():
  x = _normal((2, 20, 18, 4), 0)
  att = SMALL["attunet"]()
  variables = _init(att, x, train=False)
  out, state = _apply(att, train=False, mutable=["intermediates"])(variables, x)
  alphas = state["intermediates"]
  assert set(alphas) == {"gate0", "gate1"}
  for level, gate in alphas.items():
    (alpha,) = gate["alpha"]
    assert alpha.shape[-1] == 1
    assert float(alpha.min()) > 0.0 and float(alpha.max()) < 1.0, level
  # Gate level 0 sees the padded full-resolution skip (20x18 padded to 20x20).
  assert alphas["gate0"]["alpha"][0].shape == (2, 20, 20, 1)

  # With every gate replaced by the identity, the network is exactly the U-Net on the
  # same (non-gate) parameters.
  def identity_gates(next_fun, args, kwargs, context):
    if isinstance(context.module, AttentionGate) and context.method_name == "__call__":
      return args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(identity_gates):
    gated_off = _apply(att, train=False)(variables, x)
  unet_vars = {
      "params": {k: v for k, v in variables["params"].items() if not k.startswith("gate")},
      "batch_stats": variables["batch_stats"],
  }
  np.testing.assert_allclose(gated_off, _apply(SMALL["unet"](), train=False)(unet_vars, x),
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(out, gated_off)


def test_attention_gate_multiplies_alpha_into_the_skip():
  skip = _normal((1, 8, 6, 5), 0)
  gating = _normal((1, 4, 3, 7), 1)
  gate = AttentionGate(3)
  variables = _init(gate, skip, gating)
  out, state = _apply(gate, mutable=["intermediates"])(variables, skip, gating)
  (alpha,) = state["intermediates"]["alpha"]
  assert variables["params"]["theta"]["kernel"].shape == (2, 2, 5, 3)
  assert "bias" not in variables["params"]["theta"]
  np.testing.assert_allclose(out, skip * alpha, rtol=1e-6)


def test_fcn_upsampling_starts_bilinear():
  kernel = bilinear_upsample_init(None, (4, 4, 2, 2))
  taps = np.array([0.25, 0.75, 0.75, 0.25])
  np.testing.assert_allclose(kernel[:, :, 0, 0], np.outer(taps, taps))
  assert float(jnp.abs(kernel[:, :, 0, 1]).sum()) == 0.0
  up = nn.ConvTranspose(1, (4, 4), (2, 2), padding="SAME", use_bias=False,
                        kernel_init=bilinear_upsample_init)
  ramp = jnp.broadcast_to(jnp.arange(8.0)[None, :, None, None], (1, 8, 8, 1))
  y = up.apply(up.init(_key(0), ramp), ramp)
  # Away from the zero-padded border it is jax.image.resize's bilinear interpolation.
  ref = jax.image.resize(ramp, (1, 16, 16, 1), "bilinear")
  np.testing.assert_allclose(y[0, 1:-1, 2:-2], ref[0, 1:-1, 2:-2], atol=1e-6)


@pytest.mark.parametrize("name", ["unet", "attunet", "fcn"])
def test_bfloat16_compute_float32_params(name):
  x = jnp.zeros((1, 16, 20, 4))
  model = SMALL[name](dtype=jnp.bfloat16)
  variables = _abstract_init(model, x.shape)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
  jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables))
  # Every convolution and matmul runs in bfloat16 (the output variable's type heads the line).
  heavy = [line for line in jaxpr.splitlines()
           if "= conv_general_dilated[" in line or "= dot_general[" in line]
  assert heavy and all(":bf16[" in line.split("=")[0] for line in heavy), heavy
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  assert out.dtype == jnp.float32


@pytest.mark.slow
def test_bfloat16_logits_close_to_float32():
  x = _normal((1, 16, 20, 4), 0)
  f32, bf16 = SMALL["attunet"](), SMALL["attunet"](dtype=jnp.bfloat16)
  variables = _init(f32, x, train=False)
  out = _apply(bf16, train=False)(variables, x)
  ref = _apply(f32, train=False)(variables, x)
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  assert float(jnp.max(jnp.abs(out - ref))) < 0.05 * float(jnp.max(jnp.abs(ref))) + 0.05


def _blob_batch(size: int):
  """Two images with a concentric tumour: ET (3) inside NCR/NET (1) inside edema (2)."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:size, :size]
  labels = np.zeros((2, size, size), np.int32)
  for b, (cy, cx) in enumerate([(0.45, 0.5), (0.55, 0.4)]):
    r = np.hypot(yy - cy * size, xx - cx * size) / size
    labels[b][r < 0.33] = 2
    labels[b][r < 0.22] = 1
    labels[b][r < 0.11] = 3
  # Each label has its own mean intensity per modality, under noise.
  means = np.array([[0, 0, 0, 0], [1, -1, .5, 1], [1.5, 0, 0, 2], [.5, 1, 2, 0]], np.float32)
  x = means[labels] + 0.3 * rng.standard_normal((2, size, size, 4)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(labels)


def _mean_foreground_dice(pred: np.ndarray, labels: np.ndarray) -> float:
  scores = []
  for c in (1, 2, 3):
    p, t = pred == c, labels == c
    scores.append(2 * np.sum(p & t) / max(np.sum(p) + np.sum(t), 1))
  return float(np.mean(scores))


# FCN-8s predicts at 1/8 resolution: it needs a larger image to draw 4-pixel rings.
@pytest.mark.parametrize("name,size,steps", [("unet", 32, 60), ("attunet", 32, 60),
                                             ("fcn", 48, 100)])
@pytest.mark.slow
def test_overfits_one_batch_with_finite_gradients(name, size, steps):
  model = SMALL[name]()
  x, labels = _blob_batch(size)
  variables = _init(model, x, train=False)
  tx = optax.adam(1e-2)

  def loss_fn(params, batch_stats):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                  train=True, mutable=["batch_stats"])
    probs, one_hot = jax.nn.softmax(logits), jax.nn.one_hot(labels, 4)
    inter = jnp.sum(probs * one_hot, (0, 1, 2))
    total = jnp.sum(probs + one_hot, (0, 1, 2))
    dice = 1 - jnp.mean(((2 * inter + 1e-5) / (total + 1e-5))[1:])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return dice + ce, updates["batch_stats"]

  @jax.jit
  def step(state):
    params, batch_stats, opt_state = state
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    nonzero = sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(grads)) > 0
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), (loss, finite & nonzero)

  state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
  losses, ok = [], []
  for _ in range(steps):
    state, (loss, good) = step(state)
    losses.append(loss)
    ok.append(good)
  assert all(bool(g) for g in ok), "non-finite or all-zero gradients"
  assert float(losses[-1]) < 0.5 * float(losses[0])
  logits = _apply(model, train=False)({"params": state[0], "batch_stats": state[1]}, x)
  dice = _mean_foreground_dice(np.asarray(jnp.argmax(logits, -1)), np.asarray(labels))
  assert dice > 0.9, f"{name}: Dice {dice:.3f} after {steps} steps"
