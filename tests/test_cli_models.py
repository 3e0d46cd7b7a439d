"""The seed's workflow through the CLI: export -> inspect -> build-engine -> detect with the engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fake_tensorrt as ft
import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result
from fake_tensorrt import mini_onnx

from conftest import export_tiny_onnx, one_error_line, write_tif
from rs_detect.cli import cli


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


# -- inspect --------------------------------------------------------------------------------------------


def test_inspect_three_verdicts_three_answers(batch_models: dict[str, Path]) -> None:
    dyn = run("inspect", batch_models["dynamic"])
    assert dyn.exit_code == 0, dyn.output
    assert "verdict  dynamic batch: usable with any batch size" in dyn.stdout
    static = run("inspect", batch_models["static"])
    assert static.exit_code == 1 and "verdict  static batch 1: the model runs only with batch 1" in static.stdout
    edited = run("inspect", batch_models["edited"])
    assert edited.exit_code == 1
    assert "static batch 1: the input/output dims say 'batch'" in edited.stdout
    assert "baked    /Reshape_6 (Reshape to constant shape [1, 4, 4, 84])" in edited.stdout
    assert "batch 3 fails" in edited.stdout and "dynamic_axes" in edited.stdout


def test_inspect_json(batch_models: dict[str, Path]) -> None:
    res = run("inspect", batch_models["edited"], "--json")
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert doc["usable_for_dynamic_batching"] is False and doc["batch"]["fixed_batch"] == 1
    assert doc["inputs"][0]["shape"] == ["batch", 1, 64, 64]
    ok = json.loads(run("inspect", batch_models["dynamic"], "--json").stdout)
    assert ok["usable_for_dynamic_batching"] is True and ok["model"]["imgsz"] == 64


def test_inspect_errors_are_one_line(tmp_path: Path) -> None:
    one_error_line(run("inspect", tmp_path / "nope.onnx"), "nope.onnx", "not found")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    one_error_line(run("inspect", bad), "bad.onnx")


def test_inspect_engines(fake_trt: ft.FakeState, batch_models: dict[str, Path], tmp_path: Path) -> None:
    assert run("build-engine", batch_models["dynamic"], "-o", tmp_path / "m.engine", "--max-batch", "16").exit_code == 0
    res = run("inspect", tmp_path / "m.engine")
    assert res.exit_code == 0, res.output
    assert "dynamic batch: the optimization profile allows batch 1 to 16 (opt 8)" in res.stdout
    assert "metadata from the Ultralytics-style header" in res.stdout
    static = tmp_path / "s.plan"
    static.write_bytes(ft.plan_for_onnx(mini_onnx(tmp_path / "s4.onnx", dynamic=False, batch=4), None))
    res = run("inspect", static, "--json")
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert doc["batch"]["fixed_batch"] == 4 and doc["model"]["nc"] == 15
    assert doc["inputs"][0] == {"name": "images", "shape": [4, 1, 64, 64], "dtype": "float32"}


# -- build-engine ----------------------------------------------------------------------------------------


def test_build_engine_prints_what_it_built(fake_trt: ft.FakeState, batch_models: dict[str, Path], tmp_path: Path) -> None:
    res = run("build-engine", batch_models["dynamic"], "--min-batch", "1", "--opt-batch", "8", "--max-batch", "32",
              "--fp16", "--workspace", "2", "-o", tmp_path / "m.engine")
    assert res.exit_code == 0, res.output
    assert "batch 1/8/32 (min/opt/max), fp16, metadata in the engine header" in res.stdout
    assert "--minShapes=images:1x1x64x64 --optShapes=images:8x1x64x64 --maxShapes=images:32x1x64x64 --fp16" in res.stdout
    assert fake_trt.builds[0]["pool_limits"][ft.MemoryPoolType.WORKSPACE] == 2 << 30
    assert (tmp_path / "m.engine").is_file()


def test_build_engine_refuses_static_and_edited(fake_trt: ft.FakeState, batch_models: dict[str, Path], tmp_path: Path) -> None:
    for kind in ("static", "edited"):
        res = run("build-engine", batch_models[kind], "-o", tmp_path / f"{kind}.engine")
        one_error_line(res, "static batch 1", "dynamic_axes")
        assert not (tmp_path / f"{kind}.engine").exists()
    assert fake_trt.builds == []


def test_build_engine_without_tensorrt(monkeypatch: pytest.MonkeyPatch, batch_models: dict[str, Path], tmp_path: Path) -> None:
    ft.install(monkeypatch, tensorrt=False)
    one_error_line(run("build-engine", batch_models["dynamic"]), "pip install tensorrt")


def test_build_engine_plan_with_sidecar(fake_trt: ft.FakeState, batch_models: dict[str, Path], tmp_path: Path) -> None:
    res = run("build-engine", batch_models["dynamic"], "-o", tmp_path / "m.plan")
    assert res.exit_code == 0 and "metadata in m.plan.json" in res.stdout


# -- the whole workflow: ONNX -> engine -> detections, same as ONNX Runtime -------------------------------


def test_detect_with_the_engine_matches_onnxruntime(fake_trt: ft.FakeState, tmp_path: Path) -> None:
    model = export_tiny_onnx(tmp_path / "tiny.onnx", imgsz=64)
    assert run("inspect", model).exit_code == 0
    assert run("build-engine", model, "--max-batch", "4", "--opt-batch", "2", "-o", tmp_path / "tiny.engine").exit_code == 0
    img = np.full((150, 200), 20, dtype=np.uint8)
    img[10:42, 20:52] = 250
    img[90:122, 140:172] = 250
    scene = write_tif(tmp_path / "scene.tif", img)
    tile = ["--tile-size", "64", "--overlap", "16", "-q"]
    a = run(scene, "--model", model, "-o", tmp_path / "onnx.geojson", *tile)
    b = run(scene, "--model", tmp_path / "tiny.engine", "-o", tmp_path / "trt.geojson", *tile)
    assert a.exit_code == 0 and b.exit_code == 0, b.output
    fa = json.loads((tmp_path / "onnx.geojson").read_text())["features"]
    fb = json.loads((tmp_path / "trt.geojson").read_text())["features"]
    assert len(fa) >= 2 and len(fa) == len(fb)
    key = lambda f: (f["properties"]["px_x1"], f["properties"]["px_y1"])  # noqa: E731
    for x, y in zip(sorted(fa, key=key), sorted(fb, key=key), strict=True):
        assert x["properties"]["class_name"] == y["properties"]["class_name"]
        assert x["properties"]["score"] == pytest.approx(y["properties"]["score"], abs=1e-5)
        np.testing.assert_allclose(x["geometry"]["coordinates"], y["geometry"]["coordinates"], atol=1e-9)
    executed = {dict(s[1])["images"][0] for s in fake_trt.args("execute_async_v3")}
    assert executed <= {1, 2, 3, 4} and fake_trt.count("mem_alloc") == 2


# -- export ---------------------------------------------------------------------------------------------------


def test_export_without_ultralytics(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ultralytics", None)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    one_error_line(run("export", weights), "pip install 'rs-detect[export]'")
    one_error_line(run("export", tmp_path / "missing.pt"), "missing.pt", "not found")


@pytest.fixture(scope="module")
def yolo_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 1-channel, 15-class YOLOv8n checkpoint saved the Ultralytics way."""
    import torch
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("yolo") / "y8n.pt"
    model = YOLO("yolov8n.yaml", task="detect")
    net = DetectionModel("yolov8n.yaml", ch=1, nc=15, verbose=False)
    net.names = dict(enumerate(ft.NAMES))
    net.args = {"imgsz": 64, "data": ""}
    net.task = "detect"
    model.model = net
    model.save(str(path))
    return path


@pytest.mark.slow
def test_export_ultralytics_onnx_and_torchscript_are_dynamic(yolo_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("YOLO_AUTOINSTALL", "False")
    monkeypatch.chdir(tmp_path)
    res = run("export", yolo_weights, "--imgsz", "64", "-o", tmp_path / "out" / "y.onnx")
    assert res.exit_code == 0, res.output + res.stderr
    assert "dynamic batch" in res.stdout and "next: rs-detect build-engine" in res.stdout
    model = onnx.load(str(tmp_path / "out" / "y.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["task"] == "detect" and meta["imgsz"] == "[64, 64]" and "'plane'" in meta["names"] and meta["channels"] == "1"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert run("inspect", tmp_path / "out" / "y.onnx").exit_code == 0
    res = run("export", yolo_weights, "--imgsz", "64", "--format", "torchscript", "-o", tmp_path / "y.torchscript")
    assert res.exit_code == 0, res.output + res.stderr
    assert run("inspect", tmp_path / "y.torchscript").exit_code == 0
