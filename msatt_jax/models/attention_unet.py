"""Attention U-Net (Oktay et al. 2018): the U-Net with additive attention gates on its skips."""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from msatt_jax.models.common import resize_to
from msatt_jax.models.unet import UNet

Dtype = Any


class AttentionGate(nn.Module):
  """Additive attention gate: skip * sigmoid(psi(relu(theta(skip) + phi(gating)))).

  theta: 2x2 stride-2 conv (no bias) taking the skip to the gating signal's resolution;
  phi: 1x1 conv on the gating signal; psi: 1x1 conv to one channel. The coefficients alpha
  are resampled bilinearly to the skip's size and sown as intermediates['alpha'].
  """
  inter_features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, skip: jax.Array, gating: jax.Array) -> jax.Array:
    theta = nn.Conv(self.inter_features, (2, 2), strides=(2, 2), padding="VALID",
                    use_bias=False, dtype=self.dtype, name="theta")(skip)
    phi = nn.Conv(self.inter_features, (1, 1), dtype=self.dtype, name="phi")(gating)
    phi = resize_to(phi, theta.shape[1:3])  # A no-op when the skip is exactly twice the size.
    f = nn.relu(theta + phi)
    alpha = nn.sigmoid(nn.Conv(1, (1, 1), dtype=self.dtype, name="psi")(f))
    alpha = resize_to(alpha, skip.shape[1:3])
    self.sow("intermediates", "alpha", alpha)
    return skip * alpha


class AttentionUNet(UNet):
  """UNet whose every skip passes through an AttentionGate driven by the coarser decoder state.

  The gating signal at level l is the decoder's features at level l+1 (the bottleneck for the
  deepest skip), before upsampling; the gate's intermediate width is half the skip's width, as
  in Oktay et al. Unlike their reference code, the gated skip is not followed by an extra
  1x1 conv-BN: the gate only rescales the skip, as the paper's equations describe.
  Fields are UNet's.
  """

  def gate_skip(self, skip: jax.Array, gating: jax.Array, level: int, train: bool) -> jax.Array:
    del train
    return AttentionGate(max(skip.shape[-1] // 2, 1), dtype=self.dtype,
                         name=f"gate{level}")(skip, gating)
