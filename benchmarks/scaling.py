"""Data-parallel scaling: train-step throughput on 1, 2, 4 ... devices and efficiency per device.

  python -m benchmarks.scaling                                   # tiny U-Net, sharding, 1/2/4
  python -m benchmarks.scaling --config demo --model msconvlstm_att --modes sharding,pmap
  python -m benchmarks.scaling --devices 1,2,4,8 --weak          # per-device batch fixed

Each device count runs in its own process. On a machine without accelerators the devices are
forced host devices (XLA_FLAGS=--xla_force_host_platform_device_count=N): they split the same
CPU cores, so the total work per step is unchanged and efficiency per device is expected to
fall as 1/N (or worse, with the all-reduce on top); the figures then measure the overhead of
the data-parallel program, not a speed-up. On GPUs the devices are real ones.

Throughput is global slices per second of the project's train step (forward, loss, backward,
gradient all-reduce, Adam), median over --steps steps after --warmup, with each step's batch
placed from host memory as the trainer does. Efficiency per device = throughput(N) /
(N * throughput(1)). By default the global batch is fixed (strong scaling); --weak fixes the
batch per device instead.
"""

import argparse
import functools
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m benchmarks.scaling",
                              description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="tiny", help="Config module under configs/ (tiny, demo, "
                 "brats18).")
  p.add_argument("--model", default="unet", help="Model variant of the config.")
  p.add_argument("--modes", default="sharding", help="Comma list of 'sharding', 'pmap'.")
  p.add_argument("--devices", default="1,2,4", help="Comma list of device counts.")
  p.add_argument("--batch_size", type=int, default=None,
                 help="Global batch (per device with --weak); default: the config's.")
  p.add_argument("--weak", action="store_true", help="Fix the batch per device, not globally.")
  p.add_argument("--crop_size", type=int, default=None, help="Slice size; default: the config's.")
  p.add_argument("--steps", type=int, default=10, help="Timed steps per device count.")
  p.add_argument("--warmup", type=int, default=2, help="Untimed steps after compilation.")
  p.add_argument("--json", default=None, help="Append one JSON line per measurement here.")
  p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Worker: one device count, one mode, in a process whose device count was forced at start.


def build_config(args: argparse.Namespace, mode: str, num_devices: int):
  config = importlib.import_module(f"configs.{args.config}").get_config(args.model)
  config.parallel = mode
  config.num_devices = num_devices
  if args.crop_size:
    config.data.crop_size = args.crop_size
  batch = args.batch_size or config.batch_size
  config.batch_size = batch * num_devices if args.weak else batch
  return config


