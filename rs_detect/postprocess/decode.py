"""Decode raw YOLO output into candidate boxes, vectorised over the whole batch.

Two layouts, told apart by the model's metadata (Ultralytics writes ``end2end``) or by the shape:

* YOLOv8 / YOLO11 heads, one row per anchor, NMS needed:
  HBB [B, 4 + nc, A] = cx, cy, w, h (input pixels), then nc class scores (already sigmoid, no objectness);
  OBB [B, 4 + nc + 1, A]: the same, then one angle channel (radians).
* end-to-end heads (YOLO26, YOLOv10), one row per object, best first, no NMS:
  HBB [B, K, 6] = x1, y1, x2, y2, score, class; OBB [B, K, 7] = cx, cy, w, h, score, class, angle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rs_detect.errors import ModelError
from rs_detect.postprocess.geometry import regularize_obb, xywh_to_xyxy
from rs_detect.types import Detections, ModelMeta


@dataclass(frozen=True)
class DecodeParams:
    """Thresholds for one model: per-class confidence floor and the classes to keep."""

    conf: torch.Tensor  # [nc] float, per-class confidence threshold
    keep_class: torch.Tensor  # [nc] bool
    max_candidates: int = 30000  # per image, before NMS (as Ultralytics' max_nms)
    # per-device cache of floor_on; not an init field, so dataclasses.replace() starts a fresh one
    _on: dict[torch.device, torch.Tensor] = field(default_factory=dict, init=False, compare=False, repr=False)

    def floor_on(self, device: torch.device) -> torch.Tensor:
        """[nc] score a candidate of each class must reach (inf: class not kept), cached per device.

        Copied to a GPU once, not per batch: a host-to-device copy of pageable memory waits for the
        copy, in the post-processing thread, twice a batch.
        """
        floor = self._on.get(device)
        if floor is None:
            floor = torch.where(self.keep_class, self.conf, torch.tensor(float("inf"))).to(device)
            self._on[device] = floor
        return floor

    @staticmethod
    def build(meta: ModelMeta, conf: float, conf_by_class: dict[str, float] | None, classes: tuple[str, ...] | None) -> DecodeParams:
        """Thresholds and the kept classes; ``classes`` as :func:`rs_detect.categories.select` reads them
        (categories, model class names, ``all``; None keeps every class)."""
        from rs_detect.categories import normalize, select

        names = list(meta.names)
        keys = [normalize(n) for n in names]
        thr = torch.full((meta.nc,), float(conf))
        for name, value in (conf_by_class or {}).items():
            if normalize(name) not in keys:
                raise ModelError(f"conf_by_class: unknown class {name!r} (model classes: {', '.join(names)})")
            thr[keys.index(normalize(name))] = float(value)
        keep = torch.ones(meta.nc, dtype=torch.bool)
        ids = select(classes, names, meta.categories, "--classes")
        if ids is not None:
            keep[:] = False
            keep[list(ids)] = True
        return DecodeParams(thr, keep)


def is_end2end(shape: tuple[int, ...], meta: ModelMeta) -> bool:
    """Whether an output of ``shape`` is an end-to-end [B, K, 6|7] one: the metadata says so, or the shape
    is not the anchor layout [B, 4 + nc (+1), A] but has 6 (OBB: 7) values per row."""
    if meta.end2end:
        return True
    if len(shape) != 3 or (shape[1] == meta.output_channels and shape[2] == meta.num_anchors):
        return False
    return shape[2] == meta.end2end_width


def check_output_shape(shape: tuple[int, ...], meta: ModelMeta, where: str) -> None:
    """Refuse an output that is neither [B, 4 + nc (+1), A] nor end-to-end [B, K, 6 (+1)] for this model."""
    extra = " + 1 angle" if meta.task == "obb" else ""
    if is_end2end(shape, meta):
        if len(shape) != 3 or shape[2] != meta.end2end_width:
            raise ModelError(
                f"{where}: output shape {list(shape)} is not the end-to-end [B, K, {meta.end2end_width}] "
                f"(box, score, class{extra}, task {meta.task}) its metadata promises"
            )
        return
    if len(shape) != 3 or shape[1] != meta.output_channels or shape[2] != meta.num_anchors:
        raise ModelError(
            f"{where}: output shape {list(shape)} is not [B, {meta.output_channels}, {meta.num_anchors}] "
            f"(4 box + {meta.nc} classes{extra} at {meta.imgsz}px, task {meta.task}) "
            f"nor an end-to-end [B, K, {meta.end2end_width}]"
        )


def decode(raw: torch.Tensor, meta: ModelMeta, params: DecodeParams) -> Detections:
    """Raw output -> candidates above threshold, in tile pixels; ``tile_ids`` hold the batch index."""
    if is_end2end(tuple(raw.shape), meta):
        return decode_end2end(raw, meta, params)
    nc = meta.nc
    raw = raw.float()
    scores, class_ids = raw[:, 4 : 4 + nc].max(dim=1)  # [B, A]
    keep = scores >= params.floor_on(raw.device)[class_ids]
    b_idx, a_idx = keep.nonzero(as_tuple=True)
    if b_idx.numel() == 0:
        return Detections.empty(meta.task, "tile").to(raw.device)
    if b_idx.numel() > params.max_candidates * raw.shape[0]:
        # Pathological (untrained model, conf 0): keep the best per batch to bound NMS memory.
        top = scores[b_idx, a_idx].topk(params.max_candidates * raw.shape[0]).indices
        b_idx, a_idx = b_idx[top], a_idx[top]
    sel = raw[b_idx, :, a_idx]  # [N, C]
    if meta.task == "obb":
        boxes = regularize_obb(torch.cat((sel[:, :4], sel[:, 4 + nc : 5 + nc]), dim=1))
    else:
        boxes = xywh_to_xyxy(sel[:, :4])
    return Detections(
        boxes=boxes,
        scores=scores[b_idx, a_idx],
        class_ids=class_ids[b_idx, a_idx],
        tile_ids=b_idx,
        task=meta.task,
        frame="tile",
    )


def decode_end2end(raw: torch.Tensor, meta: ModelMeta, params: DecodeParams) -> Detections:
    """End-to-end [B, K, 6 | 7] -> the rows above threshold (no NMS: the head kept one box per object)."""
    raw = raw.float()
    scores = raw[..., 4]
    class_ids = raw[..., 5].round().long().clamp_(0, meta.nc - 1)
    keep = scores >= params.floor_on(raw.device)[class_ids]
    b_idx, k_idx = keep.nonzero(as_tuple=True)
    if b_idx.numel() == 0:
        return Detections.empty(meta.task, "tile").to(raw.device)
    sel = raw[b_idx, k_idx]  # [N, 6 | 7]
    if meta.task == "obb":
        boxes = regularize_obb(torch.cat((sel[:, :4], sel[:, 6:7]), dim=1))
    else:
        boxes = sel[:, :4].clone()
    return Detections(
        boxes=boxes,
        scores=sel[:, 4].clone(),
        class_ids=class_ids[b_idx, k_idx],
        tile_ids=b_idx,
        task=meta.task,
        frame="tile",
    )
