"""QGIS styling of the detection layer: one colour per class, the score as label.

GIS analysts open the output in QGIS; a layer that arrives already styled (classes told apart at a
glance, each box labelled with its class and score when zoomed in) saves them a manual step and
makes runs look the same everywhere. QGIS finds a style in two places without being asked:

* a GeoPackage's ``layer_styles`` table (the table QGIS itself creates through "Save Style ... in
  database"): the row whose ``f_table_name`` is the layer and whose ``useAsDefault`` is true is
  applied when the layer is opened;
* a ``.qml`` file beside a file-based layer with the same base name (``scene.geojson`` ->
  ``scene.qml``), applied as the layer's default style.

The colours come from :func:`class_colours`, which the quick-look preview uses too, so a class has
the same colour in the PNG and in QGIS.
"""

from __future__ import annotations

import os
import sqlite3
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rs_detect import DOTA_CLASSES
from rs_detect.errors import OutputError

RGB = tuple[int, int, int]

#: Distinct colours that stay visible on grey or colour imagery (after Sasha Trubetskoy's 20
#: distinct colours, reordered so that the first two, the default classes, contrast most).
PALETTE: tuple[RGB, ...] = (
    (255, 40, 40),    # red        plane
    (0, 210, 255),    # cyan       ship
    (255, 225, 25),   # yellow
    (60, 220, 75),    # green
    (245, 130, 48),   # orange
    (240, 50, 230),   # magenta
    (145, 90, 255),   # violet
    (210, 245, 60),   # lime
    (0, 128, 128),    # teal
    (250, 190, 212),  # pink
    (170, 110, 40),   # brown
    (255, 250, 200),  # beige
    (128, 0, 0),      # maroon
    (170, 255, 195),  # mint
    (0, 0, 160),      # navy
    (128, 128, 0),    # olive
    (255, 215, 180),  # apricot
    (220, 190, 255),  # lavender
)
OTHER_COLOUR: RGB = (200, 200, 200)

QML_MARKER = "rs-detect layer style"
# Extensions that may share the output's stem without being harmed by its .qml: our own outputs
# (styled the same way) and the style itself.
SIDECAR_SHARING_OK = frozenset({".geojson", ".json", ".gpkg", ".parquet", ".geoparquet", ".qml"})
LABEL_EXPRESSION = "\"class_name\" || ' ' || format_number(\"score\", 2)"
STYLE_NAME = "rs-detect"
FILL_ALPHA = 40  # of 255: the box is tinted, the object under it stays visible
OUTLINE_MM = 0.5
LABEL_MAX_SCALE = 25000  # labels from 1:25 000 inwards: thousands of labels at full extent only clutter

#: Field aliases QGIS shows in the attribute table, identify results and forms: the unit of each column.
FIELD_ALIASES: dict[str, str] = {
    "class_id": "class id (index into the model's classes)",
    "class_name": "class (the model's name)",
    "category": "category (plane, ship or other)",
    "score": "score (0-1)",
    "px_x1": "x1 (px, scene column)",
    "px_y1": "y1 (px, scene row)",
    "px_x2": "x2 (px, scene column)",
    "px_y2": "y2 (px, scene row)",
    "px_cx": "centre x (px)",
    "px_cy": "centre y (px)",
    "px_w": "width (px)",
    "px_h": "height (px)",
    "angle": "angle (degrees, clockwise from +x)",
    "scene": "scene file",
}


def class_colours(names: Sequence[str]) -> dict[str, RGB]:
    """One colour per class name, stable across runs and models.

    DOTA class names keep a reserved colour whatever their index in the model (plane is always red,
    ship always cyan); any other name takes the first palette colour not used by the others, in
    model order, so no two classes of one model share a colour while the palette lasts.
    """
    from rs_detect.categories import PLANE, SHIP, category_of

    out: dict[str, RGB] = {}
    for name in names:
        if name in DOTA_CLASSES and name not in out:
            out[name] = PALETTE[DOTA_CLASSES.index(name) % len(PALETTE)]
    # the first plane-category and ship-category class of another dataset (COCO's airplane, xView's
    # Fixed-wing Aircraft) takes plane's red and ship's cyan when no class holds them
    for category, colour in ((PLANE, PALETTE[0]), (SHIP, PALETTE[1])):
        first = next((n for n in names if n not in out and category_of(n) == category), None)
        if first is not None and colour not in out.values():
            out[first] = colour
    free = [c for c in PALETTE if c not in out.values()]
    for i, name in enumerate(n for n in names if n not in out):
        out[name] = free[i] if i < len(free) else PALETTE[i % len(PALETTE)]
    return out


