"""TensorRTEngine against the fake TensorRT 10 API (tests/fake_tensorrt.py; libnvinfer is not installable here).

The fake really computes (it runs the embedded ONNX on the bytes at the bound addresses), so every
test compares the engine's output with ONNX Runtime on the same images.
"""

from __future__ import annotations

import json
from pathlib import Path

import fake_tensorrt as ft
import numpy as np
import onnxruntime as ort
import pytest
import torch
from fake_tensorrt import mini_onnx

from rs_detect.engines import load_engine
from rs_detect.engines.tensorrt import TensorRTEngine
from rs_detect.engines.tensorrt_plan import read_engine_file, split_header, write_engine_file
from rs_detect.errors import EngineUnavailableError, ModelError


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("trt")
    return {
        "dynamic": mini_onnx(d / "dynamic.onnx"),
        "static4": mini_onnx(d / "static4.onnx", dynamic=False, batch=4),
        "nc3": mini_onnx(d / "nc3.onnx", nc=3),
    }


def _reference(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"images": x.astype(np.float32)})[0]


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 64, 64), dtype=np.float32)


def _engine_file(path: Path, plan: bytes, meta: dict | None = None) -> Path:
    if meta is None:
        path.write_bytes(plan)  # a plain plan, as trtexec --saveEngine writes it
    else:
        write_engine_file(path, plan, meta)
    return path


HEADER = {"names": {str(i): n for i, n in enumerate(ft.NAMES)}, "imgsz": [64, 64], "channels": 1, "task": "detect", "stride": 32}


def test_loads_once_allocates_once_and_matches_onnxruntime(fake_trt: ft.FakeState, onnx_models: dict[str, Path], tmp_path: Path) -> None:
    path = _engine_file(tmp_path / "m.engine", ft.plan_for_onnx(onnx_models["dynamic"], (1, 4, 8)), HEADER)
    engine = TensorRTEngine(path)
    assert (engine.meta.min_batch, engine.meta.opt_batch, engine.meta.max_batch, engine.meta.dynamic_batch) == (1, 4, 8, True)
    for n, seed in ((3, 1), (8, 2), (5, 3), (1, 4), (11, 5)):
        x = _images(n, seed)
        out = engine.infer(x)
        assert out.dtype == torch.float32 and tuple(out.shape) == (n, 19, 84)
        np.testing.assert_allclose(out.numpy(), _reference(onnx_models["dynamic"], x), rtol=1e-5, atol=1e-4)
    assert fake_trt.deserialized == 1 and fake_trt.contexts == 1
    assert fake_trt.count("mem_alloc") == 2 and fake_trt.count("pagelocked_empty") == 2  # input + output, once
    assert [a[0] for a in fake_trt.args("set_tensor_address")] == ["images", "output0"]
    assert sorted(a[0] for a in fake_trt.args("mem_alloc")) == [8 * 19 * 84 * 4, 8 * 64 * 64 * 4]  # sized for max batch 8
    assert fake_trt.count("Stream") == 1


def test_shapes_set_only_when_the_batch_size_changes(fake_trt: ft.FakeState, onnx_models: dict[str, Path], tmp_path: Path) -> None:
    engine = TensorRTEngine(_engine_file(tmp_path / "m.engine", ft.plan_for_onnx(onnx_models["dynamic"], (1, 4, 8)), HEADER))
    for n in (3, 3, 8, 2):
        engine.infer(_images(n))
    shapes = [a[1][0] for a in fake_trt.args("set_input_shape")]
    assert shapes == [8, 3, 8, 2]  # 8 at load (to size the output buffer), then per change


def test_batches_above_the_profile_max_are_split(fake_trt: ft.FakeState, onnx_models: dict[str, Path], tmp_path: Path) -> None:
    engine = TensorRTEngine(_engine_file(tmp_path / "m.engine", ft.plan_for_onnx(onnx_models["dynamic"], (1, 4, 8)), HEADER))
    x = _images(19)
    out = engine.infer(x)
    executed = [dict(a[1])["images"][0] for a in fake_trt.args("execute_async_v3")]
    assert executed == [8, 8, 3]
    np.testing.assert_allclose(out.numpy(), _reference(onnx_models["dynamic"], x), rtol=1e-5, atol=1e-4)


