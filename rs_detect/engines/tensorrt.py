"""The TensorRT 10+ backend: load a plan, inspect it, build one from a batch-dynamic ONNX.

* load - :class:`TensorRTEngine`. What the seed's example did per batch (deserialize the plan,
  allocate buffers, look the tensors up by index) happens here once per engine: the plan is read
  once (:mod:`~rs_detect.engines.tensorrt_plan`: plain plan, Ultralytics header, sidecar JSON); I/O
  tensors are found by name and mode (``get_tensor_mode``), never by index; the batch bounds come
  from the input's optimization profile (``get_tensor_profile_shape``), a static engine gets its
  fixed batch and :meth:`Engine.infer` splits and pads to them; device buffers
  (:mod:`~rs_detect.engines.tensorrt_memory`) are allocated for the profile's max batch and bound
  with ``set_tensor_address`` once; each batch only calls ``set_input_shape`` (when the size
  changes), copies in, ``execute_async_v3`` on one stream, and copies out.
* inspect - :func:`inspect`: I/O, profile and metadata without buffers or execution.
* build - :func:`build_engine`: the TensorRT builder + ONNX parser with one optimization profile, the
  Python equivalent of ``trtexec --onnx=M.onnx --minShapes=images:1x1x1024x1024
  --optShapes=images:8x1x1024x1024 --maxShapes=images:32x1x1024x1024 --saveEngine=M.plan``. A
  ``.engine`` output gets an Ultralytics-style header, which Ultralytics reads too; any other suffix
  (``.plan``) stays a plain plan that trtexec can load, with the metadata in ``<name>.json``.

Metadata precedence: engine dims < header < sidecar JSON < model YAML. TensorRT is imported only
when a plan is loaded, inspected or built.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from rs_detect.engines import metadata
from rs_detect.engines.base import Engine
from rs_detect.engines.modelinfo import BatchCheck, ModelInfo, TensorInfo, require_dynamic
from rs_detect.engines.tensorrt_memory import PycudaBuffers, TorchBuffers, cuda_torch_device, import_pycuda, on_device
from rs_detect.engines.tensorrt_plan import EngineFile, engine_metadata, read_engine_file, write_engine_file
from rs_detect.errors import ConfigError, EngineUnavailableError, ModelError, RsDetectError, one_line
from rs_detect.postprocess.decode import check_output_shape
from rs_detect.types import ModelMeta

log = logging.getLogger(__name__)

FORMAT = "tensorrt"


def import_tensorrt(where: str = "TensorRT") -> ModuleType:
    """``import tensorrt``, or a one-line error naming the package to install."""
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineUnavailableError(
            f"{where}: TensorRT is not installed here: pip install tensorrt (TensorRT 10+, needs an NVIDIA GPU and driver)"
        ) from None
    return trt


# -- I/O description ----------------------------------------------------------------------------------------


Shape = tuple[int, ...]


@dataclass(frozen=True)
class IOTensor:
    """One engine I/O tensor, found by name and mode. ``-1`` marks a dynamic dim."""

    name: str
    is_input: bool
    shape: Shape
    dtype: np.dtype
    profile: tuple[Shape, Shape, Shape] | None = None  # (min, opt, max) of profile 0, dynamic inputs only

    @property
    def dynamic(self) -> bool:
        return any(d < 0 for d in self.shape)


def engine_io(engine: Any, trt: ModuleType, profile: int = 0) -> list[IOTensor]:
    """Every I/O tensor of a deserialized engine (TensorRT 10 named-tensor API)."""
    tensors = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        shape = tuple(int(d) for d in engine.get_tensor_shape(name))
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
        prof = None
        if is_input and any(d < 0 for d in shape):
            lo, opt, hi = engine.get_tensor_profile_shape(name, profile)
            prof = (tuple(int(d) for d in lo), tuple(int(d) for d in opt), tuple(int(d) for d in hi))
        tensors.append(IOTensor(name, is_input, shape, dtype, prof))
    return tensors


def pick_output(outputs: list[IOTensor], where: str) -> IOTensor:
    """The raw YOLO output: the only output, else ``output0``, else the first of rank 3."""
    if not outputs:
        raise ModelError(f"{where}: the engine has no output tensor")
    if len(outputs) == 1:
        return outputs[0]
    for t in outputs:
        if t.name == "output0":
            return t
    for t in outputs:
        if len(t.shape) == 3:
            return t
    raise ModelError(f"{where}: none of the outputs {[t.name for t in outputs]} is a [batch, channels, anchors] tensor")


def batch_bounds(inp: IOTensor) -> tuple[int, int, int, bool]:
    """(min, opt, max, dynamic) of the input's batch dim: the profile's, or the fixed batch."""
    if inp.shape[0] > 0:
        n = inp.shape[0]
        return n, n, n, False
    assert inp.profile is not None  # engine_io fills it for every dynamic input
    lo, opt, hi = (s[0] for s in inp.profile)
    return lo, opt, hi, True


def resolve_engine_meta(path: Path, file: EngineFile, inp: IOTensor, out: IOTensor, model_yaml: Mapping[str, Any] | Path | None) -> ModelMeta:
    """Engine dims < header < sidecar < model YAML; then checked against the engine's real dims."""
    where = str(path)
    if len(inp.shape) != 4:
        raise ModelError(f"{where}: input {inp.name} has shape {list(inp.shape)}, expected [batch, channels, height, width]")
    _, c, h, w = inp.shape
    derived: dict[str, Any] = {}
    if c > 0:
        derived["channels"] = c
    if h > 0 and h == w:
        derived["imgsz"] = h
    meta = metadata.resolve(path, {**derived, **file.metadata}, model_yaml)
    if c > 0 and c != meta.channels:
        raise ModelError(f"{where}: the engine input has {c} channel(s) but its metadata/YAML says {meta.channels}")
    for d, label, k in ((h, "height", 2), (w, "width", 3)):
        if d > 0 and d != meta.imgsz:
            raise ModelError(f"{where}: the engine input {label} is {d} but its metadata/YAML says imgsz {meta.imgsz}")
        if d < 0 and inp.profile and not inp.profile[0][k] <= meta.imgsz <= inp.profile[2][k]:
            raise ModelError(f"{where}: imgsz {meta.imgsz} is outside the engine's {label} profile {inp.profile[0][k]}..{inp.profile[2][k]}")
    lo, opt, hi, dynamic = batch_bounds(inp)
    if dynamic and metadata.yaml_sets_batch(path, model_yaml):
        if not lo <= meta.min_batch <= meta.max_batch <= hi:
            raise ModelError(f"{where}: model YAML batch {meta.min_batch}..{meta.max_batch} is outside the engine profile {lo}..{hi}")
        lo, opt, hi = meta.min_batch, max(meta.min_batch, min(meta.opt_batch, meta.max_batch)), meta.max_batch
    meta = meta.with_batch(lo, opt, hi, dynamic=dynamic and hi > lo)
    if len(out.shape) == 3 and out.shape[1] > 0 and out.shape[2] > 0:
        check_output_shape((1, out.shape[1], out.shape[2]), meta, where)
    return meta


