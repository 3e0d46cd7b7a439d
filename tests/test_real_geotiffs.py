"""Every real GeoTIFF from rasterio's and rio-tiler's test suites: a correct result or a clear error.

The files live outside the project (../shared/testdata/geotiff); these tests skip cleanly without them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import SHARED_TESTDATA, export_tiny_onnx, one_error_line
from rs_detect.cli import cli
from rs_detect.io.writer import read_metadata

FILES = sorted(p for p in SHARED_TESTDATA.glob("*/*") if p.suffix in (".tif", ".msk")) if SHARED_TESTDATA.is_dir() else []
FAILS = {"corrupt.tif": "read failed"}  # opens, but a full read raises: the one file that must fail

pytestmark = pytest.mark.skipif(not FILES, reason=f"{SHARED_TESTDATA} is not present")


@pytest.fixture(scope="module")
def model256(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_onnx(tmp_path_factory.mktemp("m") / "tiny256.onnx", imgsz=256)


@pytest.mark.parametrize("src", FILES, ids=[f"{p.parent.name}/{p.name}" for p in FILES])
def test_real_geotiff(src: Path, model256: Path, tmp_path: Path) -> None:
    out = tmp_path / f"{src.name}.geojson"
    res = CliRunner().invoke(cli, [str(src), "--model", str(model256), "--overlap", "32", "-o", str(out), "-q"])
    assert "Traceback" not in res.output
    if src.name in FAILS:
        one_error_line(res, src.name, FAILS[src.name], outputs=(out,))
        return
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["type"] == "FeatureCollection"
    meta = read_metadata(out)
    assert meta["tiles"]["read"] + meta["tiles"]["skipped_nodata"] == meta["tiles"]["total"]
    if meta["coordinates"] == "pixel":
        assert "crs" not in doc and "no CRS" in res.stderr
    if src.name == "all-nodata.tif":
        assert meta["tiles"]["read"] == 0 and doc["features"] == []
    if src.name == "RGBA.uint16.tif":
        assert meta["band_combine"] == "luminance" and meta["bands"] == [3, 2, 1]  # found by colour interpretation
    if src.name == "cog_cmap.tif":
        assert meta["band_combine"] == "palette"
    if src.name == "cog_gcps.tif":
        assert meta["georeferencing"] == "gcps" and "GCP" in res.stderr
    if src.name == "cog_hirise_mars.tif":
        assert "WGS84" in res.stderr  # a Mars CRS cannot become lon/lat on Earth: kept, with a warning
