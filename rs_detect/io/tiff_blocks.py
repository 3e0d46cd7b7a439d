"""A tiled GeoTIFF's blocks as the file stores them: where they are (the TIFF's own offsets and byte
counts, read with tifffile), reading them raw into aligned slots, inflating them (libdeflate or zlib
on the CPU, nvCOMP on the GPU) and undoing the horizontal predictor. The block reader
(:mod:`rs_detect.io.gpu_blocks`) builds on these."""

from __future__ import annotations

import ctypes
import functools
import os
import zlib
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from rs_detect.errors import InputError

COMPRESSION = {1: "none", 8: "deflate", 32946: "deflate"}  # TIFF compression tag -> what the block reader decodes
ALIGN = 8  # slot alignment of compressed blocks (nvCOMP needs 4)
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


def block_error(layout: BlockLayout, k: int, why: str) -> InputError:
    """Block ``k`` (row-major) of ``layout`` is damaged: one line naming the file and the block."""
    cols = layout.grid[1]
    return InputError(f"{layout.path}: block {k % cols},{k // cols} (column, row) {why}")


def nvcomp_available() -> bool:
    try:
        from nvidia import nvcomp  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or its libraries do not load
        return False
    return True


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
                raise block_error(self.layout, (blocks.start or 0) + int(np.flatnonzero(bad)[0]), "is not zlib data")
        return starts, cnt

    def read_inflated(self, blocks: slice, inflate: HostInflater, buf: np.ndarray, out: np.ndarray) -> None:
        """Read ``blocks`` into ``buf`` (see :meth:`size`) and inflate them into the rows of ``out``
        [len(blocks), block_bytes]; a block that does not inflate is named in a one-line InputError."""
        starts, lens = self.read(blocks, buf)
        try:
            inflate(buf, starts, lens, out)
        except BlockInflateError as exc:
            raise block_error(self.layout, (blocks.start or 0) + exc.index, exc.why) from None


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


def _libdeflate():  # the ``deflate`` package, or None
    try:
        import deflate
    except ImportError:
        return None
    return deflate


@functools.cache
def _libdeflate_c() -> tuple[Any, Any, Any] | None:
    """libdeflate's own C functions (alloc, free, raw-DEFLATE decompress) from the library the ``deflate``
    package ships (its extension module exports them), or None where that package or those symbols are
    absent. Through them a block inflates straight into its slot of the pinned buffer: the package's
    Python function returns a new bytearray per block (half a megabyte of fresh pages to fault in,
    then a copy), which at gigabytes per second is a good share of a reader thread's time."""
    deflate = _libdeflate()
    if deflate is None:
        return None
    try:
        lib = ctypes.CDLL(deflate._deflate.__file__)
        alloc, free, dec = lib.libdeflate_alloc_decompressor, lib.libdeflate_free_decompressor, lib.libdeflate_deflate_decompress
    except (OSError, AttributeError):
        return None
    alloc.argtypes, alloc.restype = [], ctypes.c_void_p
    free.argtypes, free.restype = [ctypes.c_void_p], None
    # (decompressor, in, in_nbytes, out, out_nbytes_avail, actual_out_nbytes_ret); NULL for the last: exactly out_nbytes_avail
    dec.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    dec.restype = ctypes.c_int
    return alloc, free, dec


_LIBDEFLATE_RESULT = {1: "does not inflate (not valid DEFLATE data)", 2: "inflates to fewer bytes than a block holds",
                      3: "inflates to more bytes than a block holds"}


class BlockInflateError(Exception):
    """Block ``index`` (of the slots inflated together) failed; ``why`` in a few words."""

    def __init__(self, index: int, why: str) -> None:
        super().__init__(why)
        self.index, self.why = index, why


def inflater_name() -> str:
    """What :class:`HostInflater` inflates with."""
    return "zlib" if _libdeflate() is None else "libdeflate"


