"""MSConvLSTM-Att: the paper's multi-scale ConvLSTM attention network (Section III).

The reading of the paper (its figures are missing) and the words it rests on: docs/architecture.md.
Its "Ablations" section describes the `ablation` switch, which removes one block at a time.
"""

import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from msatt_jax.models.blocks import ConvLSTM, SEInception, SEResNetBlock, SpatialAttention
from msatt_jax.models.common import ConvBN, crop_to, max_pool, pad_to_multiple, resize_to

Dtype = Any

# The ablations of the paper's claim that the combination of its blocks helps: each removes one
# block (docs/architecture.md, "Ablations"); 'none' is the full model.
ABLATIONS = ("none", "no_convlstm", "no_se", "no_sam", "no_fusion", "deepest_only")

# What the backward pass keeps of each modality encoder's forward pass (jax.checkpoint): 'none'
# keeps every intermediate; 'convs' keeps the convolutions' outputs and recomputes the
# element-wise work after them (BatchNorm, activations, gates); 'nothing' recomputes the encoder.
ENCODER_REMAT = {"none": None, "convs": jax.checkpoint_policies.dots_saveable,
                 "nothing": jax.checkpoint_policies.nothing_saveable}


def check_ablation(ablation: str) -> None:
  """A ValueError naming the choices, for any value of config.model.ablation not in ABLATIONS."""
  if ablation not in ABLATIONS:
    raise ValueError(f"Unknown ablation {ablation!r} (config.model.ablation); choose one of "
                     f"{', '.join(ABLATIONS)}.")


