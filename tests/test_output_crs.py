"""Outputs name the CRS their coordinates are in: GeoJSON in a CRS without an EPSG code carries GDAL's
``crs`` member with the WKT, and a CRS that cannot become WGS84 (Mars) is kept and said to be kept.

The scenes are generated here: a UTM zone 18N written as a custom WKT without authority codes (the CRS
of rasterio's RGB2.byte.tif), and a Mars equirectangular CRS (the CRS of rio-tiler's HiRISE file).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyogrio
import pytest
from click.testing import CliRunner
from pyproj import CRS
from rasterio.crs import CRS as RioCRS
from rasterio.transform import from_origin

from conftest import two_squares, write_tif
from rs_detect.cli import cli
from rs_detect.io.writer import read_metadata

TILE = ["--tile-size", "64", "--overlap", "16"]

CUSTOM_UTM = (
    'PROJCS["UTM Zone 18, Northern Hemisphere",GEOGCS["Unknown datum based upon the WGS 84 ellipsoid",'
    'DATUM["Not_specified_based_on_WGS_84_spheroid",SPHEROID["WGS 84",6378137,298.257223563]],PRIMEM["Greenwich",0],'
    'UNIT["degree",0.0174532925199433]],PROJECTION["Transverse_Mercator"],PARAMETER["latitude_of_origin",0],'
    'PARAMETER["central_meridian",-75],PARAMETER["scale_factor",0.9996],PARAMETER["false_easting",500000],'
    'PARAMETER["false_northing",0],UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]'
)
MARS = (
    'PROJCS["Equirectangular MARS",GEOGCS["GCS_MARS",DATUM["D_MARS",SPHEROID["MARS_localRadius",3395582.0270805,0]],'
    'PRIMEM["Reference_Meridian",0],UNIT["degree",0.0174532925199433]],PROJECTION["Equirectangular"],'
    'PARAMETER["standard_parallel_1",-10],PARAMETER["central_meridian",180],PARAMETER["false_easting",0],'
    'PARAMETER["false_northing",0],UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]'
)


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def custom_utm(tmp_path: Path) -> Path:
    path = write_tif(tmp_path / "custom.tif", two_squares(), crs=RioCRS.from_wkt(CUSTOM_UTM), transform=from_origin(300000, 4200000, 30, 30))
    assert RioCRS.from_wkt(CUSTOM_UTM).to_epsg() is None  # no EPSG code: GDAL writes no crs member for it
    return path


def test_native_geojson_names_a_crs_without_epsg_code(custom_utm: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "native.geojson"
    res = run(custom_utm, "--model", tiny_onnx, *TILE, "--crs", "native", "-o", out, "-q")
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["crs"]["type"] == "name" and "Transverse_Mercator" in doc["crs"]["properties"]["name"]
    assert len(doc["features"]) >= 2
    x, y = doc["features"][0]["geometry"]["coordinates"][0][0]
    assert 300000 < x < 310000 and 4190000 < y < 4200000  # metres, as the crs member says
    read_back = CRS.from_user_input(pyogrio.read_info(out)["crs"])
    assert read_back.equals(CRS.from_wkt(CUSTOM_UTM)) and read_back.to_epsg() != 4326
    assert read_metadata(out)["coordinates"] == "native"


def test_native_geojson_with_an_epsg_code_gets_the_urn(tmp_path: Path, tiny_onnx: Path) -> None:
    scene = write_tif(tmp_path / "utm.tif", two_squares())
    out = tmp_path / "utm.geojson"
    assert run(scene, "--model", tiny_onnx, *TILE, "--crs", "native", "-o", out, "-q").exit_code == 0
    doc = json.loads(out.read_text())
    assert doc["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    assert CRS.from_user_input(pyogrio.read_info(out)["crs"]).to_epsg() == 32633


def test_wgs84_geojson_has_no_crs_member(custom_utm: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "wgs84.geojson"
    assert run(custom_utm, "--model", tiny_onnx, *TILE, "-o", out, "-q").exit_code == 0
    doc = json.loads(out.read_text())
    assert "crs" not in doc  # RFC 7946: WGS84 implied
    lon, lat = doc["features"][0]["geometry"]["coordinates"][0][0]
    assert -80 < lon < -70 and 30 < lat < 45
    assert read_metadata(out)["coordinates"] == "wgs84"


@pytest.mark.parametrize("fmt", ["geojson", "gpkg", "parquet"])
def test_a_mars_crs_is_kept_and_the_metadata_says_so(tmp_path: Path, tiny_onnx: Path, fmt: str) -> None:
    scene = write_tif(tmp_path / "mars.tif", two_squares(), crs=RioCRS.from_wkt(MARS), transform=from_origin(-100000, 200000, 5, 5))
    out = tmp_path / f"mars.{fmt}"
    res = run(scene, "--model", tiny_onnx, *TILE, "-o", out, "-q")  # the default: --crs wgs84
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    warn = [ln for ln in res.stderr.splitlines() if "WGS84" in ln]
    assert len(warn) == 1 and warn[0].startswith("warning:") and "mars.tif" in warn[0]
    meta = read_metadata(out)
    assert meta["coordinates"] == "native" and "MARS" in meta["output_crs"].upper()
    if fmt == "parquet":
        import geopandas as gpd

        crs = gpd.read_parquet(out).crs
    else:
        crs = CRS.from_user_input(pyogrio.read_info(out, layer="detections")["crs"])
    assert "MARS" in crs.to_wkt().upper() and not crs.equals(CRS.from_epsg(4326))
