"""The embedded demo: MSConvLSTM-Att on a small synthetic BraTS-like set, a few minutes on a CPU.

  python -m msatt_jax.train --config=configs/demo.py --workdir=runs/demo

Without --config.data.source_dir it generates the synthetic cases (real NIfTI files in the MSD
layout) into <workdir>/synthetic, prepares them through the same TFDS builder real data takes,
trains, validates and writes checkpoints, TensorBoard summaries and metrics.jsonl. Then:

  python -m msatt_jax.evaluate --workdir=runs/demo
"""

from configs import brats18


def get_config(model: str = "msconvlstm_att"):
  config = brats18.get_config(model)
  d = config.data
  d.synthetic_cases = 24  # Split 18/3/3 by the paper's proportions.
  d.synthetic_shape = (120, 120, 78)  # Half the BraTS size in each axis.
  d.slice_start = 15  # The paper's 30..120 range scaled to 78 slices.
  d.slice_stop = 60
  d.crop_size = 96  # The paper's 190/240 crop scaled to 120.
  if model in (None, "msconvlstm_att"):
    config.model.lstm_features = 16  # Half the paper's widths: a CPU-sized demo.
    config.model.inception_features = 32
    config.model.resnet_features = 64
    config.model.fused_features = 32
  else:
    config.model.base_width = config.model.base_width // 2
  config.loss = "dice_ce"  # Converges faster than plain Dice in a short run.
  config.batch_size = 8
  config.num_epochs = 3  # Validation mean Dice is about 0.9 after two.
  config.lr_decay_epochs = 2
  config.eval_every_epochs = 1
  config.checkpoint_every_epochs = 1
  config.log_every_steps = 20
  return config
