"""Process settings for the command-line entry points: on by default only what costs no memory.

- XLA flags (group `xla`, on by default): convolutions are routed away from XLA:CPU's YNNPACK
  path (`--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`), which is slower than
  the default convolution kernels for this project's layer shapes. XLA reads XLA_FLAGS once,
  when JAX initialises its backends, so they must be in the environment before that.
- glibc malloc tuning (group `malloc`, opt-in): a high mmap threshold, no trimming, a large top
  pad and a single arena keep XLA's per-step buffers in the heap for reuse instead of faulting
  them in anew every step. Faster by the figure in BENCHMARKS.md ("Memory"), but the heap never
  shrinks and fragments: a half-width run held 2-3x the memory of the default and kept growing
  between validations, so it is no default. glibc reads these only at process start, so
  `configure` re-executes the process once with them set.
- Transparent huge pages for the heap (group `hugepages`, opt-in: `glibc.malloc.hugetlb=1`,
  glibc >= 2.35): 2 MiB pages instead of 4 KiB ones. With the never-trimmed heap it took a
  half-width run past 24 GB. Alone it used the default's memory and less CPU time per slice
  while memory was plentiful, but made the step 2.6x slower when the machine's memory was
  full and the kernel had to compact it to find huge pages (BENCHMARKS.md, "Memory").

Call `configure()` first thing in a command's entry point, before anything imports JAX:

    def run():
      from msatt_jax import runtime
      runtime.configure()
      ...

Variables already set by the user are kept as they are. MSATT_RUNTIME_DEFAULTS chooses the
groups: unset or 'default' (xla), 'all', 'none', or a comma list such as 'xla,malloc'.
"""

import os
import sys
import warnings
from typing import Dict, Mapping, MutableMapping, Optional, Sequence, Tuple

OPT_ENV = "MSATT_RUNTIME_DEFAULTS"  # 'default' | 'all' | 'none' | comma list of GROUPS.
GROUPS = ("xla", "malloc", "hugepages")
DEFAULT_GROUPS = ("xla",)  # The groups that cost no memory (BENCHMARKS.md, "Memory").
# Set in the re-executed process so it never re-executes again.
REEXEC_MARK = "MSATT_RUNTIME_REEXECUTED"

XLA_FLAGS: Tuple[str, ...] = (
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
)

_GIB = 1 << 30
MALLOC_ENV: Dict[str, str] = {
    # Serve allocations up to 4 GiB from the heap, not from fresh mmap()s (the default
    # threshold is 128 KiB, raised dynamically only up to 32 MiB).
    "MALLOC_MMAP_THRESHOLD_": str(4 * _GIB),
    # Never give freed heap memory back to the kernel: the next step reuses it.
    "MALLOC_TRIM_THRESHOLD_": str(64 * _GIB),
    # Grow the heap in large steps (address space only; pages are touched when used).
    "MALLOC_TOP_PAD_": str(1 * _GIB),
    # One arena, the sbrk heap: the other arenas are built of 64 MiB mmapped heaps that cannot
    # hold XLA's larger buffers, which would fall back to mmap() from XLA's worker threads.
    "MALLOC_ARENA_MAX": "1",
}


# A glibc tunable, appended to any GLIBC_TUNABLES the user set (unless they set this one).
TUNABLES_ENV = "GLIBC_TUNABLES"
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def enabled_groups(environ: Optional[Mapping[str, str]] = None) -> Tuple[str, ...]:
  """The setting groups MSATT_RUNTIME_DEFAULTS asks for (DEFAULT_GROUPS when unset)."""
  environ = os.environ if environ is None else environ
  value = environ.get(OPT_ENV, "default").strip().lower()
  if value in ("", "default"):
    return DEFAULT_GROUPS
  if value in ("all", "1", "true", "yes"):
    return GROUPS
  if value in ("none", "0", "false", "no"):
    return ()
  groups = tuple(g.strip() for g in value.split(",") if g.strip())
  unknown = sorted(set(groups) - set(GROUPS))
  if unknown:
    raise ValueError(f"{OPT_ENV}={value!r}: unknown group(s) {unknown}; use 'all', 'none' or a "
                     f"comma list of {', '.join(GROUPS)}.")
  return groups


