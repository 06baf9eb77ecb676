"""Max-pool forms: `nn.max_pool` (differentiated through select_and_scatter) vs the models'
`common.max_pool` (reshape + max, or separable shifted maxima), forward + backward, alone at
the models' pool shapes.

  python -m benchmarks.experiments.pool_forms [--batch 8] [--steps 8]
  python -m benchmarks.experiments.pool_forms --dtype bfloat16 --batch 64   # a GPU's setting

The two forms are compiled in one process and timed alternately, step by step. Prints medians
and the ratio (> 1: common.max_pool faster). The whole train steps were compared once, when
the models moved to common.max_pool (BENCHMARKS.md); the models keep no switch back to
nn.max_pool, so that comparison is not repeated here.
"""

import argparse
import time

from msatt_jax import runtime

# (height = width, channels, window, strides, padding) of the pools at 192 x 192 inputs.
SHAPES = (
    (192, 32, (2, 2), (2, 2), "VALID"),  # U-Net level 1; MSConvLSTM-Att's scale-2 pool.
    (96, 64, (2, 2), (2, 2), "VALID"),  # U-Net level 2.
    (96, 64, (3, 3), (1, 1), "SAME"),  # MSConvLSTM-Att's SE-Inception pool branch.
)


def main() -> None:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from msatt_jax.models.common import max_pool  # pylint: disable=g-import-not-at-top

  p = argparse.ArgumentParser(prog="python -m benchmarks.experiments.pool_forms",
                              description=__doc__)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype of the pools")
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


if __name__ == "__main__":
  runtime.configure()
  main()
