"""Models: MSConvLSTM-Att and the paper's baselines, built by name from the config."""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from msatt_jax.models.attention_unet import AttentionUNet
from msatt_jax.models.blocks import (ConvLSTM, SEInception, SEResNetBlock, SpatialAttention,
                                     SqueezeExcitation)
from msatt_jax.models.fcn import FCN
from msatt_jax.models.msconvlstm_att import MSConvLSTMAtt
from msatt_jax.models.unet import UNet

MODELS = {
    "msconvlstm_att": MSConvLSTMAtt,
    "unet": UNet,
    "attunet": AttentionUNet,
    "fcn": FCN,
}
# Models that sow per-scale logits ('intermediates'/'scale_logits'), the deep-supervision targets.
DEEP_SUPERVISION_MODELS = ("msconvlstm_att",)


# Keys of forms that were measured and removed (MSConvLSTMAtt's 'scan' | 'vmap', UNet's
# 'matmul' | 'conv_transpose'): each form computed the kept one's function on the same
# parameters, so a run whose saved config still names one restores as the kept form.
RETIRED_KEYS = ("modality_map", "upsample")


def create_model(model_config: ml_collections.ConfigDict, *, num_classes: int,
                 dtype: Any = jnp.float32, axis_name: Optional[str] = None) -> nn.Module:
  """Builds the model named by `model_config.name` with the config's other keys as fields."""
  kwargs = {key: value for key, value in dict(model_config).items() if key not in RETIRED_KEYS}
  name = kwargs.pop("name")
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; choose one of {', '.join(MODELS)}.")
  cls = MODELS[name]
  fields = set(cls.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"config.model has keys that {cls.__name__} does not take: {unknown}; "
                     f"it takes {sorted(fields)}.")
  if isinstance(dtype, str):
    dtype = jnp.dtype(dtype)
  return cls(num_classes=num_classes, dtype=dtype, axis_name=axis_name, **kwargs)


__all__ = ["ConvLSTM", "SqueezeExcitation", "SEInception", "SEResNetBlock", "SpatialAttention",
           "MSConvLSTMAtt", "UNet", "AttentionUNet", "FCN", "MODELS",
           "DEEP_SUPERVISION_MODELS", "create_model"]
