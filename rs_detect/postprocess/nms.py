"""Class-aware NMS inside each tile (torchvision for axis-aligned boxes, probIoU for oriented ones)."""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms

from rs_detect.postprocess.geometry import probiou
from rs_detect.types import Detections


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
