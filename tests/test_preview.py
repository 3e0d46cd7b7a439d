"""The quick-look PNG: decimated read, class-coloured outlines, legend, scale bar, and ``detect --preview``."""

from __future__ import annotations

import math
import os
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from click.testing import CliRunner
from PIL import Image
from rasterio.transform import from_origin

from rs_detect import DOTA_CLASSES
from rs_detect.errors import OutputError
from rs_detect.engines.onnxruntime import export_torch_module_onnx
from rs_detect.io.reader import ScaleConfig
from rs_detect.pipeline import SceneResult
from rs_detect.postprocess.geometry import obb_corners
from rs_detect.preview import (
    BACKGROUND,
    SCALE_BAR,
    default_preview_path,
    nice_length,
    render_preview,
    render_result_preview,
)
from rs_detect.style import class_colours
from rs_detect.types import Detections, RunStats

GREY = 100  # the scenes' uniform value: uint8 / 255 -> drawn back as (100, 100, 100)
COLOURS = class_colours(DOTA_CLASSES)
PLANE, SHIP = COLOURS["plane"], COLOURS["ship"]


def write_scene(path: Path, width: int, height: int, crs: str | None = "EPSG:32633", value: int = GREY,
                dtype: str = "uint8", pixel: float = 0.5) -> Path:
    transform = from_origin(500000.0, 4500000.0, pixel, pixel) if crs != "EPSG:4326" else from_origin(10.0, 50.0, 1e-5, 1e-5)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=1, dtype=dtype, crs=crs,
                       transform=transform, tiled=True, blockxsize=256, blockysize=256) as ds:
        ds.write(np.full((1, height, width), value, dtype=dtype))
    return path


def dets(boxes: list[list[float]], class_ids: list[int], task: str = "detect") -> Detections:
    k = len(boxes)
    return Detections(
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(k, 5 if task == "obb" else 4),
        scores=torch.linspace(0.9, 0.5, k) if k else torch.zeros(0),
        class_ids=torch.tensor(class_ids, dtype=torch.int64),
        tile_ids=torch.zeros(k, dtype=torch.int64),
        task=task,  # type: ignore[arg-type]
        frame="scene",
    )


def pixel(img: Image.Image, x: float, y: float) -> tuple[int, int, int]:
    return img.getpixel((int(round(x)), int(round(y))))  # type: ignore[return-value]


def near(img: Image.Image, x: float, y: float, colour: tuple[int, int, int], r: int = 1) -> bool:
    """``colour`` within ``r`` pixels of (x, y) (outlines are rasterised to whole pixels)."""
    return any(pixel(img, x + dx, y + dy) == colour for dx in range(-r, r + 1) for dy in range(-r, r + 1))