@dataclass
class EngineDescription:
    """What ``rs-detect inspect`` shows for an engine (no buffers, no execution)."""

    io: list[IOTensor]
    meta: ModelMeta | None
    meta_error: str | None
    metadata: dict[str, Any]
    batch_bounds: tuple[int, int, int]
    dynamic: bool
    notes: list[str] = field(default_factory=list)


def describe_engine_file(path: Path, model_yaml: Mapping[str, Any] | Path | None = None) -> EngineDescription:
    trt = import_tensorrt(str(path))
    file = read_engine_file(path)
    _runtime, engine = _deserialize(trt, trt.Logger(trt.Logger.WARNING), file.plan, path)
    io = engine_io(engine, trt)
    inputs = [t for t in io if t.is_input]
    if len(inputs) != 1:
        raise ModelError(f"{path}: expected one image input, found {len(inputs)}")
    lo, opt, hi, dynamic = batch_bounds(inputs[0])
    notes = []
    if file.header:
        notes.append("metadata from the Ultralytics-style header")
    if file.sidecar:
        notes.append(f"metadata from {file.sidecar.name}")
    if not file.metadata:
        notes.append("a plain plan without metadata: names/task come from a model YAML or the DOTA defaults")
    meta, error = None, None
    try:
        meta = resolve_engine_meta(path, file, inputs[0], pick_output([t for t in io if not t.is_input], str(path)), model_yaml)
    except RsDetectError as exc:
        error = str(exc)
    return EngineDescription(io, meta, error, file.metadata, (lo, opt, hi), dynamic, notes)


