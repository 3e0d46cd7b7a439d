"""Read tiles ahead of the engine, in order, with bounded memory; assemble raw batches.

Two strategies, chosen by the file's layout:

* :func:`window_batches` (tiled files): a pool of threads reads windows straight into the slots of
  pinned batches; each thread has its own dataset handle and GDAL releases the GIL while decoding,
  so decoding (and the copy) use the cores.
* :class:`RowBandReads` (striped files): a window read of a striped file decodes whole image rows, so
  reading each window separately would decode every strip once per window of the row. Instead each row
  of windows reads one full-width band once (split in row chunks across the threads) and cuts its
  windows from it; the next band is read while the current one is consumed.

Memory is bounded by the read-ahead depth (and one or two row bands), never by the scene size.
Raw pixels stay in the file's dtype here; scaling runs later on the engine's device.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from rasterio.windows import Window

from rs_detect.io.reader import RasterSource
from rs_detect.types import Tile

T = TypeVar("T")

TORCH_DTYPES = {
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.int8): torch.int8,
    np.dtype(np.uint16): torch.uint16,
    np.dtype(np.int16): torch.int16,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float32,
}


@dataclass(frozen=True)
class RawTile:
    tile: Tile
    data: np.ndarray  # [bands, h, w] in the file's dtype
    valid: np.ndarray | None  # [h, w] bool, None = all valid

    @property
    def empty(self) -> bool:
        return self.valid is not None and not self.valid.any()


@dataclass(frozen=True)
class RawBatch:
    """Raw pixels [N, bands, S, S] (pinned host memory when feeding a GPU) and validity [N, S, S]."""

    data: torch.Tensor
    valid: torch.Tensor | None
    tiles: tuple[Tile, ...]

    @property
    def size(self) -> int:
        return len(self.tiles)


class RowBandReads:
    """Striped files: one full-width band per row of windows, decoded once, split across threads."""

    def __init__(self, src: RasterSource, pool: ThreadPoolExecutor, chunks: int) -> None:
        self.src, self.pool, self.chunks = src, pool, max(1, chunks)
        self._band_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rs-band")

    def _read_band(self, row_off: int, height: int) -> tuple[np.ndarray, np.ndarray | None]:
        step = -(-height // self.chunks)
        parts = [
            self.pool.submit(self.src.read_raw, Window(0, y, self.src.width, min(step, row_off + height - y)))
            for y in range(row_off, row_off + height, step)
        ]
        results = [p.result() for p in parts]
        data = np.concatenate([r[0] for r in results], axis=1)
        valids = [r[1] for r in results]
        valid = None if all(v is None for v in valids) else np.concatenate(
            [v if v is not None else np.ones(r[0].shape[1:], dtype=bool) for v, r in zip(valids, results)]
        )
        return data, valid

    def __call__(self, tiles: Iterable[Tile]) -> Iterator[RawTile]:
        rows: dict[int, list[Tile]] = {}
        for t in tiles:
            rows.setdefault(t.row, []).append(t)
        order = sorted(rows)
        futures: dict[int, Future[tuple[np.ndarray, np.ndarray | None]]] = {}

        def start(i: int) -> None:
            if i < len(order) and order[i] not in futures:
                first = rows[order[i]][0]
                futures[order[i]] = self._band_pool.submit(self._read_band, first.row_off, first.height)

        try:
            for i, r in enumerate(order):
                start(i)
                start(i + 1)  # the next band decodes while this one is cut into windows
                band, valid = futures.pop(r).result()
                for t in rows[r]:
                    x, w = t.col_off, t.width
                    v = None if valid is None else valid[:, x : x + w]
                    yield RawTile(t, band[:, :, x : x + w], v)
        finally:
            for fut in futures.values():
                fut.cancel()
            self._band_pool.shutdown(wait=True, cancel_futures=True)


def assemble(raws: Iterable[RawTile], batch_size: int, size: int, bands: int, dtype: np.dtype, pin: bool) -> Iterator[RawBatch | RawTile]:
    """Group non-empty tiles into batches of ``batch_size``; empty (all-nodata) tiles pass through."""
    tdtype = TORCH_DTYPES.get(np.dtype(dtype), torch.float32)
    group: list[RawTile] = []

    def flush() -> RawBatch:
        n = len(group)
        data = torch.zeros((n, bands, size, size), dtype=tdtype, pin_memory=pin)
        view = data.numpy()
        need_valid = any(r.valid is not None or r.data.shape[1:] != (size, size) for r in group)
        valid = torch.zeros((n, size, size), dtype=torch.bool, pin_memory=pin) if need_valid else None
        for i, r in enumerate(group):
            _, h, w = r.data.shape
            view[i, :, :h, :w] = r.data
            if valid is not None:
                vv = valid.numpy()
                vv[i, :h, :w] = True if r.valid is None else r.valid
        return RawBatch(data, valid, tuple(r.tile for r in group))

    for raw in raws:
        if raw.empty:
            yield raw
            continue
        group.append(raw)
        if len(group) == batch_size:
            yield flush()
            group = []
    if group:
        yield flush()


def _fill(src: RasterSource, tile: Tile, data: np.ndarray, valid: np.ndarray) -> tuple[bool, bool]:
    """Read ``tile`` straight into its batch slot (in a reader thread, so the copy is parallel too).

    The slot is uninitialised memory: a full tile is decoded into it directly; an edge tile is
    copied in and its padding zeroed. ``valid`` is written only when the slot needs a mask.
    Returns (empty, needs_mask): all nodata, and whether the slot has invalid pixels (nodata or padding).
    """
    raw, v = src.read_raw(tile.window, out=data)
    _, h, w = raw.shape
    padded = (h, w) != data.shape[1:]
    if raw is not data:
        data[:, :h, :w] = raw
    if padded:
        data[:, h:, :] = 0
        data[:, :h, w:] = 0
    if v is None and not padded:
        return False, False
    if padded:
        valid.fill(False)
    valid[:h, :w] = True if v is None else v
    return (v is not None and not v.any()), True


def window_batches(src: RasterSource, tiles: Iterable[Tile], pool: ThreadPoolExecutor, batch_size: int,
                   size: int, pin: bool, depth: int) -> Iterator[RawBatch | RawTile]:
    """Tiled files: batches whose slots the reader threads fill directly, ``depth`` batches ahead.

    At GPU speeds a single thread copying tiles into the batch would itself be the bottleneck
    (gigabytes per second), so each reader thread decodes and copies its own tile.
    """
    tdtype = TORCH_DTYPES.get(src.dtype, torch.float32)
    bands = len(src.plan.indexes)
    pending: deque[tuple[list[Tile], torch.Tensor, torch.Tensor, list[Future[tuple[bool, bool]]]]] = deque()

    def start(group: list[Tile]) -> None:
        n = len(group)
        # uninitialised: each reader thread writes its whole slot (zeroing 32 MB per batch here, in
        # one thread, cost more than the decoding it waited for)
        data = torch.empty((n, bands, size, size), dtype=tdtype, pin_memory=pin)
        valid = torch.empty((n, size, size), dtype=torch.bool, pin_memory=pin)
        d, v = data.numpy(), valid.numpy()
        futs = [pool.submit(_fill, src, t, d[i], v[i]) for i, t in enumerate(group)]
        pending.append((group, data, valid, futs))

    def finish() -> Iterator[RawBatch | RawTile]:
        group, data, valid, futs = pending.popleft()
        flags = [f.result() for f in futs]
        keep = [i for i, (empty, _) in enumerate(flags) if not empty]
        for i, (empty, _) in enumerate(flags):
            if empty:
                yield RawTile(group[i], np.zeros((bands, 0, 0), dtype=src.dtype), np.zeros((0, 0), dtype=bool))
        if not keep:
            return
        needs_mask = any(flags[i][1] for i in keep)
        if len(keep) < len(group):  # rare: drop all-nodata tiles from the batch
            idx = torch.tensor(keep)
            data, valid = data[idx], valid[idx]
            if pin:
                data, valid = data.pin_memory(), valid.pin_memory()
        # slots read as all-valid never wrote their mask: mark them valid before the mask is used
        if needs_mask:
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


_DONE = object()


def in_background(items: Iterable[T], maxsize: int, name: str = "rs-producer") -> Iterator[T]:
    """Run an iterator in a thread, ``maxsize`` items ahead; exceptions re-raise in the consumer."""
    q: queue.Queue[object] = queue.Queue(maxsize=max(1, maxsize))
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            q.put(exc)

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)
