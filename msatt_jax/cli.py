"""What every command-line entry point shares: clean error exits and TensorFlow kept off GPUs."""

import logging as py_logging
import os
import sys
from typing import Callable, TypeVar

from absl import logging

T = TypeVar("T")

# Errors that describe bad input or a bad request: printed as one line, no traceback.
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError,
                FloatingPointError, NotADirectoryError, IsADirectoryError)


def hide_accelerators_from_tensorflow() -> None:
  """tf.data runs on the CPU: TensorFlow must never reserve GPU memory JAX needs."""
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")


class _QuietLibraries(py_logging.Filter):
  """Keeps the console to the run's own progress: library INFO chatter (Orbax logs every save
  step by step) is dropped; their warnings and errors still show."""

  _NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}jax{os.sep}", f"{os.sep}tensorflow_datasets{os.sep}")

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or not any(
        part in record.pathname for part in self._NOISY)


def setup_logging() -> None:
  """Console progress at INFO for the project's own messages."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())


def run_or_exit(fn: Callable[[], T]) -> T:
  """Runs fn; a user-facing error becomes 'error: <message>' on stderr and exit status 1."""
  try:
    return fn()
  except _USER_ERRORS as e:
    logging.debug("Traceback:", exc_info=True)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
