"""End-to-end heads (YOLO26, YOLOv10: [B, K, 6|7], no NMS) and boxes clipped to the tile and the scene."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import shapely
import torch

from conftest import write_tif
from rs_detect import DOTA_CLASSES
from rs_detect.config import Config
from rs_detect.engines import metadata
from rs_detect.engines.base import Engine
from rs_detect.errors import ModelError
from rs_detect.pipeline import ScenePipeline
from rs_detect.postprocess.decode import DecodeParams, check_output_shape, decode, is_end2end
from rs_detect.postprocess.nms import nms_per_tile
from rs_detect.types import ModelMeta

IMGSZ = 64


def test_end2end_is_read_from_ultralytics_metadata_or_the_shape(tmp_path: Path) -> None:
    meta = metadata.resolve(tmp_path / "m.onnx", {"names": "{0: 'plane', 1: 'ship'}", "imgsz": "[64, 64]", "end2end": "True"}, None)
    assert meta.end2end
    assert not metadata.resolve(tmp_path / "m.onnx", {"names": "{0: 'plane'}", "end2end": "False"}, None).end2end
    plain = ModelMeta(names=("plane", "ship"), imgsz=IMGSZ)
    assert is_end2end((2, 300, 6), plain) and not is_end2end((2, 6, plain.num_anchors), plain)  # nc=2: 4+2 = 6 channels too
    assert is_end2end((2, 300, 7), ModelMeta(names=("plane",), imgsz=IMGSZ, task="obb"))
    check_output_shape((1, 300, 6), plain, "m.onnx")  # accepted
    with pytest.raises(ModelError, match=r"\[B, K, 6\]"):
        check_output_shape((1, 300, 7), ModelMeta(names=("plane", "ship"), imgsz=IMGSZ, end2end=True), "m.onnx")
    with pytest.raises(ModelError, match="nor an end-to-end"):
        check_output_shape((1, 300, 9), plain, "m.onnx")


def test_end2end_rows_decode_without_nms() -> None:
    meta = ModelMeta(names=DOTA_CLASSES, imgsz=IMGSZ, end2end=True)
    raw = torch.zeros((2, 5, 6))
    raw[0, 0] = torch.tensor([10, 12, 30, 28, 0.9, 1])  # ship
    raw[0, 1] = torch.tensor([11, 12, 31, 28, 0.8, 1])  # overlaps the first (IoU 0.9): kept, no NMS
    raw[0, 2] = torch.tensor([1, 2, 3, 4, 0.1, 0])  # under the threshold
    raw[1, 0] = torch.tensor([40, 40, 50, 60, 0.7, 0])  # plane, second image
    raw[1, 1] = torch.tensor([5, 5, 9, 9, 0.95, 2])  # storage-tank: not a kept class
    params = DecodeParams.build(meta, 0.25, None, ("plane", "ship"))
    dets = decode(raw, meta, params)
    assert dets.tile_ids.tolist() == [0, 0, 1] and dets.class_ids.tolist() == [1, 1, 0]
    assert dets.boxes.tolist() == [[10, 12, 30, 28], [11, 12, 31, 28], [40, 40, 50, 60]]
    assert dets.scores.tolist() == pytest.approx([0.9, 0.8, 0.7])
    kept = nms_per_tile(dets, None, 300, meta.nc)  # iou None: rank only
    assert len(kept) == 3 and kept.scores.tolist() == pytest.approx([0.9, 0.8, 0.7])
    assert len(nms_per_tile(dets, None, 1, meta.nc)) == 2  # max_det still applies per tile


def test_end2end_obb_rows_decode_to_regular_xywhr() -> None:
    meta = ModelMeta(names=DOTA_CLASSES, imgsz=IMGSZ, task="obb")  # no metadata flag: found by the shape
    raw = torch.zeros((1, 3, 7))
    raw[0, 0] = torch.tensor([20, 20, 8, 16, 0.9, 0, 0.3])  # h > w: swapped, angle + pi/2
    raw[0, 1] = torch.tensor([40, 30, 16, 8, 0.6, 1, -0.2])  # negative angle: into [0, pi)
    dets = decode(raw, meta, DecodeParams.build(meta, 0.25, None, None))
    assert np.allclose(dets.boxes.numpy(), [[20, 20, 16, 8, 0.3 + math.pi / 2], [40, 30, 16, 8, math.pi - 0.2]], atol=1e-5)
    assert dets.class_ids.tolist() == [0, 1]


class CornerEngine(Engine):
    """Puts one box on the upper-left corner of every tile, reaching 10 px past it (and one past the
    lower-right), in the YOLOv8 layout or the end-to-end one."""

    backend = "fake"

    def __init__(self, task: str = "detect", end2end: bool = False) -> None:
        super().__init__(ModelMeta(names=DOTA_CLASSES, imgsz=IMGSZ, channels=1, task=task, end2end=end2end,  # type: ignore[arg-type]
                                   max_batch=4, opt_batch=4, source="corner"), torch.device("cpu"))

    def _infer(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        n, m = len(images), self.meta
        rows = [(0.0, 0.0, 20.0, 20.0, 0), (IMGSZ, IMGSZ, 24.0, 24.0, 1)]  # cx, cy, w, h, class
        if m.end2end:
            out = torch.zeros((n, 10, m.end2end_width))
            for k, (cx, cy, w, h, c) in enumerate(rows):
                out[:, k, :6] = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, 0.9, c]) if m.task == "detect" \
                    else torch.tensor([cx, cy, w, h, 0.9, c])
                if m.task == "obb":
                    out[:, k, 6] = 0.4
            return out
        out = torch.zeros((n, m.output_channels, m.num_anchors))
        for k, (cx, cy, w, h, c) in enumerate(rows):
            out[:, :4, k] = torch.tensor([cx, cy, w, h])
            out[:, 4 + c, k] = 0.9
            if m.task == "obb":
                out[:, 4 + m.nc, k] = 0.4
        return out


@pytest.mark.parametrize("task", ["detect", "obb"])
@pytest.mark.parametrize("end2end", [False, True])
def test_boxes_and_polygons_stay_inside_the_scene(tmp_path: Path, task: str, end2end: bool) -> None:
    w, h = 150, 100  # a partial last tile in both directions: its padding must not hold boxes either
    scene = write_tif(tmp_path / "s.tif", np.full((h, w), 100, dtype=np.uint8), crs=None)
    result = ScenePipeline(CornerEngine(task, end2end), Config(tile_size=IMGSZ, overlap=16, classes=None)).run(scene)
    frame = result.frame
    assert len(frame) >= 2
    footprint = shapely.box(0, 0, w, h)
    assert all(footprint.buffer(1e-6).contains(g) for g in frame.geometry)
    assert (frame[["px_x1", "px_y1"]] >= 0).all().all() and (frame["px_x2"] <= w).all() and (frame["px_y2"] <= h).all()
    # the scene's upper-left corner box: clipped to [0, 10] (HBB) / its polygon cut at the scene edge (OBB)
    corner = frame[(frame.px_x1 == 0) & (frame.px_y1 == 0)]
    assert len(corner) >= 1
    if task == "detect":
        assert corner.iloc[0][["px_x2", "px_y2"]].tolist() == [10.0, 10.0]
        # inside the scene, the box touching the (padded) lower-right of a partial tile ends at the scene's edge
        assert frame.px_x2.max() == w and frame.px_y2.max() == h
    else:
        assert corner.geometry.iloc[0].area < 20 * 20 / 4 + 1e-6  # a quarter of the rectangle, at most
        assert "px_cx" in frame.columns  # the rotated rectangle itself is kept as the model gave it


def test_hbb_clipping_does_not_touch_boxes_inside(tmp_path: Path) -> None:
    from rs_detect.postprocess.stitch import clip_boxes
    from rs_detect.types import Detections

    dets = Detections(torch.tensor([[-3.0, 5, 20, 70], [1, 2, 3, 4]]), torch.tensor([0.9, 0.8]), torch.tensor([0, 1]),
                      torch.tensor([0, 0]))
    out = clip_boxes(dets, torch.tensor([[64.0, 64.0], [64.0, 40.0]]))
    assert out.boxes.tolist() == [[0, 5, 20, 64], [1, 2, 3, 4]]


def test_batch_check_takes_end2end_rows_as_a_set() -> None:
    """Boxes of nearly equal score may swap places at another batch size (no mixing); rows from another
    image are mixing."""
    from rs_detect.engines.modelinfo import compare_batch_runs

    def rows(img: np.ndarray) -> np.ndarray:  # 50 boxes that depend on the image, best first
        rng = np.random.default_rng(int(img.mean() * 1e6))
        out = np.concatenate([rng.random((50, 4)) * 256, np.sort(rng.random(50))[::-1, None], np.zeros((50, 1))], 1)
        return out.astype(np.float32)

    def swapping(images: np.ndarray) -> list[np.ndarray]:
        out = np.stack([rows(im) for im in images])
        if len(images) > 1:
            out[:, [10, 11]] = out[:, [11, 10]]  # another batch size, another order of two boxes
        return [out]

    def mixing(images: np.ndarray) -> list[np.ndarray]:
        return [np.stack([rows(images[0]) for _ in images])]

    assert compare_batch_runs(swapping, 3, 32, np.dtype(np.float32)).ok
    assert not compare_batch_runs(mixing, 3, 32, np.dtype(np.float32)).ok
