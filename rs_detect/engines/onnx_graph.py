"""Reading an ONNX graph without running it: I/O dims and the nodes that bake a batch size in.

Used by the ONNX backend's ``inspect`` (:mod:`rs_detect.engines.onnxruntime`). A node is reported
when its constant shape operand gives a tensor that carries the batch a literal first dim: the trace
of a static export whose input/output dims were edited to ``batch`` afterwards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rs_detect.engines.modelinfo import BakedNode

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


def dims(value_info: Any) -> tuple[int | str, ...]:
    dims: list[int | str] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or "?")
    return tuple(dims)


def onnx_dtype(value_info: Any) -> str:
    import onnx

    elem = value_info.type.tensor_type.elem_type
    return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))) if elem else "?"


def graph_inputs(model: Any) -> list[Any]:
    init_names = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in init_names]


def export_batch(baked: Sequence[BakedNode], model: Any) -> int | None:
    if baked:
        return Counter(b.batch for b in baked).most_common(1)[0][0]
    meta = {p.key: p.value for p in model.metadata_props}
    try:
        return int(meta["batch"])
    except (KeyError, ValueError):
        return None
