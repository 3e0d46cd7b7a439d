"""rs-detect against Ultralytics' own predict on one tile: YOLOv8, YOLO11 and YOLO26, HBB and OBB.

Each model is built from Ultralytics' own YAML (nothing is downloaded) with seeded weights, saved as an
Ultralytics checkpoint, exported to ONNX by ``rs_detect.engines.ultralytics.export_ultralytics`` (dynamic batch;
YOLO26 with its end-to-end head, output [B, 300, 6 | 7]) and run through rs-detect's pipeline. Ultralytics
predicts on the same pixels with the PyTorch checkpoint. Every box must agree: same class, corners within
0.01 px, score within 1e-4, nothing left over on either side.

Untrained weights give near-constant outputs (activations fade through the untrained network), which
would test nothing. So the BatchNorm statistics are set from one forward pass over seeded random images
(every layer then passes unit-scale activations and the scores spread out), and the class bias is shifted
so that the confidence threshold falls in the widest gap between the 60th and 160th best scores of the
test tile: a non-trivial number of boxes, none within a rounding error of the threshold.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import write_tif

pytest.importorskip("ultralytics")

from ultralytics import YOLO  # noqa: E402
from ultralytics.cfg import DEFAULT_CFG_DICT  # noqa: E402
from ultralytics.nn.tasks import DetectionModel, OBBModel  # noqa: E402

from rs_detect.config import Config  # noqa: E402
from rs_detect.engines import load_engine  # noqa: E402
from rs_detect.engines.ultralytics import export_ultralytics  # noqa: E402
from rs_detect.pipeline import ScenePipeline  # noqa: E402
from rs_detect.postprocess.geometry import obb_corners, regularize_obb  # noqa: E402

pytestmark = pytest.mark.slow

S = 256  # the tile (and model input) size
CONF = 0.25
IOU = 0.7  # Ultralytics' default
NAMES = {0: "plane", 1: "ship"}
YAMLS = ["yolov8n.yaml", "yolov8n-obb.yaml", "yolo11n.yaml", "yolo11n-obb.yaml", "yolo26n.yaml", "yolo26n-obb.yaml"]


def tile_rgb() -> np.ndarray:
    """The test tile, [S, S, 3] uint8 RGB: seeded noise with a few flat rectangles."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
    img[40:90, 50:120] = 230
    img[150:200, 30:60] = 20
    img[180:230, 170:250] = (40, 120, 200)
    return img


def _last_convs(head: torch.nn.Module, kind: str) -> list[torch.nn.Conv2d]:
    """The last conv of each level of a head branch (cv2: box, cv3: class, cv4: angle), both heads."""
    return [seq[-1] for name in (kind, f"one2one_{kind}") if getattr(head, name, None) is not None for seq in getattr(head, name)]


def _temper(net: torch.nn.Module, x: torch.Tensor) -> None:
    """Scale the last convs so their outputs spread moderately (std: box 1, class 2, angle 1) and bias
    the box branch to boxes of one to a few strides: with calibrated activations, untrained weights
    otherwise saturate every score at 1.0 and give boxes spanning the whole tile, and ties and
    clipping make the comparison meaningless."""
    head = net.model[-1]
    convs = {kind: _last_convs(head, kind) for kind in ("cv2", "cv3", "cv4")}
    seen: dict[torch.nn.Module, float] = {}
    hooks = [c.register_forward_hook(lambda m, i, o: seen.__setitem__(m, float((o - m.bias[None, :, None, None]).std())))
             for cs in convs.values() for c in cs]
    for one2one in ((False, True) if getattr(head, "one2one_cv2", None) is not None else (False,)):
        net.end2end = one2one
        with torch.no_grad():
            net(x)
    for h in hooks:
        h.remove()
    reg_max = int(getattr(head, "reg_max", 16))
    target = {"cv2": 1.0 if reg_max > 1 else 0.5, "cv3": 2.0, "cv4": 1.0}
    with torch.no_grad():
        for kind, cs in convs.items():
            for c in cs:
                c.weight *= target[kind] / max(seen[c], 1e-12)
        for c in convs["cv2"]:  # boxes of one to a few strides, not spanning the tile
            if reg_max > 1:  # distribution focal loss: favour the low bins
                c.bias.copy_((-0.6 * torch.arange(reg_max, dtype=c.bias.dtype)).repeat(4))
            else:  # distances in strides, directly
                c.bias.fill_(1.5)


