"""The GPU reading path: a tiled GeoTIFF's blocks decompressed on the GPU, windows cut there.

At GPU speeds the CPU cannot inflate DEFLATE fast enough: on a 16-core H100 host, 14 threads of
libdeflate give about 4 GB/s of pixels and GDAL's zlib about 2 GB/s, where a YOLOv8n engine takes
over 5 GB/s of uint16 windows. So for the files a GPU can decode, the CPU only moves compressed bytes:

1. **Read** (reader pool threads): the compressed blocks of a group of block rows, found through the
   TIFF's own tile offsets and byte counts (tifffile), are read with one ``preadv`` per run of
   adjacent blocks, scattered straight into 8-byte aligned slots of a pinned buffer (nvCOMP wants
   aligned inputs); each block's zlib header and checksum go to a scratch buffer.
2. **Decode** (the producer thread, on the reader's CUDA stream): the slots are copied to the GPU and
   inflated there in one nvCOMP batch (DEFLATE) or taken as they are (uncompressed); the horizontal
   predictor is undone with a cumulative sum; the blocks are laid out as full-width rows.
3. **Cut**: the windows of a batch are gathered from those rows in one indexing step per row of
   windows, into the batch tensor on the GPU (padding and its mask where a window is short).

The batch reaches the engine as a :class:`~rs_detect.types.RawBatch` already on the device, with an
event that the engine's stream waits for. Pixels are exactly those GDAL decodes (tested against the
CPU path). :func:`gpu_read_plan` decides per scene whether this path applies, and says why not.

Steps 2 and 3 are written on torch tensors of any device: with a CPU stand-in for nvCOMP
(:class:`InflateDecoder`), the tests run the same code on the CPU.
"""

from __future__ import annotations

import os
import zlib
from contextlib import AbstractContextManager, nullcontext
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from rs_detect.dtypes import torch_dtype
from rs_detect.errors import InputError
from rs_detect.types import RawBatch, Tile

COMPRESSION = {1: "none", 8: "deflate", 32946: "deflate"}  # TIFF compression tag -> what this path decodes
ALIGN = 8  # slot alignment of compressed blocks (nvCOMP needs 4)
GROUP_ROWS = 2048  # pixel rows of a decode group: block rows decoded in one nvCOMP batch
HOST_GROUP_ROWS = 0  # pixel rows of a group inflated on the CPU (0: about GROUP_BYTES of pixels, whole block rows)
GROUP_BYTES = 64 << 20  # a CPU-inflated group's pinned buffer: one copy to the device
PINNED_BYTES = 320 << 20  # groups in flight at most (pinned host memory): bounded by the scene's width, not its area
HOST_CHUNK = 16  # blocks a reader-pool job reads and inflates
MAX_GAP = 1 << 20  # blocks further apart in the file than this start a new read
IOV_MAX = 1000  # buffers per preadv (the system's limit is 1024)


@dataclass(frozen=True)
class BlockLayout:
    """Where a tiled GeoTIFF's blocks are and how they are coded (the full-resolution image)."""

    path: str
    width: int
    height: int
    tile_h: int
    tile_w: int
    dtype: np.dtype
    samples: int  # samples per pixel, interleaved in each block
    predictor: int  # 1 none, 2 horizontal differencing
    compression: str  # "deflate" | "none"
    offsets: np.ndarray  # [block rows, block cols] file offsets
    counts: np.ndarray  # [block rows, block cols] byte counts

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.offsets.shape[0]), int(self.offsets.shape[1])

    @property
    def block_bytes(self) -> int:
        return self.tile_h * self.tile_w * self.samples * self.dtype.itemsize

    @property
    def codec(self) -> str:
        return self.compression + (" + predictor" if self.predictor == 2 else "")


