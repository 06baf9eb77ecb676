"""PyTorch/MONAI side of the benchmark (a worker process; see benchmarks/common.py).

The counterparts of the project's U-Net and Attention U-Net, trained the same way: forward, the
project's soft Dice loss (foreground classes, pooled over the batch), backward and Adam, on
the same batch and slice size, with as many threads as the JAX side and the same allocator
settings (the driver hands both workers one environment). Set up as for CPU training in
PyTorch: eager mode (nothing compiled), oneDNN convolutions in channels_last, fused Adam; the
driver's untimed warm-up steps take any first-call costs (Adam's state is made lazily).

- 'unet': MONAI BasicUNet with the U-Net's widths (w, 2w, 4w, 8w, 16w, w), BatchNorm and ReLU
  (as the project's U-Net; MONAI's defaults are InstanceNorm and LeakyReLU), 2x2 stride-2
  transposed-convolution upsampling.
- 'attunet': MONAI AttentionUnet with channels (w, ..., 16w) and four stride-2 levels; it is
  MONAI's own design (strided-conv downsampling, 3x3 stride-2 transposed convolutions), so its
  FLOPs differ from the project's Attention U-Net: compare FLOPs columns as well.
"""

import sys
import time
from typing import Any, Callable, Dict, Mapping

# Before torch and MONAI: `import monai` reaches torch.utils.tensorboard, which imports
# TensorFlow where it is installed. TensorFlow's libraries, loaded RTLD_GLOBAL, then stand in
# for the LLVM that Triton bundles, and creating Adam (which imports torch._dynamo, which
# imports Triton) crashes the worker. Without TensorFlow, tensorboard takes its own stub; the
# worker's memory is then PyTorch's alone.
sys.modules.setdefault("tensorflow", None)

import torch  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch.nn.functional as F  # pylint: disable=wrong-import-position

from benchmarks import common
from configs import brats18

MODELS = ("unet", "attunet")
MODES = ("inference", "train")
_EPS = 1e-5  # msatt_jax.losses' smoothing term.


def build_model(name: str, base_width: int, depth: int, in_channels: int,
                num_classes: int) -> torch.nn.Module:
  from monai.networks import nets  # pylint: disable=g-import-not-at-top
  widths = [base_width * 2**level for level in range(depth + 1)]
  if name == "unet":
    if depth != 4:
      raise ValueError("MONAI BasicUNet has 4 poolings; the U-Net's depth must be 4.")
    return nets.BasicUNet(spatial_dims=2, in_channels=in_channels, out_channels=num_classes,
                          features=(*widths, base_width), norm=("batch", {}),
                          act=("relu", {"inplace": True}), upsample="deconv")
  if name == "attunet":
    return nets.AttentionUnet(spatial_dims=2, in_channels=in_channels, out_channels=num_classes,
                              channels=widths, strides=(2,) * depth)
  raise ValueError(f"No PyTorch counterpart of {name!r}; choose one of {MODELS}.")


def dice_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
  """msatt_jax.losses.segmentation_loss(..., 'dice') for (B,K,H,W) logits and (B,H,W) labels."""
  probs = torch.softmax(logits.float(), dim=1)[:, 1:]
  one_hot = F.one_hot(labels.long(), logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
  axes = (0, 2, 3)
  intersection = (probs * one_hot).sum(axes)
  total = probs.sum(axes) + one_hot.sum(axes)
  return (1.0 - (2.0 * intersection + _EPS) / (total + _EPS)).mean()


class TorchBench:
  """One model at one batch size: setup(mode) counts FLOPs, run(mode, n) times n steps."""

  def __init__(self, spec: Mapping[str, Any]):
    self.spec = dict(spec)
    # As for CPU training in PyTorch: one thread per core the JAX side uses (XLA's pool sizes
    # itself the same way), and oneDNN's convolutions (the default; set so that it is stated).
    torch.set_num_threads(common.cpu_threads())
    torch.backends.mkldnn.enabled = True
    torch.manual_seed(0)
    config = brats18.get_config(spec["model"])
    overrides = spec.get("overrides", {})
    base_width = int(overrides.get("base_width", config.model.base_width))
    depth = int(overrides.get("depth", config.model.depth))
    in_channels = len(config.data.modalities)
    self.num_classes = 4  # The project's 'dice' loss: 4 canonical classes.
    self.model = build_model(spec["model"], base_width, depth, in_channels, self.num_classes)
    # channels_last runs oneDNN's convolutions without layout reorders on CPU.
    self.memory_format = (torch.channels_last if spec.get("channels_last", True)
                          else torch.contiguous_format)
    self.model = self.model.to(memory_format=self.memory_format)
    b, s = spec["batch_size"], spec["size"]
    self.image = torch.randn(b, in_channels, s, s).to(memory_format=self.memory_format)
    self.label = torch.randint(0, self.num_classes, (b, s, s), dtype=torch.uint8)
    self.optimizer = self._adam()
    self.autocast = spec["dtype"] == "bfloat16"
    self._steps: Dict[str, Callable[[], Any]] = {}
    self._rss = {mode: common.PeakRSS() for mode in MODES}

  def _adam(self) -> torch.optim.Optimizer:
    # fused: one kernel over all parameters, as XLA fuses optax's Adam. CPU's default is a
    # loop of about ten small operations per parameter tensor (82 in the U-Net).
    return torch.optim.Adam(self.model.parameters(), lr=1e-3, fused=True)

  def describe(self) -> Dict[str, Any]:
    params = sum(p.numel() for p in self.model.parameters())
    settings = {"mkldnn": torch.backends.mkldnn.enabled,
                "memory_format": str(self.memory_format).removeprefix("torch."),
                "adam": "fused" if self.optimizer.defaults["fused"] else "default"}
    return {"framework": "pytorch", "version": torch.__version__, "device": "cpu",
            "platform": "cpu", "params": int(params), "threads": torch.get_num_threads(),
            "settings": settings}

  def _train_step(self) -> torch.Tensor:
    self.model.train()
    self.optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=self.autocast):
      logits = self.model(self.image)
    loss = dice_loss(logits, self.label)
    loss.backward()
    self.optimizer.step()
    return loss

  def _inference_step(self) -> torch.Tensor:
    self.model.eval()
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=self.autocast):
      return self.model(self.image)

  def setup(self, mode: str) -> Dict[str, Any]:
    """FLOPs of one step as PyTorch counts them (convolutions and matmuls; Adam not counted)."""
    from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
    step = {"train": self._train_step, "inference": self._inference_step}[mode]
    state = {k: v.clone() for k, v in self.model.state_dict().items()}
    t0 = time.perf_counter()
    with FlopCounterMode(display=False) as counter:
      step()
    first_s = time.perf_counter() - t0
    # Undo the counted step (BatchNorm statistics, Adam moments) so every side starts alike.
    self.model.load_state_dict(state)
    self.optimizer = self._adam()
    self._steps[mode] = step
    return {"compile_s": None, "first_step_s": first_s,
            "flops_per_step": float(counter.get_total_flops()), "flops_source": "torch"}

  def run(self, mode: str, steps: int, window: int = 1) -> list:
    with self._rss[mode]:
      return common.time_steps(self._steps[mode], lambda out: out, steps, window)

  def memory(self, mode: str) -> Dict[str, Any]:
    return {"peak_mem_mb": self._rss[mode].peak_bytes / 2**20, "mem_kind": "RSS"}


if __name__ == "__main__":
  common.serve(TorchBench)
