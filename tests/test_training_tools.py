"""tools/onnx_to_checkpoint.py: a shipped ONNX file back to a checkpoint training can continue from.

Needs Ultralytics (in the test extra). The conversion is exact in eval mode whatever the calibration
sample, so two calibration chips keep the test quick; the tool's own default is 48.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rs_detect.config import REPO_ROOT

import ultralytics  # noqa: E402,F401 - in the test extra: a missing one fails here, never skips
spec = importlib.util.spec_from_file_location("onnx_to_checkpoint", REPO_ROOT / "tools" / "onnx_to_checkpoint.py")
o2c = importlib.util.module_from_spec(spec)
sys.modules["onnx_to_checkpoint"] = o2c
spec.loader.exec_module(o2c)  # type: ignore[union-attr]

HBB = REPO_ROOT / "sample_data" / "planeship_yolov8n_hbb.onnx"
OBB = REPO_ROOT / "sample_data" / "planeship_yolov8n_obb.onnx"


@pytest.mark.slow
def test_checkpoint_reproduces_the_onnx_model_and_loads_in_ultralytics(tmp_path: Path) -> None:
    out = tmp_path / "hbb.pt"
    diffs = o2c.convert(HBB, "detect", out, calib=2, test=1)
    assert diffs["box_max_abs_diff_px"] < 0.05 and diffs["score_max_abs_diff"] < 1e-3
    ckpt = torch.load(out, map_location="cpu", weights_only=False)
    assert ckpt["source_onnx"]["sha256"] == hashlib.sha256(HBB.read_bytes()).hexdigest()
    model = ckpt["model"].float().eval()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 57
    # re-calibrated, not identities: train mode (batch statistics) stays near the eval function
    assert not all(torch.allclose(b.running_var, torch.ones_like(b.running_var), atol=1e-3) for b in bns)
    x = torch.from_numpy(o2c.chips(2, 1024, 0))  # the calibration chips

    def raw(out: object) -> torch.Tensor:  # the head's raw box and class outputs (train: a dict; eval: (y, dict))
        d = out if isinstance(out, dict) else out[1]  # type: ignore[index]
        return torch.cat([d["boxes"].flatten(), d["scores"].flatten()])

    with torch.no_grad():
        full = model(x)
        ref, eval_feats = full[0], raw(full)
        model.train()
        feats = raw(model(x))
    model.eval()
    assert ref.shape == (2, 19, 21504)
    assert torch.corrcoef(torch.stack([feats, eval_feats]))[0, 1] > 0.99

    from ultralytics import YOLO

    yolo = YOLO(str(out))  # what train_sample_model.py --init-detect does first
    assert yolo.task == "detect" and yolo.model.model[0].conv.in_channels == 1 and len(yolo.model.names) == 15


@pytest.mark.slow
def test_a_checkpoint_that_does_not_reproduce_the_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="does not reproduce the ONNX model"):
        o2c.convert(OBB, "detect", tmp_path / "wrong.pt", calib=2, test=1)  # OBB weights in a detect model
    assert not (tmp_path / "wrong.pt").exists()
    assert np.isfinite(o2c.chips(1, 128, 0)).all()


spec_train = importlib.util.spec_from_file_location("train_sample_model", REPO_ROOT / "tools" / "train_sample_model.py")
tsm = importlib.util.module_from_spec(spec_train)
sys.modules["train_sample_model"] = tsm
spec_train.loader.exec_module(tsm)  # type: ignore[union-attr]


def test_train_script_hard_chips_go_to_training_only(tmp_path: Path) -> None:
    """--hard: a fraction in [0, 1], default 0; training chips get it, validation chips never do."""
    from PIL import Image

    from rs_detect_synth import render_chip

    assert tsm.parse_args(["--out", str(tmp_path)]).hard == 0.0
    for bad in ("-0.1", "1.5", "nan"):
        with pytest.raises(SystemExit):
            tsm.parse_args(["--out", str(tmp_path), "--hard", bad])
    args = tsm.parse_args(["--out", str(tmp_path), "--hard", "1", "--train", "2", "--val", "4", "--chip-size", "128"])
    train, val = tsm.chip_jobs(tmp_path, "train", args), tsm.chip_jobs(tmp_path, "val", args)
    assert [j[-1] for j in train] == [1.0, 1.0] and [j[-1] for j in val] == [0.0] * 4
    for task in tsm.TASKS:
        for kind in ("images", "labels"):
            for split in tsm.SPLITS:
                (tmp_path / task / kind / split).mkdir(parents=True)
    for job in (train[0], val[0]):
        counts = tsm.render_one(job)
        split, hard = job[1], job[-1]
        seed = [args.seed, tsm.SPLITS[split], 0]
        img, objs = render_chip(np.random.default_rng(seed), size=128, distractors=1.0, hard=hard)
        plain, _ = render_chip(np.random.default_rng(seed), size=128)
        assert counts == {c: sum(o.class_name == c for o in objs) for c in ("plane", "ship")}
        lines = (tmp_path / "detect" / "labels" / split / f"{split}_00000.txt").read_text().splitlines()
        assert lines == [tsm.detect_label(o, 128) for o in objs]
        png = np.asarray(Image.open(tmp_path / "detect" / "images" / split / f"{split}_00000.png"))
        assert np.array_equal(png, np.rint(img * 255).astype(np.uint8))
        assert np.array_equal(png, np.rint(plain * 255).astype(np.uint8)) == (split == "val")


def _ship(cx: float, cy: float, length: float = 40.0, beam: float = 10.0) -> object:
    from rs_detect_synth import TruthObject

    return TruthObject("ship", 1, cx, cy, length, beam, 0.0)


def test_scene_window_labels_keep_whole_objects_and_label_cut_ones_by_their_visible_part() -> None:
    whole, cut, sliver, outside = _ship(500, 500), _ship(1014, 300), _ship(1040, 700), _ship(1200, 200)
    labels = tsm.window_labels([whole, cut, sliver, outside], 0, 0, 1024, 1024)
    assert [o for o, _, _ in labels] == [whole, cut]  # 75 % of 'cut' inside; 25 % of 'sliver'; none of 'outside'
    assert np.allclose(labels[0][1], whole.corners) and labels[0][2] == whole.bbox
    corners, box = labels[1][1], labels[1][2]
    assert box == pytest.approx((994.0, 295.0, 1024.0, 305.0))  # the visible 30 of its 40 px
    assert corners[:, 0].max() == pytest.approx(1024.0) and corners[:, 0].min() == pytest.approx(994.0)
    # in a window further right the same objects are cut the other way, in window pixels
    (obj, _, box), = [lab for lab in tsm.window_labels([cut, sliver], 1000, 0, 1024, 1024) if lab[0] is sliver]
    assert box == pytest.approx((20.0, 695.0, 60.0, 705.0))
    assert tsm.box_label(1, box, 1024) == "1 0.039062 0.683594 0.039062 0.009766"  # cy 700 / 1024


@pytest.mark.slow
def test_train_script_scene_chips_are_the_pipelines_windows_scaled_as_the_pipeline_scales(tmp_path: Path) -> None:
    """--scenes: every tiler window of each training scene, scaled as rs-detect scales that scene."""
    from PIL import Image

    from rs_detect.io.reader import percentiles
    from rs_detect.io.tiling import iter_tiles
    from rs_detect_synth import plan_scene, quantize, render_window

    args = tsm.parse_args(["--out", str(tmp_path), "--scenes", "2", "--seed", "3"])
    jobs = tsm.scene_jobs(tmp_path, args)
    assert [(j[1], j[3]) for j in jobs] == [(0, "uint8"), (1, "uint16")]
    assert all(j[2] >= tsm.SCENE_SEED_BASE for j in jobs) and len({j[2] for j in jobs}) == 2
    for task in tsm.TASKS:
        for kind in ("images", "labels"):
            (tmp_path / task / kind / "train").mkdir(parents=True)
    root, k, seed, dtype, w, h = jobs[1]
    counts = tsm.render_scene((root, k, seed, dtype, 1200, 1100))  # a small scene: four windows
    plan = plan_scene(1200, 1100, seed, tile=1024, overlap=192)
    tiles = list(iter_tiles(1200, 1100, 1024, 192))
    stored = [quantize(render_window(plan, t.row_off, t.col_off, 1024, 1024), "uint16") for t in tiles]
    low, high = percentiles(np.concatenate([a.ravel() for a in stored]), (2.0, 98.0))
    assert counts["chips"] == len(tiles) == 4
    total = 0
    for t, raw in zip(tiles, stored, strict=True):
        png = np.asarray(Image.open(tmp_path / "detect" / "images" / "train" / f"scene0001_{t.index:03d}.png"))
        want = np.rint(np.clip((raw.astype(np.float32) - np.float32(low)) / np.float32(high - low), 0, 1) * 255)
        assert np.abs(png.astype(np.int16) - want.astype(np.int16)).max() <= 1  # float rounding at .5 only
        lines = (tmp_path / "detect" / "labels" / "train" / f"scene0001_{t.index:03d}.txt").read_text().splitlines()
        labels = tsm.window_labels(plan.objects, t.col_off, t.row_off, 1024, 1024)
        assert lines == [tsm.box_label(o.class_id, b, 1024) for o, _, b in labels]
        assert len((tmp_path / "obb" / "labels" / "train" / f"scene0001_{t.index:03d}.txt").read_text().splitlines()) == len(labels)
        total += len(labels)
    assert total == counts["plane"] + counts["ship"] > 0


def test_train_script_reads_results_csv_as_ultralytics_does_without_polars(tmp_path: Path, monkeypatch) -> None:
    """Where polars is missing, the trainer's results.csv reader is replaced by one with the same output."""
    import polars as pl
    from ultralytics.engine.trainer import BaseTrainer

    csv_path = tmp_path / "results.csv"
    csv_path.write_text("epoch,time,train/box_loss,metrics/mAP50(B)\n1,10.5,1.25,0.5\n2,21,1.125,0.75\n")
    want = pl.read_csv(csv_path.read_bytes(), infer_schema_length=None).to_dict(as_series=False)
    assert tsm.read_results_csv(csv_path) == want
    assert tsm.read_results_csv(tmp_path / "missing.csv") == {}
    assert tsm.without_polars() is False  # polars here: Ultralytics' own reader stays
    monkeypatch.setitem(sys.modules, "polars", None)  # import polars now raises ImportError
    monkeypatch.setattr(BaseTrainer, "read_results_csv", BaseTrainer.read_results_csv)  # undone after the test
    assert tsm.without_polars() is True
    trainer = BaseTrainer.__new__(BaseTrainer)
    trainer.csv = csv_path
    assert trainer.read_results_csv() == want