def _scores(net: torch.nn.Module, x: torch.Tensor, end2end: bool) -> torch.Tensor:
    with torch.no_grad():
        y = net(x)
    y = y[0] if isinstance(y, (list, tuple)) else y
    if end2end:
        return y[0, :, 4]
    return y[0, 4 : 4 + len(NAMES)].max(0).values


def build_checkpoint(yaml_name: str, folder: Path) -> tuple[Path, bool]:
    """A seeded, calibrated checkpoint (see the module docstring); returns (path, end2end)."""
    obb = "obb" in yaml_name
    torch.manual_seed(0)
    net = (OBBModel if obb else DetectionModel)(yaml_name, ch=3, nc=len(NAMES), verbose=False)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 1.0  # the running statistics become those of this one batch
    net.train()
    with torch.no_grad():
        net(torch.rand((4, 3, S, S), generator=torch.Generator().manual_seed(1)))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    net.eval()
    x = torch.from_numpy(tile_rgb()).permute(2, 0, 1)[None].float() / 255
    _temper(net, x)
    end2end = getattr(net.model[-1], "one2one_cv2", None) is not None and "nms" in DEFAULT_CFG_DICT
    net.end2end = end2end
    logits = torch.logit(_scores(net, x, end2end).double().clamp(1e-12, 1 - 1e-12)).sort(descending=True).values
    gaps = logits[59:159] - logits[60:160]
    n = 60 + int(gaps.argmax())
    shift = math.log(CONF / (1 - CONF)) - float(logits[n - 1] + logits[n]) / 2
    with torch.no_grad():
        for conv in _last_convs(net.model[-1], "cv3"):
            conv.bias += shift
    net.end2end = False  # saved as built; predict and export select the end-to-end head themselves
    net.names = dict(NAMES)
    net.args = {"imgsz": S, "data": ""}
    net.task = "obb" if obb else "detect"
    model = YOLO(yaml_name, task=net.task)
    model.model = net
    path = folder / f"{Path(yaml_name).stem}.pt"
    model.save(str(path))
    return path, end2end


def ultralytics_predict(weights: Path, end2end: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(boxes, scores, classes, task) from Ultralytics' predict on the tile (BGR, as it reads images)."""
    extra = {"nms": False} if end2end else {}
    r = YOLO(str(weights)).predict(tile_rgb()[..., ::-1].copy(), imgsz=S, conf=CONF, iou=IOU, max_det=300,
                                   device="cpu", verbose=False, **extra)[0]
    if r.obb is not None:
        return r.obb.xywhr.numpy(), r.obb.conf.numpy(), r.obb.cls.numpy().astype(int), "obb"
    return r.boxes.xyxy.numpy(), r.boxes.conf.numpy(), r.boxes.cls.numpy().astype(int), "detect"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, bool]]:
    folder = tmp_path_factory.mktemp("ultralytics")
    return {y: build_checkpoint(y, folder) for y in YAMLS}


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tif(tmp_path_factory.mktemp("tile") / "tile.tif", np.ascontiguousarray(tile_rgb().transpose(2, 0, 1)))


def corners(boxes: np.ndarray, task: str) -> np.ndarray:
    """[N, 4, 2] corners; rotated boxes in rs-detect's canonical form (w >= h, angle in [0, pi))."""
    if task == "obb":
        return obb_corners(regularize_obb(torch.from_numpy(boxes).double())).numpy()
    x1, y1, x2, y2 = boxes.T
    return np.stack([np.stack(p, -1) for p in ((x1, y1), (x2, y1), (x2, y2), (x1, y2))], 1)


