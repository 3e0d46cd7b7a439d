"""Throughput and memory of the scene pipeline against the engine's own speed (not a test).

    # scenes (uint8/uint16, tiled/striped, DEFLATE/LZW), written in row bands with GDAL's threads
    python benchmarks/bench_pipeline.py scenes --out /tmp/scenes --spec 8192:uint16:tiled:deflate ...
    # engine-only vs end-to-end for each scene, one fresh process per scene (peak RSS per scene)
    python benchmarks/bench_pipeline.py run --model m.torchscript --device cuda --batch 16 \
        --scenes /tmp/scenes/*.tif --csv out.csv --png out.png [--seed-baseline SCENE]
    # the reading path alone: windows decoded, cut, uploaded and scaled, then dropped (no model)
    python benchmarks/bench_pipeline.py reader --scene /tmp/scenes/scene_32768_uint16_tiled_deflate.tif --device cuda
    # peak RSS as the scene grows, with a fake engine (no model needed)
    python benchmarks/bench_pipeline.py memory --sizes 2048,16384

Engine-only: batches preloaded on the engine's device, no I/O, timed with the device synchronised.
End-to-end: ``ScenePipeline.run`` on the scene (reading, scaling, inference, decode, NMS, stitching;
no output file), tiles per second. The seed baseline runs the seed document's way: the engine loaded
and buffers set up for every batch, synchronous copies, scaling and decoding on the CPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rs_detect import executor as rs_executor  # noqa: E402
from rs_detect import memory as rs_memory  # noqa: E402
from rs_detect.config import Config  # noqa: E402
from rs_detect.engines import load_engine  # noqa: E402
from rs_detect.engines.base import Engine  # noqa: E402
from rs_detect.types import ModelMeta  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def memory_breakdown() -> dict[str, float | int | None]:
    """What the resident size is made of now (anonymous vs file-backed pages, Linux) and the pinned
    host allocator's blocks (torch's caching host allocator: what batches in flight keep resident)."""
    now = RssTrace.sample()
    stats = torch.cuda.host_memory_stats() if torch.cuda.is_available() else {}
    return {
        "rss_anon_mb": now.get("anon"), "rss_file_mb": now.get("file"), "pinned_mb": now.get("pinned"),
        "pinned_peak_mb": round(stats["allocated_bytes.peak"] / 2**20, 1) if "allocated_bytes.peak" in stats else None,
        "pinned_blocks": stats.get("allocations.current"),
    }


# -- scenes -------------------------------------------------------------------------------------------


def write_scene(path: Path, size: int, dtype: str, layout: str, compress: str, seed: int = 0, height: int | None = None) -> Path:
    """A textured scene with bright objects, written 1024 rows at a time (never whole in memory);
    ``size`` wide and ``height`` (default: ``size``) high."""
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    base = rng.normal(0.35, 0.08, (2048, 2048)).astype(np.float32)
    k = np.ones(9, dtype=np.float32) / 9
    base = np.apply_along_axis(lambda r: np.convolve(r, k, "same"), 1, base)  # some texture, compressible
    for _ in range(60):  # bright boxes: something for a detector to look at
        y, x = rng.integers(0, 1990, 2)
        base[y : y + rng.integers(15, 60), x : x + rng.integers(15, 60)] = 0.9
    base = np.clip(base, 0, 1)
    scale, offset = (250.0, 0.0) if dtype == "uint8" else (3500.0, 300.0)
    height = height or size
    prof = dict(driver="GTiff", width=size, height=height, count=1, dtype=dtype, crs="EPSG:32633",
                transform=from_origin(500000, 4500000, 0.5, 0.5), compress=compress, NUM_THREADS="ALL_CPUS", BIGTIFF="IF_SAFER")
    if layout == "tiled":
        prof.update(tiled=True, blockxsize=512, blockysize=512)
    with rasterio.open(path, "w", **prof) as ds:
        for y in range(0, height, 1024):
            h = min(1024, height - y)
            rows = np.roll(base, shift=(y * 7) % 2048, axis=0)
            band = np.tile(rows, (1, -(-size // 2048)))[: ((h + 2047) // 2048) * 2048][:h, :size]
            if band.shape[0] < h:
                band = np.concatenate([band] * (-(-h // band.shape[0])))[:h]
            ds.write((band * scale + offset).astype(dtype), 1, window=rasterio.windows.Window(0, y, size, h))
    return path


# -- engines ------------------------------------------------------------------------------------------


class NullEngine(Engine):
    """Returns an all-zero YOLOv8 output: measures everything but the model."""

    backend = "null"

    def __init__(self, imgsz: int = 1024) -> None:
        from rs_detect import DOTA_CLASSES

        super().__init__(ModelMeta(names=DOTA_CLASSES, imgsz=imgsz, source="null"), torch.device("cpu"))

    def _infer(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        return torch.zeros((images.shape[0], self.meta.output_channels, self.meta.num_anchors))


class SeedStyleEngine(Engine):
    """The seed's loop: load the model and set up buffers per batch, synchronous copies, CPU output."""

    backend = "seed-style"

    def __init__(self, path: Path, device: str) -> None:
        self.path, self.dev = path, device
        probe = load_engine(path, device=device)
        super().__init__(probe.meta, torch.device("cpu"))
        self._half = probe.input_dtype == np.float16
        probe.close()

    def _infer(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        engine = load_engine(self.path, device=self.dev)  # deserialised for every batch, as in the seed
        x = torch.from_numpy(np.asarray(images, dtype=np.float32))  # pageable host memory
        out = engine.infer(x.to(engine.device).half() if self._half else x.to(engine.device))
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        result = out.float().cpu()
        engine.close()
        return result


def engine_only(engine: Engine, batch: int, iters: int) -> float:
    """Tiles/s of ``engine.infer`` on preloaded device batches (no I/O)."""
    dtype = torch.float16 if engine.input_dtype == np.float16 else torch.float32
    x = torch.rand((batch, engine.meta.channels, engine.meta.imgsz, engine.meta.imgsz), device=engine.device).to(dtype)
    cuda = engine.device.type == "cuda"
    for _ in range(3):
        engine.infer(x)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        engine.infer(x)
    if cuda:
        torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - t0)


