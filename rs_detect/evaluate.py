"""Detections against ground truth: precision, recall, F1 and AP50 per class.

Matching is greedy by descending score, per class: a detection is a true positive when its IoU with
a not-yet-matched truth object is at least ``iou``; a second detection of the same object is a false
positive (duplicates count against precision). Boxes are compared as axis-aligned scene-pixel boxes
(``px_x1..px_y2``, written by both ``rs-detect`` and ``rs-detect synth``) or as polygons
(``--match polygon``: rotated boxes, compared in the truth's CRS).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import geopandas as gpd
import numpy as np
import shapely

from rs_detect.errors import InputError, one_line

PX = ["px_x1", "px_y1", "px_x2", "px_y2"]


@dataclass(frozen=True)
class ClassScore:
    class_name: str
    truth: int
    detections: int
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    ap50: float
    edge_truth: int
    edge_recall: float


def _read(path: Path, what: str) -> gpd.GeoDataFrame:
    if not path.is_file():
        raise InputError(f"{path}: no such {what} file")
    try:
        if path.suffix.lower() in (".parquet", ".geoparquet"):
            return gpd.read_parquet(path)
        layer = "detections" if path.suffix.lower() == ".gpkg" else None
        return gpd.read_file(path, layer=layer)
    except Exception as exc:  # pyogrio/arrow raise many types for unreadable files
        raise InputError(f"{path}: cannot read {what} ({one_line(exc, 160)})") from None


def _geoms(gdf: gpd.GeoDataFrame, mode: Literal["box", "polygon"], crs: object) -> np.ndarray:
    if mode == "box":
        if not set(PX) <= set(gdf.columns):
            raise InputError(f"box matching needs the columns {', '.join(PX)}")
        b = gdf[PX].to_numpy(dtype=np.float64)
        return shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3])
    if crs is not None and gdf.crs is not None and gdf.crs != crs:
        gdf = gdf.to_crs(crs)
    return np.asarray(gdf.geometry.values)


def duplicate_pairs(pred: gpd.GeoDataFrame, ios: float = 0.5) -> int:
    """Pairs of same-class detections of which one lies more than ``ios`` inside the other (pixel boxes):
    an object reported twice, e.g. once whole and once as a piece cut by a tile edge."""
    if len(pred) < 2:
        return 0
    b = pred[PX].to_numpy()
    boxes = shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3])
    i, j = shapely.STRtree(boxes).query(boxes, predicate="intersects")
    names = pred["class_name"].to_numpy()
    sel = (i < j) & (names[i] == names[j])
    i, j = i[sel], j[sel]
    inter = shapely.area(shapely.intersection(boxes[i], boxes[j]))
    return int((inter / np.minimum(shapely.area(boxes[i]), shapely.area(boxes[j])) > ios).sum())


def average_precision(tp: np.ndarray, n_truth: int) -> float:
    """All-point interpolated AP (VOC 2010+) of detections already sorted by descending score."""
    if n_truth == 0:
        return float("nan")
    if tp.size == 0:
        return 0.0
    ctp = np.cumsum(tp)
    recall = ctp / n_truth
    precision = ctp / np.arange(1, tp.size + 1)
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[1.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    return float(np.sum((r[1:] - r[:-1]) * p[1:]))


def evaluate(pred: gpd.GeoDataFrame, truth: gpd.GeoDataFrame, iou: float = 0.5,
             match: Literal["box", "polygon"] = "box", classes: list[str] | None = None) -> list[ClassScore]:
    names = classes or sorted(set(truth["class_name"]) | set(pred["class_name"]))
    pg = _geoms(pred, match, truth.crs)
    tg = _geoms(truth, match, truth.crs)
    edge = truth["edge"].to_numpy(dtype=bool) if "edge" in truth.columns else np.zeros(len(truth), dtype=bool)
    scores = []
    for name in names:
        pi = np.flatnonzero(pred["class_name"].to_numpy() == name)
        ti = np.flatnonzero(truth["class_name"].to_numpy() == name)
        pi = pi[np.argsort(-pred["score"].to_numpy()[pi], kind="stable")] if "score" in pred.columns else pi
        tp = np.zeros(len(pi))
        matched = np.zeros(len(ti), dtype=bool)
        if len(pi) and len(ti):
            tree = shapely.STRtree(tg[ti])
            for k, p in enumerate(pi):
                cand = tree.query(pg[p], predicate="intersects")
                if not len(cand):
                    continue
                inter = shapely.area(shapely.intersection(pg[p], tg[ti[cand]]))
                ious = inter / np.maximum(shapely.area(shapely.union(pg[p], tg[ti[cand]])), 1e-12)
                ious[matched[cand]] = -1.0
                best = int(np.argmax(ious))
                if ious[best] >= iou:
                    matched[cand[best]] = True
                    tp[k] = 1
        n_tp = int(tp.sum())
        precision = n_tp / len(pi) if len(pi) else float("nan") if not len(ti) else 0.0
        recall = n_tp / len(ti) if len(ti) else float("nan")
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        e = edge[ti]
        scores.append(ClassScore(
            class_name=name, truth=len(ti), detections=len(pi), tp=n_tp, fp=len(pi) - n_tp, fn=len(ti) - n_tp,
            precision=precision, recall=recall, f1=f1, ap50=average_precision(tp, len(ti)),
            edge_truth=int(e.sum()), edge_recall=float(matched[e].mean()) if e.any() else float("nan"),
        ))
    return scores


def evaluate_files(pred: Path, truth: Path, iou: float = 0.5, match: Literal["box", "polygon"] = "box",
                   classes: list[str] | None = None) -> list[ClassScore]:
    p, t = _read(pred, "prediction"), _read(truth, "ground truth")
    for frame, path in ((p, pred), (t, truth)):
        if "class_name" not in frame.columns:
            raise InputError(f"{path}: has no class_name column")
    return evaluate(p, t, iou, match, classes)


def table(scores: list[ClassScore]) -> str:
    """The scores as a text table; a figure that does not apply (no truth of the class, no objects on
    tile edges in the truth) shows as "-" (JSON: null)."""
    def num(v: float, width: int) -> str:
        return f"{'-':>{width}}" if np.isnan(v) else f"{v:>{width}.3f}"

    head = f"{'class':<10} {'truth':>6} {'dets':>6} {'TP':>5} {'FP':>5} {'FN':>5} {'prec':>6} {'recall':>6} {'F1':>6} {'AP50':>6} {'edge rec':>8}"
    rows = [head]
    for s in scores:
        rows.append(f"{s.class_name:<10} {s.truth:>6} {s.detections:>6} {s.tp:>5} {s.fp:>5} {s.fn:>5} "
                    f"{num(s.precision, 6)} {num(s.recall, 6)} {num(s.f1, 6)} {num(s.ap50, 6)} {num(s.edge_recall, 8)}")
    return "\n".join(rows)


def as_json(scores: list[ClassScore]) -> list[dict[str, object]]:
    return [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in asdict(s).items()} for s in scores]
