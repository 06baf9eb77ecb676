"""BraTS data: NIfTI readers, preprocessing, the TFDS builder, the tf.data input pipeline."""

import os

# TensorFlow runs only the input pipeline here. Its start-up lines (oneDNN custom operations,
# CPU features, and on CPUs without AVX-512 "oneDNN supports DT_HALF only ...") are not the
# project's to show, and its oneDNN kernels do not speed the pipeline's ops (BENCHMARKS.md,
# "Memory"). TensorFlow reads both variables once, when it loads, so they are set on the way
# into any module of the project (msatt_jax imports this package first); values the user set
# are kept.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
