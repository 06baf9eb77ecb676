r"""Training and inference throughput of the models, optionally beside PyTorch/MONAI.

  python -m benchmarks.run --models unet --batch_sizes 8 --size 192 --compare-torch
  python -m benchmarks.run --models msconvlstm_att --json results.jsonl --breakdown
  python -m benchmarks.run --models msconvlstm_att --variant stacked:convlstm_gate_convs=stacked \
      --variant no-xla-flags:runtime=malloc+hugepages
  python -m benchmarks.run --suite gpu          # on a GPU (benchmarks/gpu.sh installs first)
  python -m benchmarks.run --suite gpu --dry-run  # the same logic, tiny, on any machine

For each model and batch size: compile time; train-step (the trainer's own step,
`steps.make_train_step`, jitted with the state donated) and inference slices/s, median and
interquartile range over --steps steps after --warmup; FLOPs per step from XLA's cost analysis
and the achieved fraction of --peak_gflops; peak memory (resident set size on CPU, the device's
peak on GPU); for train rows, the paper's 500-epoch schedule at that rate. With --case_shape,
also the latency of segmenting one synthetic case with `inference.Predictor.segment`
(preprocessing, every slice through the model, pasting back; an untrained model, whose time
does not depend on its weights).

--suite picks the defaults of a question: 'models' (every model, float32, 192x192, as on the
CPU) or 'gpu' (MSConvLSTM-Att training in bfloat16 at the paper's 190x190 crop, batch 32 and
64, several steps per timing sample to keep the GPU's queue full, and one 240x240x155 case).
Flags given on the command line override the suite's values; --dry-run shrinks any suite to
tiny sizes and small models, to check its logic on a CPU in minutes.

Every side (the project's JAX model, each --variant of it, and with --compare-torch its
PyTorch/MONAI counterpart) runs in its own worker process with the same threads and allocator
settings, and the driver alternates single steps between them (A B A B ...), so a changing load
on the machine affects all sides alike. The process applies the project's runtime defaults
(msatt_jax/runtime.py) before anything starts.

--baseline_python PATH adds a JAX worker run by another interpreter, labelled with its jax
version (e.g. jax[0.10.2]): the stack installed there against this one, step for step in the
same run. --torch_python PATH runs the PyTorch workers under another interpreter (one where
torch and MONAI are installed).

  python -m benchmarks.run --models unet,msconvlstm_att --compare-torch \
      --baseline_python OLD_ENV/bin/python --torch_python OLD_ENV/bin/python

A --variant NAME:SPEC adds a JAX worker: SPEC is a comma list of key=value model overrides and
optionally runtime=GROUPS, the runtime defaults that worker gets: 'none', 'all', or groups of
msatt_jax/runtime.py joined by '+' (e.g. runtime=xla+malloc).
"""

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from benchmarks import breakdown
from benchmarks import common
from msatt_jax import runtime

ALL_MODELS = ("msconvlstm_att", "unet", "attunet", "fcn")
TORCH_MODELS = ("unet", "attunet")
MODES = ("inference", "train")  # Inference first: the train step donates the parameters.


SUITES: Dict[str, Dict[str, Any]] = {
    "models": {},  # The parser's own defaults.
    "gpu": {"models": "msconvlstm_att", "modes": "train", "dtype": "bfloat16",
            "batch_sizes": "32,64", "size": 190, "window": 5,
            "peak_gflops": common.H100_BF16_DENSE_GFLOPS, "case_shape": "240,240,155"},
}
# --dry-run: any suite at tiny sizes; the model overrides apply to the models that have the key.
DRY_RUN = {"batch_sizes": "2", "size": 32, "steps": 2, "warmup": 1, "window": 1,
           "peak_gflops": None, "case_repeats": 2}