def colour_pixels(img: Image.Image, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> int:
    arr = np.asarray(img.crop(box))
    return int((arr == np.array(colour, dtype=np.uint8)).all(axis=-1).sum())


# -- drawing -----------------------------------------------------------------------------------------


def test_boxes_are_outlined_in_their_class_colour(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "scene.tif", 512, 512)
    d = dets([[100, 120, 300, 220], [350, 300, 450, 480], [20, 400, 60, 440]], [0, 1, 0])
    out = tmp_path / "q.png"
    lay = render_preview(scene, d, DOTA_CLASSES, out)
    img = Image.open(out)
    assert img.format == "PNG" and img.size == lay.size
    img.verify()
    img = Image.open(out).convert("RGB")
    x0, y0, x1, y1 = lay.image_box
    assert (x1 - x0, y1 - y0) == (512, 512) and lay.zoom == (1.0, 1.0)
    # outlines: the middle of every edge of the plane box, and of the ship box
    for x, y in ((200, 120), (200, 220), (100, 170), (300, 170)):
        assert near(img, x0 + x, y0 + y, PLANE), (x, y)
    for x, y in ((400, 300), (400, 480), (350, 390), (450, 390)):
        assert near(img, x0 + x, y0 + y, SHIP), (x, y)
    # inside the boxes and elsewhere: the scene's grey, untouched
    for x, y in ((200, 170), (400, 390), (480, 40), (256, 30)):
        assert pixel(img, x0 + x, y0 + y) == (GREY, GREY, GREY), (x, y)
    # title bar and footer are outside the scene image
    assert pixel(img, 2, 2) == BACKGROUND and y0 > 0 and lay.size[1] > y1
    assert lay.counts == {"plane": 2, "ship": 1}


def test_rotated_boxes_are_drawn_rotated(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "scene.tif", 512, 512)
    obb = [256.0, 256.0, 240.0, 60.0, math.pi / 6]
    lay = render_preview(scene, dets([obb], [1], task="obb"), DOTA_CLASSES, tmp_path / "obb.png")
    img = Image.open(tmp_path / "obb.png").convert("RGB")
    x0, y0 = lay.image_box[:2]
    corners = obb_corners(torch.tensor([obb], dtype=torch.float64))[0].numpy()
    for i in range(4):  # the middle of each rotated edge carries the ship colour
        mx, my = (corners[i] + corners[(i + 1) % 4]) / 2
        assert near(img, x0 + mx, y0 + my, SHIP), i
    # the corner of the axis-aligned extent lies outside the rotated box: nothing drawn there
    ax, ay = corners.min(axis=0)
    assert pixel(img, x0 + ax + 2, y0 + ay + 2) == (GREY, GREY, GREY)


def test_decimated_read_maps_boxes_by_the_factor(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "wide.tif", 2048, 1024)
    lay = render_preview(scene, dets([[400, 400, 1200, 800], [1600, 100, 1602, 102]], [0, 1]), DOTA_CLASSES,
                         tmp_path / "wide.png", max_size=512, min_size=64)
    img = Image.open(tmp_path / "wide.png").convert("RGB")
    x0, y0, x1, y1 = lay.image_box
    assert (x1 - x0, y1 - y0) == (512, 256) and lay.zoom == (0.25, 0.25)
    assert near(img, x0 + 200, y0 + 100, PLANE) and near(img, x0 + 100, y0 + 150, PLANE)
    assert pixel(img, x0 + 200, y0 + 150) == (GREY, GREY, GREY)
    # a 2 px box is 0.5 px here: drawn as a small marker so it is not lost
    assert colour_pixels(img, (x0 + 395, y0 + 20, x0 + 407, y0 + 32), SHIP) > 0


def test_small_scenes_are_enlarged(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "chip.tif", 100, 80)
    lay = render_preview(scene, dets([[10, 10, 30, 20]], [0]), DOTA_CLASSES, tmp_path / "chip.png")
    assert lay.zoom == (5.0, 5.0) and lay.image_box[2] - lay.image_box[0] == 500
    img = Image.open(tmp_path / "chip.png").convert("RGB")
    assert near(img, lay.image_box[0] + 100, lay.image_box[1] + 50, PLANE)


# -- legend and scale bar ----------------------------------------------------------------------------


def test_legend_shows_each_class_colour_with_counts(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "scene.tif", 512, 512)
    lay = render_preview(scene, dets([[10, 10, 50, 50], [60, 60, 90, 90], [100, 100, 140, 140]], [0, 1, 1]),
                         DOTA_CLASSES, tmp_path / "legend.png")
    img = Image.open(tmp_path / "legend.png").convert("RGB")
    assert lay.counts == {"plane": 1, "ship": 2}
    assert set(lay.swatches) == {"plane", "ship"}
    legend = lay.legend_box
    assert legend[1] >= lay.image_box[3]  # below the scene
    for name, colour in (("plane", PLANE), ("ship", SHIP)):
        sw = lay.swatches[name]
        assert colour_pixels(img, sw, colour) == (sw[2] - sw[0]) * (sw[3] - sw[1])
        assert colour_pixels(img, legend, colour) > 0
    # a class that is not present has no swatch
    assert colour_pixels(img, legend, COLOURS["storage-tank"]) == 0


def test_legend_without_detections(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "scene.tif", 256, 256)
    lay = render_preview(scene, dets([], []), DOTA_CLASSES, tmp_path / "none.png")
    assert lay.counts == {} and lay.swatches == {}
    img = Image.open(tmp_path / "none.png").convert("RGB")
    assert colour_pixels(img, lay.image_box, PLANE) == 0


def test_scale_bar_when_projected(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "utm.tif", 512, 512, pixel=0.5)  # 256 m across
    lay = render_preview(scene, dets([], []), DOTA_CLASSES, tmp_path / "utm.png")
    assert lay.scale_bar is not None and lay.scale_bar_label == "50 m"
    img = Image.open(tmp_path / "utm.png").convert("RGB")
    bx0, by0, bx1, by1 = lay.scale_bar
    assert (bx1 - 1 - bx0) * 0.5 == pytest.approx(50.0, abs=0.5)  # 100 px at 0.5 m per preview pixel
    assert by0 >= lay.image_box[3]
    assert colour_pixels(img, lay.scale_bar, SCALE_BAR) > (bx1 - bx0)


@pytest.mark.parametrize("crs", ["EPSG:4326", None])
def test_no_scale_bar_without_a_projected_crs(tmp_path: Path, crs: str | None) -> None:
    ref = render_preview(write_scene(tmp_path / "utm.tif", 512, 512), dets([], []), DOTA_CLASSES, tmp_path / "utm.png")
    scene = write_scene(tmp_path / "geo.tif", 512, 512, crs=crs)
    lay = render_preview(scene, dets([], []), DOTA_CLASSES, tmp_path / "geo.png")
    assert lay.scale_bar is None and lay.scale_bar_label is None
    img = Image.open(tmp_path / "geo.png").convert("RGB")
    assert ref.scale_bar is not None and img.size == ref.size
    assert colour_pixels(img, ref.scale_bar, SCALE_BAR) == 0  # where a projected scene has its bar


def test_nice_lengths() -> None:
    assert [nice_length(v) for v in (1.0, 9.9, 10.0, 47.0, 199.0, 4999.0)] == [1.0, 5.0, 10.0, 20.0, 100.0, 2000.0]
    assert nice_length(0.0) == 0.0


# -- stretch, result API, atomic writing --------------------------------------------------------------


def test_preview_uses_the_runs_stretch(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "u16.tif", 256, 256, dtype="uint16", value=1500)
    out = tmp_path / "u16.png"
    lay = render_preview(scene, dets([], []), DOTA_CLASSES, out, scale=ScaleConfig(method="fixed", low=1000, high=2000))
    img = Image.open(out).convert("RGB")
    assert pixel(img, lay.image_box[0] + 10, lay.image_box[1] + 10) == (128, 128, 128)
    # the batch-friendly call takes the band plan and exact stretch from the run's metadata
    result = SceneResult(scene=scene, output=tmp_path / "u16.geojson", frame=gpd.GeoDataFrame(), detections=dets([[5, 5, 60, 60]], [1]),
                         stats=RunStats(), metadata={"classes": list(DOTA_CLASSES), "bands": [1], "band_combine": "direct",
                                                     "scale": {"method": "percentile", "low": 1400.0, "high": 1600.0}})
    lay2 = render_result_preview(result)
    assert lay2.path == tmp_path / "u16.preview.png" == default_preview_path(tmp_path / "u16.geojson")
    img2 = Image.open(lay2.path).convert("RGB")
    assert pixel(img2, lay2.image_box[0] + 128, lay2.image_box[1] + 128) == (128, 128, 128)
    z = lay2.zoom[0]  # 256 px scene shown x2
    assert z == 2.0 and near(img2, lay2.image_box[0] + 30 * z, lay2.image_box[1] + 5 * z, SHIP)


def test_writes_atomically_and_refuses_bad_paths(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "scene.tif", 128, 128)
    render_preview(scene, dets([], []), DOTA_CLASSES, tmp_path / "a.png")
    assert sorted(os.listdir(tmp_path)) == ["a.png", "scene.tif"]
    with pytest.raises(OutputError, match="does not exist"):
        render_preview(scene, dets([], []), DOTA_CLASSES, tmp_path / "missing" / "a.png")
    with pytest.raises(OutputError, match="unknown preview format"):
        render_preview(scene, dets([], []), DOTA_CLASSES, tmp_path / "a.tif")
    lay = render_preview(scene, dets([], []), DOTA_CLASSES, tmp_path / "a.jpg")
    assert Image.open(lay.path).format == "JPEG"


def test_tile_frame_detections_are_refused(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "scene.tif", 128, 128)
    d = dets([[1, 1, 5, 5]], [0])
    d.frame = "tile"
    with pytest.raises(ValueError, match="scene pixels"):
        render_preview(scene, d, DOTA_CLASSES, tmp_path / "a.png")


# -- the CLI -------------------------------------------------------------------------------------------

S = 64
BOX = (24.0, 24.0, 16.0, 12.0)  # cx, cy, w, h in tile pixels: one confident plane per tile


class OnePlane(torch.nn.Module):
    """A YOLOv8-shaped [B, 19, A] output with one 0.9 'plane' at a fixed place in every tile."""

    def __init__(self) -> None:
        super().__init__()
        anchors = sum((S // s) ** 2 for s in (8, 16, 32))
        out = torch.zeros(4 + len(DOTA_CLASSES), anchors)
        out[:4, 0] = torch.tensor(BOX)
        out[4, 0] = 0.9
        self.register_buffer("out", out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out[None].expand(x.shape[0], -1, -1) + x[:, :1, :1, :1].reshape(-1, 1, 1) * 0.0


@pytest.fixture(scope="module")
def one_plane_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_torch_module_onnx(OnePlane(), tmp_path_factory.mktemp("model") / "oneplane.onnx", S, 1, DOTA_CLASSES)


def run_detect(args: list[str]) -> object:
    from rs_detect.cli import cli

    return CliRunner().invoke(cli, ["detect", *args], catch_exceptions=False)


def test_detect_preview_default_path(tmp_path: Path, one_plane_onnx: Path) -> None:
    scene = write_scene(tmp_path / "scene.tif", 100, 100)
    out = tmp_path / "dets.gpkg"
    res = run_detect([str(scene), "--model", str(one_plane_onnx), "--tile-size", "64", "--overlap", "16",
                      "-o", str(out), "--preview"])
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    png = tmp_path / "dets.preview.png"
    assert png.is_file() and "preview -> " in res.output  # type: ignore[attr-defined]
    assert len(gpd.read_file(out, layer="detections")) == 4  # one plane in each of the 2 x 2 tiles
    img = Image.open(png).convert("RGB")
    # 100 px scene shown x5, one title bar above: the first tile's plane spans x 16..32, y 18..30
    title_h = next(y for y in range(img.height) if img.getpixel((img.width // 2, y)) != BACKGROUND)
    assert near(img, 24 * 5, title_h + 18 * 5, PLANE) and near(img, 16 * 5, title_h + 24 * 5, PLANE)
    assert img.getpixel((24 * 5, title_h + 24 * 5)) == (GREY, GREY, GREY)


def test_detect_preview_explicit_path_and_no_preview(tmp_path: Path, one_plane_onnx: Path) -> None:
    scene = write_scene(tmp_path / "scene.tif", 100, 100)
    common = [str(scene), "--model", str(one_plane_onnx), "--tile-size", "64", "--overlap", "16", "-q"]
    res = run_detect([*common, "-o", str(tmp_path / "a.geojson"), "--preview", str(tmp_path / "look.png")])
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    assert (tmp_path / "look.png").is_file() and not (tmp_path / "a.preview.png").exists()
    res = run_detect([*common, "-o", str(tmp_path / "b.geojson")])
    assert res.exit_code == 0 and not list(tmp_path.glob("b*.png"))  # type: ignore[attr-defined]
    # a preview that cannot be written is refused before the run
    res = run_detect([*common, "-o", str(tmp_path / "c.geojson"), "--preview", str(tmp_path / "nope" / "c.png")])
    assert res.exit_code == 1 and "does not exist" in res.output  # type: ignore[attr-defined]
    assert not (tmp_path / "c.geojson").exists()
