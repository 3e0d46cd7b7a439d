"""Stitching through the real pipeline: objects planted on tile edges and corners come out once, whole."""

from __future__ import annotations

import math
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
import torch

from conftest import FakeEngine, Planted, paint, write_tif
from rs_detect.config import Config
from rs_detect.pipeline import ScenePipeline
from rs_detect.postprocess.stitch import merge, to_scene
from rs_detect.io.tiling import iter_tiles
from rs_detect.types import Detections

TILE, OVERLAP = 256, 64  # window starts at 0, 192, 384, ...: right edges at 256, 448, 640, ...
W, H = 1000, 900

# (cx, cy, w, h): integer-aligned so the painted pixels are exactly the box
HBB_OBJECTS = [
    (100, 100, 20, 10),  # inside one tile
    (256, 120, 30, 12),  # across the right edge of the first column (cut in tile 0, whole in tile 1)
    (192, 300, 16, 30),  # across the left edge of the second column
    (320, 256, 12, 40),  # across a bottom edge
    (256, 192, 24, 24),  # on a corner shared by four tiles
    (224, 224, 20, 20),  # wholly inside the overlap of four tiles: four whole copies
    (448, 450, 40, 18),  # on another corner
    (620, 420, 120, 20),  # larger than the overlap, across an edge: no tile sees it whole
    (990, 890, 20, 20),  # clipped by the scene border (not a tile edge)
    (700, 700, 60, 60),  # a big one inside
    (212, 630, 30, 8),  # in a vertical overlap strip
]


def planted_hbb() -> list[Planted]:
    return [Planted(code=i + 1, cx=cx, cy=cy, w=w, h=h) for i, (cx, cy, w, h) in enumerate(HBB_OBJECTS)]


def planted_obb() -> list[Planted]:
    rng = np.random.default_rng(3)
    objs = []
    for i, (cx, cy, w, h) in enumerate(HBB_OBJECTS[:-2]):
        objs.append(Planted(code=i + 1, cx=cx + 0.3, cy=cy + 0.2, w=max(w, h) + 6, h=min(w, h) + 4, angle=float(rng.uniform(0, math.pi))))
    return objs


def run_scene(tmp_path: Path, objects: list[Planted], task: str) -> tuple[gpd.GeoDataFrame, Detections]:
    """Run the pipeline; also checks the tiles really saw duplicates and pieces (the merge had work)."""
    scene = write_tif(tmp_path / "scene.tif", paint((H, W), objects))
    engine = FakeEngine(imgsz=TILE, task=task, max_batch=4)
    cfg = Config(tile_size=TILE, overlap=OVERLAP, classes=("plane", "ship"), read_threads=2)
    result = ScenePipeline(engine, cfg).run(scene, tmp_path / "out.geojson")
    assert result.stats.tiles_read == len(list(iter_tiles(W, H, TILE, OVERLAP)))
    assert result.stats.detections_raw >= len(objects) + 10  # before stitching: copies and pieces
    return gpd.read_file(tmp_path / "out.geojson"), result.detections


def match(objects: list[Planted], dets: Detections, min_iou: float) -> None:
    if dets.task == "obb":
        from rs_detect.georef import pixel_corners

        got = shapely.polygons(pixel_corners(dets))
    else:
        b = dets.boxes.numpy()
        got = shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3])
    names = ["plane", "ship"]
    assert len(dets) == len(objects), f"{len(dets)} detections for {len(objects)} objects"
    used = set()
    for o in objects:
        truth = o.polygon().intersection(shapely.box(0, 0, W, H))  # the scene border clips, tiles must not
        if dets.task == "obb":
            truth = shapely.minimum_rotated_rectangle(truth)
        ious = shapely.area(shapely.intersection(got, truth)) / shapely.area(shapely.union(got, truth))
        k = int(np.argmax(ious))
        assert ious[k] >= min_iou, f"object {o} best IoU {ious[k]:.2f}"
        assert names[int(dets.class_ids[k])] == o.class_name
        used.add(k)
    assert len(used) == len(objects)  # one detection per object


def test_hbb_objects_on_edges_and_corners_are_reported_once_with_full_extent(tmp_path: Path) -> None:
    objects = planted_hbb()
    gdf, dets = run_scene(tmp_path, objects, "detect")
    match(objects, dets, min_iou=0.97)
    assert len(gdf) == len(objects)
    assert gdf.crs.to_epsg() == 4326
    # the object larger than the overlap was seen only in pieces and merged back
    big = shapely.box(560, 410, 680, 430)
    assert any(shapely.box(*r).equals_exact(big, 1e-3) for r in dets.boxes.tolist())


def test_obb_objects_on_edges_and_corners_are_reported_once(tmp_path: Path) -> None:
    objects = planted_obb()
    _, dets = run_scene(tmp_path, objects, "obb")
    match(objects, dets, min_iou=0.75)


def test_merge_is_scene_wide_far_from_the_origin() -> None:
    """Boxes at 40 000 px from the origin merge like boxes near it (no fixed class offset)."""
    tiles = [t for t in iter_tiles(50_000, 50_000, 1024, 192) if (t.row, t.col) in ((48, 48), (48, 49))]
    left, right = tiles
    x_edge = left.col_off + 1024  # the right edge of the left tile
    local_left = torch.tensor([[x_edge - left.col_off - 20, 500.0, 1024.0, 530.0]])  # cut at its right edge
    local_right = torch.tensor([[x_edge - right.col_off - 20, 500.0, x_edge - right.col_off + 30, 530.0]])
    dets = Detections(torch.cat([local_left, local_right]), torch.tensor([0.9, 0.8]), torch.tensor([0, 0]), torch.tensor([0, 1]))
    scene = to_scene(dets, [left, right])
    assert scene.cut.tolist() == [True, False]
    merged = merge(scene)
    assert len(merged) == 1
    assert merged.boxes[0].tolist() == [x_edge - 20, left.row_off + 500.0, x_edge + 30, left.row_off + 530.0]


def test_batches_respect_engine_bounds(tmp_path: Path) -> None:
    scene = write_tif(tmp_path / "scene.tif", paint((H, W), planted_hbb()))
    static = FakeEngine(imgsz=TILE, max_batch=1, dynamic=False)
    ScenePipeline(static, Config(tile_size=TILE, overlap=OVERLAP, batch_size=16)).run(scene)
    assert set(static.calls) == {1}
    dynamic = FakeEngine(imgsz=TILE, max_batch=4)
    ScenePipeline(dynamic, Config(tile_size=TILE, overlap=OVERLAP, batch_size=16)).run(scene)
    assert max(dynamic.calls) == 4


@pytest.mark.parametrize("shift", [0, 7])
def test_same_objects_same_result_wherever_the_grid_falls(tmp_path: Path, shift: int) -> None:
    """Shifting the objects relative to the grid does not change what is found."""
    objects = [Planted(o.code, o.cx + shift, o.cy + shift, o.w, o.h) for o in planted_hbb()[:-2]]
    _, dets = run_scene(tmp_path, objects, "detect")
    match(objects, dets, min_iou=0.97)