def style_classes(metadata: Mapping[str, Any] | None, present: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """(all model classes for colours, classes to list as categories) from run metadata.

    Categories are the classes the run looked for (the class filter, else every model class) plus
    any class actually present, so a style written once also fits later runs of the same setup.
    """
    from rs_detect.categories import categories_for, select

    meta = dict(metadata or {})
    model_classes = [str(c) for c in meta.get("classes") or []]
    wanted = list(model_classes)
    class_filter = [str(c) for c in meta.get("class_filter") or []]
    if class_filter and model_classes:  # the model classes the filter selects (categories or names)
        cats = meta.get("categories") or categories_for(model_classes)
        ids = select(class_filter, model_classes, list(cats), strict=False)
        wanted = list(model_classes) if ids is None else [model_classes[i] for i in ids]
    elif class_filter:
        wanted = class_filter
    for name in present:
        if name not in wanted:
            wanted.append(name)
        if name not in model_classes:
            model_classes.append(name)
    return model_classes, wanted


# -- QML ---------------------------------------------------------------------------------------------


def _rgba(rgb: RGB, alpha: int = 255) -> str:
    return f"{rgb[0]},{rgb[1]},{rgb[2]},{alpha}"


def _options(parent: ET.Element, props: Mapping[str, str]) -> None:
    """Symbol-layer properties in both encodings QGIS 3 reads (``<Option>`` map and legacy ``<prop>``)."""
    opt = ET.SubElement(parent, "Option", type="Map")
    for k, v in props.items():
        ET.SubElement(opt, "Option", name=k, type="QString", value=v)
    for k, v in props.items():
        ET.SubElement(parent, "prop", k=k, v=v)


def _fill_symbol(parent: ET.Element, name: str, rgb: RGB) -> None:
    sym = ET.SubElement(parent, "symbol", type="fill", name=name, alpha="1", clip_to_extent="1", force_rhr="0")
    layer = ET.SubElement(sym, "layer", {"class": "SimpleFill", "enabled": "1", "locked": "0", "pass": "0"})
    _options(layer, {
        "color": _rgba(rgb, FILL_ALPHA),
        "style": "solid",
        "outline_color": _rgba(rgb),
        "outline_style": "solid",
        "outline_width": str(OUTLINE_MM),
        "outline_width_unit": "MM",
        "joinstyle": "miter",
        "offset": "0,0",
        "offset_unit": "MM",
    })


def _labeling(root: ET.Element) -> None:
    lab = ET.SubElement(root, "labeling", type="simple")
    settings = ET.SubElement(lab, "settings", calloutType="simple")
    text = ET.SubElement(settings, "text-style", {
        "fieldName": LABEL_EXPRESSION, "isExpression": "1", "fontSize": "8", "fontSizeUnit": "Point",
        "textColor": "255,255,255,255", "textOpacity": "1", "fontWeight": "63", "namedStyle": "Bold",
    })
    ET.SubElement(text, "text-buffer", bufferDraw="1", bufferSize="0.7", bufferSizeUnits="MM",
                  bufferColor="0,0,0,255", bufferOpacity="0.8", bufferJoinStyle="128", bufferNoFill="1")
    # placement 1 = "over point" at the centroid, quadrant 1 = above it: the label sits on the box's top
    ET.SubElement(settings, "placement", placement="1", quadOffset="1", dist="0", distUnits="MM",
                  centroidWhole="1", centroidInside="0", fitInPolygonOnly="0", offsetType="0")
    # QGIS writes its label scale range as scaleMin = maximumScale (the most zoomed-in limit, 0: none)
    # and scaleMax = minimumScale (the most zoomed-out limit): labels from 1:LABEL_MAX_SCALE inwards
    ET.SubElement(settings, "rendering", scaleVisibility="1", scaleMin="0", scaleMax=str(LABEL_MAX_SCALE),
                  obstacle="0", displayAll="0", upsidedownLabels="0", limitNumLabels="0", minFeatureSize="0")


def layer_qml(classes: Sequence[str], model_classes: Sequence[str] | None = None) -> str:
    """QML text: a categorized renderer on ``class_name`` and ``class score`` labels.

    ``classes`` become the categories (in order); colours come from :func:`class_colours` over
    ``model_classes`` (default: ``classes``) so they match the preview. A last, grey "other" category
    (empty value: QGIS's "all other values") draws any class the style does not list.
    """
    colours = class_colours(list(model_classes or classes))
    root = ET.Element("qgis", version="3.28.0", styleCategories="Symbology|Labeling|Fields", labelsEnabled="1")
    renderer = ET.SubElement(root, "renderer-v2", type="categorizedSymbol", attr="class_name",
                             symbollevels="0", forceraster="0", enableorderby="0", referencescale="-1")
    cats = ET.SubElement(renderer, "categories")
    symbols = ET.SubElement(renderer, "symbols")
    entries = [(name, name, colours.get(name, OTHER_COLOUR)) for name in classes] + [("", "other", OTHER_COLOUR)]
    for i, (value, label, rgb) in enumerate(entries):
        ET.SubElement(cats, "category", symbol=str(i), value=value, label=label, render="true", type="string")
        _fill_symbol(symbols, str(i), rgb)
    src = ET.SubElement(renderer, "source-symbol")
    _fill_symbol(src, "0", OTHER_COLOUR)
    ET.SubElement(renderer, "rotation")
    ET.SubElement(renderer, "sizescale")
    _labeling(root)
    aliases = ET.SubElement(root, "aliases")
    for field_name, alias in FIELD_ALIASES.items():
        ET.SubElement(aliases, "alias", field=field_name, name=alias)  # QGIS matches by field name
    ET.SubElement(root, "blendMode").text = "0"
    ET.SubElement(root, "featureBlendMode").text = "0"
    ET.SubElement(root, "layerGeometryType").text = "2"  # polygon
    ET.indent(root, space=" ")
    body = ET.tostring(root, encoding="unicode")
    return (f"<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n<!-- {QML_MARKER}: "
            f"one colour per class_name, labels class_name and score -->\n{body}\n")


def qml_for(metadata: Mapping[str, Any] | None, present: Iterable[str] = ()) -> str:
    """The QML for a run: categories from its metadata and the classes present in its output."""
    model_classes, wanted = style_classes(metadata, present)
    return layer_qml(wanted, model_classes)


def sidecar_path(output: Path) -> Path:
    """Where QGIS looks for a file layer's default style: same folder, same stem, ``.qml``."""
    return output.with_suffix(".qml")


def is_ours(qml_file: Path) -> bool:
    """Whether ``qml_file`` was written by rs-detect (and not since re-saved by someone in QGIS)."""
    try:
        with open(qml_file, encoding="utf-8", errors="replace") as fh:
            return QML_MARKER in fh.read(1024)
    except OSError:
        return False


def sidecar_problem(output: Path) -> str | None:
    """Why the sidecar of ``output`` must not be written, or None when it may.

    QGIS applies ``<stem>.qml`` to *every* file layer named ``<stem>.*``: beside ``scene.tif`` a
    ``scene.qml`` would also be loaded as the raster's default style (losing its contrast stretch)
    and would overwrite a style the analyst saved for the raster. So the sidecar is skipped when
    another file shares the stem, or when a ``.qml`` that rs-detect did not write is already there.
    """
    qml = sidecar_path(output)
    if qml.exists() and not is_ours(qml):
        return f"{qml.name} exists and was not written by rs-detect"
    stem = output.stem
    try:
        names = os.listdir(output.parent if str(output.parent) else ".")
    except OSError:
        return None
    for name in sorted(names):
        base, dot, ext = name.rpartition(".")
        if dot and base == stem and f".{ext.lower()}" not in SIDECAR_SHARING_OK:
            return f"{qml.name} would also be QGIS's default style for {name}"
    return None


# -- GeoPackage layer_styles ---------------------------------------------------------------------------

# The table as QGIS creates it (through OGR) when saving a style into a GeoPackage.
CREATE_LAYER_STYLES = """
CREATE TABLE IF NOT EXISTS "layer_styles" (
    "id" INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    "f_table_catalog" TEXT(256),
    "f_table_schema" TEXT(256),
    "f_table_name" TEXT(256),
    "f_geometry_column" TEXT(256),
    "styleName" TEXT(30),
    "styleQML" TEXT,
    "styleSLD" TEXT,
    "useAsDefault" BOOLEAN,
    "description" TEXT,
    "owner" TEXT(30),
    "ui" TEXT(30),
    "update_time" DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now'))
)
"""


def _geometry_column(conn: sqlite3.Connection, layer: str) -> str:
    row = conn.execute("SELECT column_name FROM gpkg_geometry_columns WHERE table_name = ?", (layer,)).fetchone()
    if row is None:
        raise OutputError(f"no feature table {layer!r} in the GeoPackage")
    return str(row[0])


CREATE_DATA_COLUMNS = """
CREATE TABLE IF NOT EXISTS "gpkg_data_columns" (
    "table_name" TEXT NOT NULL,
    "column_name" TEXT NOT NULL,
    "name" TEXT,
    "title" TEXT,
    "description" TEXT,
    "mime_type" TEXT,
    "constraint_name" TEXT,
    CONSTRAINT pk_gdc PRIMARY KEY (table_name, column_name),
    CONSTRAINT gdc_tn UNIQUE (table_name, name)
)
"""
CREATE_EXTENSIONS = """
CREATE TABLE IF NOT EXISTS "gpkg_extensions" (
    "table_name" TEXT,
    "column_name" TEXT,
    "extension_name" TEXT NOT NULL,
    "definition" TEXT NOT NULL,
    "scope" TEXT NOT NULL,
    CONSTRAINT ge_tce UNIQUE (table_name, column_name, extension_name)
)
"""


def _describe_columns(conn: sqlite3.Connection, layer: str) -> None:
    """Each column's unit in the GeoPackage schema extension (``gpkg_data_columns``): GDAL 3.7+ reads
    ``name`` as the field's alternative name (QGIS's alias) and ``description`` as its comment."""
    present = {str(r[1]) for r in conn.execute(f'PRAGMA table_info("{layer}")')}
    rows = [(layer, col, alias, alias, alias) for col, alias in FIELD_ALIASES.items() if col in present]
    if not rows:
        return
    conn.execute(CREATE_DATA_COLUMNS)
    conn.execute(CREATE_EXTENSIONS)
    conn.execute("INSERT OR IGNORE INTO gpkg_extensions (table_name, column_name, extension_name, definition, scope) "
                 "VALUES ('gpkg_data_columns', NULL, 'gpkg_schema', 'http://www.geopackage.org/spec121/#extension_schema', 'read-write')")
    conn.execute("DELETE FROM gpkg_data_columns WHERE table_name = ?", (layer,))
    conn.executemany("INSERT INTO gpkg_data_columns (table_name, column_name, name, title, description) VALUES (?, ?, ?, ?, ?)", rows)


def _register_attributes_table(conn: sqlite3.Connection, now: str) -> None:
    """List ``layer_styles`` in gpkg_contents as QGIS/OGR do, so GeoPackage validators accept it."""
    conn.execute(
        "INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier, description, last_change) "
        "VALUES ('layer_styles', 'attributes', 'layer_styles', '', ?)",
        (now,),
    )
    has_ogr = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'gpkg_ogr_contents'").fetchone()
    if has_ogr:
        conn.execute("DELETE FROM gpkg_ogr_contents WHERE table_name = 'layer_styles'")
        conn.execute("INSERT INTO gpkg_ogr_contents (table_name, feature_count) "
                     "SELECT 'layer_styles', COUNT(*) FROM layer_styles")


def write_gpkg_style(gpkg: Path, layer: str, qml: str, name: str = STYLE_NAME, description: str = "") -> None:
    """Store ``qml`` as the default style of ``layer`` in the GeoPackage ``gpkg`` (replacing ours).

    Written with sqlite3 into a closed file (the writer's temporary GeoPackage, before its rename),
    in one transaction: either the table, its registration and the row are all there, or none is.
    """
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")  # GPKG DATETIME
    try:
        conn = sqlite3.connect(gpkg)
    except sqlite3.Error as exc:
        raise OutputError(f"{gpkg}: cannot open the GeoPackage to add the layer style ({exc})") from None
    try:
        with conn:
            geom = _geometry_column(conn, layer)
            conn.execute(CREATE_LAYER_STYLES)
            conn.execute("UPDATE layer_styles SET useAsDefault = 0 WHERE f_table_name = ?", (layer,))
            conn.execute("DELETE FROM layer_styles WHERE f_table_name = ? AND styleName = ?", (layer, name))
            conn.execute(
                "INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column, "
                "styleName, styleQML, styleSLD, useAsDefault, description, owner, ui, update_time) "
                "VALUES ('', '', ?, ?, ?, ?, '', 1, ?, '', NULL, ?)",
                (layer, geom, name, qml, description or f"{name} default style", now),
            )
            _register_attributes_table(conn, now)
            _describe_columns(conn, layer)
    except OutputError as exc:
        raise OutputError(f"{gpkg}: {exc}") from None
    except sqlite3.Error as exc:
        raise OutputError(f"{gpkg}: cannot add the layer style ({exc})") from None
    finally:
        conn.close()


def read_gpkg_style(gpkg: Path, layer: str) -> str | None:
    """The default QML stored for ``layer``, or None (for tests and for tools that copy styles)."""
    conn = sqlite3.connect(f"file:{gpkg}?mode=ro", uri=True)
    try:
        has = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'layer_styles'").fetchone()
        if not has:
            return None
        row = conn.execute(
            "SELECT styleQML FROM layer_styles WHERE f_table_name = ? ORDER BY useAsDefault DESC, id DESC LIMIT 1", (layer,)
        ).fetchone()
        return None if row is None else str(row[0])
    finally:
        conn.close()
