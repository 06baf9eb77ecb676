"""The one command-line convention of every msatt-jax command, at the bottom of the layers.

Each command module has `define_flags()` (absl flags, defined only here, so importing the module
is safe) and `main(argv)` (the work), and its console-script entry is

  def run():
    cli.run_command(main, define_flags)

`run_command` parses the flags (an unknown `--config.<key>` becomes one line, not a traceback),
keeps TensorFlow off accelerators, sets up the console log, and turns a user-facing error into
`error: <message>` on stderr and exit status 1. The data commands (`prepare`, `synthetic`) call
it from here; the model commands call msatt_jax/cli.py, which adds JAX's runtime defaults and
the checkpoint reader's log filters on top of it.
"""

import logging as py_logging
import os
import signal
import sys
from typing import Any, Callable, Sequence

from absl import flags
from absl import logging

# Errors that describe bad input or a bad request: printed as one line, no traceback.
# (DataError and CheckpointMismatchError are ValueErrors; CheckpointSaveError is an OSError.)
USER_ERRORS = (ValueError, OSError, FloatingPointError)


class CommandExit(Exception):
  """Ends a command with a message on stderr and a chosen exit status (not 1 and not a
  traceback): for example a preempted run's 128 + signal."""

  def __init__(self, message: str, exit_status: int):
    super().__init__(message)
    self.exit_status = exit_status


def hide_accelerators_from_tensorflow() -> None:
  """tf.data runs on the CPU: TensorFlow must never reserve GPU memory JAX needs.

  The modules that use TensorFlow import it at their top, so by the time a command's `main`
  runs it is loaded wherever it will be used; a command without it does not pay its import.
  """
  if "tensorflow" not in sys.modules:
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # Already initialised: its devices were hidden by an earlier call.
    pass


class _QuietLibraries(py_logging.Filter):
  """Keeps the console to the run's own progress: library INFO chatter (Orbax logs every save
  step by step) is dropped; their warnings and errors still show."""

  _NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}jax{os.sep}",
            f"{os.sep}tensorflow_datasets{os.sep}")

  # Library warnings that report the project's normal operation, not something to act on:
  # Orbax on every read-only restore (evaluate, predict), TFDS on a folder being prepared.
  _EXPECTED_WARNINGS = ("CheckpointManagerOptions.read_only=True",
                        "Given directory is read only",
                        "Variant folder %s has no %s")

  def filter(self, record: py_logging.LogRecord) -> bool:
    if any(str(record.msg).startswith(w) for w in self._EXPECTED_WARNINGS):
      return False
    return record.levelno >= py_logging.WARNING or not any(
        part in record.pathname for part in self._NOISY)


def setup_logging() -> None:
  """Console progress at INFO for the project's own messages (a second call changes nothing)."""
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


def fail(message: str, exit_status: int = 1) -> None:
  """Prints `error: message` and exits: the one way a command reports a failure."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(exit_status)


def run_or_exit(fn: Callable[[], Any]) -> Any:
  """Runs fn; a user-facing error becomes 'error: <message>' on stderr and exit status 1."""
  try:
    return fn()
  except CommandExit as e:
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(e.exit_status)
  except USER_ERRORS as e:
    logging.debug("Traceback:", exc_info=True)
    fail(str(e))
  except KeyboardInterrupt:
    print("Interrupted; nothing this command was writing is left half-written.",
          file=sys.stderr, flush=True)
    sys.exit(128 + signal.SIGINT)


def config_key_error(argv: Sequence[str], error: Exception) -> str:
  """One line naming the --config.<key> override that names no key of the config."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]  # ml_collections wraps a KeyError into an AttributeError.
  text = " ".join(str(error.args[0] if error.args else error).split())
  overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
  key = text.split("'")[1] if text.count("'") >= 2 else ""
  culprit = next((o for o in overrides if o.split(".")[-1] == key), None)
  where = culprit or (", ".join(overrides) if overrides else "--config")
  return f"{where}: the config has no key {text}"


# Flags defined through define_typed_flag belong to the module that calls it (listed by the
# command's --help), not to this one.
flags.disclaim_key_flags()
# absl's definer for a flag of values of a type (any other type's values are strings).
_DEFINERS = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, tuple: flags.DEFINE_list}


def define_typed_flag(name: str, kind: type, default: Any, help_text: str,
                      choices: Sequence[str] = ()) -> None:
  """--name: one of `choices` where given, else a value of `kind` (a tuple as a comma list)."""
  if choices:
    flags.DEFINE_enum(name, default, choices, help_text)
  else:
    _DEFINERS.get(kind, flags.DEFINE_string)(name, default, help_text)


def parse_flags(argv: Sequence[str]) -> Sequence[str]:
  """absl's flag parsing, with an unknown --config key reported in one line, not a traceback."""
  from absl import app  # pylint: disable=g-import-not-at-top
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    fail(config_key_error(argv, e))


def run_command(main: Callable[[Sequence[str]], Any], define_flags: Callable[[], None], *,
                setup: Callable[[], None] = setup_logging) -> None:
  """The console-script entry of a command: flags, `setup` (the console log), the error
  convention."""
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()

  def command(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      fail(f"unexpected arguments: {' '.join(argv[1:])} (flags take the form --name=value)")
    hide_accelerators_from_tensorflow()
    setup()
    run_or_exit(lambda: main(argv))

  app.run(command, flags_parser=parse_flags)
