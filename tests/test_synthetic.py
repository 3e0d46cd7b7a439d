"""Synthetic scenes and chips: determinism, georeferencing, seamless band writing, truth, edge objects, CLI."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from rasterio.transform import from_origin

from rs_detect import DOTA_CLASSES
from rs_detect.cli.synth import synth
from rs_detect.io.tiling import axis_starts
from rs_detect_synth import scene as syn

REPO = Path(__file__).resolve().parents[1]
W, H = 1100, 900  # two tiler windows across, one down
TRUTH_COLUMNS = ["class_name", "class_id", "px_x1", "px_y1", "px_x2", "px_y2", "cx", "cy", "w", "h", "angle", "edge", "geometry"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> syn.SceneTruth:
    out = tmp_path_factory.mktemp("scene") / "scene.tif"
    return syn.write_scene(out, W, H, 5, truth_path=out.with_suffix(".truth.geojson"))


# ---- chips ------------------------------------------------------------------------------------


def test_chip_is_deterministic_in_range_and_labelled() -> None:
    img, objs = syn.render_chip(np.random.default_rng(3), size=512)
    again, objs_again = syn.render_chip(np.random.default_rng(3), size=512)
    other, _ = syn.render_chip(np.random.default_rng(4), size=512)
    assert img.dtype == np.float32 and img.shape == (512, 512)
    assert img.min() >= 0.0 and img.max() <= 1.0 and img.std() > 0.02
    assert np.array_equal(img, again) and objs == objs_again
    assert not np.array_equal(img, other)
    for o in objs:
        assert o.class_name in syn.CLASS_NAMES and o.class_name == DOTA_CLASSES[o.class_id]
        x1, y1, x2, y2 = o.bbox
        assert 0 <= x1 < x2 <= 512 and 0 <= y1 < y2 <= 512
        assert o.w > o.h > 0 and 0 <= o.angle < math.pi and not o.edge


def test_chip_distractors_scale_the_hard_negatives_not_the_objects() -> None:
    """More distractors: the same objects (placed first), more buildings, points and blobs; 1.0 is the default."""
    plain, objs = syn.render_chip(np.random.default_rng(3), size=512)
    same, objs_same = syn.render_chip(np.random.default_rng(3), size=512, distractors=1.0)
    busy, objs_busy = syn.render_chip(np.random.default_rng(3), size=512, distractors=3.0)
    bare, objs_bare = syn.render_chip(np.random.default_rng(3), size=512, distractors=0.0)
    assert np.array_equal(plain, same) and objs == objs_same
    assert objs_busy == objs and objs_bare == objs and len(objs) > 0
    # the counts of hard negatives scale; the draws that decide the objects do not change
    cfgs = {k: syn._chip_config(np.random.default_rng(5), 1024, None, syn.LENGTH_RANGE, k) for k in (1.0, 3.0)}
    for name in ("towns", "scattered", "points", "blobs"):
        one, three = getattr(cfgs[1.0], name), getattr(cfgs[3.0], name)
        assert three >= 3 * one - 2 and three <= 3 * one + 3, (name, one, three)
    assert cfgs[1.0].points > 0 and cfgs[1.0].blobs > 0
    assert (cfgs[1.0].planes, cfgs[1.0].ships, cfgs[1.0].roads) == (cfgs[3.0].planes, cfgs[3.0].ships, cfgs[3.0].roads)
    with pytest.raises(ValueError, match="distractors"):
        syn.render_chip(np.random.default_rng(3), size=512, distractors=-1.0)


def test_hard_zero_draws_nothing_extra() -> None:
    """hard=0 (the default) is the chip of before the option: same pixels, objects and generator state after."""
    for seed in range(4):
        plain_rng, zero_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        plain, objs = syn.render_chip(plain_rng, 256)
        zero, objs_zero = syn.render_chip(zero_rng, 256, hard=0.0)
        assert np.array_equal(plain, zero) and objs == objs_zero
        assert plain_rng.bit_generator.state == zero_rng.bit_generator.state
    cfg = syn._chip_config(np.random.default_rng(5), 1024, None, syn.LENGTH_RANGE, 1.0, 0.0)
    assert cfg == syn._chip_config(np.random.default_rng(5), 1024, None, syn.LENGTH_RANGE) and cfg.hard is None


def _hard_and_plain_chips(monkeypatch: pytest.MonkeyPatch, seeds: range, size: int) -> dict[float, dict[str, list]]:
    """Chips at hard 0 and 1, with every hull grey and every wake the planner drew (spied: no draw changes)."""
    seen: dict[float, dict[str, list]] = {h: {"objs": [], "greys": [], "wakes": []} for h in (0.0, 1.0)}
    now: dict[str, list] = {}
    ship_value, wake = syn._Look.ship_value, syn._Planner._wake

    def spy_value(look: syn._Look, rng: np.random.Generator, *dim: float) -> float:
        value = ship_value(look, rng, *dim)
        now["greys"].append((look.style, value))
        return value

    def spy_wake(planner: syn._Planner, length: float, beam: float, cx: float, cy: float, heading: float) -> list:
        under = wake(planner, length, beam, cx, cy, heading)
        now["wakes"].append((length, beam, cx, cy, under[0][0]))
        return under

    monkeypatch.setattr(syn._Look, "ship_value", spy_value)
    monkeypatch.setattr(syn._Planner, "_wake", spy_wake)
    for hard, record in seen.items():
        now.clear()
        now.update(record)
        for seed in seeds:
            img, objs = syn.render_chip(np.random.default_rng(seed), size, hard=hard)
            assert img.shape == (size, size) and 0.0 <= img.min() and img.max() <= 1.0
            record["objs"].append(objs)
    return seen


def test_hard_chips_over_represent_the_failure_modes_with_hull_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    """hard=1: more ships, more dim hulls, more wakes, thin and large ships; labels stay the hulls alone."""
    size = 512
    seen = _hard_and_plain_chips(monkeypatch, range(20), size)
    ships = {h: [o for objs in r["objs"] for o in objs if o.class_name == "ship"] for h, r in seen.items()}
    assert len(ships[1.0]) > 2 * len(ships[0.0]) and len(ships[0.0]) > 0
    dim = {h: np.mean([v <= 0.45 for style, v in r["greys"] if style == "optical"]) for h, r in seen.items()}
    assert dim[1.0] > 0.4 and dim[1.0] > dim[0.0] + 0.2, dim
    thin = {h: np.mean([o.h / o.w < 0.105 for o in s]) for h, s in ships.items()}
    assert thin[0.0] == 0.0 and thin[1.0] > 0.05, thin
    large = {h: np.mean([o.w > 60 for o in s]) for h, s in ships.items()}
    assert large[1.0] > large[0.0] + 0.1, large
    for hard, record in seen.items():
        waked = 0
        for o in (o for objs in record["objs"] for o in objs):
            # the silhouette lies inside the chip: both ends of its centre line (the bow or nose tip, the
            # middle of the stern or tail edge) do; the rectangle's corners may stick out by up to half its
            # h beyond a pointed bow or nose (as in ordinary chips; the training script clips the labels)
            c, s = math.cos(o.angle), math.sin(o.angle)
            ends = np.array([[o.cx + k * o.w / 2 * c, o.cy + k * o.w / 2 * s] for k in (-1, 1)])
            assert ends.min() >= 1.0 - 1e-6 and ends.max() <= size - 1.0 + 1e-6
            x1, y1, x2, y2 = o.bbox
            assert min(x1, y1) >= -o.h / 2 and max(x2, y2) <= size + o.h / 2 and not o.edge
            assert o.w > o.h > 0 and 0 <= o.angle < math.pi and o.class_name == DOTA_CLASSES[o.class_id]
            if o.class_name != "ship":
                continue
            assert 0.075 < o.h / o.w < 0.21 or o.h >= 2.0 - 0.05  # beam: 0.11-0.2 x length, thin 0.08-0.12 (>= 2 px)
            match = [w for w in record["wakes"] if math.hypot(w[2] - o.cx, w[3] - o.cy) < 0.05]
            if not match:
                continue
            waked += 1
            length, beam, _, _, wake_verts = match[-1]
            # the truth is the hull: its length and beam, never the hull and its (far longer) wake
            assert o.w == pytest.approx(length, abs=0.05) and o.h == pytest.approx(beam, abs=0.05)
            assert o.w * o.h <= 1.01 * length * beam
            along = np.abs((wake_verts[:, 0] - o.cx) * c + (wake_verts[:, 1] - o.cy) * s)
            assert along.max() > o.w / 2 + 0.4 * length  # the wake's far end lies well outside the box
        if hard == 1.0:
            assert waked > 0.55 * len(ships[1.0]), (waked, len(ships[1.0]))


def test_hard_chips_put_round_blobs_beside_planes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hard negatives for planes: round blobs on the apron next to parked planes, none in ordinary chips."""
    blobs: list[tuple[float, float, list[syn.TruthObject]]] = []
    try_blob = syn._Planner._try_round_blob

    def spy(planner: syn._Planner, x: float, y: float) -> None:
        blobs.append((x, y, [o for o in planner.objects if o.class_name == "plane"]))
        try_blob(planner, x, y)

    monkeypatch.setattr(syn._Planner, "_try_round_blob", spy)
    cfgs = ((s, syn._chip_config(np.random.default_rng(s), 512, None, syn.LENGTH_RANGE, 1.0, 1.0)) for s in range(100))
    with_airfield = (s for s, cfg in cfgs if cfg.airfields)
    seeds = [next(with_airfield), next(with_airfield)]
    for seed in seeds:
        syn.render_chip(np.random.default_rng(seed), 512)
    assert blobs == []
    objs = [syn.render_chip(np.random.default_rng(seed), 512, hard=1.0)[1] for seed in seeds]
    near = sum(any(math.hypot(x - p.cx, y - p.cy) < 1.6 * p.w for p in planes) for x, y, planes in blobs)
    assert len(blobs) > 10 and near > 5, (len(blobs), near)
    assert sum(o.class_name == "plane" for chip in objs for o in chip) > 0  # blobs are clutter, never labelled


