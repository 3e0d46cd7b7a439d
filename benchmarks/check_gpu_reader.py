"""The GPU reading path on a real GPU: every window equal to GDAL's (not a test: the CUDA twin of
tests/test_gpu_blocks.py, which runs the same code on the CPU with zlib in place of nvCOMP).

    python benchmarks/check_gpu_reader.py [--out DIR] [--scene EXTRA.tif ...]

Writes small scenes of each kind the path takes (uint8/uint16/int16, predictor 1/2, uncompressed,
RGB pixel-interleaved, several decode groups), reads each through both paths on cuda:0 and prints
one JSON line per file: equal or not, windows compared. Exit 1 if any differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.enums import ColorInterp as CI

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rs_detect.io import gpu_blocks  # noqa: E402
from rs_detect.io.gpu_blocks import NvcompDecoder, gpu_read_plan, gpu_window_batches  # noqa: E402
from rs_detect.io.prefetch import window_batches  # noqa: E402
from rs_detect.io.reader import RasterSource  # noqa: E402
from rs_detect.io.tiling import iter_tiles  # noqa: E402


def write(path: Path, dtype: str, shape: tuple[int, int, int], seed: int = 0, **kw: object) -> Path:
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    data = (np.cumsum(rng.integers(-3, 4, shape), axis=-1) % (int(info.max) - int(info.min) + 1) + int(info.min)).astype(dtype)
    prof = dict(driver="GTiff", width=shape[2], height=shape[1], count=shape[0], dtype=dtype, tiled=True, blockxsize=512,
                blockysize=512, compress="deflate", crs="EPSG:32633", transform=rasterio.transform.from_origin(500000, 4500000, 1, 1))
    prof.update(kw)
    with rasterio.open(path, "w", **prof) as ds:
        ds.write(data)
        if shape[0] == 3:
            ds.colorinterp = (CI.red, CI.green, CI.blue)
    return path


def compare(path: Path, nvcomp: bool, size: int = 1024, overlap: int = 192, batch: int = 16) -> dict:
    dev = torch.device("cuda")
    with RasterSource(path, channels=1) as src, ThreadPoolExecutor(8) as pool, ThreadPoolExecutor(4) as cutters:
        layout, why = gpu_read_plan(src, dev, "auto")
        if layout is None:
            return {"scene": path.name, "gpu_path": False, "why": why}
        tiles = list(iter_tiles(src.width, src.height, size, overlap, src.transform))
        cpu = list(window_batches(src, iter(tiles), pool, batch, size, False, 2, 8, cutters, stride=size - overlap))
        stream = torch.cuda.Stream()
        decoder = NvcompDecoder(dev, stream) if nvcomp and layout.compression == "deflate" else None
        gpu = list(gpu_window_batches(src, layout, iter(tiles), pool, batch, size, dev, stream, decoder=decoder))
        torch.cuda.synchronize()
        equal, windows = True, 0
        for a, b in zip(cpu, gpu, strict=True):
            assert a.tiles == b.tiles
            bd = b.data.cpu()
            if a.valid is None:
                same = torch.equal(a.data, bd)
            else:
                bv = b.valid.cpu()
                ad, bd = a.data.to(torch.int32), bd.to(torch.int32)
                same = torch.equal(a.valid, bv) and torch.equal(torch.where(a.valid[:, None], ad, 0), torch.where(bv[:, None], bd, 0))
            equal &= same
            windows += a.size
    return {"scene": path.name, "gpu_path": True, "codec": layout.codec, "inflate": "nvCOMP" if decoder else "host",
            "equal": bool(equal), "windows": windows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/gpu_reader_check"))
    ap.add_argument("--scene", nargs="*", default=[])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gpu_blocks.GROUP_ROWS = gpu_blocks.HOST_GROUP_ROWS = 1024  # several decode groups in these small scenes
    o = args.out
    files = [
        write(o / "u16_p1.tif", "uint16", (1, 3000, 2600)),
        write(o / "u16_p2.tif", "uint16", (1, 3000, 2600), predictor=2),
        write(o / "u8_p1.tif", "uint8", (1, 2100, 3100)),
        write(o / "u8_p2.tif", "uint8", (1, 2100, 3100), predictor=2),
        write(o / "i16_p2.tif", "int16", (1, 1500, 1500), predictor=2),
        write(o / "u16_raw.tif", "uint16", (1, 1500, 1700), compress="none"),
        write(o / "rgb_p2.tif", "uint8", (3, 1300, 1700), predictor=2, photometric="rgb", interleave="pixel"),
        write(o / "small.tif", "uint16", (1, 700, 900), blockxsize=256, blockysize=256),
    ] + [Path(s) for s in args.scene]
    bad = 0
    for f in files:
        for nvcomp in (False, True):
            try:
                row = compare(f, nvcomp)
            except Exception as exc:  # noqa: BLE001 - reported, and counted as a failure
                row = {"scene": f.name, "nvcomp": nvcomp, "gpu_path": True, "equal": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
            bad += row.get("gpu_path") and not row.get("equal")
            print(json.dumps(row), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
