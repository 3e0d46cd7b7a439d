"""``rs-detect batch INPUT... -o OUTDIR``: an archive of scenes, resumable, serial or on Dask.

Exit codes: 0 every scene done or skipped, 1 any scene failed (or the run could not start),
2 usage, 130 interrupted (what finished is kept; rerun to go on).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from rs_detect.cli.options import build_config, scene_options
from rs_detect.errors import RsDetectError, error_line


def _gpu_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise click.BadParameter("empty list")
    return items


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--outdir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder: one output per scene, mirroring the input tree.")
@click.option("--pattern", "patterns", multiple=True, help='File name pattern for folders (case-insensitive, repeatable) [default "*.tif", "*.tiff"].')
@click.option("--workers", type=click.IntRange(min=1), help="Run on a local Dask cluster of N worker processes (one thread each).")
@click.option("--gpus", callback=_gpu_list, metavar="LIST", help="With --device cuda: the GPUs to use, e.g. 0,2, one local worker "
              "each [default: every visible GPU when there are several].")
@click.option("--scheduler", metavar="ADDRESS", help="Run on an existing Dask cluster, e.g. tcp://host:8786.")
@click.option("--format", "fmt", type=click.Choice(["geojson", "gpkg", "parquet"]), default="geojson", show_default=True,
              help="Per-scene output format (parquet: QGIS opens GeoParquet only with GDAL >= 3.8 built with the Arrow/Parquet driver).")
@click.option("--index", type=click.Path(dir_okay=False, path_type=Path), help="Also write one merged index of all detections (.gpkg or .parquet) with a scene column.")
@click.option("--force", is_flag=True, help="Redo every scene, even those finished by an earlier run.")
@click.option("--wait", is_flag=True, help="If another batch run is using OUTDIR, wait for it to end instead of exiting.")
@scene_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary table (failures are still reported).")
def batch(
    inputs: tuple[str, ...],
    outdir: Path,
    patterns: tuple[str, ...],
    workers: int | None,
    gpus: tuple[str, ...] | None,
    scheduler: str | None,
    fmt: str,
    index: Path | None,
    force: bool,
    wait: bool,
    model: Path | None,
    config_path: Path | None,
    classes: tuple[str, ...] | None,
    quiet: bool,
    **flags: Any,
) -> None:
    """Detect in every scene of INPUT... (files, folders searched recursively, or globs) into OUTDIR.

    \b
    A rerun skips the scenes already finished for the same input, model and
    config (each has a <output>.done.json manifest); --force redoes them.
    OUTDIR/_run_summary.json records every scene with its numbers or its error.
    Exit code 1 when any scene failed.
    """
    if workers is not None and scheduler is not None:
        raise click.UsageError("--workers and --scheduler exclude each other")
    if gpus is not None and scheduler is not None:
        raise click.UsageError("--gpus and --scheduler exclude each other (a given cluster places its own workers)")
    if gpus is not None and flags.get("device") != "cuda":
        raise click.UsageError("--gpus needs --device cuda")
    try:
        from rs_detect.batch import DEFAULT_PATTERNS, run_batch

        cfg = build_config(config_path, classes, model=str(model) if model else None, **flags)
        summary = run_batch(
            inputs, outdir, cfg, patterns=patterns or DEFAULT_PATTERNS, fmt=fmt, workers=workers,
            scheduler=scheduler, index=index, force=force, progress=not quiet and sys.stderr.isatty(), wait=wait, gpus=gpus,
        )
    except RsDetectError as exc:
        click.echo(error_line(exc), err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo(f"interrupted: finished scenes are kept in {outdir}; rerun the same command to go on", err=True)
        # Everything is written and closed by now (outputs, manifests, the summary; the cluster is
        # shut down): leave without the interpreter's teardown of torch, GDAL and ONNX Runtime,
        # which takes a second or more and would hold the terminal after Ctrl-C.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    if not quiet:
        click.echo(summary.table())
    else:
        for o in summary.by_status("failed"):
            click.echo(f"error: {o.scene}: {o.error}", err=True)
    sys.exit(1 if summary.failed else 0)