class RssTrace:
    """Samples what the resident size is made of while a block runs (every ``every_s``): RSS, its
    anonymous and file-backed parts (Linux), the pinned host allocator's bytes and the reader's slabs.

    ``at_peak`` is the sample with the highest RSS: what was resident when the peak was set."""

    def __init__(self, every_s: float = 0.01) -> None:
        self.every_s = every_s
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()

    @staticmethod
    def sample() -> dict[str, float]:
        from rs_detect.io.prefetch import slab_memory

        out: dict[str, float] = {}
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key[3:].lower() if key.startswith("Rss") else "rss"] = round(int(value.split()[0]) / 1024.0, 1)
        except OSError:
            pass
        if torch.cuda.is_available():
            stats = torch.cuda.host_memory_stats()
            if "allocated_bytes.current" in stats:  # what the pinned allocator holds, cached blocks included
                out["pinned"] = round(stats["allocated_bytes.current"] / 2**20, 1)
        out["slabs"] = round(slab_memory()["live"] / 2**20, 1)
        return out

    def __enter__(self) -> RssTrace:
        self._t0 = time.perf_counter()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append({"t": round(time.perf_counter() - self._t0, 3), **self.sample()})
            time.sleep(self.every_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    @property
    def at_peak(self) -> dict[str, float] | None:
        with_rss = [s for s in self.samples if "rss" in s]
        return max(with_rss, key=lambda s: s["rss"]) if with_rss else None


class ThreadCpu:
    """CPU seconds each kind of thread spent while a block runs (Linux: /proc/self/task), sampled every
    ``every_s`` so that threads that end inside the block are counted (up to their last sample).

    Kinds: a Python thread's name up to its first ``_`` or digit run (``rs-read``, ``rs-post``,
    ``MainThread``); threads Python did not start (CUDA's, GDAL's, torch's) are ``native``.
    ``process`` is the whole process's CPU time over the block, from /proc/self/stat."""

    def __init__(self, every_s: float = 0.02) -> None:
        self.every_s = every_s
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._kind: dict[int, str] = {}
        self._stop = threading.Event()
        self.by_kind: dict[str, float] = {}
        self.process_s = 0.0
        self.wall_s = 0.0

    @staticmethod
    def _cpu(stat: str) -> float:
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _sample(self) -> None:
        import re

        names = {t.native_id: t.name for t in threading.enumerate()}
        for task in Path("/proc/self/task").iterdir():
            try:
                cpu = self._cpu((task / "stat").read_text())
            except (OSError, ValueError, IndexError):
                continue
            tid = int(task.name)
            self._first.setdefault(tid, 0.0 if self._started else cpu)  # a thread born inside the block: all of its time
            self._last[tid] = cpu
            if tid not in self._kind or self._kind[tid] == "native":
                name = names.get(tid)
                self._kind[tid] = "native" if name is None else re.split(r"[_\d]", name, maxsplit=1)[0] or name

    def __enter__(self) -> ThreadCpu:
        self._started = False
        self._sample()
        self._started = True
        self._p0 = self._cpu(Path("/proc/self/stat").read_text())
        self._t0 = time.perf_counter()
        self._t = threading.Thread(target=self._run, name="bench-cpu-sampler", daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self._sample()
        self.wall_s = time.perf_counter() - self._t0
        self.process_s = self._cpu(Path("/proc/self/stat").read_text()) - self._p0
        for tid, last in self._last.items():
            kind = self._kind.get(tid, "native")
            if kind == "bench-cpu-sampler":
                continue
            self.by_kind[kind] = self.by_kind.get(kind, 0.0) + last - self._first.get(tid, 0.0)

    def report(self) -> dict[str, Any]:
        return {"wall_s": round(self.wall_s, 3), "process_cpu_s": round(self.process_s, 3),
                "by_thread_kind_s": {k: round(v, 3) for k, v in sorted(self.by_kind.items(), key=lambda kv: -kv[1])}}


class ProducerTimes:
    """Seconds spent inside the block reader, within a block: the producer thread waiting for each
    group's reads and inflates and uploading it (``GpuBlockReader._decode``) and cutting batches
    (``cut``); the reader pool's jobs, each with its thread: a group's blocks read and inflated
    (``_inflate_into``) and the stretch's sample windows (``BlockSampler.__call__``). ``early``
    lists the jobs that started in the first ``EARLY_S``: what the first batch waited for."""

    METHODS = {"decode": ("GpuBlockReader", "_decode"), "cut": ("GpuBlockReader", "cut"),
               "inflate": ("GpuBlockReader", "_inflate_into"), "sample": ("BlockSampler", "__call__")}
    EARLY_S = 0.15

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[float, float, str]]] = {name: [] for name in self.METHODS}

    def __enter__(self) -> ProducerTimes:
        from rs_detect.io import gpu_blocks

        self._saved = {(cls, attr): getattr(getattr(gpu_blocks, cls), attr) for cls, attr in self.METHODS.values()}
        t_zero = time.perf_counter()
        for name, (cls, attr) in self.METHODS.items():
            def timed(*a: Any, _fn: Any = self._saved[cls, attr], _out: list = self.calls[name], **k: Any) -> Any:
                t = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    _out.append((round(t - t_zero, 4), round(time.perf_counter() - t, 4), threading.current_thread().name))
            setattr(getattr(gpu_blocks, cls), attr, timed)
        return self

    def __exit__(self, *exc: object) -> None:
        from rs_detect.io import gpu_blocks

        for (cls, attr), fn in self._saved.items():
            setattr(getattr(gpu_blocks, cls), attr, fn)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, calls in self.calls.items():
            d = [c[1] for c in calls]
            out[name] = {"calls": len(d), "total_s": round(sum(d), 3), "max_s": max(d) if d else None,
                         "slowest": [c[:2] for c in sorted(calls, key=lambda c: -c[1])[:5]]}
        early = sorted((c[0], c[1], name, c[2]) for name in ("sample", "inflate") for c in self.calls[name] if c[0] < self.EARLY_S)
        out["early"] = {"jobs": len(early), "threads": len({e[3] for e in early}),
                        "sample_done_s": max((e[0] + e[1] for e in early if e[2] == "sample"), default=None),
                        "list": [e[:3] for e in early]}
        return out


