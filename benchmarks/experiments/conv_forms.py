"""3x3 convolution forms on XLA:CPU, forward + backward, at the U-Net's layer shapes: the plain
convolution; im2col (nine shifted copies concatenated along channels, then one matmul); and
Winograd F(2x2, 3x3) (4x4 input tiles transformed, 16 batched matmuls with 2.25x fewer
multiplications, 2x2 output tiles transformed back).

  python -m benchmarks.experiments.conv_forms [--batch 8] [--steps 5]

Prints the median time of each form per layer shape and the ratios (> 1: that form faster). It
answers whether routing the U-Net's convolutions through XLA's matmul path would help on CPU.
"""

import argparse
import time

from msatt_jax import runtime

# (height = width, in channels, out channels) of the U-Net's levels at 192 x 192 (base width 32).
SHAPES = ((192, 32, 32), (96, 64, 64), (48, 128, 128), (24, 256, 256), (12, 512, 512))


def main() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  p = argparse.ArgumentParser(prog="python -m benchmarks.experiments.conv_forms",
                              description=__doc__)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=5)
  args = p.parse_args()

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def im2col(x, w):
    _, h, width, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([xp[:, i:i + h, j:j + width, :] for i in range(3) for j in range(3)],
                           axis=-1)
    return cols @ w.reshape(9 * c, -1)

  # Winograd F(2x2, 3x3) (Lavin & Gray 2016): Y = A^T [(G g G^T) * (B^T d B)] A per tile.
  b_t = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
  g_m = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)
  a_t = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)

  def winograd(x, w):  # 'SAME' padding; H and W even.
    b, h, width, c = x.shape
    th, tw = h // 2, width // 2
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = [xp[:, i:i + 2 * th:2] for i in range(4)]  # Row i of every 4x4 tile.
    rows = [sum(b_t[a, i] * rows[i] for i in range(4) if b_t[a, i]) for a in range(4)]
    tiles = []
    for r in rows:
      cols = [r[:, :, j:j + 2 * tw:2] for j in range(4)]
      tiles += [sum(b_t[a, j] * cols[j] for j in range(4) if b_t[a, j]) for a in range(4)]
    v = jnp.stack(tiles).reshape(16, b * th * tw, c)
    u = jnp.einsum("ai,ijcd,bj->abcd", g_m, w, g_m).reshape(16, c, -1)
    m = jnp.einsum("pnc,pcd->pnd", v, u).reshape(4, 4, b, th, tw, -1)
    return jnp.einsum("ua,abnhwd,vb->nhuwvd", a_t, m, a_t).reshape(b, h, width, -1)

  def median_seconds(form, x, w):
    step = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(form(x, w) ** 2), argnums=(0, 1)))
    jax.block_until_ready(step(x, w))
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      jax.block_until_ready(step(x, w))
      times.append(time.perf_counter() - t0)
    return float(np.median(times))

  print(f"# batch {args.batch}, forward + backward, median of {args.steps}; "
        f"runtime settings: {runtime.describe() or 'none'}")
  for size, c_in, c_out in SHAPES:
    x = jax.random.normal(jax.random.key(0), (args.batch, size, size, c_in))
    w = 0.01 * jax.random.normal(jax.random.key(1), (3, 3, c_in, c_out))
    reference = conv(x, w)
    for form in (im2col, winograd):  # The forms compute the same convolution.
      np.testing.assert_allclose(form(x, w), reference, rtol=1e-4, atol=1e-4 * float(
          jnp.abs(reference).max()))
    a, b, c = (median_seconds(f, x, w) for f in (conv, im2col, winograd))
    print(f"{size}x{size} {c_in}->{c_out}: conv {a * 1e3:.1f} ms, im2col {b * 1e3:.1f} ms, "
          f"winograd {c * 1e3:.1f} ms; conv / im2col time = {a / b:.2f}, conv / winograd time "
          f"= {a / c:.2f}", flush=True)


if __name__ == "__main__":
  runtime.configure()
  main()
