"""Memory and speed of the trainer under each runtime setting, run as a user runs it.

  python -m benchmarks.memory [--source_dir=DIR] [--data_dir=DIR] [--config=configs/brats18.py] \
      [--steps 80] [--eval_every_steps 25] [--batch_size 16] \
      [--settings default,all,xla+malloc,xla,none] [--rounds 1] \
      [--override model.lstm_features=16 ...] [--rss_limit_gb 20]

Each run is `python -m msatt_jax.train` in a fresh workdir, in its own process, with
MSATT_RUNTIME_DEFAULTS set to one setting (a group list of msatt_jax/runtime.py joined by '+', or
'default' for the runtime's own defaults, whatever they are). Runs of the settings alternate
(A B C, A B C, ... for --rounds) so that a changing machine load hits all of them alike. The
driver samples each run's resident set size, notes it when a validation ends (the trainer's
validation line), and kills a run whose RSS passes --rss_limit_gb before the kernel's OOM killer
would take the machine down with it. It prints, per run: the peak RSS (the kernel's high-water
mark of the process), the RSS after each validation and its growth from the first to the last,
training slices/s (the median of the trainer's progress lines after the first, which holds the
compilation), the trainer's CPU time per training slice (user + system between progress lines
with no validation between them: what the allocator settings change, and much less dependent on
other load than the wall-clock rate), and the trainer's own working-set estimate with its
parts (XLA's buffers of the train and eval steps, the input pipeline's buffers, the process
before training), so that the allocator's slack is the peak minus the estimate.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

from benchmarks import common
from msatt_jax import runtime

_GB = 1e9
_RATE = re.compile(r"([0-9.]+) slices/s")
_VALIDATION = re.compile(r"step (\d+) validation Dice")
_ESTIMATE = re.compile(r"Working set: (.*)$")
_STEP = re.compile(r"step (\d+)/\d+")


def _cpu_seconds(ps) -> Optional[float]:
  """User + system CPU seconds of the process and its threads (None once it has ended)."""
  import psutil  # pylint: disable=g-import-not-at-top
  try:
    t = ps.cpu_times()
  except psutil.Error:
    return None
  return t.user + t.system


def run_env(setting: str) -> Dict[str, str]:
  """The environment of a trainer that gets the runtime setting `setting`."""
  env = common.runtime_env("default" if setting == "default" else setting.replace("+", ","))
  env["PYTHONUNBUFFERED"] = "1"
  return env


def train_command(args: argparse.Namespace, workdir: str) -> List[str]:
  cmd = [sys.executable, "-m", "msatt_jax.train", f"--config={args.config}",
         f"--workdir={workdir}", f"--config.num_train_steps={args.steps}",
         f"--config.eval_every_steps={args.eval_every_steps}",
         f"--config.log_every_steps={args.log_every_steps}",
         f"--config.batch_size={args.batch_size}"]
  if args.source_dir:
    cmd.append(f"--config.data.source_dir={args.source_dir}")
  if args.data_dir:
    cmd.append(f"--config.data.data_dir={args.data_dir}")
  cmd += [f"--config.{o}" for o in args.override]
  return cmd


def measure_run(args: argparse.Namespace, setting: str) -> Dict[str, object]:
  """One training run under `setting`: its RSS over time, rates and the trainer's estimate."""
  import psutil  # pylint: disable=g-import-not-at-top
  workdir = tempfile.mkdtemp(prefix="msatt_memory_")
  limit = int(args.rss_limit_gb * _GB)
  record: Dict[str, object] = {"setting": setting, "rss_after_validation_gb": [],
                               "rates": [], "cpu_ms_per_slice": [], "estimate": None,
                               "killed": False}
  # (step, CPU seconds of the trainer) at its last progress line; None after a validation,
  # so that no interval holds validation or compilation.
  last: List[Optional[tuple]] = [None]
  rss = {"now": 0, "peak": 0}
  lines: List[str] = []
  start = time.perf_counter()
  proc = subprocess.Popen(train_command(args, workdir), cwd=common.REPO_ROOT,
                          env=run_env(setting), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  ps = psutil.Process(proc.pid)

  def sample() -> None:
    while proc.poll() is None:
      try:
        rss["now"] = ps.memory_info().rss
      except psutil.Error:
        break
      rss["peak"] = max(rss["peak"], rss["now"])
      if rss["now"] > limit and not record["killed"]:
        record["killed"] = True
        proc.kill()
      time.sleep(0.1)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  for line in proc.stdout:
    lines.append(line)
    if args.verbose:
      sys.stderr.write(line)
    if "slices/s" in line and (m := _RATE.search(line)):
      record["rates"].append(float(m.group(1)))
      step, cpu = int(_STEP.search(line).group(1)), _cpu_seconds(ps)
      if last[0] is not None and cpu is not None and step > last[0][0]:
        record["cpu_ms_per_slice"].append(
            1000 * (cpu - last[0][1]) / ((step - last[0][0]) * args.batch_size))
      last[0] = (step, cpu) if cpu is not None else None
    if _VALIDATION.search(line):
      last[0] = None
      record["rss_after_validation_gb"].append(rss["now"] / _GB)
    if m := _ESTIMATE.search(line):
      record["estimate"] = m.group(1).strip()
  # The kernel's high-water mark of the process (its re-executed self has the same pid).
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  sampler.join()
  record["peak_rss_gb"] = max(rss["peak"], usage.ru_maxrss * 1024) / _GB
  record["exit"] = proc.returncode
  record["wall_s"] = time.perf_counter() - start
  rates = record["rates"][1:]  # The first interval holds the compilation.
  record["slices_per_s"] = statistics.median(rates) if rates else float("nan")
  cpu = record["cpu_ms_per_slice"]
  record["cpu_ms_per_slice_median"] = statistics.median(cpu) if cpu else float("nan")
  if proc.returncode != 0 and not record["killed"]:
    record["tail"] = "".join(lines[-15:])
  shutil.rmtree(workdir, ignore_errors=True)
  return record


def print_table(records: List[Dict[str, object]]) -> None:
  print("| setting | peak RSS GB | RSS after each validation GB | growth first->last | "
        "train slices/s | train CPU ms/slice | wall s | exit |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in records:
    after = r["rss_after_validation_gb"]
    growth = (f"{100 * (after[-1] / after[0] - 1):+.1f}%" if len(after) > 1 else "-")
    exit_text = ("killed at the RSS limit" if r["killed"] else str(r["exit"]))
    print(f"| {r['setting']} | {r['peak_rss_gb']:.2f} | "
          f"{' / '.join(f'{x:.2f}' for x in after) or '-'} | {growth} | "
          f"{r['slices_per_s']:.2f} | {r['cpu_ms_per_slice_median']:.0f} | "
          f"{r['wall_s']:.0f} | {exit_text} |")
  print()
  for r in records:
    if r["estimate"]:
      print(f"{r['setting']}: the trainer's estimate: {r['estimate']}")
    if r.get("tail"):
      print(f"{r['setting']}: the run failed; its last lines:\n{r['tail']}")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
  import psutil  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/brats18.py")
  parser.add_argument("--source_dir", default=None,
                      help="Raw NIfTI folder of the cases (default: the config's synthetic "
                           "cases, generated in each run's workdir).")
  parser.add_argument("--data_dir", default=None, help="Prepared data (default: the trainer's).")
  parser.add_argument("--steps", type=int, default=80)
  parser.add_argument("--eval_every_steps", type=int, default=25)
  parser.add_argument("--log_every_steps", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=16, help="The runs' batch size.")
  parser.add_argument("--settings", default="default,all,xla+malloc,xla,none",
                      help="Comma list of runtime settings: 'default' or groups joined by '+'.")
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--override", action="append", default=[],
                      help="A config override KEY=VALUE (without --config.), repeatable.")
  parser.add_argument("--rss_limit_gb", type=float,
                      default=0.85 * psutil.virtual_memory().available / _GB,
                      help="Kill a run whose RSS passes this (default: 85%% of what is free).")
  parser.add_argument("--verbose", action="store_true", help="Echo the trainers' output.")
  args = parser.parse_args(argv)
  args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
  for setting in args.settings:
    if setting != "default":
      runtime.enabled_groups({runtime.OPT_ENV: setting.replace("+", ",")})
  return args


def main(argv: Optional[List[str]] = None) -> List[Dict[str, object]]:
  args = parse_args(argv)
  print(f"# {' '.join(train_command(args, 'WORKDIR'))}", flush=True)
  print(f"# settings {', '.join(args.settings)}; {args.rounds} round(s); RSS limit "
        f"{args.rss_limit_gb:.1f} GB; load average {os.getloadavg()[0]:.2f}", flush=True)
  records = []
  for round_index in range(args.rounds):
    for setting in args.settings:
      record = measure_run(args, setting)
      record["round"] = round_index
      records.append(record)
      print(f"# round {round_index + 1} {setting}: peak {record['peak_rss_gb']:.2f} GB, "
            f"{record['slices_per_s']:.2f} slices/s, "
            f"{record['cpu_ms_per_slice_median']:.0f} CPU ms/slice, exit {record['exit']}, "
            f"load {os.getloadavg()[0]:.2f}", flush=True)
  print()
  print_table(records)
  load = os.getloadavg()
  print(f"\n# load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
  return records


if __name__ == "__main__":
  main()