def waits_report(waits: list[tuple[float, float]]) -> dict[str, Any]:
    """The engine's waits for the reader: their sum, the first batch's, and the largest others (when, how long)."""
    rest = waits[1:]
    return {"batches": len(waits), "total_s": round(sum(w for _, w in waits), 3), "first_s": waits[0][1] if waits else None,
            "over_1ms": sum(1 for _, w in rest if w > 0.001), "largest": sorted(rest, key=lambda x: -x[1])[:8]}


class GpuTimeline:
    """When the engine's stream ran each batch, from CUDA events around ``engine.infer_normalized``:
    how long the GPU waited before the first batch, the gaps between batches (the stream had nothing
    to run: the host, or the batch's pixels on the read stream, were late), each batch's model time
    (beside engine-only's) and the time after the last batch. Nothing is recorded off a GPU."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.cuda = engine.device.type == "cuda"
        self.events: list[tuple[Any, Any]] = []

    def __enter__(self) -> GpuTimeline:
        if self.cuda:
            torch.cuda.synchronize()
            self.ref = torch.cuda.Event(enable_timing=True)
            self.ref.record()  # the stream is idle: this completes at once, at the run's start
            self.t0 = time.perf_counter()
            inner = self.engine.infer_normalized

            def timed(*a: Any, **k: Any) -> Any:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                out = inner(*a, **k)
                e1.record()
                self.events.append((e0, e1))
                return out

            self.engine.infer_normalized = timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.seconds = time.perf_counter() - self.t0
            del self.engine.infer_normalized  # the class's method again
            torch.cuda.synchronize()

    def report(self) -> dict[str, Any] | None:
        if not self.cuda or not self.events:
            return None
        ms = self.ref.elapsed_time
        starts = [ms(a) for a, _ in self.events]
        ends = [ms(b) for _, b in self.events]
        runs = [e - s for s, e in zip(starts, ends)]
        gaps = [(i, round(starts[i] - ends[i - 1], 2)) for i in range(1, len(starts))]
        return {"batches": len(runs), "first_start_ms": round(starts[0], 1), "gaps_ms": round(sum(g for _, g in gaps), 1),
                "gaps_over_0_5ms": sum(1 for _, g in gaps if g > 0.5), "largest_gaps": sorted(gaps, key=lambda g: -g[1])[:8],
                "batch_ms_median": round(float(np.median(runs)), 2), "batch_ms_max": round(max(runs), 2), "busy_ms": round(sum(runs), 1),
                "after_last_ms": round(self.seconds * 1000 - ends[-1], 1), "wall_ms": round(self.seconds * 1000, 1)}


class GpuSampler:
    """Mean GPU utilisation while a block runs (NVML), or None where there is no GPU."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._h = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
        except Exception:
            self._nvml = None

    def __enter__(self) -> GpuSampler:
        if self._nvml is not None:
            self._t = threading.Thread(target=self._run, daemon=True)
            self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._h).gpu)
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def use_inflate(how: str) -> None:
    """``direct``: the block reader inflates into the pinned buffer with libdeflate's C functions (the
    default); ``copy``: through the deflate package's Python function and a copy (what it did before)."""
    if how == "copy":
        from rs_detect.io import tiff_blocks

        tiff_blocks._libdeflate_c = lambda: None