def _deserialize(trt: ModuleType, logger: Any, plan: bytes, path: Path) -> tuple[Any, Any]:
    """(runtime, engine): the caller keeps the runtime, which must outlive its engine."""
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise ModelError(f"{path}: TensorRT could not deserialize the plan (built by another TensorRT version or for another GPU?)")
    return runtime, engine


# -- load ---------------------------------------------------------------------------------------------------


class TensorRTEngine(Engine):
    """A TensorRT 10+ plan, loaded once, run batch after batch with the same buffers."""

    backend = "tensorrt"

    def __init__(self, path: Path, device: str = "cuda", model_yaml: Mapping[str, Any] | Path | None = None) -> None:
        path = Path(path)
        trt = import_tensorrt(str(path))
        if not device.startswith("cuda"):
            log.info("%s: a TensorRT engine runs on the GPU; using cuda instead of %s", path.name, device)
            device = "cuda"
        self.path = path
        file = read_engine_file(path)
        torch_device = cuda_torch_device(device)
        if torch_device is None and device not in ("cuda", "cuda:0"):
            raise EngineUnavailableError(f"{path}: {device} needs PyTorch with CUDA support (the pycuda fallback uses cuda:0 only)")
        if torch_device is None:
            import_pycuda()  # its context must exist before TensorRT deserializes
        self._logger = trt.Logger(trt.Logger.WARNING)
        with on_device(torch_device):
            self._runtime, self._engine = _deserialize(trt, self._logger, file.plan, path)
            io = engine_io(self._engine, trt)
            inputs = [t for t in io if t.is_input]
            if len(inputs) != 1:
                raise ModelError(f"{path}: expected one image input, found {len(inputs)} ({[t.name for t in inputs]})")
            self._input = inputs[0]
            outputs = [t for t in io if not t.is_input]
            self._output = pick_output(outputs, str(path))
            meta = resolve_engine_meta(path, file, self._input, self._output, model_yaml)
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise ModelError(f"{path}: TensorRT could not create an execution context (out of GPU memory?)")
            self._max_shape: Shape = (meta.max_batch, meta.channels, meta.imgsz, meta.imgsz)
            self._bound: Shape | None = None
            self._set_shape(self._max_shape)
            specs = {self._input.name: (self._max_shape, self._input.dtype)}
            for t in outputs:
                shape = tuple(int(d) for d in self._context.get_tensor_shape(t.name))
                if any(d < 0 for d in shape):
                    raise ModelError(f"{path}: output {t.name} has no concrete shape ({list(shape)}) at the max input shape")
                specs[t.name] = (shape, t.dtype)
            self._buffers: TorchBuffers | PycudaBuffers = TorchBuffers(torch_device, specs) if torch_device is not None else PycudaBuffers(specs)
            for name in specs:
                if not self._context.set_tensor_address(name, self._buffers.address(name)):
                    raise ModelError(f"{path}: TensorRT refused the buffer address for {name}")
        super().__init__(meta, self._buffers.device)
        self._torch_device = torch_device

    @property
    def input_dtype(self) -> np.dtype:
        """The engine's input dtype: the pipeline reads tiles straight into it (fp16 engines too)."""
        return self._input.dtype if self._input.dtype in (np.float16, np.float32) else np.dtype(np.float32)

    def _set_shape(self, shape: Shape) -> None:
        if shape == self._bound:
            return
        if self._input.dynamic and not self._context.set_input_shape(self._input.name, shape):
            lo, _, hi, _ = batch_bounds(self._input)
            raise ModelError(f"{self.path}: TensorRT refused input shape {list(shape)} (profile batch {lo}..{hi}, imgsz {self._max_shape[2]})")
        self._bound = shape

    def _infer(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        shape = (int(images.shape[0]), *self._max_shape[1:])
        if tuple(images.shape) != shape:
            raise ModelError(f"{self.path}: got images {list(images.shape)}, the engine takes [N, {', '.join(str(d) for d in shape[1:])}]")
        with on_device(self._torch_device):
            self._set_shape(shape)
            self._buffers.upload(self._input.name, images)
            if not self._context.execute_async_v3(self._buffers.handle):
                raise ModelError(f"{self.path}: TensorRT execution failed for a batch of {shape[0]}")
            out_shape = tuple(int(d) for d in self._context.get_tensor_shape(self._output.name))
            return self._buffers.download(self._output.name, out_shape)

    def close(self) -> None:
        buffers = getattr(self, "_buffers", None)
        if buffers is not None:
            buffers.synchronize()
            buffers.close()
        self._context = None
        self._engine = None
        self._runtime = None


def load(path: Path, device: str = "cuda", model_yaml: Mapping[str, Any] | Path | None = None, **kwargs: Any) -> TensorRTEngine:
    return TensorRTEngine(path, device=device, model_yaml=model_yaml, **kwargs)


# -- inspect ------------------------------------------------------------------------------------------------


def inspect(path: Path, model_yaml: Mapping[str, Any] | Path | None = None, run: bool = True) -> ModelInfo:
    """I/O and profile from the TensorRT API, metadata from header/sidecar (``run`` is unused: the profile is the evidence)."""
    desc = describe_engine_file(path, model_yaml)
    inputs = tuple(TensorInfo(t.name, t.shape, str(t.dtype)) for t in desc.io if t.is_input)
    outputs = tuple(TensorInfo(t.name, t.shape, str(t.dtype)) for t in desc.io if not t.is_input)
    lo, opt, hi = desc.batch_bounds
    if desc.dynamic and hi > lo:
        verdict = f"dynamic batch: the optimization profile allows batch {lo} to {hi} (opt {opt})"
        batch = BatchCheck(True, verdict, True, min_batch=lo, opt_batch=opt, max_batch=hi)
    else:
        verdict = f"static batch {hi}: the engine runs only with batch {hi}"
        batch = BatchCheck(False, verdict, desc.dynamic, fixed_batch=hi, min_batch=lo, opt_batch=opt, max_batch=hi,
                           fix="rebuild from a dynamic-batch ONNX: rs-detect build-engine MODEL.onnx --min-batch 1 --opt-batch 8 --max-batch 32")
    batch = replace(batch, notes=tuple(desc.notes))
    return ModelInfo(path, FORMAT, inputs, outputs, batch, desc.meta, desc.meta_error, desc.metadata)


# -- build --------------------------------------------------------------------------------------------------


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
    from rs_detect.engines import onnxruntime

    info = onnxruntime.inspect(onnx_path)
    if info.meta is None or info.meta_error:
        raise ModelError(info.meta_error or f"{onnx_path}: no usable model metadata")
    require_dynamic(info)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ModelError(f"{onnx_path}: the TensorRT ONNX parser failed ({'; '.join(one_line(e) for e in errors[:3]) or 'no detail'})")
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
    meta_out = engine_metadata(meta, min_batch, opt_batch, max_batch, fp16, onnx_path, str(getattr(trt, "__version__", "?")))
    side = write_engine_file(output, memoryview(plan), meta_out)
    return BuildResult(output, meta_out, side, inp.name, shapes)
