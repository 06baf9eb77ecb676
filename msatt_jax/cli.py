"""What every command-line entry point shares: clean error exits and TensorFlow kept off GPUs."""

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


def run_or_exit(fn: Callable[[], T]) -> T:
  """Runs fn; a user-facing error becomes 'error: <message>' on stderr and exit status 1."""
  try:
    return fn()
  except _USER_ERRORS as e:
    logging.debug("Traceback:", exc_info=True)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
