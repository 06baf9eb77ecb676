"""MSConvLSTM-Att: shapes, per-modality encoders, deep-supervision outputs, dtypes, overfitting."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import brats18
from msatt_jax.models import MSConvLSTMAtt, UNet, create_model
from msatt_jax.models.msconvlstm_att import ModalityEncoder, ModalityEncoders

# Parameters of MSConvLSTMAtt(num_classes=4) at the paper's widths; a change here means the
# architecture changed (update docs/architecture.md with it).
PAPER_PARAM_COUNT = 1_568_191
# Small widths keep CPU compilation and steps fast; the structure is the paper's.
TINY = dict(lstm_features=4, inception_features=8, resnet_features=8, fused_features=8)
# Compiled without XLA's backend optimisation: compiling the four unrolled modality encoders,
# not running the tiny steps, is what these tests spend their time on.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _key(seed: int = 0) -> jax.Array:
  # 'rbg' keys: the default threefry initialisers take XLA:CPU many seconds to compile.
  return jax.random.key(seed, impl="rbg")


def _count(params) -> int:
  return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


@pytest.fixture(scope="module")
def tiny_variables():
  """Variables of the tiny model."""
  model = MSConvLSTMAtt(num_classes=4, **TINY)
  return _jit(lambda k: model.init(k, jnp.zeros((1, 16, 16, 4))))(_key())


def test_paper_default_parameter_count_and_registry():
  model = MSConvLSTMAtt(num_classes=4)
  shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 4))), _key())
  n = _count(shapes["params"])
  print(f"MSConvLSTMAtt paper-default parameters: {n:,}")
  assert n == PAPER_PARAM_COUNT
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes["params"]))

  config_model = create_model(brats18.get_model_config("msconvlstm_att"), num_classes=4)
  assert config_model == model  # The config's defaults are the model's defaults.


@pytest.mark.parametrize("name,retired,model", [
    ("msconvlstm_att", {"modality_map": "vmap"}, MSConvLSTMAtt(num_classes=4)),
    ("unet", {"upsample": "conv_transpose"}, UNet(num_classes=4)),
])
def test_saved_configs_naming_removed_forms_build_the_kept_form(name, retired, model):
  """A run's saved config may name a form measured and removed since (the same function on the
  same parameters): it restores as the kept form."""
  saved = ml_collections.ConfigDict({**brats18.get_model_config(name).to_dict(), **retired})
  assert create_model(saved, num_classes=4) == model


def _train_apply(model: MSConvLSTMAtt, variables, x: jax.Array):
  return _jit(lambda v, x: model.apply(v, x, train=True,
                                      mutable=["batch_stats", "intermediates"]))(variables, x)


@pytest.fixture(scope="module")
def odd_batch_float32(tiny_variables):
  """A training-mode forward of the tiny float32 model on an odd-sized batch: x, logits, state."""
  x = jax.random.normal(jax.random.key(1), (2, 17, 23, 4))
  return x, *_train_apply(MSConvLSTMAtt(num_classes=4, **TINY), tiny_variables, x)


def test_shapes_sown_scale_logits_and_gate_forms(tiny_variables, odd_batch_float32):
  model = MSConvLSTMAtt(num_classes=4, **TINY)
  # Training mode on an odd size: logits, the three sown per-scale logits, new batch statistics.
  x, out, state = odd_batch_float32
  assert out.shape == (2, 17, 23, 4) and out.dtype == jnp.float32
  scale_logits = state["intermediates"]["scale_logits"]
  assert len(scale_logits) == 3
  for logits in scale_logits:
    assert logits.shape == out.shape and logits.dtype == jnp.float32
  np.testing.assert_allclose(out, sum(scale_logits) / 3, rtol=1e-6, atol=1e-6)
  assert jax.tree.structure(state["batch_stats"]) == jax.tree.structure(
      tiny_variables["batch_stats"])

  # Inference on an even size; the 'stacked' ConvLSTM gate convolution gives the same logits
  # from the same variables.
  x = jax.random.normal(jax.random.key(2), (1, 32, 32, 4))
  separate = _jit(model.apply)(tiny_variables, x)
  assert separate.shape == (1, 32, 32, 4) and bool(jnp.all(jnp.isfinite(separate)))
  stacked = _jit(model.clone(convlstm_gate_convs="stacked").apply)(tiny_variables, x)
  np.testing.assert_allclose(separate, stacked, rtol=1e-4, atol=1e-5)


class _VmappedEncoders(ModalityEncoders):
  """The reference for the scanned encoders, their removed 'vmap' form: nn.vmap runs the M
  encoders side by side (per-modality kernels become grouped convolutions) on the same tree."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool):
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(ModalityEncoder)
              if f.name not in ("parent", "name")}
    vmapped = nn.vmap(ModalityEncoder, variable_axes={"params": 0, "batch_stats": 0},
                      split_rngs={"params": True}, in_axes=(3, None), out_axes=3)
    return vmapped(**fields, name="encoder")(x, train)