def test_batches_below_the_profile_min_are_padded(fake_trt: ft.FakeState, onnx_models: dict[str, Path], tmp_path: Path) -> None:
    engine = TensorRTEngine(_engine_file(tmp_path / "m.engine", ft.plan_for_onnx(onnx_models["dynamic"], (4, 4, 8)), HEADER))
    assert engine.meta.min_batch == 4
    x = _images(2)
    out = engine.infer(x)
    assert tuple(out.shape) == (2, 19, 84)
    assert [dict(a[1])["images"][0] for a in fake_trt.args("execute_async_v3")] == [4]
    np.testing.assert_allclose(out.numpy(), _reference(onnx_models["dynamic"], x), rtol=1e-5, atol=1e-4)


def test_static_engine_gets_its_fixed_batch(fake_trt: ft.FakeState, onnx_models: dict[str, Path], tmp_path: Path) -> None:
    engine = TensorRTEngine(_engine_file(tmp_path / "s.plan", ft.plan_for_onnx(onnx_models["static4"], None)))
    m = engine.meta
    assert (m.min_batch, m.opt_batch, m.max_batch, m.dynamic_batch) == (4, 4, 4, False)
    x = _images(6)
    out = engine.infer(x)
    assert fake_trt.count("set_input_shape") == 0  # nothing to set on a static engine
    assert [dict(a[1])["images"][0] for a in fake_trt.args("execute_async_v3")] == [4, 4]
    padded = np.concatenate([x[4:], np.zeros((2, 1, 64, 64), np.float32)])
    ref = np.concatenate([_reference(onnx_models["static4"], x[:4]), _reference(onnx_models["static4"], padded)[:2]])
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-4)


def test_plain_plan_without_metadata_uses_engine_dims_and_defaults(fake_trt: ft.FakeState, onnx_models: dict[str, Path], tmp_path: Path) -> None:
    engine = TensorRTEngine(_engine_file(tmp_path / "plain.plan", ft.plan_for_onnx(onnx_models["dynamic"])))
    assert engine.meta.imgsz == 64 and engine.meta.channels == 1 and engine.meta.nc == 15  # DOTA defaults fit 19 channels
    assert not read_engine_file(tmp_path / "plain.plan").header


def test_header_sidecar_and_yaml_precedence(fake_trt: ft.FakeState, onnx_models: dict[str, Path], tmp_path: Path) -> None:
    plan = ft.plan_for_onnx(onnx_models["nc3"])
    header = {**HEADER, "names": {"0": "a", "1": "b", "2": "c"}}
    path = _engine_file(tmp_path / "nc3.engine", plan, header)
    data = path.read_bytes()
    offset, meta = split_header(data)
    assert meta["names"]["0"] == "a" and data[offset:] == plan
    assert TensorRTEngine(path).meta.names == ("a", "b", "c")
    # a sidecar overrides the header
    (tmp_path / "nc3.engine.json").write_text(json.dumps({"names": ["x", "y", "z"]}))
    assert TensorRTEngine(path).meta.names == ("x", "y", "z")
    # a model YAML overrides both
    assert TensorRTEngine(path, model_yaml={"names": ["p", "q", "r"]}).meta.names == ("p", "q", "r")
    # a plain plan with only a sidecar
    plain = _engine_file(tmp_path / "nc3.plan", plan)
    (tmp_path / "nc3.plan.json").write_text(json.dumps(header))
    assert TensorRTEngine(plain).meta.names == ("a", "b", "c")


def test_wrong_metadata_is_refused_in_one_line(fake_trt: ft.FakeState, onnx_models: dict[str, Path], tmp_path: Path) -> None:
    path = _engine_file(tmp_path / "nc3.engine", ft.plan_for_onnx(onnx_models["nc3"]), HEADER)  # says 15 classes
    with pytest.raises(ModelError, match=r"nc3\.engine: output shape \[1, 7, 84\]"):
        TensorRTEngine(path)
    path = _engine_file(tmp_path / "sz.engine", ft.plan_for_onnx(onnx_models["dynamic"]), {**HEADER, "imgsz": [128, 128]})
    with pytest.raises(ModelError, match="height is 64 but its metadata/YAML says imgsz 128"):
        TensorRTEngine(path)


