"""build_engine: the TensorRT builder calls (fake API), the metadata it writes, and what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import fake_tensorrt as ft
import numpy as np
import onnx
import pytest
from fake_tensorrt import MiniYolo, legacy_onnx_export

from rs_detect.engines.tensorrt import TensorRTEngine, build_engine
from rs_detect.engines.tensorrt_plan import read_engine_file, sidecar_path, split_header
from rs_detect.errors import ConfigError, EngineUnavailableError, ModelError


def test_profile_flags_and_workspace(fake_trt: ft.FakeState, batch_models: dict[str, Path], tmp_path: Path) -> None:
    result = build_engine(batch_models["dynamic"], tmp_path / "m.engine", 2, 6, 16, fp16=True, workspace_gb=1.5)
    (build,) = fake_trt.builds
    assert build["ok"]
    assert build["profiles"] == [{"images": ((2, 1, 64, 64), (6, 1, 64, 64), (16, 1, 64, 64))}]
    assert build["flags"] == {ft.BuilderFlag.FP16}
    assert build["pool_limits"] == {ft.MemoryPoolType.WORKSPACE: int(1.5 * (1 << 30))}
    assert build["network_flags"] == 0  # explicit batch is the default (and only) mode in TensorRT 10
    assert fake_trt.parsed[0]["path"] == str(batch_models["dynamic"])
    assert result.shapes == ((2, 1, 64, 64), (6, 1, 64, 64), (16, 1, 64, 64))
    assert result.trtexec_line(batch_models["dynamic"]).endswith(
        "--minShapes=images:2x1x64x64 --optShapes=images:6x1x64x64 --maxShapes=images:16x1x64x64 --fp16 "
        f"--saveEngine={tmp_path / 'm.plan'}")


def test_defaults_are_fp32_without_a_workspace_limit(fake_trt: ft.FakeState, batch_models: dict[str, Path], tmp_path: Path) -> None:
    build_engine(batch_models["dynamic"], tmp_path / "m.engine")
    (build,) = fake_trt.builds
    assert build["flags"] == set() and build["pool_limits"] == {}
    assert build["profiles"][0]["images"][1][0] == 8 and build["profiles"][0]["images"][2][0] == 32


def test_tensorrt_8_gets_the_explicit_batch_flag(monkeypatch: pytest.MonkeyPatch, batch_models: dict[str, Path], tmp_path: Path) -> None:
    rec = ft.install(monkeypatch, version="8.6.1")
    build_engine(batch_models["dynamic"], tmp_path / "m.engine")
    assert rec.builds[0]["network_flags"] == 1 << int(ft.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def test_engine_header_carries_the_metadata(fake_trt: ft.FakeState, batch_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.engine"
    result = build_engine(batch_models["dynamic"], out, 1, 4, 8, fp16=True)
    assert result.sidecar is None and not sidecar_path(out).exists()
    offset, meta = split_header(out.read_bytes())
    assert offset > 4 and out.read_bytes()[offset:].startswith(ft.PLAN_MAGIC)
    assert meta["batch_profile"] == {"min": 1, "opt": 4, "max": 8} and meta["batch"] == 8
    assert meta["names"]["0"] == "plane" and meta["imgsz"] == [64, 64] and meta["channels"] == 1 and meta["task"] == "detect"
    assert meta["fp16"] is True
    engine = TensorRTEngine(out)  # and the backend reads it back
    assert (engine.meta.min_batch, engine.meta.opt_batch, engine.meta.max_batch) == (1, 4, 8)


def test_plan_output_is_plain_with_a_sidecar(fake_trt: ft.FakeState, batch_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.plan"
    result = build_engine(batch_models["dynamic"], out)
    assert out.read_bytes().startswith(ft.PLAN_MAGIC)  # trtexec --loadEngine can read it as is
    assert result.sidecar == tmp_path / "m.plan.json"
    assert json.loads(result.sidecar.read_text())["task"] == "detect"
    f = read_engine_file(out)
    assert not f.header and f.sidecar == result.sidecar and f.metadata["batch_profile"]["max"] == 32
    x = np.random.default_rng(0).random((3, 1, 64, 64), dtype=np.float32)
    assert tuple(TensorRTEngine(out).infer(x).shape) == (3, 19, 84)


def test_rebuilding_an_engine_drops_a_stale_sidecar(fake_trt: ft.FakeState, batch_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.engine"
    sidecar_path(out).write_text(json.dumps({"names": ["stale"]}))
    build_engine(batch_models["dynamic"], out)
    assert not sidecar_path(out).exists()
    assert list(tmp_path.glob(".*tmp*")) == []  # no temporary files left behind


@pytest.mark.parametrize("kind", ["static", "edited"])
def test_static_onnx_is_refused_before_building(fake_trt: ft.FakeState, batch_models: dict[str, Path], tmp_path: Path, kind: str) -> None:
    with pytest.raises(ModelError, match="static batch 1") as err:
        build_engine(batch_models[kind], tmp_path / "m.engine")
    text = str(err.value)
    assert "dynamic_axes" in text and "/Reshape" in text and "\n" not in text
    assert fake_trt.builds == [] and not (tmp_path / "m.engine").exists()


def test_bad_bounds_and_missing_tensorrt(monkeypatch: pytest.MonkeyPatch, batch_models: dict[str, Path], tmp_path: Path) -> None:
    ft.install(monkeypatch)
    with pytest.raises(ConfigError, match="1 <= min <= opt <= max, got 4/2/8"):  # an option, not the model
        build_engine(batch_models["dynamic"], tmp_path / "m.engine", 4, 2, 8)
    ft.install(monkeypatch, tensorrt=False)
    with pytest.raises(EngineUnavailableError, match="pip install tensorrt"):
        build_engine(batch_models["dynamic"], tmp_path / "m.engine")


def test_parser_errors_and_failed_builds_are_reported(fake_trt: ft.FakeState, batch_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def bad_parse(self: ft.OnnxParser, model: bytes, path: str | None = None) -> bool:
        self._errors.append(ft.ParserError("Unsupported operator: FancyOp"))
        return False

    with monkeypatch.context() as m:
        m.setattr(ft.OnnxParser, "parse", bad_parse)
        with pytest.raises(ModelError, match="ONNX parser failed .*Unsupported operator: FancyOp"):
            build_engine(batch_models["dynamic"], tmp_path / "m.engine")
    monkeypatch.setattr(ft.Builder, "build_serialized_network", lambda self, network, config: None)
    with pytest.raises(ModelError, match="could not build the engine"):
        build_engine(batch_models["dynamic"], tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()


def _rename_input(src: Path, dst: Path, name: str) -> Path:
    model = onnx.load(str(src))
    old = model.graph.input[0].name
    model.graph.input[0].name = name
    for node in model.graph.node:
        for i, inp in enumerate(node.input):
            if inp == old:
                node.input[i] = name
    onnx.save(model, str(dst))
    return dst


def test_profile_goes_on_the_input_named_in_the_onnx(fake_trt: ft.FakeState, batch_models: dict[str, Path], tmp_path: Path) -> None:
    path = _rename_input(batch_models["dynamic"], tmp_path / "renamed.onnx", "input")
    result = build_engine(path, tmp_path / "r.engine")
    assert list(fake_trt.builds[0]["profiles"][0]) == ["input"] and result.input_name == "input"
    assert "--minShapes=input:1x1x64x64" in result.trtexec_line(path)


def test_dynamic_height_width_take_the_model_imgsz(fake_trt: ft.FakeState, tmp_path: Path) -> None:
    """Ultralytics dynamic=True exports leave H/W dynamic too: the profile pins them to imgsz."""
    path = legacy_onnx_export(MiniYolo(), tmp_path / "hw.onnx", 64, {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch"}},
                              {"imgsz": "[64, 64]", "names": str(dict(enumerate(ft.NAMES)))})
    build_engine(path, tmp_path / "hw.engine", 1, 2, 4)
    assert fake_trt.networks[0].inputs[0].shape == (-1, 1, -1, -1)
    assert fake_trt.builds[0]["profiles"][0]["images"] == ((1, 1, 64, 64), (2, 1, 64, 64), (4, 1, 64, 64))
    engine = TensorRTEngine(tmp_path / "hw.engine")
    assert engine.meta.imgsz == 64 and engine.meta.max_batch == 4
    assert tuple(engine.infer(np.zeros((5, 1, 64, 64), np.float32)).shape) == (5, 19, 84)
    with pytest.raises(ModelError, match="imgsz 128 is outside the engine's height profile 64..64"):
        TensorRTEngine(tmp_path / "hw.engine", model_yaml={"imgsz": 128})
