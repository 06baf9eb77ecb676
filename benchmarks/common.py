"""What the benchmark's parts share: the peak figure, statistics, memory sampling, and the worker
protocol that lets one driver interleave steps of several frameworks (A B A B).

Each measured model runs in its own worker process: its memory high-water mark is its own, a
framework never shares a process (or an allocator heap) with another, and the driver can still
alternate single steps between workers so that a changing machine load hits all sides alike.
The driver sends one JSON command per line on the worker's stdin; the worker answers with one JSON
line on a private copy of its stdout (the real stdout is pointed at stderr, so that library
prints cannot corrupt the protocol).
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

# fp32 peak of the 2-core AMD Zen 4 (EPYC 9004, family 25 model 17) machine this project is
# developed on: 2 cores x 3.66 GHz (all-core boost) x 32 FP32 FLOP per cycle (Zen 4 has two
# 256-bit FMA pipes: 2 x 8 lanes x 2 FLOP; AVX-512 is executed as two 256-bit halves). Pass
# --peak_gflops for another machine.
DEFAULT_PEAK_GFLOPS = 2 * 3.66 * 32
# NVIDIA's datasheet figure for the H100 and H200 SXM (dense bfloat16 tensor cores): the
# GPU suite's default peak.
H100_BF16_DENSE_GFLOPS = 989_400.0

# The paper's schedule: 225 training patients x 91 slices x 500 epochs.
PAPER_SLICE_STEPS = 225 * 91 * 500

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_threads() -> int:
  """Cores this process may run on (what XLA's and PyTorch's thread pools size themselves to)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not Linux.
    return os.cpu_count() or 1


def runtime_env(groups: Optional[str]) -> Dict[str, str]:
  """This environment for a process that gets only the runtime groups `groups` (a comma list
  of msatt_jax/runtime.py's groups, 'default', 'all' or 'none'; None: the environment as it
  is). The settings are applied here, so the process starts with them and never re-executes."""
  from msatt_jax import runtime  # pylint: disable=g-import-not-at-top
  env = dict(os.environ)
  if groups is None:
    return env
  runtime.strip_environment(env)
  env[runtime.OPT_ENV] = groups
  runtime.apply_environment(env, runtime.enabled_groups(env))
  return env


def step_stats(times: Sequence[float]) -> Dict[str, float]:
  """Median, interquartile range, min and max of per-step wall times (seconds)."""
  t = np.asarray(times, np.float64)
  q25, q50, q75 = np.percentile(t, [25, 50, 75])
  return {"step_s_median": float(q50), "step_s_iqr": float(q75 - q25),
          "step_s_min": float(t.min()), "step_s_max": float(t.max())}


class PeakRSS:
  """Samples this process's resident set size in a background thread while active."""

  def __init__(self, interval_s: float = 0.005):
    import psutil  # pylint: disable=g-import-not-at-top
    self._process = psutil.Process()
    self._interval = interval_s
    self._peak = 0
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def __enter__(self) -> "PeakRSS":
    self._stop.clear()
    self._peak = max(self._peak, self._process.memory_info().rss)
    self._thread = threading.Thread(target=self._loop, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
    self._peak = max(self._peak, self._process.memory_info().rss)

  def _loop(self) -> None:
    while not self._stop.wait(self._interval):
      self._peak = max(self._peak, self._process.memory_info().rss)

  def reset(self) -> None:
    self._peak = 0

  @property
  def peak_bytes(self) -> int:
    return self._peak


def time_steps(step: Callable[[], Any], block: Callable[[Any], Any], steps: int,
               window: int = 1) -> List[float]:
  """Wall time per step of `steps` samples, each `window` consecutive steps blocked once."""
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    out = None
    for _ in range(window):
      out = step()
    block(out)
    times.append((time.perf_counter() - t0) / window)
  return times


# ------------------------------------------------------------------------------- worker side
def serve(factory: Callable[[Dict[str, Any]], Any]) -> None:
  """Worker main loop: `factory(spec)` builds the bench object; commands call its methods.

  Commands (one JSON object a line): {"cmd": "setup", "mode": m} -> bench.setup(m) (compile;
  a dict of facts), {"cmd": "run", "mode": m, "steps": n, "window": w} -> {"times": [...]},
  {"cmd": "memory", "mode": m} -> bench.memory(m), {"cmd": "breakdown", "mode": m, "steps": n,
  "trace_dir": d} -> bench.breakdown(m, n, d), {"cmd": "quit"}.
  """
  proto = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)  # Library prints (and C-level writes to fd 1) go to stderr.
  sys.stdout = sys.stderr
  spec = json.loads(sys.argv[1])

  def reply(obj: Mapping[str, Any]) -> None:
    proto.write(json.dumps(obj) + "\n")

  try:
    bench = factory(spec)
    reply({"ready": True, **bench.describe()})
  except Exception:  # pylint: disable=broad-except
    reply({"error": traceback.format_exc()})
    return
  for line in sys.stdin:
    msg = json.loads(line)
    try:
      if msg["cmd"] == "quit":
        reply({"bye": True})
        return
      if msg["cmd"] == "setup":
        reply(bench.setup(msg["mode"]))
      elif msg["cmd"] == "run":
        reply({"times": bench.run(msg["mode"], msg["steps"], msg.get("window", 1))})
      elif msg["cmd"] == "breakdown":
        reply(bench.breakdown(msg["mode"], msg["steps"], msg.get("trace_dir")))
      elif msg["cmd"] == "memory":
        reply(bench.memory(msg["mode"]))
      else:
        reply({"error": f"unknown command {msg['cmd']!r}"})
    except Exception:  # pylint: disable=broad-except
      reply({"error": traceback.format_exc()})


