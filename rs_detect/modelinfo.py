"""What a model file is, and whether its batch is *truly* dynamic (``rs-detect inspect``).

The seed's trap: a YOLOv8 exported to ONNX without dynamic axes keeps its export batch baked into
internal nodes (``Reshape`` to ``[1, 64, -1]``, ``[1, 4, 16, 8400]``...). Editing the graph's input and
output dims to ``batch`` afterwards (onnx-modifier, onnx.tools) makes the file *look* dynamic, but
TensorRT then refuses the profile or the model fails or mixes images at any other batch size.

So a batch is called dynamic here only on evidence:

1. **run it**: the same random images through ONNX Runtime (or TorchScript on the CPU) one at a time
   and as one batch of three; every per-image output must match;
2. **scan it** (ONNX): nodes whose constant shape operand fixes the leading (batch) dim of a tensor
   that carries the batch (``Reshape``/``Expand`` to a literal first dim, ``Concat`` of batched data
   with a constant along another axis) are named, so the verdict says *which* nodes bake the batch.

The only fix is a re-export with dynamic axes (Ultralytics ``dynamic=True``, i.e. ``rs-detect
export``, or ``torch.onnx.export(..., dynamic_axes=...)``). TensorRT engines report their
optimization profile; TorchScript is run at two batch sizes on the CPU.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rs_detect.dtypes import model_input_dtype
from rs_detect.errors import ModelError, RsDetectError, one_line
from rs_detect.types import ModelMeta

Format = Literal["onnx", "tensorrt", "torchscript"]

#: batch sizes the run check compares (1 against a batch of 3 distinct images)
CHECK_BATCH = 3
#: spatial size tried first when a model's height/width are dynamic (fast; the batch logic is the same)
SMALL_SPATIAL = 128

FIX = (
    "re-export with dynamic axes: rs-detect export WEIGHTS.pt (Ultralytics dynamic=True), or "
    "torch.onnx.export(..., dynamic_axes={'images': {0: 'batch'}, 'output0': {0: 'batch'}}); "
    "editing the input/output dims afterwards does not change the nodes inside"
)

FORMATS: dict[str, Format] = {
    ".onnx": "onnx",
    ".engine": "tensorrt",
    ".plan": "tensorrt",
    ".torchscript": "torchscript",
    ".ts": "torchscript",
    ".pt": "torchscript",
}


@dataclass(frozen=True)
class TensorInfo:
    """One input or output: dims are ints, or names (``batch``) / -1 where they are dynamic."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def render(self) -> str:
        return f"{self.name}  {self.dtype}  [{', '.join(str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class BakedNode:
    """A graph node that fixes the batch size: its name, op and what it fixes."""

    name: str
    op_type: str
    batch: int
    detail: str

    def render(self) -> str:
        return f"{self.name or '(unnamed)'} ({self.detail})"


@dataclass(frozen=True)
class RunCheck:
    """Outcome of running the same images alone and as one batch.

    ``failed_batch`` is the batch size that raised (``error`` says how), None when all ran.
    """

    ok: bool
    batches: tuple[int, ...]
    spatial: int
    max_abs_diff: float | None = None
    error: str | None = None
    failed_batch: int | None = None


@dataclass(frozen=True)
class BatchCheck:
    """The verdict on a model's batch dimension, with the evidence for it."""

    dynamic: bool
    verdict: str
    declared_dynamic: bool
    fixed_batch: int | None = None
    min_batch: int | None = None
    opt_batch: int | None = None
    max_batch: int | None = None
    run: RunCheck | None = None
    baked: tuple[BakedNode, ...] = ()
    notes: tuple[str, ...] = ()
    fix: str | None = None

    def explain(self) -> str:
        """One paragraph: verdict, evidence, fix."""
        parts = [self.verdict]
        if self.baked:
            shown = "; ".join(b.render() for b in self.baked[:6])
            more = f"; and {len(self.baked) - 6} more" if len(self.baked) > 6 else ""
            parts.append(f"{len(self.baked)} node(s) bake batch {self.baked[0].batch} into the graph: {shown}{more}")
        if self.run is not None:
            parts.append(_render_run(self.run))
        parts.extend(self.notes)
        if self.fix:
            parts.append(f"fix: {self.fix}")
        return ". ".join(p.rstrip(".") for p in parts) + "."


