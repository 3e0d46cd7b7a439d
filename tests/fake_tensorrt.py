"""A fake of the TensorRT 10 Python API (and of pycuda) for machines without libnvinfer.

TensorRT cannot be installed in our dev/CI environment, so the TensorRT backend and ``build-engine``
are tested against this stand-in. It mirrors the real signatures and return conventions the code
relies on (``set_input_shape`` -> bool, ``execute_async_v3(stream_handle)`` -> bool,
``build_serialized_network`` -> IHostMemory or None, ``get_tensor_profile_shape`` -> (min, opt, max),
named I/O tensors) and it really computes: a fake *plan* is a small JSON description (tensor names,
dtypes, shapes, the optimization profile) with the ONNX model embedded, and the fake execution
context runs that ONNX with onnxruntime on the bytes at the bound *device addresses*:

* fake pycuda allocations (numpy byte arrays keyed by fake integer addresses);
* or real host pointers (``torch`` CPU tensors' ``data_ptr()``) through ctypes, which lets the tests
  drive the torch-buffer code path without a GPU;
* or, where a GPU and cupy exist, real CUDA device pointers (copied through cupy).

Everything is recorded in :data:`STATE` so tests can assert what the code did: shapes set per batch,
addresses bound, allocations made, stream handles used, builder flags and profiles.

Also here: :class:`MiniYolo`, a tiny YOLOv8-shaped conv net whose head reshapes with ``x.shape[0]``
(exported statically, that becomes a literal batch in Reshape nodes: the seed's trap), and helpers
that export it dynamic, static, or static with the I/O dims edited to ``batch``.
"""

from __future__ import annotations

import base64
import ctypes
import enum
import importlib.machinery
import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

PLAN_MAGIC = b"FAKETRT1"


# -- recorded state ---------------------------------------------------------------------------------


@dataclass
class FakeState:
    """What the code under test did to the fake runtime."""

    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    memory: dict[int, np.ndarray] = field(default_factory=dict)  # fake device allocations
    next_address: int = 0x10_0000
    deserialized: int = 0
    contexts: int = 0
    builds: list[dict[str, Any]] = field(default_factory=list)
    parsed: list[dict[str, Any]] = field(default_factory=list)
    networks: list[Any] = field(default_factory=list)

    def record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.calls if n == name)

    def args(self, name: str) -> list[tuple[Any, ...]]:
        return [a for n, a in self.calls if n == name]


STATE = FakeState()


def _read(address: int, nbytes: int, stream: int = 0) -> np.ndarray:
    """Copy ``nbytes`` at a fake, host or CUDA address into a numpy byte array."""
    for base, buf in STATE.memory.items():
        if base <= address < base + buf.size:
            off = address - base
            if off + nbytes > buf.size:
                raise RuntimeError(f"fake device read of {nbytes} bytes overruns an allocation of {buf.size}")
            return buf[off : off + nbytes].copy()
    if _is_cuda_pointer(address):
        import cupy

        cupy.cuda.runtime.streamSynchronize(stream)
        host = np.empty(nbytes, np.uint8)
        cupy.cuda.runtime.memcpy(host.ctypes.data, address, nbytes, cupy.cuda.runtime.memcpyDeviceToHost)
        return host
    return np.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=np.uint8).copy()


def _write(address: int, data: np.ndarray) -> None:
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    for base, buf in STATE.memory.items():
        if base <= address < base + buf.size:
            off = address - base
            if off + raw.size > buf.size:
                raise RuntimeError(f"fake device write of {raw.size} bytes overruns an allocation of {buf.size}")
            buf[off : off + raw.size] = raw
            return
    if _is_cuda_pointer(address):
        import cupy

        cupy.cuda.runtime.memcpy(address, raw.ctypes.data, raw.size, cupy.cuda.runtime.memcpyHostToDevice)
        cupy.cuda.runtime.deviceSynchronize()  # a pageable H2D copy may still be in flight when memcpy returns
        return
    ctypes.memmove(address, raw.ctypes.data, raw.size)


