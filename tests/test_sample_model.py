"""The bundled sample models on freshly generated scenes (seeds never used in training or tuning), and eval.

Issue 3's targets, asserted as they are: precision and recall >= 0.95 for plane and for ship at IoU 0.5,
for the HBB model (boxes) and the OBB model (rotated polygons), on a uint8 scene and on a uint16 scene
of another dynamic range, with the shipped thresholds, objects on tile edges included (recall on them
too) and no object reported twice. A case where a shipped model misses the target goes into
KNOWN_MISSES as a strict expected failure, with what was measured. The models and their
thresholds were chosen on other scenes (seeds 1001, 8, 31, 32, 2025, 2027-2030 and 3001-3010, and for
the HBB model also the real validation sets of tools/train_real_sample_model.py; sample_data/MODEL_CARD.md)
by a rule that reads those alone; the seeds here (2024, 2026) were fixed before any model was scored on them.
"""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
from click.testing import CliRunner

from rs_detect.cli import cli
from rs_detect.config import REPO_ROOT
from rs_detect.evaluate import average_precision, evaluate
from rs_detect.evaluate import duplicate_pairs as duplicates
from rs_detect_synth import write_scene

MODELS = {"hbb": REPO_ROOT / "sample_data" / "planeship_yolov8n_hbb.onnx", "obb": REPO_ROOT / "sample_data" / "planeship_yolov8n_obb.onnx"}
SCENES = {"uint8": 2024, "uint16": 2026}  # dtype -> seed; 6000 x 5000 px, about 80 objects each


def run(*args: object) -> object:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """One fresh scene per dtype, shared by both models: (scene, truth)."""
    root = tmp_path_factory.mktemp("fresh")
    out = {}
    for dtype, seed in SCENES.items():
        tif, truth = root / f"{dtype}.tif", root / f"{dtype}.truth.geojson"
        t = write_scene(tif, 6000, 5000, seed=seed, truth_path=truth, dtype=dtype)
        assert t.edge_count > 10  # objects on the tiler's edges and corners are part of the test
        out[dtype] = (tif, truth)
    return out


@pytest.fixture(scope="module")
def detections(scenes: dict[str, tuple[Path, Path]], tmp_path_factory: pytest.TempPathFactory):
    """``rs-detect SCENE --model M`` with the shipped thresholds, once per (model, dtype): (pred, truth)."""
    root, cache = tmp_path_factory.mktemp("pred"), {}

    def get(task: str, dtype: str) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame]:
        if (task, dtype) not in cache:
            tif, truth = scenes[dtype]
            out = root / f"{task}_{dtype}.geojson"
            run(tif, "--model", MODELS[task], "-o", out, "-q")
            cache[task, dtype] = (gpd.read_file(out), gpd.read_file(truth))
        return cache[task, dtype]

    return get


# Measured misses of issue 3's target on these scenes (README, "Sample model"): strict, so a model that
# meets the target turns them into failures that ask for this list to be emptied.
# The HBB model trained on real planes and ships too (issue 19) calls 3 dark plane-like crosses "plane"
# and a road marking and a thin line "ship" on the uint8 scene; its thresholds were chosen on other scenes.
KNOWN_MISSES: dict[tuple[str, str, str], str] = {  # (task, dtype, class) -> what was measured
    ("hbb", "uint8", "plane"): "precision 0.932 (41 TP, 3 FP: plane-like dark crosses), recall 1.000, edge recall 1.000",
    ("hbb", "uint8", "ship"): "precision 0.927 (38 TP, 3 FP), recall 0.950, edge recall 0.929 (13 of 14)",
}
CASES = [
    pytest.param(t, d, c, marks=[pytest.mark.xfail(strict=True, reason=f"target missed: {KNOWN_MISSES[t, d, c]}")] if (t, d, c) in KNOWN_MISSES else [])
    for t in ("hbb", "obb") for d in ("uint8", "uint16") for c in ("plane", "ship")
]


