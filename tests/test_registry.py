"""The backend registry: one suffix table, one module per backend, runtimes imported only when used."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_tensorrt import mini_onnx

from rs_detect.engines import registry
from rs_detect.engines.base import Engine
from rs_detect.engines.modelinfo import BatchCheck, ModelInfo
from rs_detect.errors import ModelError
from rs_detect.types import ModelMeta

REPO = Path(__file__).resolve().parents[1]


def test_every_backend_module_implements_the_protocol() -> None:
    seen: set[str] = set()
    for b in registry.BACKENDS:
        mod = b.impl()
        assert mod.FORMAT == b.format and callable(mod.load) and callable(mod.inspect)
        assert not seen & set(b.suffixes), "a suffix belongs to one backend"
        seen |= set(b.suffixes)
        if b.exports:
            assert mod.EXPORT_SUFFIX in b.suffixes and callable(mod.ultralytics_args)
    assert set(registry.SUFFIXES) == seen
    assert registry.EXPORT_FORMATS == ("onnx", "torchscript")
    assert [registry.backend_for(Path(f"m{s}")) for s in (".onnx", ".PLAN", ".engine", ".ts", ".pt")] == [
        "onnxruntime", "tensorrt", "tensorrt", "torch", "torch"]
    with pytest.raises(ModelError, match=r"m\.tflite: unknown model format '\.tflite' \(expected one of \.engine, \.onnx"):
        registry.backend_for(Path("m.tflite"))


class _EchoEngine(Engine):
    backend = "echo"

    def _infer(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        return torch.zeros((int(images.shape[0]), 4 + self.meta.nc, self.meta.num_anchors))


def test_a_new_backend_is_its_module_plus_one_registry_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """load_engine and inspect_model reach a backend they have never heard of through the table alone."""
    mod = types.ModuleType("echo_backend")
    mod.FORMAT = "echo"
    meta = ModelMeta(names=("plane", "ship"), imgsz=64, channels=1)
    mod.load = lambda path, device="cpu", model_yaml=None, **kw: _EchoEngine(meta, torch.device(device))
    mod.inspect = lambda path, model_yaml=None, run=True: ModelInfo(path, "echo", (), (), BatchCheck(True, "dynamic", True), meta)
    monkeypatch.setitem(sys.modules, "echo_backend", mod)
    monkeypatch.setattr(registry, "BACKENDS", (*registry.BACKENDS, registry.Backend("echo", "echo_backend", "echo", (".echo",))))
    model = tmp_path / "m.echo"
    model.write_bytes(b"")
    engine = registry.load_engine(model)
    assert isinstance(engine, _EchoEngine) and engine.infer(np.zeros((3, 1, 64, 64), np.float32)).shape == (3, 6, 84)
    assert registry.inspect_model(model).format == "echo"
    with pytest.raises(ModelError, match="model file not found"):
        registry.load_engine(tmp_path / "missing.echo")


def test_onnxruntime_path_imports_no_other_runtime(tmp_path: Path) -> None:
    """Loading, inspecting and running an ONNX model never imports TensorRT, pycuda, Ultralytics or torch._dynamo."""
    model = mini_onnx(tmp_path / "m.onnx")
    code = (
        "import sys, numpy as np\n"
        "from rs_detect.engines import inspect_model, load_engine\n"
        f"engine = load_engine({str(model)!r})\n"
        "out = engine.infer(np.zeros((2, 1, 64, 64), np.float32))\n"
        f"info = inspect_model({str(model)!r})\n"
        "assert tuple(out.shape) == (2, 19, 84) and info.batch.dynamic\n"
        "heavy = ('tensorrt', 'pycuda', 'ultralytics', 'torch._dynamo', 'rs_detect.engines.tensorrt', 'rs_detect.engines.torch')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_one_place_builds_sessions_and_imports_each_runtime() -> None:
    """ONNX Runtime sessions are made by one function; each runtime is imported by its own backend only."""
    sources = {p.relative_to(REPO).as_posix(): p.read_text() for p in (REPO / "rs_detect").rglob("*.py")}
    assert [f for f, text in sources.items() if "InferenceSession(" in text] == ["rs_detect/engines/onnxruntime.py"]
    assert sources["rs_detect/engines/onnxruntime.py"].count("InferenceSession(") == 1
    trt = sorted(f for f, text in sources.items() if "import tensorrt" in text or "import pycuda" in text)
    assert trt == ["rs_detect/engines/tensorrt.py", "rs_detect/engines/tensorrt_memory.py"]
    assert [f for f, text in sources.items() if "from ultralytics" in text or "import ultralytics" in text] == ["rs_detect/engines/ultralytics.py"]
