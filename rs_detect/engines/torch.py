"""The PyTorch backend: load, inspect and export a TorchScript model as Ultralytics exports it.

* load - :class:`TorchScriptEngine` on the CPU (fp32) or one CUDA GPU (fp16 by default);
* inspect - :func:`inspect`: TorchScript declares no input shape, so it is run at batch 1 and 3;
* export - :func:`ultralytics_args` for ``rs-detect export --format torchscript``.

Why it exists: it is the backend that proves real GPU execution where TensorRT cannot be installed
(our dev/CI machines have no libnvinfer). One code path for CPU and CUDA: the only differences are
the device the module and inputs live on and the precision (fp16 on CUDA by default, fp32 on the
CPU). Metadata comes from the archive's ``config.txt`` extra file (Ultralytics writes its JSON
metadata there), then a model YAML on top. The output stays on the model's device, so decode and NMS
run there too (:func:`rs_detect.postprocess.decode.decode` moves its thresholds to ``raw.device``).

On CUDA the forward pass is captured once as a CUDA graph and replayed for every batch: one launch
instead of a few hundred kernel launches from the interpreter, so the GPU never waits for a CPU thread
that shares the cores with the decoders. Batches smaller than the captured size are padded into it;
``RS_DETECT_CUDA_GRAPHS=0`` (or ``cuda_graphs=False``) runs the module eagerly.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rs_detect.engines import metadata
from rs_detect.engines.base import Engine, SceneLike
from rs_detect.engines.modelinfo import BatchCheck, ModelInfo, Runner, TensorInfo, compare_batch_runs, runtime_error_line
from rs_detect.errors import ConfigError, EngineUnavailableError, ModelError, RsDetectError, one_line
from rs_detect.postprocess.decode import check_output_shape

if TYPE_CHECKING:
    from rs_detect.preprocess import Normalizer

log = logging.getLogger(__name__)

FORMAT = "torchscript"
EXPORT_SUFFIX = ".torchscript"
DEFAULT_MAX_BATCH = 32
DEFAULT_OPT_BATCH = {"cuda": 16, "cpu": 8}


def torch_device(device: str, where: str) -> torch.device:
    """``cpu`` / ``cuda`` / ``cuda:N`` as a torch device, refusing CUDA where torch sees none."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"{where}: unknown device {device!r} (cpu or cuda[:N])") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineUnavailableError(
                f"{where}: --device {device} but PyTorch sees no CUDA GPU (torch {torch.__version__}, CUDA build {torch.version.cuda})"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= torch.cuda.device_count():
            raise EngineUnavailableError(f"{where}: --device {device} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type != "cpu":
        raise ConfigError(f"{where}: device {device!r} is not supported (cpu or cuda[:N])")
    return dev


def load_torchscript(path: Path, device: str | torch.device = "cpu") -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """``torch.jit.load`` plus the Ultralytics ``config.txt`` extra file (JSON metadata, maybe absent)."""
    extra = {"config.txt": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, but it is what Ultralytics exports
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as exc:  # torch raises RuntimeError/ValueError/zipfile errors for non-TorchScript files
        hint = " (an Ultralytics .pt checkpoint? export it: rs-detect export X.pt --format torchscript)" if path.suffix == ".pt" else ""
        raise ModelError(f"{path}: not a TorchScript model{hint} ({one_line(exc, 160)})") from None
    text = extra["config.txt"]
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    try:
        meta = json.loads(text) if text else {}
    except json.JSONDecodeError:
        raise ModelError(f"{path}: its config.txt metadata is not JSON") from None
    return module.eval(), meta if isinstance(meta, dict) else {}


def use_simple_executor() -> None:
    """Run TorchScript with the simple (non-profiling) graph executor, process-wide.

    The profiling executor records shapes on the first calls of every new input shape, then compiles
    a specialised graph: rs-detect sees a handful of fixed shapes, so that only costs start-up time
    and steady-state speed is the same. The executor is chosen when a method
    first runs, so this must happen before the module is called; it is a process-wide switch of
    torch's, and rs-detect only runs fixed-shape exported models through TorchScript.
    """
    torch._C._jit_set_profiling_executor(False)


def cuda_graphs_default() -> bool:
    return os.environ.get("RS_DETECT_CUDA_GRAPHS", "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass
class _Graph:
    """A captured forward pass: replaying it reads ``inputs`` and overwrites ``output``."""

    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor
    params_of: torch.Tensor | None = None  # fused graphs: whose scaling ``inputs[2]`` holds now
    masked: bool = False  # fused graphs: ``inputs[1]`` holds a mask (not all True) from the last batch

    @property
    def batch(self) -> int:
        return int(self.inputs[0].shape[0])


class TorchScriptEngine(Engine):
    """A TorchScript detector on the CPU (fp32) or one CUDA GPU (fp16 unless ``half=False``)."""

    backend = "torchscript"

    def __init__(self, path: Path, device: str = "cpu", model_yaml: Mapping[str, Any] | Path | None = None, half: bool | None = None,
                 cuda_graphs: bool | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path}: model file not found")
        dev = torch_device(device, str(path))
        self.path = path
        self.half = dev.type == "cuda" if half is None else bool(half)
        use_simple_executor()
        module, raw = load_torchscript(path, dev)
        self.module = module.half() if self.half else module.float()
        meta = metadata.resolve(path, raw, model_yaml)
        if not metadata.yaml_sets_batch(path, model_yaml):
            opt = DEFAULT_OPT_BATCH[dev.type]
            meta = meta.with_batch(1, opt, DEFAULT_MAX_BATCH, dynamic=True)
        self.raw_metadata = raw
        self.cuda_graphs = dev.type == "cuda" and (cuda_graphs_default() if cuda_graphs is None else bool(cuda_graphs))
        self._graph: _Graph | None = None  # the model alone, for batches already scaled (infer)
        self._fused: dict[tuple[Any, ...], _Graph] = {}  # scaling + model, per raw dtype (infer_normalized)
        self._pool: Any = None  # the graphs' shared memory pool
        super().__init__(meta, dev)

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(np.float16) if self.half else np.dtype(np.float32)

    def warmup(self, batch: int, like: SceneLike | None = None) -> None:
        """Capture the CUDA graph for batches of up to ``batch`` before the first scene (CUDA only).

        With ``like`` (a coming scene's raw dtype, bands and normaliser) and a band plan the graph can
        hold (:attr:`Normalizer.graphable`), the graph captured is the one that scene's batches run
        (scaling and model, :meth:`infer_normalized`), and nothing is captured during the scene;
        otherwise the model alone, as :meth:`infer` runs it."""
        if not self.cuda_graphs:
            return
        if like is not None and like.norm.graphable:
            n = self._graph_batch(batch)
            size = self.meta.imgsz
            self.infer_normalized(torch.zeros((n, like.bands, size, size), dtype=like.raw_dtype, device=self.device), None, like.norm)
            return
        if self._graph is None:
            shape = (self._graph_batch(batch), self.meta.channels, self.meta.imgsz, self.meta.imgsz)
            self._graph = self._try_capture(self._forward, (torch.zeros(shape, dtype=torch.float16 if self.half else torch.float32, device=self.device),))

    def _graph_batch(self, batch: int) -> int:
        return max(self.meta.min_batch, min(batch, self.meta.max_batch))

    def _try_capture(self, fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> _Graph | None:
        """:meth:`_capture`, or eager from now on (with one warning) for a module that cannot be captured.

        A module that copies from unpinned host memory or synchronises inside its forward pass (e.g. a
        TorchScript exported with anchors rebuilt on the CPU per call) fails capture; it still runs eagerly.
        """
        try:
            return self._capture(fn, inputs)
        except RuntimeError as exc:
            log.warning("%s: cannot be captured as a CUDA graph, running it eagerly (%s)", self.path.name, " ".join(str(exc).split())[-200:])
            self.cuda_graphs = False
            torch.cuda.synchronize(self.device)
            return None

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        return out[0] if isinstance(out, (list, tuple)) else out

    def _capture(self, fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> _Graph:
        """Warm ``fn`` up on a side stream, then capture one call of it on ``inputs`` (kept as the graph's own).

        All graphs share one memory pool: they replay on one stream, one after another, and every
        replay's output is copied out before the next replay is queued, so one graph's scratch memory
        can be another's (a graph per scene dtype would otherwise hold its own activations).
        """
        static = tuple(t.clone() for t in inputs)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(2):
                fn(*static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # thread_local: reader threads pin host memory while the main thread captures
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            output = fn(*static)
        return _Graph(graph, static, output)

    def _replay(self, x: torch.Tensor) -> torch.Tensor:
        """The captured graph on ``x`` (padded up to the captured batch); eager where it does not fit."""
        if self._graph is None:
            self._graph = self._try_capture(self._forward, (x,))
        g = self._graph
        if g is None:
            return self._forward(x)
        n = int(x.shape[0])
        static = g.inputs[0]
        if n > g.batch or x.shape[1:] != static.shape[1:] or x.dtype != static.dtype:
            return self._forward(x)
        static[:n].copy_(x)
        if n < g.batch:
            static[n:].zero_()
        g.graph.replay()
        return g.output[:n].to(torch.float32, copy=True)  # the next replay overwrites the graph's output

    def infer_normalized(self, raw: torch.Tensor, valid: torch.Tensor | None, norm: Normalizer) -> torch.Tensor:
        """Scaling and model in one captured graph per raw dtype (CUDA graphs on, a direct band plan).

        The main thread then queues a copy and a replay per batch instead of a dozen kernel launches,
        each of which gives the GIL away to the reader threads and waits to get it back (with many
        reader threads, most of the main thread's time per batch of a small model). The graph reads the scene's scaling from its own small
        tensor (copied in when the scene changes) and always applies a mask (all True when the batch has none).
        """
        n = int(raw.shape[0])
        batch = self._graph.batch if self._graph is not None else self._graph_batch(n)
        if not (self.cuda_graphs and norm.graphable and n <= batch):
            return super().infer_normalized(raw, valid, norm)
        key = (raw.dtype, tuple(raw.shape[1:]), norm.combine, norm.channels, norm.dtype)
        g = self._fused.get(key)
        if g is None:
            size = raw.shape[-2:]
            inputs = (torch.zeros((batch, *raw.shape[1:]), dtype=raw.dtype, device=self.device),
                      torch.ones((batch, *size), dtype=torch.bool, device=self.device), norm.params)
            g = self._try_capture(lambda r, v, p: self._forward(norm.apply(r, v, p)), inputs)
            if g is None:
                return super().infer_normalized(raw, valid, norm)
            g.params_of = norm.params
            self._fused[key] = g
        r, v, p = g.inputs
        r[:n].copy_(raw)
        if valid is not None:
            v[:n].copy_(valid)
            g.masked = True
        elif g.masked:
            v.fill_(True)
            g.masked = False
        if g.params_of is not norm.params:
            p.copy_(norm.params)
            g.params_of = norm.params
        with torch.inference_mode():
            g.graph.replay()
        return g.output[:n].to(torch.float32, copy=True)

    def _infer(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
        x = x.to(self.device, dtype=torch.float16 if self.half else torch.float32, non_blocking=True)
        with torch.inference_mode():
            out = self._replay(x) if self.cuda_graphs else self._forward(x)
        return out.float()

    def close(self) -> None:
        self._graph = None
        self._fused.clear()
        self.module = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def load(path: Path, device: str = "cpu", model_yaml: Mapping[str, Any] | Path | None = None, **kwargs: Any) -> TorchScriptEngine:
    return TorchScriptEngine(path, device=device, model_yaml=model_yaml, **kwargs)


# -- inspect ------------------------------------------------------------------------------------------------


def torchscript_runner(module: Any) -> Runner:
    def run(images: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode():
            out = module(torch.from_numpy(images))
        outs = out if isinstance(out, (list, tuple)) else [out]
        return [o.float().cpu().numpy() for o in outs if isinstance(o, torch.Tensor)]

    return run


def inspect(path: Path, model_yaml: Mapping[str, Any] | Path | None = None, run: bool = True) -> ModelInfo:
    """TorchScript has no declared input shape: run it (CPU, fp32) at batch 1 and 3 to find out."""
    module, raw = load_torchscript(path)
    meta, error = None, None
    try:
        meta = metadata.resolve(path, raw, model_yaml)
    except RsDetectError as exc:
        error = str(exc)
    channels = meta.channels if meta else int(raw.get("channels", 3))
    imgsz = meta.imgsz if meta else 640
    inputs = (TensorInfo("input", ("batch", channels, imgsz, imgsz), "float32"),)
    notes = ("TorchScript declares no input shape: the input row comes from the metadata",)
    if not run:
        return ModelInfo(path, FORMAT, inputs, (), BatchCheck(True, "dynamic batch (not run)", True, notes=notes), meta, error, raw)
    runner = torchscript_runner(module)
    result = compare_batch_runs(runner, channels, imgsz, np.dtype(np.float32))
    traced = int(raw["batch"]) if str(raw.get("batch", "")).isdigit() else None
    probe_batch = (traced or 1) if result.failed_batch == 1 else 1
    outputs: tuple[TensorInfo, ...] = ()
    try:
        probe = runner(np.zeros((probe_batch, channels, imgsz, imgsz), np.float32))
        outputs = tuple(TensorInfo(f"output{k}", ("batch", *o.shape[1:]), str(o.dtype)) for k, o in enumerate(probe))
        if meta is not None and error is None and probe:
            check_output_shape(tuple(probe[0].shape), meta, str(path))
    except RsDetectError as exc:
        error = str(exc)
    except Exception as exc:  # TorchScript interpreter errors
        error = error or f"{path}: the model fails at batch {probe_batch} with a {channels}x{imgsz}x{imgsz} input ({runtime_error_line(exc, 200)})"
    if result.ok:
        batch = BatchCheck(True, "dynamic batch: usable with any batch size", True, run=result, notes=notes)
    else:
        what = f"static batch {traced}" if traced else "not dynamic"
        batch = BatchCheck(False, f"{what}: the traced graph is not batch-dynamic", False, fixed_batch=traced, run=result, notes=notes,
                           fix="re-export: rs-detect export WEIGHTS.pt --format torchscript (shapes must come from x.shape, not literals)")
    return ModelInfo(path, FORMAT, inputs, outputs, batch, meta, error, raw)


# -- export -------------------------------------------------------------------------------------------------


def ultralytics_args(opset: int = 17, half: bool = False) -> dict[str, Any]:
    """``YOLO.export`` arguments for TorchScript.

    A trace is batch-dynamic by itself (shapes come from ``x.shape``); Ultralytics' ``dynamic=True``
    would instead rebuild the anchors on every call from a CPU arange copied to the GPU, a blocking
    copy that drains the GPU's queue each batch and cannot be captured in a CUDA graph.
    """
    if half:
        log.warning("--half is ignored for TorchScript: the PyTorch backend runs it in fp16 on CUDA by itself")
    return {"dynamic": False}
