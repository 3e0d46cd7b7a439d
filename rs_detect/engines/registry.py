"""The one suffix registry: which backend module loads, inspects and exports a model file.

Like SAHI's ``auto_model``: callers ask here (:func:`load_engine`, :func:`inspect_model`,
:func:`export_ultralytics`) and never name a backend. Each backend is one module with

* ``FORMAT`` - the label ``rs-detect inspect`` prints;
* ``load(path, device, model_yaml, **kwargs) -> Engine``;
* ``inspect(path, model_yaml, run) -> ModelInfo``;
* optionally ``EXPORT_SUFFIX`` and ``ultralytics_args(opset, half)`` for ``rs-detect export``.

Adding a backend is writing its module and adding one line to :data:`BACKENDS`. A backend module is
imported only when a file of its suffix is used, so a CPU-only run never imports TensorRT or pycuda.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from rs_detect.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from rs_detect.engines.base import Engine
    from rs_detect.engines.modelinfo import ModelInfo


@dataclass(frozen=True)
class Backend:
    """One registry line: a backend's name, its module, its format label, the suffixes it takes."""

    name: str
    module: str
    format: str
    suffixes: tuple[str, ...]
    exports: bool = False  # ``rs-detect export --format <format>`` writes this format
    #: an engine it loads may run in another thread than the one that loaded it (TensorRT's pycuda
    #: fallback makes its CUDA context current in the loading thread alone)
    loads_in_any_thread: bool = True

    def impl(self) -> ModuleType:
        return importlib.import_module(self.module)


BACKENDS: tuple[Backend, ...] = (
    Backend("onnxruntime", "rs_detect.engines.onnxruntime", "onnx", (".onnx",), exports=True),
    Backend("tensorrt", "rs_detect.engines.tensorrt", "tensorrt", (".engine", ".plan"), loads_in_any_thread=False),
    Backend("torch", "rs_detect.engines.torch", "torchscript", (".torchscript", ".ts", ".pt"), exports=True),
)

#: model file suffix -> backend name
SUFFIXES: dict[str, str] = {suffix: b.name for b in BACKENDS for suffix in b.suffixes}
#: the formats ``rs-detect export`` writes
EXPORT_FORMATS: tuple[str, ...] = tuple(b.format for b in BACKENDS if b.exports)


def backend(path: Path) -> Backend:
    """The backend for ``path``'s suffix, or a :class:`ModelError` naming the suffixes there are."""
    suffix = Path(path).suffix.lower()
    for b in BACKENDS:
        if suffix in b.suffixes:
            return b
    known = sorted(s for b in BACKENDS for s in b.suffixes)
    raise ModelError(f"{path}: unknown model format {Path(path).suffix!r} (expected one of {', '.join(known)})")


def backend_for(path: Path) -> str:
    """The name of the backend that runs ``path`` (``onnxruntime``, ``tensorrt``, ``torch``)."""
    return backend(path).name


def _existing(path: Path) -> tuple[Path, Backend]:
    path = Path(path)
    b = backend(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    return path, b


def import_loader(path: Path) -> Backend:
    """Import the modules of rs-detect's own that :func:`load_engine` needs for ``path`` (its backend's,
    the checkpoint check's), so that a thread loading it imports none of them; the backend, or a
    :class:`ModelError` for an unknown suffix, as :func:`load_engine` would raise."""
    importlib.import_module("rs_detect.engines.ultralytics")
    b = backend(path)
    b.impl()
    return b


def load_engine(path: Path, device: str = "cpu", model_yaml: Mapping[str, Any] | Path | None = None, **kwargs: Any) -> Engine:
    """Load ``path`` once with the backend its suffix names.

    An Ultralytics checkpoint (``best.pt``) is exported once and its cached export loaded
    (:func:`rs_detect.engines.ultralytics.checkpoint_export`); its model YAML (``best.yaml``) still applies.
    """
    path, b = _existing(path)
    from rs_detect.engines.ultralytics import checkpoint_export, is_checkpoint

    if is_checkpoint(path):
        from rs_detect.engines.metadata import sidecar_yaml

        model_yaml = model_yaml if model_yaml is not None else sidecar_yaml(path)
        path, b = _existing(checkpoint_export(path, device))
    return b.impl().load(path, device=device, model_yaml=model_yaml, **kwargs)


def inspect_model(path: Path, model_yaml: Mapping[str, Any] | Path | None = None, run: bool = True) -> ModelInfo:
    """Inspect any supported model file; ``run=False`` skips executing it (ONNX/TorchScript)."""
    path, b = _existing(path)
    return b.impl().inspect(path, model_yaml, run)


def exporter(fmt: str) -> ModuleType:
    """The backend module that exports ``fmt`` from Ultralytics weights."""
    for b in BACKENDS:
        if b.exports and b.format == fmt:
            return b.impl()
    raise ConfigError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
