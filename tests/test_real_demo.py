"""sample_data/airport_demo.tif, the README's first command: a real scene the bundled model runs on.

Sixteen held-out aerial airport images (tools/make_real_demo.py) with their labelled planes. The
labels leave out many small parked planes (sample_data/MODEL_CARD.md), so the precision floor below is
lower than the recall floor; both guard against a model or pipeline change that loses the real planes.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from rs_detect.cli import cli
from rs_detect.config import REPO_ROOT
from rs_detect.evaluate import duplicate_pairs, evaluate

DEMO = REPO_ROOT / "sample_data" / "airport_demo.tif"
TRUTH = REPO_ROOT / "sample_data" / "airport_demo.truth.geojson"

spec = importlib.util.spec_from_file_location("make_real_demo", REPO_ROOT / "tools" / "make_real_demo.py")
mrd = importlib.util.module_from_spec(spec)
sys.modules["make_real_demo"] = mrd
spec.loader.exec_module(mrd)  # type: ignore[union-attr]


def test_demo_scene_is_georeferenced_and_its_truth_lies_inside() -> None:
    with rasterio.open(DEMO) as ds:
        assert (ds.width, ds.height, ds.count, ds.dtypes[0]) == (2400, 2400, 3, "uint8")
        assert ds.crs.to_epsg() == 32633 and ds.res == (0.5, 0.5)
        bounds = ds.bounds
        images = ds.tags()["IMAGES"].split(",")
    truth = gpd.read_file(TRUTH)
    assert len(images) == 16 and set(truth["source"]) <= set(images)
    assert set(truth["class_name"]) == {"plane"} and len(truth) > 200
    x0, y0, x1, y1 = truth.total_bounds
    assert bounds.left <= x0 and x1 <= bounds.right and bounds.bottom <= y0 and y1 <= bounds.top
    # pixel boxes and map polygons say the same thing
    cx = bounds.left + 0.5 * (truth["px_x1"] + truth["px_x2"]) * 0.5
    assert np.allclose(cx, truth.geometry.centroid.x)


def test_demo_scene_tool_lays_the_first_16_test_images_4_by_4_with_their_planes(tmp_path: Path, monkeypatch) -> None:
    """tools/make_real_demo.py on a stand-in of the dataset's test split: 17 source images (one of them
    in two augmented copies), a coloured plane in each; the first 16 sources by name are laid 4 x 4."""
    from PIL import Image

    split = tmp_path / "data" / mrd.AIRPORT / "test"
    (split / "images").mkdir(parents=True)
    (split / "labelTxt").mkdir()
    rng = np.random.default_rng(3)
    placed = {}
    for k in range(18):
        source = f"airport_{k if k < 17 else 5:02d}"  # the 18th is a second copy of source 05: not used
        rgb = np.full((600, 600, 3), 30, dtype=np.uint8)
        x, y = int(rng.integers(0, 540)), int(rng.integers(0, 540))
        rgb[y : y + 40, x : x + 50] = (240, 120, 20)
        name = f"{source}_jpg.rf.{k:032x}"
        Image.fromarray(rgb).save(split / "images" / f"{name}.jpg", quality=98)
        (split / "labelTxt" / f"{name}.txt").write_text(f"{x} {y} {x + 50} {y} {x + 50} {y + 40} {x} {y + 40} airplane 0\n")
        placed.setdefault(source, (x, y))
    # the module airport_sources was defined in (another test may load a second copy under the same name)
    monkeypatch.setitem(mrd.airport_sources.__globals__, "DATASETS", tmp_path / "data")
    tif, truth_path, n = mrd.build(tmp_path / "out")
    truth = gpd.read_file(truth_path)
    sources = sorted(placed)[:16]
    assert n == len(truth) == 16 and list(truth["source"]) == sources  # airport_16 is left out
    with rasterio.open(tif) as ds:
        assert (ds.width, ds.height, ds.count) == (2400, 2400, 3) and ds.crs.to_epsg() == 32633
        assert ds.tags()["IMAGES"].split(",") == sources
        img = ds.read()
        transform = ds.transform
    for k, row in enumerate(truth.itertuples()):
        x, y = placed[row.source]
        ox, oy = (k % 4) * 600, (k // 4) * 600
        assert (row.px_x1, row.px_y1, row.px_x2, row.px_y2) == (x + ox, y + oy, x + ox + 50, y + oy + 40)
        patch = img[:, y + oy + 10 : y + oy + 30, x + ox + 10 : x + ox + 40].reshape(3, -1).mean(axis=1)
        assert np.allclose(patch, (240, 120, 20), atol=12)  # the plane's pixels are where its box says (JPEG in TIFF)
        assert row.geometry.bounds == pytest.approx((*(transform * (row.px_x1, row.px_y2)), *(transform * (row.px_x2, row.px_y1))))


@pytest.mark.slow
def test_bundled_model_finds_the_real_planes_of_the_demo(tmp_path: Path) -> None:
    out = tmp_path / "demo.geojson"
    res = CliRunner().invoke(cli, [str(DEMO), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "plane" in res.output and "detections" in res.output
    pred, truth = gpd.read_file(out), gpd.read_file(TRUTH).to_crs("EPSG:4326")
    assert (pred["class_name"] == "ship").sum() <= 2  # an airport: no ships to speak of
    assert duplicate_pairs(pred) == 0
    (s,) = evaluate(pred, truth, 0.5, "box", ["plane"])
    assert s.recall >= 0.70, s
    assert s.precision >= 0.60, s