@pytest.mark.parametrize("hard", [-0.1, 1.5, float("nan")])
def test_render_chip_rejects_hard_outside_0_1(hard: float) -> None:
    with pytest.raises(ValueError, match="hard"):
        syn.render_chip(np.random.default_rng(0), 128, hard=hard)


def test_chips_have_both_classes_and_both_tone_ranges() -> None:
    """Across a few chips: planes and ships, and full-range as well as low-contrast images."""
    names, spans = set(), []
    for seed in range(12):
        img, objs = syn.render_chip(np.random.default_rng(seed), size=256)
        names |= {o.class_name for o in objs}
        spans.append(np.percentile(img, 99) - np.percentile(img, 1))
    assert names == {"plane", "ship"}
    assert max(spans) > 0.6 and min(spans) < 0.4


def test_render_chip_needs_neither_rasterio_nor_geopandas() -> None:
    """The GPU training machine has numpy and pillow only: blocking the GIS stack must not matter."""
    code = (
        "import sys\n"
        "for m in ('rasterio', 'geopandas', 'pyogrio', 'shapely', 'pyproj'):\n"
        "    sys.modules[m] = None\n"
        "import numpy as np\n"
        "from rs_detect_synth import render_chip\n"
        "img, objs = render_chip(np.random.default_rng(0), size=128)\n"
        "print(img.shape)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "(128, 128)"


@pytest.mark.parametrize("kind", ["plane", "ship"])
def test_rotated_rect_is_tight_around_the_drawn_silhouette(kind: str) -> None:
    rng = np.random.default_rng(11)
    for _ in range(20):
        length, heading = rng.uniform(15, 120), rng.uniform(0, 2 * math.pi)
        local = syn._plane_outline(rng, length) if kind == "plane" else syn._ship_outline(rng, length, 0.15 * length)
        verts = syn._place(local, 300.3, 200.7, heading)
        cx, cy, w, h, angle = syn.tight_rect(verts, heading)
        assert w == pytest.approx(length, abs=0.05) and w > h
        obj = syn.TruthObject(kind, 0, cx, cy, w, h, angle)
        box = np.array(syn._poly_box(verts))
        cov = syn._poly_coverage(verts, box)
        ys, xs = np.nonzero(cov > 0)
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = xs + box[0] + 0.5 - cx, ys + box[1] + 0.5 - cy
        along, across = dx * c + dy * s, dy * c - dx * s
        # no drawn pixel has its centre a pixel or more outside the rectangle ...
        assert np.abs(along).max() < w / 2 + 1.0 and np.abs(across).max() < h / 2 + 1.0
        # ... and the silhouette reaches both ends and both sides of it
        assert along.max() > w / 2 - 1.5 and along.min() < -w / 2 + 1.5
        assert across.max() > h / 2 - 1.5 and across.min() < -h / 2 + 1.5
        assert np.allclose(obj.corners.mean(axis=0), (cx, cy))


# ---- scene files --------------------------------------------------------------------------------


def test_scene_is_georeferenced_tiled_and_compressed(scene: syn.SceneTruth) -> None:
    with rasterio.open(scene.path) as src:
        assert (src.width, src.height, src.count) == (W, H, 1)
        assert src.dtypes[0] == "uint8"
        assert src.crs.to_epsg() == 32633 and src.crs.is_projected
        assert src.transform == from_origin(500000.0, 4500000.0, 0.5, 0.5)
        assert src.profile["tiled"] and src.block_shapes == [(512, 512)]
        assert src.compression == rasterio.enums.Compression.deflate
        data = src.read(1)
    assert data.min() >= 5 and data.max() <= 250 and data.max() - data.min() > 150
    assert scene.crs == "EPSG:32633" and scene.transform == tuple(from_origin(500000.0, 4500000.0, 0.5, 0.5))[:6]
    assert not list(scene.path.parent.glob(".*"))  # no temporary file left behind


def test_striped_scene_has_full_width_strips(tmp_path: Path) -> None:
    out = syn.write_scene(tmp_path / "s.tif", 300, 200, 1, striped=True, crs="EPSG:3857", pixel_size=2.0)
    with rasterio.open(out.path) as src:
        assert not src.profile.get("tiled", False)
        assert src.block_shapes[0][1] == 300 and src.block_shapes[0][0] < 200
        assert src.crs.to_epsg() == 3857 and src.res == (2.0, 2.0)


def test_same_seed_same_bytes_other_seed_other_scene(tmp_path: Path, scene: syn.SceneTruth) -> None:
    again = syn.write_scene(tmp_path / "again.tif", W, H, 5, truth_path=tmp_path / "again.geojson")
    assert _sha(again.path) == _sha(scene.path)
    assert again.truth_path is not None and scene.truth_path is not None
    truth_a, truth_b = json.loads(again.truth_path.read_text()), json.loads(scene.truth_path.read_text())
    truth_a.pop("name"), truth_b.pop("name")  # the layer name is the file stem
    assert truth_a == truth_b and again.objects == scene.objects
    other = syn.write_scene(tmp_path / "other.tif", W, H, 6)
    assert not np.array_equal(_read(other.path), _read(scene.path)) and other.objects != scene.objects


def test_band_by_band_writing_equals_one_render(tmp_path: Path, scene: syn.SceneTruth) -> None:
    """Row bands of 100 (not a block multiple) and the default 512 both equal a single whole-scene render."""
    banded = syn.write_scene(tmp_path / "banded.tif", W, H, 5, band_rows=100)
    whole = syn.quantize(syn.render_window(syn.plan_scene(W, H, 5), 0, 0, H, W), "uint8")
    assert np.array_equal(_read(banded.path), whole)
    assert np.array_equal(_read(scene.path), whole)
    crossing = [o for o in banded.objects if math.floor(o.bbox[1] / 100) != math.floor(o.bbox[3] / 100)]
    assert crossing, "no object crosses a band boundary: the seam check would be vacuous"


def test_windows_and_chunks_render_like_the_whole() -> None:
    plan = syn.plan_scene(2300, 400, 9)  # wider than one column chunk
    whole = syn.render_window(plan, 0, 0, 400, 2300)
    assert np.array_equal(syn.render_window(plan, 123, 1001, 200, 1299), whole[123:323, 1001:2300])
    with pytest.raises(ValueError, match="not inside"):
        syn.render_window(plan, 300, 0, 200, 10)


def test_uint16_has_another_range_and_the_same_content(tmp_path: Path, scene: syn.SceneTruth) -> None:
    wide = syn.write_scene(tmp_path / "u16.tif", W, H, 5, dtype="uint16")
    with rasterio.open(wide.path) as src:
        assert src.dtypes[0] == "uint16"
        data16 = src.read(1).astype(np.float64)
    data8 = _read(scene.path).astype(np.float64)
    assert data16.min() >= 300 and data16.max() <= 3800 and data16.max() > 1000
    assert np.abs((data16 - 300) / 3500 - (data8 - 5) / 245).max() < 0.003
    assert wide.objects == scene.objects


# ---- truth ------------------------------------------------------------------------------------


def test_truth_geojson_schema_and_georeferencing(scene: syn.SceneTruth) -> None:
    import geopandas as gpd

    assert scene.truth_path is not None
    frame = gpd.read_file(scene.truth_path)
    assert list(frame.columns) == TRUTH_COLUMNS
    assert frame.crs.to_epsg() == 32633 and len(frame) == len(scene.objects) > 0
    assert set(frame.class_name) <= {"plane", "ship"} and frame.edge.dtype == bool
    assert (frame.class_id == frame.class_name.map({"plane": 0, "ship": 1})).all()
    inverse = ~from_origin(500000.0, 4500000.0, 0.5, 0.5)
    for row, obj in zip(frame.itertuples(), scene.objects, strict=True):
        ring = np.array(row.geometry.exterior.coords)[:4]
        pixel = np.array([inverse * tuple(p) for p in ring])
        assert np.allclose(pixel, obj.corners, atol=1e-6)
        assert np.allclose([row.px_x1, row.px_y1, row.px_x2, row.px_y2], obj.bbox)
        assert row.geometry.area == pytest.approx(obj.w * obj.h * 0.25, rel=1e-6)


def test_truth_boxes_lie_inside_and_objects_stand_out(scene: syn.SceneTruth) -> None:
    image = syn.render_window(syn.plan_scene(W, H, 5), 0, 0, H, W)
    for o in scene.objects:
        x1, y1, x2, y2 = o.bbox
        assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H
        r, c = int(o.cy), int(o.cx)
        core = image[r - 1 : r + 2, c - 1 : c + 2]
        ring = np.concatenate(
            [
                image[max(0, int(y1) - 8) : int(y1) - 2, max(0, int(x1)) : int(x2)].ravel(),
                image[int(y2) + 3 : int(y2) + 9, max(0, int(x1)) : int(x2)].ravel(),
                image[max(0, int(y1)) : int(y2), max(0, int(x1) - 8) : max(0, int(x1) - 2)].ravel(),
                image[max(0, int(y1)) : int(y2), int(x2) + 3 : int(x2) + 9].ravel(),
            ]
        )
        assert np.abs(core - np.median(ring)).max() > 0.1, o


def test_objects_do_not_overlap(scene: syn.SceneTruth) -> None:
    import shapely

    polys = [shapely.Polygon(o.corners) for o in scene.objects]
    tree = shapely.STRtree(polys)
    pairs = tree.query(polys, predicate="intersects")
    assert (pairs[0] == pairs[1]).all()


# ---- window edges --------------------------------------------------------------------------------


def test_edge_objects_straddle_window_edges() -> None:
    width, height, tile, overlap = 2600, 2000, 512, 96
    plan = syn.plan_scene(width, height, 21, tile=tile, overlap=overlap)
    xs, ys = syn.window_edges(width, tile, overlap), syn.window_edges(height, tile, overlap)
    starts = axis_starts(width, tile, overlap)
    assert 416 in xs and 512 in xs and starts[-1] == width - tile and width not in xs  # overlap-zone borders
    on_edge = [o for o in plan.objects if o.edge]
    windows = len(starts) * len(axis_starts(height, tile, overlap))
    assert len(on_edge) >= windows // 2
    for o in on_edge:
        x1, y1, x2, y2 = o.bbox
        assert np.any((xs > x1) & (xs < x2)) or np.any((ys > y1) & (ys < y2))
    for o in plan.objects:
        if not o.edge:
            x1, y1, x2, y2 = o.bbox
            assert not np.any((xs > x1) & (xs < x2)) and not np.any((ys > y1) & (ys < y2))
    corners = [o for o in on_edge if np.any((xs > o.bbox[0]) & (xs < o.bbox[2])) and np.any((ys > o.bbox[1]) & (ys < o.bbox[3]))]
    assert corners, "no object sits on a window corner"
    plain = syn.plan_scene(width, height, 21, tile=tile, overlap=overlap, edge_objects=False)
    assert sum(o.edge for o in plain.objects) < len(on_edge)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": -5}, "width"),
        ({"height": 10}, "height"),
        ({"seed": -1}, "seed"),
        ({"overlap": 1024}, "overlap"),
        ({"style": "infrared"}, "style"),
    ],
)
def test_plan_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    args = {"width": 200, "height": 200, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=message):
        syn.plan_scene(args.pop("width"), args.pop("height"), args.pop("seed"), **args)