DRY_RUN_CASE_SHAPE = "48,48,40"
DRY_RUN_OVERRIDES = {"lstm_features": "4", "inception_features": "8", "resnet_features": "8",
                     "fused_features": "8", "base_width": "4", "fc_width": "16"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0],
                              epilog=__doc__.split("\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--suite", default="models", choices=sorted(SUITES),
                 help="the defaults of a question (see above)")
  p.add_argument("--dry-run", dest="dry_run", action="store_true",
                 help="tiny sizes and small models: checks the suite's logic in minutes")
  p.add_argument("--models", default=",".join(ALL_MODELS),
                 help="comma list of " + ", ".join(ALL_MODELS))
  p.add_argument("--batch_sizes", default="8", help="comma list of batch sizes")
  p.add_argument("--size", type=int, default=192, help="slice height and width")
  p.add_argument("--steps", type=int, default=10, help="timed steps per side and mode")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  p.add_argument("--window", type=int, default=1,
                 help="consecutive steps per timing sample (one wait each); >1 on a GPU hides "
                      "the wait's latency")
  p.add_argument("--modes", default=",".join(MODES), help="comma list of inference, train")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype (parameters stay float32)")
  p.add_argument("--compare-torch", dest="compare_torch", action="store_true",
                 help="also run MONAI's BasicUNet / AttentionUnet (pip install -e .[bench])")
  p.add_argument("--baseline_python", metavar="PATH",
                 help="also run the JAX model under this interpreter's installed stack")
  p.add_argument("--torch_python", metavar="PATH",
                 help="interpreter of the PyTorch workers (default: this one)")
  p.add_argument("--torch-channels-first", dest="torch_channels_last", action="store_false",
                 help="PyTorch in NCHW memory format (default: channels_last, its faster one "
                      "on CPU)")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="model config override for every model that has KEY (repeatable)")
  p.add_argument("--variant", dest="variants", action="append", default=[],
                 metavar="NAME:SPEC", help="an extra JAX side (see above; repeatable)")
  p.add_argument("--peak_gflops", type=float,
                 help="the machine's peak GFLOP/s for the %% of peak column (default on CPU: "
                      "this project's 2-core Zen 4 fp32 figure, see benchmarks/common.py; none "
                      "on an accelerator)")
  p.add_argument("--breakdown", action="store_true",
                 help="also profile the JAX sides' steps and print their time by model part")
  p.add_argument("--trace_dir",
                 help="with --breakdown: keep each profiled step's trace (.xplane.pb, for "
                      "TensorBoard's profiler or XProf) and optimised HLO text in this folder")
  p.add_argument("--case_shape", default="",
                 help="X,Y,Z of a synthetic case to segment with each model, timed (default: "
                      "none; the crop and slice range scale with it as the paper's do with "
                      "240,240,155)")
  p.add_argument("--case_batch", type=int, default=0,
                 help="slices per model call when segmenting (0: all of the case's at once)")
  p.add_argument("--case_repeats", type=int, default=5, help="timed segmentations of the case")
  p.add_argument("--json", help="append one JSON line per result to this file")
  p.add_argument("--markdown", action="store_true", help="also print the table as markdown")
  # The suite's values, then --dry-run's, replace the parser's defaults; given flags win.
  first, _ = p.parse_known_args(argv)
  p.set_defaults(**SUITES[first.suite])
  if first.dry_run:
    p.set_defaults(**DRY_RUN)
    if p.get_default("case_shape"):
      p.set_defaults(case_shape=DRY_RUN_CASE_SHAPE)
  args = p.parse_args(argv)
  args.models = _split(args.models)
  unknown = sorted(set(args.models) - set(ALL_MODELS))
  if unknown:
    p.error(f"unknown model(s) {unknown}; choose from {', '.join(ALL_MODELS)}")
  args.batch_sizes = [int(b) for b in _split(args.batch_sizes)]
  args.modes = [m for m in MODES if m in _split(args.modes)]
  if not args.modes:
    p.error("--modes names neither inference nor train")
  if args.steps < 1 or args.warmup < 0 or args.window < 1 or args.case_repeats < 1:
    p.error("--steps, --window and --case_repeats must be >= 1, --warmup >= 0")
  try:
    args.case_shape = tuple(int(s) for s in _split(args.case_shape))
    if args.case_shape and len(args.case_shape) != 3:
      raise ValueError(f"--case_shape takes X,Y,Z, not {args.case_shape}")
    args.overrides = _pairs(args.overrides)
    args.variants = [_variant(v) for v in args.variants]
  except ValueError as e:
    p.error(str(e))
  for overrides in [args.overrides] + [v[1] for v in args.variants]:
    for key in overrides:
      if not any(key in _overrides_for(m, {key: ""}) for m in args.models):
        p.error(f"no model of {args.models} has the config key {key!r}")
  if args.dry_run:  # Applied after the check: each model takes the keys it has.
    args.overrides = {**DRY_RUN_OVERRIDES, **args.overrides}
  return args


