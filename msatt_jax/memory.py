"""What a run holds in memory: the process's resident set, the devices' memory, and the working
set a training run will need, checked against the machine before the first step.

The estimate adds what XLA's memory analysis says the compiled steps allocate (temporaries and
outputs that do not reuse a donated input) to what the input pipeline holds
(`input_pipeline.buffer_bytes`) and to the process as it is just before training (libraries,
compiled code, the train state). It is what a run needs with the allocator returning freed
memory; measured peaks are in BENCHMARKS.md ("Memory").
"""

import ctypes
import ctypes.util
import dataclasses
import functools
from typing import Any, Optional

import jax
import psutil

_GB = 1e9


def rss_bytes() -> int:
  """This process's resident set size."""
  return psutil.Process().memory_info().rss


@functools.lru_cache(maxsize=None)
def _malloc_trim() -> Optional[Any]:
  """glibc's malloc_trim, where the C library is glibc (None elsewhere)."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc.malloc_trim
  except (OSError, AttributeError):
    return None


def release_free_heap() -> None:
  """Gives the pages the allocator holds free back to the kernel (glibc's malloc_trim).

  Validation, checkpoint writes and the input pipeline's threads free memory that glibc keeps
  in its arenas; without this the RSS after each validation crept up by a fifth over a run
  while nothing was in use (BENCHMARKS.md, "Memory"). It takes milliseconds.
  """
  trim = _malloc_trim()
  if trim is not None:
    trim(0)


def device_bytes_in_use() -> Optional[int]:
  """Memory in use on the local devices, where they report it (GPUs); None on the CPU."""
  total, reported = 0, False
  for device in jax.local_devices():
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_in_use" in stats:
      total += int(stats["bytes_in_use"])
      reported = True
  return total if reported else None


def usage_text() -> str:
  """'rss 3.1 GB' (and ', device 5.0 GB' where the devices report it): for progress lines."""
  text = f"rss {rss_bytes() / _GB:.1f} GB"
  device = device_bytes_in_use()
  return text if device is None else f"{text}, device {device / _GB:.1f} GB"


def step_bytes(stats: Any) -> int:
  """Bytes one execution of a compiled step allocates: its temporaries and its outputs, less
  the outputs that reuse donated inputs (the train state)."""
  if stats is None:
    return 0
  return int(stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes)


@dataclasses.dataclass(frozen=True)
class WorkingSet:
  """A training run's memory, in bytes, estimated before its first step."""
  process: int  # Resident before training: libraries, compiled code, the train state.
  train_step: int  # XLA's allocations of one train step.
  eval_step: int  # XLA's allocations of one validation step (never at once with a train step).
  pipeline: int  # The input pipeline's buffers (shuffle, read-ahead, batches in flight).
  on_device: bool  # The steps' memory is on accelerators, not in this process's RSS.

  @property
  def host_total(self) -> int:
    steps = 0 if self.on_device else max(self.train_step, self.eval_step)
    return self.process + self.pipeline + steps

  def describe(self) -> str:
    where = "device" if self.on_device else "host"
    return (f"{self.host_total / _GB:.1f} GB of host memory = process {self.process / _GB:.1f} "
            f"+ input pipeline {self.pipeline / _GB:.1f}"
            + ("" if self.on_device else
               f" + steps {max(self.train_step, self.eval_step) / _GB:.1f}")
            + f" (train step {self.train_step / _GB:.2f} GB, eval step "
              f"{self.eval_step / _GB:.2f} GB on the {where})")


class TooLargeError(ValueError):
  """The run's working set exceeds the memory the machine has free."""


def check_fits(working_set: WorkingSet, refuse: bool,
               available: Optional[int] = None) -> Optional[str]:
  """None if the run fits the memory the machine has free; else the reason, raised as a
  TooLargeError when `refuse`, returned (for a warning) when not."""
  if available is None:
    available = psutil.virtual_memory().available
  # What is already resident is not in `available`: only the growth must fit.
  needed = working_set.host_total - working_set.process
  if needed <= available:
    return None
  reason = (f"this run needs about {working_set.host_total / _GB:.1f} GB "
            f"({working_set.describe()}) but only "
            f"{(available + working_set.process) / _GB:.1f} GB are free for it")
  if refuse:
    raise TooLargeError(
        f"{reason}. Lower --config.batch_size or the model's widths, lower "
        "--config.data.shuffle_buffer, or pass --config.memory_check=False to go ahead anyway.")
  return reason