def test_write_scene_rejects_geographic_crs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not projected"):
        syn.write_scene(tmp_path / "g.tif", 100, 100, 0, crs="EPSG:4326")
    assert not list(tmp_path.iterdir())


# ---- CLI ------------------------------------------------------------------------------------------


def test_cli_writes_scene_and_truth(tmp_path: Path) -> None:
    out = tmp_path / "cli.tif"
    result = CliRunner().invoke(synth, [str(out), "--width", "700", "--height", "600", "--seed", "2", "--dtype", "uint16"])
    assert result.exit_code == 0, result.output
    truth = tmp_path / "cli.truth.geojson"
    assert out.is_file() and truth.is_file()
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "700x600 uint16 tiled" in lines[0] and "plane" in lines[0] and "ship" in lines[0]
    quiet = CliRunner().invoke(synth, [str(tmp_path / "q.tif"), "--width", "64", "--height", "64", "--quiet", "--striped", "--truth", str(tmp_path / "t.json")])
    assert quiet.exit_code == 0 and quiet.output == "" and (tmp_path / "t.json").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "-5"], "width must be an integer >= 64"),
        (["--dtype", "float32"], "--dtype must be uint8 or uint16"),
        (["--seed", "-3"], "seed must be a non-negative integer"),
    ],
)
def test_cli_bad_arguments_fail_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(synth, [str(tmp_path / "x.tif"), "--width", "100", "--height", "100", *args])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'x.tif'}: ") and message in lines[0]
    assert not (tmp_path / "x.tif").exists()


@pytest.mark.parametrize("where", ["missing", "file"])
def test_cli_unwritable_directory_fails_with_one_line(tmp_path: Path, where: str) -> None:
    parent = tmp_path / "nope"
    if where == "file":
        parent.write_text("not a directory")
    result = CliRunner().invoke(synth, [str(parent / "x.tif"), "--width", "100", "--height", "100"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {parent / 'x.tif'}: cannot write")


def test_runtime_package_does_not_import_the_synthetic_package() -> None:
    """The renderer is a lab tool: loading the CLI and running ``--help`` leaves it unimported."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from rs_detect.cli import cli\n"
        "import rs_detect.pipeline, rs_detect.batch, rs_detect.engines\n"
        "assert CliRunner().invoke(cli, ['--help']).exit_code == 0\n"
        "print(sorted(m for m in sys.modules if m.startswith('rs_detect_synth')))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
    importers = [p.relative_to(REPO).as_posix() for p in (REPO / "rs_detect").rglob("*.py") if "rs_detect_synth" in p.read_text()]
    assert importers == ["rs_detect/cli/synth.py"]
