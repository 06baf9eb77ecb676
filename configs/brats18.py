"""The paper's setup: MSConvLSTM-Att on BraTS'18 (MSD Task01_BrainTumour or the challenge folder).

Usage:
  python -m msatt_jax.train --config=configs/brats18.py --workdir=runs/msconvlstm_att \
      --config.data.source_dir=/path/to/Task01_BrainTumour
  python -m msatt_jax.train --config=configs/brats18.py:unet ...   # also :attunet, :fcn

Every key below, and every key of config.data (data_pipelines/config.py), may be overridden on
the command line as --config.<key>=<value>.
"""

import ml_collections
from ml_collections import config_dict

# The data keys and their defaults belong to the data layer (each commented there).
from data_pipelines.config import get_data_config

MODEL_NAMES = ("msconvlstm_att", "unet", "attunet", "fcn")


def get_model_config(name: str) -> ml_collections.ConfigDict:
  """Constructor fields of each model (num_classes, dtype and axis_name are set by the trainer)."""
  m = ml_collections.ConfigDict()
  m.name = name
  if name == "msconvlstm_att":
    m.lstm_features = 32  # Scale 1: ConvLSTM hidden width over the four quadrant patches.
    m.inception_features = 64  # Scale 2: SE-Inception output width.
    m.resnet_features = 128  # Scale 3: SE-ResNet block output width (stride 2).
    m.fused_features = 64  # C: width of single-scale, multi-scale and refined features.
    m.attention_stride = 4  # SAM runs at H/stride x W/stride (full size needs N^2 = 36,100^2).
    m.se_ratio = 16  # Squeeze-and-Excitation reduction ratio r.
    # SAM: 'auto' = 'cudnn' (jax.nn.dot_product_attention's fused kernel) on a recent NVIDIA
    # GPU in 16-bit compute, else 'einsum'.
    m.attention_implementation = "auto"
    # ConvLSTM gates: 'separate' input and hidden convolutions, or one 'stacked' convolution of
    # both (same params; slower on CPU, to be measured on GPUs).
    m.convlstm_gate_convs = "separate"
    # 'none' (the full model), or remove one block: 'no_convlstm', 'no_se', 'no_sam',
    # 'no_fusion', 'deepest_only' (docs/architecture.md, "Ablations").
    m.ablation = "none"
    # What the backward pass keeps of the modality encoders: 'none' (every intermediate),
    # 'convs' (convolution outputs) or 'nothing' (recomputed): memory against time.
    m.encoder_remat = "none"
  elif name in ("unet", "attunet"):
    m.base_width = 32  # Width of the first level; doubles at each of the 4 poolings.
    m.depth = 4  # Number of poolings.
  elif name == "fcn":
    m.base_width = 64  # VGG16 widths (64, 128, 256, 512, 512) scaled by base_width / 64.
    m.fc_width = 1024  # Width of the convolutional fc6/fc7 layers (4096 in VGG16).
  else:
    raise ValueError(f"Unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}.")
  return m


def get_distributed_config() -> ml_collections.ConfigDict:
  """Several processes (hosts) through jax.distributed; unset fields come from the cluster."""
  d = ml_collections.ConfigDict()
  d.enabled = False  # True: call jax.distributed.initialize before anything else.
  d.coordinator_address = config_dict.placeholder(str)  # 'host:port' of process 0; or SLURM's.
  d.num_processes = config_dict.placeholder(int)  # Processes in the run; or from the cluster.
  d.process_id = config_dict.placeholder(int)  # This process, 0..num_processes-1; or the cluster's.
  d.initialization_timeout = 300  # Seconds to wait for every process to join, then an error.
  return d


def get_config(model: str = "msconvlstm_att") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameters, data order and augmentation.

  config.data = get_data_config()
  config.model = get_model_config(model or "msconvlstm_att")
  config.dtype = "float32"  # Compute dtype: 'float32', or 'bfloat16' on GPU (params stay float32).

  # Loss: 'dice' (the paper's soft multi-class Dice), 'dice_ce' (+ cross-entropy), or
  # 'region_dice' (sigmoid outputs for the overlapping ET/TC/WT regions).
  config.loss = "dice"
  config.ce_weight = 1.0  # Weight of the cross-entropy term of 'dice_ce'.
  config.deep_supervision_weight = 0.0  # Per-scale losses' weight; > 0 only for MSConvLSTM-Att.

  # 16 slices of 190x190x4: about 4 GB of activations for MSConvLSTM-Att in float32, which fits
  # the paper's 12 GB K80 with room for the optimizer (the paper does not state its batch size).
  config.batch_size = 16  # Global batch, split over devices.
  config.num_epochs = 500  # The paper's schedule.
  config.num_train_steps = -1  # -1: num_epochs * steps_per_epoch.
  config.learning_rate = 1e-3  # Adam's initial learning rate (the paper).
  config.lr_decay_factor = 0.5  # Multiplied into the learning rate ...
  config.lr_decay_epochs = 30  # ... every this many epochs (the paper).

  # Every interval is a positive whole number; each also fires at the last step.
  config.eval_every_epochs = 10  # Validation Dice (ET/TC/WT); a new best is saved as 'best'.
  config.eval_every_steps = 0  # > 0: validate every this many steps instead of by epochs.
  config.checkpoint_every_epochs = 50  # Periodic save, independent of validation (the paper's).
  config.max_checkpoints_to_keep = 3  # Newest periodic checkpoints kept besides the best one.
  config.log_every_steps = 50  # Console, TensorBoard and metrics.jsonl.
  config.nan_policy = "stop"  # 'stop': halt on a NaN/Inf loss; 'skip': drop that update.
  # True: refuse a run whose working-set estimate (logged at the start) exceeds the memory the
  # machine has free; False: warn and go ahead.
  config.memory_check = True

  config.parallel = "auto"  # 'auto' | 'single' | 'pmap' | 'sharding'.
  config.num_devices = -1  # -1: all local devices.
  config.distributed = get_distributed_config()
  return config
