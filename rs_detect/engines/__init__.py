"""Engine backends, one class per runtime, chosen by the model file's suffix.

| suffix                      | backend                                         |
|-----------------------------|-------------------------------------------------|
| .onnx                       | :class:`~rs_detect.engines.onnxruntime.OnnxRuntimeEngine` |
| .engine, .plan              | :class:`~rs_detect.engines.tensorrt.TensorRTEngine` (TensorRT 10+) |
| .torchscript, .ts, .pt      | :class:`~rs_detect.engines.torch.TorchScriptEngine` |

Backends import their runtime lazily, so a CPU-only install never imports TensorRT or pycuda.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rs_detect.engines.base import Engine
from rs_detect.errors import ModelError

SUFFIXES = {
    ".onnx": "onnxruntime",
    ".engine": "tensorrt",
    ".plan": "tensorrt",
    ".torchscript": "torch",
    ".ts": "torch",
    ".pt": "torch",
}


def backend_for(path: Path) -> str:
    backend = SUFFIXES.get(path.suffix.lower())
    if backend is None:
        raise ModelError(f"{path}: unknown model format {path.suffix!r} (expected one of {', '.join(sorted(SUFFIXES))})")
    return backend


def load_engine(path: Path, device: str = "cpu", model_yaml: Mapping[str, Any] | Path | None = None, **kwargs: Any) -> Engine:
    """Load ``path`` once with the backend its suffix names."""
    path = Path(path)
    backend = backend_for(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    if backend == "onnxruntime":
        from rs_detect.engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(path, device=device, model_yaml=model_yaml, **kwargs)
    if backend == "tensorrt":
        from rs_detect.engines.tensorrt import TensorRTEngine

        return TensorRTEngine(path, device=device, model_yaml=model_yaml, **kwargs)
    from rs_detect.engines.torch import TorchScriptEngine

    return TorchScriptEngine(path, device=device, model_yaml=model_yaml, **kwargs)


__all__ = ["Engine", "load_engine", "backend_for", "SUFFIXES"]
