"""QGIS styling of the output: layer_styles in GeoPackages, sidecar .qml for files, atomic throughout."""

from __future__ import annotations

import os
import sqlite3
import xml.etree.ElementTree as ET
from pathlib import Path

import geopandas as gpd
import pyogrio
import pytest
import shapely

from rs_detect import DOTA_CLASSES
from rs_detect.errors import OutputError
from rs_detect.io import writer
from rs_detect.io.writer import LAYER, read_metadata, write_detections
from rs_detect.style import (
    LABEL_EXPRESSION,
    PALETTE,
    class_colours,
    is_ours,
    layer_qml,
    qml_for,
    read_gpkg_style,
    sidecar_path,
    sidecar_problem,
    style_classes,
)

META = {"software": "rs-detect test", "classes": list(DOTA_CLASSES), "class_filter": ["plane", "ship"], "conf": 0.25}


def frame(crs: str | None = "EPSG:4326") -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame(
        {"class_id": [0, 1, 0], "class_name": ["plane", "ship", "plane"], "score": [0.91, 0.55, 0.42]},
        geometry=[shapely.box(10, 50, 10.001, 50.001), shapely.box(10.01, 50, 10.011, 50.001), shapely.box(10.02, 50, 10.021, 50.001)],
        crs=crs,
    )


def categories(qml: str) -> dict[str, str]:
    """category value -> the outline colour of its symbol, parsed back from the QML."""
    root = ET.fromstring(qml)
    renderer = root.find("renderer-v2")
    assert renderer is not None and renderer.get("type") == "categorizedSymbol" and renderer.get("attr") == "class_name"
    symbols = {s.get("name"): s for s in renderer.findall("symbols/symbol")}
    out = {}
    for cat in renderer.findall("categories/category"):
        sym = symbols[cat.get("symbol")]
        opt = sym.find("layer/Option[@type='Map']")
        assert opt is not None
        props = {o.get("name"): o.get("value") for o in opt.findall("Option")}
        out[cat.get("value")] = props["outline_color"]
    return out


def rgba(rgb: tuple[int, int, int]) -> str:
    return f"{rgb[0]},{rgb[1]},{rgb[2]},255"


# -- colours and the QML itself --------------------------------------------------------------------


def test_colours_are_stable_and_distinct() -> None:
    dota = class_colours(DOTA_CLASSES)
    assert dota["plane"] == PALETTE[0] and dota["ship"] == PALETTE[1]
    assert len(set(dota.values())) == len(DOTA_CLASSES)
    # a model with other classes (and plane not first) keeps plane's colour and never reuses it
    custom = class_colours(["car", "plane", "truck"])
    assert custom["plane"] == PALETTE[0]
    assert len({custom["car"], custom["plane"], custom["truck"]}) == 3


def test_qml_has_one_category_per_class_and_score_labels() -> None:
    qml = layer_qml(["plane", "ship"], DOTA_CLASSES)
    root = ET.fromstring(qml)  # valid XML (the DOCTYPE and the marker comment included)
    cats = categories(qml)
    assert cats == {"plane": rgba(PALETTE[0]), "ship": rgba(PALETTE[1]), "": "200,200,200,255"}
    text = root.find("labeling/settings/text-style")
    assert root.get("labelsEnabled") == "1"
    assert text is not None and text.get("isExpression") == "1" and text.get("fieldName") == LABEL_EXPRESSION
    assert "format_number" in LABEL_EXPRESSION and "score" in LABEL_EXPRESSION
    assert root.findtext("layerGeometryType") == "2"
    # fills are see-through so the imagery under a box stays visible
    fill = root.find("renderer-v2/symbols/symbol/layer/Option[@type='Map']/Option[@name='color']")
    assert fill is not None and int(fill.get("value").split(",")[3]) < 128


def label_visible(qml: str, scale_denominator: float) -> bool:
    """Whether QGIS draws the labels at 1:``scale_denominator``, read the way QGIS reads the style.

    QgsPalLayerSettings::readXml: ``scaleMin`` is ``maximumScale``, the most zoomed-in limit (0 = none),
    ``scaleMax`` is ``minimumScale``, the most zoomed-out limit (0 = none); labels show where
    maximumScale <= scale <= minimumScale (QgsScaleUtils::isZoomLevelVisible semantics).
    """
    root = ET.fromstring(qml)
    if root.get("labelsEnabled") != "1":
        return False
    rendering = root.find("labeling/settings/rendering")
    assert rendering is not None
    if rendering.get("scaleVisibility", "0") != "1":
        return True
    most_in = float(rendering.get("scaleMin") or 0)  # maximumScale
    most_out = float(rendering.get("scaleMax") or 0)  # minimumScale
    return (most_in == 0 or scale_denominator >= most_in) and (most_out == 0 or scale_denominator <= most_out)


