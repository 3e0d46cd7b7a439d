"""Write detections as GeoJSON (RFC 7946), GeoPackage or GeoParquet, atomically.

Every file is written to a temporary name in the destination folder and renamed into place when it
is complete, so a failure (or Ctrl-C) never leaves a partial or corrupt output.

The layer arrives styled for QGIS (see :mod:`rs_detect.style`): a GeoPackage carries the style in its
``layer_styles`` table (added to the temporary file before the rename); GeoJSON and GeoParquet get a
sidecar ``<name>.qml``, itself written to a temporary name and renamed into place just before the
main file, and removed again if the main file does not make it. The sidecar is skipped (with an
info line) where QGIS would also apply it to another file of the same stem, e.g. the scene raster.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rs_detect.errors import OutputError
from rs_detect.fsutil import atomic_path
from rs_detect.fsutil import atomic_write_text as write_text_atomic
from rs_detect.style import qml_for, sidecar_path, sidecar_problem, write_gpkg_style

if TYPE_CHECKING:  # a frame to write has brought geopandas and pyproj in already
    import geopandas as gpd
    from pyproj import CRS as ProjCRS

FORMATS = {".geojson": "geojson", ".json": "geojson", ".gpkg": "gpkg", ".parquet": "parquet", ".geoparquet": "parquet"}
EXTENSIONS = {"geojson": ".geojson", "gpkg": ".gpkg", "parquet": ".parquet"}
LAYER = "detections"
WGS84_DECIMALS = 6

log = logging.getLogger(__name__)


def default_output(scene: Path) -> Path:
    """``SCENE.detections.geojson`` beside the scene: its style ``SCENE.detections.qml`` is the one QGIS
    loads for it (QGIS looks for ``<name without the last extension>.qml``), and it cannot be taken for
    the scene raster's own style (``SCENE.qml``)."""
    from rs_detect.io.location import RemoteScene

    if isinstance(scene, RemoteScene):  # a URL: in the current folder
        return Path(f"{scene.stem}.detections.geojson")
    return scene.with_name(f"{scene.stem}.detections.geojson")


