"""``rs-detect export``: Ultralytics weights to a model file whose batch is proven dynamic.

The format-neutral half of exporting: import Ultralytics (the optional ``export`` extra), run
``YOLO(weights).export(...)`` with the arguments the format's backend asks for
(``ultralytics_args``), move the result where it was asked, and inspect it with the backend that
will run it. A result that is not truly batch-dynamic is a :class:`ModelError`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

from rs_detect.engines import registry
from rs_detect.engines.modelinfo import ModelInfo, require_dynamic
from rs_detect.errors import EngineUnavailableError, ModelError, one_line
from rs_detect.fsutil import file_sha256

log = logging.getLogger(__name__)


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


def end2end_args(model: Any) -> dict[str, Any]:
    """Export a model that has an end-to-end (one-to-one) head, YOLO26's and YOLOv10's, with that head:
    output [B, max_det, 6 | 7], no NMS. Ultralytics >= 8.4 selects it with ``nms=False`` (older
    versions export it by default)."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    head = model.model.model[-1] if hasattr(model.model, "model") else None
    has_one2one = getattr(head, "one2one_cv2", None) is not None
    return {"nms": False} if has_one2one and "nms" in DEFAULT_CFG_DICT else {}


def export_ultralytics(
    weights: Path,
    imgsz: int | None = 1024,
    opset: int = 17,
    half: bool = False,
    fmt: str = "onnx",
    output: Path | None = None,
    device: str = "cpu",
) -> ModelInfo:
    """``YOLO(weights).export(format=fmt, ...)``, moved to ``output``, then proven batch-dynamic.

    ``imgsz=None``: the size the checkpoint was trained at. A model with an end-to-end head (YOLO26,
    YOLOv10) is exported with it (no NMS needed).
    """
    weights = Path(weights)
    if not weights.is_file():
        raise ModelError(f"{weights}: weights file not found")
    import_ultralytics()
    from ultralytics import YOLO

    backend = registry.exporter(fmt)
    kwargs: dict[str, Any] = {"format": fmt, "device": device, **backend.ultralytics_args(opset=opset, half=half)}
    if imgsz is not None:
        kwargs["imgsz"] = imgsz
    try:
        model = YOLO(str(weights))
        kwargs.update(end2end_args(model))
        produced = Path(model.export(**kwargs))
    except Exception as exc:  # Ultralytics raises assorted errors (AssertionError, ValueError, RuntimeError...)
        raise ModelError(f"{weights}: Ultralytics export failed ({one_line(exc, 300)})") from None
    target = Path(output) if output else weights.with_suffix(backend.EXPORT_SUFFIX)
    if produced.resolve() != target.resolve():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(produced), str(target))
    return require_dynamic(registry.inspect_model(target))


# -- an Ultralytics checkpoint as --model: exported once, cached -----------------------------------------


def is_checkpoint(path: Path) -> bool:
    """Whether a ``.pt`` file is a pickled checkpoint (``torch.save``, what Ultralytics trains to) rather
    than a TorchScript archive (which holds ``constants.pkl`` and compiled ``code/``)."""
    path = Path(path)
    if path.suffix.lower() != ".pt" or not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile:
        with open(path, "rb") as fh:
            return fh.read(1) == b"\x80"  # a legacy (non-zip) pickle
    except OSError:
        return False
    return not any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def cache_dir() -> Path:
    """Where exported checkpoints are kept: ``$RS_DETECT_CACHE``, else ``$XDG_CACHE_HOME/rs-detect/models``,
    else ``~/.cache/rs-detect/models``."""
    env = os.environ.get("RS_DETECT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rs-detect" / "models"


def _ultralytics_device(device: str) -> str:
    """rs-detect's ``cuda`` / ``cuda:N`` as Ultralytics names GPUs (``0``, ``N``)."""
    if device.startswith("cuda"):
        return device.partition(":")[2] or "0"
    return device


def checkpoint_export(weights: Path, device: str = "cpu", imgsz: int | None = None) -> Path:
    """The exported model for an Ultralytics checkpoint: ONNX with a dynamic batch on the CPU, TorchScript
    on CUDA, at the size it was trained at (or ``imgsz``), made once and kept in :func:`cache_dir` under
    the checkpoint's content hash; a later run with the same weights reuses it without Ultralytics.

    The export runs on a copy of the weights in a temporary folder of the cache, so nothing is written
    beside the user's file (Ultralytics would write ``best.onnx`` there, over one that may exist).
    """
    weights = Path(weights)
    fmt = "torchscript" if str(device).startswith("cuda") else "onnx"
    suffix = registry.exporter(fmt).EXPORT_SUFFIX
    digest = file_sha256(weights)[:16]
    folder = cache_dir()
    target = folder / f"{weights.stem}-{digest}{f'-{imgsz}' if imgsz else ''}{suffix}"
    if target.is_file():
        log.debug("%s: using the export cached at %s", weights, target)
        return target
    try:
        import_ultralytics()
    except EngineUnavailableError:
        raise EngineUnavailableError(
            f"{weights}: an Ultralytics checkpoint; running it needs Ultralytics once, to export it: "
            f"pip install 'rs-detect[export]' (or export it elsewhere: rs-detect export {weights.name})") from None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".export-", dir=folder))
    except OSError as exc:
        raise ModelError(f"{weights}: cannot create the model cache {folder} ({exc.strerror or exc}); set RS_DETECT_CACHE") from None
    try:
        local = work / weights.name
        shutil.copyfile(weights, local)
        log.info("%s: an Ultralytics checkpoint: exporting it once (%s, dynamic batch) to %s", weights.name, fmt, target)
        info = export_ultralytics(local, imgsz=imgsz, fmt=fmt, output=work / f"model{suffix}", device=_ultralytics_device(str(device)))
        os.replace(info.path, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
