"""Decode raw YOLOv8 output into candidate boxes, vectorised over the whole batch.

HBB: [B, 4 + nc, A] = cx, cy, w, h (input pixels), then nc class scores (already sigmoid, no objectness).
OBB: [B, 4 + nc + 1, A]: the same, then one angle channel (radians).
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
        names = list(meta.names)
        thr = torch.full((meta.nc,), float(conf))
        for name, value in (conf_by_class or {}).items():
            if name not in names:
                raise ModelError(f"conf_by_class: unknown class {name!r} (model classes: {', '.join(names)})")
            thr[names.index(name)] = float(value)
        keep = torch.ones(meta.nc, dtype=torch.bool)
        if classes:
            unknown = [c for c in classes if c not in names]
            if unknown:
                raise ModelError(f"--classes: unknown class {unknown[0]!r} (model classes: {', '.join(names)})")
            keep[:] = False
            for c in classes:
                keep[names.index(c)] = True
        return DecodeParams(thr, keep)


def check_output_shape(shape: tuple[int, ...], meta: ModelMeta, where: str) -> None:
    """Refuse an output that is not [B, 4 + nc (+1), A] for this model's metadata."""
    if len(shape) != 3 or shape[1] != meta.output_channels or shape[2] != meta.num_anchors:
        extra = " + 1 angle" if meta.task == "obb" else ""
        raise ModelError(
            f"{where}: output shape {list(shape)} is not [B, {meta.output_channels}, {meta.num_anchors}] "
            f"(4 box + {meta.nc} classes{extra} at {meta.imgsz}px, task {meta.task})"
        )


def decode(raw: torch.Tensor, meta: ModelMeta, params: DecodeParams) -> Detections:
    """Raw [B, C, A] -> candidates above threshold, in tile pixels; ``tile_ids`` hold the batch index."""
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
