"""The detect command through click's runner: defaults, options, and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from conftest import export_tiny_onnx, one_error_line, write_tif
from rs_detect.cli import cli
from rs_detect.io.writer import read_metadata

TILE = ["--tile-size", "64", "--overlap", "16"]


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def bright_squares(h: int = 150, w: int = 200) -> np.ndarray:
    img = np.full((h, w), 20, dtype=np.uint8)
    img[10:42, 20:52] = 250  # a 32 px bright square: the tiny model calls it a plane
    img[90:122, 140:172] = 250
    return img


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    return write_tif(tmp_path / "scene.tif", bright_squares())


def test_default_command_writes_geojson_beside_the_scene(scene: Path, tiny_onnx: Path) -> None:
    res = run(scene, "--model", tiny_onnx, *TILE)
    assert res.exit_code == 0, res.output
    out = scene.with_name("scene.detections.geojson")
    # the style QGIS loads for scene.detections.geojson (not for scene.tif, whose style would be scene.qml)
    assert out.with_suffix(".qml").is_file() and not scene.with_suffix(".qml").exists()
    doc = json.loads(out.read_text())
    assert doc["type"] == "FeatureCollection" and "crs" not in doc  # RFC 7946: WGS84 implied
    assert len(doc["features"]) >= 2
    props = doc["features"][0]["properties"]
    assert set(props) >= {"class_id", "class_name", "score", "px_x1", "px_y1", "px_x2", "px_y2", "scene"}
    assert props["class_name"] == "plane"
    lon, lat = doc["features"][0]["geometry"]["coordinates"][0][0]
    assert 14 < lon < 16 and 40 < lat < 41
    assert "tiles read" in res.stdout and "plane" in res.stdout  # the summary line
    assert read_metadata(out)["scale"]["method"] == "divide"


def test_detect_subcommand_gpkg_and_parquet(scene: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    import geopandas as gpd

    for name in ("a.gpkg", "a.parquet"):
        res = run("detect", scene, "--model", tiny_onnx, *TILE, "-o", tmp_path / name, "--crs", "native", "-q")
        assert res.exit_code == 0, res.output
        assert res.stdout == ""  # --quiet
        gdf = gpd.read_parquet(tmp_path / name) if name.endswith("parquet") else gpd.read_file(tmp_path / name, layer="detections")
        assert gdf.crs.to_epsg() == 32633 and len(gdf) >= 2
        assert read_metadata(tmp_path / name)["model_sha256"]


def test_uint16_scene_uses_a_scene_wide_percentile_stretch(tmp_path: Path, tiny_onnx: Path) -> None:
    img = bright_squares().astype(np.uint16) * 9 + 300  # a 12-bit-like range
    scene = write_tif(tmp_path / "u16.tif", img)
    out = tmp_path / "u16.geojson"
    res = run(scene, "--model", tiny_onnx, *TILE, "-o", out)
    assert res.exit_code == 0, res.output
    scale = read_metadata(out)["scale"]
    assert scale["method"] == "percentile" and scale["low"] >= 300 and scale["high"] <= 250 * 9 + 300
    assert len(json.loads(out.read_text())["features"]) >= 2


def test_classes_filter_and_config_file(scene: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "ships.geojson"
    res = run(scene, "--model", tiny_onnx, *TILE, "--classes", "ship", "-o", out)
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["features"] == []  # the tiny model only finds planes
    cfg = tmp_path / "c.yaml"
    cfg.write_text("conf: 0.999999\ntile_size: 64\noverlap: 16\n")
    res = run(scene, "--model", tiny_onnx, "--config", cfg, "-o", out)
    assert res.exit_code == 0, res.output
    assert read_metadata(out)["conf"] == 0.999999
    res = run(scene, "--model", tiny_onnx, "--config", cfg, "--conf", "0.3", "-o", out)
    assert read_metadata(out)["conf"] == 0.3  # a flag beats the file


def test_help_and_usage_errors() -> None:
    res = run("--help")
    assert res.exit_code == 0 and "detect" in res.output
    res = run("detect", "--help")
    assert res.exit_code == 0 and "--overlap" in res.output
    assert run("scene.tif", "--no-such-flag").exit_code == 2
    assert run("scene.tif", "--overlap", "-3").exit_code == 2


# -- bad input: one line, exit 1, no output file -----------------------------------------------------


def test_missing_scene(tmp_path: Path, tiny_onnx: Path) -> None:
    one_error_line(run(tmp_path / "nope.tif", "--model", tiny_onnx), "nope.tif", "no such file", outputs=(tmp_path / "nope.detections.geojson",))


def test_not_a_raster(tmp_path: Path, tiny_onnx: Path) -> None:
    bad = tmp_path / "notes.tif"
    bad.write_text("this is not a raster\n")
    one_error_line(run(bad, "--model", tiny_onnx, *TILE), "notes.tif", "not a readable raster", outputs=(tmp_path / "notes.detections.geojson",))


def test_truncated_tiff(tmp_path: Path, tiny_onnx: Path) -> None:
    rng = np.random.default_rng(0)
    good = write_tif(tmp_path / "trunc.tif", rng.integers(0, 255, (600, 600), dtype=np.uint8))
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    one_error_line(run(good, "--model", tiny_onnx, *TILE), "trunc.tif", outputs=(tmp_path / "trunc.detections.geojson",))


def test_band_out_of_range(scene: Path, tiny_onnx: Path) -> None:
    one_error_line(run(scene, "--model", tiny_onnx, *TILE, "--bands", "3"), "scene.tif", "band 3 out of range", outputs=(scene.with_name("scene.detections.geojson"),))


def test_model_missing_or_not_a_model(scene: Path, tmp_path: Path) -> None:
    one_error_line(run(scene, "--model", tmp_path / "missing.onnx"), "missing.onnx", "not found")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage" * 10)
    one_error_line(run(scene, "--model", junk), "junk.onnx", "not a loadable ONNX model", outputs=(scene.with_name("scene.detections.geojson"),))
    one_error_line(run(scene, "--model", tmp_path / "m.xyz"), "unknown model format")


def test_channel_mismatch(tmp_path: Path, tiny_onnx: Path) -> None:
    rgb = write_tif(tmp_path / "rgb.tif", np.zeros((3, 100, 100), dtype=np.uint8))
    one_error_line(run(rgb, "--model", tiny_onnx, *TILE, "--bands", "1,2"), "--bands gives 2 band(s) but the model takes 1 channel(s)")
    three = export_tiny_onnx(tmp_path / "three.onnx", imgsz=64, channels=3)
    gray = write_tif(tmp_path / "gray2.tif", np.zeros((2, 100, 100), dtype=np.uint8))
    one_error_line(run(gray, "--model", three, *TILE, "--bands", "1,2"), "the model takes 3 channel(s)")
    # a model YAML that contradicts the model's input is refused
    (tmp_path / "tiny3.yaml").write_text("channels: 3\n")
    tiny3 = tmp_path / "tiny3.onnx"
    tiny3.write_bytes(tiny_onnx.read_bytes())
    one_error_line(run(gray, "--model", tiny3, *TILE), "1 channel(s) but its metadata/YAML says 3")


def test_unwritable_output(scene: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    one_error_line(run(scene, "--model", tiny_onnx, *TILE, "-o", tmp_path / "no" / "dir" / "o.geojson"), "does not exist")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_error_line(run(scene, "--model", tiny_onnx, *TILE, "-o", blocker / "o.geojson"), "o.geojson")
    one_error_line(run(scene, "--model", tiny_onnx, *TILE, "-o", tmp_path / "o.shp"), "unknown output format")


def test_unknown_config_key(scene: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("overlap: 16\nconfidence: 0.3\n")
    one_error_line(run(scene, "--model", tiny_onnx, "--config", cfg), "bad.yaml", "unknown config key 'confidence'", outputs=(scene.with_name("scene.detections.geojson"),))
    cfg.write_text("scale: {method: fixed, lo: 1}\n")
    one_error_line(run(scene, "--model", tiny_onnx, "--config", cfg), "scale.lo")


def test_exclusive_classes_config(scene: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    from rs_detect.config import load_config

    cfg = tmp_path / "ex.yaml"
    cfg.write_text("tile_size: 64\noverlap: 16\nexclusive_ios: 1.5\n")
    one_error_line(run(scene, "--model", tiny_onnx, "--config", cfg), "exclusive_ios must be in [0, 1], got 1.5",
                   outputs=(scene.with_name("scene.detections.geojson"),))
    # exclusive_classes applies among the classes the model has: a name it lacks is no error
    cfg.write_text("tile_size: 64\noverlap: 16\nexclusive_classes: [plane, boat]\n")
    res = run(scene, "--model", tiny_onnx, "--config", cfg, "-o", tmp_path / "boat.geojson")
    assert res.exit_code == 0, res.output
    assert read_metadata(tmp_path / "boat.geojson")["exclusive_classes"] == ["plane", "boat"]
    out = tmp_path / "ex.geojson"
    cfg.write_text("tile_size: 64\noverlap: 16\nexclusive_classes: []\n")
    res = run(scene, "--model", tiny_onnx, "--config", cfg, "-o", out)
    assert res.exit_code == 0, res.output
    assert read_metadata(out)["exclusive_classes"] == []  # disabled
    assert len(json.loads(out.read_text())["features"]) >= 2
    # a comma-separated string is a list, as for classes; the default is plane and ship
    cfg.write_text("exclusive_classes: 'ship, harbor'\nexclusive_ios: 0.8\n")
    loaded = load_config(cfg)
    assert loaded.exclusive_classes == ("ship", "harbor") and loaded.exclusive_ios == 0.8
    assert load_config().exclusive_classes == ("plane", "ship") and load_config().exclusive_ios == 0.7


def test_model_yaml_per_class_thresholds(scene: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    """A model's own conf_by_class applies by default; --conf replaces it; the user's per-class win."""
    import shutil

    model = tmp_path / "m.onnx"
    shutil.copyfile(tiny_onnx, model)
    (tmp_path / "m.yaml").write_text("conf: 0.3\nconf_by_class: {plane: 0.999999}\n")
    out = tmp_path / "o.geojson"
    res = run(scene, "--model", model, *TILE, "-o", out)
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["features"] == []  # the tiny model finds planes only, none that sure
    assert read_metadata(out)["conf_by_class"] == {"plane": 0.999999} and read_metadata(out)["conf"] == 0.3
    res = run(scene, "--model", model, *TILE, "--conf", "0.3", "-o", out)
    assert len(json.loads(out.read_text())["features"]) >= 2 and read_metadata(out)["conf_by_class"] == {}
    cfg = tmp_path / "c.yaml"
    cfg.write_text("conf_by_class: {plane: 0.3}\n")
    res = run(scene, "--model", model, *TILE, "--config", cfg, "-o", out)
    assert len(json.loads(out.read_text())["features"]) >= 2 and read_metadata(out)["conf_by_class"] == {"plane": 0.3}
    (tmp_path / "m.yaml").write_text("conf_by_class: {plane: 2}\n")
    out.unlink()
    one_error_line(run(scene, "--model", model, *TILE, "-o", out), "m.onnx", "conf_by_class[plane] must be in [0, 1]", outputs=(out,))