def _is_cuda_pointer(address: int) -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import cupy

        attrs = cupy.cuda.runtime.pointerGetAttributes(address)
    except Exception:  # no cupy, or not a pointer CUDA knows
        return False
    kind = getattr(attrs, "type", getattr(attrs, "memoryType", None))  # the field's name changed across CuPy versions
    if kind is not None:
        return int(kind) == 2  # cudaMemoryTypeDevice
    return bool(attrs.devicePointer) and not attrs.hostPointer


# -- tensorrt: enums, dims, dtypes ---------------------------------------------------------------------


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    INT64 = 8


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
       DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64}
_FROM_ONNX = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32, 9: DataType.BOOL, 2: DataType.UINT8, 7: DataType.INT64}


def nptype(trt_type: DataType) -> type:
    """``tensorrt.nptype``: the numpy scalar type of a TensorRT DataType."""
    try:
        return _NP[DataType(trt_type)]
    except (KeyError, ValueError):
        raise TypeError(f"Could not resolve TensorRT datatype to an equivalent numpy datatype: {trt_type}") from None


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0
    DLA_MANAGED_SRAM = 1
    DLA_LOCAL_DRAM = 2
    DLA_GLOBAL_DRAM = 3
    TACTIC_DRAM = 4


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    INT8 = 1
    DEBUG = 2
    GPU_FALLBACK = 3
    REFIT = 5
    TF32 = 7
    OBEY_PRECISION_CONSTRAINTS = 12


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0  # deprecated (and ignored) in TensorRT 10
    STRONGLY_TYPED = 1


class Dims(tuple):
    """``trt.Dims``: iterable and indexable like a tuple."""


class Logger:
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4

    def __init__(self, min_severity: int = WARNING) -> None:
        self.min_severity = min_severity


# -- plans ----------------------------------------------------------------------------------------------


def make_plan(onnx_bytes: bytes, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]], order: str = "inputs-first") -> bytes:
    """A fake serialized engine. Tensors: ``{"name", "dtype": DataType name, "shape", "profile"?}``.

    ``order="outputs-first"`` lists outputs before inputs, which catches code that assumes
    ``get_tensor_name(0)`` is the input (the seed's example did).
    """
    tensors = [{**t, "mode": "INPUT"} for t in inputs] + [{**t, "mode": "OUTPUT"} for t in outputs]
    if order == "outputs-first":
        tensors = tensors[len(inputs) :] + tensors[: len(inputs)]
    desc = {"tensors": tensors, "onnx": base64.b64encode(onnx_bytes).decode("ascii")}
    return PLAN_MAGIC + json.dumps(desc).encode("utf-8")


def plan_for_onnx(onnx_path: Path, batch: tuple[int, int, int] | None = (1, 4, 8), io_dtype: str | None = None,
                  order: str = "inputs-first", spatial: int | None = None) -> bytes:
    """A plan from an ONNX file: dynamic with the (min, opt, max) batch profile, or static (None).

    Other dynamic input dims (Ultralytics' height/width) stay dynamic in the engine; ``spatial`` is
    their value in the profile.
    """
    import onnx

    model = onnx.load(str(onnx_path))
    inits = {i.name for i in model.graph.initializer}
    ins, outs = [], []
    for vi, bucket in [(i, ins) for i in model.graph.input if i.name not in inits] + [(o, outs) for o in model.graph.output]:
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
        dtype = io_dtype or _FROM_ONNX[vi.type.tensor_type.elem_type].name
        entry: dict[str, Any] = {"name": vi.name, "dtype": dtype}
        if batch is None:
            entry["shape"] = [d if d > 0 else 1 for d in dims]
        else:
            entry["shape"] = [-1, *dims[1:]]
            if bucket is ins:
                rest = [d if d > 0 else (spatial or 0) for d in dims[1:]]
                if 0 in rest:
                    raise ValueError(f"{onnx_path}: give spatial= for the dynamic dims of {vi.name} {dims}")
                entry["profile"] = [[b, *rest] for b in batch]
        bucket.append(entry)
    return make_plan(model.SerializeToString(), ins, outs, order)


