"""Table I at test size: the four models at tiny widths, a few steps each, on 7 small synthetic
cases (tests/test_table1.py; about a minute of training in all).

  python -m msatt_jax.experiments.table1 --config=configs/table1_test.py --workdir=/tmp/table1
"""

from configs import brats18


def get_config(model: str = "msconvlstm_att"):
  config = brats18.get_config(model)
  d = config.data
  d.synthetic_cases = 7  # Split 3 / 1 / 3: three test cases to pair.
  d.num_validation_cases = 1
  d.num_test_cases = 3
  d.synthetic_shape = (48, 48, 24)
  d.slice_start = 8  # 8 slices of 32 x 32 per case.
  d.slice_stop = 15
  d.crop_size = 32
  m = config.model
  if m.name == "msconvlstm_att":
    m.lstm_features, m.inception_features, m.resnet_features, m.fused_features = 4, 8, 8, 8
    m.se_ratio = 4
  elif m.name == "fcn":
    m.base_width, m.fc_width = 4, 8
  else:
    m.base_width, m.depth = 4, 2
  config.loss = "dice_ce"
  config.batch_size = 8  # 3 steps per epoch.
  config.num_epochs = 2
  config.learning_rate = 3e-3
  config.eval_every_epochs = 1
  config.checkpoint_every_epochs = 1
  config.log_every_steps = 1
  return config
