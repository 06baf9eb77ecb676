"""BraTS data: NIfTI readers, preprocessing, the TFDS builder, the tf.data input pipeline."""
