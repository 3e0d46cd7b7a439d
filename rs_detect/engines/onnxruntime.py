"""The ONNX backend: load with ONNX Runtime, inspect the graph, export from Ultralytics or plain torch.

* load - :class:`OnnxRuntimeEngine`, ONNX Runtime on the CPU (CUDA when onnxruntime-gpu is installed);
* inspect - :func:`inspect`: I/O from the graph, metadata, and the batch verdict from a run check
  (:func:`~rs_detect.engines.modelinfo.compare_batch_runs`) plus a graph scan
  (:mod:`rs_detect.engines.onnx_graph`);
* export - Ultralytics weights with ``dynamic=True`` (:func:`ultralytics_args`, used by
  ``rs-detect export``), or any ``torch.nn.Module`` with :func:`export_torch_module_onnx`::

      torch.onnx.export(model, torch.zeros(1, C, S, S), "model.onnx", dynamo=False, opset_version=17,
                        input_names=["images"], output_names=["output0"],
                        dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}})

  plus the metadata keys Ultralytics writes (``names`` as a dict literal, ``imgsz``, ``stride``,
  ``task``, ``batch``, ``channels``), so every backend reads the model the same way.

Every ONNX Runtime session of rs-detect is made by :func:`session`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rs_detect import __version__
from rs_detect.dtypes import model_input_dtype
from rs_detect.engines import metadata, onnx_graph
from rs_detect.engines.base import Engine
from rs_detect.engines.modelinfo import (
    FIX,
    SMALL_SPATIAL,
    BatchCheck,
    ModelInfo,
    RunCheck,
    Runner,
    TensorInfo,
    compare_batch_runs,
    runtime_error_line,
)
from rs_detect.errors import ModelError, RsDetectError
from rs_detect.fsutil import atomic_path
from rs_detect.postprocess.decode import check_output_shape
from rs_detect.types import ModelMeta

log = logging.getLogger(__name__)

FORMAT = "onnx"
EXPORT_SUFFIX = ".onnx"
DEFAULT_DYNAMIC_MAX = 32


def session(path: Path, device: str = "cpu", threads: int | None = None, log_level: int = 3) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``path``: CPU, or CUDA first when ``device`` is cuda.

    ``threads`` sets the intra-op pool (None: ONNX Runtime's default). A file ONNX Runtime cannot
    load is a :class:`ModelError`; asking for CUDA without onnxruntime-gpu too.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = log_level
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ModelError(f"{path}: --device cuda needs onnxruntime-gpu (installed onnxruntime has only {ort.get_available_providers()})")
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped Fail/InvalidProtobuf errors
        raise ModelError(f"{path}: not a loadable ONNX model ({runtime_error_line(exc, 200)})") from None


# -- load -----------------------------------------------------------------------------------------------


def check_input_dims(meta: ModelMeta, dims: list[Any], where: str) -> ModelMeta:
    """Check [N, C, H, W] input dims against the metadata; return the meta with its batch bounds."""
    if len(dims) != 4:
        raise ModelError(f"{where}: input has {len(dims)} dims, expected [batch, channels, height, width]")
    n, c, h, w = dims
    if isinstance(c, int) and c != meta.channels:
        raise ModelError(f"{where}: the model input has {c} channel(s) but its metadata/YAML says {meta.channels}")
    for d, label in ((h, "height"), (w, "width")):
        if isinstance(d, int) and d != meta.imgsz:
            raise ModelError(f"{where}: the model input {label} is {d} but its metadata/YAML says imgsz {meta.imgsz}")
    if isinstance(n, int) and n > 0:
        return meta.with_batch(n, n, n, dynamic=False)
    hi = meta.max_batch if meta.max_batch > 1 else DEFAULT_DYNAMIC_MAX
    return meta.with_batch(meta.min_batch, min(meta.opt_batch, hi), hi, dynamic=True)


class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"

    def __init__(self, path: Path, device: str = "cpu", model_yaml: Mapping[str, Any] | Path | None = None, threads: int | None = None) -> None:
        if not path.is_file():
            raise ModelError(f"{path}: model file not found")
        self.session = session(path, device, threads or (os.cpu_count() or 1))
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise ModelError(f"{path}: expected one image input and at least one output, got {len(inputs)} input(s)")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self._dtype = model_input_dtype(inputs[0].type)
        file_meta = self.session.get_modelmeta().custom_metadata_map
        meta = metadata.resolve(path, file_meta, model_yaml)
        meta = check_input_dims(meta, list(inputs[0].shape), str(path))
        out_dims = list(outputs[0].shape)
        if len(out_dims) == 3 and all(isinstance(d, int) for d in out_dims[1:]):
            check_output_shape((1, *out_dims[1:]), meta, str(path))
        super().__init__(meta, torch.device("cpu"))

    @property
    def input_dtype(self) -> np.dtype:
        return self._dtype

    def _infer(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            images = images.cpu().numpy()
        images = np.ascontiguousarray(images, dtype=self._dtype)
        out = self.session.run([self.output_name], {self.input_name: images})[0]
        return torch.from_numpy(out)

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


def load(path: Path, device: str = "cpu", model_yaml: Mapping[str, Any] | Path | None = None, **kwargs: Any) -> OnnxRuntimeEngine:
    return OnnxRuntimeEngine(path, device=device, model_yaml=model_yaml, **kwargs)


# -- inspect ---------------------------------------------------------------------------------------------


def session_runner(path: Path) -> tuple[Runner, Any]:
    """A quiet CPU session as a ``Runner`` (all outputs), and the session: failures are the check's answer."""
    import onnxruntime as ort

    sess = session(path, log_level=4)
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4
    name = sess.get_inputs()[0].name

    def run(images: np.ndarray) -> list[np.ndarray]:
        return list(sess.run(None, {name: images}, quiet))

    return run, sess


