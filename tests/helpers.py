"""What many test files need: the repository root, running a command, its `error: ...` line.

Imported as `import helpers` (pytest puts tests/ on the path, as for `from conftest import`).
"""

import os
from pathlib import Path
import subprocess
import sys
from typing import Dict, List, Mapping, Optional

REPO = Path(__file__).resolve().parents[1]


def run_python(*args, cwd=REPO, env: Optional[Mapping[str, str]] = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
  """`python <args>` in the repository root, its output captured as text; never raises on
  a failing status (the tests read it)."""
  return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def run_module(module: str, *args, **kwargs) -> subprocess.CompletedProcess:
  """`python -m <module> <args>`, as `run_python`."""
  return run_python("-m", module, *args, **kwargs)


def with_repo_on_path(env: Mapping[str, str]) -> Dict[str, str]:
  """`env` with the repository first on PYTHONPATH (for commands run outside its root)."""
  env = dict(env)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  return env


def error_lines(text: str) -> List[str]:
  """The `error: ...` lines of a command's output (libraries may write other lines too)."""
  return [line for line in text.splitlines() if line.startswith("error: ")]


def one_error_line(text: str) -> str:
  """The one `error: ...` line of `text`; fails unless there is exactly one."""
  lines = error_lines(text)
  assert len(lines) == 1, text[-3000:]
  return lines[0]


def error_line(proc: subprocess.CompletedProcess) -> str:
  """The line a failed command reports in, under the commands' convention: exit status 1, no
  traceback, exactly one `error: ...` line on stderr."""
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return one_error_line(proc.stderr)


def start_lock_holder(module: str, path) -> subprocess.Popen:
  """A process holding `<module>.hold(path)` (e.g. 'data_pipelines.locks') until a line is
  written to its stdin, or it is killed."""
  code = (f"import sys\nimport {module} as lock\nwith lock.hold(sys.argv[1]):\n"
          "  print('holding', flush=True)\n  sys.stdin.readline()\n")
  proc = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=REPO,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "holding"
  return proc
