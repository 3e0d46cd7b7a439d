"""Class semantics: every model class is a plane, a ship or other, whatever the dataset calls it."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner, Result

from conftest import one_error_line, write_tif
from rs_detect import DOTA_CLASSES
from rs_detect.categories import OTHER, PLANE, SHIP, category_of, categories_for, normalize, select
from rs_detect.cli import cli
from rs_detect.engines import metadata
from rs_detect.errors import ConfigError
from rs_detect.io.writer import read_metadata
from rs_detect.postprocess.decode import DecodeParams
from rs_detect.types import ModelMeta

COCO_LIKE = ("airplane", "boat", "person", "bicycle", "car", "motorcycle", "bus", "train", "truck", "traffic light",
             "fire hydrant", "stop sign", "parking meter", "bench", "bird")  # 15, like the tiny model; airplane first
XVIEW = ("Fixed-wing Aircraft", "Small Aircraft", "Cargo Plane", "Helicopter", "Passenger Vehicle", "Maritime Vessel",
         "Motorboat", "Sailboat", "Tugboat", "Barge", "Fishing Vessel", "Ferry", "Yacht", "Container Ship", "Oil Tanker",
         "Building")
FAIR1M = ("Boeing737", "Boeing747", "A220", "A321", "A330", "A350", "ARJ21", "C919", "other-airplane", "Passenger Ship",
          "Motorboat", "Fishing Boat", "Tugboat", "Engineering Ship", "Liquid Cargo Ship", "Dry Cargo Ship", "Warship",
          "other-ship", "Small Car", "Bridge", "Intersection")


@pytest.mark.parametrize(("names", "expected"), [
    (DOTA_CLASSES, {"plane": PLANE, "ship": SHIP, "helicopter": OTHER, "harbor": OTHER, "storage-tank": OTHER}),
    (COCO_LIKE, {"airplane": PLANE, "boat": SHIP, "person": OTHER, "car": OTHER, "bird": OTHER}),
    (XVIEW, {**{n: PLANE for n in XVIEW[:3]}, "Helicopter": OTHER, "Passenger Vehicle": OTHER,
             **{n: SHIP for n in XVIEW[5:15]}, "Building": OTHER}),
    (FAIR1M, {**{n: PLANE for n in FAIR1M[:9]}, **{n: SHIP for n in FAIR1M[9:18]}, "Small Car": OTHER, "Bridge": OTHER}),
    (("airplane", "ship"), {"airplane": PLANE, "ship": SHIP}),  # DIOR
    (("ship", "aircraft carrier"), {"ship": SHIP, "aircraft carrier": SHIP}),  # HRSC: a carrier is a ship
])
def test_dataset_class_names_map_to_categories(names: tuple[str, ...], expected: dict[str, str]) -> None:
    cats = dict(zip(names, categories_for(names)))
    for name, cat in expected.items():
        assert cats[name] == cat, name


def test_names_compare_without_case_or_punctuation() -> None:
    for spelling in ("Fixed-wing Aircraft", "fixed_wing_aircraft", "FIXEDWINGAIRCRAFT", " fixed wing  aircraft "):
        assert category_of(spelling) == PLANE
    assert normalize("Passenger/Cargo Plane") == "passengercargoplane" and category_of("Passenger/Cargo Plane") == PLANE
    assert category_of("A320") == PLANE and category_of("A321neo") == PLANE and category_of("Boeing 777-300ER") == PLANE
    assert category_of("zeppelin") == OTHER
    # the model YAML's categories win over the table, matched the same way
    assert category_of("Helicopter", {"helicopter": PLANE}) == PLANE
    assert category_of("Barge", {"BARGE": OTHER}) == OTHER


def test_select_by_category_name_or_all() -> None:
    cats = categories_for(COCO_LIKE)
    assert select(("plane", "ship"), COCO_LIKE, cats) == (0, 1)
    assert select(("plane",), COCO_LIKE, cats) == (0,)
    assert select(("Airplane",), COCO_LIKE, cats) == (0,)  # an exact class name, any case
    assert select(("airplane", "car"), COCO_LIKE, cats) == (0, 4)
    assert select(("all",), COCO_LIKE, cats) is None and select(None, COCO_LIKE, cats) is None
    assert select(("other",), COCO_LIKE, cats) == tuple(range(2, 15))
    with pytest.raises(ConfigError, match="no class 'zebra'.*model classes: airplane, boat"):
        select(("plane", "zebra"), COCO_LIKE, cats)
    # a category the model lacks is fine while something is selected, an error when nothing is
    cars = ("car", "truck", "ship")
    assert select(("plane", "ship"), cars, categories_for(cars)) == (2,)
    with pytest.raises(ConfigError, match="no model class is a plane"):
        select(("plane",), cars, categories_for(cars))
    # not strict (exclusive_classes): what the model lacks is ignored
    assert select(("plane", "boat", "zebra"), DOTA_CLASSES, categories_for(DOTA_CLASSES), strict=False) == (0,)


def test_default_selection_without_plane_or_ship_warns_and_keeps_all(caplog: pytest.LogCaptureFixture) -> None:
    names = ("car", "truck", "helicopter")
    with caplog.at_level(logging.WARNING, logger="rs_detect"):
        assert select(("plane", "ship"), names, categories_for(names)) is None
    assert len(caplog.records) == 1 and "no plane or ship class" in caplog.records[0].getMessage()
    assert "car, truck, helicopter" in caplog.records[0].getMessage()


def test_decode_params_keep_the_selected_classes() -> None:
    meta = ModelMeta(names=COCO_LIKE, imgsz=64)
    assert DecodeParams.build(meta, 0.25, None, ("plane", "ship")).keep_class.nonzero().flatten().tolist() == [0, 1]
    assert DecodeParams.build(meta, 0.25, {"Airplane": 0.6}, None).conf[0].item() == pytest.approx(0.6)
    assert bool(DecodeParams.build(meta, 0.25, None, None).keep_class.all())


def test_model_yaml_categories_override_and_are_checked(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    file_meta = {"names": str(dict(enumerate(("Helicopter", "Barge", "car"))))}
    meta = metadata.resolve(model, file_meta, {"categories": {"helicopter": "plane", "Barge": "Other"}})
    assert meta.categories == (PLANE, OTHER, OTHER)
    with pytest.raises(ConfigError, match="must be one of plane, ship, other, got 'boat'"):
        metadata.resolve(model, file_meta, {"categories": {"car": "boat"}})
    with pytest.raises(ConfigError, match="no class 'tank'"):
        metadata.resolve(model, file_meta, {"categories": {"tank": "ship"}})


# -- through the command line: a COCO-style model, a model without planes or ships ------------------


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


TILE = ["--tile-size", "64", "--overlap", "16"]


def model_named(tiny_onnx: Path, folder: Path, names: tuple[str, ...], **extra: object) -> Path:
    """The tiny model (class 0 fires on bright squares) under other class names, through a sidecar YAML."""
    model = folder / "named.onnx"
    shutil.copy(tiny_onnx, model)
    model.with_suffix(".yaml").write_text(yaml.safe_dump({"names": list(names), **extra}))
    return model


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    img = np.full((150, 200), 20, dtype=np.uint8)
    img[10:42, 20:52] = 250
    img[90:122, 140:172] = 250
    return write_tif(tmp_path / "scene.tif", img)


@pytest.mark.parametrize("classes", [None, "all", "airplane", "plane", "Airplane,boat", "plane,ship"])
def test_coco_style_model_runs_with_any_class_selection(scene: Path, tiny_onnx: Path, tmp_path: Path, classes: str | None) -> None:
    model = model_named(tiny_onnx, tmp_path, COCO_LIKE)
    out = tmp_path / "out.geojson"
    res = run(scene, "--model", model, *TILE, "-o", out, *(["--classes", classes] if classes else []))
    assert res.exit_code == 0, res.output
    feats = json.loads(out.read_text())["features"]
    assert len(feats) >= 2
    assert {(f["properties"]["class_name"], f["properties"]["category"]) for f in feats} == {("airplane", "plane")}
    meta = read_metadata(out)
    assert meta["categories"][:2] == ["plane", "ship"] and meta["classes"][0] == "airplane"


def test_selecting_a_class_the_model_lacks_is_one_error_line(scene: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    model = model_named(tiny_onnx, tmp_path, COCO_LIKE)
    out = tmp_path / "out.geojson"
    one_error_line(run(scene, "--model", model, *TILE, "-o", out, "--classes", "plane,zebra"),
                   "--classes: the model has no class 'zebra'", outputs=(out,))
    res = run(scene, "--model", model, *TILE, "-o", out, "--classes", "boat")  # a class it has, nothing found
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["features"] == []


def test_model_without_planes_or_ships_warns_once_and_keeps_its_classes(scene: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    names = ("helicopter", *(f"thing{i}" for i in range(14)))
    out = tmp_path / "out.geojson"
    res = run(scene, "--model", model_named(tiny_onnx, tmp_path, names), *TILE, "-o", out)
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "no plane or ship class" in warnings[0]
    feats = json.loads(out.read_text())["features"]
    assert len(feats) >= 2 and {f["properties"]["category"] for f in feats} == {"other"}
    # mapped to plane in the model YAML: selected by the default, no warning
    (tmp_path / "b").mkdir()
    res = run(scene, "--model", model_named(tiny_onnx, tmp_path / "b", names, categories={"helicopter": "plane"}), *TILE, "-o", out)
    assert res.exit_code == 0 and "warning" not in res.stderr, res.output
    assert {f["properties"]["category"] for f in json.loads(out.read_text())["features"]} == {"plane"}


def test_style_lists_the_selected_model_classes_in_plane_and_ship_colours() -> None:
    from rs_detect.style import PALETTE, class_colours, style_classes

    meta = {"classes": list(COCO_LIKE), "categories": list(categories_for(COCO_LIKE)), "class_filter": ["plane", "ship"]}
    model, wanted = style_classes(meta, ["airplane"])
    assert wanted == ["airplane", "boat"] and model == list(COCO_LIKE)
    colours = class_colours(XVIEW)
    assert colours["Fixed-wing Aircraft"] == PALETTE[0] and colours["Maritime Vessel"] == PALETTE[1]
    assert len(set(colours.values())) == len(XVIEW)
