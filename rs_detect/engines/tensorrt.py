"""TensorRT 10+ backend: named I/O tensors, one execution context, device buffers allocated once.

What the seed's example did per batch (deserialize the plan, allocate buffers, look the tensors up
by index) happens here once per engine:

* the plan is read once: a plain plan as ``trtexec --saveEngine`` writes it, or an Ultralytics-style
  ``.engine`` (4-byte little-endian length + JSON metadata + plan); a sidecar ``<plan>.json`` (what
  ``rs-detect build-engine -o X.plan`` writes, so trtexec can still load the plan) is read too;
* I/O tensors are found by name and mode (``get_tensor_mode``), never by index;
* the batch bounds come from the input's optimization profile (``get_tensor_profile_shape``), a
  static engine gets its fixed batch; :meth:`Engine.infer` splits and pads to them;
* device buffers are allocated for the profile's max batch and bound with ``set_tensor_address``
  once; each batch only calls ``set_input_shape`` (when the size changes), copies in,
  ``execute_async_v3`` on one stream, and copies out.

Device memory: torch CUDA tensors when torch sees a GPU (the output then stays on the GPU, so decode
and NMS run there too); otherwise pycuda, as in the seed, with pinned host buffers and async copies
on one stream. Metadata precedence: engine dims < header < sidecar JSON < model YAML.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from rs_detect.dtypes import torch_dtype
from rs_detect.engines import metadata
from rs_detect.engines.base import Engine
from rs_detect.errors import EngineUnavailableError, ModelError, RsDetectError, one_line
from rs_detect.types import ModelMeta

log = logging.getLogger(__name__)

HEADER_LEN_BYTES = 4


def import_tensorrt(where: str = "TensorRT") -> ModuleType:
    """``import tensorrt``, or a one-line error naming the package to install."""
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineUnavailableError(
            f"{where}: TensorRT is not installed here: pip install tensorrt (TensorRT 10+, needs an NVIDIA GPU and driver)"
        ) from None
    return trt


# -- the file: plan, header, sidecar --------------------------------------------------------------------


def sidecar_path(path: Path) -> Path:
    """``model.plan`` -> ``model.plan.json``: metadata beside a plain plan."""
    return path.with_name(path.name + ".json")


@dataclass(frozen=True)
class EngineFile:
    """A plan's bytes and the metadata found around it."""

    plan: bytes
    metadata: dict[str, Any]
    header: bool
    sidecar: Path | None


def split_header(data: bytes) -> tuple[int, dict[str, Any]]:
    """Ultralytics header: 4-byte little-endian length, then that much JSON. ``(0, {})`` when absent."""
    if len(data) < HEADER_LEN_BYTES:
        return 0, {}
    n = int.from_bytes(data[:HEADER_LEN_BYTES], byteorder="little", signed=False)
    if 0 < n <= len(data) - HEADER_LEN_BYTES:
        try:
            meta = json.loads(data[HEADER_LEN_BYTES : HEADER_LEN_BYTES + n])
        except (ValueError, UnicodeDecodeError):
            return 0, {}  # plan bytes are not JSON: no header
        if isinstance(meta, dict):
            return HEADER_LEN_BYTES + n, meta
    return 0, {}