@dataclass(frozen=True)
class ModelInfo:
    """Everything ``rs-detect inspect`` reports about one model file."""

    path: Path
    format: Format
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    batch: BatchCheck
    meta: ModelMeta | None = None
    meta_error: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0 when the model can be used with dynamic batching, 1 otherwise."""
        return 0 if self.batch.dynamic else 1

    def to_dict(self) -> dict[str, Any]:
        meta = None
        if self.meta is not None:
            meta = {
                "task": self.meta.task,
                "names": list(self.meta.names),
                "nc": self.meta.nc,
                "channels": self.meta.channels,
                "imgsz": self.meta.imgsz,
                "stride": self.meta.stride,
                "num_anchors": self.meta.num_anchors,
                "end2end": self.meta.end2end,
                "categories": list(self.meta.categories),
            }
        batch = asdict(self.batch)
        return {
            "path": str(self.path),
            "format": self.format,
            "inputs": [asdict(t) for t in self.inputs],
            "outputs": [asdict(t) for t in self.outputs],
            "model": meta,
            "model_error": self.meta_error,
            "batch": batch,
            "usable_for_dynamic_batching": self.batch.dynamic,
            "explanation": self.batch.explain(),
            "metadata": {k: _jsonable(v) for k, v in self.metadata.items()},
        }

    def render(self) -> str:
        """Human-readable report, one fact per line."""
        rows: list[tuple[str, str]] = [("model", f"{self.path} ({self.format})")]
        if self.meta is not None:
            m = self.meta
            rows.append(("task", f"{m.task}, {m.nc} classes: {', '.join(m.names)}"))
            head = "end-to-end head (one box per object, no NMS)" if m.end2end else f"{m.num_anchors} anchors"
            rows.append(("size", f"{m.channels} channel(s), {m.imgsz}x{m.imgsz} px, stride {m.stride}, {head}"))
            by_cat = {c: [n for n, k in zip(m.names, m.categories) if k == c] for c in ("plane", "ship")}
            others = sum(1 for k in m.categories if k == "other")
            rows.append(("classes", f"plane: {', '.join(by_cat['plane']) or 'none'}; ship: {', '.join(by_cat['ship']) or 'none'}; "
                                       f"other: {others} class(es)"))
        if self.meta_error:
            rows.append(("problem", self.meta_error))
        rows += [("input", t.render()) for t in self.inputs]
        rows += [("output", t.render()) for t in self.outputs]
        b = self.batch
        if b.min_batch is not None:
            rows.append(("batches", f"min {b.min_batch}, opt {b.opt_batch}, max {b.max_batch}"))
        for node in b.baked:
            rows.append(("baked", node.render()))
        if b.run is not None:
            rows.append(("run", _render_run(b.run)))
        rows += [("note", n) for n in b.notes]
        rows.append(("verdict", b.verdict))
        if b.fix:
            rows.append(("fix", b.fix))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _render_run(run: RunCheck) -> str:
    sizes = " and ".join(str(n) for n in run.batches)
    where = f"at {run.spatial}x{run.spatial} px"
    if run.ok:
        return f"batch {sizes} give the same per-image outputs {where} (max |diff| {run.max_abs_diff:.3g})"
    if run.error:
        return f"batch {run.failed_batch or run.batches[-1]} fails {where}: {run.error}"
    return f"batch {sizes} give different per-image outputs {where} (max |diff| {run.max_abs_diff:.3g}): images are mixed across the batch"


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """One line; ONNX Runtime's kernel errors shortened to node + reason (no C++ source locations)."""
    text = one_line(exc)
    node = re.search(r"running (\S+) node\. Name:'([^']*)'", text)
    if node:
        reason = text.split(" was false. ")[-1] if " was false. " in text else text.split("Status Message: ")[-1]
        text = f"{node.group(1)} node {node.group(2)}: {reason}"
    return text[:limit] + ("..." if len(text) > limit else "")


# -- run check (shared by ONNX and TorchScript) ------------------------------------------------------


Runner = Callable[[np.ndarray], list[np.ndarray]]


