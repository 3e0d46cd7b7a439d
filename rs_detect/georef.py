"""Scene pixels -> map coordinates: polygons through the affine transform, then a GeoDataFrame.

Pixel coordinates are continuous: x = column, y = row, (0, 0) the upper-left corner of the first pixel,
so ``transform * (x, y)`` equals ``rasterio.transform.xy(transform, row, col, offset="ul")``. Rotated
and south-up transforms need nothing special: every corner goes through the full affine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import shapely

from rs_detect.errors import one_line
from rs_detect.postprocess.geometry import obb_corners
from rs_detect.types import Detections

if TYPE_CHECKING:  # geopandas, pandas and pyproj are imported when the first frame is made (0.3-0.5 s of start-up)
    import geopandas as gpd
    from affine import Affine
    from pyproj import CRS as ProjCRS
    from rasterio.crs import CRS

log = logging.getLogger(__name__)

WGS84 = "EPSG:4326"


def pixel_corners(dets: Detections) -> np.ndarray:
    """[K, 4, 2] corners in scene pixels (x = column, y = row)."""
    if dets.task == "obb":
        return obb_corners(dets.boxes.detach().cpu().double()).numpy()
    b = dets.boxes.detach().cpu().double().numpy()
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    return np.stack([np.stack(p, axis=-1) for p in ((x1, y1), (x2, y1), (x2, y2), (x1, y2))], axis=1)


def apply_affine(transform: Affine, xy: np.ndarray) -> np.ndarray:
    """Vectorised ``transform * (x, y)`` over [..., 2]."""
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
    x, y = xy[..., 0], xy[..., 1]
    return np.stack((a * x + b * y + c, d * x + e * y + f), axis=-1)


def clipped_polygons(corners: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Polygons [K] in scene pixels from [K, 4, 2] corners, clipped to the scene ``size`` (width, height).

    A rotated rectangle reaching past the scene edge keeps only its part inside the scene (the footprint
    of the raster); an axis-aligned one is already inside (clipped per tile)."""
    ring = np.concatenate([corners, corners[:, :1]], axis=1)
    polys = shapely.polygons(ring)
    if size is None or not len(corners):
        return polys
    w, h = size
    outside = (corners[..., 0].min(1) < 0) | (corners[..., 1].min(1) < 0) | (corners[..., 0].max(1) > w) | (corners[..., 1].max(1) > h)
    if outside.any():
        clipped = shapely.intersection(polys[outside], shapely.box(0, 0, w, h))
        ok = (shapely.get_type_id(clipped) == 3) & (shapely.area(clipped) > 0)  # a polygon, not a sliver
        fallback = shapely.polygons(np.stack((np.clip(ring[outside][..., 0], 0, w), np.clip(ring[outside][..., 1], 0, h)), -1))
        polys[outside] = np.where(ok, clipped, fallback)
    return polys


def _map_polygons(polys: np.ndarray, transform: Affine) -> np.ndarray:
    """Every vertex through the full affine (rotated and south-up transforms included)."""
    return shapely.transform(polys, lambda xy: apply_affine(transform, xy))


def detections_frame(
    dets: Detections,
    names: Sequence[str],
    transform: Affine | None,
    crs: CRS | None,
    scene: str,
    categories: Sequence[str] | None = None,
    size: tuple[int, int] | None = None,
) -> gpd.GeoDataFrame:
    """A GeoDataFrame in the scene CRS (or pixel coordinates when ``crs`` is None).

    ``categories``: each class's category (plane, ship, other; see :mod:`rs_detect.categories`), written
    as the ``category`` column. ``size``: the scene's (width, height) in pixels; polygons and pixel boxes
    are clipped to it.
    """
    import geopandas as gpd
    import pandas as pd
    from pyproj import CRS as ProjCRS

    corners = pixel_corners(dets)
    polys = clipped_polygons(corners, size) if len(corners) else np.zeros(0, dtype=object)
    if len(polys) and crs is not None and transform is not None:
        polys = _map_polygons(polys, transform)
    geometry = polys if len(polys) else shapely.points(np.zeros((0, 2)))
    aabb = dets.aabb().detach().cpu().double().numpy()
    if size is not None and len(aabb):
        aabb = np.clip(aabb, 0, [size[0], size[1], size[0], size[1]])
    class_ids = dets.class_ids.cpu().numpy().astype(np.int32)
    cats = list(categories) if categories is not None else None
    cols: dict[str, object] = {
        "class_id": class_ids,
        "class_name": pd.array([names[i] for i in class_ids], dtype="str") if len(class_ids) else pd.array([], dtype="str"),
    }
    if cats is not None:
        cols["category"] = pd.array([cats[i] for i in class_ids], dtype="str") if len(class_ids) else pd.array([], dtype="str")
    cols.update({
        "score": dets.scores.detach().cpu().double().numpy().round(4),
        "px_x1": aabb[:, 0].round(2),
        "px_y1": aabb[:, 1].round(2),
        "px_x2": aabb[:, 2].round(2),
        "px_y2": aabb[:, 3].round(2),
    })
    if dets.task == "obb":
        b = dets.boxes.detach().cpu().double().numpy()
        cols.update(px_cx=b[:, 0].round(2), px_cy=b[:, 1].round(2), px_w=b[:, 2].round(2), px_h=b[:, 3].round(2),
                    angle=np.degrees(b[:, 4]).round(3))
    cols["scene"] = pd.array([scene] * len(class_ids), dtype="str")
    frame = pd.DataFrame(cols)
    return gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries(geometry), crs=None if crs is None else ProjCRS.from_user_input(crs.to_wkt()))


def coordinates_label(crs: ProjCRS | None) -> Literal["pixel", "wgs84", "native"]:
    """What an output's coordinates are, from its CRS: the run metadata's ``coordinates``."""
    if crs is None:
        return "pixel"
    from pyproj import CRS as ProjCRS

    return "wgs84" if crs.equals(ProjCRS.from_epsg(4326)) else "native"


def to_output_crs(gdf: gpd.GeoDataFrame, mode: Literal["wgs84", "native"], where: str) -> gpd.GeoDataFrame:
    """Reproject to WGS84 lon/lat (always_xy) unless ``native``; a CRS with no path to WGS84 stays native."""
    if mode == "native" or gdf.crs is None:
        return gdf
    from pyproj import CRS as ProjCRS

    try:
        if gdf.crs.equals(ProjCRS.from_epsg(4326)):
            return gdf
        out = gdf.to_crs(WGS84)
        if len(out) and not np.isfinite(out.total_bounds).all():
            raise ValueError("non-finite coordinates")
        return out
    except Exception as exc:  # pyproj raises several types for CRSs on other bodies or without datum
        log.warning("%s: cannot express this CRS in WGS84 (%s): keeping the scene CRS", where, one_line(exc, 120))
        return gdf
