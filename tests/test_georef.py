"""Georeferencing: pixel corners through the affine match rasterio.transform.xy; WGS84 is lon/lat."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import rasterio.transform
import torch
from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS

from conftest import FakeEngine, Planted, paint, write_tif
from rs_detect.config import Config
from rs_detect.georef import apply_affine, detections_frame, pixel_corners, to_output_crs
from rs_detect.pipeline import ScenePipeline
from rs_detect.types import Detections

TRANSFORMS = {
    "north-up": Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4500000.0),
    "rotated": Affine(17.320508, 5.0, 100.0, 10.0, -8.660254, 1000.0),  # as rasterio's rotated.tif
    "south-up": Affine(0.5, 0.0, 10.0, 0.0, 0.5, -45.0),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_corners_round_trip_with_rasterio_xy(name: str) -> None:
    t = TRANSFORMS[name]
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(0, 5000, 50), rng.integers(0, 5000, 50)
    xs, ys = rasterio.transform.xy(t, rows, cols, offset="ul")
    got = apply_affine(t, np.stack([cols, rows], axis=-1).astype(np.float64))
    np.testing.assert_allclose(got[:, 0], xs, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[:, 1], ys, rtol=0, atol=1e-6)


def test_polygon_corners_follow_rotation() -> None:
    dets = Detections(torch.tensor([[10.0, 20.0, 30.0, 60.0]]), torch.tensor([0.9]), torch.tensor([1]), torch.tensor([0]))
    t = TRANSFORMS["rotated"]
    gdf = detections_frame(dets, ["plane", "ship"], t, CRS.from_epsg(32633), "s.tif")
    ring = np.asarray(gdf.geometry.iloc[0].exterior.coords)[:4]
    want = [t * (10, 20), t * (30, 20), t * (30, 60), t * (10, 60)]
    np.testing.assert_allclose(ring, want, atol=1e-6)
    assert gdf.class_name.iloc[0] == "ship"
    assert list(gdf[["px_x1", "px_y1", "px_x2", "px_y2"]].iloc[0]) == [10.0, 20.0, 30.0, 60.0]


def test_obb_corners_are_a_rotated_rectangle() -> None:
    dets = Detections(torch.tensor([[100.0, 100.0, 40.0, 10.0, 0.5]]), torch.tensor([0.9]), torch.tensor([0]), torch.tensor([0]), task="obb")
    c = pixel_corners(dets)[0]
    sides = np.linalg.norm(np.roll(c, -1, axis=0) - c, axis=1)
    np.testing.assert_allclose(sorted(sides), [10, 10, 40, 40], atol=1e-4)
    np.testing.assert_allclose(c.mean(axis=0), [100, 100], atol=1e-6)


def test_wgs84_output_is_lon_lat() -> None:
    t = TRANSFORMS["north-up"]
    dets = Detections(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([0.9]), torch.tensor([0]), torch.tensor([0]))
    gdf = to_output_crs(detections_frame(dets, ["plane"], t, CRS.from_epsg(32633), "s.tif"), "wgs84", "s.tif")
    x, y = np.asarray(gdf.geometry.iloc[0].exterior.coords)[0]
    lon, lat = Transformer.from_crs(32633, 4326, always_xy=True).transform(500000.0, 4500000.0)
    assert (x, y) == pytest.approx((lon, lat), abs=1e-9)
    assert 14 < x < 16 and 40 < y < 41  # UTM 33N central meridian is 15 E; 4500 km north is ~40.6 N


def test_native_keeps_scene_crs() -> None:
    t = TRANSFORMS["north-up"]
    dets = Detections(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([0.9]), torch.tensor([0]), torch.tensor([0]))
    gdf = to_output_crs(detections_frame(dets, ["plane"], t, CRS.from_epsg(32633), "s.tif"), "native", "s.tif")
    assert gdf.crs.to_epsg() == 32633
    assert gdf.total_bounds[0] == pytest.approx(500000.0)


def test_scene_without_crs_gives_pixel_coordinates_and_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    obj = Planted(code=1, cx=100, cy=60, w=20, h=10)
    scene = write_tif(tmp_path / "nocrs.tif", paint((300, 400), [obj]), crs=None, transform=Affine(2, 0, 1000, 0, -2, 5000))
    with caplog.at_level(logging.WARNING, logger="rs_detect"):
        result = ScenePipeline(FakeEngine(imgsz=256), Config(tile_size=256, overlap=64)).run(scene, tmp_path / "nocrs.geojson")
    assert any("no CRS" in r.getMessage() for r in caplog.records)
    doc = json.loads((tmp_path / "nocrs.geojson").read_text())
    assert "crs" not in doc  # no CRS claimed
    ring = doc["features"][0]["geometry"]["coordinates"][0]
    xs, ys = [p[0] for p in ring], [p[1] for p in ring]
    assert (min(xs), min(ys), max(xs), max(ys)) == (90, 55, 110, 65)  # pixels, not the transform's units
    assert result.metadata["coordinates"] == "pixel"
