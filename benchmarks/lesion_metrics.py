"""Time the lesion-wise scores add per case, beside the voxel-wise ones.

  python -m benchmarks.lesion_metrics [--repeats=3]

A 240x240x155 synthetic case with up to 6 metastases (data_pipelines.synthetic) is the
reference; the prediction is the reference shifted by one voxel along x plus a stray 3-voxel
blob (a false positive). Prints the median wall time of metrics.region_scores (voxel-wise, each HD95 definition)
and of metrics.lesion_scores (gli2023 and met2023) over the repeats.
"""

import statistics
import sys
import time

import numpy as np

from data_pipelines import synthetic
from msatt_jax import metrics


def _median_seconds(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(repeats: int = 3) -> None:
  ref = synthetic.make_case(synthetic.DEFAULT_SHAPE, seed=0, index=0, metastases=6).label
  pred = np.roll(ref, 1, axis=0)
  pred[200:203, 120, 80] = 2
  spacing = (1.0, 1.0, 1.0)
  rules = metrics.LESION_RULES["gli2023"]
  _, lesions = metrics.lesion_scores(pred, ref, spacing, rules)
  print(f"case {ref.shape}: {len(lesions)} scored lesions/components over WT, TC, ET (gli2023)")
  for mode in metrics.HD95_MODES:
    s = _median_seconds(lambda: metrics.region_scores(pred, ref, spacing, mode), repeats)
    print(f"region_scores (voxel-wise, hd95={mode}): {s:.3f} s")
  for name in ("gli2023", "met2023"):
    rules = metrics.LESION_RULES[name]
    s = _median_seconds(lambda: metrics.lesion_scores(pred, ref, spacing, rules), repeats)
    print(f"lesion_scores ({name}): {s:.3f} s")
    s = _median_seconds(lambda: metrics.lesion_scores(pred, ref, spacing, rules, False), repeats)
    print(f"lesion_scores ({name}, Dice only, as postprocess --objective=lesion): {s:.3f} s")


if __name__ == "__main__":
  main(int(sys.argv[1].split("=")[1]) if len(sys.argv) > 1 else 3)
