"""The settings a scene run uses, resolved once into one frozen value: :class:`RunPlan`.

    resolve_plan(config, engine) -> RunPlan

Precedence, lowest first: the model file's metadata < the model YAML (both merged by the engine
loader into ``engine.meta``) < the config file < command-line flags (both merged into
:class:`~rs_detect.config.Config` by :func:`~rs_detect.config.load_config`). Everything left open
there (tile size, batch size, confidence, threads, queue depths, GDAL's block cache) is decided here
and nowhere else, and every cross-field rule (``overlap < tile size``, class names the model knows)
is checked here, before any thread starts. Nothing downstream reads a config file or an environment
variable again. ``rs-detect detect SCENE --dry-run`` prints :meth:`RunPlan.as_dict`; the output's run
metadata holds the same dict under ``"plan"`` (:func:`run_metadata`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rs_detect.categories import select as select_classes
from rs_detect.config import Config, auto_prefetch, auto_read_threads, cutter_threads
from rs_detect.errors import ConfigError, ModelError
from rs_detect.postprocess.decode import DecodeParams
from rs_detect.types import ScaleConfig

if TYPE_CHECKING:
    from rs_detect.engines.base import Engine

DEFAULT_CONF = 0.25
#: GDAL's block cache (MB) for a run, unless ``GDAL_CACHEMAX`` is set in the environment. GDAL's default
#: is 5 % of RAM and grows with the scene; the reader decodes every block once into slabs of its own
#: (io.prefetch), so the cache has nothing to share.
GDAL_CACHEMAX_MB = 16


@dataclass(frozen=True)
class TilingPlan:
    tile_size: int  # window size in scene pixels (at most the model input; smaller tiles are padded)
    overlap: int  # pixels shared by neighbouring windows
    edge_margin: float  # a box within this many pixels of an interior tile edge is "cut" there

    @property
    def stride(self) -> int:
        return self.tile_size - self.overlap


@dataclass(frozen=True)
class ScalingPlan:
    channels: int  # the model's input channels
    bands: tuple[int, ...] | None  # 1-based bands asked for; None: the band rule of io.reader
    scale: ScaleConfig  # how pixel values become [0, 1]
    nodata_fill: float  # the model input at nodata pixels


@dataclass(frozen=True)
class EnginePlan:
    model: str  # the model file (or the engine's own description of its source)
    model_sha256: str | None
    backend: str
    device: str
    task: str
    classes: tuple[str, ...]  # the model's class names, by class id
    categories: tuple[str, ...]  # the category (plane, ship, other) of each class
    end2end: bool  # an end-to-end head ([B, K, 6|7], no NMS)
    imgsz: int  # the model input size
    batch_size: int  # tiles per engine call
    input_dtype: str  # what the engine takes (float32, float16)


@dataclass(frozen=True)
class ExecutionPlan:
    """Threads and queue depths of :class:`~rs_detect.executor.SceneExecutor` (speed only, never results)."""

    read_threads: int  # reader pool: slab decodes and the stretch's sample reads
    cutter_threads: int  # cutter pool: windows copied from slabs into batch slots
    read_ahead: int  # batches being read and cut ahead of the engine (the ``prefetch`` setting)
    handover: int  # finished batches waiting for the main thread
    decode_ahead: int  # batches inferred and still being decoded
    pin_memory: bool  # batches in pinned host memory (a CUDA device)
    gdal_cachemax_mb: int | None  # set for the run; None: the environment's GDAL_CACHEMAX stands
    reader: str = "auto"  # auto | gdal | blocks | nvcomp (rs_detect.io.gpu_blocks.gpu_read_plan); chosen per scene


@dataclass(frozen=True)
class PostprocessPlan:
    conf: float  # the output threshold (every class without its own)
    conf_by_class: tuple[tuple[str, float], ...]  # per-class output thresholds in force
    class_filter: tuple[str, ...] | None  # classes kept, as asked for: categories and/or names (None: all)
    kept_classes: tuple[str, ...] | None  # the model classes that selects (None: all)
    iou: float  # per-tile NMS
    max_det: int  # per tile
    stitch_conf: float  # decode and stitch down to min(threshold, this); output at the thresholds
    merge_iou: float
    merge_ios: float
    exclusive_classes: tuple[str, ...]  # as asked for: categories and/or names
    exclusive_model_classes: tuple[str, ...]  # the model classes that selects
    exclusive_ios: float
    duplicate_ios: float | None

    def threshold(self, name: str) -> float:
        return dict(self.conf_by_class).get(name, self.conf)


@dataclass(frozen=True)
class OutputPlan:
    crs: str  # wgs84 | native


@dataclass(frozen=True)
class RunPlan:
    tiling: TilingPlan
    scaling: ScalingPlan
    engine: EnginePlan
    execution: ExecutionPlan
    postprocess: PostprocessPlan
    output: OutputPlan

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML types, by part (what ``--dry-run`` prints and the run metadata holds)."""
        d: dict[str, Any] = {}
        for part in ("tiling", "scaling", "engine", "execution", "postprocess", "output"):
            d[part] = _plain(asdict(getattr(self, part)))
        d["tiling"]["stride"] = self.tiling.stride
        d["postprocess"]["conf_by_class"] = dict(self.postprocess.conf_by_class)
        return d

    def dumps(self, fmt: str = "json") -> str:
        if fmt == "yaml":
            import yaml

            return yaml.safe_dump(self.as_dict(), sort_keys=False)
        return json.dumps(self.as_dict(), indent=2)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def resolve_plan(config: Config, engine: Engine, model_path: Path | None = None, model_sha256: str | None = None,
                 cores: int | None = None) -> RunPlan:
    """The one place where defaults are filled in and cross-field rules are checked (ConfigError)."""
    meta = engine.meta
    names = list(meta.names)
    tile = config.tile_size or meta.imgsz
    if tile > meta.imgsz:
        raise ConfigError(f"tile size {tile} is larger than the model input {meta.imgsz}")
    if config.overlap >= tile:
        raise ConfigError(f"overlap {config.overlap} must be smaller than the tile size {tile}")
    categories = tuple(meta.categories)
    kept = select_classes(config.classes, names, categories, "--classes")  # ConfigError for a class the model lacks
    exclusive: tuple[int, ...] = ()
    if config.exclusive_classes:
        ids = select_classes(config.exclusive_classes, names, categories, "exclusive_classes", strict=False)
        exclusive = tuple(range(meta.nc)) if ids is None else ids

    batch = meta.max_batch if not meta.dynamic_batch else max(1, min(config.batch_size or engine.preferred_batch, meta.max_batch))
    device = engine.device.type
    read_threads = config.read_threads or auto_read_threads(device, cores)
    read_ahead = config.prefetch or auto_prefetch(device, batch)
    # the user's threshold, else the model's own, else 0.25; the model's per-class thresholds apply unless
    # the user set --conf; the user's per-class thresholds win
    conf = config.conf if config.conf is not None else (meta.conf if meta.conf is not None else DEFAULT_CONF)
    by_class = {**(dict(meta.conf_by_class) if config.conf is None else {}), **config.conf_by_class}
    try:  # per-class thresholds' names as the decoder reads them: a mistake of the settings
        DecodeParams.build(meta, conf, by_class, None)
    except ModelError as exc:
        raise ConfigError(str(exc)) from None

    return RunPlan(
        tiling=TilingPlan(tile, config.overlap, config.edge_margin),
        scaling=ScalingPlan(meta.channels, config.bands, config.scale, config.nodata_fill),
        engine=EnginePlan(
            model=str(model_path) if model_path else meta.source, model_sha256=model_sha256, backend=engine.backend,
            device=str(engine.device), task=meta.task, classes=tuple(names), categories=categories, end2end=bool(meta.end2end),
            imgsz=meta.imgsz, batch_size=batch,
            input_dtype=str(engine.input_dtype)),
        execution=ExecutionPlan(
            read_threads=read_threads, cutter_threads=cutter_threads(read_threads), read_ahead=read_ahead, handover=1,
            # decodes in flight: as many batches as are read ahead (the depth the pipeline always used)
            decode_ahead=read_ahead, pin_memory=device == "cuda",
            gdal_cachemax_mb=None if "GDAL_CACHEMAX" in os.environ else GDAL_CACHEMAX_MB, reader=config.reader),
        postprocess=PostprocessPlan(
            conf=float(conf), conf_by_class=tuple((k, float(v)) for k, v in by_class.items()),
            class_filter=config.classes, kept_classes=None if kept is None else tuple(names[i] for i in kept), iou=config.iou, max_det=config.max_det, stitch_conf=config.stitch_conf,
            merge_iou=config.merge_iou, merge_ios=config.merge_ios, exclusive_classes=tuple(config.exclusive_classes or ()),
            exclusive_model_classes=tuple(names[i] for i in exclusive),
            exclusive_ios=config.exclusive_ios, duplicate_ios=config.duplicate_ios),
        output=OutputPlan(config.crs),
    )


