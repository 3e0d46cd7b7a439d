"""The dynamic-batch verdict: a truly dynamic ONNX, a static one, and a static one with edited dims."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from fake_tensorrt import MiniYolo, edit_batch_dims, legacy_onnx_export, mini_onnx, mini_torchscript
from onnx import TensorProto, helper

from rs_detect.errors import ModelError
from rs_detect.engines import inspect_model
from rs_detect.engines.modelinfo import compare_batch_runs
from rs_detect.engines.onnx_graph import scan_baked_batch


@pytest.fixture(scope="module")
def models(batch_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shared dynamic/static/edited exports, plus a static export at batch 4 and its edited twin."""
    d = tmp_path_factory.mktemp("modelinfo")
    static4 = mini_onnx(d / "static4.onnx", dynamic=False, batch=4)
    return {**batch_models, "static4": static4, "edited4": edit_batch_dims(static4, d / "edited4.onnx")}


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]


def test_dynamic_onnx_is_usable_for_dynamic_batching(models: dict[str, Path]) -> None:
    info = inspect_model(models["dynamic"])
    assert info.exit_code == 0
    assert info.batch.dynamic and info.batch.declared_dynamic
    assert info.batch.baked == ()
    assert info.batch.run is not None and info.batch.run.ok and info.batch.run.batches == (1, 3)
    assert info.batch.run.max_abs_diff is not None and info.batch.run.max_abs_diff < 1e-3
    assert info.meta is not None and (info.meta.imgsz, info.meta.channels, info.meta.nc) == (64, 1, 15)
    assert info.inputs[0].shape == ("batch", 1, 64, 64)
    assert info.outputs[0].shape == ("batch", 19, 84)
    assert "dynamic batch" in info.render()


def test_static_onnx_is_static_batch_1(models: dict[str, Path]) -> None:
    info = inspect_model(models["static"])
    assert info.exit_code == 1
    assert not info.batch.dynamic and not info.batch.declared_dynamic
    assert info.batch.fixed_batch == 1
    assert info.batch.verdict.startswith("static batch 1")
    assert (info.batch.min_batch, info.batch.max_batch) == (1, 1)
    assert {b.op_type for b in info.batch.baked} == {"Reshape"}
    assert "dynamic_axes" in (info.batch.fix or "")


def test_edited_dims_model_really_breaks_at_batch_2(models: dict[str, Path]) -> None:
    """The fixture is the real trap: the dims say 'batch' and ONNX Runtime still fails."""
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(models["edited"])).graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "batch"
    x = np.random.default_rng(0).random((2, 1, 64, 64), dtype=np.float32)
    with pytest.raises(Exception, match="Reshape"):
        _ort(models["edited"], x)
    assert _ort(models["dynamic"], x).shape == (2, 19, 84)


def test_edited_dims_are_caught_named_and_explained(models: dict[str, Path]) -> None:
    info = inspect_model(models["edited"])
    b = info.batch
    assert info.exit_code == 1
    assert b.declared_dynamic and not b.dynamic
    assert b.fixed_batch == 1
    assert b.verdict.startswith("static batch 1") and "edited" in b.verdict
    names = {n.name for n in b.baked}
    assert {"/Reshape", "/Reshape_6"} <= names
    assert any(n.detail == "Reshape to constant shape [1, 4, 4, 84]" for n in b.baked)
    assert b.run is not None and not b.run.ok and b.run.failed_batch == 3
    text = b.explain()
    assert "/Reshape_6" in text and "dynamic_axes" in text and "editing the input/output dims" in text
    assert "\n" not in text


def test_edited_dims_of_a_batch_4_export_say_batch_4(models: dict[str, Path]) -> None:
    info = inspect_model(models["edited4"])
    assert info.exit_code == 1 and info.batch.fixed_batch == 4
    assert info.batch.run is not None and info.batch.run.failed_batch == 1  # even batch 1 fails
    assert inspect_model(models["static4"]).batch.verdict.startswith("static batch 4")


def test_three_verdicts_differ(models: dict[str, Path]) -> None:
    verdicts = {k: inspect_model(models[k]).batch.verdict for k in ("dynamic", "static", "edited")}
    assert len(set(verdicts.values())) == 3


def test_scan_finds_nothing_in_a_dynamic_export(models: dict[str, Path]) -> None:
    assert scan_baked_batch(onnx.load(str(models["dynamic"]))) == []


def _graph(nodes: list, inits: list, out_shape: list) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_scan_flags_expand_and_concat_but_not_symbolic_reshapes() -> None:
    shape = helper.make_tensor("s", TensorProto.INT64, [2], [2, 3])
    const = helper.make_tensor("c", TensorProto.FLOAT, [1, 2], [0.0, 1.0])
    ok_shape = helper.make_tensor("k", TensorProto.INT64, [2], [0, -1])
    model = _graph([
        helper.make_node("Reshape", ["x", "k"], ["r"], name="fine"),
        helper.make_node("Expand", ["r", "s"], ["e"], name="expand"),
        helper.make_node("Concat", ["e", "c"], ["y"], name="concat", axis=1),
    ], [shape, const, ok_shape], [2, 5])
    found = {b.name: b for b in scan_baked_batch(model)}
    assert set(found) == {"expand", "concat"}
    assert found["expand"].batch == 2 and found["concat"].batch == 1