def test_labels_show_from_1_25000_inwards(tmp_path: Path) -> None:
    for qml in (layer_qml(["plane", "ship"], DOTA_CLASSES),
                read_gpkg_style(write_detections(frame(), tmp_path / "d.gpkg", META), LAYER)):
        assert qml is not None
        rendering = ET.fromstring(qml).find("labeling/settings/rendering")
        assert rendering is not None and float(rendering.get("scaleMin") or 0) == 0  # no zoomed-in limit
        assert float(rendering.get("scaleMax") or 0) == 25000  # the zoomed-out limit
        assert label_visible(qml, 5000) and label_visible(qml, 1000) and label_visible(qml, 25000)
        assert not label_visible(qml, 50000)


def test_columns_carry_their_units(tmp_path: Path) -> None:
    aliases = {a.get("field"): a.get("name") for a in ET.fromstring(layer_qml(["plane"])).findall("aliases/alias")}
    assert "0-1" in aliases["score"] and "px" in aliases["px_x1"] and "degrees" in aliases["angle"]
    assert "Fields" in ET.fromstring(layer_qml(["plane"])).get("styleCategories", "").split("|")  # aliases are a Fields category
    f = frame()
    f["px_x1"] = [1.0, 2.0, 3.0]
    out = write_detections(f, tmp_path / "d.gpkg", META)
    with sqlite3.connect(out) as conn:
        rows = dict(conn.execute("SELECT column_name, description FROM gpkg_data_columns WHERE table_name = ?", (LAYER,)).fetchall())
        ext = conn.execute("SELECT scope FROM gpkg_extensions WHERE table_name = 'gpkg_data_columns' AND extension_name = 'gpkg_schema'").fetchone()
    assert set(rows) == {"class_id", "class_name", "score", "px_x1"}  # only the columns the layer has
    assert "px" in rows["px_x1"] and "0-1" in rows["score"] and ext == ("read-write",)
    assert len(gpd.read_file(out, layer=LAYER)) == 3  # GDAL still reads it


def test_wgs84_geojson_has_6_decimals(tmp_path: Path) -> None:
    import json
    import re

    f = frame()
    f.geometry = [shapely.box(10.123456789, 50.987654321, 10.1234599, 50.9876599)] * 3
    text = (write_detections(f, tmp_path / "d.geojson", META)).read_text()
    coords = json.loads(text)["features"][0]["geometry"]["coordinates"][0]
    assert [10.123457, 50.987654] in coords
    decimals = {len(m) for m in re.findall(r"\d+\.(\d+)", json.dumps(json.loads(text)["features"][0]["geometry"]))}
    assert max(decimals) == 6


def test_style_classes_follow_the_filter_and_what_is_present() -> None:
    model, wanted = style_classes(META, ["plane", "harbor"])
    assert wanted == ["plane", "ship", "harbor"]
    assert model[: len(DOTA_CLASSES)] == list(DOTA_CLASSES)
    _, everything = style_classes({"classes": ["a", "b"], "class_filter": None})
    assert everything == ["a", "b"]
    _, bare = style_classes(None, ["ship"])  # no metadata: what the frame holds
    assert bare == ["ship"]


# -- GeoPackage --------------------------------------------------------------------------------------


def test_gpkg_carries_the_default_style_row(tmp_path: Path) -> None:
    out = write_detections(frame(), tmp_path / "dets.gpkg", META)
    gdf = gpd.read_file(out, layer=LAYER)
    assert len(gdf) == 3 and list(gdf["class_name"]) == ["plane", "ship", "plane"]
    assert read_metadata(out)["conf"] == 0.25
    with sqlite3.connect(out) as conn:
        cols = [r[1] for r in conn.execute("PRAGMA table_info(layer_styles)")]
        rows = conn.execute("SELECT f_table_catalog, f_table_schema, f_table_name, f_geometry_column, styleName, "
                            "styleQML, useAsDefault FROM layer_styles").fetchall()
        geom_col = conn.execute("SELECT column_name FROM gpkg_geometry_columns WHERE table_name = ?", (LAYER,)).fetchone()[0]
        contents = conn.execute("SELECT data_type FROM gpkg_contents WHERE table_name = 'layer_styles'").fetchone()
    assert cols == ["id", "f_table_catalog", "f_table_schema", "f_table_name", "f_geometry_column", "styleName",
                    "styleQML", "styleSLD", "useAsDefault", "description", "owner", "ui", "update_time"]
    assert len(rows) == 1
    catalog, schema, table, geom, name, qml, default = rows[0]
    assert (catalog, schema, table, geom, default) == ("", "", LAYER, geom_col, 1)
    assert name == "rs-detect"
    assert set(categories(qml)) == {"plane", "ship", ""}
    assert contents == ("attributes",)
    assert read_gpkg_style(out, LAYER) == qml
    # GDAL sees a sound GeoPackage: both tables, the style table without geometry
    layers = {name: geom for name, geom in pyogrio.list_layers(out)}
    assert layers[LAYER] == "Polygon" and layers["layer_styles"] is None
    assert not sidecar_path(out).exists()  # the style lives inside


