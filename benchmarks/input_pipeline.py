r"""Input-pipeline benchmark: preparation cost and training-batch throughput.

Usage:
  python -m benchmarks.input_pipeline [--cases 6] [--augment | --noaugment] [--runs 5] \
      [--batches 300] [--batch_size 16] [--compression none] [--workdir DIR]

Generates (or reuses) a synthetic set of N cases at 240x240x155 under --workdir, prepares it
afresh with the paper's preprocessing in a child process (python -m data_pipelines.prepare) and
prints: preparation seconds per case, the child's peak RSS, bytes on disk per slice and the
size extrapolated to the 285-case BraTS'18 set, and train-batch throughput in slices/s (the
median of --runs runs of --batches batches) without and with augmentation (only one of them
with --noaugment / --augment). Targets on a 2-core CPU: >= 2,000 slices/s without augmentation,
>= 500 with it, preparation RSS <= 2 GB. The load average and the pipeline's CPU time per
slice are printed too: wall-clock rates are only comparable on an otherwise idle machine, CPU
time per slice much less depends on what else runs.
"""

import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

from absl import app
from absl import flags

_FLAGS = flags.FLAGS
flags.DEFINE_integer("cases", 6, "Synthetic cases to generate and prepare.")
flags.DEFINE_bool("augment", None, "Measure only with (--augment) or only without "
                  "(--noaugment) augmentation; both when unset.")
flags.DEFINE_integer("runs", 5, "Throughput runs per setting (the median is reported).")
flags.DEFINE_integer("batches", 300, "Timed batches per run.")
flags.DEFINE_integer("batch_size", 16, "Global batch size.")
flags.DEFINE_enum("compression", "none", ["none", "zlib"], "Storage compression of images.")
flags.DEFINE_string("workdir", None, "Where the synthetic and prepared data go "
                    "(default: <tmp>/msatt_input_benchmark).")

SHAPE = (240, 240, 155)
PAPER_SLICES = 285 * 91  # 285 cases x slices 30..120.
WARMUP_BATCHES = 10


def _generate(workdir: Path, num_cases: int) -> Path:
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
  source = workdir / f"synthetic_msd_{num_cases}"
  start = time.perf_counter()
  synthetic.generate_dataset(source, "msd", num_cases, SHAPE, seed=0)
  print(f"synthetic data: {source} ({time.perf_counter() - start:.1f} s)", flush=True)
  return source


def _prepare(source: Path, data_dir: Path, compression: str) -> Dict[str, float]:
  """Runs the prepare CLI in a child; returns wall time, per-case seconds and peak RSS."""
  shutil.rmtree(data_dir, ignore_errors=True)
  command = [sys.executable, "-m", "data_pipelines.prepare", "--src", str(source),
             "--data_dir", str(data_dir), "--compression", compression]
  start = time.perf_counter()
  proc = subprocess.run(command, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - start
  if proc.returncode != 0:
    sys.stderr.write(proc.stdout + proc.stderr)
    raise SystemExit(f"preparation failed with exit code {proc.returncode}")
  per_case = [float(m) for m in re.findall(r"^case \d+/\d+ \S+: ([0-9.]+) s", proc.stdout,
                                           re.MULTILINE)]
  # ru_maxrss of waited-for children, in kB on Linux: only this child has run.
  peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  return {"wall": wall, "per_case": statistics.mean(per_case) if per_case else float("nan"),
          "peak_rss_mb": peak_kb / 1024}


def _throughput(data_config, augment: bool, runs: int, batches: int,
                batch_size: int) -> Tuple[List[float], List[float]]:
  """Slices/s (wall) and CPU ms per slice (all threads of this process) of each run."""
  from data_pipelines import input_pipeline  # pylint: disable=g-import-not-at-top
  data_config.augment = augment
  rates, cpu_ms = [], []
  for run in range(runs):
    iterator = input_pipeline.train_iterator(data_config, batch_size=batch_size, seed=run)
    for _ in range(WARMUP_BATCHES):
      next(iterator)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(batches):
      batch = next(iterator)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    assert batch["image"].shape[0] == batch_size
    rates.append(batches * batch_size / elapsed)
    cpu_ms.append(cpu / (batches * batch_size) * 1e3)
    print(f"  augment={augment} run {run + 1}/{runs}: {rates[-1]:.0f} slices/s, "
          f"{cpu_ms[-1]:.3f} CPU ms per slice", flush=True)
    del iterator
  return rates, cpu_ms


def main(argv) -> None:
  del argv
  workdir = Path(_FLAGS.workdir or os.path.join(tempfile.gettempdir(),
                                                "msatt_input_benchmark"))
  workdir.mkdir(parents=True, exist_ok=True)
  print(f"CPUs: {os.cpu_count()}, load average before: "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
  source = _generate(workdir, _FLAGS.cases)
  data_dir = workdir / f"prepared_{_FLAGS.compression}"
  prep = _prepare(source, data_dir, _FLAGS.compression)

  from configs import brats18  # pylint: disable=g-import-not-at-top
  from data_pipelines import input_pipeline  # pylint: disable=g-import-not-at-top
  from data_pipelines.brats import builder as builder_lib  # pylint: disable=g-import-not-at-top
  data = brats18.get_data_config()
  data.source_dir, data.data_dir = str(source), str(data_dir)
  data.compression = _FLAGS.compression
  builder = input_pipeline.prepared_builder(data)
  num_slices = sum(builder.info.splits[s].num_examples for s in builder_lib.SPLITS)
  total_bytes = builder_lib.prepared_bytes(builder)
  per_slice = total_bytes / num_slices

  modes = [False, True] if _FLAGS.augment is None else [bool(_FLAGS.augment)]
  results = {}
  for augment in modes:
    results[augment] = _throughput(data, augment, _FLAGS.runs, _FLAGS.batches,
                                   _FLAGS.batch_size)

  print("\n== input pipeline benchmark ==")
  print(f"cases {_FLAGS.cases} at {'x'.join(map(str, SHAPE))}, slices 30..120, crop 190, "
        f"float16, compression {_FLAGS.compression}")
  print(f"preparation: {prep['per_case']:.2f} s per case ({prep['wall']:.1f} s wall incl. "
        f"start-up), peak RSS {prep['peak_rss_mb']:.0f} MB (target <= 2048)")
  print(f"on disk: {per_slice / 1e3:.1f} kB per slice ({total_bytes / 1e6:.1f} MB for "
        f"{num_slices} slices); 285 cases x 91 slices: {per_slice * PAPER_SLICES / 1e9:.2f} GB "
        "(target <= 8)")
  for augment, (rates, cpu_ms) in results.items():
    target = 500 if augment else 2000
    cpu = statistics.median(cpu_ms)
    print(f"train batches of {_FLAGS.batch_size}x190x190x4, augment={augment}: median "
          f"{statistics.median(rates):.0f} slices/s over {len(rates)} runs of "
          f"{_FLAGS.batches} batches (min {min(rates):.0f}, max {max(rates):.0f}; "
          f"target >= {target}); {cpu:.3f} CPU ms per slice = {1e3 / cpu:.0f} slices per "
          "CPU-second")
  print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  app.run(main)
