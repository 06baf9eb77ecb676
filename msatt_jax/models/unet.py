"""U-Net (Ronneberger et al. 2015) with BatchNorm, the paper's first baseline."""

from typing import Any, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from msatt_jax.models.common import ConvBN, UpsampleConv2x2, crop_to, max_pool, pad_to_multiple

Dtype = Any


class DoubleConv(nn.Module):
  """Two 3x3 conv-BN-ReLU layers: one U-Net level."""
  features: int
  dtype: Dtype = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i in range(2):
      x = ConvBN(self.features, dtype=self.dtype, axis_name=self.axis_name,
                 name=f"conv{i}")(x, train)
    return x


class UNet(nn.Module):
  """U-Net: `depth` 2x2 max-poolings, two 3x3 conv-BN-ReLU per level, concatenated skips.

  Widths are base_width * 2**level for level 0..depth (bottleneck at level `depth`). Each
  decoder step upsamples with a 2x2 stride-2 transposed convolution to the skip's width,
  concatenates the skip and applies two 3x3 conv-BN-ReLU; a 1x1 conv gives the logits.
  Unlike the original (valid convolutions, output smaller than input) convolutions are 'SAME'
  and any H, W are zero-padded to a multiple of 2**depth, then the logits cropped back.

  Subclasses change the skips by overriding `gate_skip` (see AttentionUNet).
  """
  num_classes: int
  base_width: int = 32
  depth: int = 4
  dtype: Dtype = jnp.float32
  axis_name: Optional[str] = None

  def gate_skip(self, skip: jax.Array, gating: jax.Array, level: int, train: bool) -> jax.Array:
    """The skip at `level` given the coarser decoder features `gating`; identity in U-Net."""
    del gating, level, train
    return skip

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x, size = pad_to_multiple(x.astype(self.dtype), 2 ** self.depth)
    widths = [self.base_width * 2 ** level for level in range(self.depth + 1)]
    skips: List[jax.Array] = []
    for level in range(self.depth):
      x = DoubleConv(widths[level], self.dtype, self.axis_name, name=f"down{level}")(x, train)
      skips.append(x)
      x = max_pool(x, (2, 2))
    x = DoubleConv(widths[-1], self.dtype, self.axis_name, name="bottleneck")(x, train)
    for level in reversed(range(self.depth)):
      skip = self.gate_skip(skips[level], x, level, train)
      x = UpsampleConv2x2(widths[level], dtype=self.dtype, name=f"upconv{level}")(x)
      x = jnp.concatenate([skip, x], axis=-1)
      x = DoubleConv(widths[level], self.dtype, self.axis_name, name=f"up{level}")(x, train)
    x = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="head")(x)
    return crop_to(x, size).astype(jnp.float32)