@pytest.fixture(scope="module")
def encoders():
  """Small modality encoders over three modalities: fields, an input and initial variables."""
  fields = dict(lstm_features=2, inception_features=4, resnet_features=4, se_ratio=4)
  x = jax.random.normal(jax.random.key(3), (1, 16, 16, 3, 1))
  variables = _jit(ModalityEncoders(**fields).init, static_argnums=2)(_key(), x, False)
  return fields, x, variables


@pytest.mark.parametrize("train", [False, True])
def test_scanned_encoders_equal_the_vmapped_reference(encoders, train):
  fields, x, variables = encoders
  outputs = [_jit(functools.partial(model.apply, train=train, mutable=["batch_stats"]))(
      variables, x) for model in (ModalityEncoders(**fields), _VmappedEncoders(**fields))]
  # The three scales and, in training, the new BatchNorm statistics of every modality.
  assert jax.tree.structure(outputs[0]) == jax.tree.structure(outputs[1])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *outputs)


def test_modality_encoders_have_separate_weights(encoders):
  fields, x, variables = encoders
  m = x.shape[3]
  kernels = {jax.tree_util.keystr(path): leaf for path, leaf in
             jax.tree_util.tree_leaves_with_path(variables["params"]) if "kernel" in str(path)}
  assert len(kernels) > 10
  for name, kernel in kernels.items():
    assert kernel.shape[0] == m, name
    for i in range(m):
      for j in range(i + 1, m):
        assert not np.allclose(kernel[i], kernel[j]), f"{name}: modalities {i}, {j} share weights"

  # Changing modality 1's encoder changes only modality 1's features.
  apply = _jit(functools.partial(ModalityEncoders(**fields).apply, train=False))
  base = apply(variables, x)
  bumped = {**variables,
            "params": jax.tree.map(lambda p: p.at[1].add(0.1), variables["params"])}
  moved = apply(bumped, x)
  for scale, (a, b) in enumerate(zip(base, moved), start=1):
    assert a.shape[3] == m, scale
    np.testing.assert_array_equal(a[:, :, :, [0, 2]], b[:, :, :, [0, 2]])
    assert float(jnp.max(jnp.abs(a[:, :, :, 1] - b[:, :, :, 1]))) > 1e-4, scale


def test_bfloat16_compute_with_float32_params(tiny_variables, odd_batch_float32):
  model = MSConvLSTMAtt(num_classes=4, dtype=jnp.bfloat16, **TINY)
  shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 16, 16, 4))), _key())
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))
  assert jax.tree.structure(shapes) == jax.tree.structure(tiny_variables)

  x, reference, _ = odd_batch_float32
  out, state = _train_apply(model, tiny_variables, x)
  assert out.dtype == jnp.float32 and out.shape == (2, 17, 23, 4)
  assert all(l.dtype == jnp.float32 for l in state["intermediates"]["scale_logits"])
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(state["batch_stats"]))
  assert bool(jnp.all(jnp.isfinite(out)))
  # bfloat16 keeps ~3 significant digits; the logits should agree to a few percent of their range.
  assert float(jnp.max(jnp.abs(out - reference))) < 0.05 * float(jnp.std(reference)) + 0.05


def _blob_batch():
  """Two 32x32x4 slices, each with a nested round tumour: ET (3) in NCR/NET (1) in edema (2)."""
  yy, xx = np.mgrid[:32, :32]
  rng = np.random.default_rng(0)
  labels = np.zeros((2, 32, 32), np.int32)
  images = np.zeros((2, 32, 32, 4), np.float32)
  for i, (cy, cx) in enumerate([(14, 17), (18, 13)]):
    r = np.hypot(yy - cy, xx - cx)
    labels[i][r < 11] = 2
    labels[i][r < 7.5] = 1
    labels[i][r < 4.5] = 3
    for m in range(4):  # Each modality brightens one class (and the whole tumour a little).
      images[i, ..., m] = (rng.normal(0, 0.3, (32, 32)) + (labels[i] == m % 3 + 1)
                           + 0.5 * (labels[i] > 0))
  return jnp.asarray(images), jnp.asarray(labels)