def test_scan_ignores_shape_arithmetic() -> None:
    """A Reshape of non-batched values (derived from Shape) is not a batch problem."""
    one = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    model = _graph([
        helper.make_node("Shape", ["x"], ["sh"]),
        helper.make_node("Reshape", ["sh", "one"], ["r"], name="shape_reshape"),
        helper.make_node("Identity", ["x"], ["y"]),
    ], [one], ["batch", 3])
    assert scan_baked_batch(model) == []


class _MixesBatch(torch.nn.Module):
    """Dynamic shapes, wrong maths: subtracting the batch mean mixes images (BatchNorm in train mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = MiniYolo()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x - x.mean(0, keepdim=True))


def test_run_check_catches_images_mixed_across_the_batch(tmp_path: Path) -> None:
    from fake_tensorrt import NAMES

    from rs_detect.engines.onnxruntime import export_torch_module_onnx

    path = export_torch_module_onnx(_MixesBatch(), tmp_path / "mix.onnx", 64, 1, NAMES, "detect")
    info = inspect_model(path)
    assert info.exit_code == 1
    assert info.batch.baked == ()
    assert info.batch.run is not None and info.batch.run.error is None and not info.batch.run.ok
    assert "mixed" in info.render()


class _FullyConv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 19, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(2)


def test_dynamic_height_width_runs_small_and_says_so(tmp_path: Path) -> None:
    path = legacy_onnx_export(_FullyConv(), tmp_path / "fc.onnx", 256,
                              {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 2: "anchors"}},
                              {"imgsz": "[256, 256]", "names": str(dict(enumerate("abcdefghijklmno")))})
    info = inspect_model(path)
    assert info.batch.dynamic and info.batch.run is not None and info.batch.run.spatial == 128
    assert any("128x128" in n for n in info.batch.notes)


def test_spatial_fallback_to_imgsz_when_small_size_fails(tmp_path: Path) -> None:
    """MiniYolo has fixed anchors: dynamic H/W dims lie, so the check falls back to imgsz."""
    path = legacy_onnx_export(MiniYolo(imgsz=160), tmp_path / "anchors.onnx", 160,
                              {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch"}})
    from rs_detect.engines.onnxruntime import check_onnx_batch

    check = check_onnx_batch(path, imgsz=160, channels=1)
    assert check.dynamic and check.run is not None and check.run.spatial == 160 and check.notes == ()


def test_compare_batch_runs_tolerates_float16_noise() -> None:
    rng = np.random.default_rng(3)

    def run(x: np.ndarray) -> list[np.ndarray]:
        out = x.reshape(x.shape[0], -1)[:, :10].astype(np.float32) * 100
        return [out + rng.normal(0, 0.01, out.shape).astype(np.float32)]

    assert compare_batch_runs(run, 1, 32, np.dtype(np.float16)).ok
    assert not compare_batch_runs(run, 1, 32, np.dtype(np.float32)).ok


def test_json_is_complete_and_serialisable(models: dict[str, Path]) -> None:
    d = json.loads(json.dumps(inspect_model(models["edited"]).to_dict()))
    assert d["usable_for_dynamic_batching"] is False
    assert d["batch"]["fixed_batch"] == 1 and d["batch"]["declared_dynamic"] is True
    assert d["batch"]["baked"][0]["op_type"] == "Reshape"
    assert d["model"]["names"][0] == "plane" and d["model"]["num_anchors"] == 84
    assert d["metadata"]["task"] == "detect"


def test_no_run_still_catches_edited_dims_by_the_scan(models: dict[str, Path]) -> None:
    info = inspect_model(models["edited"], run=False)
    assert info.exit_code == 1 and info.batch.run is None and info.batch.fixed_batch == 1
    assert inspect_model(models["dynamic"], run=False).exit_code == 0


def test_torchscript_dynamic_and_baked(tmp_path: Path) -> None:
    good = inspect_model(mini_torchscript(tmp_path / "good.torchscript"))
    assert good.exit_code == 0 and good.meta is not None and good.meta.imgsz == 64
    assert good.outputs[0].shape == ("batch", 19, 84)
    bad = inspect_model(mini_torchscript(tmp_path / "bad.torchscript", bake_batch=True))
    assert bad.exit_code == 1 and bad.batch.fixed_batch == 2
    assert bad.batch.verdict.startswith("static batch 2")


def test_model_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        inspect_model(tmp_path / "missing.onnx")
    with pytest.raises(ModelError, match="unknown model format"):
        inspect_model(tmp_path / "x.tflite")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="junk.onnx"):
        inspect_model(junk)


def test_metadata_problem_is_reported_not_fatal(tmp_path: Path) -> None:
    """Wrong class count in the metadata: inspect still answers the batch question."""
    path = mini_onnx(tmp_path / "nc3.onnx", nc=3)
    m = onnx.load(str(path))
    for p in m.metadata_props:
        if p.key == "names":
            p.value = str({0: "plane"})
    onnx.save(m, str(path))
    info = inspect_model(path)
    assert info.meta_error is not None and "output shape" in info.meta_error
    assert info.exit_code == 0
