"""Decode + per-tile NMS against a brute-force reference written with plain Python loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rs_detect import DOTA_CLASSES
from rs_detect.errors import ConfigError, ModelError
from rs_detect.postprocess.decode import DecodeParams, check_output_shape, decode
from rs_detect.postprocess.geometry import obb_corners, probiou, regularize_obb
from rs_detect.postprocess.nms import nms_per_tile
from rs_detect.types import ModelMeta

IMGSZ = 64  # 64/8, 64/16, 64/32 -> 64 + 16 + 4 = 84 anchors


def random_raw(rng: np.random.Generator, b: int, task: str, nc: int = 15) -> torch.Tensor:
    a = sum((IMGSZ // s) ** 2 for s in (8, 16, 32))
    raw = np.zeros((b, 4 + nc + (task == "obb"), a), dtype=np.float32)
    raw[:, 0:2] = rng.uniform(0, IMGSZ, (b, 2, a))
    raw[:, 2:4] = rng.uniform(2, 20, (b, 2, a))
    raw[:, 4 : 4 + nc] = rng.uniform(0, 1, (b, nc, a)) ** 3  # mostly low scores, some high
    if task == "obb":
        raw[:, -1] = rng.uniform(-math.pi / 4, 3 * math.pi / 4, (b, a))
    return torch.from_numpy(raw)


def iou_xyxy(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference(raw: torch.Tensor, meta: ModelMeta, conf: list[float], keep_cls: set[int], iou_thr: float, max_det: int) -> set[tuple]:
    """Loops: per image, per anchor argmax + threshold; per class greedy NMS; top max_det per image."""
    out = set()
    nc = meta.nc
    r = raw.numpy()
    for b in range(r.shape[0]):
        cands = []
        for a in range(r.shape[2]):
            scores = r[b, 4 : 4 + nc, a]
            c = int(np.argmax(scores))
            s = float(scores[c])
            if s < conf[c] or c not in keep_cls:
                continue
            cx, cy, w, h = (float(v) for v in r[b, :4, a])
            if meta.task == "obb":
                box = regularize_obb(torch.tensor([[cx, cy, w, h, float(r[b, 4 + nc, a])]]))[0].tolist()
            else:
                box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
            cands.append((s, c, box))
        cands.sort(key=lambda t: -t[0])
        kept: list[tuple] = []
        for s, c, box in cands:
            same = [k for k in kept if k[1] == c]
            if meta.task == "obb":
                ious = [float(probiou(torch.tensor([box]), torch.tensor([k[2]]))[0, 0]) for k in same]
            else:
                ious = [iou_xyxy(box, k[2]) for k in same]
            if all(v <= iou_thr for v in ious):
                kept.append((s, c, box))
        kept.sort(key=lambda t: -t[0])
        for s, c, box in kept[:max_det]:
            out.add((b, c, round(s, 4), tuple(round(v, 3) for v in box)))
    return out


def as_set(dets) -> set[tuple]:
    return {
        (int(t), int(c), round(float(s), 4), tuple(round(float(v), 3) for v in box))
        for t, c, s, box in zip(dets.tile_ids, dets.class_ids, dets.scores, dets.boxes)
    }


@pytest.mark.parametrize("task", ["detect", "obb"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_and_nms_match_brute_force(task: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    meta = ModelMeta(names=DOTA_CLASSES, imgsz=IMGSZ, task=task)  # type: ignore[arg-type]
    raw = random_raw(rng, b=3, task=task)
    params = DecodeParams.build(meta, conf=0.3, conf_by_class={"ship": 0.5}, classes=("plane", "ship", "harbor"))
    max_det = 7
    got = nms_per_tile(decode(raw, meta, params), iou=0.45, max_det=max_det, num_classes=meta.nc)
    conf = [0.3] * 15
    conf[1] = 0.5
    want = reference(raw, meta, conf, {0, 1, 7}, 0.45, max_det)
    assert len(want) > 5  # the random draw must give NMS something to do
    assert as_set(got) == want


def test_scores_below_threshold_and_filtered_classes_are_dropped() -> None:
    meta = ModelMeta(names=DOTA_CLASSES, imgsz=IMGSZ)
    raw = torch.zeros((1, 19, 84))
    raw[0, :4, 0] = torch.tensor([10.0, 10.0, 4.0, 4.0])
    raw[0, 4 + 2, 0] = 0.9  # storage-tank: filtered out by the default class filter
    raw[0, :4, 1] = torch.tensor([30.0, 30.0, 4.0, 4.0])
    raw[0, 4 + 0, 1] = 0.2  # plane below 0.25
    raw[0, :4, 2] = torch.tensor([50.0, 50.0, 4.0, 6.0])
    raw[0, 4 + 1, 2] = 0.8  # ship: kept
    dets = decode(raw, meta, DecodeParams.build(meta, 0.25, None, ("plane", "ship")))
    assert dets.class_ids.tolist() == [1]
    assert dets.boxes.tolist() == [[48.0, 47.0, 52.0, 53.0]]


def test_thresholds_cached_per_device_follow_a_replaced_copy() -> None:
    """The per-device floor is cached; a copy made with dataclasses.replace (the pipeline's lower
    stitching threshold) must not reuse the original's cached floor, nor the original the copy's."""
    from dataclasses import replace

    meta = ModelMeta(names=DOTA_CLASSES, imgsz=IMGSZ)
    raw = torch.zeros((1, 19, 84))
    raw[0, :4, 0] = torch.tensor([50.0, 50.0, 4.0, 6.0])
    raw[0, 4 + 1, 0] = 0.3  # a ship at 0.3
    params = DecodeParams.build(meta, 0.5, None, ("plane", "ship"))
    assert len(decode(raw, meta, params)) == 0  # caches the 0.5 floor
    low = replace(params, conf=torch.clamp(params.conf, max=0.1))
    assert len(decode(raw, meta, low)) == 1
    assert len(decode(raw, meta, params)) == 0
    assert float(params.floor_on(torch.device("cpu"))[2]) == math.inf  # a class not kept never passes


def test_unknown_class_name_is_refused() -> None:
    meta = ModelMeta(names=DOTA_CLASSES, imgsz=IMGSZ)
    with pytest.raises(ConfigError, match="no class 'boat'"):
        DecodeParams.build(meta, 0.25, None, ("plane", "boat"))


def test_output_shape_check_names_the_expected_shape() -> None:
    meta = ModelMeta(names=DOTA_CLASSES, imgsz=1024, task="obb")
    check_output_shape((4, 20, 21504), meta, "m.onnx")
    with pytest.raises(ModelError, match=r"\[B, 20, 21504\]"):
        check_output_shape((4, 19, 21504), meta, "m.onnx")


def test_obb_corners_and_regularisation() -> None:
    box = torch.tensor([[10.0, 20.0, 4.0, 8.0, 0.0]])
    reg = regularize_obb(box)
    assert reg[0, 2] == 8.0 and reg[0, 3] == 4.0 and abs(float(reg[0, 4]) - math.pi / 2) < 1e-6
    corners = obb_corners(reg)[0]
    assert torch.allclose(corners.min(0).values, torch.tensor([8.0, 16.0]), atol=1e-5)
    assert torch.allclose(corners.max(0).values, torch.tensor([12.0, 24.0]), atol=1e-5)
    # identical boxes have probIoU 1, far apart boxes 0
    two = torch.tensor([[0.0, 0.0, 10.0, 4.0, 0.3], [500.0, 500.0, 10.0, 4.0, 0.3]])
    m = probiou(two, two)
    assert m[0, 0] > 0.99 and m[0, 1] < 1e-3