def with_xla_flags(current: str, flags: Sequence[str] = XLA_FLAGS) -> str:
  """`current` XLA_FLAGS plus each flag of `flags` whose name it does not already set."""
  names = {f.split("=", 1)[0] for f in current.split()}
  extra = [f for f in flags if f.split("=", 1)[0] not in names]
  return " ".join([current.strip()] + extra if current.strip() else extra)


def _jax_backend_initialized() -> bool:
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return True  # Cannot tell: assume the worst, so the caller warns.


def apply_environment(environ: MutableMapping[str, str],
                      groups: Sequence[str] = GROUPS) -> Tuple[str, ...]:
  """Adds the settings of `groups` to `environ` (user values win); returns the variables set."""
  changed = []
  if "xla" in groups:
    flags = with_xla_flags(environ.get("XLA_FLAGS", ""))
    if flags != environ.get("XLA_FLAGS", ""):
      environ["XLA_FLAGS"] = flags
      changed.append("XLA_FLAGS")
  if "malloc" in groups and sys.platform.startswith("linux"):
    for name, value in MALLOC_ENV.items():
      if name not in environ:
        environ[name] = value
        changed.append(name)
  if "hugepages" in groups and sys.platform.startswith("linux"):
    tunables = [t for t in environ.get(TUNABLES_ENV, "").split(":") if t]
    name = HUGEPAGE_TUNABLE.split("=", 1)[0]
    if not any(t.split("=", 1)[0] == name for t in tunables):
      environ[TUNABLES_ENV] = ":".join(tunables + [HUGEPAGE_TUNABLE])
      changed.append(TUNABLES_ENV)
  return tuple(changed)


def strip_environment(environ: MutableMapping[str, str]) -> None:
  """Removes this module's settings from `environ` (to measure without them)."""
  kept = [f for f in environ.get("XLA_FLAGS", "").split() if f not in XLA_FLAGS]
  if kept:
    environ["XLA_FLAGS"] = " ".join(kept)
  else:
    environ.pop("XLA_FLAGS", None)
  for name, value in MALLOC_ENV.items():
    if environ.get(name) == value:
      del environ[name]
  tunables = [t for t in environ.get(TUNABLES_ENV, "").split(":") if t and t != HUGEPAGE_TUNABLE]
  if tunables:
    environ[TUNABLES_ENV] = ":".join(tunables)
  else:
    environ.pop(TUNABLES_ENV, None)


def configure(reexec: bool = True) -> None:
  """Applies the fast defaults to this process; may re-execute it once (see the module doc).

  reexec=False sets the variables without re-executing: the XLA flags still take effect if JAX
  has not initialised its backends, the malloc ones only in child processes.
  """
  groups = enabled_groups()
  if not groups:
    return
  if "xla" in groups and _jax_backend_initialized():
    warnings.warn("runtime.configure() was called after JAX initialised its backends; the XLA "
                  "flags it sets take effect only in child processes.", stacklevel=2)
  changed = apply_environment(os.environ, groups)
  # glibc reads its allocator settings only when the process starts.
  needs_restart = any(name.startswith("MALLOC_") or name == TUNABLES_ENV for name in changed)
  # An interactive session (no script) would lose its state: it keeps the default allocator.
  interactive = sys.flags.interactive or not sys.argv or not sys.argv[0]
  if reexec and needs_restart and not interactive and not os.environ.get(REEXEC_MARK):
    os.environ[REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    # sys.orig_argv is the interpreter's own command line (with -m, -X, ...), so the new
    # process starts exactly as this one did.
    argv = list(getattr(sys, "orig_argv", [sys.executable] + sys.argv))
    os.execv(sys.executable, [sys.executable] + argv[1:])


def describe(environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
  """The settings in force, for benchmark records."""
  environ = os.environ if environ is None else environ
  keys = ("XLA_FLAGS", *MALLOC_ENV, TUNABLES_ENV, OPT_ENV)
  return {k: environ[k] for k in keys if k in environ}
