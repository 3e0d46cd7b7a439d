"""Class-aware NMS inside each tile (torchvision's NMS op for axis-aligned boxes, probIoU for oriented ones).

The axis-aligned NMS is torchvision's compiled ``nms`` operator (``torch.ops.torchvision.nms``, the
kernel ``torchvision.ops.nms`` calls), loaded from the torchvision wheel's own extension library on
first use, without importing the ``torchvision`` Python package: that package imports its models,
datasets and transforms, and through them ``torch._dynamo`` and sympy, 1.5-3 s of start-up a run
never uses. :func:`batched_nms` is ``torchvision.ops.batched_nms``'s own two strategies (offset
boxes per group; one NMS per group above a size), on that operator; a test holds it identical to
``torchvision.ops.batched_nms``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import threading

import torch

from rs_detect.postprocess.geometry import probiou
from rs_detect.types import Detections


_ops_lock = threading.Lock()
_ops_loaded = False

#: ``torchvision.ops.batched_nms`` runs one NMS per group above this many box coordinates
#: (``boxes.numel()``), on the CPU and on a GPU (torchvision 0.22+), and one NMS of offset boxes below.
VANILLA_ABOVE = {"cpu": 4000, "cuda": 100_000}


def _torchvision_extension() -> str | None:
    """The path of the torchvision wheel's compiled ops library, found without importing torchvision."""
    if os.name == "nt":  # its DLL directory is registered by torchvision's own import
        return None
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    finder = importlib.machinery.FileFinder(
        spec.submodule_search_locations[0], (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
    )
    for name in ("_C_stable", "_C"):  # torchvision >= 0.29 / older wheels
        found = finder.find_spec(name)
        if found is not None and found.origin:
            return found.origin
    return None


def load_nms_op() -> None:
    """Register ``torch.ops.torchvision.nms`` (once per process; a no-op once torchvision is imported).

    Where the library cannot be found or loaded alone, ``import torchvision`` does it, raising its
    own message when the wheel does not match torch.
    """
    global _ops_loaded
    if _ops_loaded:
        return
    with _ops_lock:
        if _ops_loaded:
            return
        if "torchvision" not in sys.modules:
            path = _torchvision_extension()
            try:
                if path is None:
                    raise OSError("torchvision's ops library not found")
                torch.ops.load_library(path)
            except (OSError, RuntimeError):
                import torchvision.ops  # noqa: F401 - loads the library itself, or says why it cannot

                torchvision.extension._assert_has_ops()
        _ops_loaded = True


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """``torchvision.ops.nms``: greedy NMS of xyxy boxes; kept indices by descending score."""
    load_nms_op()
    return torch.ops.torchvision.nms(boxes, scores, float(iou_threshold))


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """``torchvision.ops.batched_nms``: NMS never suppressing across ``idxs``; kept indices by descending score.

    The same two strategies as torchvision's, chosen at the same size: the boxes of each group offset
    past all others' in one NMS call, or, for many boxes, one NMS per group.
    """
    if boxes.numel() > VANILLA_ABOVE.get(boxes.device.type, VANILLA_ABOVE["cuda"]):
        keep_mask = torch.zeros_like(scores, dtype=torch.bool)
        for group in torch.unique(idxs):
            members = torch.where(idxs == group)[0]
            keep_mask[members[nms(boxes[members], scores[members], iou_threshold)]] = True
        kept = torch.where(keep_mask)[0]
        return kept[scores[kept].sort(descending=True)[1]]
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    max_coordinate = boxes.max()
    offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def greedy_nms_matrix(iou: torch.Tensor, threshold: float) -> torch.Tensor:
    """Exact greedy NMS on an IoU matrix whose rows are sorted by descending score; returns kept rows."""
    n = iou.shape[0]
    over = (iou > threshold).cpu()
    suppressed = torch.zeros(n, dtype=torch.bool)
    keep = []
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= over[i]
    return torch.tensor(keep, dtype=torch.int64, device=iou.device)


def rotated_batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy NMS of xywhr boxes by probIoU, never suppressing across ``groups``; indices by score."""
    order = scores.argsort(descending=True)
    kept: list[torch.Tensor] = []
    g_sorted = groups[order]
    for g in torch.unique(g_sorted):
        idx = order[g_sorted == g]
        iou = probiou(boxes[idx], boxes[idx])
        kept.append(idx[greedy_nms_matrix(iou, threshold)])
    if not kept:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    keep = torch.cat(kept)
    return keep[scores[keep].argsort(descending=True)]


def nms_per_tile(dets: Detections, iou: float | None, max_det: int, num_classes: int) -> Detections:
    """Class-aware NMS within each tile, then at most ``max_det`` boxes per tile (best first).

    ``iou=None`` skips the NMS (an end-to-end head already kept one box per object) and only ranks.
    """
    if len(dets) == 0:
        return dets
    groups = dets.tile_ids * num_classes + dets.class_ids
    if iou is None:
        keep = dets.scores.argsort(descending=True, stable=True)
    elif dets.task == "obb":
        keep = rotated_batched_nms(dets.boxes, dets.scores, groups, iou)
    else:
        keep = batched_nms(dets.boxes, dets.scores, groups, iou)
    out = dets.select(keep)
    if max_det > 0:
        # keep is sorted by score; rank each box within its tile and drop those past max_det
        order = torch.argsort(out.tile_ids, stable=True)
        tiles_sorted = out.tile_ids[order]
        first = torch.searchsorted(tiles_sorted, tiles_sorted, right=False)
        rank = torch.arange(len(order), device=order.device) - first
        out = out.select(order[rank < max_det])
    return out