def compare_batch_runs(run: Runner, channels: int, spatial: int, dtype: np.dtype, batch: int = CHECK_BATCH) -> RunCheck:
    """Run ``batch`` random images alone and together; every per-image output must agree.

    Tolerance is relative to each output's magnitude (box channels are in pixels, scores in [0, 1]);
    float16 models get a looser one. A runtime error at either size is a failed check, not a crash.
    """
    rng = np.random.default_rng(0)
    images = rng.random((batch, channels, spatial, spatial), dtype=np.float32).astype(dtype)
    try:
        singles = [run(images[i : i + 1]) for i in range(batch)]
    except Exception as exc:  # runtimes raise their own untyped errors
        return RunCheck(False, (1,), spatial, error=_one_line(exc), failed_batch=1)
    try:
        together = run(images)
    except Exception as exc:
        return RunCheck(False, (1, batch), spatial, error=_one_line(exc), failed_batch=batch)
    rel = 1e-2 if dtype == np.float16 else 1e-4
    worst, ok = 0.0, True
    for k, out in enumerate(together):
        if out.ndim == 0 or out.shape[0] != batch:
            return RunCheck(False, (1, batch), spatial, error=f"output {k} has shape {list(out.shape)}, expected batch {batch} first", failed_batch=batch)
        for i in range(batch):
            ref = singles[i][k].astype(np.float32)
            got = out[i : i + 1].astype(np.float32)
            if got.shape != ref.shape:
                return RunCheck(False, (1, batch), spatial, error=f"output {k} per-image shape {list(got.shape)} differs from batch 1's {list(ref.shape)}", failed_batch=batch)
            diff = float(np.max(np.abs(got - ref))) if ref.size else 0.0
            worst = max(worst, diff)
            ok &= diff <= rel * max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
    return RunCheck(ok, (1, batch), spatial, max_abs_diff=worst)


# -- ONNX ---------------------------------------------------------------------------------------------

#: ops whose outputs describe shapes, not batched data
_SHAPE_OPS = {"Shape", "Size"}
#: for these ops, only the listed input positions carry data (the rest are shapes/indices/params)
_DATA_INPUTS = {
    "Reshape": (0,),
    "Expand": (0,),
    "Tile": (0,),
    "Slice": (0,),
    "Resize": (0,),
    "Upsample": (0,),
    "ConstantOfShape": (),
    "Range": (),
    "Pad": (0,),
    "Squeeze": (0,),
    "Unsqueeze": (0,),
    "ReduceMean": (0,),
    "ReduceMax": (0,),
    "ReduceSum": (0,),
    "TopK": (0,),
    "Split": (0,),
}


def _constants(graph: Any) -> dict[str, np.ndarray]:
    """Initializers and Constant outputs (through Identity/Cast), by tensor name."""
    from onnx import numpy_helper

    values: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        try:
            values[init.name] = numpy_helper.to_array(init)
        except Exception:  # external data not loaded: the value is unknown, the name is still constant
            continue
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
                elif attr.name == "value_ints":
                    values[node.output[0]] = np.array(list(attr.ints), dtype=np.int64)
                elif attr.name == "value_int":
                    values[node.output[0]] = np.array(attr.i, dtype=np.int64)
        elif node.op_type in ("Identity", "Cast") and node.input and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def _int_attr(node: Any, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def scan_baked_batch(model: Any) -> list[BakedNode]:
    """Nodes of an ONNX graph that fix the leading (batch) dim of a tensor carrying the batch.

    "Carrying the batch" is propagated from the graph's image input through data operands only
    (a ``Shape`` of a batched tensor is not batched). A node is reported when its constant shape
    operand gives that tensor a literal first dim: ``Reshape`` to ``[N, ...]`` with N > 0 (0 copies,
    -1 infers: both are fine), ``Expand`` to ``[N>1, ...]``, and ``Concat`` along a non-batch axis
    of batched data with a constant (whose first dim is then the export batch).
    """
    graph = model.graph
    consts = _constants(graph)
    init_names = {i.name for i in graph.initializer}
    batched: set[str] = {i.name for i in graph.input if i.name not in init_names}
    found: list[BakedNode] = []
    for node in graph.node:
        if node.op_type in _SHAPE_OPS:
            continue
        positions = _DATA_INPUTS.get(node.op_type)
        data = [n for k, n in enumerate(node.input) if n and (positions is None or k in positions)]
        if not any(n in batched for n in data):
            continue
        batched.update(o for o in node.output if o)
        baked = _baked_by(node, consts, batched)
        if baked is not None:
            found.append(baked)
    return found


def _baked_by(node: Any, consts: Mapping[str, np.ndarray], batched: set[str]) -> BakedNode | None:
    op = node.op_type
    if op in ("Reshape", "Expand") and len(node.input) > 1 and node.input[1] in consts:
        shape = consts[node.input[1]].reshape(-1)
        first = int(shape[0]) if shape.size else 0
        if (op == "Reshape" and first > 0) or (op == "Expand" and first > 1):
            return BakedNode(node.name, op, first, f"{op} to constant shape {shape.tolist()}")
    if op == "Concat":
        for name in node.input:
            if name in consts and name not in batched:
                value = consts[name]
                axis = _int_attr(node, "axis", 0)
                if value.ndim >= 1 and axis % value.ndim != 0:
                    return BakedNode(node.name, op, int(value.shape[0]), f"Concat on axis {axis} with constant {name} of shape {list(value.shape)}")
    return None


def _dims(value_info: Any) -> tuple[int | str, ...]:
    dims: list[int | str] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or "?")
    return tuple(dims)


