"""What ``rs-detect inspect`` reports about a model file, whatever its format.

A batch is called dynamic only on evidence. The seed's trap: a model exported without dynamic axes
keeps its export batch baked into internal nodes (``Reshape`` to ``[1, 64, -1]``...); editing the
graph's input and output dims to ``batch`` afterwards makes the file *look* dynamic, but it then fails
or mixes images at any other batch size. So each backend's ``inspect`` gathers evidence:

1. **run it** (:func:`compare_batch_runs`): the same random images one at a time and as one batch
   of three; every per-image output must match;
2. **read it**: an ONNX graph scan naming the nodes that fix the batch, a TensorRT engine's
   optimization profile.

The only fix is a re-export with dynamic axes (:data:`FIX`). This module holds the format-neutral
part: the report types, the run check, and :func:`require_dynamic`. The backends
(:mod:`rs_detect.engines.onnxruntime`, ``.tensorrt``, ``.torch``) fill them in.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rs_detect.errors import ModelError, one_line
from rs_detect.types import ModelMeta

#: a format label as ``inspect`` prints it (``onnx``, ``tensorrt``, ``torchscript``)
Format = str

#: batch sizes the run check compares (1 against a batch of 3 distinct images)
CHECK_BATCH = 3
#: spatial size tried first when a model's height/width are dynamic (fast; the batch logic is the same)
SMALL_SPATIAL = 128

FIX = (
    "re-export with dynamic axes: rs-detect export WEIGHTS.pt (Ultralytics dynamic=True), or "
    "torch.onnx.export(..., dynamic_axes={'images': {0: 'batch'}, 'output0': {0: 'batch'}}); "
    "editing the input/output dims afterwards does not change the nodes inside"
)


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
        return RunCheck(False, (1,), spatial, error=runtime_error_line(exc), failed_batch=1)
    try:
        together = run(images)
    except Exception as exc:
        return RunCheck(False, (1, batch), spatial, error=runtime_error_line(exc), failed_batch=batch)
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
            diff = _rowset_diff(ref[0], got[0]) if _is_end2end_rows(ref) else (float(np.max(np.abs(got - ref))) if ref.size else 0.0)
            worst = max(worst, diff)
            ok &= diff <= rel * max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
    return RunCheck(ok, (1, batch), spatial, max_abs_diff=worst)


def _is_end2end_rows(out: np.ndarray) -> bool:
    """An end-to-end output [1, K, 6 | 7]: one row per box, best first (YOLO26, YOLOv10)."""
    return out.ndim == 3 and out.shape[2] in (6, 7) and out.shape[1] > out.shape[2]


def _rowset_diff(ref: np.ndarray, got: np.ndarray, score_col: int = 4) -> float:
    """Largest distance from a row of ``ref`` to its nearest row of ``got`` ([K, C] each).

    An end-to-end head sorts its boxes by score: two boxes of nearly equal score may come out in the
    other order at another batch size (other kernels, last-bit differences), which is no mixing of
    images. Rows whose score ties the K-th (the cut, where a box may fall just in or out) are skipped.
    """
    if not ref.size:
        return 0.0
    cut = float(ref[:, score_col].min()) + 1e-4
    rows = ref[ref[:, score_col] > cut]
    if not len(rows):
        return 0.0
    dist = np.abs(rows[:, None, :] - got[None, :, :]).max(axis=2)
    return float(dist.min(axis=1).max())


def require_dynamic(info: ModelInfo) -> ModelInfo:
    """``info``, or a :class:`ModelError` explaining why its batch is not truly dynamic."""
    if not info.batch.dynamic:
        raise ModelError(f"{info.path}: {info.batch.explain()}")
    return info


def runtime_error_line(exc: BaseException, limit: int = 300) -> str:
    """A runtime's error as one line; ONNX Runtime's kernel errors shortened to node + reason."""
    import re

    text = one_line(exc)
    node = re.search(r"running (\S+) node\. Name:'([^']*)'", text)
    if node:
        reason = text.split(" was false. ")[-1] if " was false. " in text else text.split("Status Message: ")[-1]
        text = f"{node.group(1)} node {node.group(2)}: {reason}"
    return text[:limit] + ("..." if len(text) > limit else "")
