"""Small typed values passed between stages.

Everything here is a frozen dataclass or a struct of arrays: no Python object per detection.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:  # annotations only: engines and post-processing import without rasterio
    from affine import Affine
    from rasterio.windows import Window

Task = Literal["detect", "obb"]


@dataclass(frozen=True)
class Tile:
    """One window of the scene.

    ``window`` is the area read from the raster (never outside it); ``width``/``height`` of the
    window are the real pixels, the rest of the model-sized input is padding (bottom/right).
    ``interior`` says which of the tile's edges (left, top, right, bottom) lie inside the scene,
    i.e. are shared with a neighbouring tile: a box touching one of those is cut by the tile.
    """

    index: int
    row: int
    col: int
    window: Window
    transform: Affine
    interior: tuple[bool, bool, bool, bool]

    @property
    def col_off(self) -> int:
        return int(self.window.col_off)

    @property
    def row_off(self) -> int:
        return int(self.window.row_off)

    @property
    def width(self) -> int:
        return int(self.window.width)

    @property
    def height(self) -> int:
        return int(self.window.height)


@dataclass(frozen=True)
class RawBatch:
    """Raw pixels [N, bands, S, S] in the file's dtype (pinned host memory when feeding a GPU, or
    already on it: the GPU reading path), their validity [N, S, S] (None: every pixel valid) and the
    tiles they hold, in slot order. ``ready``: for pixels on the GPU, the event after which they are
    in place (the engine's stream waits for it)."""

    data: torch.Tensor
    valid: torch.Tensor | None
    tiles: tuple[Tile, ...]
    ready: torch.cuda.Event | None = None

    def __post_init__(self) -> None:
        if self.data.ndim != 4 or self.data.shape[0] != len(self.tiles):
            raise ValueError(f"batch data {tuple(self.data.shape)} does not match {len(self.tiles)} tiles")

    @property
    def size(self) -> int:
        return len(self.tiles)


@dataclass(frozen=True)
class SkippedTile:
    """A tile that holds no valid pixel (all nodata): it never reaches the engine, only the counts."""

    tile: Tile


@dataclass(frozen=True)
class ModelMeta:
    """What a model file says about itself (ONNX metadata, engine header, or a YAML sidecar)."""

    names: tuple[str, ...]
    imgsz: int = 1024
    channels: int = 1
    task: Task = "detect"
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    stride: int = 32
    dynamic_batch: bool = True
    conf: float | None = None  # the model's recommended confidence threshold
    conf_by_class: tuple[tuple[str, float], ...] = ()  # the model's recommended per-class thresholds
    source: str = ""
    #: an end-to-end head (YOLO26, YOLOv10): output [B, K, 6] x1, y1, x2, y2, score, class (OBB: [B, K, 7]
    #: cx, cy, w, h, score, class, angle), already one box per object, no NMS
    end2end: bool = False
    #: the model YAML's ``categories:`` (class name -> plane/ship/other), over rs_detect.categories' table
    category_overrides: tuple[tuple[str, str], ...] = ()

    @property
    def categories(self) -> tuple[str, ...]:
        """The category (plane, ship, other) of each class, in model order."""
        from rs_detect.categories import categories_for

        return categories_for(self.names, dict(self.category_overrides))

    @property
    def nc(self) -> int:
        return len(self.names)

    @property
    def num_anchors(self) -> int:
        """YOLOv8 anchors at strides 8, 16, 32: 21504 at 1024."""
        return sum((self.imgsz // s) ** 2 for s in (8, 16, 32))

    @property
    def output_channels(self) -> int:
        return 4 + self.nc + (1 if self.task == "obb" else 0)

    @property
    def end2end_width(self) -> int:
        """Values per box of an end-to-end output: 6 (xyxy, score, class), 7 for OBB (+ angle)."""
        return 7 if self.task == "obb" else 6

    def with_batch(self, min_batch: int, opt_batch: int, max_batch: int, dynamic: bool) -> ModelMeta:
        return replace(self, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, dynamic_batch=dynamic)


@dataclass
class Detections:
    """Detections as a struct of arrays (torch tensors, on whatever device decoded them).

    ``boxes`` is [K, 4] (x1, y1, x2, y2) for ``task == "detect"`` and [K, 5] (cx, cy, w, h, angle in
    radians) for ``task == "obb"``. ``frame`` is ``"tile"`` (pixels of the tile's input) or
    ``"scene"`` (pixels of the whole raster). ``cut`` marks boxes touching an interior tile edge.

    ``tile_ids`` says which tile a box came from, in the terms of its frame; read it through the name
    of what it is there: :attr:`batch_slots` in ``"tile"`` frame (the tile's position in the batch that
    was decoded, which :func:`~rs_detect.postprocess.stitch.to_scene` looks the tile up with) and
    :attr:`scene_tiles` in ``"scene"`` frame (the tile's :attr:`Tile.index`). ``to_scene`` is the one
    step from the first to the second; per-tile NMS groups by either.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    class_ids: torch.Tensor
    tile_ids: torch.Tensor
    task: Task = "detect"
    frame: Literal["tile", "scene"] = "tile"
    cut: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @property
    def batch_slots(self) -> torch.Tensor:
        """[K] position of each box's tile in its decoded batch (``"tile"`` frame only)."""
        if self.frame != "tile":
            raise ValueError("batch_slots: these detections are in scene pixels (use scene_tiles)")
        return self.tile_ids

    @property
    def scene_tiles(self) -> torch.Tensor:
        """[K] :attr:`Tile.index` of each box's tile in the scene (``"scene"`` frame only)."""
        if self.frame != "scene":
            raise ValueError("scene_tiles: these detections are in tile pixels (use batch_slots)")
        return self.tile_ids

    @staticmethod
    def empty(task: Task = "detect", frame: Literal["tile", "scene"] = "scene") -> Detections:
        width = 5 if task == "obb" else 4
        return Detections(
            boxes=torch.zeros((0, width), dtype=torch.float32),
            scores=torch.zeros((0,), dtype=torch.float32),
            class_ids=torch.zeros((0,), dtype=torch.int64),
            tile_ids=torch.zeros((0,), dtype=torch.int64),
            task=task,
            frame=frame,
            cut=torch.zeros((0,), dtype=torch.bool),
        )

    def to(self, device: torch.device | str) -> Detections:
        return Detections(
            boxes=self.boxes.to(device),
            scores=self.scores.to(device),
            class_ids=self.class_ids.to(device),
            tile_ids=self.tile_ids.to(device),
            task=self.task,
            frame=self.frame,
            cut=None if self.cut is None else self.cut.to(device),
        )

    def select(self, keep: torch.Tensor) -> Detections:
        return Detections(
            boxes=self.boxes[keep],
            scores=self.scores[keep],
            class_ids=self.class_ids[keep],
            tile_ids=self.tile_ids[keep],
            task=self.task,
            frame=self.frame,
            cut=None if self.cut is None else self.cut[keep],
        )

    @staticmethod
    def concat(parts: list[Detections], task: Task, frame: Literal["tile", "scene"] = "scene") -> Detections:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Detections.empty(task, frame)
        dev = parts[0].boxes.device
        return Detections(
            boxes=torch.cat([p.boxes.to(dev) for p in parts]),
            scores=torch.cat([p.scores.to(dev) for p in parts]),
            class_ids=torch.cat([p.class_ids.to(dev) for p in parts]),
            tile_ids=torch.cat([p.tile_ids.to(dev) for p in parts]),
            task=task,
            frame=frame,
            cut=torch.cat([
                (p.cut if p.cut is not None else torch.zeros(len(p), dtype=torch.bool, device=dev)).to(dev)
                for p in parts
            ]),
        )

    def aabb(self) -> torch.Tensor:
        """Axis-aligned boxes [K, 4] x1y1x2y2 (for OBB: the rotated rectangle's extent)."""
        if self.task == "detect":
            return self.boxes
        from rs_detect.postprocess.geometry import obb_to_aabb

        return obb_to_aabb(self.boxes)


@dataclass(frozen=True)
class ScaleConfig:
    """How to scale: ``auto`` (uint8: /255, else percentile), ``percentile`` or ``fixed``."""

    method: Literal["auto", "percentile", "fixed"] = "auto"
    low: float | None = None
    high: float | None = None
    percentiles: tuple[float, float] = (2.0, 98.0)


@dataclass(frozen=True)
class ScaleInfo:
    """How raw pixel values became model input in [0, 1]; recorded in the output's metadata."""

    method: Literal["divide", "percentile", "fixed"]
    low: float
    high: float
    percentiles: tuple[float, float] | None = None

    def as_dict(self) -> dict:
        out = {"method": self.method, "low": self.low, "high": self.high}
        if self.percentiles is not None:
            out["percentiles"] = list(self.percentiles)
        return out


@dataclass
class RunStats:
    """Counters the pipeline fills in; printed as the summary line."""

    tiles_total: int = 0
    tiles_read: int = 0
    tiles_skipped: int = 0
    detections_raw: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    reader: str = ""  # the reading path the scene took and why (e.g. "blocks, deflate + predictor, libdeflate, cut on the GPU", "GDAL (striped, not tiled)")
    #: (seconds since reading began, seconds waited) for each item the engine's loop took (a batch, or a tile skipped as
    #: nodata): where in a scene the engine waited for the reader
    reader_waits: list[tuple[float, float]] = field(default_factory=list)

    def add_time(self, stage: str, seconds: float) -> None:
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    @property
    def detections(self) -> int:
        return sum(self.per_class.values())
