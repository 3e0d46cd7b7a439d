"""``rs-detect detect SCENE``: one scene in, georeferenced detections out."""

from __future__ import annotations

import sys
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import click

from rs_detect.cli.options import build_config, scene_options
from rs_detect.cli.startup import InBackground, no_gc
from rs_detect.errors import RsDetectError, error_line
from rs_detect.io.location import scene_path

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def fail(exc: RsDetectError) -> None:
    click.echo(error_line(exc), err=True)
    sys.exit(1)


def interrupted(scene: Path) -> None:
    """Ctrl-C: every thread of the run has stopped (the executor's shutdown) and nothing was written."""
    click.echo(error_line(f"{scene}: interrupted"), err=True)
    sys.exit(EXIT_INTERRUPTED)


@click.command()
@click.argument("scene", callback=lambda ctx, param, value: scene_path(value))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output file: .geojson, .gpkg (style inside) or .parquet (GeoParquet: QGIS opens it only with "
                   "GDAL >= 3.8 built with the Arrow/Parquet driver). [default: SCENE.detections.geojson beside the "
                   "scene, with its QGIS style SCENE.detections.qml]")
@scene_options
@click.option("--preview", "preview", is_flag=False, flag_value="", default=None, metavar="[PATH]",
              help="Also write a quick-look PNG with the detections drawn [default path: <output stem>.preview.png "
                   "beside the output]. Give it after SCENE, or as --preview=PATH.")
@click.option("--dry-run", "dry_run", is_flag=False, flag_value="json", default=None, type=click.Choice(["json", "yaml"]),
              metavar="[json|yaml]", help="Print the resolved settings (the run plan) and exit: the model's metadata is "
                                          "read, nothing is inferred or written. Give it after SCENE, or as --dry-run=yaml.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary line.")
def detect(scene: Path, output: Path | None, model: Path | None, config_path: Path | None, quiet: bool,
           classes: tuple[str, ...] | None, preview: str | None, dry_run: str | None, **flags: Any) -> None:
    """Detect planes and ships in SCENE (a GeoTIFF or any raster GDAL reads)."""
    try:
        with no_gc():
            from rs_detect.engines import load_engine
            from rs_detect.engines.registry import import_loader
            from rs_detect.executor import SceneExecutor
            from rs_detect.fsutil import file_sha256
            from rs_detect.io.writer import default_output
            from rs_detect.plan import resolve_plan

        cfg = build_config(config_path, classes, model=str(model) if model else None, **flags)
        out = output or default_output(scene)
        if not scene.exists():
            raise RsDetectError(f"{scene}: no such file")
        preview_path = None
        if preview is not None:
            from rs_detect.preview import check_preview_writable, default_preview_path

            preview_path = Path(preview) if preview else default_preview_path(out)
            if dry_run is None:
                check_preview_writable(preview_path)
        model_path = cfg.model_path()
        model_yaml = Path(cfg.model_meta) if isinstance(cfg.model_meta, str) else cfg.model_meta
        with no_gc():
            loader = import_loader(model_path)  # here, not in the loading thread

        planned: Future[tuple[Any, Any]] = Future()

        def prepare() -> None:
            """Load the engine and resolve the plan (handed over through ``planned``), then, for a run,
            warm the engine up for this scene: its own thread."""
            try:
                engine = load_engine(model_path, device=str(cfg.device), model_yaml=model_yaml)
                plan = resolve_plan(cfg, engine, model_path, file_sha256(model_path) if model_path.is_file() else None)
                executor = None if dry_run is not None else SceneExecutor(plan, engine, warmup=False)
            except BaseException as exc:
                planned.set_exception(exc)
                raise
            planned.set_result((plan, executor))
            if executor is not None:
                executor.warm_up(like=scene)

        # the engine loads (and, on a GPU, initialises CUDA) while this thread imports what georeferences
        # and writes the detections, which the scene needs only at its end; the warm-up (on a GPU, the
        # CUDA graph's capture) goes on while the scene opens and its first batches decode
        loading = InBackground(prepare, name="rs-load", thread=loader.loads_in_any_thread)
        if dry_run is None:
            with no_gc():
                import_output_modules(preview_path is not None)
        plan, executor = planned.result()  # an error of the loading thread is raised here
        if dry_run is not None:
            click.echo(plan.dumps(dry_run).rstrip())
            return
        result = executor.run(scene, out, progress=not quiet and sys.stderr.isatty(), engine_ready=loading.result)
        if not quiet:
            click.echo(result.summary())
        if preview_path is not None:  # after the detections are safely written: a failure here loses nothing
            from rs_detect.preview import render_result_preview

            shown = render_result_preview(result, preview_path)
            if not quiet:
                click.echo(f"preview -> {shown.path} ({shown.seconds:.1f} s)")
    except RsDetectError as exc:
        fail(exc)
    except KeyboardInterrupt:
        interrupted(scene)


def import_output_modules(preview: bool) -> None:
    """The modules that turn detections into a written file (geopandas, pandas, pyproj, pyogrio), which
    :mod:`rs_detect.georef` and :mod:`rs_detect.io.writer` import only when first used; with
    ``preview``, the preview's too."""
    import geopandas  # noqa: F401
    import pyogrio  # noqa: F401
    import pyproj  # noqa: F401

    if preview:
        import rs_detect.preview  # noqa: F401