spec_choose = importlib.util.spec_from_file_location("choose_sample_model", REPO_ROOT / "tools" / "choose_sample_model.py")
csm = importlib.util.module_from_spec(spec_choose)
sys.modules["choose_sample_model"] = csm
spec_choose.loader.exec_module(csm)  # type: ignore[union-attr]


def _rows(candidate: str, cls: str, counts: dict[float, tuple[int, int, int]], seed: int = 1) -> list[dict]:
    """Sweep rows of one scene: conf -> (tp, fp, fn); thresholds not given score nothing (all missed)."""
    return [{"candidate": candidate, "task": "hbb", "seed": seed, "dtype": "uint8", "conf": c, "class_name": cls,
             "tp": counts.get(c, (0, 0, 40))[0], "fp": counts.get(c, (0, 0, 40))[1], "fn": counts.get(c, (0, 0, 40))[2],
             "edge_truth": 10, "edge_tp": 10, "duplicates": 0} for c in csm.SWEEP]


def test_choose_picks_per_class_the_threshold_of_best_min_precision_recall_and_the_best_mean() -> None:
    rows = (_rows("a", "plane", {0.3: (40, 10, 0), 0.4: (39, 1, 1), 0.5: (39, 1, 1), 0.6: (30, 0, 10)})  # 0.4 and 0.5 tie: the lower
            + _rows("a", "ship", {0.5: (38, 2, 2)})
            + _rows("b", "plane", {0.6: (40, 0, 0)}) + _rows("b", "ship", {0.3: (36, 0, 4)})
            + _rows("b", "plane", {0.6: (10, 10, 10)}, seed=2))  # a scene 'a' was not scored on: left out
    winner, picks = csm.choose(rows, "hbb")
    assert picks["a"]["plane"]["conf"] == 0.4 and picks["a"]["ship"]["conf"] == 0.5
    assert picks["a"]["plane"]["score"] == pytest.approx(39 / 40) and picks["a"]["ship"]["score"] == pytest.approx(0.95)
    assert picks["b"]["plane"]["conf"] == 0.6 and picks["b"]["plane"]["scenes"] == 1  # seed 2 is not common to both
    assert winner == "a"  # mean (0.975 + 0.95) / 2 against (1.0 + 0.9) / 2
    with pytest.raises(SystemExit, match="test scene"):
        csm.main(["sweep", "--task", "hbb", "--candidate", "x=m.onnx", "--seeds", "7", "2024", "--work", "/tmp/x", "--out", "/tmp/x.jsonl"])