def test_model_yaml_batch_must_fit_the_profile(fake_trt: ft.FakeState, onnx_models: dict[str, Path], tmp_path: Path) -> None:
    path = _engine_file(tmp_path / "m.engine", ft.plan_for_onnx(onnx_models["dynamic"], (1, 4, 8)), HEADER)
    narrowed = TensorRTEngine(path, model_yaml={"batch": {"min": 2, "opt": 3, "max": 6}}).meta
    assert (narrowed.min_batch, narrowed.opt_batch, narrowed.max_batch) == (2, 3, 6)
    with pytest.raises(ModelError, match="outside the engine profile 1..8"):
        TensorRTEngine(path, model_yaml={"batch": {"min": 1, "opt": 8, "max": 16}})


def test_tensors_found_by_name_not_by_index(fake_trt: ft.FakeState, onnx_models: dict[str, Path], tmp_path: Path) -> None:
    plan = ft.plan_for_onnx(onnx_models["dynamic"], order="outputs-first")
    engine = TensorRTEngine(_engine_file(tmp_path / "m.engine", plan, HEADER))
    x = _images(3)
    np.testing.assert_allclose(engine.infer(x).numpy(), _reference(onnx_models["dynamic"], x), rtol=1e-5, atol=1e-4)
    assert {a[0] for a in fake_trt.args("set_input_shape")} == {"images"}


