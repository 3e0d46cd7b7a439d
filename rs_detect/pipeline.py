"""The only module that knows the order of the stages.

    RasterSource -> tiles -> batches -> Engine -> decode -> per-tile NMS -> stitch -> georef -> writer

Reading overlaps inference: a pool of reader threads (each with its own dataset handle; GDAL
releases the GIL while decoding) fills a bounded window of tiles ahead of the engine, so memory
depends on batch size and prefetch depth, never on the scene size. Detections are kept as small
struct-of-arrays tensors until the scene is done, then stitched and written once.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import torch
from tqdm import tqdm

from rs_detect import __version__
from rs_detect.config import Config
from rs_detect.engines.base import Engine
from rs_detect.errors import ConfigError
from rs_detect.georef import detections_frame, to_output_crs
from rs_detect.io.reader import RasterSource
from rs_detect.io.tiling import iter_tiles, tile_count
from rs_detect.io.writer import check_writable, write_detections
from rs_detect.postprocess.decode import DecodeParams, decode
from rs_detect.postprocess.nms import nms_per_tile
from rs_detect.postprocess.stitch import merge, to_scene
from rs_detect.types import Batch, Detections, RunStats, Tile

log = logging.getLogger(__name__)


@dataclass
class SceneResult:
    scene: Path
    output: Path | None
    frame: gpd.GeoDataFrame
    detections: Detections
    stats: RunStats
    metadata: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        s = self.stats
        per = ", ".join(f"{k} {v}" for k, v in sorted(s.per_class.items())) or "none"
        dest = f" -> {self.output}" if self.output else ""
        return (
            f"{self.scene.name}: {s.tiles_read} tiles read, {s.tiles_skipped} skipped (nodata), "
            f"{s.detections} detections ({per}) in {s.seconds:.1f} s{dest}"
        )


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


class ScenePipeline:
    """Runs scenes through one loaded engine (load once, run many)."""

    def __init__(self, engine: Engine, config: Config, model_path: Path | None = None) -> None:
        self.engine = engine
        self.config = config
        self.meta = engine.meta
        self.model_path = model_path
        self.params = DecodeParams.build(self.meta, config.conf, config.conf_by_class, config.classes)
        self.tile_size = config.tile_size or self.meta.imgsz
        if self.tile_size > self.meta.imgsz:
            raise ConfigError(f"tile size {self.tile_size} is larger than the model input {self.meta.imgsz}")
        if config.overlap >= self.tile_size:
            raise ConfigError(f"overlap {config.overlap} must be smaller than the tile size {self.tile_size}")
        wanted = config.batch_size or engine.preferred_batch
        self.batch_size = max(1, min(wanted, self.meta.max_batch))
        if not self.meta.dynamic_batch:
            self.batch_size = self.meta.max_batch
        self._model_hash = file_sha256(model_path) if model_path and model_path.is_file() else None

    # -- stages ------------------------------------------------------------------------------------

    def _read_ahead(self, src: RasterSource, tiles: Iterator[Tile], pool: ThreadPoolExecutor) -> Iterator[tuple[Tile, np.ndarray | None]]:
        """Tiles in order with their pixels, read by the pool at most ``prefetch`` batches ahead."""
        depth = self.batch_size * self.config.prefetch
        pending: deque[tuple[Tile, Future[np.ndarray | None]]] = deque()
        dtype = self.engine.input_dtype
        for tile in tiles:
            pending.append((tile, pool.submit(src.read_tile, tile, self.meta.imgsz, None, dtype)))
            if len(pending) >= depth:
                t, fut = pending.popleft()
                yield t, fut.result()
        while pending:
            t, fut = pending.popleft()
            yield t, fut.result()

    def _batches(self, reads: Iterator[tuple[Tile, np.ndarray | None]], stats: RunStats, bar: tqdm) -> Iterator[Batch]:
        images: list[np.ndarray] = []
        tiles: list[Tile] = []
        t0 = time.perf_counter()
        for tile, arr in reads:
            if arr is None:
                stats.tiles_skipped += 1
                bar.update(1)
                continue
            images.append(arr)
            tiles.append(tile)
            if len(images) == self.batch_size:
                stats.add_time("read", time.perf_counter() - t0)
                yield Batch(np.stack(images), tuple(tiles))
                images, tiles = [], []
                t0 = time.perf_counter()
        if images:
            stats.add_time("read", time.perf_counter() - t0)
            yield Batch(np.stack(images), tuple(tiles))

    def _postprocess(self, raw: torch.Tensor, batch: Batch) -> Detections:
        cands = decode(raw, self.meta, self.params)
        kept = nms_per_tile(cands, self.config.iou, self.config.max_det, self.meta.nc)
        return to_scene(kept, batch.tiles, self.config.edge_margin).to("cpu")

    # -- the scene ---------------------------------------------------------------------------------

    def run(self, scene: Path, output: Path | None = None, progress: bool = False) -> SceneResult:
        start = time.perf_counter()
        scene = Path(scene)
        if output is not None:
            check_writable(output)
        cfg = self.config
        stats = RunStats()
        with RasterSource(scene, channels=self.meta.channels, bands=cfg.bands, scale=cfg.scale, fill_value=cfg.nodata_fill) as src:
            stats.tiles_total = tile_count(src.width, src.height, self.tile_size, cfg.overlap)
            tiles = iter_tiles(src.width, src.height, self.tile_size, cfg.overlap, src.transform)
            parts: list[Detections] = []
            bar = tqdm(total=stats.tiles_total, unit="tile", desc=scene.name, disable=not progress,
                       file=sys.stderr, dynamic_ncols=True, leave=False)
            with bar, ThreadPoolExecutor(max_workers=cfg.read_threads, thread_name_prefix="rs-read") as pool:
                for batch in self._batches(self._read_ahead(src, tiles, pool), stats, bar):
                    t0 = time.perf_counter()
                    raw = self.engine.infer(batch.images)
                    t1 = time.perf_counter()
                    dets = self._postprocess(raw, batch)
                    t2 = time.perf_counter()
                    stats.add_time("infer", t1 - t0)
                    stats.add_time("postprocess", t2 - t1)
                    parts.append(dets)
                    stats.tiles_read += batch.size
                    stats.detections_raw += len(dets)
                    bar.update(batch.size)
                    bar.set_postfix(detections=stats.detections_raw, refresh=False)
            t0 = time.perf_counter()
            merged = merge(Detections.concat(parts, self.meta.task), cfg.merge_iou, cfg.merge_ios)
            frame = detections_frame(merged, self.meta.names, src.transform, src.crs, scene.name)
            frame = to_output_crs(frame, cfg.crs, scene.name)
            stats.add_time("stitch", time.perf_counter() - t0)
            names = self.meta.names
            for cid in merged.class_ids.tolist():
                stats.per_class[names[cid]] = stats.per_class.get(names[cid], 0) + 1
            meta = self._metadata(src, scene)
        stats.seconds = time.perf_counter() - start
        meta["tiles"] = {"total": stats.tiles_total, "read": stats.tiles_read, "skipped_nodata": stats.tiles_skipped}
        if output is not None:
            t0 = time.perf_counter()
            write_detections(frame, output, meta)
            stats.add_time("write", time.perf_counter() - t0)
            stats.seconds = time.perf_counter() - start
        return SceneResult(scene, output, frame, merged, stats, meta)

    def _metadata(self, src: RasterSource, scene: Path) -> dict[str, Any]:
        cfg = self.config
        return {
            "software": f"rs-detect {__version__}",
            "scene": scene.name,
            "scene_size": [src.width, src.height],
            "coordinates": "pixel" if src.crs is None else cfg.crs,
            "georeferencing": src.georef,
            "model": str(self.model_path) if self.model_path else self.meta.source,
            "model_sha256": self._model_hash,
            "backend": self.engine.backend,
            "task": self.meta.task,
            "classes": list(self.meta.names),
            "bands": list(src.plan.indexes),
            "band_combine": src.plan.combine,
            "scale": src.scale.as_dict(),
            "tile_size": self.tile_size,
            "overlap": cfg.overlap,
            "batch_size": self.batch_size,
            "conf": cfg.conf,
            "conf_by_class": dict(cfg.conf_by_class),
            "iou": cfg.iou,
            "merge_iou": cfg.merge_iou,
            "merge_ios": cfg.merge_ios,
            "class_filter": list(cfg.classes) if cfg.classes else None,
        }
