"""Remote scenes: /vsicurl/ paths and http URLs work for detect and batch, through a local HTTP server
with byte ranges on 127.0.0.1 (tests/range_server.py); an unreachable or missing scene is one line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import one_error_line, two_squares, write_tif
from range_server import RangeHandler, free_port, serve
from rs_detect.cli import cli
from rs_detect.io.location import RemoteScene, is_remote, scene_path

TILE = ["--tile-size", "64", "--overlap", "16"]


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def served(tmp_path: Path):
    folder = tmp_path / "www"
    (folder / "sub").mkdir(parents=True)
    write_tif(folder / "scene.tif", two_squares())
    write_tif(folder / "sub" / "other.tif", two_squares()[::-1].copy())
    with serve(folder) as url:
        yield url, folder


def test_scene_paths_keep_their_double_slash() -> None:
    for text in ("/vsicurl/http://127.0.0.1:8766/a/scene.tif", "http://h/x.tif", "s3://bucket/k/x.tif", "/vsis3/bucket/x.tif"):
        p = scene_path(text)
        assert isinstance(p, RemoteScene) and str(p) == text and p.name.endswith(".tif") and is_remote(p)
    assert scene_path("/vsicurl/http://127.0.0.1:8766/a/scene.tif").url_path == "/a/scene.tif"
    assert scene_path("s3://bucket/k/x.tif").url_path == "/bucket/k/x.tif"
    assert isinstance(scene_path("local/x.tif"), Path) and not is_remote("x.tif")


@pytest.mark.parametrize("form", ["vsicurl", "http"])
def test_detect_reads_a_remote_scene(served: tuple[str, Path], tiny_onnx: Path, tmp_path: Path, form: str) -> None:
    url, folder = served
    scene = f"/vsicurl/{url}/scene.tif" if form == "vsicurl" else f"{url}/scene.tif"
    local = tmp_path / "local.geojson"
    assert run(folder / "scene.tif", "--model", tiny_onnx, *TILE, "-o", local, "-q").exit_code == 0
    RangeHandler.requests.clear()
    out = tmp_path / f"{form}.geojson"
    res = run(scene, "--model", tiny_onnx, *TILE, "-o", out, "-q")
    assert res.exit_code == 0, res.output
    assert any("bytes=" in r for r in RangeHandler.requests)  # GDAL read it in ranges from the server
    remote_doc, local_doc = json.loads(out.read_text()), json.loads(local.read_text())
    assert len(remote_doc["features"]) == len(local_doc["features"]) >= 2
    assert [f["geometry"] for f in remote_doc["features"]] == [f["geometry"] for f in local_doc["features"]]


def test_unreachable_and_missing_scenes_are_one_line(served: tuple[str, Path], tiny_onnx: Path, tmp_path: Path) -> None:
    url, _ = served
    out = tmp_path / "o.geojson"
    t0 = time.perf_counter()
    one_error_line(run(f"{url}/missing.tif", "--model", tiny_onnx, *TILE, "-o", out), "missing.tif", "404", outputs=(out,))
    dead = f"http://127.0.0.1:{free_port()}/scene.tif"
    line = one_error_line(run(f"/vsicurl/{dead}", "--model", tiny_onnx, *TILE, "-o", out), dead, outputs=(out,))
    assert "no such file" not in line
    assert time.perf_counter() - t0 < 60  # connection refused answers at once; retries are bounded


def test_batch_mixes_remote_and_local_scenes(served: tuple[str, Path], tiny_onnx: Path, tmp_path: Path) -> None:
    url, folder = served
    out = tmp_path / "out"
    args = [f"{url}/scene.tif", f"/vsicurl/{url}/sub/other.tif", f"{url}/missing.tif", str(folder / "scene.tif"),
            "-o", str(out), "--model", str(tiny_onnx), *TILE, "-q"]
    res = CliRunner().invoke(cli, ["batch", *args])
    assert res.exit_code == 1, res.output  # the missing one failed, the others are done
    summary = json.loads((out / "_run_summary.json").read_text())
    status = {s["scene"]: s["status"] for s in summary["scenes"]}
    host = url.removeprefix("http://").replace(":", "_")
    assert status == {f"{host}/scene.tif": "done", f"{host}/sub/other.tif": "done", f"{host}/missing.tif": "failed", "scene.tif": "done"}
    assert (out / host / "scene.geojson").is_file() and (out / host / "sub" / "other.geojson").is_file()
    failed = [s for s in summary["scenes"] if s["status"] == "failed"][0]
    assert "404" in failed["error"] and "missing.tif" in failed["error"]
    again = CliRunner().invoke(cli, ["batch", *args])
    summary = json.loads((out / "_run_summary.json").read_text())
    assert again.exit_code == 1 and summary["counts"] == {"done": 0, "skipped": 3, "failed": 1}  # remote scenes resume too
