"""Synthetic single-band scenes with planes and ships, and their ground truth.

Why this exists: the detector needs test scenes of any size whose right answers are known, and the
bundled sample models need training chips that look like those scenes. Both come from one renderer:

* :func:`plan_scene` decides everything up front from a seed: noise fields, coastline, airfields,
  the labelled objects (planes on aprons and runways, ships on water, some deliberately straddling
  the tiler's window edges) and the distractors (buildings with shadows, roads, bright points, blobs,
  apron vehicles) that make a model learn shape rather than brightness;
* :func:`render_window` turns any window of a plan into pixels as a pure function of global pixel
  coordinates, so row bands, column chunks and a whole-scene render agree to the last bit;
* :func:`write_scene` streams a plan into a georeferenced GeoTIFF band by band (memory
  O(width x band rows), never the whole raster) and writes the truth as GeoJSON in the scene's CRS;
* :func:`render_chip` renders an in-memory training chip with the same drawing code and a random
  tone curve, so model inputs scaled by /255 of a uint8 scene or by a 2-98 percentile stretch of a
  uint16 scene are both in distribution.

Conventions
    Pixel coordinates are continuous: x = column, y = row; pixel (r, c) covers [c, c+1) x [r, r+1)
    and its centre is (c + 0.5, r + 0.5). The affine transform maps them to CRS coordinates.
    A labelled object's rotated rectangle is (cx, cy, w, h, angle): w is its extent along the heading
    (nose to tail, bow to stern), h its extent across (wingspan, beam); objects are generated with
    w > h, so this is Ultralytics' regularised xywhr (w the longer side). angle is the heading modulo
    pi, in [0, pi), measured from the +x (column) axis towards +y (row). The rectangle is tight
    around the drawn silhouette. Corners follow Ultralytics' ``xywhr2xyxyxyxy`` order, and the
    axis-aligned box (px_x1, px_y1, px_x2, px_y2) is the box of those corners (DOTA's HBB).

Only numpy and pillow are imported at module level: rasterio, shapely, geopandas and pyogrio are
imported inside the functions that write files, so a training machine without them can render chips.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    import geopandas

Style = Literal["optical", "sar"]
SceneDtype = Literal["uint8", "uint16"]

CLASS_NAMES: tuple[str, str] = ("plane", "ship")
"""Labelled classes; a class's id is its index here, which is also its DOTA-v1 slot."""

LENGTH_RANGE: tuple[float, float] = (15.0, 120.0)
"""Object lengths in pixels (drawn log-uniformly)."""

DTYPE_LEVELS: dict[str, tuple[float, float]] = {"uint8": (5.0, 245.0), "uint16": (300.0, 3500.0)}
"""(offset, gain) that map a rendered image in [0, 1] to stored values: uint8 fills most of 0..255,
uint16 a 12-bit-like 300..3800, so the two dtypes hold the same content at different dynamic ranges."""

STYLES: tuple[Style, Style] = ("optical", "sar")

SUPERSAMPLE = 4
"""Polygons are rasterised at this many samples per pixel side, then box-averaged (anti-aliasing)."""

_QUANTUM = 1.0 / 64.0  # vertices snap to this grid: exact binary fractions keep rasterisation translation-exact
_COAST_SHARPNESS = 150.0  # land alpha slope per unit of the coast field: a coastline about 2-4 px wide
_CHUNK_COLS = 2048  # per-pixel background maths runs on column chunks of this width (cache-friendly)
_NOISE_PERIODS = ((1031, 1021), (1009, 1019))  # two white-noise tables with co-prime periods
_COAST_OCTAVES = ((1.0, 1.0), (1 / 4, 0.35), (1 / 16, 0.1), (1 / 48, 0.03))  # (cell / base cell, amplitude)


# --------------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TruthObject:
    """One labelled object: its class and the tight rotated rectangle around its silhouette.

    ``edge`` is True when the object's axis-aligned box crosses an interior edge of the tiler's
    window grid, i.e. at least one window cuts it; every object deliberately placed on a window edge
    or corner is such an object, and so is any other that happens to straddle an edge.
    """

    class_name: str
    class_id: int
    cx: float
    cy: float
    w: float
    h: float
    angle: float
    edge: bool = False

    @property
    def corners(self) -> np.ndarray:
        """[4, 2] (x, y) corners in Ultralytics' xywhr2xyxyxyxy order."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        v1 = np.array([self.w / 2 * c, self.w / 2 * s])
        v2 = np.array([-self.h / 2 * s, self.h / 2 * c])
        ctr = np.array([self.cx, self.cy])
        return np.stack([ctr + v1 + v2, ctr + v1 - v2, ctr - v1 - v2, ctr - v1 + v2])

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x1, y1, x2, y2): the axis-aligned box of the corners."""
        k = self.corners
        return float(k[:, 0].min()), float(k[:, 1].min()), float(k[:, 0].max()), float(k[:, 1].max())


@dataclass(frozen=True)
class SceneTruth:
    """What :func:`write_scene` wrote: the raster's layout and georeferencing, and its objects."""

    path: Path
    truth_path: Path | None
    width: int
    height: int
    dtype: str
    tiled: bool
    crs: str
    transform: tuple[float, float, float, float, float, float]
    seed: int
    objects: tuple[TruthObject, ...]
    seconds: float

    def counts(self) -> dict[str, int]:
        """Objects per class name, every class of :data:`CLASS_NAMES` present (zero or more)."""
        return {name: sum(o.class_name == name for o in self.objects) for name in CLASS_NAMES}

    @property
    def edge_count(self) -> int:
        return sum(o.edge for o in self.objects)

    def to_geodataframe(self) -> geopandas.GeoDataFrame:
        """The truth as written to GeoJSON (rotated rectangles in the scene's CRS)."""
        return truth_frame(self.objects, self.transform, self.crs)


def default_truth_path(scene_path: str | os.PathLike[str]) -> Path:
    """``scene.tif`` -> ``scene.truth.geojson`` next to it."""
    return Path(scene_path).with_suffix(".truth.geojson")


def truth_frame(objects: Sequence[TruthObject], transform: Sequence[float], crs: Any) -> geopandas.GeoDataFrame:
    """Objects as a GeoDataFrame: rotated-rectangle polygons in CRS coordinates plus pixel attributes.

    ``transform`` is the raster's affine (a, b, c, d, e, f): x' = a x + b y + c, y' = d x + e y + f.
    """
    import geopandas as gpd
    import shapely

    a, b, c, d, e, f = (float(v) for v in tuple(transform)[:6])
    corners = np.array([o.corners for o in objects], dtype=np.float64).reshape(-1, 4, 2)
    world = np.stack(
        [a * corners[..., 0] + b * corners[..., 1] + c, d * corners[..., 0] + e * corners[..., 1] + f], axis=-1
    )
    boxes = np.array([o.bbox for o in objects], dtype=np.float64).reshape(-1, 4)
    data: dict[str, Any] = {
        "class_name": [o.class_name for o in objects],
        "class_id": np.array([o.class_id for o in objects], dtype=np.int32),
        "px_x1": boxes[:, 0],
        "px_y1": boxes[:, 1],
        "px_x2": boxes[:, 2],
        "px_y2": boxes[:, 3],
        "cx": np.array([o.cx for o in objects], dtype=np.float64),
        "cy": np.array([o.cy for o in objects], dtype=np.float64),
        "w": np.array([o.w for o in objects], dtype=np.float64),
        "h": np.array([o.h for o in objects], dtype=np.float64),
        "angle": np.array([o.angle for o in objects], dtype=np.float64),
        "edge": np.array([o.edge for o in objects], dtype=bool),
    }
    geometry = gpd.GeoSeries(shapely.polygons(world), crs=_crs_text(crs))
    return gpd.GeoDataFrame(data, geometry=geometry, crs=geometry.crs)


def write_truth(
    objects: Sequence[TruthObject], path: str | os.PathLike[str], transform: Sequence[float], crs: Any
) -> Path:
    """Write the truth as GeoJSON in the scene's CRS, atomically (temporary name, then a rename)."""
    import pyogrio

    from rs_detect.fsutil import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        pyogrio.write_dataframe(
            truth_frame(objects, transform, crs), tmp, layer=path.stem, driver="GeoJSON", geometry_type="Polygon"
        )
    return path


def _crs_text(crs: Any) -> str:
    """A CRS as text pyproj understands (rasterio CRS objects give their EPSG code or WKT)."""
    return crs if isinstance(crs, str) else crs.to_string()


# --------------------------------------------------------------------------------------------------
# The tiler's window grid (same rule as rs_detect.io.tiling, re-stated to stay free of rasterio)
# --------------------------------------------------------------------------------------------------


def window_edges(length: int, tile: int = 1024, overlap: int = 192) -> np.ndarray:
    """Interior window edges along one axis: every window start > 0 and every window end < length.

    An object whose box crosses one of these lines is cut by at least one window; the lines also bound
    the overlap zones, so objects straddling them are the ones a tiler must stitch or de-duplicate.
    """
    from rs_detect.io.tiling import axis_starts  # the tiler's own grid (imported here: chips need no GIS stack)

    starts = axis_starts(length, tile, overlap)
    lines = {s for s in starts if s > 0} | {s + tile for s in starts if s + tile < length}
    return np.array(sorted(lines), dtype=np.float64)