def test_the_recorded_selection_gives_the_shipped_models_and_thresholds() -> None:
    """docs/sample_model_selection.jsonl.gz (the sweeps of the selection scenes) -> the YAMLs beside the models."""
    import yaml

    rows = csm.read_rows(REPO_ROOT / "docs" / "sample_model_selection.jsonl.gz")
    assert not {r["seed"] for r in rows} & csm.TEST_SEEDS
    # HBB: fine-tune 4 against 5 on 38 scenes (the HBB model shipped now is a real-data run, chosen by
    # tests/test_train_real_tool.py's rule); OBB: fine-tunes 4, 6a (ft6s50), 6b (ft6s10) and 7 on 38 scenes
    assert csm.choose([r for r in rows if r["candidate"] in {"ft4", "ft5"}], "hbb")[0] == "ft5"
    winner, picks = csm.choose([r for r in rows if r["candidate"] in {"ft4", "ft6s50", "ft6s10", "ft7"}], "obb")
    meta = yaml.safe_load((REPO_ROOT / "sample_data" / "planeship_yolov8n_obb.yaml").read_text())
    assert {"plane": meta["conf_by_class"]["plane"], "ship": meta["conf"]} == {c: picks[winner][c]["conf"] for c in ("plane", "ship")}
    assert winner == "ft7"
    assert csm.choose([r for r in rows if r["task"] == "obb"], "obb")[0] == "ft7"  # also on the 18 scenes fine-tune 1 was scored on


