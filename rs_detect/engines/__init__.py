"""Engine backends, one module per model format, chosen by the model file's suffix.

| suffix                      | module (load, inspect, export/build)                              |
|-----------------------------|--------------------------------------------------------------------|
| .onnx                       | :mod:`rs_detect.engines.onnxruntime` (ONNX Runtime)                |
| .engine, .plan              | :mod:`rs_detect.engines.tensorrt` (TensorRT 10+)                   |
| .torchscript, .ts, .pt      | :mod:`rs_detect.engines.torch` (PyTorch, TorchScript)              |

The table lives in :mod:`rs_detect.engines.registry`; adding a backend is its module plus one line
there. Backends import their runtime lazily, so a CPU-only install never imports TensorRT or pycuda,
and importing this package (e.g. for ``rs-detect --help``) imports no runtime at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rs_detect.engines.registry import BACKENDS, SUFFIXES, backend_for, inspect_model, load_engine

if TYPE_CHECKING:
    from rs_detect.engines.base import Engine


def __getattr__(name: str) -> Any:
    if name == "Engine":  # the interface imports torch: only on demand
        from rs_detect.engines.base import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Engine", "load_engine", "inspect_model", "backend_for", "BACKENDS", "SUFFIXES"]