# -- one measurement (in a fresh process) --------------------------------------------------------------


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    import rasterio

    from rs_detect.io.prefetch import reset_slab_peak, slab_memory
    from rs_detect.io.tiling import tile_count
    from rs_detect.pipeline import ScenePipeline

    scene = Path(args.scene)
    use_inflate(args.inflate)
    if args.engine_priority == "current":  # an experiment: the engine on the main thread's current stream, as before
        rs_executor.ENGINE_STREAM_PRIORITY = None
    if args.scaling == "arithmetic":  # an experiment: the stretch computed pixel by pixel, as before
        from rs_detect import preprocess

        preprocess._TABLE_BASE.clear()
    from rs_detect.io import gpu_blocks

    if args.sample_job_windows:  # an experiment: the stretch's sample windows a reader job reads (1: one each, as before)
        gpu_blocks.SAMPLE_JOB_WINDOWS = args.sample_job_windows

    def scene_scratch() -> None:  # an experiment: the reader threads' compressed-byte buffers new to each scene, as before
        if args.scratch == "scene":
            gpu_blocks._THREAD_SCRATCH = threading.local()

    if args.trim_interval:  # an experiment: how often the pipeline hands freed heap pages back (rs_detect.memory)
        rs_memory.TRIM_EVERY_S = args.trim_interval
    if args.switch_interval:  # an experiment: how long a thread waiting for the GIL may wait (default 5 ms)
        sys.setswitchinterval(args.switch_interval)
    if args.jit_profiling:  # TorchScriptEngine turns the profiling executor off; this measures it on again
        import rs_detect.engines.torch as ts

        ts.use_simple_executor = lambda: torch._C._jit_set_profiling_executor(True)
    # the resident size (and its parts) after each step, with the peak so far: where the baseline comes from
    marks: dict[str, dict[str, float]] = {}

    def mark(step: str) -> None:
        marks[step] = {**RssTrace.sample(), "peak": round(peak_rss_mb(), 1)}

    mark("start")
    if args.model == "null":
        engine: Engine = NullEngine()
    elif args.seed_style:
        engine = SeedStyleEngine(Path(args.model), args.device)
    else:
        engine = load_engine(Path(args.model), device=args.device)
    mark("engine")
    cfg = Config(batch_size=args.batch, device=args.device, read_threads=args.threads, prefetch=args.prefetch, classes=None, conf=0.25,
                 reader=args.reader)
    t_setup = time.perf_counter()
    pipe = ScenePipeline(engine, cfg, None if args.model == "null" else Path(args.model))  # captures the CUDA graph
    setup_s = time.perf_counter() - t_setup
    mark("pipeline")
    # engine-only runs as many batches as the scene has (at least --engine-iters): the same sustained
    # load, so clocks and power settle the same way in both figures
    with rasterio.open(scene) as ds:
        batches = -(-tile_count(ds.width, ds.height, pipe.tile_size, cfg.overlap) // pipe.batch_size)
    iters = max(args.engine_iters, batches)
    eng = 0.0 if args.model == "null" or args.seed_style else engine_only(engine, pipe.batch_size, iters)
    mark("engine_only")
    if engine.device.type == "cuda" and args.warmup:  # warm the kernels for the scene's batch shapes
        scene_scratch()
        pipe.run(scene)
        mark("warmup_run")
    rss_before = peak_rss_mb()
    reset_slab_peak()
    scene_scratch()
    with GpuSampler() as gpu, RssTrace() as trace, ThreadCpu() as cpu, ProducerTimes() as producer, GpuTimeline(engine) as timeline:
        t0 = time.perf_counter()
        result = pipe.run(scene)
        seconds = time.perf_counter() - t0
    slab_peak = slab_memory()["peak"] / 2**20
    if getattr(args, "trace", None):
        Path(args.trace).write_text(json.dumps(trace.samples))
    tiles = result.stats.tiles_read + result.stats.tiles_skipped
    e2e = tiles / seconds
    # --repeat: engine-only and end-to-end again, in turn, so that a drift of the machine's speed (a
    # shared CPU) hits both figures of a pair alike; the medians are reported, each pair's ratio too
    pairs = [(eng, e2e)]
    for _ in range(args.repeat - 1):
        e = engine_only(engine, pipe.batch_size, iters) if eng else 0.0
        scene_scratch()
        t0 = time.perf_counter()
        pipe.run(scene)
        pairs.append((e, tiles / (time.perf_counter() - t0)))
    ratios = [round(b / a, 3) for a, b in pairs if a]
    eng, e2e = float(np.median([a for a, _ in pairs])), float(np.median([b for _, b in pairs]))
    return {
        "scene": scene.name, "model": Path(args.model).stem, "backend": engine.backend + ("-seed" if args.seed_style else ""), "device": args.device,
        "batch": pipe.batch_size, "prefetch": pipe.prefetch, "reader": result.stats.reader, "jit_profiling": args.jit_profiling, "switch_interval_s": sys.getswitchinterval(), "trim_every_s": rs_memory.TRIM_EVERY_S, "tiles": tiles, "seconds": round(seconds, 3),
        "cuda_graphs": bool(getattr(engine, "cuda_graphs", False)), "pipeline_setup_s": round(setup_s, 3),
        "engine_iters": 0 if args.model == "null" or args.seed_style else iters,
        "engine_tiles_s": round(eng, 1), "e2e_tiles_s": round(e2e, 1),
        "ratio": float(np.median(ratios)) if ratios else None, "ratios": ratios, "repeat": len(pairs),
        "peak_rss_mb": round(peak_rss_mb(), 1), "rss_before_run_mb": round(rss_before, 1),
        "slab_peak_mb": round(slab_peak, 1), "at_run_peak": trace.at_peak, "marks": marks,
        "gpu_util": gpu.mean, "detections": len(result.detections), **memory_breakdown(),
        "stages_s": {k: round(v, 3) for k, v in result.stats.stage_seconds.items()},
        "cpu": cpu.report(), "inflate": args.inflate, "engine_priority": args.engine_priority, "scaling": args.scaling,
        "sample_job_windows": gpu_blocks.SAMPLE_JOB_WINDOWS, "scratch": args.scratch, "producer": producer.report(),
        "reader_waits": waits_report(result.stats.reader_waits), "gpu_timeline": timeline.report(),
    }


# -- the reader alone ----------------------------------------------------------------------------------


def reader_only(args: argparse.Namespace) -> dict[str, Any]:
    """Tiles/s of the reading path alone: windows decoded, cut, uploaded and scaled into the engine's
    device memory (as the model would take them), then dropped. No model, no decode, no stitching.

    GB/s: ``scene_gbps`` counts the scene's pixels once (what was decoded), ``window_gbps`` the window
    pixels handed over (overlap counted as often as windows hold it)."""
    from concurrent.futures import ThreadPoolExecutor

    from rs_detect.config import auto_prefetch, cutter_threads
    from rs_detect.executor import measure_scale
    from rs_detect.io.gpu_blocks import scene_batches
    from rs_detect.io.prefetch import reset_slab_peak, slab_memory
    from rs_detect.io.reader import RasterSource
    from rs_detect.io.tiling import iter_tiles, tile_count
    from rs_detect.preprocess import Normalizer
    from rs_detect.types import SkippedTile

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    size, overlap = 1024, 192
    use_inflate(args.inflate)
    if args.group_rows:  # an experiment: rows of blocks decoded per group (nvCOMP batch size, pinned buffer size)
        import rs_detect.io.gpu_blocks as gb

        gb.GROUP_ROWS = gb.HOST_GROUP_ROWS = args.group_rows
    rows = []
    for rep in range(args.repeat + 1):  # the first pass warms the page cache, the CUDA context and the allocator
        t_open = time.perf_counter()
        src = RasterSource(args.scene, channels=1)
        readers = ThreadPoolExecutor(args.threads, thread_name_prefix="rs-read")
        cutters = ThreadPoolExecutor(cutter_threads(args.threads), thread_name_prefix="rs-cut")
        tiles = iter_tiles(src.width, src.height, size, overlap, src.transform)
        read_stream = torch.cuda.Stream(device=dev) if cuda else None
        # as the executor starts a scene: the reading path, the GDAL handles only where its threads read
        # through GDAL, and the stretch's sample read by that path in the reader threads
        path = scene_batches(src, tiles, args.reader, dev, read_stream, readers, cutters, args.batch, size, cuda,
                             args.prefetch or auto_prefetch(args.device, args.batch), args.threads, size - overlap)
        if path.needs_handles:
            src.open_handles(args.threads)
        scale = measure_scale(src, readers, sample=path.sample, plan=path.sample_plan).result()
        t_ready = time.perf_counter()
        stream = torch.cuda.Stream(device=dev) if cuda else None
        norm = Normalizer(src, dev, torch.float16 if cuda else torch.float32, 0.0, scale=scale, upload_stream=stream)
        n = 0
        reset_slab_peak()
        cpu = ThreadCpu().__enter__()
        t0 = time.perf_counter()
        reader = path.label
        for item in path.batches:
            if isinstance(item, SkippedTile):
                n += 1
                continue
            norm(item)
            n += item.size
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        cpu.__exit__()
        readers.shutdown()
        cutters.shutdown()
        total = tile_count(src.width, src.height, size, overlap)
        assert n == total, (n, total)
        item = src.dtype.itemsize
        row = {"scene": Path(args.scene).name, "reader": f"{args.reader}: {reader}",
               "dtype": str(src.dtype), "device": args.device, "threads": args.threads, "group_rows": args.group_rows or None,
               "batch": args.batch, "tiles": n, "seconds": round(dt, 3), "tiles_s": round(n / dt, 1),
               "scene_gbps": round(src.width * src.height * item / dt / 1e9, 2),
               "window_gbps": round(n * size * size * item / dt / 1e9, 2), "open_and_stretch_s": round(t_ready - t_open, 3),
               "slab_peak_mb": round(slab_memory()["peak"] / 2**20, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
               "inflate": args.inflate, "cpu": cpu.report()}
        src.close()
        if rep:
            rows.append(row)
            print(json.dumps(row), flush=True)
    best = max(rows, key=lambda r: r["tiles_s"])
    return {**best, "tiles_s_all": [r["tiles_s"] for r in rows]}


def run_many(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    if getattr(args, "trace_dir", None):
        args.trace_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(s, False) for s in args.scenes] + ([(args.seed_baseline, True)] if args.seed_baseline else [])
    for scene, seed in jobs:
        cmd = [sys.executable, __file__, "one", "--scene", scene, "--model", args.model, "--device", args.device,
               "--batch", str(args.batch), "--threads", str(args.threads), *(["--prefetch", str(args.prefetch)] if args.prefetch else []),
               "--engine-iters", str(args.engine_iters)] + (["--seed-style"] if seed else []) + (["--warmup"] if args.warmup else []) \
            + (["--jit-profiling"] if getattr(args, "jit_profiling", False) else []) \
            + (["--switch-interval", str(args.switch_interval)] if getattr(args, "switch_interval", 0.0) else []) \
            + (["--trim-interval", str(args.trim_interval)] if getattr(args, "trim_interval", 0.0) else []) \
            + ["--repeat", str(getattr(args, "repeat", 1)), "--reader", getattr(args, "reader", "auto"), "--inflate", getattr(args, "inflate", "direct")] \
            + ["--engine-priority", getattr(args, "engine_priority", "high"), "--scaling", getattr(args, "scaling", "table")] \
            + ["--sample-job-windows", str(getattr(args, "sample_job_windows", 0)), "--scratch", getattr(args, "scratch", "thread")] \
            + (["--trace", str(Path(args.trace_dir) / f"trace_{Path(scene).stem}{'_seed' if seed else ''}.json")] if getattr(args, "trace_dir", None) else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"measurement failed for {scene}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


JSON_FIELDS = ("stages_s", "ratios", "at_run_peak", "marks")  # written to the CSV as JSON


def read_row(raw: dict[str, str]) -> dict[str, Any]:
    """A CSV row of ``run`` back as the row it was written from (numbers, stages as a dict)."""
    row: dict[str, Any] = {}
    for k, v in raw.items():
        if k in JSON_FIELDS:
            row[k] = json.loads(v)
        elif v in ("", "None"):
            row[k] = None
        else:
            try:
                row[k] = float(v) if any(c in v for c in ".e") else int(v)
            except ValueError:
                row[k] = {"True": True, "False": False}.get(v, v)
    return row


def write_outputs(rows: list[dict[str, Any]], csv_path: Path | None, png: Path | None, title: str) -> None:
    if csv_path:
        keys = [k for k in rows[0] if k != "stages_s"] + ["stages_s"]
        with open(csv_path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow({**r, **{k: json.dumps(r[k]) for k in JSON_FIELDS if k in r}})
    print("\n| scene | backend | batch | tiles | engine-only tiles/s | end-to-end tiles/s | ratio | peak RSS MB | GPU util % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gpu = "" if r["gpu_util"] is None else f"{r['gpu_util']:.0f}"
        print(f"| {r['scene']} | {r['backend']} | {r['batch']} | {r['tiles']} | {r['engine_tiles_s']} | {r['e2e_tiles_s']} | {r['ratio']} | {r['peak_rss_mb']} | {gpu} |")
    if png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 4.5))
        labels = [f"{r['scene'].removeprefix('scene_').removesuffix('.tif')}\n{r.get('model') or r['backend']}"
                  + (" (seed's way)" if str(r["backend"]).endswith("-seed") else "") for r in rows]
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["engine_tiles_s"] for r in rows], 0.4, label="engine only")
        ax.bar(x + 0.2, [r["e2e_tiles_s"] for r in rows], 0.4, label="end to end")
        ax.set_xticks(x, labels, fontsize=7, rotation=20, ha="right")
        ax.set_ylabel("tiles / s (1024 x 1024)")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sc = sub.add_parser("scenes")
    sc.add_argument("--out", type=Path, required=True)
    sc.add_argument("--spec", nargs="+", required=True, help="SIZE:DTYPE:LAYOUT:COMPRESS, e.g. 8192:uint16:tiled:deflate (SIZE: N or WIDTHxHEIGHT)")
    for name in ("run", "one"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True)
        p.add_argument("--device", default="cpu")
        p.add_argument("--batch", type=int, default=16)
        p.add_argument("--threads", type=int, default=max(2, (os.cpu_count() or 2) - 2))
        p.add_argument("--prefetch", type=int, default=None, help="batches read ahead (default: the pipeline's: 48 // batch on a GPU, 2 on the CPU)")
        p.add_argument("--engine-iters", type=int, default=30)
        p.add_argument("--warmup", action="store_true")
        p.add_argument("--jit-profiling", action="store_true", help="TorchScript's profiling executor back on (off by default)")
        p.add_argument("--switch-interval", type=float, default=0.0, help="sys.setswitchinterval for the run (0: Python's 5 ms)")
        p.add_argument("--repeat", type=int, default=1, help="engine-only and end-to-end this many times in turn; medians reported")
        p.add_argument("--trim-interval", type=float, default=0.0, help="seconds between heap trims in the run (0: the pipeline's default)")
        p.add_argument("--reader", default="auto", choices=["auto", "gdal", "blocks", "nvcomp"], help="the reading path (Config.reader)")
        p.add_argument("--inflate", default="direct", choices=["direct", "copy"], help="the block reader's inflating (use_inflate)")
        p.add_argument("--engine-priority", default="high", choices=["high", "current"],
                       help="the engine on a high-priority stream of its own (the default), or on the thread's current stream")
        p.add_argument("--scaling", default="table", choices=["table", "arithmetic"],
                       help="8/16-bit pixels scaled through a table of every value (the default) or pixel by pixel")
        p.add_argument("--sample-job-windows", type=int, default=0,
                       help="the stretch's sample windows a reader job reads (0: the reader's default; 1: a job per window)")
        p.add_argument("--scratch", default="thread", choices=["thread", "scene"],
                       help="the reader threads' buffers for compressed bytes kept for the thread (the default) or new to each scene")
        if name == "run":
            p.add_argument("--scenes", nargs="+", required=True)
            p.add_argument("--seed-baseline", help="also run this scene the seed's way")
            p.add_argument("--trace-dir", type=Path, help="write each measured run's memory samples here (trace_SCENE.json)")
            p.add_argument("--csv", type=Path)
            p.add_argument("--png", type=Path)
            p.add_argument("--title", default="rs-detect: engine-only vs end-to-end")
        else:
            p.add_argument("--scene", required=True)
            p.add_argument("--trace", type=Path, help="write the measured run's memory samples (RssTrace) here, as JSON")
            p.add_argument("--seed-style", action="store_true")
    pl = sub.add_parser("plot", help="the table and PNG again from CSVs written by run (e.g. on another machine)")
    pl.add_argument("--csv", type=Path, nargs="+", required=True)
    pl.add_argument("--png", type=Path, required=True)
    pl.add_argument("--title", default="rs-detect: engine-only vs end-to-end")
    pl.add_argument("--labels", nargs="+", help="one per CSV, shown under its bars (e.g. the model)")
    rd = sub.add_parser("reader", help="the reading path alone (no model): tiles/s and GB/s decoded")
    rd.add_argument("--scene", required=True)
    rd.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    rd.add_argument("--batch", type=int, default=16)
    rd.add_argument("--threads", type=int, default=max(2, (os.cpu_count() or 2) - 4))
    rd.add_argument("--prefetch", type=int, default=None)
    rd.add_argument("--repeat", type=int, default=3, help="measured passes after one warm-up pass")
    rd.add_argument("--reader", default="auto", choices=["auto", "gdal", "blocks", "nvcomp"], help="the reading path (Config.reader)")
    rd.add_argument("--inflate", default="direct", choices=["direct", "copy"], help="the block reader's inflating (use_inflate)")
    rd.add_argument("--group-rows", type=int, default=0, help="pixel rows of a decode group (0: the reader's default)")
    mem = sub.add_parser("memory")
    mem.add_argument("--sizes", default="2048,16384")
    mem.add_argument("--out", type=Path, default=Path("/tmp/rs-mem"))
    args = ap.parse_args()

    if args.cmd == "scenes":
        args.out.mkdir(parents=True, exist_ok=True)
        for spec in args.spec:
            size, dtype, layout, comp = spec.split(":")
            t0 = time.perf_counter()
            w, _, h = size.partition("x")  # SIZE or WIDTHxHEIGHT
            p = write_scene(args.out / f"scene_{size}_{dtype}_{layout}_{comp}.tif", int(w), dtype, layout, comp, height=int(h) if h else None)
            print(f"{p} {p.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - t0:.1f} s", flush=True)
    elif args.cmd == "reader":
        print(json.dumps(reader_only(args)))
    elif args.cmd == "one":
        print(json.dumps(run_one(args)))
    elif args.cmd == "run":
        write_outputs(run_many(args), args.csv, args.png, args.title)
    elif args.cmd == "plot":
        labels = args.labels or [None] * len(args.csv)
        if len(labels) != len(args.csv):
            raise SystemExit("--labels: one per --csv")
        rows = [{**read_row(r), **({"model": lab} if lab else {})}
                for path, lab in zip(args.csv, labels) for r in csv.DictReader(open(path, newline=""))]
        write_outputs(rows, None, args.png, args.title)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        scenes = [str(write_scene(args.out / f"mem_{s}.tif", int(s), "uint8", "tiled", "deflate")) for s in args.sizes.split(",")]
        ns = argparse.Namespace(model="null", device="cpu", batch=8, threads=2, prefetch=2, engine_iters=0, scenes=scenes,
                                seed_baseline=None, warmup=False, jit_profiling=False)
        write_outputs(run_many(ns), None, None, "memory")


if __name__ == "__main__":
    main()
