"""The command-line convention of the model commands: data_pipelines/cli.py's, run after JAX's
runtime defaults.

Each command module has `define_flags()`, `main(argv)` and the console-script entry

  def run():
    cli.run_command(main, define_flags)

`run_command` applies the runtime defaults (msatt_jax/runtime.py) before JAX loads, then runs
the command as data_pipelines.cli.run_command does: flags, TensorFlow kept off accelerators,
the console log, and a user-facing error as `error: <message>` and exit status 1.
"""

from typing import Any, Callable, Sequence

from data_pipelines import cli as base
from data_pipelines.cli import CommandExit  # pylint: disable=unused-import (the commands raise it)


def setup_logging() -> None:
  """The console log of a model command."""
  base.setup_logging()


def run_command(main: Callable[[Sequence[str]], Any], define_flags: Callable[[], None], *,
                runtime_defaults: bool = True) -> None:
  """The console-script entry of a command: runtime defaults, flags, the error convention."""
  if runtime_defaults:
    from msatt_jax import runtime  # pylint: disable=g-import-not-at-top
    runtime.configure()  # A no-op when the module's own `__main__` guard already ran it.
  base.run_command(main, define_flags, setup=setup_logging)
