"""Building blocks of MSConvLSTM-Att: scanned ConvLSTM, SE, SE-Inception, SE-ResNet and SAM.

See docs/architecture.md for the reading of the paper that each block follows.
"""

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from msatt_jax.models.common import ConvBN, max_pool

Dtype = Any


class ConvLSTM(nn.Module):
  """A ConvLSTM (Shi et al. 2015) scanned over the time axis of (B, T, H, W, C).

  One `nn.ConvLSTMCell` driven by `nn.RNN` (an `nn.scan`), so the recurrence compiles to a single
  loop whatever T is. The carry starts at zero; returns every hidden state, (B, T, H, W, features).
  The carry is kept in float32 (the cell's param_dtype) even under a bfloat16 compute dtype, so the
  cell state does not lose precision across steps.

  The first step runs before the loop, through the same cell, on a 1 x 1 zero carry that
  broadcasts over the image: from the zero state the hidden-to-hidden convolution is only its
  bias, so this skips 1/T of the recurrence's largest convolution, forward and backward, with the
  same result and parameters.

  `gate_convs` picks how the later steps compute the gates, on the same parameters:
  - 'separate': the cell's two convolutions, input-to-hidden and hidden-to-hidden, added.
  - 'stacked': one convolution of the input and hidden state side by side, with the two kernels
    stacked along the input channels and the biases summed. The same arithmetic as one larger
    convolution (C + features input channels) instead of two, one of which reads a thin input
    (C = 1 in MSConvLSTM-Att). On CPU it made MSConvLSTM-Att's train step slower (0.71x;
    inference 1.03x); it is here to be measured on GPUs, where the thin convolution costs
    kernels of its own at every step (BENCHMARKS.md).
  """
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  unroll: int = 1  # Steps per loop iteration; T unrolls the loop body fully.
  gate_convs: str = "separate"  # 'separate' | 'stacked' (see above).
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.gate_convs not in ("separate", "stacked"):
      raise ValueError(f"Unknown gate_convs {self.gate_convs!r}; choose 'separate' or 'stacked'.")
    cell = nn.ConvLSTMCell(self.features, self.kernel_size, dtype=self.dtype, name="cell")
    zero = jnp.zeros((x.shape[0],) + (1,) * (x.ndim - 3) + (self.features,), cell.param_dtype)
    carry, first = cell((zero, zero), x[:, 0])
    if x.shape[1] == 1:
      return first[:, None]
    if self.gate_convs == "separate":
      rest = nn.RNN(cell, unroll=self.unroll, name="rnn")(x[:, 1:], initial_carry=carry)
    else:
      rest = self._stacked_steps(cell.variables["params"], carry, x[:, 1:])
    return jnp.concatenate([first[:, None].astype(rest.dtype), rest], axis=1)

  def _stacked_steps(self, params, carry, x: jax.Array) -> jax.Array:
    """nn.ConvLSTMCell's steps over (B, T, H, W, C), each with one stacked gate convolution."""
    ih, hh = params["ih"], params["hh"]
    kernel = jnp.concatenate([ih["kernel"], hh["kernel"]], axis=-2).astype(self.dtype)
    bias = (ih["bias"] + hh["bias"]).astype(self.dtype)

    def step(carry, x_t):
      c, h = carry
      inputs = jnp.concatenate([x_t.astype(self.dtype), h.astype(self.dtype)], axis=-1)
      gates = jax.lax.conv_general_dilated(
          inputs, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
      i, g, f, o = jnp.split(gates, 4, axis=-1)
      c = nn.sigmoid(f + 1) * c + nn.sigmoid(i) * jnp.tanh(g)  # nn.ConvLSTMCell's gate order.
      h = nn.sigmoid(o) * jnp.tanh(c)
      return (c, h), h

    _, hidden = jax.lax.scan(step, carry, jnp.moveaxis(x, 1, 0), unroll=self.unroll)
    return jnp.moveaxis(hidden, 0, 1)


class SqueezeExcitation(nn.Module):
  """Squeeze-and-Excitation (Hu et al. 2018): channel gates from global context.

  Global average pool -> Dense(max(1, C // ratio), no bias) -> ReLU -> Dense(C, no bias) ->
  sigmoid -> channel-wise scale.
  """
  ratio: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def gates(self, x: jax.Array) -> jax.Array:
    """The (B, C) gates in (0, 1) that `__call__` multiplies into x."""
    channels = x.shape[-1]
    # Pool in float32: a bfloat16 sum over a whole feature map loses most of its digits.
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    s = nn.Dense(max(1, channels // self.ratio), use_bias=False, dtype=self.dtype, name="reduce")(s)
    s = nn.relu(s)
    s = nn.Dense(channels, use_bias=False, dtype=self.dtype, name="expand")(s)
    return nn.sigmoid(s)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.gates(x)[:, None, None, :].astype(x.dtype)


class SEInception(nn.Module):
  """Inception module (Szegedy et al. 2015) with SE on the concatenated branches (Hu et al. 2018).

  Branches: 1x1; 1x1 -> 3x3; 1x1 -> 3x3 -> 3x3; 3x3 max-pool -> 1x1. Every conv is conv-BN-ReLU.
  `features` is split evenly over the four branches (the last one takes any remainder), and each
  branch's 1x1 reduction has the branch's width. No identity path. `use_se=False` leaves out
  the SE: the plain Inception module of the 'no_se' ablation.
  """
  features: int
  se_ratio: int = 16
  dtype: Dtype = jnp.float32
  axis_name: Optional[str] = None
  use_se: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    w = self.features // 4
    widths = (w, w, w, self.features - 3 * w)
    conv = lambda f, k, name: ConvBN(f, k, dtype=self.dtype, axis_name=self.axis_name, name=name)
    b1 = conv(widths[0], (1, 1), "b1_1x1")(x, train)
    b2 = conv(widths[1], (1, 1), "b2_1x1")(x, train)
    b2 = conv(widths[1], (3, 3), "b2_3x3")(b2, train)
    b3 = conv(widths[2], (1, 1), "b3_1x1")(x, train)
    b3 = conv(widths[2], (3, 3), "b3_3x3a")(b3, train)
    b3 = conv(widths[2], (3, 3), "b3_3x3b")(b3, train)
    b4 = max_pool(x, (3, 3), strides=(1, 1), padding="SAME")
    b4 = conv(widths[3], (1, 1), "b4_1x1")(b4, train)
    y = jnp.concatenate([b1, b2, b3, b4], axis=-1)
    if not self.use_se:
      return y
    return SqueezeExcitation(self.se_ratio, dtype=self.dtype, name="se")(y)


class SEResNetBlock(nn.Module):
  """Basic ResNet block (He et al. 2016) with SE on the residual branch (Hu et al. 2018).

  3x3 conv-BN-ReLU (strided) -> 3x3 conv-BN -> SE, added to the shortcut (1x1 conv-BN projection
  when the stride or the width changes, else identity), then ReLU. `use_se=False` leaves out
  the SE: the plain ResNet block of the 'no_se' ablation.
  """
  features: int
  strides: tuple[int, int] = (1, 1)
  se_ratio: int = 16
  dtype: Dtype = jnp.float32
  axis_name: Optional[str] = None
  use_se: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = ConvBN(self.features, (3, 3), self.strides, dtype=self.dtype, axis_name=self.axis_name,
               name="conv1")(x, train)
    y = ConvBN(self.features, (3, 3), act=None, dtype=self.dtype, axis_name=self.axis_name,
               name="conv2")(y, train)
    if self.use_se:
      y = SqueezeExcitation(self.se_ratio, dtype=self.dtype, name="se")(y)
    shortcut = x
    if tuple(self.strides) != (1, 1) or x.shape[-1] != self.features:
      shortcut = ConvBN(self.features, (1, 1), self.strides, act=None, dtype=self.dtype,
                        axis_name=self.axis_name, name="projection")(x, train)
    return nn.relu(y + shortcut)


def resolve_attention_implementation(platform: str, compute_capability: Optional[str],
                                     dtype: Dtype) -> str:
  """What SpatialAttention's 'auto' runs on a device: the fused cuDNN kernel on an NVIDIA GPU
  that has it (compute capability 8.0 or newer) in 16-bit compute, else the plain einsum.

  Measured on an H200 in bfloat16 (BENCHMARKS.md): the cuDNN kernel makes MSConvLSTM-Att's
  train step 1.23x faster than the einsum; on CPU the einsum is the faster form.
  """
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if platform == "gpu" and half and compute_capability:
    if float(compute_capability) >= 8.0:
      return "cudnn"
  return "einsum"


def _attention_einsum(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
  """softmax_j(query_i . key_j) @ value, one example at a time.

  The N x N map of all examples at once was over half of a train step's memory (BENCHMARKS.md,
  "Memory"): here one example's map exists at a time, and the backward pass recomputes it from
  query and key (jax.checkpoint) instead of holding it from the forward pass.
  """
  @jax.checkpoint
  def one_example(qkv: Tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
    q, k, v = qkv
    logits = jnp.einsum("id,jd->ij", q, k, preferred_element_type=jnp.float32)
    return jax.nn.softmax(logits, axis=-1).astype(v.dtype) @ v
  return jax.lax.map(one_example, (query, key, value))


class SpatialAttention(nn.Module):
  """Spatial Attention Module (the paper's Fig. 5, eqs. 1-2; DANet's position attention, Fu 2019).

  For V (B, H, W, C): B0, B1 = 1x1 convs to C // reduction channels, B2 = 1x1 conv to C;
  S = softmax_j(B0_i . B1_j) over the N = H*W positions (no 1/sqrt(d) scaling);
  R_i = sum_j S_ij B2_j; O = lambda * R + V with the scalar lambda initialised to 0, so the module
  starts as the identity.

  `implementation` picks how R is computed (both give the same R):
  - 'auto' (default): 'cudnn' where it runs (see `resolve_attention_implementation`), else
    'einsum';
  - 'einsum': two einsums and a float32 softmax on the unpadded B0, B1 (the fewest FLOPs; what
    XLA would run anyway, since it has no fused attention kernel on CPU);
  - 'cudnn': `jax.nn.dot_product_attention` with scale 1 on the fused GPU kernel
    (bfloat16/float16 only), which never materialises the N x N map. That function needs query,
    key and value of one width, so B0 and B1 are zero-padded to C, which leaves every dot
    product B0_i . B1_j unchanged. Unfused (XLA's implementation of the same function) the
    padding would multiply the FLOPs of B0 . B1^T by C / (C // reduction), so only the fused
    kernel is offered; the tests run this path with XLA's implementation.
  """
  reduction: int = 8
  implementation: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, v: jax.Array) -> jax.Array:
    b, h, w, c = v.shape
    inner = max(1, c // self.reduction)
    proj = lambda f, name: nn.Conv(f, (1, 1), dtype=self.dtype, name=name)(v)
    # (B, N, width): the N = H*W positions as a sequence.
    flat = lambda t: t.reshape(b, h * w, t.shape[-1])
    query, key, value = flat(proj(inner, "b0")), flat(proj(inner, "b1")), flat(proj(c, "b2"))
    implementation = self.implementation
    if implementation == "auto":
      device = jax.devices()[0]
      implementation = resolve_attention_implementation(
          device.platform, getattr(device, "compute_capability", None), self.dtype)
    if implementation == "einsum":
      r = _attention_einsum(query, key, value)
    elif implementation == "cudnn":
      # One head, in dot_product_attention's (batch, length, heads, dim) layout.
      pad = lambda t: jnp.pad(t, ((0, 0), (0, 0), (0, c - inner)))[:, :, None, :]
      r = jax.nn.dot_product_attention(pad(query), pad(key), value[:, :, None, :], scale=1.0,
                                       implementation="cudnn")
    else:
      raise ValueError(f"Unknown SpatialAttention implementation {self.implementation!r}; "
                       "choose 'auto', 'einsum' or 'cudnn'.")
    r = r.reshape(b, h, w, c).astype(self.dtype)
    lam = self.param("lam", nn.initializers.zeros_init(), (), jnp.float32)
    return lam.astype(self.dtype) * r + v.astype(self.dtype)