def read_engine_file(path: Path) -> EngineFile:
    """The plan bytes (header skipped) and its metadata: header, then sidecar JSON on top."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the engine ({exc.strerror})") from None
    offset, meta = split_header(data)
    side = sidecar_path(path)
    found = None
    if side.is_file():
        try:
            extra = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{side}: not a JSON metadata sidecar ({one_line(exc)})") from None
        if not isinstance(extra, dict):
            raise ModelError(f"{side}: a metadata sidecar must be a JSON object")
        meta = {**meta, **extra}
        found = side
    return EngineFile(data[offset:], meta, offset > 0, found)


# -- I/O description ------------------------------------------------------------------------------------


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
        from rs_detect.postprocess.decode import check_output_shape

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


# -- device memory --------------------------------------------------------------------------------------


class TorchBuffers:
    """Buffers as torch tensors on one device, one stream; the output stays on that device.

    Used with CUDA tensors in production; the tests run the same code with CPU tensors (stream 0)
    against the fake TensorRT, which reads the raw addresses.
    """

    def __init__(self, device: torch.device, specs: Mapping[str, tuple[Shape, np.dtype]]) -> None:
        self.device = device
        self.tensors = {name: torch.empty(shape, dtype=torch_dtype(dtype), device=device) for name, (shape, dtype) in specs.items()}
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def handle(self) -> int:
        return int(self.stream.cuda_stream) if self.stream is not None else 0

    def address(self, name: str) -> int:
        return int(self.tensors[name].data_ptr())

    def _on_stream(self) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def upload(self, name: str, images: np.ndarray | torch.Tensor) -> None:
        dst = self.tensors[name]
        src = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
        if self.stream is not None and src.device.type == "cuda":
            self.stream.wait_stream(torch.cuda.current_stream(src.device))  # src may still be being written
        with self._on_stream():
            dst[: src.shape[0]].copy_(src.to(dst.dtype), non_blocking=True)

    def download(self, name: str, shape: Shape) -> torch.Tensor:
        count = int(np.prod(shape))
        with self._on_stream():
            out = self.tensors[name].view(-1)[:count].view(shape).to(torch.float32, copy=True)
        if self.stream is not None:
            # no host sync: whoever uses ``out`` on the caller's stream waits for this stream, so the
            # next batch can be queued while this one is decoded (the copy above is ordered before it)
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            out.record_stream(current)
        return out

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def close(self) -> None:
        self.tensors.clear()


class PycudaBuffers:
    """The seed's memory scheme, done once: pinned host buffers, device allocations, one stream."""

    def __init__(self, specs: Mapping[str, tuple[Shape, np.dtype]]) -> None:
        cuda = _import_pycuda()
        self.cuda = cuda
        self.host = {name: cuda.pagelocked_empty(int(np.prod(shape)), dtype) for name, (shape, dtype) in specs.items()}
        self.dev = {name: cuda.mem_alloc(int(self.host[name].nbytes)) for name in specs}
        self.stream = cuda.Stream()
        self.device = torch.device("cpu")

    @property
    def handle(self) -> int:
        return int(self.stream.handle)

    def address(self, name: str) -> int:
        return int(self.dev[name])

    def upload(self, name: str, images: np.ndarray | torch.Tensor) -> None:
        arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else images
        host = self.host[name][: arr.size]
        host.reshape(arr.shape)[...] = arr  # converts to the engine dtype into pinned memory
        self.cuda.memcpy_htod_async(self.dev[name], host, self.stream)

    def download(self, name: str, shape: Shape) -> torch.Tensor:
        host = self.host[name][: int(np.prod(shape))]
        self.cuda.memcpy_dtoh_async(host, self.dev[name], self.stream)
        self.stream.synchronize()
        return torch.from_numpy(host.reshape(shape).astype(np.float32, copy=True))

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        for alloc in self.dev.values():
            alloc.free()
        self.dev.clear()
        self.host.clear()


def _import_pycuda() -> ModuleType:
    try:
        import pycuda.autoinit  # noqa: F401 - creates the CUDA context TensorRT runs in
        import pycuda.driver as cuda
    except ImportError:
        raise EngineUnavailableError(
            "TensorRT needs device memory: install PyTorch with CUDA support, or pycuda (pip install pycuda)"
        ) from None
    except Exception as exc:  # pycuda's own LogicError/RuntimeError when no GPU or driver answers
        raise EngineUnavailableError(f"TensorRT needs a CUDA GPU: pycuda could not start ({one_line(exc)})") from None
    return cuda


def cuda_torch_device(device: str) -> torch.device | None:
    """The torch CUDA device to run on, or None when torch sees no GPU (then pycuda is used)."""
    if not torch.cuda.is_available():
        return None
    if device.startswith("cuda:"):
        return torch.device(device)
    return torch.device("cuda", torch.cuda.current_device())


@contextlib.contextmanager
def _on_device(device: torch.device | None) -> Iterator[None]:
    if device is not None and device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


# -- the engine -------------------------------------------------------------------------------------------


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
            _import_pycuda()  # its context must exist before TensorRT deserializes
        self._logger = trt.Logger(trt.Logger.WARNING)
        with _on_device(torch_device):
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
        with _on_device(self._torch_device):
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