class HostInflater:
    """Raw DEFLATE slots -> rows of an output buffer, on the CPU, the GIL released while each block inflates.

    With libdeflate's C functions (:func:`_libdeflate_c`) each block inflates in place into its row;
    otherwise (the ``deflate`` package without them, or zlib where it is absent) into a new bytes
    object that is then copied. ``direct=False`` asks for the second way (for measuring the two)."""

    def __init__(self, size: int, direct: bool = True) -> None:
        self.size = size
        self._c = _libdeflate_c() if direct else None
        self.direct = self._c is not None
        deflate = _libdeflate()
        self._inflate = (lambda data: zlib.decompress(data, wbits=-15, bufsize=size)) if deflate is None else \
            (lambda data: deflate.deflate_decompress(data, size))

    def __call__(self, data: np.ndarray, starts: np.ndarray, lens: np.ndarray, out: np.ndarray) -> None:
        """Inflate the slots (``starts``, ``lens``) of ``data`` (uint8) into the rows of ``out`` [n, size]
        (uint8, C-contiguous); raises :class:`BlockInflateError` naming the first block that fails."""
        if out.ndim != 2 or out.shape[1] != self.size or not out.flags.c_contiguous or out.dtype != np.uint8 or len(out) < len(starts):
            raise ValueError(f"output rows must be a C-contiguous uint8 [n, {self.size}] array")
        if self._c is not None:
            alloc, free, dec = self._c
            d = alloc()
            if not d:
                raise MemoryError("libdeflate: no memory for a decompressor")
            try:
                src, dst = data.ctypes.data, out.ctypes.data
                for i, (s, n) in enumerate(zip(starts.tolist(), lens.tolist())):
                    rc = dec(d, src + s, n, dst + i * self.size, self.size, None)
                    if rc:
                        raise BlockInflateError(i, _LIBDEFLATE_RESULT.get(rc, f"does not inflate (libdeflate result {rc})"))
            finally:
                free(d)
            return
        mv = memoryview(data)
        for i, (s, n) in enumerate(zip(starts.tolist(), lens.tolist())):
            try:
                block = self._inflate(mv[s : s + n])
            except Exception as exc:  # noqa: BLE001 - a corrupt stream: named with its block by the caller
                raise BlockInflateError(i, f"does not inflate ({exc})") from None
            if len(block) != self.size:
                raise BlockInflateError(i, f"inflates to {len(block)} bytes, not {self.size}")
            out[i] = np.frombuffer(block, dtype=np.uint8)


class InflateDecoder:
    """The CPU stand-in for :class:`NvcompDecoder` (zlib on tensors in host memory): what the tests use."""

    def __call__(self, data: torch.Tensor, starts: np.ndarray, lens: np.ndarray, out: torch.Tensor) -> None:
        raw = data.cpu().numpy()
        for i, (s, n) in enumerate(zip(starts, lens)):
            block = zlib.decompress(raw[int(s) : int(s) + int(n)].tobytes(), wbits=-15)
            out[i].copy_(torch.frombuffer(bytearray(block), dtype=torch.uint8)[: out.shape[1]])


def undo_predictor(blocks: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Decoded blocks (uint8 [n, block_bytes]) -> pixels [n, tile_h, tile_w, samples] in the file's dtype,
    the horizontal predictor undone: a cumulative sum per row and sample in the samples' own width,
    which wraps around just as the predictor's differences did (one pass; a sum in int32 with a mask
    and a sign fix-up took several passes over 4 bytes a pixel, beside the engine on the same GPU)."""
    n, L = blocks.shape[0], layout
    shape = (n, L.tile_h, L.tile_w, L.samples)
    bits = L.dtype.itemsize * 8
    signed = L.dtype.kind == "i"
    raw = blocks.view(torch.int16 if bits == 16 else torch.uint8).view(shape)
    if L.predictor == 2:
        raw = raw.cumsum(2, dtype=raw.dtype)
    if bits == 16:
        return raw.view(torch.uint16) if not signed else raw
    return raw.view(torch.int8) if signed else raw


def undo_predictor_host(blocks: np.ndarray, layout: BlockLayout) -> np.ndarray:
    """:func:`undo_predictor` in numpy, for the reader threads: a torch operation on the CPU starts an
    OpenMP team for each thread that calls it (8 reader threads undoing 512 x 512 uint16 blocks took
    3 times the CPU time of this, on 2 cores), and those teams would take cores from the threads
    inflating the scene's first blocks. A cumulative sum in the file's own dtype wraps around just as
    the predictor's differences did."""
    L = layout
    px = blocks.view(L.dtype).reshape(len(blocks), L.tile_h, L.tile_w, L.samples)
    return np.cumsum(px, axis=2, dtype=L.dtype) if L.predictor == 2 else px