def measure(args: argparse.Namespace) -> Dict[str, Any]:
  """Compiles and times the train step on `args.worker` devices."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from msatt_jax import parallel  # pylint: disable=g-import-not-at-top
  from msatt_jax import steps  # pylint: disable=g-import-not-at-top

  config = build_config(args, args.mode, args.worker)
  par = parallel.from_config(config)
  lr_fn = steps.create_learning_rate_fn(config, steps_per_epoch=100)
  model = steps.create_model(config, axis_name=par.axis_name)
  state = par.to_step_layout(par.create_state(functools.partial(
      steps.create_train_state, config=config, model=model, learning_rate_fn=lr_fn),
      jax.random.key(0)))
  step = par.train_step_fn(steps.make_train_step(config, lr_fn))
  rng = np.random.default_rng(0)
  h, w, m = steps.input_shape(config)
  batches = []
  for _ in range(3):
    image = rng.normal(size=(config.batch_size, h, w, m)).astype(np.float32)
    label = np.clip(np.round(image[..., 0] + image[..., 1]), 0, 3).astype(np.uint8)
    batches.append({"image": image, "label": label})

  start = time.perf_counter()
  state, metrics = step(state, batches[0])
  jax.block_until_ready((state, metrics))
  compile_s = time.perf_counter() - start
  for i in range(args.warmup):
    state, metrics = step(state, batches[i % len(batches)])
  jax.block_until_ready((state, metrics))
  times = []
  for i in range(args.steps):
    start = time.perf_counter()
    state, metrics = step(state, batches[i % len(batches)])
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  median = float(np.median(times))
  q25, q75 = np.percentile(times, [25, 75])
  return {"mode": par.mode, "devices": par.num_devices, "platform": jax.devices()[0].platform,
          "device_kind": jax.devices()[0].device_kind, "model": config.model.name,
          "config": args.config, "crop_size": config.data.crop_size,
          "global_batch": config.batch_size, "compile_s": compile_s, "step_s_median": median,
          "step_s_iqr": float(q75 - q25), "slices_per_s": config.batch_size / median,
          "loss": float(jax.device_get(metrics["loss"]))}


# ---------------------------------------------------------------------------------------------
# Driver.


def _accelerator_count() -> int:
  """Real accelerators visible to JAX (0 on a CPU-only machine), asked in a child process."""
  code = "import jax; print(sum(d.platform != 'cpu' for d in jax.devices()))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=REPO_ROOT)
  return int(out.stdout.strip().splitlines()[-1])


def run_worker(args: argparse.Namespace, mode: str, num_devices: int,
               forced: bool) -> Dict[str, Any]:
  env = dict(os.environ)
  if forced:
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
  argv = [sys.executable, "-m", "benchmarks.scaling", "--worker", str(num_devices),
          "--mode", mode, "--config", args.config, "--model", args.model,
          "--steps", str(args.steps), "--warmup", str(args.warmup)]
  if args.batch_size:
    argv += ["--batch_size", str(args.batch_size)]
  if args.crop_size:
    argv += ["--crop_size", str(args.crop_size)]
  if args.weak:
    argv.append("--weak")
  proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
  if proc.returncode:
    raise RuntimeError(f"{mode} on {num_devices} device(s) failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def efficiency_table(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """Adds speed-up and efficiency per device relative to the same mode on the fewest devices."""
  rows = []
  for r in results:
    base = min((b for b in results if b["mode"] == r["mode"]), key=lambda b: b["devices"])
    per_device_base = base["slices_per_s"] / base["devices"]
    speedup = r["slices_per_s"] / base["slices_per_s"]
    rows.append({**r, "speedup": speedup,
                 "efficiency": r["slices_per_s"] / (r["devices"] * per_device_base)})
  return rows


def machine() -> str:
  """CPU model, usable cores and the load average (other work on the machine skews timings)."""
  name = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                  name)
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
  return f"{name}, {cores} usable CPU core(s), load average {load} (1/5/15 min)"


def main(argv: Optional[Sequence[str]] = None) -> None:
  args = parse_args(argv)
  if args.worker is not None:
    print(json.dumps(measure(args)))
    return
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  counts = sorted({int(n) for n in args.devices.split(",")})
  forced = _accelerator_count() == 0
  if not forced and max(counts) > _accelerator_count():
    raise SystemExit(f"--devices asks for {max(counts)} but {_accelerator_count()} "
                     "accelerator(s) are visible.")
  results = []
  for mode in modes:
    for n in counts:
      r = run_worker(args, mode, n, forced)
      r["forced_host_devices"] = forced
      results.append(r)
      print(f"  measured {mode} on {n} device(s): {r['slices_per_s']:.1f} slices/s", flush=True)
  rows = efficiency_table(results)
  first = rows[0]
  print(f"\nMachine: {machine()}; devices: "
        + ("forced host (CPU) devices sharing those cores" if forced
           else f"{first['device_kind']}"))
  print(f"Model {first['model']} (configs/{args.config}.py), {first['crop_size']}x"
        f"{first['crop_size']} slices, {'per-device' if args.weak else 'global'} batch "
        f"{args.batch_size or first['global_batch'] // (first['devices'] if args.weak else 1)}, "
        f"median of {args.steps} steps after {args.warmup} warm-up\n")
  print(f"{'mode':<9} {'devices':>7} {'batch':>5} {'step ms':>8} {'IQR ms':>7} {'slices/s':>9} "
        f"{'speed-up':>8} {'eff/dev':>7} {'compile s':>9}")
  for r in rows:
    print(f"{r['mode']:<9} {r['devices']:>7} {r['global_batch']:>5} "
          f"{1e3 * r['step_s_median']:>8.1f} {1e3 * r['step_s_iqr']:>7.1f} "
          f"{r['slices_per_s']:>9.1f} {r['speedup']:>8.2f} {r['efficiency']:>7.2f} "
          f"{r['compile_s']:>9.1f}")
  if forced:
    print("\nForced host devices split the same cores: the work per step does not shrink with "
          "more devices, so efficiency per device near 1/N is the expected ceiling here.")
  if args.json:
    with open(args.json, "a", encoding="utf-8") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
