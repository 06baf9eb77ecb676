"""A CPU-test-sized run: small models on tiny synthetic volumes (tests, quick checks).

  python -m msatt_jax.train --config=configs/tiny.py --workdir=/tmp/tiny   # about a minute
  python -m msatt_jax.train --config=configs/tiny.py:msconvlstm_att ...

Held-out WT Dice reaches about 0.9 in the default 8 epochs with the U-Net.
"""

from configs import brats18


def get_config(model: str = "unet"):
  config = brats18.get_config(model or "unet")
  d = config.data
  d.synthetic_cases = 8  # Split 6/1/1.
  d.synthetic_shape = (64, 64, 40)
  d.slice_start = 8  # The paper's 30..120 of 155 scaled to 40 slices.
  d.slice_stop = 31
  d.crop_size = 48  # The paper's 190/240 crop scaled to 64.
  m = config.model
  if m.name == "msconvlstm_att":
    m.lstm_features, m.inception_features, m.resnet_features, m.fused_features = 8, 16, 16, 16
    m.attention_stride = 4
  elif m.name == "fcn":
    m.base_width, m.fc_width = 8, 32
  else:
    m.base_width, m.depth = 8, 3
  config.loss = "dice_ce"
  config.batch_size = 8
  config.num_epochs = 8
  config.learning_rate = 3e-3
  config.lr_decay_epochs = 100
  config.eval_every_epochs = 2
  config.checkpoint_every_epochs = 4
  config.log_every_steps = 10
  return config