def test_gpkg_without_style_when_asked(tmp_path: Path) -> None:
    out = write_detections(frame(), tmp_path / "plain.gpkg", META, style=False)
    assert read_gpkg_style(out, LAYER) is None


def test_empty_result_still_gets_a_style(tmp_path: Path) -> None:
    out = write_detections(frame().iloc[:0], tmp_path / "empty.gpkg", META)
    qml = read_gpkg_style(out, LAYER)
    assert qml is not None and set(categories(qml)) == {"plane", "ship", ""}
    # the empty layer keeps the polygon type the style is made for (QGIS refuses a style whose
    # layerGeometryType differs from the layer's)
    assert pyogrio.read_info(out, layer=LAYER)["geometry_type"] == "Polygon"
    assert ET.fromstring(qml).findtext("layerGeometryType") == "2"


# -- sidecar .qml ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dets.geojson", "dets.parquet"])
def test_file_outputs_get_a_sidecar_qml(tmp_path: Path, name: str) -> None:
    out = write_detections(frame(), tmp_path / name, META)
    qml_file = tmp_path / "dets.qml"
    assert qml_file.is_file() and is_ours(qml_file)
    assert set(categories(qml_file.read_text())) == {"plane", "ship", ""}
    assert qml_file.read_text() == qml_for(META, ["plane", "ship"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "dets.qml"])  # no temporaries left
    assert len(gpd.read_parquet(out) if out.suffix == ".parquet" else gpd.read_file(out)) == 3


def test_sidecar_never_clobbers_a_foreign_style(tmp_path: Path) -> None:
    theirs = "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n<qgis version='3.34'/>\n"
    (tmp_path / "dets.qml").write_text(theirs)
    write_detections(frame(), tmp_path / "dets.geojson", META)
    assert (tmp_path / "dets.qml").read_text() == theirs
    # our own style from an earlier run is refreshed
    (tmp_path / "dets.qml").write_text(layer_qml(["ship"]))
    write_detections(frame(), tmp_path / "dets.geojson", META)
    assert set(categories((tmp_path / "dets.qml").read_text())) == {"plane", "ship", ""}


def test_sidecar_is_skipped_beside_a_raster_of_the_same_name(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # QGIS would also load scene.qml as the default style of scene.tif
    (tmp_path / "scene.tif").write_bytes(b"II*\x00")
    assert sidecar_problem(tmp_path / "scene.geojson") is not None
    with caplog.at_level("INFO", logger="rs_detect"):
        write_detections(frame(), tmp_path / "scene.geojson", META)
    assert (tmp_path / "scene.geojson").is_file() and not (tmp_path / "scene.qml").exists()
    # the info line the docs promise, naming the way out
    said = [r for r in caplog.records if r.levelname == "INFO" and "scene.geojson" in r.getMessage()]
    assert len(said) == 1 and "scene.tif" in said[0].getMessage() and ".detections.geojson" in said[0].getMessage()
    # the default name (SCENE.detections.geojson) is styled: its .qml is not the raster's
    assert sidecar_problem(tmp_path / "scene.detections.geojson") is None
    write_detections(frame(), tmp_path / "scene.detections.geojson", META)
    assert (tmp_path / "scene.detections.qml").is_file()
    # other outputs of the same name do not block it
    (tmp_path / "dets.gpkg").write_bytes(b"")
    assert sidecar_problem(tmp_path / "dets.geojson") is None


# -- failures leave nothing behind -------------------------------------------------------------------


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("name", ["dets.geojson", "dets.gpkg"])
def test_failed_final_rename_leaves_no_output_and_no_sidecar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    out = tmp_path / name
    real_replace = os.replace

    def failing_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst) == out:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(writer.os, "replace", failing_replace)
    with pytest.raises(OutputError, match="No space left on device"):
        write_detections(frame(), out, META)
    assert _listing(tmp_path) == []


def test_failed_style_write_leaves_no_gpkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise OutputError("disk full while adding the style")

    monkeypatch.setattr(writer, "write_gpkg_style", broken)
    with pytest.raises(OutputError, match="disk full"):
        write_detections(frame(), tmp_path / "dets.gpkg", META)
    assert _listing(tmp_path) == []


def test_interrupted_write_leaves_nothing(tmp_path: Path) -> None:
    def interrupt(tmp: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_detections(frame(), tmp_path / "dets.geojson", META, extra=interrupt)
    assert _listing(tmp_path) == []