def check_onnx_batch(path: Path, model: Any | None = None, imgsz: int | None = None, channels: int | None = None, run: bool = True) -> BatchCheck:
    """The batch verdict for an ONNX file (see the module docstring for what counts as evidence)."""
    import onnx

    model = model if model is not None else onnx.load(str(path), load_external_data=False)
    inputs = onnx_graph.graph_inputs(model)
    if len(inputs) != 1:
        raise ModelError(f"{path}: expected one image input, found {len(inputs)}")
    dims = onnx_graph.dims(inputs[0])
    if len(dims) != 4:
        raise ModelError(f"{path}: input {inputs[0].name} has {len(dims)} dims, expected [batch, channels, height, width]")
    baked = tuple(onnx_graph.scan_baked_batch(model))
    lead = dims[0]
    if isinstance(lead, int) and lead > 0:
        return BatchCheck(
            dynamic=False,
            verdict=f"static batch {lead}: the model runs only with batch {lead} (usable, but not for dynamic batching)",
            declared_dynamic=False,
            fixed_batch=lead,
            min_batch=lead, opt_batch=lead, max_batch=lead,
            baked=baked,
            fix=FIX,
        )
    n_ch = dims[1] if isinstance(dims[1], int) else (channels or 1)
    size = imgsz or (dims[2] if isinstance(dims[2], int) else 640)
    result = _run_onnx_check(path, dims, n_ch, size, onnx_graph.onnx_dtype(inputs[0])) if run else None
    notes: list[str] = []
    if result is not None and result.spatial != size:
        notes.append(f"the run used {result.spatial}x{result.spatial} px instead of {size} because the model's height/width are dynamic (the batch logic does not depend on it)")
    if result is not None and result.ok:
        if baked:
            notes.append("the run passed although the scan found batch-fixing nodes: check them before relying on other batch sizes")
        return BatchCheck(True, "dynamic batch: usable with any batch size", True, run=result, baked=baked, notes=tuple(notes))
    if result is None and not baked:
        return BatchCheck(True, "dynamic batch (by the graph scan only; not run)", True, notes=tuple(notes))
    fixed = onnx_graph.export_batch(baked, model)
    what = f"static batch {fixed}" if fixed else "not dynamic"
    verdict = f"{what}: the input/output dims say '{lead}' but the graph is not batch-dynamic (dims edited after a static export?)"
    return BatchCheck(False, verdict, True, fixed_batch=fixed, run=result, baked=baked, notes=tuple(notes), fix=FIX)


def _run_onnx_check(path: Path, dims: tuple[int | str, ...], channels: int, imgsz: int, dtype: str) -> RunCheck:
    """The run check at a small size when height/width are dynamic (falling back to imgsz)."""
    runner, _ = session_runner(path)
    np_dtype = model_input_dtype(dtype)
    spatial_dynamic = not isinstance(dims[2], int) and not isinstance(dims[3], int)
    if spatial_dynamic and imgsz > SMALL_SPATIAL:
        small = compare_batch_runs(runner, channels, SMALL_SPATIAL, np_dtype)
        if small.failed_batch != 1:
            return small
    return compare_batch_runs(runner, channels, imgsz, np_dtype)


def inspect(path: Path, model_yaml: Mapping[str, Any] | Path | None = None, run: bool = True) -> ModelInfo:
    """I/O, metadata (problems reported, not raised) and the batch verdict of an ONNX file."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"{path}: not an ONNX model ({runtime_error_line(exc, 200)})") from None
    inputs = tuple(TensorInfo(i.name, onnx_graph.dims(i), onnx_graph.onnx_dtype(i)) for i in onnx_graph.graph_inputs(model))
    outputs = tuple(TensorInfo(o.name, onnx_graph.dims(o), onnx_graph.onnx_dtype(o)) for o in model.graph.output)
    raw = {p.key: p.value for p in model.metadata_props}
    meta, error = None, None
    try:
        meta = metadata.resolve(path, raw, model_yaml)
        if inputs:
            meta = check_input_dims(meta, list(inputs[0].shape), str(path))
        outs = outputs[0].shape if outputs else ()
        if len(outs) == 3 and all(isinstance(d, int) for d in outs[1:]):
            check_output_shape((1, *outs[1:]), meta, str(path))  # type: ignore[arg-type]
    except RsDetectError as exc:
        error = str(exc)
    batch = check_onnx_batch(path, model, imgsz=meta.imgsz if meta else None, channels=meta.channels if meta else None, run=run)
    return ModelInfo(path, FORMAT, inputs, outputs, batch, meta, error, raw)


# -- export ----------------------------------------------------------------------------------------------


def ultralytics_args(opset: int = 17, half: bool = False) -> dict[str, Any]:
    """``YOLO.export`` arguments for ONNX. The one flag the seed's author lost days to is ``dynamic=True``:
    without it the export batch is baked into internal Reshape nodes and no later edit of the
    input/output dims can undo that. ``simplify`` needs onnxslim; without it the export goes ahead
    unsimplified (TensorRT and ONNX Runtime optimise the graph themselves) and says so."""
    from rs_detect.engines.ultralytics import precision_args

    args: dict[str, Any] = {"dynamic": True, "opset": opset, "simplify": importlib.util.find_spec("onnxslim") is not None}
    if not args["simplify"]:
        log.warning("onnxslim is not installed: exporting without simplify (pip install onnxslim to simplify)")
    return {**args, **precision_args(half)}


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
