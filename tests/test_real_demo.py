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


@pytest.mark.skipif(not (mrd.DATASETS / mrd.AIRPORT / "test").is_dir(), reason="the aerial airport dataset is beside the workplace checkout only")
def test_demo_scene_is_what_the_tool_builds_from_the_test_split(tmp_path: Path) -> None:
    tif, truth, n = mrd.build(tmp_path)
    with rasterio.open(tif) as a, rasterio.open(DEMO) as b:
        assert np.array_equal(a.read(), b.read())
    assert n == len(gpd.read_file(TRUTH))
    ours = gpd.read_file(truth)
    shipped = gpd.read_file(TRUTH)
    assert np.allclose(ours[["px_x1", "px_y1", "px_x2", "px_y2"]], shipped[["px_x1", "px_y1", "px_x2", "px_y2"]])


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
