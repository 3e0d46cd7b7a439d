"""The bundled sample models on freshly generated scenes (seeds never used in training), and eval.

Issue 3's targets are precision and recall >= 0.95 for plane and ship. The measured numbers are in the
README; the bounds asserted here are a regression guard with margin for a 36-80 object sample, not
those targets: a change that breaks the models, the stretch or the stitching fails them by far.
"""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
from click.testing import CliRunner

from rs_detect.cli import cli
from rs_detect.config import REPO_ROOT
from rs_detect.evaluate import average_precision, evaluate
from rs_detect.synthetic import write_scene

MODELS = {"hbb": REPO_ROOT / "sample_data" / "planeship_yolov8n_hbb.onnx", "obb": REPO_ROOT / "sample_data" / "planeship_yolov8n_obb.onnx"}


def run(*args: object) -> object:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


def duplicates(pred: gpd.GeoDataFrame) -> int:
    """Pairs of same-class detections of which one mostly lies inside the other."""
    b = pred[["px_x1", "px_y1", "px_x2", "px_y2"]].to_numpy()
    boxes = shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3])
    i, j = shapely.STRtree(boxes).query(boxes, predicate="intersects")
    sel = (i < j) & (pred["class_name"].to_numpy()[i] == pred["class_name"].to_numpy()[j])
    i, j = i[sel], j[sel]
    inter = shapely.area(shapely.intersection(boxes[i], boxes[j]))
    ios = inter / np.minimum(shapely.area(boxes[i]), shapely.area(boxes[j]))
    return int((ios > 0.5).sum())


@pytest.mark.slow
@pytest.mark.parametrize(("task", "dtype", "seed"), [("hbb", "uint8", 2024), ("obb", "uint8", 2025), ("hbb", "uint16", 2026)])
def test_sample_model_finds_planes_and_ships(tmp_path: Path, task: str, dtype: str, seed: int) -> None:
    truth = write_scene(tmp_path / "s.tif", 4096, 3072, seed=seed, truth_path=tmp_path / "s.truth.geojson", dtype=dtype)
    assert truth.edge_count > 5  # objects on the tiler's edges and corners are part of the test
    out = tmp_path / "s.geojson"
    run(tmp_path / "s.tif", "--model", MODELS[task], "-o", out, "-q")
    pred, gt = gpd.read_file(out), gpd.read_file(tmp_path / "s.truth.geojson")
    scores = {s.class_name: s for s in evaluate(pred, gt, 0.5, "polygon" if task == "obb" else "box", ["plane", "ship"])}
    for name in ("plane", "ship"):
        s = scores[name]
        assert s.truth > 5
        assert s.recall >= 0.85, s
        assert s.precision >= 0.8, s
        if s.edge_truth:
            assert s.edge_recall >= 0.8, s
    assert duplicates(pred) == 0  # each object once, also across tile edges


def test_eval_scores_and_duplicates(tmp_path: Path) -> None:
    write_scene(tmp_path / "s.tif", 1500, 1200, seed=3, truth_path=tmp_path / "t.geojson")
    gt = gpd.read_file(tmp_path / "t.geojson")
    pred = gt.copy()
    pred["score"] = np.linspace(0.99, 0.5, len(pred))
    dup = pred.iloc[[0]].copy()
    dup["score"] = 0.3
    pred = gpd.GeoDataFrame(pd_concat([pred, dup]), crs=gt.crs)
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


def test_eval_bad_input(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["eval", str(tmp_path / "none.geojson"), str(tmp_path / "t.geojson")])
    assert res.exit_code == 1 and "none.geojson" in res.stderr