def test_fp16_io(fake_trt: ft.FakeState, onnx_models: dict[str, Path], tmp_path: Path) -> None:
    engine = TensorRTEngine(_engine_file(tmp_path / "h.engine", ft.plan_for_onnx(onnx_models["dynamic"], io_dtype="HALF"), HEADER))
    assert engine.input_dtype == np.float16
    assert {a[1] for a in fake_trt.args("pagelocked_empty")} == {"float16"}
    x = _images(5)
    out = engine.infer(x.astype(np.float16))
    assert out.dtype == torch.float32
    ref = _reference(onnx_models["dynamic"], x.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(out.numpy(), ref, rtol=2e-3, atol=0.1)  # output rounded to fp16 by the engine
    out32 = engine.infer(x)  # float32 images are converted to the engine's dtype
    np.testing.assert_allclose(out32.numpy(), out.numpy(), rtol=0, atol=0)


def test_execute_runs_on_the_one_stream(fake_trt: ft.FakeState, onnx_models: dict[str, Path], tmp_path: Path) -> None:
    engine = TensorRTEngine(_engine_file(tmp_path / "m.engine", ft.plan_for_onnx(onnx_models["dynamic"]), HEADER))
    engine.infer(_images(2))
    engine.infer(_images(5))
    (handle,) = fake_trt.args("Stream")[0]
    assert [a[0] for a in fake_trt.args("execute_async_v3")] == [handle, handle]
    assert {a[2] for a in fake_trt.args("memcpy_htod_async")} == {handle}
    assert {a[2] for a in fake_trt.args("memcpy_dtoh_async")} == {handle}
    assert [a[1] for a in fake_trt.args("memcpy_htod_async")] == [2 * 64 * 64 * 4, 5 * 64 * 64 * 4]  # only the real images


def test_refused_shape_and_failed_execution_raise(fake_trt: ft.FakeState, onnx_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = TensorRTEngine(_engine_file(tmp_path / "m.engine", ft.plan_for_onnx(onnx_models["dynamic"], (1, 4, 8)), HEADER))
    with pytest.raises(ModelError, match=r"refused input shape \[9, 1, 64, 64\] \(profile batch 1..8"):
        engine._infer(_images(9))  # bypasses the base class split on purpose
    monkeypatch.setattr(ft.IExecutionContext, "execute_async_v3", lambda self, stream_handle: False)
    with pytest.raises(ModelError, match="TensorRT execution failed for a batch of 2"):
        engine.infer(_images(2))
    with pytest.raises(ModelError, match="takes \\[N, 1, 64, 64\\]"):
        engine.infer(np.zeros((2, 3, 64, 64), np.float32))


def test_not_a_plan(fake_trt: ft.FakeState, tmp_path: Path) -> None:
    path = tmp_path / "junk.engine"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="could not deserialize"):
        TensorRTEngine(path)


def test_missing_tensorrt_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ft.install(monkeypatch, tensorrt=False)
    path = tmp_path / "m.engine"
    path.write_bytes(b"x")
    with pytest.raises(EngineUnavailableError, match="pip install tensorrt") as err:
        load_engine(path, device="cuda")
    assert "\n" not in str(err.value)


def test_missing_device_memory_backend_is_named(monkeypatch: pytest.MonkeyPatch, onnx_models: dict[str, Path], tmp_path: Path) -> None:
    ft.install(monkeypatch, pycuda=False)
    import rs_detect.engines.tensorrt as backend

    monkeypatch.setattr(backend, "cuda_torch_device", lambda device: None)
    path = _engine_file(tmp_path / "m.engine", ft.plan_for_onnx(onnx_models["dynamic"]), HEADER)
    with pytest.raises(EngineUnavailableError, match=r"PyTorch with CUDA support, or pycuda \(pip install pycuda\)"):
        TensorRTEngine(path)


def test_close_frees_device_memory(fake_trt: ft.FakeState, onnx_models: dict[str, Path], tmp_path: Path) -> None:
    path = _engine_file(tmp_path / "m.engine", ft.plan_for_onnx(onnx_models["dynamic"]), HEADER)
    with load_engine(path, device="cpu") as engine:  # a TensorRT engine always runs on the GPU
        assert isinstance(engine, TensorRTEngine)
        engine.infer(_images(1))
    assert fake_trt.count("free") == 2 and fake_trt.memory == {}


def test_torch_buffer_path_binds_tensor_addresses_once(monkeypatch: pytest.MonkeyPatch, onnx_models: dict[str, Path], tmp_path: Path) -> None:
    """The torch-memory path (CUDA in production) with CPU tensors: the fake reads their raw pointers."""
    rec = ft.install(monkeypatch)
    import rs_detect.engines.tensorrt as backend

    monkeypatch.setattr(backend, "cuda_torch_device", lambda device: torch.device("cpu"))
    engine = TensorRTEngine(_engine_file(tmp_path / "m.engine", ft.plan_for_onnx(onnx_models["dynamic"], (1, 4, 8)), HEADER))
    buffers = engine._buffers
    assert isinstance(buffers, backend.TorchBuffers)
    bound = dict(rec.args("set_tensor_address"))
    assert bound == {name: t.data_ptr() for name, t in buffers.tensors.items()}
    for n in (3, 8, 11):
        x = _images(n, n)
        out = engine.infer(torch.from_numpy(x))
        assert out.device == engine.device
        np.testing.assert_allclose(out.numpy(), _reference(onnx_models["dynamic"], x), rtol=1e-5, atol=1e-4)
    assert rec.count("mem_alloc") == 0 and rec.count("set_tensor_address") == 2
    assert {name: t.data_ptr() for name, t in buffers.tensors.items()} == bound  # never reallocated
    assert {a[0] for a in rec.args("execute_async_v3")} == {0}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_cuda_buffers_on_a_real_gpu(monkeypatch: pytest.MonkeyPatch, onnx_models: dict[str, Path], tmp_path: Path) -> None:
    """Real CUDA buffers and stream; the fake copies device memory through cupy to run the ONNX."""
    pytest.importorskip("cupy")
    rec = ft.install(monkeypatch)
    engine = TensorRTEngine(_engine_file(tmp_path / "m.engine", ft.plan_for_onnx(onnx_models["dynamic"], io_dtype="HALF"), HEADER), device="cuda")
    assert engine.device.type == "cuda"
    x = _images(6)
    out = engine.infer(x)
    assert out.device.type == "cuda" and out.dtype == torch.float32
    ref = _reference(onnx_models["dynamic"], x.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(out.cpu().numpy(), ref, rtol=2e-3, atol=0.1)
    handle = engine._buffers.handle
    assert handle != 0 and {a[0] for a in rec.args("execute_async_v3")} == {handle}