@pytest.fixture(scope="module")
def train_step():
  """A jitted Adam step on softmax cross-entropy + soft Dice; returns the gradients too."""
  model = MSConvLSTMAtt(num_classes=4, **TINY)
  tx = optax.adam(1e-2)

  def loss_fn(params, batch_stats, x, y):
    logits, state = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"])
    onehot = jax.nn.one_hot(y, 4)
    ce = optax.softmax_cross_entropy(logits, onehot).mean()
    probs = jax.nn.softmax(logits)
    inter = jnp.sum(probs * onehot, axis=(0, 1, 2))
    denom = jnp.sum(probs + onehot, axis=(0, 1, 2))
    dice_loss = 1.0 - jnp.mean((2 * inter + 1) / (denom + 1))
    return ce + dice_loss, state["batch_stats"]

  @_jit
  def step(params, batch_stats, opt_state, x, y):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss, grads

  @_jit
  def dice(params, batch_stats, x, y):
    """Hard Dice of the inference-mode prediction for each tumour class 1..3 present."""
    pred = jnp.argmax(model.apply({"params": params, "batch_stats": batch_stats}, x), -1)
    a, b = pred[..., None] == jnp.arange(1, 4), y[..., None] == jnp.arange(1, 4)
    return 2 * jnp.sum(a & b, axis=(0, 1, 2)) / jnp.sum(a.astype(int) + b, axis=(0, 1, 2))

  return tx, step, dice


@pytest.mark.slow
def test_gradients_are_finite(tiny_variables, train_step):
  tx, step, _ = train_step
  x, y = _blob_batch()
  params = tiny_variables["params"]
  *_, loss, grads = step(params, tiny_variables["batch_stats"], tx.init(params), x, y)
  assert bool(jnp.isfinite(loss))
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for _, g in leaves)
  silent = {jax.tree_util.keystr(p) for p, g in leaves if not bool(jnp.any(g != 0))}
  # With lambda = 0 the SAM projections get no gradient yet; lambda itself does.
  sam = {name for name in map(jax.tree_util.keystr, (p for p, _ in leaves))
         if "sam" in name and "lam" not in name}
  assert sam <= silent
  # Everything else learns, except that an SE block's few hidden ReLUs (1 at these tiny widths)
  # may be inactive for the whole batch.
  others = silent - sam
  assert all("['se']" in name for name in others), others


@pytest.mark.slow
def test_overfits_one_small_batch(tiny_variables, train_step):
  tx, step, dice = train_step
  x, y = _blob_batch()
  params, batch_stats = tiny_variables["params"], tiny_variables["batch_stats"]
  opt_state = tx.init(params)
  scores = []
  for i in range(1, 151):
    params, batch_stats, opt_state, loss, _ = step(params, batch_stats, opt_state, x, y)
    if i % 25 == 0:
      scores.append(float(jnp.mean(dice(params, batch_stats, x, y))))
      if scores[-1] > 0.9:
        break
  assert scores[-1] > 0.9, f"mean tumour Dice every 25 steps: {scores}"


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["convs", "nothing"])
def test_encoder_remat_changes_memory_not_the_gradient(tiny_variables, remat):
  """Recomputing the encoders in the backward pass gives the same loss and gradients."""
  x = jax.random.normal(jax.random.key(2), (2, 16, 16, 4))

  def loss_and_grads(model):
    def loss(params):
      logits, _ = model.apply({**tiny_variables, "params": params}, x, train=True,
                              mutable=["batch_stats"])
      return jnp.mean(logits ** 2)
    return _jit(jax.value_and_grad(loss))(tiny_variables["params"])

  plain = loss_and_grads(MSConvLSTMAtt(num_classes=4, **TINY))
  rematted = loss_and_grads(MSConvLSTMAtt(num_classes=4, encoder_remat=remat, **TINY))
  np.testing.assert_allclose(rematted[0], plain[0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(rematted[1]), jax.tree.leaves(plain[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
