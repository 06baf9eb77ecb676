"""Layers and shape helpers shared by every model."""

import functools
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class ConvBN(nn.Module):
  """Conv -> BatchNorm -> optional activation (no conv bias: BatchNorm's shift replaces it)."""
  features: int
  kernel_size: Tuple[int, int] = (3, 3)
  strides: Tuple[int, int] = (1, 1)
  act: Optional[Callable[[jax.Array], jax.Array]] = nn.relu
  dtype: Dtype = jnp.float32
  axis_name: Optional[str] = None  # Averages BatchNorm statistics over this device axis.
  momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Conv(self.features, self.kernel_size, self.strides, padding="SAME", use_bias=False,
                dtype=self.dtype, name="conv")(x)
    x = batch_norm(train, self.dtype, self.axis_name, self.momentum, name="bn")(x)
    return self.act(x) if self.act is not None else x


def batch_norm(train: bool, dtype: Dtype, axis_name: Optional[str], momentum: float = 0.9,
               name: Optional[str] = None) -> nn.BatchNorm:
  """BatchNorm with float32 statistics whatever the compute dtype."""
  return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=1e-5,
                      dtype=dtype, param_dtype=jnp.float32, axis_name=axis_name, name=name)


def max_pool(x: jax.Array, window: Tuple[int, int], strides: Optional[Tuple[int, int]] = None,
             padding: str = "VALID") -> jax.Array:
  """`nn.max_pool` of (B,H,W,C), written so that its gradient is elementwise work.

  nn.max_pool differentiates through select_and_scatter, which XLA runs as a slow scatter (on
  an H100 the SE-Inception's 3x3 pool gradient alone took 8% of MSConvLSTM-Att's train step).
  Non-overlapping windows (strides == window, dividing H and W) become a reshape + max, and
  stride-1 'SAME' windows of odd size separable maxima of shifted slices; any other form falls
  back to nn.max_pool. Same values; where several inputs tie for a maximum the gradient is
  shared among them instead of going to one (either is a valid subgradient).
  """
  strides = tuple(strides or window)
  b, h, w, c = x.shape
  (kh, kw), (sh, sw) = tuple(window), strides
  if (kh, kw) == (sh, sw) and padding == "VALID" and h % kh == 0 and w % kw == 0:
    return x.reshape(b, h // kh, kh, w // kw, kw, c).max(axis=(2, 4))
  if (sh, sw) == (1, 1) and padding == "SAME" and kh % 2 and kw % 2:
    for axis, k in ((1, kh), (2, kw)):
      pads = [(0, 0)] * 4
      pads[axis] = (k // 2, k // 2)
      padded = jnp.pad(x, pads, constant_values=-jnp.inf)
      n = x.shape[axis]
      shifted = [jax.lax.slice_in_dim(padded, i, i + n, axis=axis) for i in range(k)]
      x = functools.reduce(jnp.maximum, shifted)
    return x
  return nn.max_pool(x, tuple(window), strides=strides, padding=padding)


def pad_to_multiple(x: jax.Array, multiple: int) -> Tuple[jax.Array, Tuple[int, int]]:
  """Zero-pads H and W of (B,H,W,C) up to a multiple; returns the padded array and (H, W)."""
  h, w = x.shape[1:3]
  ph, pw = -h % multiple, -w % multiple
  if ph or pw:
    x = jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
  return x, (h, w)


def crop_to(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Undoes `pad_to_multiple`: the centred (H, W) window of (B,H',W',C)."""
  h, w = size
  top, left = (x.shape[1] - h) // 2, (x.shape[2] - w) // 2
  return x[:, top:top + h, left:left + w, :]


def resize_to(x: jax.Array, size: Sequence[int], method: str = "bilinear") -> jax.Array:
  """Resizes (B,H,W,C) spatially; a no-op when the size already matches."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  return jax.image.resize(x, (x.shape[0], *size, x.shape[3]), method=method).astype(x.dtype)


class UpsampleConv2x2(nn.Module):
  """Transposed convolution with a 2x2 kernel and stride 2: (B,H,W,C) -> (B,2H,2W,features).

  Output pixel (2h+i, 2w+j) is x[h, w] @ kernel[i, j] + bias: the windows do not overlap, so
  the whole layer is one (C, 4*features) matmul followed by depth-to-space, a plain GEMM for
  XLA instead of the input-dilated convolution `lax.conv_transpose` runs (slower on CPU,
  BENCHMARKS.md). The parameters are nn.ConvTranspose's, with the kernel flipped; the tests
  check the result against the transposed convolution.
  """
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    # nn.ConvTranspose's shape and initialiser; its kernel is this one flipped, kernel[::-1, ::-1].
    kernel = self.param("kernel", self.kernel_init, (2, 2, c, self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    y = jnp.dot(x.reshape(b * h * w, c), kernel.transpose(2, 0, 1, 3).reshape(c, -1))
    y = y.reshape(b, h, w, 2, 2, self.features).transpose(0, 1, 3, 2, 4, 5)
    y = y.reshape(b, 2 * h, 2 * w, self.features)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y