def _split(text: str) -> List[str]:
  return [t.strip() for t in text.split(",") if t.strip()]


def _pairs(items: Sequence[str]) -> Dict[str, str]:
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"expected KEY=VALUE, got {item!r}")
    out[key.strip()] = value.strip()
  return out


def _variant(text: str) -> Tuple[str, Dict[str, str], Optional[str]]:
  """NAME:k=v,...,runtime=G1+G2 -> (name, model overrides, runtime groups or None)."""
  name, sep, spec = text.partition(":")
  if not sep or not name:
    raise ValueError(f"--variant expects NAME:SPEC, got {text!r}")
  pairs = _pairs(_split(spec))
  groups = pairs.pop("runtime", None)
  if groups is not None:
    groups = groups.replace("+", ",")
    runtime.enabled_groups({runtime.OPT_ENV: groups})  # Validates.
  return name, pairs, groups


def _overrides_for(model: str, overrides: Mapping[str, str]) -> Dict[str, str]:
  """The overrides that apply to `model` (those naming keys of its config)."""
  from configs import brats18  # pylint: disable=g-import-not-at-top
  keys = set(brats18.get_model_config(model))
  return {k: v for k, v in overrides.items() if k in keys}


class Side:
  """One worker and what it measured."""

  def __init__(self, worker: common.Worker, framework: str, variant: Optional[str]):
    self.worker, self.framework, self.variant = worker, framework, variant
    self.times: Dict[str, List[float]] = {}
    self.setup: Dict[str, Dict[str, Any]] = {}

  @property
  def label(self) -> str:
    return self.framework + (f"[{self.variant}]" if self.variant else "")


def measure(model: str, batch_size: int, args: argparse.Namespace) -> List[Dict[str, Any]]:
  """Result rows of one model at one batch size (every side, every mode)."""
  base = {"model": model, "batch_size": batch_size, "size": args.size, "dtype": args.dtype}
  sides: List[Side] = []
  try:
    overrides = _overrides_for(model, args.overrides)
    sides.append(Side(common.Worker("benchmarks.jax_bench", {**base, "overrides": overrides},
                                    f"jax {model}"), "jax", None))
    for name, var_overrides, groups in args.variants:
      spec = {**base, "overrides": {**overrides, **_overrides_for(model, var_overrides)}}
      sides.append(Side(common.Worker("benchmarks.jax_bench", spec, f"jax[{name}] {model}",
                                      env=common.runtime_env(groups)), "jax", name))
    if args.baseline_python:
      worker = common.Worker("benchmarks.jax_bench", {**base, "overrides": overrides},
                             f"jax ({args.baseline_python}) {model}",
                             python=args.baseline_python)
      sides.append(Side(worker, "jax", worker.info["version"]))
    if args.compare_torch and model in TORCH_MODELS:
      spec = {**base, "overrides": overrides, "channels_last": args.torch_channels_last}
      sides.append(Side(common.Worker("benchmarks.torch_bench", spec, f"pytorch {model}",
                                      python=args.torch_python), "pytorch", None))
    for mode in args.modes:
      for side in sides:
        side.setup[mode] = side.worker.call("setup", mode=mode)
      for side in sides:
        if args.warmup:
          side.worker.call("run", mode=mode, steps=args.warmup, window=args.window)
        side.times[mode] = []
      for _ in range(args.steps):  # A B A B: one sample of each side in turn.
        for side in sides:
          side.times[mode] += side.worker.call("run", mode=mode, steps=1,
                                               window=args.window)["times"]
      for side in sides:
        side.setup[mode].update(side.worker.call("memory", mode=mode))
        if args.breakdown and side.framework == "jax":
          # Profiled steps run slower; they are not part of the timings.
          trace_dir = args.trace_dir and os.path.join(
              args.trace_dir, f"{model}_b{batch_size}_{side.variant or 'default'}_{mode}")
          try:
            side.setup[mode]["breakdown"] = side.worker.call(
                "breakdown", mode=mode, steps=3, trace_dir=trace_dir)
          except common.WorkerError as e:  # The timings stand without it.
            print(f"# no breakdown for {side.label} {model} {mode}: {e}", file=sys.stderr)
    return [_row(base, side, mode, args) for side in sides for mode in args.modes]
  finally:
    for side in sides:
      side.worker.close()