def block_layout(path: str, width: int, height: int, dtype: np.dtype, bands: int) -> BlockLayout | str:
    """The scene's block layout, or in a few words why the GPU path does not take the file."""
    if not os.path.isfile(path):
        return "not a local file"
    try:
        import tifffile
    except ImportError:
        return "tifffile is not installed"
    try:
        with tifffile.TiffFile(path) as tf:
            if tf.byteorder != "<":
                return "big-endian TIFF"
            pg = tf.pages[0]
            if not isinstance(pg, tifffile.TiffPage):
                return "no TIFF page"
            if not pg.is_tiled:
                return "striped, not tiled"
            if (pg.imagewidth, pg.imagelength) != (width, height) or pg.imagedepth > 1:
                return "first image is not the full-resolution one"
            codec = COMPRESSION.get(int(pg.compression))
            if codec is None:
                return f"{pg.compression.name.lower()} compression"
            if int(pg.predictor) not in (1, 2):
                return "floating-point predictor"
            samples = int(pg.samplesperpixel)
            if samples > 1 and int(pg.planarconfig) != 1:
                return "bands stored in separate planes"
            if samples != bands:
                return f"{samples} samples per pixel, {bands} bands"
            dt = np.dtype(pg.dtype)
            if dt != np.dtype(dtype) or dt.kind not in "ui" or dt.itemsize > 2 or int(pg.bitspersample) != dt.itemsize * 8:
                return f"{dt} pixels"
            th, tw = int(pg.tilelength), int(pg.tilewidth)
            rows, cols = -(-height // th), -(-width // tw)
            offsets = np.asarray(pg.dataoffsets, dtype=np.int64)
            counts = np.asarray(pg.databytecounts, dtype=np.int64)
            if offsets.size != rows * cols or counts.size != rows * cols:
                return "unexpected number of blocks"
            if not counts.all():
                return "sparse file (blocks missing)"
            if codec == "none" and (counts < th * tw * samples * dt.itemsize).any():
                return "short uncompressed blocks"
    except Exception as exc:  # noqa: BLE001 - any surprise in the header: the CPU path reads it
        return f"TIFF header not understood ({type(exc).__name__})"
    return BlockLayout(path, width, height, th, tw, dt, samples, int(pg.predictor), codec,
                       offsets.reshape(rows, cols), counts.reshape(rows, cols))


def nvcomp_available() -> bool:
    try:
        from nvidia import nvcomp  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or its libraries do not load
        return False
    return True


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


# -- step 1: compressed blocks into aligned slots ------------------------------------------------------


class BlockFile:
    """Reads groups of block rows' compressed blocks into aligned slots of a host buffer."""

    def __init__(self, layout: BlockLayout) -> None:
        self.layout = layout
        self.fd = os.open(layout.path, os.O_RDONLY)
        self._scratch = np.empty(MAX_GAP + 8, dtype=np.uint8)  # zlib headers, checksums, gaps: read and dropped

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def slots(self, blocks: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For ``blocks`` (a slice of the blocks in row-major order), in that order: each block's
        payload offset in the file, its length, and its slot's start in the buffer (8-byte aligned)."""
        off = self.layout.offsets.ravel()[blocks]
        cnt = self.layout.counts.ravel()[blocks]
        if self.layout.compression == "deflate":  # a raw DEFLATE stream between the zlib header and checksum
            off, cnt = off + 2, cnt - 6
            if (cnt <= 0).any():
                raise InputError(f"{self.layout.path}: a compressed block is too short to be DEFLATE data")
        else:
            cnt = np.full_like(cnt, self.layout.block_bytes)
        padded = -(-cnt // ALIGN) * ALIGN
        starts = np.concatenate([[0], np.cumsum(padded)[:-1]]).astype(np.int64)
        return off, cnt, starts

    def size(self, blocks: slice) -> int:
        """Bytes of the buffer that :meth:`read` of ``blocks`` fills."""
        _, cnt, starts = self.slots(blocks)
        return int(starts[-1] + cnt[-1]) + ALIGN

    def read(self, blocks: slice, buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Read ``blocks`` into ``buf`` (uint8, large enough: see :meth:`size`); returns their slots
        (start, length) in block order."""
        off, cnt, starts = self.slots(blocks)
        deflate = self.layout.compression == "deflate"
        order = np.argsort(off, kind="stable")
        views: list[memoryview] = []
        pos = first = -1
        headers = np.empty((len(off), 2), dtype=np.uint8) if deflate else None
        hdr_views = [memoryview(headers[i]) for i in range(len(off))] if deflate else []
        mv = memoryview(buf)
        scratch = memoryview(self._scratch)

        def flush() -> None:
            nonlocal views, first
            if views:
                want = sum(v.nbytes for v in views)
                got = os.preadv(self.fd, views, first)
                if got != want:
                    raise InputError(f"{self.layout.path}: file ends inside a block (read {got} of {want} bytes at {first})")
            views, first = [], -1

        for i in order:
            o, n, s = int(off[i]), int(cnt[i]), int(starts[i])
            lead = (o - 2) if deflate else o  # where this block's bytes begin in the file
            if views and (lead < pos or lead - pos > MAX_GAP or len(views) > IOV_MAX - 4):
                flush()
            if not views:
                first = pos = lead
            if lead > pos:
                views.append(scratch[: lead - pos])
            if deflate:
                views.append(hdr_views[i])
            views.append(mv[s : s + n])
            pos = o + n
            if deflate:
                views.append(scratch[:4])  # the Adler-32 checksum
                pos += 4
        flush()
        if deflate:
            assert headers is not None
            # a zlib stream: CM 8 (DEFLATE), header check, no preset dictionary (TIFF never uses one)
            bad = ((headers[:, 0] & 0x0F) != 8) | (((headers[:, 0].astype(np.int32) << 8) | headers[:, 1]) % 31 != 0) | ((headers[:, 1] & 0x20) != 0)
            if bad.any():
                cols = self.layout.grid[1]
                k = (blocks.start or 0) + int(np.flatnonzero(bad)[0])
                raise InputError(f"{self.layout.path}: block {k % cols},{k // cols} (column, row) is not zlib data")
        return starts, cnt


# -- step 2: decode -------------------------------------------------------------------------------------


class BlockDecoder(Protocol):
    def __call__(self, data: torch.Tensor, starts: np.ndarray, lens: np.ndarray, out: torch.Tensor) -> None:
        """Decompress the slots of ``data`` (uint8, on the device) into the rows of ``out`` [n, block_bytes]."""


class NvcompDecoder:
    """nvCOMP's batched DEFLATE decompression on the given stream (one Codec per stream). Its scratch
    memory comes from torch's caching allocator: a cudaMalloc of its own would synchronise the device,
    the engine's stream included."""

    def __init__(self, device: torch.device, stream: torch.cuda.Stream) -> None:
        from nvidia import nvcomp

        self._nvcomp = nvcomp
        self.device = device
        nvcomp.set_device_allocator(self._allocate)
        self.codec = nvcomp.Codec(algorithm="Deflate", bitstream_kind=nvcomp.BitstreamKind.RAW,
                                  device_id=device.index if device.index is not None else torch.cuda.current_device(),
                                  cuda_stream=stream.cuda_stream)

    def close(self) -> None:
        """Free the codec and its scratch memory now, while torch's allocator is alive (at interpreter
        exit the order of teardown is not defined)."""
        self.codec = None
        self._nvcomp.set_device_allocator(None)

    def _allocate(self, nbytes: int, stream: object) -> _TorchBuffer:
        return _TorchBuffer(nbytes, self.device)

    def __call__(self, data: torch.Tensor, starts: np.ndarray, lens: np.ndarray, out: torch.Tensor) -> None:
        nv = self._nvcomp
        n, size = out.shape
        try:  # one buffer carved by an offset table (nvCOMP >= 5)
            srcs = nv.as_arrays(data, [int(s) for s in starts], [int(x) for x in lens])
            dst = nv.as_arrays(out.view(-1), [i * size for i in range(n)], [size] * n)
        except TypeError:  # one array per block
            srcs = nv.as_arrays([data[int(s) : int(s) + int(x)] for s, x in zip(starts, lens)])
            dst = nv.as_arrays([out[i] for i in range(n)])
        self.codec.decode(srcs, out=dst)


class _TorchBuffer:
    """Device memory for nvCOMP from torch's caching allocator (freed with this object)."""

    def __init__(self, nbytes: int, device: torch.device) -> None:
        self.tensor = torch.empty(max(1, nbytes), dtype=torch.uint8, device=device)
        self.ptr = self.tensor.data_ptr()


def inflater_name() -> str:
    try:
        import deflate  # noqa: F401

        return "libdeflate"
    except ImportError:
        return "zlib"


def host_inflater(size: int):
    """Raw DEFLATE -> bytes of ``size``, on the CPU, the GIL released while it inflates: libdeflate
    (the ``deflate`` package) where installed, about 2.5 times zlib's speed on the H100 host; else zlib."""
    try:
        import deflate

        return lambda data: deflate.deflate_decompress(data, size)
    except ImportError:
        return lambda data: zlib.decompress(data, wbits=-15, bufsize=size)


class InflateDecoder:
    """The CPU stand-in for :class:`NvcompDecoder` (zlib on tensors in host memory): what the tests use."""

    def __call__(self, data: torch.Tensor, starts: np.ndarray, lens: np.ndarray, out: torch.Tensor) -> None:
        raw = data.cpu().numpy()
        for i, (s, n) in enumerate(zip(starts, lens)):
            block = zlib.decompress(raw[int(s) : int(s) + int(n)].tobytes(), wbits=-15)
            out[i].copy_(torch.frombuffer(bytearray(block), dtype=torch.uint8)[: out.shape[1]])


def undo_predictor(blocks: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Decoded blocks (uint8 [n, block_bytes]) -> pixels [n, tile_h, tile_w, samples] in the file's dtype,
    the horizontal predictor undone (a cumulative sum per row and sample, modulo the sample's width)."""
    n, L = blocks.shape[0], layout
    shape = (n, L.tile_h, L.tile_w, L.samples)
    bits = L.dtype.itemsize * 8
    signed = L.dtype.kind == "i"
    raw = blocks.view(torch.int16 if bits == 16 else torch.uint8).view(shape)
    if L.predictor == 2:
        mask = (1 << bits) - 1
        acc = raw.to(torch.int32).cumsum(2).bitwise_and_(mask)
        if bits == 16 or signed:  # back into the signed range, so that the cast below is exact
            acc = acc - (acc >> (bits - 1) << bits)
        raw = acc.to(torch.int16 if bits == 16 else torch.int8 if signed else torch.uint8)
    if bits == 16:
        return raw.view(torch.uint16) if not signed else raw
    return raw.view(torch.int8) if signed else raw


# -- step 3: rows of blocks and windows -------------------------------------------------------------------


class GpuBlockReader:
    """Decodes a scene in groups of block rows and cuts windows from them on ``device``.

    Where the blocks are inflated: by default on the CPU (:func:`host_inflater` in the reader pool,
    ``HOST_CHUNK`` blocks a job, straight into the group's pinned buffer, which then goes to the
    device in one copy); with ``decoder`` (e.g. :class:`NvcompDecoder`) on the device, from the
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
        if ahead is None:  # enough groups in flight to keep every reader thread busy, within the pinned budget
            jobs = -(-self.group_blocks * cols // HOST_CHUNK) if self.host else 1
            threads = getattr(pool, "_max_workers", 8)
            ahead = min(max(2, -(-2 * threads // jobs)), max(1, PINNED_BYTES // (self.group_blocks * row_bytes) - 1))
        self.ahead = max(1, ahead)
        self.bands = torch.as_tensor([i - 1 for i in src.plan.indexes], dtype=torch.long, device=device)
        self._reads: dict[int, list[Future[tuple[torch.Tensor, np.ndarray, np.ndarray] | None]]] = {}
        self._buffers: dict[int, torch.Tensor] = {}  # group -> pinned [blocks, block_bytes] (host inflate)
        self._decoded: dict[int, torch.Tensor] = {}  # group -> [bands, rows, width]
        self._next_read = 0
        self.pin = device.type == "cuda"
        self._inflate = host_inflater(layout.block_bytes) if self.host else None

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
        buf = np.empty(self.file.size(blocks), dtype=np.uint8)
        starts, lens = self.file.read(blocks, buf)
        inflate = self._inflate
        assert inflate is not None
        for i, (s, n) in enumerate(zip(starts, lens)):
            try:
                block = inflate(memoryview(buf)[int(s) : int(s) + int(n)])
            except Exception as exc:  # noqa: BLE001 - a corrupt stream: named with its block
                k = (blocks.start or 0) + i
                cols = self.layout.grid[1]
                raise InputError(f"{self.layout.path}: block {k % cols},{k // cols} (column, row) does not inflate ({exc})") from None
            if len(block) != out.shape[1]:
                raise InputError(f"{self.layout.path}: block {i} of a group inflates to {len(block)} bytes, not {out.shape[1]}")
            out[i] = np.frombuffer(block, dtype=np.uint8)

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
                self._reads[g] = [self.pool.submit(self._inflate_into, slice(a, min(a + HOST_CHUNK, last)), arr[a - first : a - first + HOST_CHUNK])
                                  for a in range(first, last, HOST_CHUNK)]
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
    ``ahead`` groups in advance (None: enough to keep the pool busy, within ``PINNED_BYTES``); ``decoder``: inflate on the device instead (:class:`NvcompDecoder`). Each batch carries an event recorded on ``stream`` once its pixels are
    in place (None on the CPU)."""
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