def _straddles(box: tuple[float, float, float, float], xs: np.ndarray, ys: np.ndarray) -> bool:
    x1, y1, x2, y2 = box
    return bool(np.any((xs > x1) & (xs < x2)) or np.any((ys > y1) & (ys < y2)))


# --------------------------------------------------------------------------------------------------
# Noise fields
# --------------------------------------------------------------------------------------------------


def _fade(t: np.ndarray) -> np.ndarray:
    """Smoothstep: bilinear value noise without visible grid creases."""
    return t * t * (3.0 - 2.0 * t)


def _axis(coords: np.ndarray, cell: float) -> tuple[np.ndarray, np.ndarray]:
    g = coords / cell
    i = np.floor(g)
    return i.astype(np.intp), _fade(g - i).astype(np.float32)


@dataclass(frozen=True)
class _Field:
    """Fractal value noise over global pixel coordinates: octaves of small random grids, upsampled.

    Each octave is a coarse grid spanning the whole scene; a pixel's value depends only on its global
    coordinates, so any window of the field joins its neighbours without seams.
    """

    cells: tuple[float, ...]
    amps: tuple[float, ...]
    grids: tuple[np.ndarray, ...]

    @classmethod
    def random(cls, rng: np.random.Generator, width: int, height: int, octaves: Sequence[tuple[float, float]]) -> _Field:
        grids = tuple(
            rng.uniform(-1.0, 1.0, (int(height // cell) + 3, int(width // cell) + 3)).astype(np.float32)
            for cell, _ in octaves
        )
        return cls(tuple(c for c, _ in octaves), tuple(a for _, a in octaves), grids)

    def window(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Values at the grid of pixel centres ``ys`` x ``xs`` (both increasing), float32 [len(ys), len(xs)]."""
        out = np.zeros((ys.size, xs.size), dtype=np.float32)
        for cell, amp, grid in zip(self.cells, self.amps, self.grids, strict=True):
            iy, fy = _axis(ys, cell)
            ix, fx = _axis(xs, cell)
            rows = grid[iy[0] : iy[-1] + 2]
            left = rows[:, ix]
            along = (left + (rows[:, ix + 1] - left) * fx) * np.float32(amp)
            r = iy - iy[0]
            top = along[r]
            mixed = along[r + 1]
            mixed -= top
            mixed *= fy[:, None]
            mixed += top
            out += mixed
        return out

    def points(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Values at scattered points (planning: is this on land or water?)."""
        out = np.zeros(np.shape(xs), dtype=np.float64)
        for cell, amp, grid in zip(self.cells, self.amps, self.grids, strict=True):
            gh, gw = grid.shape
            iy, fy = _axis(np.clip(ys, 0.0, (gh - 2) * cell - 1e-6), cell)
            ix, fx = _axis(np.clip(xs, 0.0, (gw - 2) * cell - 1e-6), cell)
            top = grid[iy, ix] + (grid[iy, ix + 1] - grid[iy, ix]) * fx
            bottom = grid[iy + 1, ix] + (grid[iy + 1, ix + 1] - grid[iy + 1, ix]) * fx
            out += amp * (top + (bottom - top) * fy)
        return out


def _noise_tables(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian tables with co-prime periods; their sum is per-pixel noise with no visible repeat."""
    scale = np.float32(math.sqrt(0.5))
    first, second = (rng.standard_normal(shape).astype(np.float32) * scale for shape in _NOISE_PERIODS)
    return first, second


def _noise_window(tables: tuple[np.ndarray, np.ndarray], row0: int, col0: int, h: int, w: int) -> np.ndarray:
    rows, cols = np.arange(row0, row0 + h), np.arange(col0, col0 + w)
    out = tables[0].take(rows, axis=0, mode="wrap").take(cols, axis=1, mode="wrap")
    out += tables[1].take(rows, axis=0, mode="wrap").take(cols, axis=1, mode="wrap")
    return out


# --------------------------------------------------------------------------------------------------
# Painted shapes
# --------------------------------------------------------------------------------------------------


class _Layer(IntEnum):
    """Paint order: later layers cover earlier ones wherever shapes overlap."""

    GROUND = 0  # roads
    AIRFIELD = 1  # aprons, runways, taxiways
    MARKING = 2  # runway centre-line dashes
    SHADOW = 3  # building shadows
    BUILDING = 4
    CLUTTER = 5  # bright points, blobs, apron vehicles
    UNDER = 6  # plane shadows, ship wakes
    OBJECT = 7  # plane and ship silhouettes
    DETAIL = 8  # superstructures and hatches on ships


_RECT, _POLY = 0, 1


@dataclass(frozen=True)
class _Shapes:
    """Shapes painted in order, as a struct of arrays.

    A rect is drawn with analytic anti-aliasing (any size, evaluated only where a window needs it);
    a polygon is rasterised with pillow on its whole (integer-snapped) box, supersampled, so its
    coverage does not depend on which window asks for it.
    """

    kind: np.ndarray  # [P] int8
    box: np.ndarray  # [P, 4] int64 x0, y0, x1, y1 (end-exclusive pixel box, may leave the scene)
    value: np.ndarray  # [P] float32
    opacity: np.ndarray  # [P] float32
    rect: np.ndarray  # [P, 6] float64 cx, cy, half length, half width, cos, sin (rects only)
    start: np.ndarray  # [P + 1] int64 offsets into verts (polygons only)
    verts: np.ndarray  # [V, 2] float64

    def select(self, row0: int, col0: int, h: int, w: int) -> np.ndarray:
        """Indices (in paint order) of the shapes whose box meets the window."""
        b = self.box
        hit = (b[:, 2] > col0) & (b[:, 0] < col0 + w) & (b[:, 3] > row0) & (b[:, 1] < row0 + h)
        return np.flatnonzero(hit)


class _ShapeList:
    """Collects shapes in any order; :meth:`build` sorts them by layer (stable) into a :class:`_Shapes`."""

    def __init__(self) -> None:
        self._items: list[tuple[int, int, int, float, float, tuple[float, ...] | None, np.ndarray | None]] = []

    def rect(
        self, layer: _Layer, cx: float, cy: float, length: float, width: float, angle: float, value: float, opacity: float = 1.0
    ) -> None:
        params = (cx, cy, length / 2, width / 2, math.cos(angle), math.sin(angle))
        self._items.append((int(layer), len(self._items), _RECT, value, opacity, params, None))

    def poly(self, layer: _Layer, verts: np.ndarray, value: float, opacity: float = 1.0) -> None:
        self._items.append((int(layer), len(self._items), _POLY, value, opacity, None, verts))

    def build(self) -> _Shapes:
        items = sorted(self._items, key=lambda it: (it[0], it[1]))
        n = len(items)
        kind = np.array([it[2] for it in items], dtype=np.int8)
        rect = np.zeros((n, 6), dtype=np.float64)
        box = np.zeros((n, 4), dtype=np.int64)
        polys = [it[6] if it[6] is not None else np.zeros((0, 2)) for it in items]
        for i, it in enumerate(items):
            if it[5] is not None:
                rect[i] = it[5]
                box[i] = _rect_box(it[5])
            else:
                box[i] = _poly_box(polys[i])
        start = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(p) for p in polys], out=start[1:])
        verts = np.concatenate(polys) if n else np.zeros((0, 2))
        return _Shapes(
            kind=kind,
            box=box,
            value=np.array([it[3] for it in items], dtype=np.float32),
            opacity=np.array([it[4] for it in items], dtype=np.float32),
            rect=rect,
            start=start,
            verts=verts,
        )


def _rect_box(p: Sequence[float]) -> tuple[int, int, int, int]:
    cx, cy, hl, hw, c, s = p
    ex, ey = abs(c) * hl + abs(s) * hw, abs(s) * hl + abs(c) * hw
    return math.floor(cx - ex - 1), math.floor(cy - ey - 1), math.ceil(cx + ex + 1), math.ceil(cy + ey + 1)


def _poly_box(verts: np.ndarray) -> tuple[int, int, int, int]:
    lo, hi = verts.min(axis=0), verts.max(axis=0)
    return math.floor(lo[0]) - 1, math.floor(lo[1]) - 1, math.ceil(hi[0]) + 1, math.ceil(hi[1]) + 1


def _rect_coverage(p: np.ndarray, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    """Area-coverage approximation of a rotated rectangle over pixels [y0, y1) x [x0, x1)."""
    cx, cy, hl, hw, c, s = p
    dy = (np.arange(y0, y1) + (0.5 - cy))[:, None]
    dx = (np.arange(x0, x1) + (0.5 - cx))[None, :]
    along = np.abs(dx * c + dy * s) - hl
    across = np.abs(dy * c - dx * s) - hw
    return np.clip(0.5 - np.maximum(along, across), 0.0, 1.0).astype(np.float32)


def _poly_coverage(verts: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Coverage of a polygon over its whole box: rasterised at SUPERSAMPLE x, then box-averaged."""
    x0, y0, x1, y1 = (int(v) for v in box)
    canvas = Image.new("L", ((x1 - x0) * SUPERSAMPLE, (y1 - y0) * SUPERSAMPLE), 0)
    pts = ((verts - (x0, y0)) * SUPERSAMPLE - 0.5).ravel().tolist()  # pillow: integers are pixel centres
    ImageDraw.Draw(canvas).polygon(pts, fill=255)
    return np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32) * np.float32(1.0 / 255.0)


def _paint(
    img: np.ndarray, shapes: _Shapes, row0: int, col0: int, cache: dict[int, np.ndarray] | None = None
) -> None:
    """Paint every shape meeting the window (``img`` at ``row0, col0``) in order, in place.

    ``cache`` keeps polygon coverages between calls, so a polygon crossing row bands is rasterised once.
    """
    h, w = img.shape
    for i in shapes.select(row0, col0, h, w):
        x0, y0, x1, y1 = (int(v) for v in shapes.box[i])
        cx0, cy0, cx1, cy1 = max(x0, col0), max(y0, row0), min(x1, col0 + w), min(y1, row0 + h)
        if shapes.kind[i] == _RECT:
            cov = _rect_coverage(shapes.rect[i], cy0, cx0, cy1, cx1)
        else:
            full = cache.get(i) if cache is not None else None
            if full is None:
                full = _poly_coverage(shapes.verts[shapes.start[i] : shapes.start[i + 1]], shapes.box[i])
                if cache is not None:
                    cache[i] = full
            cov = full[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        cov = cov * shapes.opacity[i]
        region = img[cy0 - row0 : cy1 - row0, cx0 - col0 : cx1 - col0]
        region += (shapes.value[i] - region) * cov


# --------------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------------


def _place(local: np.ndarray, cx: float, cy: float, heading: float) -> np.ndarray:
    """Rotate local (along, across) vertices by ``heading``, move them to (cx, cy), snap to the vertex grid."""
    c, s = math.cos(heading), math.sin(heading)
    x = cx + local[:, 0] * c - local[:, 1] * s
    y = cy + local[:, 0] * s + local[:, 1] * c
    return np.round(np.stack([x, y], axis=1) / _QUANTUM) * _QUANTUM


def _frame_extent(verts: np.ndarray, heading: float) -> tuple[float, float, float, float]:
    """(u0, u1, v0, v1): extent of vertices along the heading (u) and across it (v)."""
    c, s = math.cos(heading), math.sin(heading)
    u = verts[:, 0] * c + verts[:, 1] * s
    v = verts[:, 1] * c - verts[:, 0] * s
    return float(u.min()), float(u.max()), float(v.min()), float(v.max())


def _from_frame(u: float, v: float, heading: float) -> tuple[float, float]:
    c, s = math.cos(heading), math.sin(heading)
    return u * c - v * s, u * s + v * c


def tight_rect(verts: np.ndarray, heading: float) -> tuple[float, float, float, float, float]:
    """(cx, cy, w, h, angle) of the tightest rectangle around ``verts`` aligned with ``heading``.

    w spans the heading direction, h the direction across it; angle is the heading modulo pi.
    """
    u0, u1, v0, v1 = _frame_extent(verts, heading)
    cx, cy = _from_frame((u0 + u1) / 2, (v0 + v1) / 2, heading)
    return cx, cy, u1 - u0, v1 - v0, heading % math.pi


def _ellipse(rx: float, ry: float, n: int = 12) -> np.ndarray:
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    return np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1)


def _mirror(half: list[tuple[float, float]]) -> np.ndarray:
    """A symmetric outline from its +y half (first point on the axis): the half, then the mirror back."""
    pts = np.array(half, dtype=np.float64)
    back = pts[:0:-1] * (1.0, -1.0)
    return np.concatenate([pts, back])


def _plane_outline(rng: np.random.Generator, length: float) -> np.ndarray:
    """Fuselage, swept wings and tail plane, nose at +length/2; wingspan 72-97 % of the length."""
    f = rng.uniform(0.045, 0.07)
    half_span = rng.uniform(0.36, 0.485)
    wing_le = rng.uniform(0.05, 0.18)
    tip_chord = rng.uniform(0.04, 0.08)
    sweep = min(rng.uniform(0.02, 0.28), wing_le - tip_chord + 0.27)
    root_chord = rng.uniform(0.18, 0.28)
    tail_half = rng.uniform(0.14, 0.21)
    tail_sweep = rng.uniform(0.05, 0.12)
    half = [
        (0.5, 0.0),
        (0.40, 0.8 * f),
        (wing_le, f),
        (wing_le - sweep, half_span),
        (wing_le - sweep - tip_chord, half_span),
        (wing_le - root_chord, f),
        (-0.30, 0.75 * f),
        (-0.30 - tail_sweep, tail_half),
        (-0.35 - tail_sweep, tail_half),
        (-0.47, 0.5 * f),
        (-0.5, 0.25 * f),
    ]
    return _mirror(half) * length


def _ship_outline(rng: np.random.Generator, length: float, beam: float) -> np.ndarray:
    """Hull with a transom stern and a pointed bow at +length/2."""
    bow = rng.uniform(0.12, 0.28)
    b = beam / length
    half = [
        (0.5, 0.0),
        (0.5 - 0.45 * bow, 0.36 * b),
        (0.5 - bow, 0.5 * b),
        (-0.47, 0.5 * b),
        (-0.5, 0.36 * b),
    ]
    return _mirror(half) * length


def _outline_samples(verts: np.ndarray, step: float = 8.0) -> np.ndarray:
    """Points every ``step`` pixels along a closed outline: a narrow spit of land between vertices is still seen."""
    ends = np.roll(verts, -1, axis=0)
    parts = []
    for a, b in zip(verts, ends, strict=True):
        n = max(1, math.ceil(float(np.hypot(*(b - a))) / step))
        parts.append(a + (np.arange(n) / n)[:, None] * (b - a))
    return np.concatenate(parts)


def _cover_circles(verts: np.ndarray, heading: float, margin: float) -> list[tuple[float, float, float]]:
    """Circles covering the heading-aligned box of ``verts``: a cheap footprint for overlap tests."""
    u0, u1, v0, v1 = _frame_extent(verts, heading)
    width = max(v1 - v0, 8.0)
    n = max(1, math.ceil((u1 - u0) / width))
    step = (u1 - u0) / n
    r = math.hypot(step / 2, (v1 - v0) / 2) + margin
    circles = []
    for k in range(n):
        x, y = _from_frame(u0 + (k + 0.5) * step, (v0 + v1) / 2, heading)
        circles.append((x, y, r))
    return circles


class _Occupancy:
    """Circles in a hash grid, so 'does this footprint hit anything placed?' stays cheap at any scene size."""

    def __init__(self, cell: float = 256.0) -> None:
        self.cell = cell
        self.buckets: dict[tuple[int, int], list[tuple[float, float, float]]] = {}
        self.rmax = 0.0

    def hits(self, circles: Sequence[tuple[float, float, float]]) -> bool:
        for x, y, r in circles:
            reach = r + self.rmax
            for bx in range(math.floor((x - reach) / self.cell), math.floor((x + reach) / self.cell) + 1):
                for by in range(math.floor((y - reach) / self.cell), math.floor((y + reach) / self.cell) + 1):
                    for px, py, pr in self.buckets.get((bx, by), ()):
                        if (px - x) ** 2 + (py - y) ** 2 < (pr + r) ** 2:
                            return True
        return False

    def add(self, circles: Sequence[tuple[float, float, float]]) -> None:
        for x, y, r in circles:
            self.buckets.setdefault((math.floor(x / self.cell), math.floor(y / self.cell)), []).append((x, y, r))
            self.rmax = max(self.rmax, r)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


# --------------------------------------------------------------------------------------------------
# Look (grey levels per style) and configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Look:
    """Grey levels of one scene or chip. 'sar' means dark water, bright targets and multiplicative speckle."""

    style: Style
    water: float
    land: float
    tarmac: float
    runway: float
    surf: float
    noise: float
    sun: float
    shadows: bool

    @classmethod
    def random(cls, rng: np.random.Generator, style: Style) -> _Look:
        sun = rng.uniform(0.0, 2 * math.pi)
        if style == "optical":
            return cls(
                style, water=rng.uniform(0.06, 0.22), land=rng.uniform(0.32, 0.5), tarmac=rng.uniform(0.28, 0.55),
                runway=rng.uniform(0.14, 0.3), surf=rng.uniform(0.0, 0.12), noise=rng.uniform(0.008, 0.035),
                sun=sun, shadows=True,
            )
        return cls(
            style, water=rng.uniform(0.02, 0.07), land=rng.uniform(0.18, 0.32), tarmac=rng.uniform(0.04, 0.12),
            runway=rng.uniform(0.02, 0.06), surf=rng.uniform(0.0, 0.05), noise=rng.uniform(0.25, 0.45),
            sun=sun, shadows=False,
        )

    def plane_value(self, rng: np.random.Generator) -> float:
        """Mostly bright on tarmac; some optical planes are dark, so brightness alone is no cue."""
        if self.style == "optical" and rng.random() < 0.2:
            return rng.uniform(0.04, self.tarmac - 0.18)
        return rng.uniform(min(self.tarmac + 0.25, 0.9), 0.97)

    def ship_value(self, rng: np.random.Generator, dim: float = 0.0) -> float:
        """Hull grey; ``dim`` > 0 (hard chips): that share of optical hulls is barely above the water.

        With ``dim`` 0 nothing extra is drawn, so ordinary chips and scenes keep their draws.
        """
        if dim > 0 and self.style == "optical" and rng.random() < dim:
            return rng.uniform(self.water + _HARD_DIM_CONTRAST, _HARD_DIM_MAX)
        if self.style == "sar":
            return rng.uniform(0.7, 1.0)
        return rng.uniform(0.3, 0.45) if rng.random() < 0.15 else rng.uniform(0.55, 0.95)

    def building_value(self, rng: np.random.Generator) -> float:
        if self.style == "sar":
            return rng.uniform(0.4, 0.95)
        u = rng.random()
        return rng.uniform(0.55, 0.92) if u < 0.45 else rng.uniform(0.3, 0.5) if u < 0.75 else rng.uniform(0.08, 0.25)

    def shadow_value(self, rng: np.random.Generator) -> tuple[float, float]:
        return rng.uniform(0.02, 0.1), rng.uniform(0.55, 0.85)

    def wake_value(self, rng: np.random.Generator) -> tuple[float, float]:
        if self.style == "sar":
            return rng.uniform(0.0, 0.02), rng.uniform(0.2, 0.4)
        return rng.uniform(0.45, 0.7), rng.uniform(0.12, 0.3)

    def road_value(self, rng: np.random.Generator) -> float:
        if self.style == "sar":
            return rng.uniform(0.02, 0.08)
        return rng.uniform(0.5, 0.65) if rng.random() < 0.3 else rng.uniform(0.15, 0.3)


@dataclass(frozen=True)
class _Config:
    """How much of everything one plan gets (scenes scale with area, chips are dense)."""

    style: Style
    water_fraction: float
    coast_cell: float
    airfields: int
    apron_region: tuple[float, float, float, float] | None  # where apron centres go; None: anywhere inside
    planes: int
    ships: int
    edge_objects: int
    towns: int
    scattered: int
    points: int
    blobs: int
    roads: int
    length_range: tuple[float, float]
    hard: _Hard | None = None  # a hard training chip (see render_chip's ``hard``); None: scenes and ordinary chips


@dataclass(frozen=True)
class _Hard:
    """What makes a hard training chip hard: the shares of its ships that show the detectors' failure
    modes, and the extra plane-sized round blobs (hard negatives for planes)."""

    dim: float  # share of optical hulls drawn dim (grey between water + 0.06 and 0.45)
    wake: float  # share of ships with a wake (ordinary chips: 0.5)
    thin: float  # share of ships with a thin beam (0.08-0.12 x length, at least 2 px; ordinary: 0.11-0.2)
    large: float  # share of ship lengths drawn from the upper half of the length range
    round_blobs: int  # round blobs in plane greys anywhere in the chip
    apron_blobs: int  # round blobs in plane greys on each apron or runway, most near parked planes


_HARD_DIM_CONTRAST = 0.06  # a dim hull's grey is at least this much above the water's mean grey
_HARD_DIM_MAX = 0.45  # ... and at most this (ordinary optical hulls: 0.3-0.45 in 15 %, else 0.55-0.95)
_HARD_THIN = (0.08, 0.12)  # thin beams as a fraction of the length
_HARD_MIN_BEAM = 2.0  # pixels: a thinner hull is a line a model cannot box


def _scene_config(
    rng: np.random.Generator, width: int, height: int, objects_per_mpx: float, edge_count: int, style: Style | None
) -> _Config:
    mpx = width * height / 1e6
    pairs = objects_per_mpx * mpx / 2
    return _Config(
        style=style or STYLES[int(rng.integers(2))],
        water_fraction=rng.uniform(0.3, 0.5),
        coast_cell=rng.uniform(900.0, 2400.0),
        airfields=max(1, round(mpx / 5)) if min(width, height) >= 400 else 0,
        apron_region=None,
        planes=round(pairs),
        ships=round(pairs),
        edge_objects=edge_count,
        towns=int(rng.poisson(0.15 * mpx)),
        scattered=int(rng.poisson(10 * mpx)),
        points=int(rng.poisson(40 * mpx)),
        blobs=int(rng.poisson(15 * mpx)),
        roads=int(rng.poisson(0.4 * mpx)),
        length_range=LENGTH_RANGE,
    )


def _chip_config(
    rng: np.random.Generator,
    size: int,
    style: Style | None,
    length_range: tuple[float, float],
    distractors: float = 1.0,
    hard: float = 0.0,
) -> _Config:
    """Dense chips: most have an airfield or water with several objects; a few are nearly empty.

    ``distractors`` multiplies the towns, lone buildings, bright points and blobs (hard negatives for
    training); the random draws are the same for any value, so 1.0 gives the chips it always gave.
    ``hard`` is the probability of a hard chip (:func:`_hard_chip_config`); at 0 nothing is drawn for
    it, so ordinary chips are exactly the chips they always were.
    """
    if hard > 0 and rng.random() < hard:
        return _hard_chip_config(rng, size, style, length_range, distractors)
    airfield = rng.random() < 0.55
    kind = rng.random()
    water = 0.0 if kind < 0.12 else 1.0 if kind < 0.25 else rng.uniform(0.2, 0.8)
    empty = rng.random() < 0.08
    area = (size / 1024) ** 2
    return _Config(
        **_chip_frame(rng, size, style),
        water_fraction=water,
        airfields=int(airfield),
        planes=0 if empty or not airfield else int(rng.integers(2, 25)),
        ships=0 if empty else int(rng.integers(0, 21) * area + 0.5),
        edge_objects=0,
        **_chip_clutter(rng, area, distractors, towns=3, roads=4),
        length_range=length_range,
    )


def _chip_frame(rng: np.random.Generator, size: int, style: Style | None) -> dict[str, Any]:
    """A chip's style, coastline scale and apron region (drawn in this order: chips reproduce)."""
    return {
        "style": style or STYLES[int(rng.random() < 0.35)],
        "coast_cell": rng.uniform(500.0, 1500.0) * size / 1024,
        "apron_region": (0.2 * size, 0.2 * size, 0.8 * size, 0.8 * size),
    }


def _chip_clutter(rng: np.random.Generator, area: float, distractors: float, towns: int, roads: int) -> dict[str, int]:
    """A chip's towns, lone buildings, points, blobs and roads (drawn in this order: chips reproduce)."""
    return {
        "towns": int(rng.integers(0, towns) * distractors),
        "scattered": int(rng.integers(0, 40) * area * distractors),
        "points": int(rng.integers(20, 200) * area * distractors),
        "blobs": int(rng.integers(5, 60) * area * distractors),
        "roads": int(rng.integers(0, roads)),
    }


def _hard_chip_config(
    rng: np.random.Generator, size: int, style: Style | None, length_range: tuple[float, float], distractors: float
) -> _Config:
    """A hard chip: the sample models' failure modes, over-represented.

    Mostly water (65-95 %, or all water in a quarter of them) with 10-30 ships per 1024 x 1024 px;
    half of the optical hulls dim (water + 0.06 to 0.45), 75 % with wakes, 35 % thin (beam 0.08-0.12 x
    length) and half of the lengths from the upper half of the length range. An airfield in 35 % of
    them, its aprons and runway strewn with round blobs in plane greys, most of them near the planes,
    and round plane-grey blobs anywhere: round bright spots that are not planes. Never empty.
    """
    area = (size / 1024) ** 2
    airfield = rng.random() < 0.35
    water = 1.0 if rng.random() < 0.25 else rng.uniform(0.65, 0.95)
    return _Config(
        **_chip_frame(rng, size, style),
        water_fraction=water,
        airfields=int(airfield),
        planes=int(rng.integers(4, 20)) if airfield else 0,
        ships=max(1, int(rng.integers(10, 31) * area + 0.5)),
        edge_objects=0,
        **_chip_clutter(rng, area, distractors, towns=2, roads=3),
        length_range=length_range,
        hard=_Hard(
            dim=0.5,
            wake=0.75,
            thin=0.35,
            large=0.5,
            round_blobs=int(rng.integers(10, 40) * area * distractors),
            apron_blobs=int(rng.integers(8, 30) * distractors),
        ),
    )


# --------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScenePlan:
    """Everything needed to render any window of a scene, decided up front from a seed."""

    width: int
    height: int
    objects: tuple[TruthObject, ...]
    look: _Look
    coast: _Field
    level: float
    land: _Field
    patches: _Field
    water: _Field
    noise: tuple[np.ndarray, np.ndarray]
    pads: _Shapes
    shapes: _Shapes


@dataclass(frozen=True)
class _RotatedRect:
    """A rotated rectangle used while planning: an apron, a runway or an airfield pad."""

    cx: float
    cy: float
    half_length: float
    half_width: float
    angle: float

    def local(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = xs - self.cx, ys - self.cy
        return dx * c + dy * s, dy * c - dx * s

    def contains(self, xs: np.ndarray, ys: np.ndarray, grow: float = 0.0) -> np.ndarray:
        u, v = self.local(xs, ys)
        return (np.abs(u) <= self.half_length + grow) & (np.abs(v) <= self.half_width + grow)

    @property
    def radius(self) -> float:
        return math.hypot(self.half_length, self.half_width)


class _Planner:
    """Places airfields, objects and distractors of one plan; keeps footprints so objects never overlap."""

    def __init__(
        self, rng: np.random.Generator, width: int, height: int, cfg: _Config, edges: tuple[np.ndarray, np.ndarray]
    ) -> None:
        self.rng, self.width, self.height, self.cfg, self.edges = rng, width, height, cfg, edges
        self.look = _Look.random(rng, cfg.style)
        self.coast = _Field.random(rng, width, height, [(cfg.coast_cell * c, a) for c, a in _COAST_OCTAVES])
        self.level = self._water_level()
        self.shapes, self.pad_shapes = _ShapeList(), _ShapeList()
        self.pads: list[_RotatedRect] = []
        self.pad_circles = np.zeros((0, 3))  # (cx, cy, radius) of each pad, for quick rejection
        self.aprons: list[_RotatedRect] = []
        self.runways: list[_RotatedRect] = []
        self.objects: list[TruthObject] = []
        self.taken, self.solid = _Occupancy(), _Occupancy()

    # ---- land and water ------------------------------------------------------------------------

    def _water_level(self) -> float:
        """Coast field threshold that leaves about ``water_fraction`` of the area under water."""
        n = 4096
        xs, ys = self.rng.uniform(0, self.width, n), self.rng.uniform(0, self.height, n)
        values = self.coast.points(xs, ys)
        frac = self.cfg.water_fraction
        if frac <= 0.0:
            return float(values.min()) - 1.0
        if frac >= 1.0:
            return float(values.max()) + 1.0
        return float(np.quantile(values, frac))

    def _in_pads(self, xs: np.ndarray, ys: np.ndarray, grow: float) -> np.ndarray:
        """Points on an airfield pad (grown by ``grow``); pads far from all points are skipped cheaply."""
        hit = np.zeros(np.shape(xs), dtype=bool)
        if not self.pads:
            return hit
        reach = self.pad_circles[:, 2] + grow
        near = (
            (self.pad_circles[:, 0] + reach >= xs.min()) & (self.pad_circles[:, 0] - reach <= xs.max())
            & (self.pad_circles[:, 1] + reach >= ys.min()) & (self.pad_circles[:, 1] - reach <= ys.max())
        )
        for k in np.flatnonzero(near):
            hit |= self.pads[k].contains(xs, ys, grow)
        return hit

    def water(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        return (self.coast.points(xs, ys) < self.level - 0.02) & ~self._in_pads(xs, ys, 30.0)

    def land(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Open land: not water, not an airfield."""
        return (self.coast.points(xs, ys) > self.level + 0.02) & ~self._in_pads(xs, ys, 10.0)

    def inside(self, verts: np.ndarray, margin: float = 1.0) -> bool:
        lo, hi = verts.min(axis=0), verts.max(axis=0)
        return bool(lo[0] >= margin and lo[1] >= margin and hi[0] <= self.width - margin and hi[1] <= self.height - margin)

    # ---- airfields -------------------------------------------------------------------------------

    def add_airfields(self) -> None:
        for _ in range(self.cfg.airfields):
            for _ in range(30):
                if self._try_airfield():
                    break

    def _try_airfield(self) -> bool:
        rng = self.rng
        aw, ah = rng.uniform(350, 1000), rng.uniform(200, 550)
        angle = rng.uniform(0, math.pi)
        region = self.cfg.apron_region or (aw / 2, ah / 2, self.width - aw / 2, self.height - ah / 2)
        if region[0] >= region[2] or region[1] >= region[3]:
            return False
        cx, cy = rng.uniform(region[0], region[2]), rng.uniform(region[1], region[3])
        apron = _RotatedRect(cx, cy, aw / 2, ah / 2, angle)
        if any(math.hypot(cx - p.cx, cy - p.cy) < apron.radius + p.radius for p in self.pads):
            return False
        rw, gap = rng.uniform(28, 55), rng.uniform(60, 200)
        run_len = rng.uniform(1.3, 3.0) * aw
        run_u, run_v = rng.uniform(-0.3, 0.3) * aw, -(ah / 2 + gap + rw / 2)
        rx, ry = _from_frame(run_u, run_v, angle)
        runway = _RotatedRect(cx + rx, cy + ry, run_len / 2, rw / 2, angle)
        self._draw_airfield(apron, runway, gap)
        u0, u1 = min(-aw / 2, run_u - run_len / 2) - 50, max(aw / 2, run_u + run_len / 2) + 50
        v0, v1 = run_v - rw / 2 - 50, ah / 2 + 50
        px, py = _from_frame((u0 + u1) / 2, (v0 + v1) / 2, angle)
        pad = _RotatedRect(cx + px, cy + py, (u1 - u0) / 2, (v1 - v0) / 2, angle)
        self.pad_shapes.rect(_Layer.GROUND, pad.cx, pad.cy, 2 * pad.half_length, 2 * pad.half_width, angle, 1.0)
        self.pads.append(pad)
        self.pad_circles = np.vstack([self.pad_circles, [(pad.cx, pad.cy, pad.radius)]])
        self.aprons.append(apron)
        self.runways.append(runway)
        return True

    def _draw_airfield(self, apron: _RotatedRect, runway: _RotatedRect, gap: float) -> None:
        rng, look, s = self.rng, self.look, self.shapes
        a = apron.angle
        s.rect(_Layer.AIRFIELD, apron.cx, apron.cy, 2 * apron.half_length, 2 * apron.half_width, a, look.tarmac)
        s.rect(_Layer.AIRFIELD, runway.cx, runway.cy, 2 * runway.half_length, 2 * runway.half_width, a, look.runway)
        for _ in range(int(rng.integers(1, 4))):
            u = rng.uniform(-0.9, 0.9) * apron.half_length
            tx, ty = _from_frame(u, -(apron.half_width + gap / 2), a)
            s.rect(_Layer.AIRFIELD, apron.cx + tx, apron.cy + ty, rng.uniform(12, 25), gap + 4, a, look.runway)
        dash = min(0.95, look.runway + 0.5)
        for u in np.arange(-runway.half_length + 30, runway.half_length - 30, 40.0):
            dx, dy = _from_frame(float(u), 0.0, a)
            s.rect(_Layer.MARKING, runway.cx + dx, runway.cy + dy, 20.0, 2.0, a, dash, 0.8)

    # ---- labelled objects ------------------------------------------------------------------------

    def _length(self) -> float:
        return _log_uniform(self.rng, *self.cfg.length_range)

    def _accept(
        self, name: str, heading: float, sil: np.ndarray, under: list[tuple[np.ndarray, float, float]], on_edge: bool
    ) -> bool:
        """Keep an object if it is inside the plan, hits no other object and, when ``on_edge``, straddles
        a window edge; then record its footprint, its under-layer shapes and its truth."""
        truth = TruthObject(name, CLASS_NAMES.index(name), *tight_rect(sil, heading))
        if on_edge and not _straddles(truth.bbox, *self.edges):
            return False
        every = np.concatenate([sil, *[u[0] for u in under]]) if under else sil
        circles = _cover_circles(every, heading, 3.0)
        if not self.inside(sil) or self.taken.hits(circles):
            return False
        self.taken.add(circles)
        self.solid.add(circles)
        for verts, value, opacity in under:
            self.shapes.poly(_Layer.UNDER, verts, value, opacity)
        self.objects.append(truth)
        return True

    def try_plane(self, cx: float, cy: float, heading: float, within: _RotatedRect, on_edge: bool = False) -> bool:
        rng, look = self.rng, self.look
        length = self._length()
        sil = _place(_plane_outline(rng, length), cx, cy, heading)
        if not within.contains(sil[:, 0], sil[:, 1]).all():
            return False
        under = []
        if look.shadows:
            value, opacity = look.shadow_value(rng)
            offset = rng.uniform(0.04, 0.12) * length
            under.append((sil + (offset * math.cos(look.sun), offset * math.sin(look.sun)), value, opacity))
        if not self._accept("plane", heading, sil, under, on_edge):
            return False
        self.shapes.poly(_Layer.OBJECT, sil, look.plane_value(rng))
        return True

    def try_ship(self, cx: float, cy: float, heading: float, on_edge: bool = False) -> bool:
        rng, look, hard = self.rng, self.look, self.cfg.hard
        if hard is None:  # scenes and ordinary chips: exactly these draws
            length = self._length()
            beam = rng.uniform(0.11, 0.2) * length
        else:
            length = self._hard_ship_length(hard)
            if rng.random() < hard.thin:
                beam = max(rng.uniform(*_HARD_THIN) * length, _HARD_MIN_BEAM)
            else:
                beam = rng.uniform(0.11, 0.2) * length
        sil = _place(_ship_outline(rng, length, beam), cx, cy, heading)
        wake = 0.5 if hard is None else hard.wake
        under = self._wake(length, beam, cx, cy, heading) if rng.random() < wake else []
        probe = np.concatenate([_outline_samples(v) for v in [sil, *[u[0] for u in under]]] + [[[cx, cy]]])
        if not self.water(probe[:, 0], probe[:, 1]).all():
            return False
        if not self._accept("ship", heading, sil, under, on_edge):
            return False
        value = look.ship_value(rng) if hard is None else look.ship_value(rng, hard.dim)
        self.shapes.poly(_Layer.OBJECT, sil, value)
        self._ship_details(length, beam, cx, cy, heading, value)
        return True

    def _hard_ship_length(self, hard: _Hard) -> float:
        """Hard chips lean to large ships: a share of the lengths come from the upper half of the range."""
        if self.rng.random() < hard.large:
            lo, hi = self.cfg.length_range
            return _log_uniform(self.rng, max(lo, hi / 2), hi)
        return self._length()

    def _wake(self, length: float, beam: float, cx: float, cy: float, heading: float) -> list[tuple[np.ndarray, float, float]]:
        """A spreading foam (optical) or calm dark (SAR) trail behind the stern."""
        rng = self.rng
        wl = rng.uniform(0.5, 2.5) * length
        spread = math.tan(math.radians(rng.uniform(4, 10)))
        stern = -0.5 * length
        local = np.array(
            [(stern, 0.45 * beam), (stern - wl, 0.45 * beam + wl * spread), (stern - wl, -0.45 * beam - wl * spread), (stern, -0.45 * beam)]
        )
        value, opacity = self.look.wake_value(rng)
        return [(_place(local, cx, cy, heading), value, opacity)]

    def _ship_details(self, length: float, beam: float, cx: float, cy: float, heading: float, hull: float) -> None:
        """Superstructure and, on larger ships, hatches: texture inside the hull, never beyond it."""
        rng, s = self.rng, self.shapes
        contrast = rng.choice([-1.0, 1.0]) * rng.uniform(0.12, 0.3)
        u = rng.uniform(-0.38, -0.12) * length
        x, y = _from_frame(u, 0.0, heading)
        s.rect(_Layer.DETAIL, cx + x, cy + y, rng.uniform(0.06, 0.14) * length, 0.6 * beam, heading, float(np.clip(hull + contrast, 0, 1)))
        if length < 50:
            return
        for k in range(int(rng.integers(2, 6))):
            x, y = _from_frame((-0.05 + 0.1 * k) * length, 0.0, heading)
            s.rect(_Layer.DETAIL, cx + x, cy + y, 0.06 * length, 0.5 * beam, heading, max(hull - 0.2, 0.0), 0.8)

    def add_planes(self) -> None:
        """Planes parked anywhere on aprons (80 %) or lined up on runways (20 %), at random headings."""
        if not self.aprons:
            return
        rng = self.rng
        for _ in range(self.cfg.planes):
            for _ in range(40):
                k = int(rng.integers(len(self.aprons)))
                apron, runway = self.aprons[k], self.runways[k]
                if rng.random() < 0.8:
                    u, v = rng.uniform(-1, 1) * apron.half_length, rng.uniform(-1, 1) * apron.half_width
                    x, y = _from_frame(u, v, apron.angle)
                    ok = self.try_plane(apron.cx + x, apron.cy + y, rng.uniform(0, 2 * math.pi), apron)
                else:
                    x, y = _from_frame(rng.uniform(-1, 1) * runway.half_length, 0.0, runway.angle)
                    heading = runway.angle + math.pi * int(rng.integers(2))
                    ok = self.try_plane(runway.cx + x, runway.cy + y, heading, self.pads[k])
                if ok:
                    break

    def add_ships(self) -> None:
        """Ships anywhere on open water (hull and wake clear of land and airfields), at random headings."""
        rng = self.rng
        for _ in range(self.cfg.ships):
            for _ in range(40):
                if self.try_ship(rng.uniform(0, self.width), rng.uniform(0, self.height), rng.uniform(0, 2 * math.pi)):
                    break

    # ---- objects on the tiler's window edges ----------------------------------------------------

    def _edge_point(self, box: tuple[float, float, float, float], jitter: float) -> tuple[float, float] | None:
        """A point on a window edge line (65 %) or at a window corner (35 %) inside ``box``."""
        rng = self.rng
        xs = self.edges[0][(self.edges[0] > box[0]) & (self.edges[0] < box[2])]
        ys = self.edges[1][(self.edges[1] > box[1]) & (self.edges[1] < box[3])]
        if xs.size == 0 and ys.size == 0:
            return None
        j = rng.uniform(-jitter, jitter, 2)
        if xs.size and ys.size and rng.random() < 0.35:
            return float(rng.choice(xs) + j[0]), float(rng.choice(ys) + j[1])
        if xs.size and (ys.size == 0 or rng.random() < 0.5):
            return float(rng.choice(xs) + j[0]), float(rng.uniform(box[1], box[3]))
        return float(rng.uniform(box[0], box[2])), float(rng.choice(ys) + j[1])

    def _apron_box(self, apron: _RotatedRect) -> tuple[float, float, float, float]:
        r = apron.radius
        return apron.cx - r, apron.cy - r, apron.cx + r, apron.cy + r

    def add_edge_objects(self) -> None:
        """Objects whose boxes straddle window edges and corners, so a tiler that does not stitch cuts or doubles them."""
        rng = self.rng
        scene = (0.0, 0.0, float(self.width), float(self.height))
        for _ in range(self.cfg.edge_objects):
            for _ in range(200):
                if self.aprons and rng.random() < 0.5:
                    k = int(rng.integers(len(self.aprons)))
                    p = self._edge_point(self._apron_box(self.aprons[k]), 6.0)
                    ok = p is not None and self.try_plane(p[0], p[1], rng.uniform(0, 2 * math.pi), self.aprons[k], True)
                else:
                    p = self._edge_point(scene, 6.0)
                    ok = p is not None and self.try_ship(p[0], p[1], rng.uniform(0, 2 * math.pi), True)
                if ok:
                    break

    # ---- distractors -----------------------------------------------------------------------------

    def add_roads(self) -> None:
        """Winding polylines of long thin rectangles (each overlapping the next by the road width): long,
        straight-edged distractors that end at the coast."""
        rng = self.rng
        for _ in range(self.cfg.roads):
            x, y = rng.uniform(0, self.width), rng.uniform(0, self.height)
            heading, width, value = rng.uniform(0, 2 * math.pi), rng.uniform(3, 12), self.look.road_value(rng)
            for _ in range(int(rng.integers(5, 40))):
                seg = rng.uniform(120, 320)
                heading += rng.normal(0.0, 0.25)
                nx, ny = x + seg * math.cos(heading), y + seg * math.sin(heading)
                mx, my = (x + nx) / 2, (y + ny) / 2
                if self.coast.points(np.array([mx]), np.array([my]))[0] < self.level:
                    break
                self.shapes.rect(_Layer.GROUND, mx, my, seg + width, width, heading, value)
                x, y = nx, ny

    def add_buildings(self) -> None:
        """Towns (buildings scattered around a centre on a common street grid) and lone buildings, on open land."""
        rng = self.rng
        for _ in range(self.cfg.towns):
            cx, cy = rng.uniform(0, self.width), rng.uniform(0, self.height)
            grid, sigma, n = rng.uniform(0, math.pi / 2), rng.uniform(80, 400), int(rng.integers(20, 120))
            xs, ys = rng.normal(cx, sigma, n), rng.normal(cy, sigma, n)
            for x, y in zip(xs, ys, strict=True):
                self._try_building(float(x), float(y), grid + rng.choice([0.0, math.pi / 2]) + rng.normal(0, 0.03))
        for _ in range(self.cfg.scattered):
            self._try_building(rng.uniform(0, self.width), rng.uniform(0, self.height), rng.uniform(0, math.pi))

    def _try_building(self, cx: float, cy: float, angle: float) -> bool:
        rng, look = self.rng, self.look
        a = rng.uniform(8, 70)
        b = rng.uniform(0.35, 1.0) * a
        verts = _place(_building_outline(rng, a, b), cx, cy, angle)
        circles = _cover_circles(verts, angle, 4.0)
        if not self.land(verts[:, 0], verts[:, 1]).all() or self.solid.hits(circles):
            return False
        self.solid.add(circles)
        if look.shadows:
            value, opacity = look.shadow_value(rng)
            height = rng.uniform(2, 15)
            self.shapes.poly(_Layer.SHADOW, verts + (height * math.cos(look.sun), height * math.sin(look.sun)), value, opacity)
        self.shapes.poly(_Layer.BUILDING, verts, look.building_value(rng))
        return True

    def add_clutter(self) -> None:
        """Bright (sometimes dark) points, blobs of any grey, and vehicles parked on aprons."""
        rng = self.rng
        for _ in range(self.cfg.points):
            x, y, size = rng.uniform(0, self.width), rng.uniform(0, self.height), rng.uniform(1, 3)
            value = rng.uniform(0.75, 1.0) if rng.random() < 0.8 else rng.uniform(0.0, 0.1)
            if not self.taken.hits([(x, y, size + 2)]):
                self.shapes.rect(_Layer.CLUTTER, x, y, size, size, rng.uniform(0, math.pi), value)
        for _ in range(self.cfg.blobs):
            x, y, rx = rng.uniform(0, self.width), rng.uniform(0, self.height), rng.uniform(2, 9)
            if not self.taken.hits([(x, y, rx + 2)]):
                verts = _place(_ellipse(rx, rng.uniform(0.5, 1.0) * rx), x, y, rng.uniform(0, math.pi))
                self.shapes.poly(_Layer.CLUTTER, verts, rng.uniform(0.05, 0.95))
        for apron in self.aprons:
            for _ in range(int(rng.integers(0, 25))):
                u, v = rng.uniform(-1, 1) * apron.half_length, rng.uniform(-1, 1) * apron.half_width
                dx, dy = _from_frame(u, v, apron.angle)
                length, width = rng.uniform(4, 10), rng.uniform(2, 4)
                if not self.taken.hits([(apron.cx + dx, apron.cy + dy, length / 2 + 2)]):
                    self.shapes.rect(
                        _Layer.CLUTTER, apron.cx + dx, apron.cy + dy, length, width, rng.uniform(0, math.pi), rng.uniform(0.05, 0.95)
                    )
        if self.cfg.hard is not None:  # nothing is drawn here for scenes and ordinary chips
            self._add_hard_blobs(self.cfg.hard)

    def _add_hard_blobs(self, hard: _Hard) -> None:
        """Round blobs in plane greys (hard negatives for planes): anywhere, and on each airfield's apron
        and runway, 60 % of them just beside a parked plane (0.6-1.5 plane lengths from its centre)."""
        rng = self.rng
        for _ in range(hard.round_blobs):
            self._try_round_blob(rng.uniform(0, self.width), rng.uniform(0, self.height))
        planes = [o for o in self.objects if o.class_name == "plane"]
        for apron, runway in zip(self.aprons, self.runways, strict=True):
            for _ in range(hard.apron_blobs):
                if planes and rng.random() < 0.6:
                    p = planes[int(rng.integers(len(planes)))]
                    r, t = rng.uniform(0.6, 1.5) * p.w, rng.uniform(0, 2 * math.pi)
                    x, y = p.cx + r * math.cos(t), p.cy + r * math.sin(t)
                else:
                    u, v = rng.uniform(-1, 1) * apron.half_length, rng.uniform(-1, 1) * apron.half_width
                    dx, dy = _from_frame(u, v, apron.angle)
                    x, y = apron.cx + dx, apron.cy + dy
                xs, ys = np.array([x]), np.array([y])
                if apron.contains(xs, ys, -10.0)[0] or runway.contains(xs, ys, -3.0)[0]:
                    self._try_round_blob(x, y)

    def _try_round_blob(self, x: float, y: float) -> None:
        """A nearly round blob (2-9 px radius, the scenes' blob sizes) in a plane's grey, clear of objects."""
        rng = self.rng
        rx = rng.uniform(2, 9)
        if not self.taken.hits([(x, y, rx + 2)]):
            verts = _place(_ellipse(rx, rng.uniform(0.8, 1.0) * rx), x, y, rng.uniform(0, math.pi))
            self.shapes.poly(_Layer.CLUTTER, verts, self.look.plane_value(rng))


def _building_outline(rng: np.random.Generator, a: float, b: float) -> np.ndarray:
    """A rectangle (70 %), an L (15 %) or a cross (15 %) of a x b pixels, centred on the origin."""
    u = rng.random()
    if u < 0.7:
        return np.array([(-a / 2, -b / 2), (a / 2, -b / 2), (a / 2, b / 2), (-a / 2, b / 2)])
    if u < 0.85:
        k, m = rng.uniform(0.35, 0.65, 2)
        return np.array(
            [(-a / 2, -b / 2), (a / 2, -b / 2), (a / 2, -b / 2 + b * k), (-a / 2 + a * m, -b / 2 + b * k), (-a / 2 + a * m, b / 2), (-a / 2, b / 2)]
        )
    t = rng.uniform(0.3, 0.5) * min(a, b)
    return np.array(
        [
            (-a / 2, -t / 2), (-t / 2, -t / 2), (-t / 2, -b / 2), (t / 2, -b / 2), (t / 2, -t / 2), (a / 2, -t / 2),
            (a / 2, t / 2), (t / 2, t / 2), (t / 2, b / 2), (-t / 2, b / 2), (-t / 2, t / 2), (-a / 2, t / 2),
        ]
    )


def _build_plan(
    rng: np.random.Generator, width: int, height: int, cfg: _Config, edges: tuple[np.ndarray, np.ndarray]
) -> ScenePlan:
    """Objects first (so distractors keep clear of them), then roads, buildings and clutter, then textures."""
    planner = _Planner(rng, width, height, cfg, edges)
    planner.add_airfields()
    planner.add_edge_objects()
    planner.add_planes()
    planner.add_ships()
    planner.add_roads()
    planner.add_buildings()
    planner.add_clutter()
    tex = 1.0 if cfg.style == "optical" else 0.6
    return ScenePlan(
        width=width,
        height=height,
        objects=tuple(replace(o, edge=_straddles(o.bbox, *edges)) for o in planner.objects),
        look=planner.look,
        coast=planner.coast,
        level=planner.level,
        land=_Field.random(rng, width, height, [(300.0, 0.08 * tex), (75.0, 0.05 * tex), (18.0, 0.03 * tex)]),
        patches=_Field.random(rng, width, height, [(220.0, rng.uniform(0.04, 0.12) * tex)]),
        water=_Field.random(rng, width, height, [(600.0, 0.03), (90.0, 0.015)]),
        noise=_noise_tables(rng),
        pads=planner.pad_shapes.build(),
        shapes=planner.shapes.build(),
    )


def plan_scene(
    width: int,
    height: int,
    seed: int,
    *,
    objects_per_mpx: float = 2.0,
    edge_objects: bool = True,
    tile: int = 1024,
    overlap: int = 192,
    style: Style | None = None,
) -> ScenePlan:
    """Decide a whole scene from ``seed``: same arguments, same plan (and so the same pixels and truth).

    About ``objects_per_mpx`` objects per million pixels, half planes (on airfields) and half ships
    (on water), where room allows; with ``edge_objects`` also about one object per two tiler windows
    placed across window edges and corners. ``style`` None picks optical or SAR-like from the seed.
    """
    _check_plan_args(width, height, seed, objects_per_mpx, tile, overlap, style)
    rng = np.random.default_rng(seed)
    edges = (window_edges(width, tile, overlap), window_edges(height, tile, overlap))
    from rs_detect.io.tiling import grid_shape

    rows, cols = grid_shape(width, height, tile, overlap)
    windows = rows * cols
    edge_count = max(4, windows // 2) if edge_objects and (edges[0].size or edges[1].size) else 0
    cfg = _scene_config(rng, width, height, objects_per_mpx, edge_count, style)
    return _build_plan(rng, width, height, cfg, edges)


def _check_plan_args(
    width: int, height: int, seed: int, objects_per_mpx: float, tile: int, overlap: int, style: Style | None
) -> None:
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 64:
            raise ValueError(f"scene {name} must be an integer >= 64, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not (math.isfinite(objects_per_mpx) and objects_per_mpx >= 0):
        raise ValueError(f"objects_per_mpx must be >= 0, got {objects_per_mpx!r}")
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need tile > 0 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if style is not None and style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def render_window(
    plan: ScenePlan, row0: int, col0: int, height: int, width: int, *, cache: dict[int, np.ndarray] | None = None
) -> np.ndarray:
    """Pixels of a window of the plan, float32 [height, width] in [0, 1].

    A pure function of global pixel coordinates: any split of the scene into windows renders exactly
    the same pixels as one render of the whole. ``cache`` (optional, any dict) keeps polygon coverages
    between calls, for callers walking the scene in row bands.
    """
    if row0 < 0 or col0 < 0 or height < 1 or width < 1 or row0 + height > plan.height or col0 + width > plan.width:
        raise ValueError(f"window ({row0}, {col0}, {height}, {width}) is not inside the {plan.width}x{plan.height} scene")
    img = np.empty((height, width), dtype=np.float32)
    chunks = [(c, min(width, c + _CHUNK_COLS)) for c in range(0, width, _CHUNK_COLS)]
    for c0, c1 in chunks:
        img[:, c0:c1] = _background(plan, row0, col0 + c0, height, c1 - c0)
    _paint(img, plan.shapes, row0, col0, cache)
    for c0, c1 in chunks:
        _finish(img[:, c0:c1], plan, row0, col0 + c0)
    return img


def _background(plan: ScenePlan, row0: int, col0: int, h: int, w: int) -> np.ndarray:
    """Water and land textures blended by the coastline (airfield pads are always land), with surf."""
    look = plan.look
    ys = np.arange(row0, row0 + h) + 0.5
    xs = np.arange(col0, col0 + w) + 0.5
    alpha = plan.coast.window(ys, xs)
    alpha -= np.float32(plan.level)
    alpha *= np.float32(_COAST_SHARPNESS)
    alpha += np.float32(0.5)
    np.clip(alpha, 0.0, 1.0, out=alpha)
    _paint(alpha, plan.pads, row0, col0)
    land = plan.land.window(ys, xs)
    land += np.float32(look.land)
    step = np.float32(plan.patches.amps[0] / 2)
    patches = plan.patches.window(ys, xs)
    patches /= step
    np.rint(patches, out=patches)
    patches *= step
    land += patches
    img = plan.water.window(ys, xs)
    img += np.float32(look.water)
    land -= img
    land *= alpha
    img += land
    if look.surf > 0:
        alpha *= np.float32(1.0) - alpha
        alpha *= np.float32(4 * look.surf)
        img += alpha
    return img


def _finish(img: np.ndarray, plan: ScenePlan, row0: int, col0: int) -> None:
    """Sensor noise (additive for optical, multiplicative log-normal speckle for SAR), then clip to [0, 1]."""
    h, w = img.shape
    noise = _noise_window(plan.noise, row0, col0, h, w)
    sigma = np.float32(plan.look.noise)
    noise *= sigma
    if plan.look.style == "optical":
        img += noise
    else:
        noise -= sigma * sigma / 2
        np.exp(noise, out=noise)
        img *= noise
    np.clip(img, 0.0, 1.0, out=img)


def quantize(image: np.ndarray, dtype: SceneDtype) -> np.ndarray:
    """Stored values of a rendered image in [0, 1]: ``offset + gain * image`` (see :data:`DTYPE_LEVELS`)."""
    offset, gain = DTYPE_LEVELS[dtype]
    out = image * np.float32(gain)
    out += np.float32(offset)
    np.rint(out, out=out)
    return out.astype(dtype)


def render_chip(
    rng: np.random.Generator,
    size: int = 1024,
    *,
    style: Style | None = None,
    length_range: tuple[float, float] = LENGTH_RANGE,
    distractors: float = 1.0,
    hard: float = 0.0,
) -> tuple[np.ndarray, list[TruthObject]]:
    """A training chip: float32 [size, size] in [0, 1] and its objects (pixel coordinates of the chip).

    ``distractors`` scales the number of buildings, towns, points and blobs (1.0: as in scenes' chips).
    ``hard`` (0 to 1) is the probability that the chip is a hard chip, which over-represents what the
    sample models get wrong: mostly water with many ships, many of them dim, thin, large or trailing
    a wake (the label is always the hull alone), and round plane-grey blobs on land, water and aprons
    beside planes. At 0 (the default) nothing extra is drawn: the same generator state gives the same
    chip as before the option existed.

    Drawn by the same code as :func:`write_scene` (densely populated: an airfield in about half the
    chips, ships wherever there is water, a few nearly empty chips), then passed through a random tone
    curve: the scene's own uint8 levels as read with /255, a 1-4 / 96-99.5 percentile stretch (as a
    uint16 scene is normalised), or a low-contrast band of the range. Objects lie wholly inside the chip.
    """
    if size < 64:
        raise ValueError(f"chip size must be >= 64, got {size}")
    if distractors < 0:
        raise ValueError(f"distractors must be >= 0, got {distractors}")
    if not 0.0 <= hard <= 1.0:
        raise ValueError(f"hard must be between 0 and 1, got {hard}")
    cfg = _chip_config(rng, size, style, length_range, distractors, hard)
    plan = _build_plan(rng, size, size, cfg, (np.zeros(0), np.zeros(0)))
    return _tone_map(rng, render_window(plan, 0, 0, size, size)), list(plan.objects)


def _tone_map(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    img = np.power(img, np.float32(rng.uniform(0.75, 1.35)))
    mode = rng.choice(3, p=[0.4, 0.35, 0.25])
    if mode == 0:
        offset, gain = DTYPE_LEVELS["uint8"]
        out = (offset + gain * (img * rng.uniform(0.85, 1.1) + rng.uniform(-0.05, 0.05))) / 255.0
    elif mode == 1:
        lo, hi = np.percentile(img, [rng.uniform(1, 4), rng.uniform(96, 99.5)])
        out = (img - lo) / max(hi - lo, 1e-3)
    else:
        span = rng.uniform(0.2, 0.55)
        out = rng.uniform(0.0, 1.0 - span) + span * img
    return np.clip(out, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Writing scenes
# --------------------------------------------------------------------------------------------------


def write_scene(
    path: str | os.PathLike[str],
    width: int,
    height: int,
    seed: int,
    truth_path: str | os.PathLike[str] | None = None,
    dtype: SceneDtype = "uint8",
    striped: bool = False,
    crs: str = "EPSG:32633",
    pixel_size: float = 0.5,
    origin: tuple[float, float] = (500000.0, 4500000.0),
    objects_per_mpx: float = 2.0,
    edge_objects: bool = True,
    tile: int = 1024,
    overlap: int = 192,
    *,
    style: Style | None = None,
    band_rows: int = 512,
) -> SceneTruth:
    """Write a synthetic scene as a GeoTIFF, streaming ``band_rows`` rows at a time, and return its truth.

    The raster is single-band ``dtype``, tiled 512 x 512 (or striped with ``striped``), DEFLATE with a
    horizontal predictor, north-up in ``crs`` (must be projected) with the top-left corner at ``origin``
    and square pixels of ``pixel_size``. It is written to a temporary name and moved into place, so an
    interrupted run leaves no half-written scene. ``truth_path`` (optional) receives the truth as
    GeoJSON in the same CRS. ``tile``/``overlap`` describe the tiler whose window edges the edge
    objects straddle. Same arguments, same bytes.
    """
    started = time.perf_counter()
    if dtype not in DTYPE_LEVELS:
        raise ValueError(f"dtype must be uint8 or uint16, got {dtype!r}")
    if not (math.isfinite(pixel_size) and pixel_size > 0):
        raise ValueError(f"pixel_size must be positive, got {pixel_size!r}")
    if band_rows < 1:
        raise ValueError(f"band_rows must be >= 1, got {band_rows}")
    crs_obj = _projected_crs(crs)
    plan = plan_scene(
        width, height, seed, objects_per_mpx=objects_per_mpx, edge_objects=edge_objects, tile=tile, overlap=overlap, style=style
    )
    from rasterio.transform import from_origin

    transform = from_origin(origin[0], origin[1], pixel_size, pixel_size)
    path = Path(path)
    _write_raster(path, plan, dtype, striped, transform, crs_obj, band_rows)
    truth = Path(truth_path) if truth_path is not None else None
    if truth is not None:
        write_truth(plan.objects, truth, transform, crs_obj)
    return SceneTruth(
        path=path,
        truth_path=truth,
        width=width,
        height=height,
        dtype=dtype,
        tiled=not striped,
        crs=crs_obj.to_string(),
        transform=(transform.a, transform.b, transform.c, transform.d, transform.e, transform.f),
        seed=int(seed),
        objects=plan.objects,
        seconds=time.perf_counter() - started,
    )


def _projected_crs(crs: Any) -> Any:
    """The CRS as a rasterio CRS, refusing geographic ones (pixel sizes here are metres)."""
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    try:
        parsed = CRS.from_user_input(crs)
    except CRSError as exc:
        raise ValueError(f"unknown CRS {crs!r}: {str(exc).splitlines()[0]}") from exc
    if not parsed.is_projected:
        raise ValueError(f"CRS {crs!r} is not projected; synthetic scenes need a projected CRS in metres")
    return parsed


def _write_raster(path: Path, plan: ScenePlan, dtype: str, striped: bool, transform: Any, crs: Any, band_rows: int) -> None:
    import rasterio
    from rasterio.windows import Window

    from rs_detect.fsutil import atomic_path

    layout = {"tiled": False, "blockysize": 16} if striped else {"tiled": True, "blockxsize": 512, "blockysize": 512}
    profile = {
        "driver": "GTiff", "width": plan.width, "height": plan.height, "count": 1, "dtype": dtype, "crs": crs,
        "transform": transform, "compress": "deflate", "predictor": 2, "zlevel": 1, "bigtiff": "if_safer",
        "num_threads": "all_cpus", **layout,
    }
    cache: dict[int, np.ndarray] = {}
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        for row0 in range(0, plan.height, band_rows):
            h = min(band_rows, plan.height - row0)
            band = render_window(plan, row0, 0, h, plan.width, cache=cache)
            dst.write(quantize(band, dtype), 1, window=Window(0, row0, plan.width, h))
            for i in [i for i in cache if plan.shapes.box[i, 3] <= row0 + h]:
                del cache[i]