@pytest.mark.parametrize("yaml_name", YAMLS)
def test_detections_match_ultralytics_predict(yaml_name: str, checkpoints: dict[str, tuple[Path, bool]], scene: Path,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("YOLO_AUTOINSTALL", "False")
    monkeypatch.chdir(tmp_path)  # Ultralytics may write beside the working directory
    weights, end2end = checkpoints[yaml_name]
    ref_boxes, ref_scores, ref_cls, task = ultralytics_predict(weights, end2end)
    assert len(ref_boxes) >= 10, f"{yaml_name}: only {len(ref_boxes)} boxes: the test would be trivial"

    info = export_ultralytics(weights, imgsz=S, fmt="onnx", output=tmp_path / "model.onnx")
    engine = load_engine(info.path)
    assert engine.meta.end2end == end2end and engine.meta.task == task
    cfg = Config(conf=CONF, iou=IOU, classes=None, exclusive_classes=(), duplicate_ios=None, tile_size=S, overlap=0, max_det=300)
    dets = ScenePipeline(engine, cfg, info.path).run(scene).detections
    ours = corners(dets.boxes.double().numpy(), task)
    theirs = corners(ref_boxes.astype(np.float64), task)

    assert len(ours) == len(theirs), f"{yaml_name}: rs-detect {len(ours)} boxes, Ultralytics {len(theirs)}"
    free = np.ones(len(ours), dtype=bool)
    worst_px = worst_score = 0.0
    for k in np.argsort(-ref_scores):
        cand = np.flatnonzero(free & (dets.class_ids.numpy() == ref_cls[k]))
        assert cand.size, f"{yaml_name}: Ultralytics box {k} (class {ref_cls[k]}) unmatched"
        err = np.abs(ours[cand] - theirs[k]).reshape(len(cand), -1).max(1)
        best = cand[int(err.argmin())]
        worst_px = max(worst_px, float(err.min()))
        worst_score = max(worst_score, abs(float(dets.scores[best]) - float(ref_scores[k])))
        free[best] = False
    assert worst_px < 0.01, f"{yaml_name}: a box differs by {worst_px:.4f} px"
    assert worst_score < 1e-4, f"{yaml_name}: a score differs by {worst_score:.2e}"


def test_checkpoint_as_model_is_exported_once_and_reused(checkpoints: dict[str, tuple[Path, bool]], scene: Path,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rs_detect.cli import cli
    from rs_detect.engines import ultralytics as export

    monkeypatch.setenv("RS_DETECT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("YOLO_AUTOINSTALL", "False")
    monkeypatch.chdir(tmp_path)
    weights, _ = checkpoints["yolo26n.yaml"]
    out = tmp_path / "a.geojson"
    args = [str(scene), "--model", str(weights), "-o", str(out), "--classes", "all", "--conf", str(CONF)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "exporting it once" in res.stderr
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".onnx" and cached[0].name.startswith("yolo26n-")
    assert sorted(p.name for p in weights.parent.iterdir() if not p.name.endswith(".pt")) == []  # nothing beside the weights
    first = json.loads(out.read_text())["features"]
    assert len(first) >= 10

    def no_export(*a: object, **k: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(export, "export_ultralytics", no_export)
    monkeypatch.setitem(sys.modules, "ultralytics", None)  # the cached export needs no Ultralytics
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "exporting" not in res.stderr and json.loads(out.read_text())["features"] == first

    # another cache and no Ultralytics: one error line that says what to install, no output
    monkeypatch.setenv("RS_DETECT_CACHE", str(tmp_path / "empty"))
    out.unlink()
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and not out.exists()
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "yolo26n.pt" in lines[0] and "pip install 'rs-detect[export]'" in lines[0], res.stderr
