"""The synchronous stages after the engine: decode a batch's raw output, then stitch the scene.

    raw [B, C, A] --TileDecoder--> Detections (scene pixels)  ... all batches ... --stitch_scene--> frame

Each is a plain call (tensors in, tensors or a frame out) that starts no thread; the executor decides
which thread runs it. The output thresholds (``--conf``, per-class thresholds, the class filter) are
applied in one place, :meth:`Thresholds.keep`; decoding and stitching run down to the lower
``stitch_conf`` floor so that a whole box just under the threshold can still stand in for a piece of
itself cut by a tile edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rs_detect.georef import detections_frame, to_output_crs
from rs_detect.io.bands import BandPlan
from rs_detect.plan import RunPlan
from rs_detect.postprocess.decode import DecodeParams, decode, is_end2end
from rs_detect.postprocess.nms import nms_per_tile
from rs_detect.postprocess.stitch import merge, reaching, suppress_nested, to_scene
from rs_detect.types import Detections, ModelMeta, RunStats, ScaleInfo, Tile

if TYPE_CHECKING:  # geopandas is imported by the first frame (rs_detect.georef)
    import geopandas as gpd


class Thresholds:
    """The output thresholds of a plan: per-class confidence and the class filter, as one [nc] floor."""

    def __init__(self, plan: RunPlan, meta: ModelMeta) -> None:
        p = plan.postprocess
        self.output = DecodeParams.build(meta, p.conf, dict(p.conf_by_class), p.kept_classes)  # resolved names: selected as the plan did
        #: what decoding keeps: the same classes, down to stitch_conf (never above the output thresholds)
        self.decode = replace(self.output, conf=torch.clamp(self.output.conf, max=p.stitch_conf))

    def passing(self, dets: Detections) -> torch.Tensor:
        """[K] bool: the detections that reach their class's output threshold."""
        return reaching(dets, self.output.conf)

    def keep(self, dets: Detections) -> Detections:
        """The detections that reach their class's output threshold."""
        if len(dets) == 0:
            return dets
        return dets.select(self.passing(dets).nonzero(as_tuple=True)[0])


class TileDecoder:
    """Raw engine output of one batch -> candidate detections in scene pixels (decode, per-tile NMS, shift)."""

    def __init__(self, plan: RunPlan, meta: ModelMeta, thresholds: Thresholds) -> None:
        self.meta, self.thresholds = meta, thresholds
        self.iou, self.max_det, self.edge_margin = plan.postprocess.iou, plan.postprocess.max_det, plan.tiling.edge_margin

    def __call__(self, raw: torch.Tensor, tiles: Sequence[Tile]) -> Detections:
        cands = decode(raw, self.meta, self.thresholds.decode)
        iou = None if is_end2end(tuple(raw.shape), self.meta) else self.iou  # end-to-end heads: no NMS
        kept = nms_per_tile(cands, iou, self.max_det, self.meta.nc)
        return to_scene(kept, tiles, self.edge_margin).to("cpu")


def exclusive_ids(plan: RunPlan, meta: ModelMeta) -> tuple[int, ...]:
    names = list(meta.names)
    return tuple(sorted({names.index(c) for c in plan.postprocess.exclusive_model_classes}))


def stitch_scene(parts: list[Detections], plan: RunPlan, meta: ModelMeta, thresholds: Thresholds) -> Detections:
    """Every batch's detections -> the scene's: boxes cut by tile edges merged, thresholds applied,
    nested boxes of exclusive classes and duplicates suppressed."""
    p = plan.postprocess
    merged = merge(Detections.concat(parts, meta.task), p.merge_iou, p.merge_ios)
    return suppress_nested(thresholds.keep(merged), exclusive_ids(plan, meta), p.exclusive_ios, p.duplicate_ios)


def georeference(dets: Detections, plan: RunPlan, meta: ModelMeta, transform: Any, crs: Any, scene: str,
                 size: tuple[int, int]) -> gpd.GeoDataFrame:
    """Scene-pixel detections -> polygons (clipped to the scene's ``size``) in the output CRS."""
    frame = detections_frame(dets, meta.names, transform, crs, scene, categories=meta.categories, size=size)
    return to_output_crs(frame, plan.output.crs, scene)


@dataclass
class SceneResult:
    """One scene's run: its detections (scene pixels and the written frame), counters, the plan in force,
    and what was found on the way (the band plan and the stretch, for the preview)."""

    scene: Path
    output: Path | None
    frame: gpd.GeoDataFrame
    detections: Detections
    stats: RunStats
    metadata: dict[str, Any] = field(default_factory=dict)
    plan: RunPlan | None = None
    band_plan: BandPlan | None = None  # the bands read and how they were combined
    scale: ScaleInfo | None = None  # the stretch measured on the scene

    def summary(self) -> str:
        s = self.stats
        per = ", ".join(f"{k} {v}" for k, v in sorted(s.per_class.items())) or "none"
        dest = f" -> {self.output}" if self.output else ""
        return (
            f"{self.scene.name}: {s.tiles_read} tiles read, {s.tiles_skipped} skipped (nodata), "
            f"{s.detections} detections ({per}) in {s.seconds:.1f} s{dest}" + (f" [read: {s.reader}]" if s.reader else "")
        )
