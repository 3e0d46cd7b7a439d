"""Decode candidates for the reader, measured one by one on one scene (not a test).

    python benchmarks/probe_decode.py SCENE.tif [--threads 14] [--nvcomp]

Prints one JSON line per candidate: GB/s of decoded pixels (file dtype) and, where it applies, how
long each step took. The candidates:

- ``zlib-1core`` / ``zlib-Nthreads``: Python's zlib on the TIFF's own compressed blocks (its own
  offsets and byte counts, read with one sequential read), one thread and N threads (zlib releases
  the GIL while inflating): what plain inflate costs on these cores.
- ``gdal-slab-Nthreads``: one rasterio read of whole full-width slabs (one block row each) with GDAL's
  own multithreaded decoding (the NUM_THREADS open option): the decode stays in C, no GIL.
- ``nvcomp-K``: the compressed blocks of K block rows read with one sequential read into pinned
  memory, copied to the GPU and decompressed there in one nvCOMP batch (DEFLATE, raw bitstream: the
  zlib header and trailer of each TIFF block are cut off). ``verify`` compares the first block row
  with GDAL's decode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def layout(path: str) -> dict:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        pg = tf.pages[0]
        return dict(offsets=np.asarray(pg.dataoffsets, np.int64), counts=np.asarray(pg.databytecounts, np.int64),
                    compression=int(pg.compression), predictor=int(pg.predictor), tile=(int(pg.tilelength), int(pg.tilewidth)),
                    shape=(int(pg.imagelength), int(pg.imagewidth)), dtype=np.dtype(pg.dtype), tiled=bool(pg.is_tiled),
                    byteorder=tf.byteorder)


def read_span(fd: int, offsets: np.ndarray, counts: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    lo, hi = int(offsets.min()), int((offsets + counts).max())
    buf = out[: hi - lo] if out is not None and out.size >= hi - lo else np.empty(hi - lo, np.uint8)
    got = os.preadv(fd, [memoryview(buf)], lo)
    assert got == hi - lo, (got, hi - lo)
    return buf, lo


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def cpu_zlib(path: str, lay: dict, threads: int) -> None:
    th, tw = lay["tile"]
    ntx = -(-lay["shape"][1] // tw)
    rows = min(8, -(-lay["shape"][0] // th))
    offs, cnts = lay["offsets"][: rows * ntx], lay["counts"][: rows * ntx]
    fd = os.open(path, os.O_RDONLY)
    t0 = time.perf_counter()
    buf, lo = read_span(fd, offs, cnts)
    t_read = time.perf_counter() - t0
    blobs = [bytes(buf[o - lo : o - lo + c]) for o, c in zip(offs, cnts)]
    nbytes = len(blobs) * th * tw * lay["dtype"].itemsize
    t0 = time.perf_counter()
    for b in blobs[: max(8, len(blobs) // 8)]:
        zlib.decompress(b)
    dt = time.perf_counter() - t0
    emit(candidate="zlib-1core", gbps=round(nbytes / 8 / dt / 1e9 if len(blobs) >= 64 else nbytes / dt / 1e9, 3),
         read_gbps=round(buf.size / t_read / 1e9, 2))
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(zlib.decompress, blobs[:threads]))
        t0 = time.perf_counter()
        list(pool.map(zlib.decompress, blobs))
        dt = time.perf_counter() - t0
    emit(candidate=f"zlib-{threads}threads", gbps=round(nbytes / dt / 1e9, 3))
    for name, fn in _inflaters(th * tw * lay["dtype"].itemsize):
        t0 = time.perf_counter()
        for b in blobs[:64]:
            fn(b)
        one = time.perf_counter() - t0
        with ThreadPoolExecutor(threads) as pool:
            t0 = time.perf_counter()
            list(pool.map(fn, blobs))
            dt = time.perf_counter() - t0
        emit(candidate=name, gbps_1core=round(min(64, len(blobs)) * th * tw * lay["dtype"].itemsize / one / 1e9, 3),
             gbps_threads=round(nbytes / dt / 1e9, 3), threads=threads)
    os.close(fd)


def _inflaters(size: int) -> list:
    out = []
    try:
        import deflate  # libdeflate

        out.append(("libdeflate", lambda b: deflate.zlib_decompress(b, size)))
    except ImportError:
        pass
    try:
        from isal import isal_zlib  # Intel ISA-L

        out.append(("isal", isal_zlib.decompress))
    except ImportError:
        pass
    return out


def gdal_slabs(path: str, lay: dict, threads: int, concurrent: int = 1) -> None:
    import rasterio
    from rasterio.windows import Window

    th = lay["tile"][0]
    H, W = lay["shape"]
    rows = min(16, H // th)
    handles = [rasterio.open(path, NUM_THREADS=str(max(1, threads // concurrent))) for _ in range(concurrent)]
    bufs = [np.empty((th, W), lay["dtype"]) for _ in range(concurrent)]

    def one(i: int) -> None:
        k = i % concurrent
        handles[k].read(1, window=Window(0, i * th, W, th), out=bufs[k])

    # warm: first read opens the decoding threads
    one(rows - 1)
    with ThreadPoolExecutor(concurrent) as pool:
        t0 = time.perf_counter()
        if concurrent == 1:
            for i in range(rows):
                one(i)
        else:
            for k0 in range(0, rows, concurrent):
                list(pool.map(one, range(k0, min(rows, k0 + concurrent))))
        dt = time.perf_counter() - t0
    nbytes = rows * th * W * lay["dtype"].itemsize
    emit(candidate=f"gdal-slab-{threads}threads-x{concurrent}", gbps=round(nbytes / dt / 1e9, 3), slabs=rows)
    for h in handles:
        h.close()


def nvcomp_probe(path: str, lay: dict, rows_per_call: list[int]) -> None:
    import torch
    from nvidia import nvcomp

    dev = torch.device("cuda")
    th, tw = lay["tile"]
    H, W = lay["shape"]
    ntx, nty = -(-W // tw), -(-H // th)
    item = lay["dtype"].itemsize
    tile_bytes = th * tw * item
    stream = torch.cuda.Stream()
    fd = os.open(path, os.O_RDONLY)
    offs = lay["offsets"].reshape(nty, ntx)
    cnts = lay["counts"].reshape(nty, ntx)
    variants = {}
    for k in rows_per_call:
        k = min(k, nty)
        maxspan = max(int((offs[r : r + k] + cnts[r : r + k]).max() - offs[r : r + k].min()) for r in range(0, nty, k))
        host = torch.empty(maxspan, dtype=torch.uint8, pin_memory=True)
        out = torch.empty((k * ntx, tile_bytes), dtype=torch.uint8, device=dev)
        t_read = t_h2d = t_dec = 0.0
        err = None
        for variant in ("out", "alloc"):
            try:
                codec = nvcomp.Codec(algorithm="Deflate", bitstream_kind=nvcomp.BitstreamKind.RAW, cuda_stream=stream.cuda_stream)
                t_read = t_h2d = t_dec = 0.0
                t_all = time.perf_counter()
                for r in range(0, nty, k):
                    o, c = offs[r : r + k].ravel(), cnts[r : r + k].ravel()
                    t0 = time.perf_counter()
                    buf, lo = read_span(fd, o, c, host.numpy())
                    t1 = time.perf_counter()
                    with torch.cuda.stream(stream):
                        d = host[: buf.size].to(dev, non_blocking=True)
                        stream.synchronize()
                        t2 = time.perf_counter()
                        srcs = nvcomp.as_arrays([d[int(a) - lo + 2 : int(a) - lo + int(b) - 4] for a, b in zip(o, c)])
                        if variant == "out":
                            dst = nvcomp.as_arrays([out[i] for i in range(len(o))])
                            codec.decode(srcs, out=dst)
                        else:
                            res = codec.decode(srcs, data_type="|u1")
                            for i in range(len(o)):
                                out[i].copy_(torch.from_dlpack(res[i]).view(torch.uint8).reshape(-1)[:tile_bytes])
                        stream.synchronize()
                    t3 = time.perf_counter()
                    t_read += t1 - t0
                    t_h2d += t2 - t1
                    t_dec += t3 - t2
                    if r == 0:
                        first = out[:ntx].clone()
                total = time.perf_counter() - t_all
                nbytes = nty * ntx * tile_bytes
                row = dict(candidate=f"nvcomp-{k}rows", variant=variant, gbps=round(nbytes / total / 1e9, 3),
                           decode_gbps=round(nbytes / t_dec / 1e9, 3), read_s=round(t_read, 3), h2d_s=round(t_h2d, 3),
                           decode_s=round(t_dec, 3), total_s=round(total, 3), chunks_per_call=k * ntx)
                if k == rows_per_call[0]:
                    import rasterio
                    from rasterio.windows import Window

                    with rasterio.open(path) as ds:
                        ref = ds.read(1, window=Window(0, 0, W, th))
                    got = first.view(ntx, th, tw * item).cpu().numpy().view(lay["dtype"]).reshape(ntx, th, tw)
                    if lay["predictor"] == 2:
                        got = np.cumsum(got, axis=-1, dtype=got.dtype)
                    got = got.transpose(1, 0, 2).reshape(th, ntx * tw)[:, :W]
                    row["verify_equal"] = bool(np.array_equal(got, ref))
                emit(**row)
                variants[variant] = row
                if variant == "out":
                    break
            except Exception as exc:  # noqa: BLE001 - a probe: report and try the next variant
                err = f"{type(exc).__name__}: {exc}"
                emit(candidate=f"nvcomp-{k}rows", variant=variant, error=err[:400])
    # predictor undo on the GPU (uint16, one block row): int32 cumsum, masked back
    x = torch.randint(0, 65535, (ntx * 4, th, tw), dtype=torch.int32, device=dev)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y = x.cumsum(-1).bitwise_and_(0xFFFF)
    torch.cuda.synchronize()
    emit(candidate="predictor-undo-gpu", gbps=round(10 * x.numel() * 2 / (time.perf_counter() - t0) / 1e9, 2))
    del y
    os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scene")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--nvcomp", action="store_true")
    ap.add_argument("--rows", default="1,4,16", help="block rows per nvCOMP batch")
    args = ap.parse_args()
    lay = layout(args.scene)
    emit(scene=os.path.basename(args.scene), compression=lay["compression"], predictor=lay["predictor"], tile=lay["tile"],
         shape=lay["shape"], dtype=str(lay["dtype"]), blocks=len(lay["offsets"]), cpus=os.cpu_count())
    cpu_zlib(args.scene, lay, args.threads)
    for threads, conc in ((1, 1), (args.threads, 1), (args.threads, 2), (args.threads, 4)):
        gdal_slabs(args.scene, lay, threads, conc)
    if args.nvcomp:
        nvcomp_probe(args.scene, lay, [int(r) for r in args.rows.split(",")])


if __name__ == "__main__":
    sys.exit(main())
