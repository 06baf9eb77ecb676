"""Issue 7's GPU figures for MSConvLSTM-Att, in bfloat16 compute (float32 parameters):

- train slices/s at batch 32 and 64 (benchmarks.run, 190 x 190 slices, the paper's crop);
- the estimated time of the paper's schedule: 225 patients x 91 slices x 500 epochs slice-steps;
- the latency of segmenting one 240 x 240 x 155 case with `msatt_jax.inference.segment_volume`
  (preprocessing, the slices through the model, pasting back), an untrained model on a
  synthetic case: the time does not depend on the weights.

  python -m benchmarks.gpu                 # on a GPU machine (benchmarks/gpu.sh installs first)
  python -m benchmarks.gpu --dry-run       # the same logic, tiny, on any machine
"""

import argparse
import json
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from benchmarks import common
from msatt_jax import runtime

MODEL = "msconvlstm_att"
# NVIDIA's datasheet figure for the H100 and H200 SXM (dense bfloat16 tensor cores).
H100_BF16_DENSE_GFLOPS = 989_400.0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
  p.add_argument("--batch_sizes", default="32,64")
  p.add_argument("--size", type=int, default=190, help="slice size (the paper's crop)")
  p.add_argument("--steps", type=int, default=10, help="timing samples per batch size")
  p.add_argument("--window", type=int, default=5,
                 help="consecutive steps per timing sample (keeps the GPU queue full)")
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  p.add_argument("--case_shape", default="240,240,155", help="X,Y,Z of the segmented case")
  p.add_argument("--case_batch", type=int, default=0,
                 help="slices per model call when segmenting (0: all of the case's at once)")
  p.add_argument("--case_repeats", type=int, default=5)
  p.add_argument("--peak_gflops", type=float, default=H100_BF16_DENSE_GFLOPS,
                 help="the card's peak GFLOP/s for the %% of peak column (default: the H100/H200 "
                      "SXM dense bfloat16 datasheet figure)")
  p.add_argument("--json", help="append the results as JSON lines to this file")
  p.add_argument("--breakdown", action="store_true",
                 help="also profile the train steps and print their time by model part")
  p.add_argument("--trace_dir", help="with --breakdown: keep the traces and HLO here")
  p.add_argument("--dry-run", dest="dry_run", action="store_true",
                 help="tiny sizes and a small model: checks the logic on a CPU in minutes")
  args = p.parse_args(argv)
  args.overrides = {}
  if args.dry_run:
    args.peak_gflops = common.DEFAULT_PEAK_GFLOPS
    args.batch_sizes, args.size, args.steps, args.window = "2", 32, 2, 1
    args.case_shape, args.case_repeats = "48,48,40", 2
    args.overrides = {"lstm_features": "4", "inception_features": "8", "resnet_features": "8",
                      "fused_features": "8"}
  args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
  args.case_shape = tuple(int(s) for s in args.case_shape.split(","))
  return args


def train_throughput(args: argparse.Namespace) -> List[Dict[str, Any]]:
  """benchmarks.run's train rows of MSConvLSTM-Att at each batch size."""
  from benchmarks import run  # pylint: disable=g-import-not-at-top
  argv = ["--models", MODEL, "--modes", "train", "--dtype", args.dtype,
          "--batch_sizes", ",".join(map(str, args.batch_sizes)), "--size", str(args.size),
          "--steps", str(args.steps), "--window", str(args.window),
          "--peak_gflops", str(args.peak_gflops)]
  for key, value in args.overrides.items():
    argv += ["--set", f"{key}={value}"]
  if args.breakdown:
    argv += ["--breakdown"] + (["--trace_dir", args.trace_dir] if args.trace_dir else [])
  return run.main(argv)


def case_latency(args: argparse.Namespace) -> Dict[str, Any]:
  """Seconds to segment one synthetic case (after a first, compiling, call)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import brats18  # pylint: disable=g-import-not-at-top
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
  from msatt_jax import inference, steps  # pylint: disable=g-import-not-at-top
  from benchmarks import jax_bench  # pylint: disable=g-import-not-at-top

  config = brats18.get_config(MODEL)
  config.model = jax_bench.model_config(MODEL, args.overrides)
  config.dtype = args.dtype
  x, y, z = args.case_shape
  if args.dry_run:  # Crop and slice range scaled to the small case.
    config.data.crop_size = min(x, y) * 190 // 240
    config.data.slice_start, config.data.slice_stop = z * 30 // 155, z * 120 // 155
  model = steps.create_model(config)
  dummy = np.zeros((1, *steps.input_shape(config)), np.float32)
  variables = jax.jit(lambda k: model.init(k, dummy, train=False))(jax.random.key(0))
  case = synthetic.make_case((x, y, z), seed=0, index=0)
  image = np.stack([case.images[m] for m in config.data.modalities], -1).astype(np.float32)
  num_slices = config.data.slice_stop - config.data.slice_start + 1
  batch = args.case_batch or num_slices
  predict = inference.make_predict_fn(model, variables, config.loss)

  def segment():
    return inference.segment_volume(predict, image, config.data, batch_size=batch)

  t0 = time.perf_counter()
  labels = segment()
  first = time.perf_counter() - t0
  if labels.shape != image.shape[:3]:
    raise AssertionError(f"segment_volume returned {labels.shape} for a {image.shape} case")
  times = []
  for _ in range(args.case_repeats):
    t0 = time.perf_counter()
    segment()
    times.append(time.perf_counter() - t0)
  return {"case_shape": list(args.case_shape), "slices": num_slices, "case_batch": batch,
          "first_call_s": first, "latency_s_median": float(np.median(times)),
          "latency_s_min": float(np.min(times)), "device": jax.devices()[0].device_kind,
          "dtype": args.dtype}


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  rows = train_throughput(args)
  case = case_latency(args)
  device = rows[0]["device"] if rows else case["device"]
  print(f"\n== MSConvLSTM-Att on {device} ({args.dtype} compute, {args.size}x{args.size} slices)")
  results = []
  for r in rows:
    hours = common.PAPER_SLICE_STEPS / r["slices_per_s"] / 3600
    print(f"train, batch {r['batch_size']}: {r['slices_per_s']:.1f} slices/s -> the paper's "
          f"500-epoch schedule ({common.PAPER_SLICE_STEPS / 1e6:.2f} M slice-steps) in "
          f"{hours:.2f} h")
    results.append({"kind": "schedule", "model": MODEL, "device": device, "dtype": args.dtype,
                    "batch_size": r["batch_size"], "slices_per_s": r["slices_per_s"],
                    "schedule_slice_steps": common.PAPER_SLICE_STEPS, "schedule_hours": hours})
  print(f"segment one {'x'.join(map(str, args.case_shape))} case ({case['slices']} slices, "
        f"{case['case_batch']} per call): {case['latency_s_median']:.3f} s median "
        f"(first call, with compilation: {case['first_call_s']:.1f} s)")
  results.append({"kind": "case_latency", "model": MODEL, **case})
  if args.json:
    with open(args.json, "a") as f:
      for r in results:
        f.write(json.dumps(r) + "\n")
  return 0


if __name__ == "__main__":
  runtime.configure()
  sys.exit(main())
