"""msatt-jax: Multi-Scale ConvLSTM Attention brain-tumour segmentation in JAX/Flax."""

import data_pipelines  # noqa: F401  First: it quiets TensorFlow's start-up lines before any import.

__version__ = "0.1.0"