class ModalityEncoder(nn.Module):
  """One modality's three scales on a (B, H, W, 1) image with H and W multiples of 4.

  Scale 1: the four quadrant patches (raster order) as a sequence through a scanned ConvLSTM, the
  hidden states stitched back into (B, H, W, lstm_features). Scale 2: 2x2 max-pool then
  SE-Inception, (B, H/2, W/2, inception_features). Scale 3: a stride-2 SE-ResNet block,
  (B, H/4, W/4, resnet_features).

  Ablation switches: `use_convlstm=False` computes scale 1 with one 3x3 conv-BN-ReLU of the same
  width on the whole image instead; `use_se=False` drops the SE of both blocks (Inception and
  ResNet).
  """
  lstm_features: int = 32
  inception_features: int = 64
  resnet_features: int = 128
  se_ratio: int = 16
  convlstm_gate_convs: str = "separate"  # ConvLSTM.gate_convs: 'separate' | 'stacked'.
  dtype: Dtype = jnp.float32
  axis_name: Optional[str] = None
  use_convlstm: bool = True
  use_se: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> Tuple[jax.Array, jax.Array, jax.Array]:
    b, h, w, c = x.shape
    f = self.lstm_features
    if self.use_convlstm:
      # (B, H, W, C) -> (B, 4, H/2, W/2, C): quadrants top-left, top-right, bottom-left,
      # bottom-right.
      patches = x.reshape(b, 2, h // 2, 2, w // 2, c).transpose(0, 1, 3, 2, 4, 5)
      patches = patches.reshape(b, 4, h // 2, w // 2, c)
      # Fully unrolled: XLA:CPU differentiates convolutions in a rolled loop ~20x slower.
      hidden = ConvLSTM(f, (3, 3), unroll=4, gate_convs=self.convlstm_gate_convs,
                        dtype=self.dtype, name="convlstm")(patches)
      s1 = hidden.reshape(b, 2, 2, h // 2, w // 2, f).transpose(0, 1, 3, 2, 4, 5)
      s1 = s1.reshape(b, h, w, f).astype(self.dtype)
    else:
      s1 = ConvBN(f, (3, 3), dtype=self.dtype, axis_name=self.axis_name, name="scale1_conv")(
          x, train)
    s2 = max_pool(s1, (2, 2))
    s2 = SEInception(self.inception_features, self.se_ratio, dtype=self.dtype,
                     axis_name=self.axis_name, use_se=self.use_se, name="se_inception")(s2, train)
    s3 = SEResNetBlock(self.resnet_features, (2, 2), self.se_ratio, dtype=self.dtype,
                       axis_name=self.axis_name, use_se=self.use_se, name="se_resnet")(s2, train)
    return s1, s2, s3


class _ModalityStep(ModalityEncoder):
  """`ModalityEncoder` in nn.scan's (carry, x) -> (carry, y) form; the carry is unused."""

  def __call__(self, carry: None, x: jax.Array,
               train: bool) -> Tuple[None, Tuple[jax.Array, ...]]:
    return carry, super().__call__(x, train)


class ModalityEncoders(nn.Module):
  """M `ModalityEncoder`s with one structure and separate weights, over axis 3 of (B, H, W, M, 1).

  Returns the three scales as (B, H, W, M, lstm), (B, H/2, W/2, M, inception) and
  (B, H/4, W/4, M, resnet). Parameters and BatchNorm statistics carry a leading axis of size M.
  An nn.scan over the M modalities, fully unrolled: each modality's convolutions are plain ones
  on its (B, H, W, 1) image, from one traced body and no Python loop. (nn.vmap would batch the
  per-modality kernels into grouped convolutions, which XLA runs slower; the tests check this
  form against that one on the same parameters.)
  """
  lstm_features: int = 32
  inception_features: int = 64
  resnet_features: int = 128
  se_ratio: int = 16
  convlstm_gate_convs: str = "separate"
  dtype: Dtype = jnp.float32
  axis_name: Optional[str] = None
  use_convlstm: bool = True
  use_se: bool = True
  remat: str = "none"  # One of ENCODER_REMAT.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> Tuple[jax.Array, jax.Array, jax.Array]:
    step = _ModalityStep
    if ENCODER_REMAT[self.remat] is not None:
      # Arguments (self, carry, x, train): `train` is a Python bool.
      step = nn.remat(step, policy=ENCODER_REMAT[self.remat], static_argnums=(3,))
    # A rolled loop would slow the gradient of XLA:CPU convolutions inside it ~20x; M is small.
    scan = nn.scan(step, variable_axes={"params": 0, "batch_stats": 0},
                   split_rngs={"params": True}, in_axes=(3, nn.broadcast), out_axes=3,
                   unroll=x.shape[3])
    encoder = scan(lstm_features=self.lstm_features, inception_features=self.inception_features,
                   resnet_features=self.resnet_features, se_ratio=self.se_ratio,
                   convlstm_gate_convs=self.convlstm_gate_convs, dtype=self.dtype,
                   axis_name=self.axis_name, use_convlstm=self.use_convlstm,
                   use_se=self.use_se, name="encoder")
    return encoder(None, x, train)[1]


def _resample(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Area (average-pool) downsampling by an integer factor, bilinear otherwise."""
  b, h, w, c = x.shape
  if h % size[0] == 0 and w % size[1] == 0:
    fh, fw = h // size[0], w // size[1]
    if (fh, fw) == (1, 1):
      return x
    # The mean of non-overlapping windows as a reshape: its gradient is a broadcast, where
    # nn.avg_pool's is a dilated reduce-window that XLA:CPU runs ~10x slower.
    return x.reshape(b, size[0], fh, size[1], fw, c).mean(axis=(2, 4)).astype(x.dtype)
  return resize_to(x, size, "bilinear")


class MSConvLSTMAtt(nn.Module):
  """Multi-Scale ConvLSTM Attention network: (B, H, W, M) images -> (B, H, W, num_classes) logits.

  Per-modality encoders (ConvLSTM / SE-Inception / SE-ResNet scales) -> single-scale features ->
  multi-scale features -> per scale: refine conv, Spatial Attention Module, 1x1 classifier ->
  the mean of the three per-scale logits. Each per-scale logit map (float32, input size) is also
  sown to 'intermediates'/'scale_logits' for deep supervision.

  Any H, W >= 16: the input is zero-padded to a multiple of lcm(4, attention_stride) and the
  logits cropped back, so for 190 x 190 the encoders see 192 x 192 and the attention 48 x 48.

  `ablation` (one of ABLATIONS) removes one block: 'no_convlstm' (scale 1 is a 3x3 conv-BN-ReLU),
  'no_se' (Inception and ResNet without SE), 'no_sam' (no attention), 'no_fusion' (no
  multi-scale features: each head refines its single-scale features alone), 'deepest_only'
  (only the scale-3 head). 'none' builds exactly the full model's parameters.
  """
  num_classes: int
  dtype: Dtype = jnp.float32
  axis_name: Optional[str] = None
  lstm_features: int = 32
  inception_features: int = 64
  resnet_features: int = 128
  fused_features: int = 64
  attention_stride: int = 4
  se_ratio: int = 16
  attention_implementation: str = "auto"  # SpatialAttention's: 'auto', 'einsum', 'cudnn'.
  convlstm_gate_convs: str = "separate"  # ConvLSTM's: 'separate' or 'stacked' (same parameters).
  ablation: str = "none"  # One of ABLATIONS.
  encoder_remat: str = "none"  # One of ENCODER_REMAT: memory against recomputation.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_ablation(self.ablation)
    c = self.fused_features
    conv_bn = lambda f, k, name: ConvBN(f, k, dtype=self.dtype, axis_name=self.axis_name, name=name)
    x, size = pad_to_multiple(x.astype(self.dtype), math.lcm(4, self.attention_stride))
    hp, wp = x.shape[1:3]
    att_size = (hp // self.attention_stride, wp // self.attention_stride)

    scales = ModalityEncoders(
        lstm_features=self.lstm_features, inception_features=self.inception_features,
        resnet_features=self.resnet_features, se_ratio=self.se_ratio,
        convlstm_gate_convs=self.convlstm_gate_convs, dtype=self.dtype, axis_name=self.axis_name,
        use_convlstm=self.ablation != "no_convlstm", use_se=self.ablation != "no_se",
        remat=self.encoder_remat, name="encoders")(x[..., None], train)

    singles = []
    for s, feats in enumerate(scales, start=1):
      feats = feats.reshape(*feats.shape[:3], -1)  # Concatenate the M modalities' channels.
      single = conv_bn(c, (1, 1), f"single{s}")(feats, train)
      singles.append(_resample(single, att_size))

    # Each head's features: (single_s, multi), or single_s alone without fusion.
    if self.ablation == "no_fusion":
      fused = [[single] for single in singles]
    else:
      multi = jnp.concatenate(singles, axis=-1)
      multi = conv_bn(c, (3, 3), "multi_conv1")(multi, train)
      multi = conv_bn(c, (3, 3), "multi_conv2")(multi, train)
      multi = nn.Conv(c, (1, 1), dtype=self.dtype, name="multi_conv3")(multi)
      fused = [[single, multi] for single in singles]

    scale_logits = []
    heads = (3,) if self.ablation == "deepest_only" else (1, 2, 3)
    for s in heads:
      refined = conv_bn(c, (3, 3), f"refine{s}")(jnp.concatenate(fused[s - 1], -1), train)
      attended = refined
      if self.ablation != "no_sam":
        attended = SpatialAttention(implementation=self.attention_implementation,
                                    dtype=self.dtype, name=f"sam{s}")(refined)
      logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name=f"classifier{s}")(attended)
      logits = crop_to(resize_to(logits.astype(jnp.float32), (hp, wp), "bilinear"), size)
      self.sow("intermediates", "scale_logits", logits)
      scale_logits.append(logits)
    return sum(scale_logits) / len(scale_logits)
