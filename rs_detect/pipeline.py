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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import geopandas as gpd
import torch
from tqdm import tqdm

from rs_detect import __version__
from rs_detect.config import Config, auto_prefetch, auto_read_threads
from rs_detect.dtypes import torch_dtype
from rs_detect.engines.base import Engine
from rs_detect.errors import ConfigError
from rs_detect.georef import coordinates_label, detections_frame, to_output_crs
from rs_detect.io.reader import RasterSource
from rs_detect.io.prefetch import RawBatch, RawTile, cutter_threads, in_background, prestart, window_batches
from rs_detect.io.tiling import iter_tiles, tile_count
from rs_detect.io.writer import check_writable, write_detections
from rs_detect.memory import HeapTrimmer, trim_heap
from rs_detect.categories import select as select_classes
from rs_detect.postprocess.decode import DecodeParams, decode, is_end2end
from rs_detect.postprocess.nms import nms_per_tile
from rs_detect.postprocess.stitch import above, merge, reaching, suppress_nested, to_scene
from rs_detect.preprocess import Normalizer
from rs_detect.types import Detections, RunStats, Tile

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

    def __init__(self, engine: Engine, config: Config, model_path: Path | None = None, model_sha256: str | None = None) -> None:
        self.engine = engine
        self.config = config
        self.meta = engine.meta
        self.model_path = model_path
        #: the confidence threshold in force: the user's, else the model's own, else 0.25
        self.conf = config.conf if config.conf is not None else (self.meta.conf if self.meta.conf is not None else 0.25)
        #: per-class thresholds: the model's own apply unless the user set --conf; the user's per-class win
        self.conf_by_class = {**(dict(self.meta.conf_by_class) if config.conf is None else {}), **config.conf_by_class}
        self.params = DecodeParams.build(self.meta, self.conf, self.conf_by_class, config.classes)
        # decode and stitch down to stitch_conf (never above the output thresholds), output at params.conf
        self.stitch_params = replace(self.params, conf=torch.clamp(self.params.conf, max=config.stitch_conf))
        self.exclusive_ids = self._exclusive_ids(config.exclusive_classes)
        self.tile_size = config.tile_size or self.meta.imgsz
        if self.tile_size > self.meta.imgsz:
            raise ConfigError(f"tile size {self.tile_size} is larger than the model input {self.meta.imgsz}")
        if config.overlap >= self.tile_size:
            raise ConfigError(f"overlap {config.overlap} must be smaller than the tile size {self.tile_size}")
        wanted = config.batch_size or engine.preferred_batch
        self.batch_size = max(1, min(wanted, self.meta.max_batch))
        if not self.meta.dynamic_batch:
            self.batch_size = self.meta.max_batch
        #: reader threads: the configured number, else all cores but four on a GPU, up to 4 on the CPU
        self.read_threads = config.read_threads or auto_read_threads(engine.device.type)
        self.prefetch = config.prefetch or auto_prefetch(engine.device.type, self.batch_size)
        self._side_stream: torch.cuda.Stream | None = None
        engine.warmup(self.batch_size)  # e.g. the CUDA graph is captured here, not in the first scene
        if model_sha256 is None and model_path and model_path.is_file():
            model_sha256 = file_sha256(model_path)
        self._model_hash = model_sha256

    def _exclusive_ids(self, classes: tuple[str, ...] | None) -> tuple[int, ...]:
        """Class ids of ``exclusive_classes``: categories or class names, among the classes the model has."""
        if not classes:
            return ()
        ids = select_classes(classes, self.meta.names, self.meta.categories, "exclusive_classes", strict=False)
        return tuple(range(self.meta.nc)) if ids is None else ids

    # -- stages ------------------------------------------------------------------------------------

    def _raw_batches(self, src: RasterSource, tiles: Iterator[Tile], pool: ThreadPoolExecutor,
                     cutters: ThreadPoolExecutor) -> Iterator[RawBatch | RawTile]:
        """Raw batches in scene order, assembled in a background thread ``prefetch`` batches ahead."""
        cfg = self.config
        pin = self.engine.device.type == "cuda"
        batches = window_batches(src, tiles, pool, self.batch_size, self.meta.imgsz, pin, self.prefetch, self.read_threads, cutters,
                                 stride=self.tile_size - cfg.overlap)
        # window_batches already keeps ``prefetch`` batches being cut; the hand-over queue needs one
        # more (each batch a queue holds is pinned, resident memory: 32 MB at 16 x 1024 x 1024 uint16)
        return in_background(batches, 1, name="rs-batches")

    def _postprocess(self, raw: torch.Tensor, tiles: tuple[Tile, ...], stats: RunStats,
                     ready: torch.cuda.Event | None = None) -> Detections:
        """Decode + NMS + shift to scene pixels; on a GPU, on a side stream that waits for this batch only.

        Decoding has data-dependent shapes, so it synchronises its stream. On the engine's stream that
        would wait for every batch queued behind this one and let the GPU run dry; on a side stream it
        waits for this batch's ``ready`` event alone. The thread sleeps on that event (it is a blocking
        one) rather than spinning in the decode's synchronisation: a spinning wait keeps a core busy for
        the whole inference, a core the readers need.
        """
        t0 = time.perf_counter()
        if ready is None:
            out = self._decode(raw, tiles)
        else:
            ready.synchronize()
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(device=raw.device)
            with torch.cuda.stream(self._side_stream):
                self._side_stream.wait_event(ready)
                raw.record_stream(self._side_stream)
                out = self._decode(raw, tiles)
        stats.add_time("postprocess", time.perf_counter() - t0)
        return out

    def _decode(self, raw: torch.Tensor, tiles: tuple[Tile, ...]) -> Detections:
        cands = decode(raw, self.meta, self.stitch_params)
        iou = None if is_end2end(tuple(raw.shape), self.meta) else self.config.iou  # end-to-end: no NMS
        kept = nms_per_tile(cands, iou, self.config.max_det, self.meta.nc)
        return to_scene(kept, tiles, self.config.edge_margin).to("cpu")

    # -- the scene ---------------------------------------------------------------------------------

    def run(self, scene: Path, output: Path | None = None, progress: bool = False) -> SceneResult:
        start = time.perf_counter()
        scene = Path(scene)
        if output is not None:
            check_writable(output)
        stats = RunStats()
        # the pools first, all their threads started while nothing else runs; the stretch's sample
        # reads go to the reader pool ahead of the tiles
        readers, cut = self.read_threads, cutter_threads(self.read_threads)
        with ThreadPoolExecutor(readers, thread_name_prefix="rs-read") as pool, \
                ThreadPoolExecutor(cut, thread_name_prefix="rs-cut") as cutters, \
                ThreadPoolExecutor(1, thread_name_prefix="rs-post") as post:
            prestart(pool, readers)
            prestart(cutters, cut)
            result = self._run(scene, output, progress, start, stats, pool, cutters, post)
        # the scene's slabs, batches and decode buffers are all free now: hand their pages back before
        # the next scene (a batch run's workers go from scene to scene; measured on a striped 16k scene
        # read 12 times, the resident size between scenes stayed at 843-876 MB, against 878-1073 MB)
        trim_heap()
        return result

    def _run(self, scene: Path, output: Path | None, progress: bool, start: float, stats: RunStats,
             pool: ThreadPoolExecutor, cutters: ThreadPoolExecutor, post: ThreadPoolExecutor) -> SceneResult:
        cfg = self.config
        t_open = time.perf_counter()
        stats.add_time("setup", t_open - start)
        with RasterSource(scene, channels=self.meta.channels, bands=cfg.bands, scale=cfg.scale, fill_value=cfg.nodata_fill,
                          background_scale=True, handles=self.read_threads, pool=pool) as src:
            stats.add_time("open", time.perf_counter() - t_open)  # header and georeferencing (the stretch runs alongside the reads)
            stats.tiles_total = tile_count(src.width, src.height, self.tile_size, cfg.overlap)
            tiles = iter_tiles(src.width, src.height, self.tile_size, cfg.overlap, src.transform)
            norm = Normalizer(src, self.engine.device, torch_dtype(self.engine.input_dtype), cfg.nodata_fill)
            parts: list[Detections] = []
            bar = tqdm(total=stats.tiles_total, unit="tile", desc=scene.name, disable=not progress,
                       file=sys.stderr, dynamic_ncols=True, leave=False)
            pending: deque[tuple[Future[Detections], int]] = deque()

            def collect() -> None:
                fut, n = pending.popleft()
                dets = fut.result()
                parts.append(dets)
                stats.tiles_read += n
                stats.detections_raw += int(reaching(dets, self.params.conf).sum())
                bar.update(n)
                bar.set_postfix(detections=stats.detections_raw, refresh=False)

            trim = HeapTrimmer()
            with bar:
                t_wait = time.perf_counter()
                for item in self._raw_batches(src, tiles, pool, cutters):
                    waited = time.perf_counter() - t_wait
                    stats.add_time("wait_for_reader", waited)
                    if "first_batch" not in stats.stage_seconds:
                        stats.add_time("first_batch", waited)  # the engine's idle start: part of wait_for_reader
                    if isinstance(item, RawTile):
                        stats.tiles_skipped += 1
                        bar.update(1)
                        t_wait = time.perf_counter()
                        continue
                    t0 = time.perf_counter()
                    raw = self.engine.infer_normalized(*norm.upload(item), norm)
                    ready = None
                    if raw.is_cuda:
                        ready = torch.cuda.Event(blocking=True)
                        ready.record()
                    stats.add_time("infer", time.perf_counter() - t0)
                    # decode + NMS of this batch overlap the next batch's inference
                    pending.append((post.submit(self._postprocess, raw, item.tiles, stats, ready), item.size))
                    while len(pending) > self.prefetch:
                        collect()
                    trim()
                    t_wait = time.perf_counter()
                t0 = time.perf_counter()
                while pending:
                    collect()
                stats.add_time("drain", time.perf_counter() - t0)  # decoding the last batches after the last inference
            t0 = time.perf_counter()
            merged = merge(Detections.concat(parts, self.meta.task), cfg.merge_iou, cfg.merge_ios)
            merged = suppress_nested(above(merged, self.params.conf), self.exclusive_ids, cfg.exclusive_ios, cfg.duplicate_ios)
            frame = detections_frame(merged, self.meta.names, src.transform, src.crs, scene.name,
                                     categories=self.meta.categories, size=(src.width, src.height))
            frame = to_output_crs(frame, cfg.crs, scene.name)
            stats.add_time("stitch", time.perf_counter() - t0)
            names = self.meta.names
            for cid in merged.class_ids.tolist():
                stats.per_class[names[cid]] = stats.per_class.get(names[cid], 0) + 1
            meta = self._metadata(src, scene)
        stats.seconds = time.perf_counter() - start
        meta["output_crs"] = frame.crs.to_string() if frame.crs is not None else None  # what was written, after any fallback
        meta["coordinates"] = coordinates_label(frame.crs)  # "native" when a CRS had no way to WGS84
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
            "categories": list(self.meta.categories),
            "end2end": self.meta.end2end,
            "bands": list(src.plan.indexes),
            "band_combine": src.plan.combine,
            "scale": src.scale.as_dict(),
            "tile_size": self.tile_size,
            "overlap": cfg.overlap,
            "batch_size": self.batch_size,
            "conf": self.conf,
            "conf_by_class": dict(self.conf_by_class),
            "iou": cfg.iou,
            "merge_iou": cfg.merge_iou,
            "merge_ios": cfg.merge_ios,
            "stitch_conf": cfg.stitch_conf,
            "exclusive_classes": list(cfg.exclusive_classes or ()),
            "exclusive_ios": cfg.exclusive_ios,
            "duplicate_ios": cfg.duplicate_ios,
            "class_filter": list(cfg.classes) if cfg.classes else None,
        }
