"""What a run holds: the working-set estimate, the check against free memory, the RSS text."""

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msatt_jax import memory
from msatt_jax import parallel

GB = 10**9


def _working_set(**kw):
  fields = dict(process=GB, train_step=3 * GB, eval_step=GB // 2, pipeline=GB // 4,
                on_device=False)
  fields.update(kw)
  return memory.WorkingSet(**fields)


def test_the_host_total_counts_the_larger_step_only_on_the_host():
  assert _working_set().host_total == GB + 3 * GB + GB // 4
  assert _working_set(on_device=True).host_total == GB + GB // 4
  assert "4.2 GB of host memory" in _working_set().describe()


def test_a_run_that_fits_passes_and_one_that_does_not_is_refused_with_the_numbers():
  ws = _working_set()
  # Only the growth beyond what is resident must be free: 3.25 GB.
  assert memory.check_fits(ws, refuse=True, available=int(3.3 * GB)) is None
  with pytest.raises(memory.TooLargeError, match=r"needs about 4\.2 GB .* only 3\.0 GB are free"
                     r".*--config\.memory_check=False"):
    memory.check_fits(ws, refuse=True, available=2 * GB)
  reason = memory.check_fits(ws, refuse=False, available=2 * GB)
  assert reason.startswith("this run needs about 4.2 GB")
  assert isinstance(memory.TooLargeError("x"), ValueError)  # One `error:` line in commands.


def test_step_bytes_are_temporaries_and_outputs_that_reuse_no_donated_input():
  stats = types.SimpleNamespace(temp_size_in_bytes=100, output_size_in_bytes=40,
                                alias_size_in_bytes=30)
  assert memory.step_bytes(stats) == 110
  assert memory.step_bytes(None) == 0


def test_compiled_step_memory_is_xlas_analysis_of_the_step_it_runs():
  def step(state, batch):
    h = jnp.tanh(batch["x"] @ state)
    return state + h.sum(), {"mean": h.mean()}

  compiled = parallel.CompiledStep(jax.jit(step, donate_argnums=(0,)), lambda b: b)
  state, batch = jnp.ones((64, 64)), {"x": np.ones((256, 64), np.float32)}
  stats = compiled.memory(state, batch)
  assert stats.alias_size_in_bytes == 64 * 64 * 4  # The donated state is reused.
  assert memory.step_bytes(stats) > 0
  new_state, metrics = compiled(state, batch)
  assert new_state.shape == (64, 64) and float(metrics["mean"]) > 0


def test_usage_text_reports_the_resident_set():
  text = memory.usage_text()
  assert re.fullmatch(r"rss \d+\.\d GB", text), text  # No device memory on the CPU.
  assert memory.rss_bytes() > 50 * 10**6


def test_release_free_heap_returns_freed_pages_to_the_kernel():
  import sys
  if not sys.platform.startswith("linux"):
    pytest.skip("glibc's malloc_trim")
  # Many small blocks (below the mmap threshold) come from the heap and stay there when freed.
  # ~0.5 GB of heap blocks, each followed by a small block that stays: the freed ones are holes
  # inside the heap, which glibc's own trimming at free() (the heap's top only) never returns.
  blocks, pins = [], []
  for _ in range(8000):
    blocks.append(bytearray(64 * 1024))
    pins.append(bytearray(1024))
  del blocks
  held = memory.rss_bytes()
  memory.release_free_heap()
  assert memory.rss_bytes() < held - 300 * 10**6
  del pins
