"""Model files for the seed's workflow: export with a *truly* dynamic batch, then build a TensorRT engine.

Three entry points, each checked with :mod:`rs_detect.modelinfo` so a static batch never slips through:

* :func:`export_ultralytics` - ``YOLO(weights).export(format="onnx", dynamic=True, simplify=...)`` (the
  optional ``export`` extra, imported lazily). The one flag the seed's author lost days to is
  ``dynamic=True``: without it the export batch is baked into internal Reshape nodes and no later
  edit of the input/output dims can undo that.
* :func:`export_torch_module_onnx` - the same for any ``torch.nn.Module`` (a non-Ultralytics model)::

      torch.onnx.export(model, torch.zeros(1, C, S, S), "model.onnx", dynamo=False, opset_version=17,
                        input_names=["images"], output_names=["output0"],
                        dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}})

  plus the metadata keys Ultralytics writes (``names`` as a dict literal, ``imgsz``, ``stride``,
  ``task``, ``batch``, ``channels``), so every backend reads the model the same way.
* :func:`build_engine` - the TensorRT builder + ONNX parser with one optimization profile, the Python
  equivalent of ``trtexec --onnx=M.onnx --minShapes=images:1x1x1024x1024
  --optShapes=images:8x1x1024x1024 --maxShapes=images:32x1x1024x1024 --saveEngine=M.plan``.

Engine metadata (names, imgsz, task, channels, batch profile): a ``.engine`` output gets an
Ultralytics-style header (4-byte little-endian length + JSON + plan), which Ultralytics reads too; any
other suffix (``.plan``, what trtexec writes) stays a plain plan that trtexec can load, with the
metadata in a sidecar ``<name>.json``. :class:`~rs_detect.engines.tensorrt.TensorRTEngine` reads both.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from rs_detect import __version__
from rs_detect.engines.tensorrt import import_tensorrt, sidecar_path
from rs_detect.errors import ConfigError, EngineUnavailableError, ModelError, one_line
from rs_detect.fsutil import atomic_path, atomic_write_text
from rs_detect.modelinfo import ModelInfo, inspect_model, inspect_onnx

log = logging.getLogger(__name__)

ExportFormat = Literal["onnx", "torchscript"]
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript"}


def _not_dynamic(path: Path, info: ModelInfo) -> ModelError:
    return ModelError(f"{path}: {info.batch.explain()}")


# -- plain torch -------------------------------------------------------------------------------------


def onnx_metadata(names: Sequence[str], imgsz: int, channels: int, task: str, stride: int = 32, batch: int = 1, dynamic: bool = True) -> dict[str, str]:
    """The metadata keys Ultralytics writes into ONNX, as the same Python-literal strings."""
    return {
        "description": "exported by rs-detect",
        "author": "rs-detect",
        "version": __version__,
        "stride": str(stride),
        "task": task,
        "batch": str(batch),
        "imgsz": str([imgsz, imgsz]),
        "names": str(dict(enumerate(names))),
        "channels": str(channels),
        "args": str({"batch": batch, "dynamic": dynamic}),
    }


def export_torch_module_onnx(
    module: Any,
    path: Path,
    imgsz: int,
    channels: int,
    names: Sequence[str],
    task: str = "detect",
    opset: int = 17,
    *,
    dynamic: bool = True,
    batch: int = 1,
    stride: int = 32,
) -> Path:
    """Export a ``torch.nn.Module`` (images [B, C, S, S] -> raw [B, 4+nc(+1), A]) to ONNX with metadata.

    ``dynamic=True`` marks dim 0 of ``images`` and ``output0`` as ``batch`` *while tracing*, so shapes
    computed from ``x.shape[0]`` stay symbolic. ``dynamic=False`` reproduces the seed's trap (a static
    export at ``batch``): the tests use it to build the models ``inspect`` must refuse.
    """
    import onnx
    import torch

    path = Path(path)
    module = module.eval()
    dummy = torch.zeros(batch, channels, imgsz, imgsz)
    axes = {"images": {0: "batch"}, "output0": {0: "batch"}} if dynamic else None
    with atomic_path(path, parents=True) as tmp:
        with torch.no_grad(), warnings.catch_warnings():
            # the TorchScript-based exporter (dynamo=False) is deprecated, but it is the one whose
            # dynamic_axes keep x.shape[0] symbolic exactly as the seed and Ultralytics rely on
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(module, (dummy,), str(tmp), input_names=["images"], output_names=["output0"],
                              dynamic_axes=axes, opset_version=opset, dynamo=False)
        model = onnx.load(str(tmp))
        for key, value in onnx_metadata(names, imgsz, channels, task, stride, batch, dynamic).items():
            prop = model.metadata_props.add()
            prop.key, prop.value = key, value
        onnx.save(model, str(tmp))
    return path


# -- Ultralytics ---------------------------------------------------------------------------------------


def _import_ultralytics() -> ModuleType:
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")  # never pip-install behind the user's back
    try:
        import ultralytics
    except ImportError:
        raise EngineUnavailableError("export needs Ultralytics: pip install 'rs-detect[export]' (or pip install ultralytics)") from None
    return ultralytics


def _precision_args(half: bool) -> dict[str, Any]:
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
    fmt: ExportFormat = "onnx",
    output: Path | None = None,
    device: str = "cpu",
) -> ModelInfo:
    """``YOLO(weights).export(...)``, moved to ``output``, then proven batch-dynamic (run at two batch sizes).

    ``simplify`` needs onnxslim; without it the export goes ahead unsimplified (TensorRT and ONNX
    Runtime optimise the graph themselves) and says so. Raises :class:`ModelError` when the result
    is not truly batch-dynamic.
    """
    weights = Path(weights)
    if not weights.is_file():
        raise ModelError(f"{weights}: weights file not found")
    _import_ultralytics()
    from ultralytics import YOLO

    # TorchScript: a trace is batch-dynamic by itself (shapes come from x.shape); Ultralytics' dynamic=True
    # would instead rebuild the anchors on every call from a CPU arange copied to the GPU, a blocking copy
    # that drains the GPU's queue each batch and cannot be captured in a CUDA graph
    kwargs: dict[str, Any] = {"format": fmt, "imgsz": imgsz, "dynamic": fmt != "torchscript", "device": device}
    if fmt == "onnx":
        kwargs["opset"] = opset
        kwargs["simplify"] = importlib.util.find_spec("onnxslim") is not None
        if not kwargs["simplify"]:
            log.warning("onnxslim is not installed: exporting without simplify (pip install onnxslim to simplify)")
        kwargs.update(_precision_args(half))
    elif half:
        log.warning("--half is ignored for TorchScript: the PyTorch backend runs it in fp16 on CUDA by itself")
    try:
        model = YOLO(str(weights))
        produced = Path(model.export(**kwargs))
    except Exception as exc:  # Ultralytics raises assorted errors (AssertionError, ValueError, RuntimeError...)
        raise ModelError(f"{weights}: Ultralytics export failed ({one_line(exc, 300)})") from None
    target = Path(output) if output else weights.with_suffix(SUFFIX[fmt])
    if produced.resolve() != target.resolve():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(produced), str(target))
    info = inspect_model(target)
    if not info.batch.dynamic:
        raise _not_dynamic(target, info)
    return info


# -- TensorRT --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildResult:
    """A built engine: where it went, its metadata, and where that metadata lives."""

    path: Path
    metadata: dict[str, Any]
    sidecar: Path | None
    input_name: str
    shapes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]

    def trtexec_line(self, onnx_path: Path) -> str:
        """The equivalent trtexec command (what the seed ran)."""
        fmt = ["x".join(str(d) for d in s) for s in self.shapes]
        name = self.input_name
        fp16 = " --fp16" if self.metadata.get("fp16") else ""
        return (f"trtexec --onnx={onnx_path} --minShapes={name}:{fmt[0]} --optShapes={name}:{fmt[1]} "
                f"--maxShapes={name}:{fmt[2]}{fp16} --saveEngine={self.path.with_suffix('.plan')}")


def _network_flags(trt: ModuleType) -> int:
    """TensorRT 10 networks are always explicit-batch (flag 0); older ones need EXPLICIT_BATCH."""
    major = int(str(getattr(trt, "__version__", "10")).split(".")[0])
    return 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def engine_metadata(info: ModelInfo, min_batch: int, opt_batch: int, max_batch: int, fp16: bool, onnx_path: Path, trt_version: str) -> dict[str, Any]:
    """Ultralytics-compatible keys (``batch`` stays an int) plus the profile under ``batch_profile``."""
    meta = info.meta
    assert meta is not None
    return {
        "description": f"TensorRT engine built by rs-detect {__version__} from {onnx_path.name}",
        "author": "rs-detect",
        "version": __version__,
        "tensorrt": trt_version,
        "task": meta.task,
        "stride": meta.stride,
        "imgsz": [meta.imgsz, meta.imgsz],
        "channels": meta.channels,
        "names": {i: n for i, n in enumerate(meta.names)},
        "batch": max_batch,
        "batch_profile": {"min": min_batch, "opt": opt_batch, "max": max_batch},
        "fp16": fp16,
        "end2end": meta.end2end,
        "args": {"dynamic": True, "batch": max_batch, "half": fp16},
    }


def write_engine_file(path: Path, plan: bytes | memoryview, meta: Mapping[str, Any]) -> Path | None:
    """``.engine``: header + plan in one file; anything else: the plain plan + ``<name>.json``.

    Returns the sidecar path when one was written. Both files are written atomically.
    """
    path = Path(path)
    blob = json.dumps(meta).encode("utf-8")
    with atomic_path(path, parents=True) as tmp, open(tmp, "wb") as fh:
        if path.suffix.lower() == ".engine":
            fh.write(len(blob).to_bytes(4, byteorder="little", signed=False))
            fh.write(blob)
        fh.write(plan)
    if path.suffix.lower() == ".engine":
        sidecar_path(path).unlink(missing_ok=True)  # a stale sidecar would override the header
        return None
    return atomic_write_text(sidecar_path(path), json.dumps(meta, indent=2))


def build_engine(
    onnx_path: Path,
    output: Path | None = None,
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 32,
    fp16: bool = False,
    workspace_gb: float | None = None,
) -> BuildResult:
    """Build a TensorRT engine with one optimization profile from a truly batch-dynamic ONNX."""
    onnx_path = Path(onnx_path)
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ConfigError(f"{onnx_path}: batch bounds must satisfy 1 <= min <= opt <= max, got {min_batch}/{opt_batch}/{max_batch}")
    if not onnx_path.is_file():
        raise ModelError(f"{onnx_path}: model file not found")
    if onnx_path.suffix.lower() != ".onnx":
        raise ModelError(f"{onnx_path}: build-engine takes an ONNX model")
    output = Path(output) if output else onnx_path.with_suffix(".engine")
    trt = import_tensorrt(str(onnx_path))  # fail before the slow check when TensorRT is missing
    info = inspect_onnx(onnx_path)
    if info.meta is None or info.meta_error:
        raise ModelError(info.meta_error or f"{onnx_path}: no usable model metadata")
    if not info.batch.dynamic:
        raise _not_dynamic(onnx_path, info)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ModelError(f"{onnx_path}: the TensorRT ONNX parser failed ({'; '.join(' '.join(e.split()) for e in errors[:3]) or 'no detail'})")
    if network.num_inputs != 1:
        raise ModelError(f"{onnx_path}: expected one image input, the parser found {network.num_inputs}")
    inp = network.get_input(0)
    meta = info.meta
    _, c, h, w = (int(d) for d in inp.shape)
    c, h, w = (c if c > 0 else meta.channels), (h if h > 0 else meta.imgsz), (w if w > 0 else meta.imgsz)
    shapes = ((min_batch, c, h, w), (opt_batch, c, h, w), (max_batch, c, h, w))
    config = builder.create_builder_config()
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, *shapes)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ModelError(f"{onnx_path}: TensorRT could not build the engine (see the TensorRT log above; try a larger --workspace)")
    meta_out = engine_metadata(info, min_batch, opt_batch, max_batch, fp16, onnx_path, str(getattr(trt, "__version__", "?")))
    side = write_engine_file(output, memoryview(plan), meta_out)
    return BuildResult(output, meta_out, side, inp.name, shapes)