# ------------------------------------------------------------------------------- driver side
class WorkerError(RuntimeError):
  pass


class Worker:
  """A benchmark worker process driven over pipes (see `serve`)."""

  def __init__(self, module: str, spec: Mapping[str, Any], label: str,
               env: Optional[Mapping[str, str]] = None, python: Optional[str] = None):
    """`python`: the interpreter (and so the installed stack) the worker runs under."""
    self.label = label
    self.spec = dict(spec)
    self._log = tempfile.TemporaryFile(mode="w+")
    env = dict(os.environ if env is None else env)
    # The benchmarks package must be importable without an installed project.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    # Workers share the accelerator: JAX's default grab of 75% of its memory would leave the
    # next worker too little to compile.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    self._proc = subprocess.Popen(
        [python or sys.executable, "-m", module, json.dumps(self.spec)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=self._log, env=env, cwd=REPO_ROOT, text=True, bufsize=1)
    self.info = self._read()

  def _read(self) -> Dict[str, Any]:
    line = self._proc.stdout.readline()
    if not line:
      self._proc.wait()
      raise WorkerError(f"{self.label}: the worker exited (code {self._proc.returncode}):\n"
                        f"{self.log_tail()}")
    msg = json.loads(line)
    if "error" in msg:
      raise WorkerError(f"{self.label}: {msg['error']}\n{self.log_tail()}")
    return msg

  def call(self, cmd: str, **kwargs) -> Dict[str, Any]:
    self._proc.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
    self._proc.stdin.flush()
    return self._read()

  def log_tail(self, chars: int = 4000) -> str:
    self._log.flush()
    self._log.seek(0)
    return self._log.read()[-chars:]

  def close(self) -> None:
    if self._proc.poll() is None:
      try:
        self.call("quit")
      except (WorkerError, BrokenPipeError, OSError):
        pass
      try:
        self._proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait()
    self._log.close()


# ------------------------------------------------------------------------------------ output
_COLUMNS = (
    ("model", "model", "{}"),
    ("framework", "framework", "{}"),
    ("mode", "mode", "{}"),
    ("batch", "batch_size", "{}"),
    ("compile s", "compile_s", "{:.1f}"),
    ("step ms", None, None),  # Median ± half the interquartile range.
    ("slices/s", "slices_per_s", "{:.2f}"),
    ("GFLOP/step", "gflop_per_step", "{:.1f}"),
    ("GFLOP/s", "gflops_per_s", "{:.1f}"),
    ("% peak", "peak_percent", "{:.1f}"),
    ("peak mem MB", "peak_mem_mb", "{:.0f}"),
)


def _cells(rows: Sequence[Mapping[str, Any]]) -> List[List[str]]:
  table = [[c[0] for c in _COLUMNS]]
  for r in rows:
    line = []
    for _, key, fmt in _COLUMNS:
      if key is None:
        line.append(f"{1e3 * r['step_s_median']:.1f} ±{1e3 * r['step_s_iqr'] / 2:.1f}")
      else:
        v = r.get(key)
        line.append("-" if v is None else fmt.format(v))
    table.append(line)
  return table


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """The console table of result rows (text columns left-aligned, numbers right-aligned)."""
  table = _cells(rows)
  widths = [max(len(row[i]) for row in table) for i in range(len(_COLUMNS))]
  out = []
  for n, row in enumerate(table):
    out.append("  ".join(cell.rjust(w) if i >= 3 else cell.ljust(w)
                         for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    if n == 0:
      out.append("  ".join("-" * w for w in widths))
  return "\n".join(out)


def format_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  """The same table as GitHub markdown."""
  table = _cells(rows)
  md = ["| " + " | ".join(table[0]) + " |", "|" + "|".join(" --- " for _ in table[0]) + "|"]
  md += ["| " + " | ".join(row) + " |" for row in table[1:]]
  return "\n".join(md)