@pytest.mark.slow
@pytest.mark.parametrize(("task", "dtype", "name"), CASES)
def test_sample_model_meets_the_target(detections, task: str, dtype: str, name: str) -> None:
    pred, gt = detections(task, dtype)
    (s,) = evaluate(pred, gt, 0.5, "polygon" if task == "obb" else "box", [name])
    assert s.truth > 20 and s.edge_truth > 5
    assert s.precision >= 0.95, s
    assert s.recall >= 0.95, s
    assert s.edge_recall >= 0.95, s  # objects straddling tile edges are found too


@pytest.mark.slow
@pytest.mark.parametrize("task", ["hbb", "obb"])
@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_sample_model_reports_each_object_once(detections, task: str, dtype: str) -> None:
    pred, gt = detections(task, dtype)
    assert len(pred) > 60
    assert duplicates(pred) == 0  # also across tile edges
    # and the known misses stay near the target: a regression guard for the xfailed cases above
    for s in evaluate(pred, gt, 0.5, "polygon" if task == "obb" else "box", ["plane", "ship"]):
        assert s.precision >= 0.9 and s.recall >= 0.9, s


def test_eval_scores_and_duplicates(tmp_path: Path) -> None:
    write_scene(tmp_path / "s.tif", 1500, 1200, seed=3, truth_path=tmp_path / "t.geojson")
    gt = gpd.read_file(tmp_path / "t.geojson")
    pred = gt.copy()
    pred["score"] = np.linspace(0.99, 0.5, len(pred))
    dup = pred.iloc[[0]].copy()
    dup["score"] = 0.3
    pred = gpd.GeoDataFrame(pd_concat([pred, dup]), crs=gt.crs)
    assert duplicates(pred) == 1 and duplicates(pred.iloc[:-1]) == 0  # the copy pairs with its original only
    pred.to_file(tmp_path / "p.geojson")
    res = run("eval", tmp_path / "p.geojson", tmp_path / "t.geojson", "--json", tmp_path / "e.json")
    doc = json.loads((tmp_path / "e.json").read_text())
    by = {c["class_name"]: c for c in doc["classes"]}
    first = gt["class_name"].iloc[0]
    assert by[first]["recall"] == 1.0 and by[first]["fp"] == 1  # the duplicate is a false positive
    assert all(c["recall"] == 1.0 for c in doc["classes"])
    assert "AP50" in res.output


def pd_concat(frames: list) -> object:
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


def test_average_precision_reference_values() -> None:
    assert average_precision(np.array([1, 1, 1.0]), 3) == pytest.approx(1.0)
    assert average_precision(np.array([1, 0, 1.0]), 2) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert average_precision(np.array([0, 0.0]), 4) == 0.0


def test_eval_table_shows_a_dash_where_a_figure_does_not_apply(tmp_path: Path) -> None:
    """Truth without an ``edge`` column (e.g. real labels) and a class with no truth: "-", never "nan"."""
    import shapely

    truth = gpd.GeoDataFrame({"class_name": ["plane", "plane"], "geometry": [shapely.box(0, 0, 10, 10), shapely.box(20, 0, 30, 10)]},
                             crs="EPSG:32633")
    pred = gpd.GeoDataFrame({"class_name": ["plane", "ship"], "score": [0.9, 0.8],
                             "geometry": [shapely.box(0, 0, 10, 10), shapely.box(50, 0, 60, 10)]}, crs="EPSG:32633")
    truth.to_file(tmp_path / "t.geojson")
    pred.to_file(tmp_path / "p.geojson")
    res = run("eval", tmp_path / "p.geojson", tmp_path / "t.geojson", "--match", "polygon", "--json", tmp_path / "e.json")
    assert "nan" not in res.output
    rows = {line.split()[0]: line.split() for line in res.output.splitlines()[1:]}
    assert rows["plane"][6:8] == ["1.000", "0.500"] and rows["plane"][-1] == "-"  # precision, recall; no edge truth
    assert rows["ship"][7] == "-" and rows["ship"][6] == "0.000"  # no ship truth: recall does not apply
    doc = json.loads((tmp_path / "e.json").read_text())
    assert {c["class_name"]: c["edge_recall"] for c in doc["classes"]} == {"plane": None, "ship": None}


def test_eval_bad_input(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["eval", str(tmp_path / "none.geojson"), str(tmp_path / "t.geojson")])
    assert res.exit_code == 1 and "none.geojson" in res.stderr
