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
from rs_detect import DOTA_CLASSES
from rs_detect.postprocess.geometry import obb_corners
from rs_detect.postprocess.stitch import merge, suppress_nested, to_scene
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


# -- suppress_nested: mutually exclusive classes never nest ------------------------------------------

PLANE, SHIP, HARBOR = (DOTA_CLASSES.index(c) for c in ("plane", "ship", "harbor"))
EXCLUSIVE = {PLANE, SHIP}


def scene_dets(boxes: list[list[float]], scores: list[float], classes: list[int], task: str = "detect") -> Detections:
    n = len(scores)
    width = 5 if task == "obb" else 4
    return Detections(torch.tensor(boxes, dtype=torch.float32).reshape(n, width), torch.tensor(scores, dtype=torch.float32),
                      torch.tensor(classes, dtype=torch.int64), torch.arange(n), task, "scene",  # type: ignore[arg-type]
                      torch.zeros(n, dtype=torch.bool))


def kept(dets: Detections) -> list[tuple[int, float]]:
    return list(zip(dets.class_ids.tolist(), [round(s, 3) for s in dets.scores.tolist()]))


PLANE_BOX = [100.0, 100.0, 200.0, 180.0]
WING_BOX = [150.0, 120.0, 190.0, 150.0]  # wholly inside the plane


def test_a_ship_inside_a_higher_scoring_plane_is_removed() -> None:
    far_ship = [400.0, 400.0, 440.0, 420.0]
    dets = scene_dets([far_ship, PLANE_BOX, WING_BOX], [0.5, 0.9, 0.6], [SHIP, PLANE, SHIP])
    out = suppress_nested(dets, EXCLUSIVE)
    assert kept(out) == [(SHIP, 0.5), (PLANE, 0.9)]  # the original order of the kept ones
    assert out.boxes.tolist() == [far_ship, PLANE_BOX]
    assert out.tile_ids.tolist() == [0, 1] and out.cut.tolist() == [False, False]


@pytest.mark.parametrize(("plane_score", "ship_score", "survivor"), [(0.9, 0.6, PLANE), (0.6, 0.9, SHIP)])
def test_the_lower_scoring_of_a_nested_pair_goes_whichever_class(plane_score: float, ship_score: float, survivor: int) -> None:
    for boxes, classes, scores in (
        ([PLANE_BOX, WING_BOX], [PLANE, SHIP], [plane_score, ship_score]),  # big plane, small ship
        ([WING_BOX, PLANE_BOX], [PLANE, SHIP], [plane_score, ship_score]),  # small plane, big ship
    ):
        out = suppress_nested(scene_dets(boxes, scores, classes), EXCLUSIVE)
        assert out.class_ids.tolist() == [survivor]
        assert out.scores.tolist() == [pytest.approx(max(scores))]


def test_a_removed_box_removes_nothing() -> None:
    """Greedy: plane A > ship B > plane C, nested in turn; B goes (inside A), so C (inside B) stays."""
    a, b, c = [0.0, 0.0, 100.0, 100.0], [10.0, 10.0, 90.0, 90.0], [20.0, 20.0, 80.0, 80.0]
    out = suppress_nested(scene_dets([c, b, a], [0.7, 0.8, 0.9], [PLANE, SHIP, PLANE]), EXCLUSIVE)
    assert kept(out) == [(PLANE, 0.7), (PLANE, 0.9)]


def test_nested_boxes_of_the_same_class_are_untouched_without_same_class_ios() -> None:
    for cls in (PLANE, SHIP):
        out = suppress_nested(scene_dets([PLANE_BOX, WING_BOX], [0.9, 0.6], [cls, cls]), EXCLUSIVE)
        assert kept(out) == [(cls, 0.9), (cls, 0.6)]


@pytest.mark.parametrize("cls", [PLANE, SHIP, HARBOR])  # any class, in the exclusive set or not
def test_a_partial_duplicate_of_the_same_class_goes(cls: int) -> None:
    half = [160.0, 100.0, 240.0, 180.0]  # half inside PLANE_BOX: ios 0.5
    far = [400.0, 400.0, 440.0, 420.0]
    dets = scene_dets([WING_BOX, PLANE_BOX, far], [0.6, 0.9, 0.5], [cls, cls, cls])
    assert kept(suppress_nested(dets, EXCLUSIVE, same_class_ios=0.5)) == [(cls, 0.9), (cls, 0.5)]
    # the higher-scoring one stays whichever is the smaller
    dets = scene_dets([WING_BOX, PLANE_BOX], [0.9, 0.6], [cls, cls])
    assert kept(suppress_nested(dets, EXCLUSIVE, same_class_ios=0.5)) == [(cls, 0.9)]
    partial = scene_dets([PLANE_BOX, half], [0.9, 0.6], [cls, cls])
    assert len(suppress_nested(partial, EXCLUSIVE, same_class_ios=0.6)) == 2  # under the threshold: both stay
    assert kept(suppress_nested(partial, EXCLUSIVE, same_class_ios=0.5)) == [(cls, 0.9)]
    # the cross-class rule keeps its own threshold: a ship half inside a plane stays at ios 0.7
    mixed = scene_dets([PLANE_BOX, half], [0.9, 0.6], [PLANE, SHIP])
    assert len(suppress_nested(mixed, EXCLUSIVE, ios=0.7, same_class_ios=0.5)) == 2
    # with no exclusive classes the same-class rule still runs
    assert len(suppress_nested(scene_dets([WING_BOX, PLANE_BOX], [0.6, 0.9], [cls, cls]), set(), same_class_ios=0.5)) == 1


