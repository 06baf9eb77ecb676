"""BraTS data: NIfTI readers, preprocessing, the TFDS builder, the tf.data input pipeline."""

import os

# TensorFlow runs only the input pipeline here. Its start-up lines (oneDNN custom operations,
# CPU features, and on CPUs without AVX-512 "oneDNN supports DT_HALF only ...") are not the
# project's to show. Without oneDNN the augmented pipeline spends 1.8 instead of 1.2 CPU ms per
# slice, under 1% of what a train step spends per slice on a CPU (BENCHMARKS.md, "Memory").
# TensorFlow reads both variables once, when it loads, so they are set on the way
# into any module of the project (msatt_jax imports this package first); values the user set
# are kept.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
