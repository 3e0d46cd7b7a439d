"""The ``rs-detect`` command group. ``rs-detect SCENE`` is ``rs-detect detect SCENE``.

Exit codes, the same for every command:

* 0 ok;
* 1 a failure: a one-line ``error:`` message naming the file (scene, model, config, output) and the
  problem, including a value out of range in a config file or in a model's metadata;
* 2 the command line itself is wrong: an unknown option, a missing argument, or an option's value out
  of its range (``--overlap -3``, ``--conf 2``, ``--bands 0``), reported by click with the option's name;
* 130 interrupted (Ctrl-C): one line saying so (``error: SCENE: interrupted`` from ``detect``); what was
  finished is kept.
"""

from __future__ import annotations


def _spawned_children_ignore_sigint() -> None:
    """In a process that multiprocessing spawns from ``rs-detect`` (a local Dask worker), ignore SIGINT.

    A spawned child re-imports the parent's main script, and so this module, before anything else of
    its own: from here on a terminal's Ctrl-C, which reaches the whole process group, no longer prints
    a KeyboardInterrupt traceback from a worker still importing its modules. The ``rs-detect`` process
    itself handles Ctrl-C and stops its workers. Nothing happens in any other process.
    """
    import multiprocessing
    import signal

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass


def _interrupted_while_starting(signum: int, frame: object) -> None:
    """Ctrl-C while the command's modules are still being imported: one line and 130, no traceback."""
    import os
    import sys

    sys.stderr.write("interrupted\n")
    sys.stderr.flush()
    os._exit(130)


_spawned_children_ignore_sigint()
if __name__ == "rs_detect.cli":
    import signal as _signal
    import threading as _threading

    if _threading.current_thread() is _threading.main_thread() and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
        _signal.signal(_signal.SIGINT, _interrupted_while_starting)  # main() puts Python's own handler back


import logging
import sys
import warnings
from typing import Any

from rs_detect.cli.startup import leave, no_gc, start_cuda_early

if __name__ == "rs_detect.cli" and _threading.current_thread() is _threading.main_thread():
    start_cuda_early(sys.argv[1:])  # while torch imports below

with no_gc():  # torch comes in here (through the options' config types)
    import click

    from rs_detect import __version__
    from rs_detect.cli.batch import batch
    from rs_detect.cli.detect import detect
    from rs_detect.cli.evaluate import eval_cmd
    from rs_detect.cli.models import build_engine, export, inspect
    from rs_detect.cli.synth import synth
    from rs_detect.errors import one_line


class DefaultGroup(click.Group):
    """A group whose first argument, when it is not a command name, is handed to ``detect``."""

    default_command = "detect"

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # before click turns it into "Aborted!" after an empty line
            _interrupted_while_starting(0, None)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


class _EchoHandler(logging.Handler):
    """One line per record on the *current* stderr (click's runner swaps it in tests)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"{record.levelname.lower()}: {one_line(record.getMessage())}", err=True)


def _setup_logging() -> None:
    root = logging.getLogger("rs_detect")
    if not any(isinstance(h, _EchoHandler) for h in root.handlers):
        root.addHandler(_EchoHandler())
    root.setLevel(logging.INFO)
    root.propagate = False
    # rs-detect says these itself, once and in one line
    warnings.filterwarnings("ignore", message=".*'crs' was not provided.*", category=UserWarning)
    # GDAL's own warnings as "warning: GDAL: ..." lines, once each, instead of raw "Warning 1:" lines
    from rs_detect.gdal_messages import route_to_logging

    route_to_logging()


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rs-detect")
def cli() -> None:
    """Find planes and ships in huge remote-sensing scenes.

    \b
    rs-detect SCENE.tif            detect (the default command), write SCENE.detections.geojson
    rs-detect COMMAND --help       help for one command
    """
    _setup_logging()


for command in (detect, synth, eval_cmd, inspect, export, build_engine, batch):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> Any:
    """The console entry point: click's own handling, except that Ctrl-C is exit 130 with one line
    (click would print ``Aborted!`` and exit 1), wherever it lands (imports, engine loading, a scene)."""
    import signal

    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = cli.main(args=argv, prog_name="rs-detect", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        _interrupted_while_starting(0, None)  # unwound already: nothing is open; leave without the teardown
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except SystemExit as exc:  # a command's own exit (1 after an error line, a batch's status)
        code = exc.code
    # The command is over and everything is written: a Ctrl-C now (while the interpreter tears down
    # torch and GDAL) has nothing left to stop, and must not turn a finished run into a killed one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    leave(code)
