"""Box geometry in torch (runs on whatever device the boxes live on).

Oriented boxes are ``xywhr``: centre, width, height and an angle in radians measured from the +x
(column) axis towards +y (row), as Ultralytics' OBB models emit them.
"""

from __future__ import annotations

import math

import torch


def xywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def regularize_obb(b: torch.Tensor) -> torch.Tensor:
    """Make w >= h and the angle lie in [0, pi): one canonical form per rectangle."""
    cx, cy, w, h, a = b.unbind(-1)
    swap = w < h
    w2 = torch.where(swap, h, w)
    h2 = torch.where(swap, w, h)
    a2 = torch.where(swap, a + math.pi / 2, a) % math.pi
    return torch.stack((cx, cy, w2, h2, a2), dim=-1)


def obb_corners(b: torch.Tensor) -> torch.Tensor:
    """[K, 5] xywhr -> [K, 4, 2] corners in order (counter-clockwise in image space)."""
    cx, cy, w, h, a = b.unbind(-1)
    cos, sin = torch.cos(a), torch.sin(a)
    dx = torch.stack((w / 2 * cos, w / 2 * sin), dim=-1)  # along the width axis
    dy = torch.stack((-h / 2 * sin, h / 2 * cos), dim=-1)  # along the height axis
    c = torch.stack((cx, cy), dim=-1)
    return torch.stack((c + dx + dy, c + dx - dy, c - dx - dy, c - dx + dy), dim=-2)


def obb_to_aabb(b: torch.Tensor) -> torch.Tensor:
    corners = obb_corners(b)
    return torch.cat((corners.min(dim=-2).values, corners.max(dim=-2).values), dim=-1)


def box_iou_ios(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise IoU and intersection-over-smaller of paired xyxy boxes [P, 4]."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=1e-9)
    ios = inter / torch.minimum(area_a, area_b).clamp(min=1e-9)
    return iou, ios


def _covariance(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a = b[..., 2].pow(2) / 12
    bb = b[..., 3].pow(2) / 12
    c, s = torch.cos(b[..., 4]), torch.sin(b[..., 4])
    return a * c * c + bb * s * s, a * s * s + bb * c * c, (a - bb) * c * s


def probiou(obb1: torch.Tensor, obb2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic IoU matrix [N, M] of oriented boxes (Gaussian Bhattacharyya, as YOLOv8-OBB's NMS)."""
    x1, y1 = obb1[:, None, 0], obb1[:, None, 1]
    x2, y2 = obb2[None, :, 0], obb2[None, :, 1]
    a1, b1, c1 = (t[:, None] for t in _covariance(obb1))
    a2, b2, c2 = (t[None, :] for t in _covariance(obb2))
    den = (a1 + a2) * (b1 + b2) - (c1 + c2).pow(2)
    t1 = ((a1 + a2) * (y1 - y2).pow(2) + (b1 + b2) * (x1 - x2).pow(2)) / (den + eps) * 0.25
    t2 = ((c1 + c2) * (x2 - x1) * (y1 - y2)) / (den + eps) * 0.5
    t3 = (den / (4 * ((a1 * b1 - c1.pow(2)).clamp(min=0) * (a2 * b2 - c2.pow(2)).clamp(min=0)).sqrt() + eps) + eps).log() * 0.5
    bd = (t1 + t2 + t3).clamp(eps, 100.0)
    hd = (1.0 - (-bd).exp() + eps).sqrt()
    return 1 - hd