def _onnx_dtype(value_info: Any) -> str:
    import onnx

    elem = value_info.type.tensor_type.elem_type
    return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))) if elem else "?"


def onnx_session_runner(path: Path) -> tuple[Runner, Any]:
    """An ONNX Runtime CPU session as a ``Runner`` (all outputs), and the session."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # failures are expected here (that is the check) and reported by us
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"{path}: not a loadable ONNX model ({_one_line(exc, 200)})") from None
    name = session.get_inputs()[0].name

    def run(images: np.ndarray) -> list[np.ndarray]:
        return list(session.run(None, {name: images}, quiet))

    return run, session


def check_onnx_batch(path: Path, model: Any | None = None, imgsz: int | None = None, channels: int | None = None, run: bool = True) -> BatchCheck:
    """The batch verdict for an ONNX file (see the module docstring for what counts as evidence)."""
    import onnx

    model = model if model is not None else onnx.load(str(path), load_external_data=False)
    inputs = _graph_inputs(model)
    if len(inputs) != 1:
        raise ModelError(f"{path}: expected one image input, found {len(inputs)}")
    dims = _dims(inputs[0])
    if len(dims) != 4:
        raise ModelError(f"{path}: input {inputs[0].name} has {len(dims)} dims, expected [batch, channels, height, width]")
    baked = tuple(scan_baked_batch(model))
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
    result = _run_onnx_check(path, dims, n_ch, size, _onnx_dtype(inputs[0])) if run else None
    notes: list[str] = []
    if result is not None and result.spatial != size:
        notes.append(f"the run used {result.spatial}x{result.spatial} px instead of {size} because the model's height/width are dynamic (the batch logic does not depend on it)")
    if result is not None and result.ok:
        if baked:
            notes.append("the run passed although the scan found batch-fixing nodes: check them before relying on other batch sizes")
        return BatchCheck(True, "dynamic batch: usable with any batch size", True, run=result, baked=baked, notes=tuple(notes))
    if result is None and not baked:
        return BatchCheck(True, "dynamic batch (by the graph scan only; not run)", True, notes=tuple(notes))
    fixed = _export_batch(baked, model)
    what = f"static batch {fixed}" if fixed else "not dynamic"
    verdict = f"{what}: the input/output dims say '{lead}' but the graph is not batch-dynamic (dims edited after a static export?)"
    return BatchCheck(False, verdict, True, fixed_batch=fixed, run=result, baked=baked, notes=tuple(notes), fix=FIX)


def _graph_inputs(model: Any) -> list[Any]:
    init_names = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in init_names]


def _export_batch(baked: Sequence[BakedNode], model: Any) -> int | None:
    if baked:
        return Counter(b.batch for b in baked).most_common(1)[0][0]
    meta = {p.key: p.value for p in model.metadata_props}
    try:
        return int(meta["batch"])
    except (KeyError, ValueError):
        return None


def _run_onnx_check(path: Path, dims: tuple[int | str, ...], channels: int, imgsz: int, dtype: str) -> RunCheck:
    """The run check at a small size when height/width are dynamic (falling back to imgsz)."""
    runner, _ = onnx_session_runner(path)
    np_dtype = model_input_dtype(dtype)
    spatial_dynamic = not isinstance(dims[2], int) and not isinstance(dims[3], int)
    if spatial_dynamic and imgsz > SMALL_SPATIAL:
        small = compare_batch_runs(runner, channels, SMALL_SPATIAL, np_dtype)
        if small.failed_batch != 1:
            return small
    return compare_batch_runs(runner, channels, imgsz, np_dtype)


def inspect_onnx(path: Path, model_yaml: Mapping[str, Any] | Path | None = None, run: bool = True) -> ModelInfo:
    import onnx

    from rs_detect.engines import metadata
    from rs_detect.engines.onnxruntime import check_input_dims

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"{path}: not an ONNX model ({_one_line(exc, 200)})") from None
    inputs = tuple(TensorInfo(i.name, _dims(i), _onnx_dtype(i)) for i in _graph_inputs(model))
    outputs = tuple(TensorInfo(o.name, _dims(o), _onnx_dtype(o)) for o in model.graph.output)
    raw = {p.key: p.value for p in model.metadata_props}
    meta, error = None, None
    try:
        meta = metadata.resolve(path, raw, model_yaml)
        if inputs:
            meta = check_input_dims(meta, list(inputs[0].shape), str(path))
        _check_outputs(meta, outputs, str(path))
    except RsDetectError as exc:
        error = str(exc)
    batch = check_onnx_batch(path, model, imgsz=meta.imgsz if meta else None, channels=meta.channels if meta else None, run=run)
    return ModelInfo(path, "onnx", inputs, outputs, batch, meta, error, raw)


def _check_outputs(meta: ModelMeta, outputs: Sequence[TensorInfo], where: str) -> None:
    from rs_detect.postprocess.decode import check_output_shape

    if outputs and len(outputs[0].shape) == 3 and all(isinstance(d, int) for d in outputs[0].shape[1:]):
        check_output_shape((1, *outputs[0].shape[1:]), meta, where)  # type: ignore[arg-type]


# -- TensorRT ------------------------------------------------------------------------------------------


def inspect_engine(path: Path, model_yaml: Mapping[str, Any] | Path | None = None) -> ModelInfo:
    """A TensorRT plan/engine: I/O and profile from the TensorRT API, metadata from header/sidecar."""
    from rs_detect.engines.tensorrt import describe_engine_file

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
    return ModelInfo(path, "tensorrt", inputs, outputs, batch, desc.meta, desc.meta_error, desc.metadata)


# -- TorchScript ---------------------------------------------------------------------------------------


def torchscript_runner(module: Any) -> Runner:
    import torch

    def run(images: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode():
            out = module(torch.from_numpy(images))
        outs = out if isinstance(out, (list, tuple)) else [out]
        return [o.float().cpu().numpy() for o in outs if isinstance(o, torch.Tensor)]

    return run


def inspect_torchscript(path: Path, model_yaml: Mapping[str, Any] | Path | None = None, run: bool = True) -> ModelInfo:
    """TorchScript has no declared input shape: run it (CPU, fp32) at batch 1 and 3 to find out."""
    from rs_detect.engines import metadata
    from rs_detect.engines.torch import load_torchscript
    from rs_detect.postprocess.decode import check_output_shape

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
        return ModelInfo(path, "torchscript", inputs, (), BatchCheck(True, "dynamic batch (not run)", True, notes=notes), meta, error, raw)
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
        error = error or f"{path}: the model fails at batch {probe_batch} with a {channels}x{imgsz}x{imgsz} input ({_one_line(exc, 200)})"
    if result.ok:
        batch = BatchCheck(True, "dynamic batch: usable with any batch size", True, run=result, notes=notes)
    else:
        what = f"static batch {traced}" if traced else "not dynamic"
        batch = BatchCheck(False, f"{what}: the traced graph is not batch-dynamic", False, fixed_batch=traced, run=result, notes=notes,
                           fix="re-export: rs-detect export WEIGHTS.pt --format torchscript (shapes must come from x.shape, not literals)")
    return ModelInfo(path, "torchscript", inputs, outputs, batch, meta, error, raw)


# -- entry point ----------------------------------------------------------------------------------------


def model_format(path: Path) -> Format:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ModelError(f"{path}: unknown model format {path.suffix!r} (expected one of {', '.join(sorted(FORMATS))})")
    return fmt


def inspect_model(path: Path, model_yaml: Mapping[str, Any] | Path | None = None, run: bool = True) -> ModelInfo:
    """Inspect any supported model file; ``run=False`` skips executing it (ONNX/TorchScript)."""
    path = Path(path)
    fmt = model_format(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    if fmt == "onnx":
        return inspect_onnx(path, model_yaml, run)
    if fmt == "tensorrt":
        return inspect_engine(path, model_yaml)
    return inspect_torchscript(path, model_yaml, run)