def run_metadata(plan: RunPlan, scene: dict[str, Any], software: str) -> dict[str, Any]:
    """The output's run metadata: what the scene was (``scene``: name, size, georeferencing, band plan,
    measured stretch, tile counts, output CRS), the full plan under ``"plan"``, and the plan's
    settings as flat keys (what readers of earlier outputs, the QGIS style and the preview look up)."""
    p, e = plan.postprocess, plan.engine
    flat = {
        "model": e.model,
        "model_sha256": e.model_sha256,
        "backend": e.backend,
        "task": e.task,
        "classes": list(e.classes),
        "categories": list(e.categories),
        "end2end": e.end2end,
        "tile_size": plan.tiling.tile_size,
        "overlap": plan.tiling.overlap,
        "batch_size": e.batch_size,
        "conf": p.conf,
        "conf_by_class": dict(p.conf_by_class),
        "iou": p.iou,
        "merge_iou": p.merge_iou,
        "merge_ios": p.merge_ios,
        "stitch_conf": p.stitch_conf,
        "exclusive_classes": list(p.exclusive_classes),
        "exclusive_ios": p.exclusive_ios,
        "duplicate_ios": p.duplicate_ios,
        "class_filter": list(p.class_filter) if p.class_filter else None,
    }
    return {"software": software, **scene, **flat, "plan": plan.as_dict()}
