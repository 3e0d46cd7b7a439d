"""Read tiles ahead of the engine, in order, with bounded memory; assemble raw batches.

Overlapping windows share pixels, and a window read decodes every block it touches: read one by one,
a 1024-pixel window at an 832-pixel stride over 512-pixel blocks decodes up to three rows and columns of
blocks, about three times the scene's pixels (GDAL's block cache is per dataset handle, and every
reader thread has its own). So the scene is decoded once, in *slabs*: full-width bands of whole block
rows (tiled files) or of whole strips (striped files). Each slab is decoded by the reader pool in parts
that are whole blocks (column chunks of a block row; row chunks of strips), straight into the slab's
array; then cutter threads copy each window from the slabs into its slot of a pinned batch. Each block
is decoded exactly once, by all the cores, and the copies are parallel too.

Memory: the slabs a row of windows needs plus the next row's (about ``tile + stride + slab`` rows of
the scene's width) and ``depth`` batches ahead, never the scene size. Raw pixels stay in the file's
dtype here; scaling runs later on the engine's device.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from rasterio.windows import Window

from rs_detect import memory
from rs_detect.dtypes import pixel_torch_dtype
from rs_detect.io.reader import RasterSource
from rs_detect.types import RawBatch, SkippedTile, Tile



SLAB_ROWS = 256  # the smallest slab: whole blocks or strips of at least this many rows
MAX_SLAB_ROWS = 1024  # a block taller than this (one strip for a whole image) is read in bands anyway
PART_BYTES = 2 << 20  # striped files: decode jobs of whole strips, about this many bytes of pixels
PARTS_PER_THREAD = 1  # tiled files: column parts of a slab's row of blocks per reader thread (2 make twice the
# reads, each holding the GIL for its Python part, and measured slower)


_slab_lock = threading.Lock()
_slab_bytes = {"live": 0, "peak": 0}


def slab_memory() -> dict[str, int]:
    """Bytes of slab arrays alive now (``live``) and the most alive at once (``peak``, since
    :func:`reset_slab_peak`): the reader's share of the resident size, for benchmarks and tests."""
    with _slab_lock:
        return dict(_slab_bytes)


def reset_slab_peak() -> None:
    with _slab_lock:
        _slab_bytes["peak"] = _slab_bytes["live"]


def _unmapped(nbytes: int) -> None:
    with _slab_lock:
        _slab_bytes["live"] -= nbytes


