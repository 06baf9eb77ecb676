"""Max-pool forms: `nn.max_pool` (differentiated through select_and_scatter) vs the models'
`common.max_pool` (reshape + max, or separable shifted maxima), forward + backward.

  python -m benchmarks.pool_forms [--batch 8] [--steps 8] [--models unet,msconvlstm_att]
  python -m benchmarks.pool_forms --dtype bfloat16 --batch 64 --size 190 \
      --models msconvlstm_att          # the GPU training setting

First the pools alone at the models' shapes, then each model's whole train step built once with
each form (the models' modules see `nn.max_pool` for the baseline) and timed alternately, step
by step. Prints medians and the ratio (> 1: common.max_pool faster).
"""

import argparse
import contextlib
import time
from typing import Iterator

from msatt_jax import runtime

# (height = width, channels, window, strides, padding) of the pools at 192 x 192 inputs.
SHAPES = (
    (192, 32, (2, 2), (2, 2), "VALID"),  # U-Net level 1; MSConvLSTM-Att's scale-2 pool.
    (96, 64, (2, 2), (2, 2), "VALID"),  # U-Net level 2.
    (96, 64, (3, 3), (1, 1), "SAME"),  # MSConvLSTM-Att's SE-Inception pool branch.
)


@contextlib.contextmanager
def flax_pools() -> Iterator[None]:
  """Within: the models build their pools with nn.max_pool (the form before common.max_pool)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from msatt_jax import models  # pylint: disable=g-import-not-at-top
  modules = (models.blocks, models.fcn, models.msconvlstm_att, models.unet)
  saved = [m.max_pool for m in modules]

  def pool(x, window, strides=None, padding="VALID"):
    return nn.max_pool(x, tuple(window), strides=tuple(strides or window), padding=padding)

  for m in modules:
    m.max_pool = pool
  try:
    yield
  finally:
    for m, f in zip(modules, saved):
      m.max_pool = f


def main() -> None:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from benchmarks import jax_bench  # pylint: disable=g-import-not-at-top
  from msatt_jax.models.common import max_pool  # pylint: disable=g-import-not-at-top

  p = argparse.ArgumentParser(prog="python -m benchmarks.pool_forms", description=__doc__)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--size", type=int, default=192, help="model input height and width")
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--models", default="unet,msconvlstm_att", help="comma list; '' for none")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype of the pools and the models")
  args = p.parse_args()
  print(f"# {jax.devices()[0].device_kind}, {args.dtype}, batch {args.batch}, forward + "
        f"backward, median of {args.steps} alternating steps; runtime settings: "
        f"{runtime.describe() or 'none'}")

  def alternate(steps):
    """Median seconds of each step function, run alternately."""
    for step in steps:
      step()  # Compiles.
    times = [[] for _ in steps]
    for _ in range(args.steps):
      for step, t in zip(steps, times):
        t0 = time.perf_counter()
        step()
        t.append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]

  for size, channels, window, strides, padding in SHAPES:
    x = jax.random.normal(jax.random.key(0), (args.batch, size, size, channels), args.dtype)
    forms = (lambda x: nn.max_pool(x, window, strides=strides, padding=padding),
             lambda x: max_pool(x, window, strides, padding))
    grads = [jax.jit(jax.grad(lambda x, f=f: jnp.sum(jnp.sin(f(x).astype(jnp.float32)))))
             for f in forms]
    a, b = alternate([lambda g=g: jax.block_until_ready(g(x)) for g in grads])
    print(f"{size}x{size}x{channels} {window[0]}x{window[1]}/{strides[0]} {padding}: "
          f"nn.max_pool {a * 1e3:.1f} ms, common.max_pool {b * 1e3:.1f} ms, ratio {a / b:.2f}",
          flush=True)

  for model in filter(None, args.models.split(",")):
    spec = {"model": model, "batch_size": args.batch, "size": args.size, "dtype": args.dtype}
    with flax_pools():
      baseline = jax_bench.JaxBench(spec)
      baseline.setup("train")  # Traced here, inside the context.
    ours = jax_bench.JaxBench(spec)
    ours.setup("train")
    a, b = alternate([lambda s=s: s.run("train", 1) for s in (baseline, ours)])
    print(f"{model} train step, batch {args.batch} of {args.size}x{args.size}: nn.max_pool "
          f"{a * 1e3:.0f} ms, common.max_pool {b * 1e3:.0f} ms, ratio {a / b:.3f}", flush=True)


if __name__ == "__main__":
  runtime.configure()
  main()
