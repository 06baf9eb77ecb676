"""FCN-8s (Long et al. 2015) on a VGG-16-style encoder trained from scratch, a paper baseline."""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from msatt_jax.models.common import ConvBN, crop_to, max_pool, pad_to_multiple, resize_to

Dtype = Any

# VGG-16: convolutions per block; each block ends with a 2x2 max-pool (pool1..pool5).
VGG16_BLOCKS = (2, 2, 3, 3, 3)
VGG16_WIDTHS = (64, 128, 256, 512, 512)


def bilinear_upsample_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """Kernel (k, k, C, C) of a transposed conv that upsamples each channel bilinearly.

  Long et al. initialise their learned 2x upsampling layers this way. Channel c maps only to c.
  """
  del key
  k, _, cin, cout = shape
  factor = (k + 1) // 2
  center = factor - 1 if k % 2 == 1 else factor - 0.5
  taps = 1 - np.abs(np.arange(k) - center) / factor
  kernel = np.zeros(shape, np.float32)
  kernel[:, :, np.arange(min(cin, cout)), np.arange(min(cin, cout))] = np.outer(taps, taps)[
      :, :, None]
  return jnp.asarray(kernel, dtype)


class FCN(nn.Module):
  """FCN-8s: VGG-16 encoder, convolutional fc6/fc7, scores fused from pool4 and pool3.

  Choices for training from scratch on 190x190 slices:
  - Every convolution of the encoder and fc6/fc7 is conv-BN-ReLU: the original starts from
    ImageNet VGG-16 weights, which cannot be had here, and BatchNorm makes the deep plain stack
    trainable from a random start. Dropout after fc6/fc7 is left out (BN regularises, and the
    model then needs no dropout RNG).
  - fc6 is a 3x3 convolution, not VGG's 7x7: at 190x190 input pool5 is only 6x6, where a 7x7
    kernel spends about half its taps on padding and holds 5.4x the parameters.
  - The two 2x fusions use learned 4x4 stride-2 transposed convolutions initialised to
    bilinear interpolation, and the final 8x upsampling is fixed bilinear, as in Long et al.;
    score_pool4 and score_pool3 start at zero, also as there.
  - Inputs are zero-padded to a multiple of 32 (five poolings) and the logits cropped back.
  Widths are VGG-16's scaled by base_width / 64; fc6/fc7 have fc_width channels.
  """
  num_classes: int
  base_width: int = 64
  fc_width: int = 1024
  dtype: Dtype = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x, size = pad_to_multiple(x.astype(self.dtype), 32)
    padded = x.shape[1:3]
    conv = functools.partial(ConvBN, dtype=self.dtype, axis_name=self.axis_name)
    pools = []
    for block, (n_convs, width) in enumerate(zip(VGG16_BLOCKS, VGG16_WIDTHS)):
      width = max(width * self.base_width // 64, 1)
      for i in range(n_convs):
        x = conv(width, (3, 3), name=f"conv{block + 1}_{i + 1}")(x, train)
      x = max_pool(x, (2, 2))
      pools.append(x)
    pool3, pool4 = pools[2], pools[3]
    x = conv(self.fc_width, (3, 3), name="fc6")(x, train)
    x = conv(self.fc_width, (1, 1), name="fc7")(x, train)

    score = functools.partial(nn.Conv, self.num_classes, (1, 1), dtype=self.dtype)
    up2 = functools.partial(nn.ConvTranspose, self.num_classes, (4, 4), strides=(2, 2),
                            padding="SAME", use_bias=False, dtype=self.dtype,
                            kernel_init=bilinear_upsample_init)
    x = up2(name="upscore2")(score(name="score_fr")(x))  # 1/32 -> 1/16
    x = x + score(kernel_init=nn.initializers.zeros, name="score_pool4")(pool4)
    x = up2(name="upscore_pool4")(x)  # 1/16 -> 1/8
    x = x + score(kernel_init=nn.initializers.zeros, name="score_pool3")(pool3)
    x = resize_to(x, padded, "bilinear")  # 1/8 -> 1, fixed
    return crop_to(x, size).astype(jnp.float32)