def format_for(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise OutputError(f"{path}: unknown output format {path.suffix!r} (use .geojson, .gpkg or .parquet)")
    return fmt


def check_writable(path: Path, what: str = "output") -> None:
    """Fail before any work is done when the output cannot be written."""
    if what == "output":
        format_for(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{path}: {what} folder {parent} does not exist")
    if path.is_dir():
        raise OutputError(f"{path}: is a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: {what} folder {parent} is not writable")


def write_detections(
    gdf: gpd.GeoDataFrame,
    path: Path,
    metadata: dict[str, object] | None = None,
    extra: Callable[[Path], None] | None = None,
    style: bool = True,
) -> Path:
    """Write ``gdf`` to ``path`` (format from the extension) with run metadata; returns ``path``.

    ``extra`` is called with the temporary file before the rename. ``style`` adds the QGIS style
    (GeoPackage: a ``layer_styles`` row; GeoJSON/GeoParquet: a sidecar ``.qml``).
    """
    from pyproj import CRS as ProjCRS

    fmt = format_for(path)
    meta = {k: v for k, v in (metadata or {}).items()}
    if meta.get("coordinates") == "wgs84" and gdf.crs is not None and not gdf.crs.equals(ProjCRS.from_epsg(4326)):
        meta["coordinates"] = "native"  # the scene CRS had no way to WGS84: say what the file holds
    qml = qml_for(meta, _present_classes(gdf)) if style else None
    placed: list[Path] = []
    try:
        with atomic_path(path) as tmp:
            if fmt == "geojson":
                is_wgs84 = gdf.crs is not None and gdf.crs.equals(ProjCRS.from_epsg(4326))
                layer_options = {"RFC7946": "YES" if is_wgs84 else "NO", "WRITE_NAME": "YES",
                                 "DESCRIPTION": json.dumps(meta, separators=(",", ":"), default=str)}
                if is_wgs84:  # 6 decimals of a degree: about 11 cm, finer than any pixel; GDAL's default is 7
                    layer_options["COORDINATE_PRECISION"] = str(WGS84_DECIMALS)
                gdf.to_file(tmp, driver="GeoJSON", engine="pyogrio", layer=LAYER, layer_options=layer_options)
                if not is_wgs84 and gdf.crs is not None:
                    name_geojson_crs(tmp, gdf.crs)
            elif fmt == "gpkg":
                gdf.to_file(tmp, driver="GPKG", engine="pyogrio", layer=LAYER, geometry_type=_geometry_type(gdf),
                            metadata={"rs_detect": json.dumps(meta, default=str)})
                if qml is not None:
                    write_gpkg_style(tmp, LAYER, qml, description=f"{meta.get('software', 'rs-detect')}: one colour per class, score labels")
            else:
                _write_parquet(gdf, tmp, meta)
            if extra is not None:
                extra(tmp)
            if qml is not None and fmt != "gpkg":
                problem = sidecar_problem(path)
                if problem is None:
                    placed.append(write_text_atomic(sidecar_path(path), qml))
                else:
                    log.info("%s: QGIS style not written beside it (%s); name the output differently "
                             "(e.g. SCENE.detections.geojson) or write a .gpkg, which carries its style inside", path.name, problem)
    except BaseException as exc:
        for p in placed:  # the main file did not make it: its sidecar must not stay behind alone
            p.unlink(missing_ok=True)
        problem = write_problem(exc, path.parent)
        if problem is not None:
            raise OutputError(f"{path}: cannot write ({problem})") from None
        raise
    return path


def write_problem(exc: BaseException, folder: Path) -> str | None:
    """One line for an error of the file system or of a writing library (GDAL/OGR, SQLite, Arrow), else None.

    GDAL reports a full disk as a failed feature or a missing table (the GeoPackage's first pages were
    never written): when the folder has (almost) no room left, that is what the message says.
    """
    import pyarrow
    from pyogrio.errors import DataLayerError, DataSourceError

    if not isinstance(exc, (OSError, DataSourceError, DataLayerError, sqlite3.Error, pyarrow.ArrowException)):
        return None
    text = (exc.strerror if isinstance(exc, OSError) and exc.strerror else None) or " ".join(str(exc).split())
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if not full:
        try:
            full = shutil.disk_usage(folder).free < (1 << 20)
        except OSError:
            pass
    if full and "space" not in text.lower():
        return f"no space left on the device; {text[:160]}"
    return text[:300]


def geojson_crs_member(crs: ProjCRS) -> dict[str, object]:
    """The GeoJSON 2008 ``crs`` member GDAL writes: an OGC URN for an EPSG code, else the WKT itself.

    GDAL (and so pyogrio, geopandas, QGIS) reads the name through ``SetFromUserInput``, which takes
    both forms; without the member every reader takes the coordinates for WGS84 degrees.
    """
    code = crs.to_epsg()
    if code is not None:
        name = f"urn:ogc:def:crs:EPSG::{code}"
    else:
        name = crs.to_wkt("WKT1_GDAL") or crs.to_wkt()
    return {"type": "name", "properties": {"name": name}}


def name_geojson_crs(path: Path, crs: ProjCRS, chunk: int = 1 << 20) -> None:
    """Add the ``crs`` member to a GeoJSON that GDAL wrote without one (a CRS without an EPSG code).

    The member goes before ``"features"`` (GDAL's layout: type, name, description, then features); the
    rest of the file is copied in chunks, so a file of millions of detections is never parsed whole.
    """
    with open(path, "rb") as src:
        head = src.read(chunk)
        while b'"features": [' not in head and len(head) < (64 << 20):
            more = src.read(chunk)
            if not more:
                break
            head += more
        if b'"crs":' in head.split(b'"features": [', 1)[0]:
            return  # GDAL named it (it found an EPSG code itself)
        at = head.find(b'"features": [')
        if at < 0:
            raise OutputError(f"{path}: unexpected GeoJSON layout from GDAL (no features array)")
        member = json.dumps(geojson_crs_member(crs), separators=(", ", ": ")).encode()
        tmp = path.with_name(path.name + ".crs")
        try:
            with open(tmp, "wb") as dst:
                dst.write(head[:at] + b'"crs": ' + member + b",\n" + head[at:])
                shutil.copyfileobj(src, dst, chunk)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _geometry_type(gdf: gpd.GeoDataFrame) -> str | None:
    """"Polygon" for detections (also when there are none: an empty layer keeps a stable type that its
    polygon style applies to), else None to let the driver infer it."""
    types = set(gdf.geom_type.dropna().unique()) if len(gdf) else set()
    return "Polygon" if types <= {"Polygon"} else None


def _present_classes(gdf: gpd.GeoDataFrame) -> list[str]:
    if "class_name" not in gdf.columns or not len(gdf):
        return []
    if "class_id" in gdf.columns:
        pairs = gdf[["class_id", "class_name"]].drop_duplicates().sort_values("class_id")
        return [str(n) for n in pairs["class_name"]]
    return sorted(str(n) for n in gdf["class_name"].unique())


def _write_parquet(gdf: gpd.GeoDataFrame, path: Path, meta: dict[str, object]) -> None:
    import pyarrow.parquet as pq
    from geopandas.io.arrow import _geopandas_to_arrow

    table = _geopandas_to_arrow(gdf, index=False)
    schema_meta = dict(table.schema.metadata or {})
    schema_meta[b"rs_detect"] = json.dumps(meta, default=str).encode()
    pq.write_table(table.replace_schema_metadata(schema_meta), path)


def read_metadata(path: Path) -> dict[str, object]:
    """The run metadata written by :func:`write_detections` (for tests, ``eval`` and ``batch``)."""
    fmt = format_for(path)
    if fmt == "geojson":
        with open(path) as fh:
            doc = json.load(fh)
        return json.loads(doc.get("description") or "{}")
    if fmt == "gpkg":
        import pyogrio

        info = pyogrio.read_info(path, layer=LAYER)
        return json.loads((info.get("layer_metadata") or {}).get("rs_detect", "{}"))
    import pyarrow.parquet as pq

    raw = (pq.read_schema(path).metadata or {}).get(b"rs_detect", b"{}")
    return json.loads(raw)
