"""Table I on a CPU: the four models, one seed, on the embedded synthetic data (<= 30 minutes
on a 2-core CPU).

  python -m msatt_jax.experiments.table1 --config=configs/table1_demo.py --workdir=runs/table1_demo

Each model is configs/demo.py's (half the paper's widths, 96 x 96 crops, 3 epochs) on its 24
synthetic cases, split 15 / 3 / 6 so that the paired tests have 6 test cases (with 3, no
difference could reach p < 0.05). Add --ablations=no_convlstm,no_se,no_sam,no_fusion,deepest_only
for the ablation table (five more MSConvLSTM-Att trainings, about as long as the full model's
each), or --seeds=0,1,2 for the spread over seeds.
"""

from configs import demo


def get_config(model: str = "msconvlstm_att"):
  config = demo.get_config(model)
  config.data.num_validation_cases = 3
  config.data.num_test_cases = 6
  return config
