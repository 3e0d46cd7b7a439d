"""``rs-detect detect SCENE``: one scene in, georeferenced detections out."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from rs_detect.cli.options import build_config, scene_options
from rs_detect.errors import RsDetectError


def fail(exc: RsDetectError) -> None:
    click.echo(f"error: {' '.join(str(exc).split())}", err=True)
    sys.exit(1)


@click.command()
@click.argument("scene", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output file: .geojson (default, beside the scene), .gpkg or .parquet.")
@scene_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary line.")
def detect(scene: Path, output: Path | None, model: Path | None, config_path: Path | None, quiet: bool, classes: tuple[str, ...] | None, **flags: Any) -> None:
    """Detect planes and ships in SCENE (a GeoTIFF or any raster GDAL reads)."""
    from rs_detect.engines import load_engine
    from rs_detect.pipeline import ScenePipeline

    try:
        cfg = build_config(config_path, classes, model=str(model) if model else None, **flags)
        out = output or scene.with_suffix(".geojson")
        if not scene.exists():
            raise RsDetectError(f"{scene}: no such file")
        model_path = cfg.model_path()
        model_yaml = Path(cfg.model_meta) if isinstance(cfg.model_meta, str) else cfg.model_meta
        engine = load_engine(model_path, device=str(cfg.device), model_yaml=model_yaml)
        pipeline = ScenePipeline(engine, cfg, model_path)
        result = pipeline.run(scene, out, progress=not quiet and sys.stderr.isatty())
    except RsDetectError as exc:
        fail(exc)
        return
    if not quiet:
        click.echo(result.summary())