def _row(base: Mapping[str, Any], side: Side, mode: str,
         args: argparse.Namespace) -> Dict[str, Any]:
  info, setup = side.worker.info, side.setup[mode]
  stats = common.step_stats(side.times[mode])
  flops = setup.get("flops_per_step")
  peak = args.peak_gflops or (common.DEFAULT_PEAK_GFLOPS if info["platform"] == "cpu" else None)
  slices_per_s = base["batch_size"] / stats["step_s_median"]
  row = {"kind": "step", **base, "framework": side.label, "variant": side.variant, "mode": mode,
         "slices_per_s": slices_per_s, **stats,
         "schedule_hours": (common.PAPER_SLICE_STEPS / slices_per_s / 3600 if mode == "train"
                            else None),
         "compile_s": setup.get("compile_s"), "first_step_s": setup.get("first_step_s"),
         "flops_per_step": flops, "flops_source": setup.get("flops_source"),
         "gflop_per_step": flops / 1e9 if flops else None,
         "gflops_per_s": flops / 1e9 / stats["step_s_median"] if flops else None,
         "peak_percent": 100 * flops / 1e9 / stats["step_s_median"] / peak if flops and peak
                         else None,
         "peak_gflops": peak,
         "peak_mem_mb": setup.get("peak_mem_mb"), "mem_kind": setup.get("mem_kind"),
         "params": info["params"], "threads": info["threads"], "device": info["device"],
         "platform": info["platform"], "framework_version": info["version"],
         "overrides": side.worker.spec.get("overrides", {}), "runtime": info.get("runtime"),
         "settings": info.get("settings"),
         "breakdown": (breakdown.rows(setup["breakdown"]["coarse"], stats["step_s_median"])
                       if "breakdown" in setup else None),
         "breakdown_modules": setup["breakdown"]["fine"] if "breakdown" in setup else None,
         "breakdown_kinds": (breakdown.rows(setup["breakdown"]["kinds"], stats["step_s_median"])
                             if "breakdown" in setup else None),
         "breakdown_traced_ms": (1e3 * setup["breakdown"]["traced_s"]
                                 if "breakdown" in setup else None),
         "steps": len(side.times[mode]), "window": args.window,
         "step_times_s": side.times[mode], "loadavg": list(os.getloadavg()),
         "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
  return row


def ratios(rows: Sequence[Mapping[str, Any]]) -> List[str]:
  """'JAX / other' slices/s lines for every side measured beside a plain JAX side."""
  lines = []
  ref = {(r["model"], r["batch_size"], r["mode"]): r for r in rows if r["framework"] == "jax"}
  for r in rows:
    jax_row = ref.get((r["model"], r["batch_size"], r["mode"]))
    if jax_row is None or r is jax_row:
      continue
    lines.append(f"{r['model']} batch {r['batch_size']} {r['mode']}: jax / {r['framework']} = "
                 f"{jax_row['slices_per_s'] / r['slices_per_s']:.2f}x "
                 f"({jax_row['slices_per_s']:.2f} vs {r['slices_per_s']:.2f} slices/s)")
  return lines


def schedules(rows: Sequence[Mapping[str, Any]]) -> List[str]:
  """The paper's schedule at each measured train rate."""
  return [f"{r['model']} {r['framework']} batch {r['batch_size']}: {r['slices_per_s']:.1f} "
          f"slices/s -> the paper's 500-epoch schedule ({common.PAPER_SLICE_STEPS / 1e6:.2f} M "
          f"slice-steps) in {r['schedule_hours']:.2f} h" for r in rows if r["mode"] == "train"]


def case_latencies(args: argparse.Namespace) -> List[Dict[str, Any]]:
  """Each model's latency on one synthetic case, in this process (the workers have ended)."""
  from benchmarks import jax_bench  # pylint: disable=g-import-not-at-top
  return [{"kind": "case_latency", "model": model, **jax_bench.case_latency(
      model, _overrides_for(model, args.overrides), args.dtype, args.case_shape,
      args.case_batch, args.case_repeats)} for model in args.models]


def _print_breakdowns(rows: Sequence[Mapping[str, Any]]) -> None:
  for r in rows:
    if r.get("breakdown"):
      print(f"\n{r['model']} {r['framework']} {r['mode']} batch {r['batch_size']}: step time by "
            "part (profiler trace)")
      print(breakdown.format_breakdown(
          {b["part"]: b["share"] for b in r["breakdown"]}, r["step_s_median"],
          r["breakdown_modules"]))
      print()
      print(breakdown.format_breakdown(
          {b["part"]: b["share"] for b in r["breakdown_kinds"]}, r["step_s_median"],
          label="instruction kind"))
      # About 100% on a GPU, whose kernels fill the step; XLA:CPU runs instructions
      # concurrently on its threads, and their times (convolutions: dispatch to completion)
      # overlap, so there it is more.
      print(f"(traced instruction time {r['breakdown_traced_ms']:.1f} ms per step, "
            f"{100 * r['breakdown_traced_ms'] / 1e3 / r['step_s_median']:.0f}% of the step)")


def _append_json(path: Optional[str], rows: Sequence[Mapping[str, Any]]) -> None:
  if path:
    with open(path, "a") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")


def load_warning(load: float, cores: int) -> Optional[str]:
  """A warning line when other processes already keep every core busy. PyTorch's timings
  suffer most: its pool's threads wait for each other after every operation, so a step of
  the tiny U-Net (32x32, width 2, batch 2) took seconds at load 6 on 2 cores, 11 ms idle."""
  if load < cores:
    return None
  return (f"# warning: load average {load:.2f} on {cores} cores: other processes share the "
          "CPU, so these timings (PyTorch's most) are not those of an idle machine")


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
  """Runs the benchmark; returns its result rows (steps, then case latencies)."""
  args = parse_args(argv)
  load = os.getloadavg()
  print(f"# suite {args.suite}{' (dry run)' if args.dry_run else ''}: {len(args.models)} "
        f"model(s), batch {args.batch_sizes}, {args.size}x{args.size}, {args.dtype}, "
        f"{args.steps} steps after {args.warmup} warm-up; {common.cpu_threads()} CPU threads; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
  print(f"# runtime settings: {runtime.describe() or 'none'}", flush=True)
  warning = load_warning(load[0], common.cpu_threads())
  if warning:
    print(warning, flush=True)
  rows: List[Dict[str, Any]] = []
  for model in args.models:
    for batch_size in args.batch_sizes:
      new = measure(model, batch_size, args)
      rows += new
      for r in new:
        print(f"# {r['model']} {r['framework']} {r['mode']} batch {r['batch_size']}: "
              f"{r['slices_per_s']:.2f} slices/s", flush=True)
      _append_json(args.json, new)
  cases = case_latencies(args) if args.case_shape else []
  _append_json(args.json, cases)
  print()
  print(common.format_table(rows))
  if args.markdown:
    print()
    print(common.format_markdown(rows))
  for lines in (ratios(rows), schedules(rows)):
    if lines:
      print()
      print("\n".join(lines))
  for c in cases:
    print(f"\n{c['model']}: segment one {'x'.join(map(str, c['case_shape']))} case "
          f"({c['slices']} slices, {c['case_batch']} per call) on {c['device']}: "
          f"{c['latency_s_median']:.3f} s median (first call, with compilation: "
          f"{c['first_call_s']:.1f} s)")
  _print_breakdowns(rows)
  load = os.getloadavg()
  print(f"\n# load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
  for r in rows + cases:
    print(json.dumps({k: v for k, v in r.items()
                      if k not in ("step_times_s", "breakdown_modules")}))
  return rows + cases


if __name__ == "__main__":
  runtime.configure()  # First: the allocator settings need a re-executed process.
  try:
    main()
  except common.WorkerError as e:
    sys.exit(f"benchmark failed: {e}")
