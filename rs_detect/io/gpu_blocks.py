"""The block reader: a tiled GeoTIFF's blocks inflated by the reader threads, windows cut on the GPU.

At GPU speeds GDAL's reading is the bottleneck: on a 16-core H100 host it decodes about 1.6 GB/s of
uint16 pixels, where a YOLOv8n engine takes over 4 GB/s of windows. For the files it takes
(:func:`gpu_read_plan`), this reader does the least work per pixel on the CPU:

1. **Read and inflate** (reader pool jobs of ``HOST_CHUNK`` blocks): the blocks, found through the TIFF's
   own offsets and byte counts, are read with one ``preadv`` per run of adjacent blocks and inflated
   by libdeflate outside Python's lock, straight into the pinned buffer of their group (whole rows
   of blocks, about ``GROUP_BYTES`` of pixels; at most ``PINNED_BYTES`` in flight).
2. **Upload** (the producer thread, on the reader's CUDA stream): each group goes to the device in one
   copy; the horizontal predictor is undone there and the blocks are laid out as full-width rows.
3. **Cut**: the windows of a batch are gathered from those rows in one indexing step per row of
   windows, into the batch tensor on the device (padding and its mask where a window is short).

With ``decoder`` (:class:`~rs_detect.io.tiff_blocks.NvcompDecoder`, ``--reader nvcomp``) the blocks go
to the GPU compressed and nvCOMP inflates them there instead; measured slower on the benchmark
scenes and it takes the engine's SMs (docs/benchmarks.md). Uncompressed blocks are read into place.

Before all of these, the reader threads read the stretch's sample windows from the blocks too
(:class:`BlockSampler`: libdeflate and numpy on the CPU, the same values as GDAL's sample),
so they open no GDAL handle. A scene with overviews, or of at most 2048 px, is sampled by one
decimated GDAL read instead: one handle, opened by the thread that runs it.

The batch reaches the engine as a :class:`~rs_detect.types.RawBatch` already on the device, with an
event that the engine's stream waits for. Pixels are exactly those GDAL decodes (tested against the
GDAL reader). Steps 2 and 3 are written on torch tensors of any device, so the tests run the same
code on the CPU (``--reader blocks`` does too).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import NamedTuple

import numpy as np
import torch

from rs_detect.dtypes import torch_dtype
from rs_detect.io.tiff_blocks import (BlockDecoder, BlockFile, BlockLayout, HostInflater, InflateDecoder, NvcompDecoder, block_layout,
                                      inflater_name, nvcomp_available, undo_predictor, undo_predictor_host)
from rs_detect.io.prefetch import window_batches
from rs_detect.io.stretch import add_summaries
from rs_detect.types import RawBatch, SkippedTile, Tile

__all__ = ["BlockFile", "BlockLayout", "BlockSampler", "GpuBlockReader", "InflateDecoder", "NvcompDecoder", "ScenePath", "block_layout",
           "gpu_read_plan", "gpu_window_batches", "inflater_name", "scene_batches"]

# each reader thread's buffer for the compressed bytes of a job's blocks (GpuBlockReader._inflate_into),
# kept for the thread's life, so that a scene's first jobs, which the first batch waits for, do not
# first have to fault in fresh pages (14 threads at once on a GPU host)
_THREAD_SCRATCH = threading.local()

SampleJob = tuple[int, int, list[tuple[int, int]]]  # RasterSource.sample_plan's (row_off, height, [(col_off, width), ...])
Summary = np.ndarray | tuple[int, np.ndarray]  # RasterSource.sample_summary's: the values, or their counts

log = logging.getLogger(__name__)

GROUP_ROWS = 2048  # pixel rows of a group inflated by nvCOMP (one batch)
HOST_GROUP_ROWS = 0  # pixel rows of a group inflated on the CPU (0: about GROUP_BYTES of pixels, whole block rows)
GROUP_BYTES = 64 << 20  # a CPU-inflated group's pinned buffer: one copy to the device
PINNED_BYTES = 320 << 20  # groups in flight at most (pinned host memory): bounded by the scene's width, not its area
HOST_CHUNK = 16  # blocks a reader-pool job reads and inflates, at most (fewer where a group would give a thread nothing)
SAMPLE_JOB_WINDOWS = 4  # the stretch's sample windows of one grid row that a reader-pool job reads (1: a job per window)


def gpu_read_plan(src, device: torch.device, mode: str = "auto") -> tuple[BlockLayout | None, str]:
    """Whether ``src`` is read on ``device`` (its :class:`BlockLayout`) and, if not, why (one phrase).

    ``mode``: ``auto`` (this path wherever it applies on a GPU), ``gdal`` (never: GDAL's slab reader),
    ``blocks`` (this path on any device where the file allows it), ``nvcomp`` (this path with the
    blocks inflated on the GPU by nvCOMP; measured slower than the CPU's libdeflate on noisy uint16,
    and it takes GPU time from the engine: docs/benchmarks.md)."""
    if mode == "gdal":
        return None, "GDAL reading asked for"
    if device.type != "cuda" and mode not in ("blocks", "nvcomp"):
        return None, "engine not on a GPU"
    if src.has_mask:
        return None, "nodata or mask"
    if src.plan.combine not in ("direct", "replicate", "luminance"):
        return None, f"{src.plan.combine} bands"
    layout = block_layout(str(src.path), src.width, src.height, src.dtype, src.count)
    if isinstance(layout, str):
        return None, layout
    if mode == "nvcomp" and device.type == "cuda" and not nvcomp_available():
        return None, "nvCOMP not installed"
    return layout, ""


# -- rows of blocks and windows ---------------------------------------------------------------------


class GpuBlockReader:
    """Decodes a scene in groups of block rows and cuts windows from them on ``device``.

    Where the blocks are inflated: by default on the CPU (:class:`HostInflater` in the reader pool,
    up to ``HOST_CHUNK`` blocks a job, straight into the group's pinned buffer, which then goes to the
    device in one copy; each reader thread reads the compressed bytes into a buffer of its own, kept
    for the thread's life); with ``decoder`` (e.g. :class:`NvcompDecoder`) on the device, from the
    compressed bytes. Uncompressed blocks are read into place."""

    def __init__(self, src, layout: BlockLayout, device: torch.device, pool: ThreadPoolExecutor, ahead: int | None,
                 stream: torch.cuda.Stream | None, decoder: BlockDecoder | None = None) -> None:
        self.src, self.layout, self.device, self.pool = src, layout, device, pool
        self.stream = stream
        self.file = BlockFile(layout)
        rows, cols = layout.grid
        self.decoder = decoder if layout.compression == "deflate" else None
        self.host = layout.compression == "deflate" and decoder is None  # inflate in the reader pool
        row_bytes = cols * layout.block_bytes  # one row of blocks, inflated
        if self.host:
            self.group_blocks = max(1, HOST_GROUP_ROWS // layout.tile_h if HOST_GROUP_ROWS else GROUP_BYTES // row_bytes)
        else:
            self.group_blocks = max(1, GROUP_ROWS // layout.tile_h)
        self.group_blocks = min(self.group_blocks, rows)  # block rows per group
        self.group_rows = self.group_blocks * layout.tile_h
        self.groups = -(-rows // self.group_blocks)
        threads = getattr(pool, "_max_workers", 8)
        # blocks per job: every reader thread gets a share of a group (the first batch waits for the first group)
        self.chunk = max(1, min(HOST_CHUNK, -(-self.group_blocks * cols // threads)))
        if ahead is None:  # enough groups in flight to keep every reader thread busy, within the pinned budget
            jobs = -(-self.group_blocks * cols // self.chunk) if self.host else 1
            ahead = min(max(2, -(-2 * threads // jobs)), max(1, PINNED_BYTES // (self.group_blocks * row_bytes) - 1))
        self.ahead = max(1, ahead)
        self.bands = torch.as_tensor([i - 1 for i in src.plan.indexes], dtype=torch.long, device=device)
        self._reads: dict[int, list[Future[tuple[torch.Tensor, np.ndarray, np.ndarray] | None]]] = {}
        self._buffers: dict[int, torch.Tensor] = {}  # group -> pinned [blocks, block_bytes] (host inflate)
        self._decoded: dict[int, torch.Tensor] = {}  # group -> [bands, rows, width]
        self._next_read = 0
        self.pin = device.type == "cuda"
        self._inflate = HostInflater(layout.block_bytes) if self.host else None
        self._scratch = _THREAD_SCRATCH  # each reader thread's buffer for compressed bytes, kept from scene to scene

    def close(self) -> None:
        futures = [f for fs in self._reads.values() for f in fs]
        for f in futures:
            f.cancel()
        for f in futures:
            if not f.cancelled():
                try:
                    f.result()
                except BaseException:  # noqa: BLE001 - closing: the error, if any, was raised already
                    pass
        self._reads.clear()
        self._buffers.clear()
        self._decoded.clear()
        self.file.close()
        close = getattr(self.decoder, "close", None)
        if close is not None:
            if self.stream is not None:
                self.stream.synchronize()
            close()

    def _span(self, g: int) -> tuple[int, int]:
        rows, _ = self.layout.grid
        return g * self.group_blocks, min(rows, (g + 1) * self.group_blocks)

    def _read(self, blocks: slice) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Compressed (or raw) ``blocks`` into slots of a new pinned buffer."""
        host = torch.empty(self.file.size(blocks), dtype=torch.uint8, pin_memory=self.pin)
        starts, lens = self.file.read(blocks, host.numpy())
        return host, starts, lens

    def _inflate_into(self, blocks: slice, out: np.ndarray) -> None:
        """Read and inflate ``blocks`` into ``out`` [len(blocks), block_bytes] (a reader-pool job)."""
        need = self.file.size(blocks)
        buf = getattr(self._scratch, "buf", None)
        if buf is None or buf.size < need:  # fresh pages once per thread, not per job
            buf = self._scratch.buf = np.empty(need + need // 4, dtype=np.uint8)
        assert self._inflate is not None
        self.file.read_inflated(blocks, self._inflate, buf, out)

    def _request(self, upto: int) -> None:
        cols = self.layout.grid[1]
        while self._next_read < min(upto, self.groups):
            g = self._next_read
            r0, r1 = self._span(g)
            first, last = r0 * cols, r1 * cols
            if self.host:
                buf = torch.empty((last - first, self.layout.block_bytes), dtype=torch.uint8, pin_memory=self.pin)
                self._buffers[g] = buf
                arr = buf.numpy()
                c = self.chunk
                self._reads[g] = [self.pool.submit(self._inflate_into, slice(a, min(a + c, last)), arr[a - first : a - first + c])
                                  for a in range(first, last, c)]
            else:
                self._reads[g] = [self.pool.submit(self._read, slice(first, last))]
            self._next_read += 1

    def _decode(self, g: int) -> torch.Tensor:
        """Group ``g`` as [bands, rows, width] in the file's dtype, on the device (on the reader's stream)."""
        self._request(g + 1 + self.ahead)
        results = [f.result() for f in self._reads.pop(g)]
        L = self.layout
        r0, r1 = self._span(g)
        cols = L.grid[1]
        n = (r1 - r0) * cols
        if self.host:
            # the pinned buffer may be reused once its copy is done: torch's pinned allocator waits for it
            blocks = self._buffers.pop(g).to(self.device, non_blocking=True)
        else:
            host, starts, lens = results[0]  # type: ignore[misc]
            data = host.to(self.device, non_blocking=True)
            if self.decoder is None:  # uncompressed: slots of whole blocks, back to back
                blocks = data[: n * L.block_bytes].view(n, L.block_bytes)
            else:
                blocks = torch.empty((n, L.block_bytes), dtype=torch.uint8, device=self.device)
                self.decoder(data, starts, lens, blocks)
        px = undo_predictor(blocks, L)  # [n, th, tw, samples]
        rows = (r1 - r0) * L.tile_h
        px = px.view(r1 - r0, cols, L.tile_h, L.tile_w, L.samples).permute(4, 0, 2, 1, 3).reshape(L.samples, rows, cols * L.tile_w)
        y0 = r0 * L.tile_h
        px = px[:, : min(rows, L.height - y0), : L.width]
        if L.samples > 1:  # the bands of the plan, in its order
            px = px.index_select(0, self.bands)
        return px.contiguous()

    def rows(self, y: int, h: int) -> torch.Tensor:
        """Scene rows [y, y + h) as [bands, h, width] (decoding what is missing; earlier groups freed)."""
        g0, g1 = y // self.group_rows, (y + h - 1) // self.group_rows
        for g in [g for g in self._decoded if g < g0]:
            del self._decoded[g]
        parts = []
        for g in range(g0, g1 + 1):
            if g not in self._decoded:
                self._decoded[g] = self._decode(g)
            t = self._decoded[g]
            a, b = max(y, g * self.group_rows) - g * self.group_rows, min(y + h, (g + 1) * self.group_rows) - g * self.group_rows
            parts.append(t[:, a:b])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def cut(self, group: list[Tile], size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The windows of ``group`` as a batch [n, bands, size, size] (and its mask where a window is short)."""
        n, bands = len(group), len(self.src.plan.indexes)
        data = torch.empty((n, bands, size, size), dtype=torch_dtype(self.layout.dtype), device=self.device)
        short = any((t.height, t.width) != (size, size) for t in group)
        valid = torch.zeros((n, size, size), dtype=torch.bool, device=self.device) if short else None
        if short:
            data.zero_()
        i = 0
        while i < n:  # runs of windows on the same row of windows, with one height and width
            t = group[i]
            j = i + 1
            while j < n and (group[j].row_off, group[j].height, group[j].width) == (t.row_off, t.height, t.width):
                j += 1
            h, w = t.height, t.width
            band = self.rows(t.row_off, h)
            xs = torch.as_tensor([g.col_off for g in group[i:j]], dtype=torch.long)
            idx = (xs[:, None] + torch.arange(w)[None]).reshape(-1).to(self.device, non_blocking=True)
            cut = band.index_select(2, idx).view(bands, h, j - i, w).permute(2, 0, 1, 3)
            data[i:j, :, :h, :w] = cut
            if valid is not None:
                valid[i:j, :h, :w] = True
            i = j
        return data, valid


def gpu_window_batches(src, layout: BlockLayout, tiles: Iterable[Tile], pool: ThreadPoolExecutor, batch_size: int,
                       size: int, device: torch.device, stream: torch.cuda.Stream | None, ahead: int | None = None,
                       decoder: BlockDecoder | None = None) -> Iterator[RawBatch]:
    """Batches of ``tiles`` in scene order, decoded and cut on ``device`` (see the module docstring).

    Runs in the producer thread; ``pool`` (the executor's reader pool) reads and inflates groups
    ``ahead`` groups in advance (None: enough to keep the pool busy, within ``PINNED_BYTES``).
    ``decoder``: inflate on the device instead (:class:`NvcompDecoder`). Each batch carries an event
    recorded on ``stream`` once its pixels are in place (None on the CPU)."""
    reader = GpuBlockReader(src, layout, device, pool, ahead, stream, decoder)
    ctx = torch.cuda.stream(stream) if stream is not None else nullcontext()
    try:
        group: list[Tile] = []
        for tile in tiles:
            group.append(tile)
            if len(group) == batch_size:
                yield _batch(reader, group, size, stream, ctx)
                group = []
        if group:
            yield _batch(reader, group, size, stream, ctx)
    finally:
        reader.close()


def _batch(reader: GpuBlockReader, group: list[Tile], size: int, stream: torch.cuda.Stream | None,
           ctx: AbstractContextManager[object]) -> RawBatch:
    with ctx:
        data, valid = reader.cut(group, size)
        ready = None
        if stream is not None:
            ready = torch.cuda.Event()
            ready.record(stream)
    return RawBatch(data, valid, tuple(group), ready=ready)


# -- the stretch's sample ----------------------------------------------------------------------------


class BlockSampler:
    """The stretch's sample jobs (:meth:`RasterSource.sample_plan`) read from the blocks, summarised as
    :meth:`RasterSource.sample_summary` summarises GDAL's reads of the same windows: the same pixels,
    so the same stretch. A scene on this path then needs no GDAL handle in its reader threads: on an
    H100 host, opening one for each of 15 threads (about 1 ms each) and GDAL's sample reads were a
    good part of the 56 ms the first batch of a 32768² scene waited. Each window's blocks are read and
    inflated (libdeflate) as the tiles' are, and the predictor undone in numpy.

    :meth:`plan` puts up to ``SAMPLE_JOB_WINDOWS`` windows of one grid row in a job. On an H100 host,
    64 jobs of one window each, run by 14 threads, took 3-13 ms each (about 1.5 ms alone) and ran
    until 52 ms, with the first group's inflate jobs queued behind them: fewer, larger jobs mean
    fewer hand-offs and file opens. Each window is summarised as it is read and the job's summaries
    are added up, which gives the stretch that a job per window gives (counts add up; percentiles of
    values do not depend on their order).

    Called by many reader threads at once: each call opens the file on its own (a :class:`BlockFile`
    reads gaps and checksums into a scratch buffer it keeps, which threads must not share)."""

    def __init__(self, src, layout: BlockLayout) -> None:
        self.src, self.layout = src, layout
        self.bands = [i - 1 for i in src.plan.indexes]  # the plan's bands, in its order
        self._inflate = HostInflater(layout.block_bytes) if layout.compression == "deflate" else None

    @staticmethod
    def plan(jobs: list[SampleJob]) -> list[SampleJob]:
        """:meth:`RasterSource.sample_plan`'s jobs (a window each, on a tiled file) as jobs of up to
        ``SAMPLE_JOB_WINDOWS`` windows of one grid row (the same rows), in the same order."""
        out: list[SampleJob] = []
        for y, h, cols in jobs:
            last = out[-1] if out else None
            if last is not None and cols and last[2] and (last[0], last[1]) == (y, h) and len(last[2]) + len(cols) <= SAMPLE_JOB_WINDOWS:
                out[-1] = (y, h, last[2] + list(cols))
            else:
                out.append((y, h, list(cols)))
        return out

    def __call__(self, job: SampleJob) -> Summary:
        y, h, cols = job
        if not cols:
            # the decimated whole scene (a scene with overviews, or of at most 2048 px): GDAL reads it
            # from the overviews, or decimates; one job, so one handle in one thread
            return self.src.sample_summary(job)
        file = BlockFile(self.layout)
        try:  # each window summarised as it is read: one window's pixels in memory at a time
            parts = [self.src.summarize(self.window(file, y, h, x, w)) for x, w in cols]
        finally:
            file.close()
        return add_summaries(parts)

    def window(self, file: BlockFile, y: int, h: int, x: int, w: int) -> np.ndarray:
        """Scene pixels [y, y + h) x [x, x + w) as [plan bands, h, w] in the file's dtype: one read of the
        blocks under the window per row of blocks it touches."""
        L = self.layout
        cols = L.grid[1]
        r0, r1 = y // L.tile_h, (y + h - 1) // L.tile_h
        c0, c1 = x // L.tile_w, (x + w - 1) // L.tile_w
        n = c1 - c0 + 1
        rows = []
        for r in range(r0, r1 + 1):
            px = undo_predictor_host(self._blocks(file, slice(r * cols + c0, r * cols + c1 + 1)), L)  # [n, th, tw, samples]
            rows.append(px.transpose(3, 1, 0, 2).reshape(L.samples, L.tile_h, n * L.tile_w))
        px = np.concatenate(rows, axis=1) if len(rows) > 1 else rows[0]
        dy, dx = y - r0 * L.tile_h, x - c0 * L.tile_w
        px = px[:, dy : dy + h, dx : dx + w]
        return px[self.bands] if L.samples > 1 else px

    def _blocks(self, file: BlockFile, blocks: slice) -> np.ndarray:
        """``blocks`` (contiguous in row-major order), decoded: uint8 [n, block_bytes], predictor not undone."""
        L = self.layout
        buf = np.empty(file.size(blocks), dtype=np.uint8)
        if self._inflate is None:  # uncompressed: slots of whole blocks, back to back (as GpuBlockReader._decode takes them)
            starts, _ = file.read(blocks, buf)
            return buf[: len(starts) * L.block_bytes].reshape(len(starts), L.block_bytes)
        out = np.empty((blocks.stop - blocks.start, L.block_bytes), dtype=np.uint8)
        file.read_inflated(blocks, self._inflate, buf, out)
        return out


class ScenePath(NamedTuple):
    """How :func:`scene_batches` reads a scene."""

    batches: Iterator[RawBatch | SkippedTile]  # a generator: it queues nothing on the pools until first iterated
    label: str  # the path in words, for the summary line and the metadata
    sample: Callable[[SampleJob], Summary]  # one stretch sample job -> its summary (any reader thread)
    sample_plan: Callable[[], list[SampleJob]]  # the stretch's sample jobs, for ``sample``
    needs_handles: bool  # the reader threads read through GDAL: open their handles up front (RasterSource.open_handles)


def scene_batches(src, tiles: Iterable[Tile], mode: str, device: torch.device, read_stream: torch.cuda.Stream | None,
                  readers: ThreadPoolExecutor, cutters: ThreadPoolExecutor, batch_size: int, size: int, pin: bool,
                  read_ahead: int, read_threads: int, stride: int) -> ScenePath:
    """The scene's batches by the reading path ``mode`` picks for it (:func:`gpu_read_plan`), that path
    in words for the summary line and the metadata (e.g. "blocks, deflate, libdeflate, cut on the
    GPU", "GDAL (striped, not tiled)"), how that path reads the stretch's sample (from the blocks,
    :class:`BlockSampler`, or through GDAL) and whether its reader threads need GDAL handles.
    ``read_stream``: the block reader's CUDA stream (None on the CPU); the rest are
    :func:`~rs_detect.io.prefetch.window_batches`' settings."""
    layout, why = gpu_read_plan(src, device, mode)
    cuda = device.type == "cuda"
    if layout is None:
        if mode in ("blocks", "nvcomp"):
            log.warning("%s: read by GDAL: the block reader does not take it (%s)", src.name, why)
        batches = window_batches(src, tiles, readers, batch_size, size, pin, read_ahead, read_threads, cutters, stride=stride)
        return ScenePath(batches, f"GDAL ({why})" if cuda else "GDAL", src.sample_summary, src.sample_plan, True)
    nvcomp = mode == "nvcomp" and layout.compression == "deflate" and read_stream is not None
    decoder = NvcompDecoder(device, read_stream) if nvcomp else None  # type: ignore[arg-type]
    where = "nvCOMP" if nvcomp else inflater_name() if layout.compression == "deflate" else "raw"
    label = f"blocks, {layout.codec}, {where}" + (", cut on the GPU" if cuda else "")
    batches = gpu_window_batches(src, layout, tiles, readers, batch_size, size, device, read_stream, decoder=decoder)
    sampler = BlockSampler(src, layout)
    return ScenePath(batches, label, sampler, lambda: sampler.plan(src.sample_plan()), False)
