"""SceneExecutor: the one owner of a scene run's threads, queues, CUDA streams and events.

Every other stage is a synchronous call that starts no thread (reader, cutter, normaliser, engine,
decode, stitch); this module decides which thread runs which, bounds what waits between them, and
stops them all, in one order, on success, on error and on Ctrl-C. The flow of one scene::

    main thread      open RasterSource (1 handle) --- start pools --- pick the reading path ------+
                     (scene_batches); on the GDAL path, N more handles for the reader threads     |
                                                                                                  |
    rs-read  x N     [stretch sample jobs]  [slab part decodes: RasterSource.read_raw into slabs] |
                        |  through GDAL, or on the block reader's path from the blocks            |
                        |  (BlockSampler); the thread that ends the last one computes the stretch |
                        v                          v (each cut waits for its slab parts)          |
    rs-cut   x M                               SlabReader.cut: window -> slot of a (pinned) batch |
                                                   |                                              |
    rs-batches x 1   window_batches(): queues decodes and cuts, at most `read_ahead` batches      |
                     ahead; hands finished RawBatch / SkippedTile over through                    |
                     queue `handover` (maxsize plan.execution.handover)                           |
                                                   |                                              |
    (block reader: rs-read jobs read and inflate groups of block rows into pinned buffers;          |
     rs-batches uploads each group on the *read* stream and cuts the batch's windows there;      |
     the cutter pool stays idle; io/gpu_blocks.py)                                                |
                                                   |                                              |
    main thread      Normalizer.upload [upload stream] -> engine.infer_normalized [current stream] |
                     -> event `ready` recorded; decode job queued                                 |
                                                   |  at most `decode_ahead` batches in flight    |
    rs-post  x 1     waits on `ready`; TileDecoder (decode, NMS, to scene) [decode stream]        |
                                                   |                                              |
    main thread      stitch_scene -> georeference -> write_detections (temporary name, rename) <--+

CUDA (only when the engine runs on a GPU): four streams made here, once per executor. The *upload*
stream copies batch N+1 from pinned memory while the engine's current stream still runs batch N;
the current stream waits for the copy (``wait_stream``). With the block reader, batches are made on
the *read* stream instead and carry an event the current stream waits for (``RawBatch.ready``).
The engine runs on a stream of its own of high priority (``ENGINE_STREAM_PRIORITY``), the main
thread's current stream while a scene runs; the others have normal priority.
After each inference the main thread records a blocking event ``ready`` on the current stream; the
post thread sleeps on it, and decodes on the *decode* stream, which waits for that event only (never
for the batches queued behind it).
A backend may keep a stream of its runtime's own inside its engine (TensorRT's execution context);
it orders itself against the current stream at both ends of ``infer``.

Stopping: whatever ends the scene (the last batch, an exception in any thread, re-raised in the main
thread, or KeyboardInterrupt in the main thread) leaves :meth:`_Threads.__exit__`, which, in order,
(1) stops the ``rs-batches`` thread and has it close its generator (queued cuts and decodes
cancelled, running cuts awaited), (2) cancels queued decode jobs and joins ``rs-post``, (3) shuts
the cutter pool down and (4) the reader pool, each waiting for the jobs already running. Only then
does :meth:`SceneExecutor.run` close the dataset: no thread reads a dataset that has closed.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Generic, TypeVar

import torch
from tqdm import tqdm

from rs_detect import __version__
from rs_detect.dtypes import pixel_torch_dtype, torch_dtype
from rs_detect.engines.base import Engine, SceneLike
from rs_detect.gdal_messages import route_this_thread
from rs_detect.georef import coordinates_label
from rs_detect.io.location import scene_path
from rs_detect.io.gpu_blocks import scene_batches
from rs_detect.io.reader import RasterSource
from rs_detect.io.tiling import iter_tiles, tile_count
from rs_detect.io.writer import check_writable, write_detections
from rs_detect.memory import HeapTrimmer, trim_heap
from rs_detect.plan import ExecutionPlan, RunPlan, run_metadata
from rs_detect.preprocess import Normalizer
from rs_detect.stages import SceneResult, Thresholds, TileDecoder, georeference, stitch_scene
from rs_detect.types import Detections, RawBatch, RunStats, ScaleInfo, SkippedTile, Tile

T = TypeVar("T")
_DONE = object()


@contextmanager
def _quiet_this_thread() -> Iterator[None]:
    """The reader's own warnings (georeferencing, band choice: logger ``rs_detect.io.reader``) dropped in
    this thread only: a scene opened for a look at its header warns once, when the run opens it."""
    me = threading.get_ident()

    def other_threads(record: logging.LogRecord) -> bool:
        return record.thread != me

    logger = logging.getLogger("rs_detect.io.reader")
    logger.addFilter(other_threads)
    try:
        yield
    finally:
        logger.removeFilter(other_threads)


def prestart(pool: ThreadPoolExecutor, threads: int) -> ThreadPoolExecutor:
    """Start all of ``pool``'s threads now (a pool starts them one per submit, as it needs them).

    Started while the process is quiet they take microseconds; started by the first submits they
    start while the readers hold the GIL, and the first batch's cuts begin late. On any interruption
    the barrier is broken, so no thread waits out its timeout.
    """
    barrier = threading.Barrier(threads)
    futures = [pool.submit(barrier.wait, 10) for _ in range(threads)]
    try:
        for f in futures:
            f.result()
    except BaseException:
        barrier.abort()
        raise
    return pool


def measure_scale(src: RasterSource, pool: ThreadPoolExecutor,
                  sample: Callable[[tuple[int, int, list[tuple[int, int]]]], object] | None = None,
                  plan: Callable[[], list[tuple[int, int, list[tuple[int, int]]]]] | None = None) -> Future[ScaleInfo]:
    """The scene's stretch, measured by ``pool``'s threads while the first tiles decode.

    One job per sample window (or grid row) is queued now, ahead of any tile; each counts its own
    values, and the thread that ends the last one adds the counts up and sets the result: nobody waits
    for it, and the first batch, which needs it, finds it ready. Scalings that need no sample are
    resolved at once. ``sample`` reads and summarises one job and ``plan`` gives the jobs (the reading
    path's: :class:`~rs_detect.io.gpu_blocks.ScenePath`); by default ``src.sample_summary``, through
    GDAL, and ``src.sample_plan``.
    """
    out: Future[ScaleInfo] = Future()
    if not src.needs_statistics():
        try:
            out.set_result(src.scale_info())
        except Exception as exc:  # e.g. fixed scaling with low >= high: raised where the result is asked for
            out.set_exception(exc)
        return out
    jobs = [pool.submit(sample or src.sample_summary, job) for job in (plan or src.sample_plan)()]
    lock, left = threading.Lock(), [len(jobs)]

    def ended(_: Future[object]) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        try:
            out.set_result(src.scale_info([j.result() for j in jobs]))
        except BaseException as exc:  # a read error, or the jobs cancelled at shutdown
            out.set_exception(exc)

    for j in jobs:
        j.add_done_callback(ended)
    return out


class Producer(Generic[T]):
    """Drains an iterator in a thread of its own, ``maxsize`` items ahead of the consumer.

    Exceptions re-raise in the consumer. :meth:`stop` ends the thread and, in that thread, closes the
    iterator (so its ``finally`` runs: a generator cancels and awaits what it queued).
    """

    def __init__(self, items: Iterable[T], maxsize: int, name: str) -> None:
        self._items = items
        self._q: queue.Queue[object] = queue.Queue(maxsize=max(1, maxsize))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        it = iter(self._items)
        try:
            for item in it:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(exc)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator[T]:
        while True:
            item = self._q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]

    def stop(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._q.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)


class _Threads:
    """The pools of one scene, and their shutdown in order (see the module docstring)."""

    def __init__(self, ex: ExecutionPlan) -> None:
        self.ex = ex
        self.readers = ThreadPoolExecutor(ex.read_threads, thread_name_prefix="rs-read", initializer=route_this_thread)
        self.cutters = ThreadPoolExecutor(ex.cutter_threads, thread_name_prefix="rs-cut")
        self.post = ThreadPoolExecutor(1, thread_name_prefix="rs-post")
        self.producer: Producer[RawBatch | SkippedTile] | None = None
        self.decoding: deque[tuple[Future[Detections], int]] = deque()

    def __enter__(self) -> _Threads:
        try:
            prestart(self.readers, self.ex.read_threads)
            prestart(self.cutters, self.ex.cutter_threads)
        except BaseException:
            self.__exit__()
            raise
        return self

    def produce(self, batches: Iterable[RawBatch | SkippedTile]) -> Producer[RawBatch | SkippedTile]:
        self.producer = Producer(batches, self.ex.handover, name="rs-batches")
        return self.producer

    def __exit__(self, *exc: object) -> None:
        """Stop everything, in order; a second Ctrl-C meanwhile does not skip a step (the dataset closes
        after this returns, so no thread may be left reading it), it is re-raised at the end."""
        steps = [self._stop_producer, self._stop_post,
                 lambda: self.cutters.shutdown(wait=True, cancel_futures=True),
                 lambda: self.readers.shutdown(wait=True, cancel_futures=True)]
        interrupted = False
        for step in steps:
            while True:
                try:
                    step()
                    break
                except KeyboardInterrupt:
                    interrupted = True
        if interrupted and not any(isinstance(e, KeyboardInterrupt) for e in exc):
            raise KeyboardInterrupt

    def _stop_producer(self) -> None:
        if self.producer is not None:
            self.producer.stop()

    def _stop_post(self) -> None:
        for fut, _ in self.decoding:
            fut.cancel()
        self.post.shutdown(wait=True, cancel_futures=True)


#: The CUDA priority of the stream the engine runs on (lower is higher; None: the calling thread's
#: current stream). The reader's kernels (predictor, cuts) and the decode run on streams of normal
#: priority beside it: where they compete for the GPU, the engine's blocks are scheduled first.
ENGINE_STREAM_PRIORITY: int | None = -1


class SceneExecutor:
    """Runs scenes through one loaded engine with one resolved plan (load once, run many)."""

    def __init__(self, plan: RunPlan, engine: Engine, warmup: bool = True, like: Path | None = None) -> None:
        """``warmup``: prepare the engine now (:meth:`warm_up`, for scenes ``like`` the one given); False
        leaves it to the caller, e.g. in another thread while the first scene opens (``run``'s
        ``engine_ready``)."""
        self.plan, self.engine, self.meta = plan, engine, engine.meta
        self.thresholds = Thresholds(plan, self.meta)
        self.decoder = TileDecoder(plan, self.meta, self.thresholds)
        self._upload_stream: torch.cuda.Stream | None = None
        self._decode_stream: torch.cuda.Stream | None = None
        self._read_stream: torch.cuda.Stream | None = None
        self._engine_stream: torch.cuda.Stream | None = None
        if engine.device.type == "cuda":
            if ENGINE_STREAM_PRIORITY is not None:
                self._engine_stream = torch.cuda.Stream(device=engine.device, priority=ENGINE_STREAM_PRIORITY)
            self._upload_stream = torch.cuda.Stream(device=engine.device)
            self._decode_stream = torch.cuda.Stream(device=engine.device)
            self._read_stream = torch.cuda.Stream(device=engine.device)  # the GPU reading path's decodes and cuts
        if warmup:
            self.warm_up(like)

    def warm_up(self, like: Path | None = None) -> None:
        """Prepare the engine for the plan's batches (on CUDA its graph is captured here, not in the first
        scene). With ``like``, a scene whose batches the coming ones resemble (its dtype and bands), the
        graph captured is the one such a scene runs: scaling and model together."""
        hint = self.scene_like(like) if like is not None and self.engine.device.type == "cuda" else None  # a CPU engine captures nothing
        self.engine.warmup(self.plan.engine.batch_size, hint)

    def scene_like(self, scene: Path) -> SceneLike | None:
        """What ``scene``'s batches will look like, from its header (None where it cannot be told: the run
        then reports what is wrong with the scene, in its own words, and once)."""
        sp = self.plan.scaling
        try:
            with _quiet_this_thread(), RasterSource(scene_path(scene), channels=sp.channels, bands=sp.bands, scale=sp.scale,
                                                     fill_value=sp.nodata_fill) as src:
                norm = Normalizer(src, self.engine.device, torch_dtype(self.engine.input_dtype), sp.nodata_fill,
                                  scale=ScaleInfo("fixed", 0.0, 1.0), upload_stream=self._upload_stream)
                return SceneLike(norm, pixel_torch_dtype(src.dtype), len(src.plan.indexes))
        except Exception:  # noqa: BLE001 - any problem with the scene is the run's to report
            return None

    def run(self, scene: Path, output: Path | None = None, progress: bool = False,
            engine_ready: Callable[[], object] | None = None) -> SceneResult:
        """Detect in ``scene``, write ``output`` (temporary name, then renamed) if given.

        ``engine_ready``: waited for just before the first inference (e.g. the warm-up, still running in
        another thread): the scene opens and its first batches decode meanwhile. The time waited is
        not the scene's: it is left out of the reported seconds (stage ``wait_for_engine``).
        """
        start = time.perf_counter()
        scene = scene_path(scene)  # a URL or /vsi path stays as written
        if output is not None:
            check_writable(output)
        stats = RunStats()
        ex, sp = self.plan.execution, self.plan.scaling
        import rasterio

        # rasterio hands an integer GDAL_CACHEMAX to GDALSetCacheMax64: bytes, not GDAL's megabytes (16 there
        # was a 16-byte cache, and a decimated sample read of a 2048² scene took 3.7 s instead of 0.04 s)
        with rasterio.Env(GDAL_CACHEMAX=ex.gdal_cachemax_mb << 20) if ex.gdal_cachemax_mb else nullcontext():
            t_open = time.perf_counter()
            stats.add_time("setup", t_open - start)
            # one handle, for the header: the reader threads' own are opened once the reading path is known
            # (_infer_scene), and only where they read through GDAL
            src = RasterSource(scene, channels=sp.channels, bands=sp.bands, scale=sp.scale, fill_value=sp.nodata_fill,
                               handles=0)
            stats.add_time("open", time.perf_counter() - t_open)  # header and georeferencing
            try:
                with _Threads(ex) as threads:
                    parts, scale = self._infer_scene(src, threads, stats, progress, engine_ready)
                # every thread is done with the dataset now; it closes in the finally below
                t0 = time.perf_counter()
                merged = stitch_scene(parts, self.plan, self.meta, self.thresholds)
                frame = georeference(merged, self.plan, self.meta, src.transform, src.crs, scene.name, (src.width, src.height))
                stats.add_time("stitch", time.perf_counter() - t0)
                facts = {
                    "scene": scene.name, "scene_size": [src.width, src.height],
                    "georeferencing": src.georef,
                    "bands": list(src.plan.indexes), "band_combine": src.plan.combine, "scale": scale.as_dict(),
                    "reader": stats.reader,
                }
                band_plan = src.plan
            finally:
                src.close()
        # the scene's slabs, batches and decode buffers are all free now: hand their pages back before the next scene
        trim_heap()
        names = self.meta.names
        for cid in merged.class_ids.tolist():
            stats.per_class[names[cid]] = stats.per_class.get(names[cid], 0) + 1
        def scene_seconds() -> float:  # the wait for the engine (its warm-up) is not the scene's
            return time.perf_counter() - start - stats.stage_seconds.get("wait_for_engine", 0.0)

        stats.seconds = scene_seconds()
        facts["output_crs"] = frame.crs.to_string() if frame.crs is not None else None  # what was written, after any fallback
        facts["coordinates"] = coordinates_label(frame.crs)  # "native" when a CRS had no way to WGS84
        facts["tiles"] = {"total": stats.tiles_total, "read": stats.tiles_read, "skipped_nodata": stats.tiles_skipped}
        meta = run_metadata(self.plan, facts, f"rs-detect {__version__}")
        if output is not None:
            t0 = time.perf_counter()
            write_detections(frame, output, meta)
            stats.add_time("write", time.perf_counter() - t0)
            stats.seconds = scene_seconds()
        return SceneResult(scene, output, frame, merged, stats, meta, self.plan, band_plan, scale)

    def _infer_scene(self, src: RasterSource, threads: _Threads, stats: RunStats, progress: bool,
                     engine_ready: Callable[[], object] | None = None) -> tuple[list[Detections], ScaleInfo]:
        """Read, infer and decode every tile (main thread: upload and inference); the detections of each batch."""
        t_scene = time.perf_counter()
        plan, ex = self.plan, self.plan.execution
        tiling, eng = plan.tiling, plan.engine
        stats.tiles_total = tile_count(src.width, src.height, tiling.tile_size, tiling.overlap)
        tiles = iter_tiles(src.width, src.height, tiling.tile_size, tiling.overlap, src.transform)
        # the reading path first: it says how the stretch's sample is read and whether the reader threads
        # need GDAL handles. Its batches queue nothing until the producer thread starts them below
        path = scene_batches(src, tiles, ex.reader, self.engine.device, self._read_stream, threads.readers, threads.cutters,
                             eng.batch_size, eng.imgsz, ex.pin_memory, ex.read_ahead, ex.read_threads, tiling.stride)
        stats.reader = path.label
        if path.needs_handles:
            t0 = time.perf_counter()
            src.open_handles(ex.read_threads)
            stats.add_time("open", time.perf_counter() - t0)
        scale_job = measure_scale(src, threads.readers, sample=path.sample, plan=path.sample_plan)  # queued ahead of any tile
        norm: Normalizer | None = None
        parts: list[Detections] = []
        bar = tqdm(total=stats.tiles_total, unit="tile", desc=src.name, disable=not progress,
                   file=sys.stderr, dynamic_ncols=True, leave=False)
        decoding = threads.decoding

        def collect() -> None:
            fut, n = decoding.popleft()
            dets = fut.result()
            parts.append(dets)
            stats.tiles_read += n
            stats.detections_raw += int(self.thresholds.passing(dets).sum())
            bar.update(n)
            bar.set_postfix(detections=stats.detections_raw, refresh=False)

        trim = HeapTrimmer()
        engine_stream = torch.cuda.stream(self._engine_stream) if self._engine_stream is not None else nullcontext()
        with bar, engine_stream:
            t_wait = time.perf_counter()
            for item in threads.produce(path.batches):
                waited = time.perf_counter() - t_wait
                stats.add_time("wait_for_reader", waited)
                stats.reader_waits.append((round(t_wait - t_scene, 4), round(waited, 4)))
                if "first_batch" not in stats.stage_seconds:
                    stats.add_time("first_batch", waited)  # the engine's idle start: part of wait_for_reader
                if isinstance(item, SkippedTile):
                    stats.tiles_skipped += 1
                    bar.update(1)
                    t_wait = time.perf_counter()
                    continue
                if norm is None:  # the stretch is ready by now, or soon: its sample jobs were queued first
                    if engine_ready is not None:
                        t0 = time.perf_counter()
                        engine_ready()
                        stats.add_time("wait_for_engine", time.perf_counter() - t0)
                    norm = Normalizer(src, self.engine.device, torch_dtype(self.engine.input_dtype), plan.scaling.nodata_fill,
                                      scale=scale_job.result(), upload_stream=self._upload_stream)
                t0 = time.perf_counter()
                raw = self.engine.infer_normalized(*norm.upload(item), norm)
                ready = None
                if raw.is_cuda:
                    ready = torch.cuda.Event(blocking=True)
                    ready.record()
                stats.add_time("infer", time.perf_counter() - t0)
                # decode + NMS of this batch overlap the next batch's inference
                decoding.append((threads.post.submit(self._postprocess, raw, item.tiles, stats, ready), item.size))
                while len(decoding) > ex.decode_ahead:
                    collect()
                trim()
                t_wait = time.perf_counter()
            t0 = time.perf_counter()
            while decoding:
                collect()
            stats.add_time("drain", time.perf_counter() - t0)  # decoding the last batches after the last inference
        return parts, scale_job.result()

    def _postprocess(self, raw: torch.Tensor, tiles: tuple[Tile, ...], stats: RunStats,
                     ready: torch.cuda.Event | None = None) -> Detections:
        """Decode + NMS + shift to scene pixels (the post thread); on a GPU, on the decode stream.

        Decoding has data-dependent shapes, so it synchronises its stream. On the engine's stream that
        would wait for every batch queued behind this one and let the GPU run dry; on the decode stream
        it waits for this batch's ``ready`` event alone. The thread sleeps on that event (a blocking
        one) rather than spinning in the decode's synchronisation, which would keep a core busy.
        """
        t0 = time.perf_counter()
        if ready is None or self._decode_stream is None:
            out = self.decoder(raw, tiles)
        else:
            ready.synchronize()
            with torch.cuda.stream(self._decode_stream):
                self._decode_stream.wait_event(ready)
                raw.record_stream(self._decode_stream)
                out = self.decoder(raw, tiles)
        stats.add_time("postprocess", time.perf_counter() - t0)
        return out