class IHostMemory(bytes):
    """``trt.IHostMemory``: a buffer (``bytes(...)``, ``memoryview(...)`` and ``f.write`` work)."""

    @property
    def nbytes(self) -> int:
        return len(self)


class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None:
        data = bytes(serialized_engine)
        STATE.record("deserialize_cuda_engine", len(data))
        if not data.startswith(PLAN_MAGIC):
            return None  # TensorRT logs "magic tag does not match" and returns None
        STATE.deserialized += 1
        return ICudaEngine(json.loads(data[len(PLAN_MAGIC) :]))


class ICudaEngine:
    def __init__(self, desc: dict[str, Any]) -> None:
        self._tensors = {t["name"]: t for t in desc["tensors"]}
        self._order = [t["name"] for t in desc["tensors"]]
        self._onnx = base64.b64decode(desc["onnx"])
        self._session: Any = None
        self.name = "fake-engine"

    @property
    def num_io_tensors(self) -> int:
        return len(self._order)

    @property
    def num_optimization_profiles(self) -> int:
        return 1

    def get_tensor_name(self, index: int) -> str:
        return self._order[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        t = self._tensors.get(name)
        return TensorIOMode[t["mode"]] if t else TensorIOMode.NONE

    def get_tensor_shape(self, name: str) -> Dims:
        return Dims(self._tensors[name]["shape"])

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType[self._tensors[name]["dtype"]]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
        t = self._tensors[name]
        if t["mode"] != "INPUT" or "profile" not in t or profile_index != 0:
            raise RuntimeError(f"get_tensor_profile_shape: {name} has no shapes in profile {profile_index}")
        return [Dims(s) for s in t["profile"]]

    def create_execution_context(self) -> IExecutionContext:
        STATE.contexts += 1
        return IExecutionContext(self)

    def session(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            self._session = ort.InferenceSession(self._onnx, sess_options=opts, providers=["CPUExecutionProvider"])
        return self._session


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self._shapes = {n: tuple(t["shape"]) for n, t in engine._tensors.items() if t["mode"] == "INPUT"}
        self._addresses: dict[str, int] = {}
        self._out_shapes: dict[tuple[Any, ...], dict[str, tuple[int, ...]]] = {}

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        STATE.record("set_optimization_profile_async", profile_index, stream_handle)
        return profile_index == 0

    def set_input_shape(self, name: str, shape: Any) -> bool:
        shape = tuple(int(d) for d in shape)
        STATE.record("set_input_shape", name, shape)
        t = self.engine._tensors.get(name)
        if t is None or t["mode"] != "INPUT" or len(shape) != len(t["shape"]):
            return False
        if any(e >= 0 and e != d for e, d in zip(t["shape"], shape, strict=True)):
            return False
        if "profile" in t:
            lo, _, hi = t["profile"]
            if any(not a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True)):
                return False  # TensorRT logs an error and returns False
        self._shapes[name] = shape
        return True

    def _specified(self) -> bool:
        return all(all(d >= 0 for d in s) for s in self._shapes.values())

    def get_tensor_shape(self, name: str) -> Dims:
        if name in self._shapes:
            return Dims(self._shapes[name])
        t = self.engine._tensors[name]
        if not self._specified():
            return Dims(t["shape"])
        key = tuple(sorted(self._shapes.items()))
        if key not in self._out_shapes:  # run once on zeros at these input shapes to learn the output shapes
            feeds = {n: np.zeros(s, np.float32) for n, s in self._shapes.items()}
            outs = self.engine.session().run(None, feeds)
            names = [o.name for o in self.engine.session().get_outputs()]
            self._out_shapes[key] = {n: tuple(o.shape) for n, o in zip(names, outs, strict=True)}
        return Dims(self._out_shapes[key][name])

    def set_tensor_address(self, name: str, memory: int) -> bool:
        STATE.record("set_tensor_address", name, int(memory))
        if name not in self.engine._tensors:
            return False
        self._addresses[name] = int(memory)
        return True

    def get_tensor_address(self, name: str) -> int:
        return self._addresses.get(name, 0)

    def execute_async_v3(self, stream_handle: int) -> bool:
        STATE.record("execute_async_v3", int(stream_handle), tuple(sorted(self._shapes.items())))
        if not self._specified() or set(self._addresses) != set(self.engine._tensors):
            return False
        session = self.engine.session()
        feeds = {}
        for name, shape in self._shapes.items():
            dtype = np.dtype(nptype(DataType[self.engine._tensors[name]["dtype"]]))
            raw = _read(self._addresses[name], int(np.prod(shape)) * dtype.itemsize, stream_handle)
            onnx_type = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
            feeds[name] = raw.view(dtype).reshape(shape).astype(onnx_type)
        outs = session.run(None, feeds)
        for out, meta in zip(outs, session.get_outputs(), strict=True):
            dtype = nptype(DataType[self.engine._tensors[meta.name]["dtype"]])
            _write(self._addresses[meta.name], out.astype(dtype))
        return True


# -- tensorrt: builder and parser --------------------------------------------------------------------------


@dataclass
class ITensor:
    name: str
    shape: Dims
    dtype: DataType
    is_network_input: bool = True


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.inputs: list[ITensor] = []
        self.outputs: list[ITensor] = []
        self.onnx: bytes | None = None
        STATE.networks.append(self)

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_input(self, index: int) -> ITensor:
        return self.inputs[index]

    def get_output(self, index: int) -> ITensor:
        return self.outputs[index]


class ParserError:
    def __init__(self, desc: str) -> None:
        self._desc = desc

    def desc(self) -> str:
        return self._desc

    def __str__(self) -> str:
        return f"In node -1 with name:  and operator:  (parse): INVALID_GRAPH: {self._desc}"


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
        self.network = network
        self._errors: list[ParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> ParserError:
        return self._errors[index]

    def clear_errors(self) -> None:
        self._errors.clear()

    def parse_from_file(self, model: str) -> bool:
        return self.parse(Path(model).read_bytes(), model)

    def parse(self, model: bytes, path: str | None = None) -> bool:
        import onnx

        data = bytes(model)
        STATE.parsed.append({"nbytes": len(data), "path": path})
        try:
            proto = onnx.load_from_string(data)
        except Exception as exc:
            self._errors.append(ParserError(f"Failed to parse ONNX model: {exc}"))
            return False
        if not proto.graph.node:
            self._errors.append(ParserError("the graph has no nodes"))
            return False
        inits = {i.name for i in proto.graph.initializer}
        for vi, bucket in [(i, self.network.inputs) for i in proto.graph.input if i.name not in inits] + [(o, self.network.outputs) for o in proto.graph.output]:
            dims = Dims(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)
            bucket.append(ITensor(vi.name, dims, _FROM_ONNX[vi.type.tensor_type.elem_type], bucket is self.network.inputs))
        self.network.onnx = data
        return True


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[Dims, Dims, Dims]] = {}

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - TensorRT's names
        self.shapes[input] = (Dims(min), Dims(opt), Dims(max))

    def get_shape(self, input: str) -> list[Dims]:  # noqa: A002
        return list(self.shapes.get(input, ()))


class IBuilderConfig:
    def __init__(self) -> None:
        self.flags: set[BuilderFlag] = set()
        self.pool_limits: dict[MemoryPoolType, int] = {}
        self.profiles: list[IOptimizationProfile] = []

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        self.pool_limits[MemoryPoolType(pool)] = int(pool_size)

    def get_memory_pool_limit(self, pool: MemoryPoolType) -> int:
        return self.pool_limits.get(MemoryPoolType(pool), 1 << 40)

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(BuilderFlag(flag))

    def clear_flag(self, flag: BuilderFlag) -> None:
        self.flags.discard(BuilderFlag(flag))

    def get_flag(self, flag: BuilderFlag) -> bool:
        return BuilderFlag(flag) in self.flags

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)