def test_the_training_record_names_the_shipped_files_by_their_hashes() -> None:
    """sample_data/planeship_training.json's 'shipped' map: each file's run, and the sha256 the file has."""
    import json

    doc = json.loads((REPO_ROOT / "sample_data" / "planeship_training.json").read_text())
    for name, rec in doc["shipped"].items():
        assert hashlib.sha256((REPO_ROOT / "sample_data" / name).read_bytes()).hexdigest() == rec["sha256"], name
        run = doc["runs"][rec["run"]]
        task_run = run.get(rec["task"], run)  # fine-tunes keep one report per task
        # tools/train_sample_model.py reports per task; tools/train_real_sample_model.py (real-N) one model
        assert (task_run["tasks"][rec["task"]] if "tasks" in task_run else task_run)["sha256"] == rec["sha256"]


def test_train_script_scale_augmentation_reaches_ultralytics(tmp_path: Path, monkeypatch) -> None:
    """--scale: Ultralytics' zoom augmentation, default 0.5 (its own default, as earlier runs), in [0, 1)."""
    import ultralytics

    assert tsm.parse_args(["--out", str(tmp_path)]).scale == 0.5
    for bad in ("-0.1", "1", "nan"):
        with pytest.raises(SystemExit):
            tsm.parse_args(["--out", str(tmp_path), "--scale", bad])
    calls: list[dict] = []

    class FakeYOLO:
        def __init__(self, model: str) -> None:
            self.trainer = type("T", (), {"best": str(tmp_path / "best.pt")})()

        def train(self, **kwargs) -> None:
            calls.append(kwargs)

    monkeypatch.setattr(ultralytics, "YOLO", FakeYOLO)
    args = tsm.parse_args(["--out", str(tmp_path), "--scale", "0.1", "--tasks", "obb"])
    assert tsm.train("obb", tmp_path / "data.yaml", args) == tmp_path / "best.pt"
    assert calls[0]["scale"] == 0.1 and calls[0]["flipud"] == 0.5
