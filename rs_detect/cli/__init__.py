"""The ``rs-detect`` command group. ``rs-detect SCENE`` is ``rs-detect detect SCENE``.

Exit codes: 0 ok, 1 failure (a one-line ``error:`` message), 2 usage, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

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

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        """Ctrl-C that no command handled itself: one line and exit 130 (not click's ``Aborted!``, exit 1)."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            from rs_detect.errors import error_line

            click.echo(error_line("interrupted"), err=True)
            ctx.exit(130)


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
    return cli.main(args=argv, prog_name="rs-detect")