def mapped_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A slab's array: in a mapping of its own (:func:`rs_detect.memory.mapped_array`), counted in
    :func:`slab_memory` until its last view is freed.

    Why not ``np.empty``: slabs are 10-40 MB. glibc serves those with mmap at first, but each one it
    frees raises its mmap threshold to that size (up to 32 MB), so from the first freed slab on, slabs
    of up to 32 MB come from the heap arenas instead, where their freed pages stay resident and
    fragment until a trim. A mapping of its own goes back to the OS the moment the slab is freed.
    """
    nbytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
    with _slab_lock:
        _slab_bytes["live"] += nbytes
        _slab_bytes["peak"] = max(_slab_bytes["peak"], _slab_bytes["live"])
    return memory.mapped_array(shape, dtype, on_free=partial(_unmapped, nbytes))


@dataclass
class _Part:
    """One decode job of a slab: scene columns [x0, x1) of some of its rows, whole blocks."""

    x0: int
    x1: int
    future: Future[None]


@dataclass
class _Slab:
    y0: int
    y1: int
    data: np.ndarray  # [bands, y1 - y0, width], the file's dtype
    valid: np.ndarray | None  # [y1 - y0, width] bool, None: the scene has no mask
    parts: list[_Part]
    users: int = 0  # cuts submitted and not yet done
    passed: bool = False  # no later window needs it


class SlabReader:
    """Decodes a scene once, slab by slab, and cuts windows from the slabs into batch slots."""

    def __init__(self, src: RasterSource, pool: ThreadPoolExecutor, threads: int) -> None:
        self.src, self.pool = src, pool
        self.threads = max(1, threads)
        self.bands = len(src.plan.indexes)
        block_h, block_w = src.block_shapes[0]
        blocks = -(-src.width // block_w)
        if block_h > MAX_SLAB_ROWS:  # blocks taller than a slab: each slab decodes its rows of them again
            self.rows = self.part_rows = MAX_SLAB_ROWS
            self.part_cols = src.width if src.is_striped else max(1, -(-blocks // (PARTS_PER_THREAD * self.threads))) * block_w
        elif src.is_striped:
            # parts: whole strips, about PART_BYTES each (a read per strip costs more than the strip);
            # a slab: one part per thread, within the slab bounds
            row_bytes = src.width * self.bands * src.dtype.itemsize
            self.part_rows = block_h * max(1, round(PART_BYTES / (row_bytes * block_h)))
            self.part_rows = min(self.part_rows, block_h * max(1, MAX_SLAB_ROWS // block_h))
            parts = max(1, min(MAX_SLAB_ROWS // self.part_rows, max(-(-SLAB_ROWS // self.part_rows), self.threads)))
            self.rows = parts * self.part_rows
            self.part_cols = src.width
        else:
            # whole rows of blocks; parts: column chunks of whole blocks, PARTS_PER_THREAD per thread
            self.rows = block_h * max(1, -(-SLAB_ROWS // block_h))
            self.part_rows = self.rows
            self.part_cols = max(1, -(-blocks // (PARTS_PER_THREAD * self.threads))) * block_w
        self.slabs: dict[int, _Slab] = {}
        self._spare: list[tuple[np.ndarray, np.ndarray | None]] = []  # finished slabs' arrays, for reuse
        self._lock = threading.Lock()

    # -- decoding ------------------------------------------------------------------------------

    def _arrays(self, rows: int) -> tuple[np.ndarray, np.ndarray | None]:
        """A slab's pixel and mask arrays: a finished slab's, when one of this height is spare, else new."""
        with self._lock:
            for k, (data, valid) in enumerate(self._spare):
                if data.shape[1] == rows:
                    del self._spare[k]
                    return data, valid
        data = mapped_array((self.bands, rows, self.src.width), self.src.dtype)
        return data, (mapped_array((rows, self.src.width), np.dtype(bool)) if self.src.has_mask else None)

    def _decode(self, slab: _Slab, x0: int, y0: int, w: int, h: int) -> None:
        dy = y0 - slab.y0
        out = slab.data[:, dy : dy + h, x0 : x0 + w]
        raw, valid = self.src.read_raw(Window(x0, y0, w, h), out=out)
        if raw is not out:
            out[...] = raw
        if slab.valid is not None:
            slab.valid[dy : dy + h, x0 : x0 + w] = True if valid is None else valid

    def request(self, indexes: Iterable[int]) -> None:
        """Start decoding the slabs ``indexes`` (those that exist and are not started).

        Their parts are queued column by column across the slabs: the windows at the left of the rows
        of blocks asked for together (a batch's first windows) are ready first, not after whole slabs.
        """
        jobs: list[tuple[int, int, _Slab, int, int]] = []
        for index in indexes:
            y0 = index * self.rows
            if index in self.slabs or y0 >= self.src.height:
                continue
            y1 = min(y0 + self.rows, self.src.height)
            data, valid = self._arrays(y1 - y0)
            slab = _Slab(y0, y1, data, valid, [])
            for y in range(y0, y1, self.part_rows):
                for x in range(0, self.src.width, self.part_cols):
                    jobs.append((x, y, slab, min(self.part_cols, self.src.width - x), min(self.part_rows, y1 - y)))
            with self._lock:
                self.slabs[index] = slab
        for x, y, slab, w, h in sorted(jobs, key=lambda j: (j[0], j[1])):  # by column, then row (slab order)
            slab.parts.append(_Part(x, x + w, self.pool.submit(self._decode, slab, x, y, w, h)))

    def span(self, tile: Tile) -> range:
        """Indexes of the slabs that hold the rows of ``tile``."""
        return range(tile.row_off // self.rows, (tile.row_off + tile.height - 1) // self.rows + 1)

    def pass_before(self, index: int) -> None:
        """No window from now on needs slabs before ``index``: free them once their cuts are done."""
        with self._lock:
            for i in [i for i in self.slabs if i < index]:
                slab = self.slabs[i]
                slab.passed = True
                if slab.users == 0:
                    self._free(self.slabs.pop(i))

    def hold(self, tile: Tile) -> list[_Slab]:
        with self._lock:
            slabs = [self.slabs[i] for i in self.span(tile)]
            for slab in slabs:
                slab.users += 1
        return slabs

    def _release(self, slabs: list[_Slab]) -> None:
        with self._lock:
            for slab in slabs:
                slab.users -= 1
                if slab.users == 0 and slab.passed and self.slabs.get(slab.y0 // self.rows) is slab:
                    self._free(self.slabs.pop(slab.y0 // self.rows))

    def _free(self, slab: _Slab) -> None:
        """Keep a finished slab's arrays for the next slab of the same shape (under the lock)."""
        if all(part.future.done() for part in slab.parts):
            self._spare.append((slab.data, slab.valid))

    # -- cutting -------------------------------------------------------------------------------

    def cut(self, tile: Tile, slabs: list[_Slab], data: np.ndarray, valid: np.ndarray | None) -> tuple[bool, bool]:
        """Copy ``tile`` from its slabs into a batch slot (uninitialised memory, written whole).

        Waits only for the slab parts under the window. Returns (empty, needs_mask): all nodata, and
        whether the slot has invalid pixels (nodata or padding); ``valid`` is written only then, and
        may be None where neither can happen (a full tile of a scene without a mask).
        """
        try:
            x, y, w, h = tile.col_off, tile.row_off, tile.width, tile.height
            has_mask = slabs[0].valid is not None
            padded = (h, w) != data.shape[1:]
            if valid is None and (has_mask or padded):
                raise ValueError(f"tile {tile.index}: needs a mask slot (nodata or padding)")
            any_invalid = False
            for slab in slabs:
                for part in slab.parts:
                    if part.x0 < x + w and x < part.x1:
                        part.future.result()
                a, b = max(y, slab.y0), min(y + h, slab.y1)
                data[:, a - y : b - y, :w] = slab.data[:, a - slab.y0 : b - slab.y0, x : x + w]
                if has_mask:
                    assert slab.valid is not None and valid is not None
                    v = slab.valid[a - slab.y0 : b - slab.y0, x : x + w]
                    valid[a - y : b - y, :w] = v
                    any_invalid = any_invalid or not v.all()
            if padded:
                assert valid is not None
                data[:, h:, :] = 0
                data[:, :h, w:] = 0
                if not has_mask:
                    valid[:h, :w] = True
                valid[h:, :] = False
                valid[:h, w:] = False
            empty = has_mask and valid is not None and not valid[:h, :w].any()
            return empty, padded or any_invalid
        finally:
            self._release(slabs)

    def cancel(self) -> None:
        with self._lock:
            for slab in self.slabs.values():
                for part in slab.parts:
                    part.future.cancel()
            self.slabs.clear()


def window_batches(src: RasterSource, tiles: Iterable[Tile], pool: ThreadPoolExecutor, batch_size: int,
                   size: int, pin: bool, depth: int, threads: int, cutters: ThreadPoolExecutor,
                   stride: int | None = None) -> Iterator[RawBatch | SkippedTile]:
    """Batches of tiles in scene order, ``depth`` batches ahead, each block of the scene decoded once.

    ``pool`` (of ``threads`` threads) decodes slab parts; ``cutters``, a second pool, cuts windows
    into the batch slots (a cut waits for its slab parts, so the two must not share threads). At GPU
    speeds one thread copying tiles into batches would itself be the bottleneck (gigabytes per
    second). ``stride``, the tiler's row step (tile size less overlap; None: ``size``), bounds the
    read-ahead to the next row of windows. Both pools belong to the caller
    (:class:`rs_detect.executor.SceneExecutor`); this generator only queues jobs on them. Closed
    early, it cancels its queued jobs and waits for its running cuts (they hold its slabs); decodes
    still running finish in the reader pool, which the caller shuts down before closing ``src``.
    """
    reader = SlabReader(src, pool, threads)
    tdtype = pixel_torch_dtype(src.dtype)
    bands = reader.bands
    pending: deque[tuple[list[Tile], torch.Tensor, torch.Tensor | None, list[Future[tuple[bool, bool]]]]] = deque()
    lookahead = 0  # slabs started so far: [0, lookahead)

    def start(group: list[Tile]) -> None:
        nonlocal lookahead
        # decode every slab this batch needs, then those of the next row of windows (one stride further
        # down): queued in that order, so a batch never waits behind the read-ahead (the first one above all)
        need = reader.span(group[-1])[-1] + 1
        ahead = (min(group[-1].row_off + (stride or size) + group[-1].height, src.height) - 1) // reader.rows + 1
        reader.request(range(lookahead, need))
        reader.request(range(max(lookahead, need), ahead))
        lookahead = max(lookahead, need, ahead)
        n = len(group)
        data = torch.empty((n, bands, size, size), dtype=tdtype, pin_memory=pin)
        # a mask only where a slot can have invalid pixels: pinned memory is resident (16 MB a batch)
        masked = src.has_mask or any((t.height, t.width) != (size, size) for t in group)
        valid = torch.empty((n, size, size), dtype=torch.bool, pin_memory=pin) if masked else None
        d, v = data.numpy(), None if valid is None else valid.numpy()
        futs = [cutters.submit(reader.cut, t, reader.hold(t), d[i], None if v is None else v[i]) for i, t in enumerate(group)]
        reader.pass_before(reader.span(group[-1])[0])
        pending.append((group, data, valid, futs))

    def finish() -> Iterator[RawBatch | SkippedTile]:
        group, data, valid, futs = pending.popleft()
        flags = [f.result() for f in futs]
        keep = [i for i, (empty, _) in enumerate(flags) if not empty]
        for i, (empty, _) in enumerate(flags):
            if empty:
                yield SkippedTile(group[i])
        if not keep:
            return
        needs_mask = any(flags[i][1] for i in keep)
        if len(keep) < len(group):  # rare: drop all-nodata tiles from the batch (only masked batches have them)
            assert valid is not None
            idx = torch.tensor(keep)
            data, valid = data[idx], valid[idx]
            if pin:
                data, valid = data.pin_memory(), valid.pin_memory()
        # slots read as all-valid never wrote their mask: mark them valid before the mask is used
        if needs_mask:
            assert valid is not None
            for j, i in enumerate(keep):
                if not flags[i][1]:
                    valid[j] = True
        yield RawBatch(data, valid if needs_mask else None, tuple(group[i] for i in keep))

    try:
        group: list[Tile] = []
        for tile in tiles:
            group.append(tile)
            if len(group) == batch_size:
                start(group)
                group = []
                if len(pending) > depth:
                    yield from finish()
        if group:
            start(group)
        while pending:
            yield from finish()
    finally:
        for *_, futs in pending:
            for f in futs:
                f.cancel()
        wait([f for *_, futs in pending for f in futs])  # the running cuts (they hold the slabs)
        reader.cancel()
