#!/usr/bin/env python3
"""Build ``sample_data/airport_demo.tif``: a real scene for the README's first command.

Sixteen images of the held-out ``test`` split of ``gdit-aerial-airport`` (Public Domain; the first
16 source images by name, never used to train or to choose thresholds) are laid 4 x 4 into one
2400 x 2400 RGB GeoTIFF. The georeferencing is made up (EPSG:32633, 0.5 m pixels, as the synthetic
demo): the images are resized crops of unknown ground resolution. The airplanes' labels become
``airport_demo.truth.geojson`` (rectangles in EPSG:32633 with their pixel boxes), which
``rs-detect eval`` compares a run's output with.

    python tools/make_real_demo.py                  # writes sample_data/airport_demo.tif and its truth
    python tools/make_real_demo.py --out /tmp/demo  # elsewhere
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from train_real_sample_model import AIRPORT, DATASETS, airport_boxes, airport_sources  # noqa: E402

GRID, CELL = 4, 600
ORIGIN = (500000.0, 5000000.0)  # upper-left corner, EPSG:32633 (made up)
PIXEL = 0.5


def build(out: Path) -> tuple[Path, Path, int]:
    import geopandas as gpd
    import rasterio
    import shapely
    from affine import Affine
    from PIL import Image

    sources = airport_sources("test")[: GRID * GRID]
    if len(sources) < GRID * GRID:
        raise SystemExit(f"{DATASETS / AIRPORT}: fewer than {GRID * GRID} test images")
    size = GRID * CELL
    canvas = np.zeros((3, size, size), dtype=np.uint8)
    rows = []
    transform = Affine(PIXEL, 0, ORIGIN[0], 0, -PIXEL, ORIGIN[1])
    for k, src in enumerate(sources):
        ox, oy = (k % GRID) * CELL, (k // GRID) * CELL
        im = np.asarray(Image.open(src).convert("RGB"))[:CELL, :CELL]
        canvas[:, oy : oy + im.shape[0], ox : ox + im.shape[1]] = im.transpose(2, 0, 1)
        for x1, y1, x2, y2 in airport_boxes(src.parent.parent / "labelTxt" / (src.stem + ".txt")):
            x1, y1, x2, y2 = (max(min(v, CELL), 0) for v in (x1, y1, x2, y2))
            if x2 - x1 < 2 or y2 - y1 < 2:
                continue
            b = (x1 + ox, y1 + oy, x2 + ox, y2 + oy)
            rows.append({"class_name": "plane", "source": src.name.split("_jpg")[0],
                         "px_x1": b[0], "px_y1": b[1], "px_x2": b[2], "px_y2": b[3],
                         "geometry": shapely.box(*(transform * (b[0], b[3])), *(transform * (b[2], b[1])))})
    out.mkdir(parents=True, exist_ok=True)
    tif, truth = out / "airport_demo.tif", out / "airport_demo.truth.geojson"
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8", "crs": "EPSG:32633",
               "transform": transform, "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "JPEG",
               "photometric": "YCBCR", "jpeg_quality": 90}
    with rasterio.open(tif, "w", **profile) as ds:
        ds.write(canvas)
        ds.update_tags(SOURCE="gdit-aerial-airport test split (Public Domain), 16 images 4 x 4; made-up georeferencing",
                       IMAGES=",".join(s.name.split("_jpg")[0] for s in sources))
    truth.unlink(missing_ok=True)
    gpd.GeoDataFrame(rows, geometry="geometry", crs="EPSG:32633").to_file(truth, driver="GeoJSON")
    return tif, truth, len(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "sample_data")
    args = p.parse_args(argv)
    tif, truth, n = build(args.out)
    print(f"{tif} ({tif.stat().st_size / 1e6:.1f} MB), {truth}: {n} planes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
