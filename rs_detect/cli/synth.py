"""``rs-detect synth``: write a synthetic scene with planes and ships and its ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

import click

from rs_detect.cli.detect import fail
from rs_detect.errors import ConfigError, OutputError, RsDetectError, one_line

if TYPE_CHECKING:
    from rs_detect_synth import SceneTruth


@click.command("synth")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--width", type=int, default=6000, show_default=True, help="Scene width in pixels (>= 64).")
@click.option("--height", type=int, default=5000, show_default=True, help="Scene height in pixels (>= 64).")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same scene and truth.")
@click.option(
    "--truth",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Ground-truth GeoJSON path [default: OUT with .truth.geojson].",
)
@click.option("--dtype", default="uint8", show_default=True, help="uint8 (5..250) or uint16 (300..3800).")
@click.option("--striped", is_flag=True, help="Write a striped GeoTIFF instead of 512x512 tiles.")
@click.option("--quiet", is_flag=True, help="Print nothing on success.")
def synth(out: Path, width: int, height: int, seed: int, truth: Path | None, dtype: str, striped: bool, quiet: bool) -> None:
    """Write a synthetic single-band GeoTIFF scene OUT with planes and ships, and its truth as GeoJSON.

    The truth holds one rotated rectangle per object in the scene's CRS, with pixel attributes, and
    marks the objects that straddle the 1024/192 tiler's window edges.
    """
    # the renderer lives outside the runtime package; only this command imports it
    from rs_detect_synth import DTYPE_LEVELS, SceneDtype, default_truth_path, write_scene

    truth = truth or default_truth_path(out)
    try:
        if dtype not in DTYPE_LEVELS:
            raise ConfigError(f"{out}: --dtype must be uint8 or uint16, got {dtype!r}")
        for path in (out, truth):
            _check_writable(path)
        try:
            result = write_scene(out, width, height, seed, truth_path=truth, dtype=cast(SceneDtype, dtype), striped=striped)
        except ValueError as exc:
            raise ConfigError(f"{out}: {one_line(exc)}") from None
        except OSError as exc:
            raise OutputError(f"{out}: cannot write the scene ({one_line(exc)})") from None
    except RsDetectError as exc:
        fail(exc)
        return
    if not quiet:
        click.echo(summary(result))


def summary(result: SceneTruth) -> str:
    """One line: what was written, how many objects of each class, how long it took."""
    counts = ", ".join(f"{n} {name}" for name, n in result.counts().items())
    layout = "tiled" if result.tiled else "striped"
    return (
        f"{result.path}: {result.width}x{result.height} {result.dtype} {layout}, {counts} "
        f"({result.edge_count} on tile edges) -> {result.truth_path} in {result.seconds:.1f} s"
    )


def _check_writable(path: Path) -> None:
    """Fail before rendering, with one line, when the file cannot be created where asked."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise OutputError(f"{path}: cannot write: directory {parent} does not exist")
    if not parent.is_dir():
        raise OutputError(f"{path}: cannot write: {parent} is not a directory")
    if path.is_dir():
        raise OutputError(f"{path}: cannot write: it is a directory")
