"""The command-line convention of the model commands: data_pipelines/cli.py's, run after JAX's
runtime defaults.

Each command module has `define_flags()`, `main(argv)` and the console-script entry

  def run():
    cli.run_command(main, define_flags)

`run_command` applies the runtime defaults (msatt_jax/runtime.py) before JAX loads, then runs
the command as data_pipelines.cli.run_command does: flags, TensorFlow kept off accelerators,
the console log (`setup_logging`), and a user-facing error as `error: <message>` and exit
status 1.
"""

import logging as py_logging
import sys
from typing import Any, Callable, Sequence

from data_pipelines import cli as base
from data_pipelines.cli import CommandExit  # pylint: disable=unused-import (the commands raise it)


class _DropClosedLoopErrors:
  """An unraisable hook that drops the 'Event loop is closed' errors of TensorStore reads still
  in flight when a failed restore has closed Orbax's event loop (one traceback per array,
  hundreds on a console that should carry one error line); passes anything else on."""

  def __init__(self, previous: Callable[[Any], None]):
    self.previous = previous

  def __call__(self, unraisable: Any) -> None:
    if not (isinstance(unraisable.exc_value, RuntimeError) and
            str(unraisable.exc_value) == "Event loop is closed"):
      self.previous(unraisable)


class _DropOrphanedReadErrors(py_logging.Filter):
  """Drops asyncio's 'Task exception was never retrieved' for Orbax's array reads.

  When one array of a damaged checkpoint fails to read, Orbax raises that error (which the
  restore reports) and leaves its sibling reads' errors unretrieved; asyncio logs each one with
  a traceback whenever its task happens to be collected. Other tasks' errors still show.
  """

  def filter(self, record: py_logging.LogRecord) -> bool:
    message = record.getMessage()
    return not (message.startswith("Task exception was never retrieved") and
                "async_deserialize" in message)


def setup_logging() -> None:
  """The console log of a model command: the data commands' (the project's progress at INFO),
  without the leftovers of a failed checkpoint restore. A second call changes nothing."""
  base.setup_logging()
  if not isinstance(sys.unraisablehook, _DropClosedLoopErrors):
    sys.unraisablehook = _DropClosedLoopErrors(sys.unraisablehook)
  asyncio_log = py_logging.getLogger("asyncio")
  if not any(isinstance(f, _DropOrphanedReadErrors) for f in asyncio_log.filters):
    asyncio_log.addFilter(_DropOrphanedReadErrors())


def run_command(main: Callable[[Sequence[str]], Any], define_flags: Callable[[], None], *,
                runtime_defaults: bool = True) -> None:
  """The console-script entry of a command: runtime defaults, flags, the error convention."""
  if runtime_defaults:
    from msatt_jax import runtime  # pylint: disable=g-import-not-at-top
    runtime.configure()  # A no-op when the module's own `__main__` guard already ran it.
  base.run_command(main, define_flags, setup=setup_logging)