def test_a_same_class_duplicate_uses_the_rotated_boxes() -> None:
    diag = math.pi / 4
    ship = [100.0, 100.0, 100.0, 6.0, diag]
    beside = [108.0, 92.0, 100.0, 6.0, diag]  # a second ship alongside: axis-aligned extents overlap, the ships do not
    bow = [130.0, 130.0, 30.0, 6.0, diag]  # the ship's bow boxed again, inside it
    dets = scene_dets([ship, beside, bow], [0.9, 0.8, 0.6], [SHIP, SHIP, SHIP], task="obb")
    assert kept(suppress_nested(dets, EXCLUSIVE, same_class_ios=0.5)) == [(SHIP, 0.9), (SHIP, 0.8)]


def test_classes_outside_the_set_are_untouched() -> None:
    harbor = [0.0, 0.0, 300.0, 300.0]
    out = suppress_nested(scene_dets([harbor, WING_BOX], [0.9, 0.6], [HARBOR, SHIP]), EXCLUSIVE)
    assert kept(out) == [(HARBOR, 0.9), (SHIP, 0.6)]
    # the same pair goes once harbor is made exclusive: the check above is not vacuous
    assert kept(suppress_nested(scene_dets([harbor, WING_BOX], [0.9, 0.6], [HARBOR, SHIP]), {SHIP, HARBOR})) == [(HARBOR, 0.9)]
    # an empty set disables the step
    assert len(suppress_nested(scene_dets([PLANE_BOX, WING_BOX], [0.9, 0.6], [PLANE, SHIP]), set())) == 2


def test_partial_overlap_below_the_threshold_is_untouched() -> None:
    ship = [160.0, 100.0, 240.0, 180.0]  # half of it inside the plane: ios 0.5
    dets = scene_dets([PLANE_BOX, ship], [0.9, 0.6], [PLANE, SHIP])
    assert kept(suppress_nested(dets, EXCLUSIVE, ios=0.7)) == [(PLANE, 0.9), (SHIP, 0.6)]
    assert kept(suppress_nested(dets, EXCLUSIVE, ios=0.5)) == [(PLANE, 0.9)]  # at the threshold it counts


def test_obb_uses_the_rotated_boxes() -> None:
    diag = math.pi / 4
    # two thin diagonal boxes side by side, 11 px apart across their long axis: their axis-aligned
    # extents overlap strongly, the rotated boxes not at all
    plane = [100.0, 100.0, 100.0, 6.0, diag]
    ship = [108.0, 92.0, 100.0, 6.0, diag]
    dets = scene_dets([plane, ship], [0.9, 0.6], [PLANE, SHIP], task="obb")
    aabb = dets.aabb()
    inter = (torch.minimum(aabb[0, 2:], aabb[1, 2:]) - torch.maximum(aabb[0, :2], aabb[1, :2])).clamp(min=0).prod()
    area = (aabb[:, 2:] - aabb[:, :2]).prod(-1)
    assert inter / area.min() >= 0.7  # an axis-aligned test would suppress the ship
    polys = shapely.polygons(obb_corners(dets.boxes).numpy())
    assert shapely.area(shapely.intersection(polys[0], polys[1])) == 0
    assert kept(suppress_nested(dets, EXCLUSIVE)) == [(PLANE, 0.9), (SHIP, 0.6)]
    # a ship truly inside the rotated plane goes
    nested = scene_dets([plane[:3] + [20.0, diag], [100.0, 100.0, 30.0, 8.0, diag]], [0.9, 0.6], [PLANE, SHIP], task="obb")
    out = suppress_nested(nested, EXCLUSIVE)
    assert kept(out) == [(PLANE, 0.9)] and out.task == "obb" and out.boxes.shape == (1, 5)


