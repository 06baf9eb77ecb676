"""XLA:CPU's 3x3 convolution kernels beside PyTorch's (oneDNN), one layer at a time.

  python -m benchmarks.experiments.conv_kernels [--batch 8] [--steps 7]

For each U-Net level shape (conv_forms.py's SHAPES, plus the first decoder conv that reads
skip and upsampled maps together) it times the three convolutions of a train step: the
forward pass, the input gradient and the weight gradient, in JAX (each jitted with every array
an argument, so nothing is folded at compile time) and in PyTorch (channels_last, the oneDNN path
its CPU build takes, with as many threads). Each framework's calls run as a block: alternating
single calls of the two in one process slows the JAX side (the two thread pools share the
cores; the main benchmark keeps the frameworks in separate processes). It prints GFLOP/s and
the JAX / PyTorch speed ratio of each: where the U-Net's gap to MONAI comes from, layer by
layer. Needs the `bench` extra (torch).
"""

import argparse
from typing import Callable, Dict, List, Tuple

import numpy as np

from benchmarks import common
from benchmarks.experiments.conv_forms import SHAPES
from msatt_jax import runtime

PARTS = ("forward", "input grad", "weight grad")
# The U-Net's up0/conv0: 64 channels (skip + upsampled) in, 32 out, at full resolution.
DECODER_SHAPE = (192, 64, 32)


def layer_arrays(batch: int, size: int, c_in: int, c_out: int) -> Tuple[np.ndarray, ...]:
  """Input (B,H,W,Cin), kernel (3,3,Cin,Cout) and output gradient (B,H,W,Cout), float32."""
  rng = np.random.default_rng(0)
  return (rng.standard_normal((batch, size, size, c_in), np.float32),
          0.01 * rng.standard_normal((3, 3, c_in, c_out), np.float32),
          rng.standard_normal((batch, size, size, c_out), np.float32))


def jax_convolutions(x: np.ndarray, w: np.ndarray, dy: np.ndarray) -> Dict[str, Callable]:
  """The three convolutions of one layer's train step, each a jitted call on the arrays."""
  import jax  # pylint: disable=g-import-not-at-top

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  x, w, dy = (jax.device_put(a) for a in (x, w, dy))
  forward = jax.jit(conv)
  input_grad = jax.jit(lambda w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0])
  weight_grad = jax.jit(lambda x, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
  return {"forward": lambda: forward(x, w).block_until_ready(),
          "input grad": lambda: input_grad(w, dy).block_until_ready(),
          "weight grad": lambda: weight_grad(x, dy).block_until_ready()}


def torch_convolutions(x: np.ndarray, w: np.ndarray, dy: np.ndarray) -> Dict[str, Callable]:
  """The same three convolutions in PyTorch, channels_last (its fast CPU layout)."""
  import torch  # pylint: disable=g-import-not-at-top
  last = torch.channels_last
  # NHWC memory viewed as NCHW is exactly PyTorch's channels_last layout.
  x, dy = (torch.from_numpy(a).permute(0, 3, 1, 2) for a in (x, dy))
  w = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous(memory_format=last)

  def backward(mask: List[bool], index: int):
    return lambda: torch.ops.aten.convolution_backward(
        dy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)[index]

  def forward():
    with torch.no_grad():
      return torch.nn.functional.conv2d(x, w, padding=1)

  return {"forward": forward, "input grad": backward([True, False, False], 0),
          "weight grad": backward([False, True, False], 1)}


def median_seconds(fn: Callable, steps: int, warmup: int = 5) -> float:
  """Median seconds of `steps` calls of `fn` after `warmup` calls (the process's first calls
  also fault its fresh heap in)."""
  times = common.time_steps(fn, lambda _: None, warmup + steps)[warmup:]
  return common.step_stats(times)["step_s_median"]


def main() -> None:
  p = argparse.ArgumentParser(prog="python -m benchmarks.experiments.conv_kernels",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=7)
  p.add_argument("--sizes", default=None,
                 help="comma list of level sizes to keep (default: all), e.g. 192,96")
  args = p.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(common.cpu_threads())

  shapes = [*SHAPES, DECODER_SHAPE]
  if args.sizes:
    keep = {int(s) for s in args.sizes.split(",")}
    shapes = [s for s in shapes if s[0] in keep]
  print(f"# batch {args.batch}, median of {args.steps} calls, "
        f"{torch.get_num_threads()} threads; runtime settings: {runtime.describe() or 'none'}")
  print(f"{'layer':>18}  {'part':>11}  {'JAX ms':>7}  {'GFLOP/s':>7}  {'PyTorch ms':>10}  "
        f"{'GFLOP/s':>7}  {'JAX/PyTorch':>11}")
  for size, c_in, c_out in shapes:
    gflop = 2 * args.batch * size * size * 9 * c_in * c_out / 1e9
    arrays = layer_arrays(args.batch, size, c_in, c_out)
    ours, theirs = jax_convolutions(*arrays), torch_convolutions(*arrays)
    for part in PARTS:
      a, b = median_seconds(ours[part], args.steps), median_seconds(theirs[part], args.steps)
      print(f"{f'{size}x{size} {c_in}->{c_out}':>18}  {part:>11}  {a * 1e3:7.1f}  "
            f"{gflop / a:7.0f}  {b * 1e3:10.1f}  {gflop / b:7.0f}  {b / a:10.2f}x", flush=True)


if __name__ == "__main__":
  runtime.configure()
  main()
