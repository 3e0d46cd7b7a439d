"""Options shared by the commands that run scenes (``detect`` and ``batch``), as decorators."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from rs_detect.config import Config, load_config


def _csv(kind: type, minimum: int | None = None) -> Callable[[click.Context, click.Parameter, str | None], tuple[Any, ...] | None]:
    def convert(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[Any, ...] | None:
        if value is None:
            return None
        try:
            items = tuple(kind(v.strip()) for v in value.split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"expected a comma-separated list, got {value!r}") from None
        if not items:
            raise click.BadParameter("empty list")
        if minimum is not None and any(v < minimum for v in items):
            raise click.BadParameter(f"must be >= {minimum} (bands are 1-based), got {value!r}")
        return items

    return convert


SCENE_OPTIONS = [
    click.option("--model", "model", type=click.Path(path_type=Path), help="Model file (.onnx, .engine/.plan, .torchscript). Default: the bundled sample."),
    click.option("--config", "config_path", type=click.Path(path_type=Path), help="YAML config (unknown keys are refused)."),
    click.option("--conf", type=click.FloatRange(0.0, 1.0), help="Confidence threshold for every class [default: the model's own "
                 "thresholds (conf, conf_by_class in its YAML or metadata), else 0.25]."),
    click.option("--iou", type=click.FloatRange(0.0, 1.0), help="NMS IoU threshold [default 0.5]."),
    click.option("--classes", callback=_csv(str), help="Classes to keep: categories (plane, ship, other) and/or the model's class names, e.g. airplane "
                 "[default plane,ship: every class whose category is plane or ship; see docs/models.md]; 'all' keeps every class."),
    click.option("--batch-size", type=click.IntRange(min=1), help="Tiles per engine call [default: the engine's preferred batch]."),
    click.option("--tile-size", type=click.IntRange(min=32), help="Window size in pixels [default: the model input size]."),
    click.option("--overlap", type=click.IntRange(min=0), help="Overlap between windows in pixels [default 192]."),
    click.option("--bands", callback=_csv(int, minimum=1), help="1-based band(s) to read, e.g. 1 or 3,2,1 (see README: band mapping)."),
    click.option("--device", help="cpu or cuda[:N] [default cpu]."),
    click.option("--crs", type=click.Choice(["wgs84", "native"]), help="Output coordinates [default wgs84: GeoJSON lon/lat]."),
    click.option("--reader", type=click.Choice(["auto", "gdal", "blocks", "nvcomp"]),
                 help="How scenes are read [default auto: on a GPU, tiled DEFLATE/uncompressed GeoTIFFs are inflated on the CPU "
                      "and cut on the GPU, anything else through GDAL; see docs/how-it-works.md]. The same detections either way."),
]


def scene_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed(SCENE_OPTIONS):
        fn = opt(fn)
    return fn


def build_config(config_path: Path | None, classes: tuple[str, ...] | None, **flags: Any) -> Config:
    """Config file < flags; ``--classes all`` clears the class filter."""
    cfg = load_config(config_path, **flags)
    if classes is not None:
        cfg = cfg.updated(classes=()) if classes == ("all",) else cfg.updated(classes=classes)
    if cfg.classes == ():
        from dataclasses import replace

        cfg = replace(cfg, classes=None)
    return cfg