class Builder:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        STATE.record("create_network", flags)
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        """Validates like TensorRT: every dynamic input needs a consistent profile; None on failure."""
        record = {"flags": set(config.flags), "pool_limits": dict(config.pool_limits), "network_flags": network.flags,
                  "profiles": [dict(p.shapes) for p in config.profiles], "ok": False}
        STATE.builds.append(record)
        if network.onnx is None:
            return None
        ins = []
        for t in network.inputs:
            entry: dict[str, Any] = {"name": t.name, "dtype": DataType(t.dtype).name, "shape": list(t.shape)}
            if any(d < 0 for d in t.shape):
                if not config.profiles or t.name not in config.profiles[0].shapes:
                    return None  # "Network has dynamic or shape inputs, but no optimization profile has been defined."
                lo, opt, hi = config.profiles[0].shapes[t.name]
                for s in (lo, opt, hi):
                    if len(s) != len(t.shape) or any(e >= 0 and e != d for e, d in zip(t.shape, s, strict=True)):
                        return None
                if any(not a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
                    return None
                entry["profile"] = [list(lo), list(opt), list(hi)]
            ins.append(entry)
        outs = [{"name": t.name, "dtype": DataType(t.dtype).name, "shape": list(t.shape)} for t in network.outputs]
        record["ok"] = True
        return IHostMemory(make_plan(network.onnx, ins, outs))


# -- pycuda ------------------------------------------------------------------------------------------------


class DeviceAllocation:
    def __init__(self, address: int, size: int) -> None:
        self.address, self.size = address, size

    def __int__(self) -> int:
        return self.address

    def __index__(self) -> int:
        return self.address

    def free(self) -> None:
        STATE.record("free", self.address)
        STATE.memory.pop(self.address, None)


def mem_alloc(bytesize: int) -> DeviceAllocation:
    STATE.record("mem_alloc", int(bytesize))
    address = STATE.next_address
    STATE.memory[address] = np.zeros(int(bytesize), np.uint8)
    STATE.next_address += (int(bytesize) + 0xFFF) & ~0xFFF or 0x1000
    return DeviceAllocation(address, int(bytesize))


def pagelocked_empty(shape: Any, dtype: Any, order: str = "C", mem_flags: int = 0) -> np.ndarray:
    STATE.record("pagelocked_empty", shape, np.dtype(dtype).name)
    return np.empty(shape, dtype=dtype, order=order)


_stream_ids = itertools.count(0x5000)


class Stream:
    def __init__(self, flags: int = 0) -> None:
        self.handle = next(_stream_ids)
        STATE.record("Stream", self.handle)

    def synchronize(self) -> None:
        STATE.record("synchronize", self.handle)


def memcpy_htod_async(dest: Any, src: np.ndarray, stream: Stream | None = None) -> None:
    STATE.record("memcpy_htod_async", int(dest), src.nbytes, stream.handle if stream else 0)
    _write(int(dest), src)


def memcpy_dtoh_async(dest: np.ndarray, src: Any, stream: Stream | None = None) -> None:
    STATE.record("memcpy_dtoh_async", int(src), dest.nbytes, stream.handle if stream else 0)
    dest.reshape(-1).view(np.uint8)[...] = _read(int(src), dest.nbytes)


# -- installing the fakes ---------------------------------------------------------------------------------

TRT_API = ["Logger", "Runtime", "Builder", "OnnxParser", "DataType", "TensorIOMode", "MemoryPoolType", "BuilderFlag",
           "NetworkDefinitionCreationFlag", "Dims", "nptype", "ICudaEngine", "IExecutionContext", "IHostMemory",
           "IBuilderConfig", "IOptimizationProfile", "INetworkDefinition", "ITensor"]
PYCUDA_API = ["mem_alloc", "pagelocked_empty", "memcpy_htod_async", "memcpy_dtoh_async", "Stream", "DeviceAllocation"]


def _module(name: str, package: bool = False) -> ModuleType:
    """A module object with a spec (importlib.util.find_spec, which torch._dynamo calls, needs one)."""
    mod = ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        mod.__path__ = []  # so "import pycuda.driver" resolves through sys.modules
    return mod


def install(monkeypatch: pytest.MonkeyPatch, tensorrt: bool = True, pycuda: bool = True, version: str = "10.3.0") -> FakeState:
    """Put fresh fakes in ``sys.modules`` (``None`` entries make ``import`` fail, as when not installed)."""
    global STATE
    STATE = FakeState()
    trt = _module("tensorrt")
    for name in TRT_API:
        setattr(trt, name, globals()[name])
    trt.__version__ = version
    trt.float32, trt.float16, trt.int32, trt.int8, trt.bool = DataType.FLOAT, DataType.HALF, DataType.INT32, DataType.INT8, DataType.BOOL
    monkeypatch.setitem(sys.modules, "tensorrt", trt if tensorrt else None)
    if pycuda:
        pkg, driver, autoinit = _module("pycuda", package=True), _module("pycuda.driver"), _module("pycuda.autoinit")
        for name in PYCUDA_API:
            setattr(driver, name, globals()[name])
        autoinit.context = object()
        pkg.driver, pkg.autoinit = driver, autoinit
        for key, mod in (("pycuda", pkg), ("pycuda.driver", driver), ("pycuda.autoinit", autoinit)):
            monkeypatch.setitem(sys.modules, key, mod)
    else:
        for key in ("pycuda", "pycuda.driver", "pycuda.autoinit"):
            monkeypatch.setitem(sys.modules, key, None)
    return STATE


def state() -> FakeState:
    """The current recorder (``install`` replaces it)."""
    return STATE


def install_pycuda_path(monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> FakeState:
    """Fakes installed and torch-CUDA buffers disabled, so the pycuda path runs on any machine.

    Test modules wrap this in their ``fake_trt`` fixture.
    """
    rec = install(monkeypatch, **kwargs)
    import rs_detect.engines.tensorrt as backend

    monkeypatch.setattr(backend, "cuda_torch_device", lambda device: None)
    return rec


# -- a tiny YOLOv8-shaped model and its exports -------------------------------------------------------------

NAMES = ("plane", "ship", "storage-tank", "baseball-diamond", "tennis-court", "basketball-court", "ground-track-field",
         "harbor", "bridge", "large-vehicle", "small-vehicle", "helicopter", "roundabout", "soccer-ball-field", "swimming-pool")


class MiniYolo(torch.nn.Module):
    """Strides 8/16/32, a DFL-style box head and sigmoid class scores: raw [B, 4 + nc (+1), A].

    Like Ultralytics' Detect head it reshapes with ``x.shape[0]`` and the anchor count: a dynamic
    export keeps those symbolic, a static export writes them into Reshape nodes as literals.
    """

    def __init__(self, imgsz: int = 64, channels: int = 1, nc: int = 15, reg: int = 4, task: str = "detect", seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.nc, self.reg, self.task = nc, reg, task
        conv = torch.nn.Conv2d
        self.stem = torch.nn.Sequential(conv(channels, 8, 3, 2, 1), torch.nn.SiLU(), conv(8, 8, 3, 2, 1), torch.nn.SiLU())
        self.down = torch.nn.ModuleList([conv(8, 8, 3, 2, 1) for _ in range(3)])
        self.box = torch.nn.ModuleList([conv(8, 4 * reg, 1) for _ in range(3)])
        self.cls = torch.nn.ModuleList([conv(8, nc + (1 if task == "obb" else 0), 1) for _ in range(3)])
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.3
        centres, strides = [], []
        for s in (8, 16, 32):
            n = imgsz // s
            ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
            centres.append(torch.stack([xs.flatten() + 0.5, ys.flatten() + 0.5]) * s)
            strides.append(torch.full((n * n,), float(s)))
        self.register_buffer("centres", torch.cat(centres, 1)[None])  # [1, 2, A]
        self.register_buffer("strides", torch.cat(strides)[None, None])  # [1, 1, A]
        self.register_buffer("bins", torch.arange(reg, dtype=torch.float32).view(1, 1, reg, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        f = self.stem(x)
        feats = []
        for down in self.down:
            f = torch.nn.functional.silu(down(f))
            feats.append(f)
        box = torch.cat([h(p).view(b, 4 * self.reg, -1) for h, p in zip(self.box, feats, strict=True)], 2)
        cls = torch.cat([h(p).view(b, self.cls[0].out_channels, -1) for h, p in zip(self.cls, feats, strict=True)], 2)
        a = box.shape[2]
        dist = (box.view(b, 4, self.reg, a).softmax(2) * self.bins).sum(2) * self.strides  # [b, 4, A] ltrb in px
        lt, rb = dist[:, :2], dist[:, 2:]
        xy = self.centres + (rb - lt) / 2
        wh = lt + rb
        parts = [xy, wh, cls[:, : self.nc].sigmoid()]
        if self.task == "obb":
            parts.append((cls[:, self.nc :].sigmoid() - 0.25) * 3.14159)
        return torch.cat(parts, 1)


def mini_onnx(path: Path, imgsz: int = 64, channels: int = 1, task: str = "detect", dynamic: bool = True, batch: int = 1, nc: int = 15) -> Path:
    """Export :class:`MiniYolo` with rs-detect's own exporter (dynamic axes, or the static trap)."""
    from rs_detect.engines.onnxruntime import export_torch_module_onnx

    names = NAMES[:nc] if nc <= len(NAMES) else tuple(f"c{i}" for i in range(nc))
    return export_torch_module_onnx(MiniYolo(imgsz, channels, nc, task=task), path, imgsz, channels, names, task,
                                    opset=17, dynamic=dynamic, batch=batch)


def legacy_onnx_export(module: torch.nn.Module, path: Path, imgsz: int, dynamic_axes: dict[str, dict[int, str]], metadata: dict[str, str] | None = None) -> Path:
    """``torch.onnx.export(dynamo=False)`` with chosen dynamic axes (e.g. height/width too), plus metadata."""
    import warnings

    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter is deprecated
        torch.onnx.export(module.eval(), (torch.zeros(1, 1, imgsz, imgsz),), str(path), input_names=["images"],
                          output_names=["output0"], dynamic_axes=dynamic_axes, dynamo=False)
    model = onnx.load(str(path))
    for key, value in (metadata or {}).items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(model, str(path))
    return path


def edit_batch_dims(src: Path, dst: Path, name: str = "batch") -> Path:
    """What people do with onnx-modifier: relabel dim 0 of every graph input/output as ``name``."""
    import onnx

    model = onnx.load(str(src))
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_param = name  # clears dim_value (a oneof)
    onnx.save(model, str(dst))
    return dst


def mini_torchscript(path: Path, imgsz: int = 64, channels: int = 1, nc: int = 15, trace_batch: int = 2, bake_batch: bool = False) -> Path:
    """A traced MiniYolo with Ultralytics' ``config.txt`` metadata; ``bake_batch`` freezes the batch."""
    model = MiniYolo(imgsz, channels, nc).eval()
    dummy = torch.zeros(trace_batch, channels, imgsz, imgsz)
    if bake_batch:
        inner = model

        class Frozen(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.inner(x).reshape(trace_batch, -1, inner.centres.shape[2])

        model = Frozen().eval()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, dummy, strict=False, check_trace=False)
    meta = {"names": {str(i): n for i, n in enumerate(NAMES[:nc])}, "imgsz": [imgsz, imgsz], "channels": channels,
            "task": "detect", "stride": 32, "batch": trace_batch}
    traced.save(str(path), _extra_files={"config.txt": json.dumps(meta)})
    return path
