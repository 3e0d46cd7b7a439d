"""Stitch per-tile detections into one set for the scene, each object once, with its full extent.

1. ``to_scene`` shifts boxes to scene pixels and marks a box *cut* when it touches an edge of its tile
   that lies inside the scene (shared with a neighbour), i.e. the tile saw only part of the object.
2. ``merge`` works on the whole scene (scene-wide coordinates; no fixed class offsets) with a spatial
   index. Two boxes of the same class from different tiles are the same object when their IoU is at
   least ``iou``, or, when one of them is cut, when the intersection over the smaller box is at least
   ``ios`` (the cut piece lies inside the whole box the neighbouring tile saw). Greedily, whole boxes
   win over cut ones and higher scores over lower; an object that no tile saw whole (larger than the
   overlap) keeps the union of its cut pieces. The box that stands for a group keeps the group's best
   score: the pipeline stitches boxes down to a lower score (``stitch_conf``) than it outputs, so the
   whole view of an edge object that one tile scored under the threshold replaces the cut piece that
   another tile scored over it, instead of the piece being reported (a false positive and a miss).
3. ``suppress_nested`` removes a box lying (mostly) inside a higher-scoring box of a *different* class,
   among a set of mutually exclusive classes (by default plane and ship: they never nest in overhead
   imagery, so the model scoring a wing or a fuselage as a ship is a false positive). A pair is nested
   when the intersection over the smaller box is at least ``ios``; greedily by descending score, the
   lower-scoring one goes, and a box already removed removes nothing. Classes outside the set (a ship in
   a harbor, a helicopter on a deck) are left alone. With ``same_class_ios``, a box lying at least that
   much inside a higher-scoring box of its *own* class goes too: a second, partial box of one object
   that NMS (IoU) and the cross-tile merge let through, e.g. a ship's bow boxed again inside the ship.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import shapely
import torch

from rs_detect.postprocess.geometry import box_iou_ios, obb_corners
from rs_detect.types import Detections, Tile


def to_scene(dets: Detections, tiles: Sequence[Tile], edge_margin: float = 3.0) -> Detections:
    """Tile-frame detections (``batch_slots``: positions in ``tiles``) -> scene frame (``scene_tiles``), cut flags set."""
    if len(dets) == 0:
        return Detections.empty(dets.task, "scene")
    # one table of the tiles (a single copy to the device, a single gather): offset, size, interior edges, index
    table = torch.tensor([[t.col_off, t.row_off, t.width, t.height, *t.interior, t.index] for t in tiles], dtype=torch.int64)
    info = table.to(dets.boxes.device)[dets.batch_slots]
    offs, sizes = info[:, 0:2].float(), info[:, 2:4].float()
    interior = info[:, 4:8].bool()
    if dets.task == "detect":
        # clip to the tile's real pixels (never its padding, never past the scene), as Ultralytics clips
        # its boxes to the image after NMS; rotated boxes keep their rectangle (clipped as polygons later)
        dets = clip_boxes(dets, sizes)
    aabb = dets.aabb()
    cut = (
        (interior[:, 0] & (aabb[:, 0] <= edge_margin))
        | (interior[:, 1] & (aabb[:, 1] <= edge_margin))
        | (interior[:, 2] & (aabb[:, 2] >= sizes[:, 0] - edge_margin))
        | (interior[:, 3] & (aabb[:, 3] >= sizes[:, 1] - edge_margin))
    )
    boxes = dets.boxes.clone()
    if dets.task == "obb":
        boxes[:, :2] += offs
    else:
        boxes[:, :4] += offs.repeat(1, 2)
    return Detections(boxes, dets.scores, dets.class_ids, info[:, 8].clone(), dets.task, "scene", cut)


def clip_boxes(dets: Detections, sizes: torch.Tensor) -> Detections:
    """Axis-aligned tile-frame boxes clipped to [0, width] x [0, height] of their tile (``sizes``: [N, 2])."""
    w, h = sizes[:, 0], sizes[:, 1]
    b = dets.boxes
    boxes = torch.stack((torch.minimum(b[:, 0].clamp(min=0), w), torch.minimum(b[:, 1].clamp(min=0), h),
                         torch.minimum(b[:, 2].clamp(min=0), w), torch.minimum(b[:, 3].clamp(min=0), h)), dim=1)
    return Detections(boxes, dets.scores, dets.class_ids, dets.tile_ids, dets.task, dets.frame, dets.cut)


def _pairs(aabb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of intersecting axis-aligned boxes, through shapely's STRtree."""
    geoms = shapely.box(aabb[:, 0], aabb[:, 1], aabb[:, 2], aabb[:, 3])
    tree = shapely.STRtree(geoms)
    i, j = tree.query(geoms, predicate="intersects")
    sel = i < j
    return i[sel], j[sel]


def _obb_polygons(boxes: np.ndarray) -> np.ndarray:
    corners = obb_corners(torch.from_numpy(boxes)).numpy()
    return shapely.polygons(corners)


