"""``rs-detect export``: Ultralytics weights to a model file whose batch is proven dynamic.

The format-neutral half of exporting: import Ultralytics (the optional ``export`` extra), run
``YOLO(weights).export(...)`` with the arguments the format's backend asks for
(``ultralytics_args``), move the result where it was asked, and inspect it with the backend that
will run it. A result that is not truly batch-dynamic is a :class:`ModelError`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

from rs_detect.engines import registry
from rs_detect.engines.modelinfo import ModelInfo, require_dynamic
from rs_detect.errors import EngineUnavailableError, ModelError, one_line


def import_ultralytics() -> ModuleType:
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")  # never pip-install behind the user's back
    try:
        import ultralytics
    except ImportError:
        raise EngineUnavailableError("export needs Ultralytics: pip install 'rs-detect[export]' (or pip install ultralytics)") from None
    return ultralytics


def precision_args(half: bool) -> dict[str, Any]:
    """Ultralytics >= 8.4 calls it ``quantize=16``; older versions ``half=True``."""
    if not half:
        return {}
    from ultralytics.cfg import DEFAULT_CFG_DICT

    return {"quantize": 16} if "quantize" in DEFAULT_CFG_DICT else {"half": True}


def export_ultralytics(
    weights: Path,
    imgsz: int = 1024,
    opset: int = 17,
    half: bool = False,
    fmt: str = "onnx",
    output: Path | None = None,
    device: str = "cpu",
) -> ModelInfo:
    """``YOLO(weights).export(format=fmt, ...)``, moved to ``output``, then proven batch-dynamic."""
    weights = Path(weights)
    if not weights.is_file():
        raise ModelError(f"{weights}: weights file not found")
    import_ultralytics()
    from ultralytics import YOLO

    backend = registry.exporter(fmt)
    kwargs: dict[str, Any] = {"format": fmt, "imgsz": imgsz, "device": device, **backend.ultralytics_args(opset=opset, half=half)}
    try:
        model = YOLO(str(weights))
        produced = Path(model.export(**kwargs))
    except Exception as exc:  # Ultralytics raises assorted errors (AssertionError, ValueError, RuntimeError...)
        raise ModelError(f"{weights}: Ultralytics export failed ({one_line(exc, 300)})") from None
    target = Path(output) if output else weights.with_suffix(backend.EXPORT_SUFFIX)
    if produced.resolve() != target.resolve():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(produced), str(target))
    return require_dynamic(registry.inspect_model(target))