@pytest.mark.parametrize("task", ["detect", "obb"])
def test_suppress_nested_with_no_or_one_detection(task: str) -> None:
    empty = suppress_nested(Detections.empty(task), EXCLUSIVE)  # type: ignore[arg-type]
    assert len(empty) == 0 and empty.boxes.shape == (0, 5 if task == "obb" else 4)
    one = [[100.0, 100.0, 30.0, 8.0, 0.3]] if task == "obb" else [WING_BOX]
    assert kept(suppress_nested(scene_dets(one, [0.6], [SHIP], task), EXCLUSIVE)) == [(SHIP, 0.6)]
    # none of the classes in the set
    assert len(suppress_nested(scene_dets(one * 2, [0.6, 0.5], [HARBOR, SHIP], task), {PLANE})) == 2


def test_pipeline_drops_a_ship_nested_in_a_plane(tmp_path: Path) -> None:
    """Through the pipeline: on by default, recorded in the metadata, off with exclusive_classes=()."""
    from rs_detect.io.writer import read_metadata

    objects = [Planted(code=1, cx=128, cy=128, w=60, h=60), Planted(code=2, cx=128, cy=128, w=20, h=20)]  # ship painted over the plane
    scene = write_tif(tmp_path / "nested.tif", paint((256, 256), objects))
    engine = FakeEngine(imgsz=TILE)
    off = ScenePipeline(engine, Config(tile_size=TILE, overlap=OVERLAP, exclusive_classes=())).run(scene, tmp_path / "off.geojson")
    assert sorted(off.detections.class_ids.tolist()) == [PLANE, SHIP]  # both found, nested
    on = ScenePipeline(engine, Config(tile_size=TILE, overlap=OVERLAP)).run(scene, tmp_path / "on.geojson")
    assert len(on.detections) == 1 and sum(on.stats.per_class.values()) == 1
    assert len(gpd.read_file(tmp_path / "on.geojson")) == 1
    meta = read_metadata(tmp_path / "on.geojson")
    assert meta["exclusive_classes"] == ["plane", "ship"] and meta["exclusive_ios"] == 0.7 and meta["duplicate_ios"] == 0.5
    assert read_metadata(tmp_path / "off.geojson")["exclusive_classes"] == []


# -- a neighbour's whole view, scored under the threshold, replaces a cut piece ---------------------------


class EdgeShyEngine(FakeEngine):
    """Scores an object 0.9 where the tile cuts it and 0.3 where the tile sees it whole (a detector
    that likes the wrong view): only the cut pieces pass conf 0.5."""

    def _infer(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        out = super()._infer(images)
        nc, s = self.meta.nc, self.meta.imgsz
        x1, y1 = out[:, 0] - out[:, 2] / 2, out[:, 1] - out[:, 3] / 2
        x2, y2 = out[:, 0] + out[:, 2] / 2, out[:, 1] + out[:, 3] / 2
        touches = (x1 <= 0.5) | (y1 <= 0.5) | (x2 >= s - 0.5) | (y2 >= s - 0.5)
        scores = out[:, 4 : 4 + nc]
        found = scores > 0
        scores[found & ~touches[:, None].expand_as(scores)] = 0.3
        scores[found & touches[:, None].expand_as(scores)] = 0.9
        return out


def test_a_whole_view_under_the_threshold_replaces_the_cut_piece(tmp_path: Path) -> None:
    # across the right edge of the first column: cut in tile 0, whole in tile 1 (whose left edge is at 192)
    obj = Planted(code=1, cx=256, cy=120, w=30, h=12)
    scene = write_tif(tmp_path / "scene.tif", paint((H, W), [obj]))
    engine = EdgeShyEngine(imgsz=TILE, task="detect", max_batch=4)

    def boxes(stitch_conf: float) -> list[list[float]]:
        cfg = Config(tile_size=TILE, overlap=OVERLAP, classes=("plane", "ship"), read_threads=2, conf=0.5, stitch_conf=stitch_conf)
        res = ScenePipeline(engine, cfg).run(scene)
        assert res.detections.scores.tolist() == [pytest.approx(0.9)]  # one object, its best score
        return res.detections.boxes.tolist()

    assert boxes(0.1) == [[241.0, 114.0, 271.0, 126.0]]  # the whole box, from the tile that saw it whole
    cut = boxes(0.5)  # stitching at the output threshold: only the cut piece is left
    assert cut[0][2] == 256.0 and cut[0][2] - cut[0][0] < 30


def test_merge_keeps_the_best_score_of_a_group() -> None:
    whole = [240.0, 114.0, 270.0, 126.0]
    piece = [240.0, 114.0, 256.0, 126.0]
    dets = Detections(torch.tensor([piece, whole]), torch.tensor([0.8, 0.2]), torch.tensor([PLANE, PLANE]),
                      torch.tensor([0, 1]), "detect", "scene", torch.tensor([True, False]))
    out = merge(dets)
    assert out.boxes.tolist() == [whole] and out.scores.tolist() == [pytest.approx(0.8)] and out.cut.tolist() == [False]