def _pair_overlap(dets: Detections, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if dets.task == "obb":
        polys = _obb_polygons(dets.boxes.cpu().numpy().astype(np.float64))
        inter = shapely.area(shapely.intersection(polys[i], polys[j]))
        area = shapely.area(polys)
        union = area[i] + area[j] - inter
        return inter / np.maximum(union, 1e-9), inter / np.maximum(np.minimum(area[i], area[j]), 1e-9)
    b = dets.boxes.cpu().double()
    iou, ios = box_iou_ios(b[torch.from_numpy(i)], b[torch.from_numpy(j)])
    return iou.numpy(), ios.numpy()


def _union_obb(boxes: np.ndarray) -> np.ndarray:
    """The minimum rotated rectangle around several oriented boxes, as xywhr."""
    rect = shapely.minimum_rotated_rectangle(shapely.union_all(_obb_polygons(boxes)))
    xy = np.asarray(rect.exterior.coords)[:4]
    e1, e2 = xy[1] - xy[0], xy[2] - xy[1]
    w, h = np.hypot(*e1), np.hypot(*e2)
    if w < h:
        w, h, e1 = h, w, e2
    angle = np.arctan2(e1[1], e1[0]) % np.pi
    c = xy.mean(axis=0)
    return np.array([c[0], c[1], w, h, angle], dtype=np.float32)


def merge(dets: Detections, iou: float = 0.5, ios: float = 0.6) -> Detections:
    """Each object once across tiles (see the module docstring)."""
    n = len(dets)
    if n < 2:
        return dets
    aabb = dets.aabb().detach().cpu().numpy().astype(np.float64)
    i, j = _pairs(aabb)
    cls = dets.class_ids.cpu().numpy()
    tile = dets.scene_tiles.cpu().numpy()
    cut = dets.cut.cpu().numpy() if dets.cut is not None else np.zeros(n, dtype=bool)
    sel = (cls[i] == cls[j]) & (tile[i] != tile[j])
    i, j = i[sel], j[sel]
    if i.size == 0:
        return dets
    pair_iou, pair_ios = _pair_overlap(dets, i, j)
    match = (pair_iou >= iou) | ((cut[i] | cut[j]) & (pair_ios >= ios))
    i, j = i[match], j[match]
    if i.size == 0:
        return dets

    neighbours: dict[int, list[int]] = {}
    for a, b in zip(i.tolist(), j.tolist()):
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    scores = dets.scores.cpu().numpy()
    # whole boxes first, then by score: the greedy order of the merge
    order = np.lexsort((-scores, cut))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    removed = np.zeros(n, dtype=bool)
    boxes = dets.boxes.detach().cpu().numpy().copy()
    new_cut = cut.copy()
    best = scores.copy()
    for k in order.tolist():
        if removed[k] or k not in neighbours:
            continue
        group = [m for m in neighbours[k] if not removed[m] and rank[m] > rank[k]]
        if not group:
            continue
        removed[group] = True
        best[k] = max(best[k], float(scores[group].max()))
        if cut[k]:
            # no tile saw this object whole: keep the union of the pieces
            pieces = [k, *(m for m in group if cut[m])]
            if dets.task == "obb":
                boxes[k] = _union_obb(boxes[pieces].astype(np.float64))
            else:
                boxes[k, :2] = boxes[pieces, :2].min(axis=0)
                boxes[k, 2:] = boxes[pieces, 2:].max(axis=0)
            new_cut[k] = True
    keep = torch.from_numpy(np.flatnonzero(~removed))
    out = dets.select(keep.to(dets.boxes.device))
    out.boxes = torch.from_numpy(boxes[~removed]).to(dets.boxes.device)
    out.cut = torch.from_numpy(new_cut[~removed]).to(dets.boxes.device)
    out.scores = torch.from_numpy(best[~removed]).to(dets.scores.device, dets.scores.dtype)
    return out


def reaching(dets: Detections, conf: torch.Tensor) -> torch.Tensor:
    """[N] bool: whose score reaches its class's threshold (``conf``: [nc])."""
    return dets.scores >= conf.to(dets.scores.device)[dets.class_ids]


def above(dets: Detections, conf: torch.Tensor) -> Detections:
    """The detections whose score reaches their class's threshold (``conf``: [nc])."""
    if len(dets) == 0:
        return dets
    return dets.select(reaching(dets, conf).nonzero(as_tuple=True)[0])


def suppress_nested(dets: Detections, class_ids: Sequence[int] | set[int], ios: float = 0.7,
                    same_class_ios: float | None = None) -> Detections:
    """Drop the lower-scoring of two nested boxes: of different exclusive classes at ``ios``, of one class
    at ``same_class_ios`` (None: never; see the module docstring)."""
    n = len(dets)
    ids = sorted({int(c) for c in class_ids})
    if n < 2 or not (ids or same_class_ios is not None):
        return dets
    cls = dets.class_ids.cpu().numpy()
    aabb = dets.aabb().detach().cpu().numpy().astype(np.float64)
    i, j = _pairs(aabb)
    # each pair's threshold: ios across exclusive classes, same_class_ios within a class, none otherwise
    same = cls[i] == cls[j]
    limit = np.full(i.size, np.inf)
    limit[~same & np.isin(cls[i], ids) & np.isin(cls[j], ids)] = ios
    if same_class_ios is not None:
        limit[same] = same_class_ios
    sel = np.isfinite(limit)
    i, j, limit = i[sel], j[sel], limit[sel]
    if i.size == 0:
        return dets
    _, pair_ios = _pair_overlap(dets, i, j)
    nested = pair_ios >= limit
    i, j = i[nested], j[nested]
    if i.size == 0:
        return dets
    # the greedy order: by descending score, a tie going to the earlier detection
    scores = dets.scores.detach().cpu().numpy()
    rank = np.empty(n, dtype=np.int64)
    rank[np.lexsort((np.arange(n), -scores))] = np.arange(n)
    i_wins = rank[i] < rank[j]
    win, lose = np.where(i_wins, i, j), np.where(i_wins, j, i)
    order = np.argsort(rank[win], kind="stable")
    removed = np.zeros(n, dtype=bool)
    for w, lo in zip(win[order].tolist(), lose[order].tolist()):
        if not removed[w]:
            removed[lo] = True
    if not removed.any():
        return dets
    keep = torch.from_numpy(np.flatnonzero(~removed))
    return dets.select(keep.to(dets.boxes.device))
