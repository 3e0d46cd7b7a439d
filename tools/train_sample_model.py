#!/usr/bin/env python3
"""Reproduce the bundled sample models (planes and ships, YOLOv8n, 1 channel, 15 DOTA-v1 slots) from a seed.

Why: the sample ONNX files in the repository must be rebuildable by anyone, offline, from code alone.
The script renders synthetic training chips with :func:`rs_detect_synth.render_chip` (the same
drawing code as ``rs-detect synth`` scenes), writes them as 8-bit PNGs with YOLO detect and OBB labels,
trains ``yolov8n.yaml`` and ``yolov8n-obb.yaml`` from scratch (never downloading weights), exports
each best checkpoint to ONNX (dynamic batch, opset 17, simplified) and checks the export with
ONNX Runtime: input [batch, 1, imgsz, imgsz], output [batch, 4 + 15 (+1 for OBB), anchors], the same
per-image outputs at batch 1 and 4, and the metadata rs-detect reads (names, imgsz, task, stride).

With ``--scenes N`` the training set also holds every tiler window of N whole synthetic scenes
(6000 x 5000, as the evaluation scenes): windows cut exactly as ``rs-detect`` cuts a scene (1024 px,
192 px overlap), objects cut by a window edge labelled by their visible part, and each scene scaled as
the pipeline scales it (uint8 /255; uint16 by its own 2-98 % stretch). Chips alone hold whole objects
only, densely packed; scenes are what the model meets.

Needs numpy, pillow, pyyaml, torch, ultralytics, onnx, onnxruntime (and onnxslim for ``simplify``),
not polars (see :func:`without_polars`);
``--scenes`` also needs shapely and rasterio (rs-detect's tiler). Everything it writes goes under ``--out``:

    data/{detect,obb}/{images,labels}/{train,val}/   chips and labels (the OBB images are hard links)
    data/{detect,obb}.yaml                           Ultralytics data files (channels: 1)
    runs/{detect,obb}/                               Ultralytics training runs (weights/best.pt)
    planeship_yolov8n_hbb.onnx, planeship_yolov8n_obb.onnx
    planeship_training.json                          settings, seed, versions, metrics, timings
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Ultralytics reads these when it is first imported (inside the functions below): no update checks,
# no pip auto-installs, no downloads; the AMP self-test (which downloads a model) is avoided by amp below.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from rs_detect import DOTA_CLASSES  # noqa: E402
from rs_detect_synth import TruthObject, plan_scene, quantize, render_chip, render_window  # noqa: E402

TASKS = ("detect", "obb")
MODEL_YAML = {"detect": "yolov8n.yaml", "obb": "yolov8n-obb.yaml"}
ONNX_NAME = {"detect": "planeship_yolov8n_hbb.onnx", "obb": "planeship_yolov8n_obb.onnx"}
SPLITS = {"train": 0, "val": 1}
STRIDES = (8, 16, 32)
BATCH_TOLERANCE = 1e-3
SCENE_SIZE = (6000, 5000)  # training scenes: the size of tests/test_sample_model.py's evaluation scenes
SCENE_SEED_BASE = 1_000_000  # training scenes' seeds are SCENE_SEED_BASE * (seed + 1) + k; every
# evaluation, validation and test scene of this repository has a seed below it
TILE = 1024  # the models' input size: rs-detect's windows (their overlap is config.Config's default)
MIN_VISIBLE = 0.5  # a cut object is labelled (by its visible part) when at least this share is in the window


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the chips and of training")
    p.add_argument("--train", type=int, default=800, help="training chips")
    p.add_argument("--val", type=int, default=100, help="validation chips")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--imgsz", type=int, default=1024, help="model input size (multiple of 32)")
    p.add_argument("--chip-size", type=int, default=1024, help="rendered chip size in pixels")
    p.add_argument("--distractors", type=float, default=1.0,
                   help="multiply the buildings, towns, points and blobs per chip (hard negatives; 1.0 = the chips of run 1)")
    p.add_argument("--hard", type=float, default=0.0, metavar="FRACTION",
                   help="share of training chips rendered as hard chips (render_chip's hard: mostly water, many dim, "
                        "thin, large and wake-trailing ships, round plane-grey blobs beside planes); validation chips "
                        "are never hard, so val mAP stays comparable; 0.0 = the chips of earlier runs")
    p.add_argument("--scenes", type=int, default=0, metavar="N",
                   help="also train on every tiler window of N synthetic 6000 x 5000 scenes (uint8 and uint16 in turn; "
                        "seeds disjoint from every evaluation scene); 0 = chips only, as earlier runs")
    p.add_argument("--scale", type=float, default=0.5,
                   help="Ultralytics' scale augmentation (random zoom of +/- this fraction); 0.5 = its default, the "
                        "setting of earlier runs. Scenes come at one ground resolution, so a smaller zoom keeps thin "
                        "ships near the few pixels wide they are at inference")
    p.add_argument("--device", default="0", help="CUDA device index or 'cpu'")
    p.add_argument("--workers", type=int, default=8, help="data-loader workers")
    p.add_argument("--render-workers", type=int, default=os.cpu_count() or 1, help="processes rendering chips")
    p.add_argument("--tasks", default="detect,obb", help="comma-separated subset of detect,obb")
    p.add_argument("--init-detect", type=Path, help="fine-tune from this detect checkpoint (best.pt, or one made from a shipped ONNX by tools/onnx_to_checkpoint.py)")
    p.add_argument("--init-obb", type=Path, help="fine-tune from this OBB checkpoint (as --init-detect)")
    p.add_argument(
        "--amp",
        choices=("auto", "bf16", "off"),
        default="auto",
        help="auto: bf16 on CUDA (skips Ultralytics' AMP self-test, which would download a model), off on CPU",
    )
    p.add_argument(
        "--cache", choices=("disk", "ram", "none"), default="disk", help="Ultralytics image cache (ram is not deterministic)"
    )
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for task in ("detect", "obb"):
        init = getattr(args, f"init_{task}")
        if init is not None and not init.is_file():
            p.error(f"--init-{task} {init}: no such checkpoint")
    if not args.tasks or set(args.tasks) - set(TASKS):
        p.error(f"--tasks must be a comma-separated subset of {','.join(TASKS)}")
    if args.imgsz % 32 or args.imgsz < 64:
        p.error("--imgsz must be a multiple of 32, at least 64")
    if min(args.train, args.epochs, args.batch, args.chip_size) < 1:
        p.error("--train, --epochs, --batch and --chip-size must be positive")
    if args.scenes < 0:
        p.error("--scenes must be >= 0")
    if not 0.0 <= args.scale < 1.0:
        p.error("--scale must be a fraction in [0, 1)")
    if not 0.0 <= args.hard <= 1.0:
        p.error("--hard must be a fraction between 0 and 1")
    if args.val < 4:
        p.error("--val must be at least 4 (the ONNX check compares batch 4 with batch 1 on validation chips)")
    return args


# --------------------------------------------------------------------------------------------------
# Chips and labels
# --------------------------------------------------------------------------------------------------


def box_label(class_id: int, box: tuple[float, float, float, float] | np.ndarray, size: int) -> str:
    """``cls cx cy w h`` normalised, from a pixel box (x1, y1, x2, y2) clipped to the chip."""
    x1, y1, x2, y2 = np.clip(box, 0, size) / size
    return f"{class_id} {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} {x2 - x1:.6f} {y2 - y1:.6f}"


def corners_label(class_id: int, corners: np.ndarray, size: int) -> str:
    """``cls x1 y1 x2 y2 x3 y3 x4 y4`` normalised, from [4, 2] pixel corners (clipped to the chip)."""
    return f"{class_id} " + " ".join(f"{v:.6f}" for v in np.clip(corners / size, 0.0, 1.0).ravel())


def detect_label(obj: TruthObject, size: int) -> str:
    """``cls cx cy w h`` normalised: the axis-aligned box of the rotated rectangle (DOTA's HBB)."""
    return box_label(obj.class_id, obj.bbox, size)


def obb_label(obj: TruthObject, size: int) -> str:
    """``cls x1 y1 x2 y2 x3 y3 x4 y4`` normalised corners of the rotated rectangle."""
    return corners_label(obj.class_id, obj.corners, size)


def window_labels(objects: list[TruthObject] | tuple[TruthObject, ...], col0: int, row0: int, width: int, height: int,
                  min_visible: float = MIN_VISIBLE) -> list[tuple[TruthObject, np.ndarray, tuple[float, float, float, float]]]:
    """The objects a scene window shows, in window pixels: (object, [4, 2] corners, axis-aligned box).

    A whole object keeps its rotated rectangle. One the window cuts is labelled by what is visible, as a
    detector sees it (the pipeline then recognises such boxes at tile edges and stitches them): the
    minimum rotated rectangle and the bounds of its visible part, when at least ``min_visible`` of its
    area is inside; a smaller sliver gets no label.
    """
    import shapely

    frame = shapely.box(0, 0, width, height)
    out = []
    for obj in objects:
        corners = obj.corners - np.array([col0, row0], dtype=np.float64)
        poly = shapely.Polygon(corners)
        if not poly.intersects(frame):
            continue
        if shapely.contains(frame, poly):
            box = (float(corners[:, 0].min()), float(corners[:, 1].min()), float(corners[:, 0].max()), float(corners[:, 1].max()))
            out.append((obj, corners, box))
            continue
        visible = shapely.intersection(poly, frame)
        if visible.area < min_visible * poly.area:
            continue
        rect = shapely.minimum_rotated_rectangle(visible)
        out.append((obj, np.asarray(rect.exterior.coords, dtype=np.float64)[:4], tuple(float(v) for v in visible.bounds)))
    return out


def hard_share(split: str, args: argparse.Namespace) -> float:
    """The share of hard chips in ``split``: ``--hard`` for training, none for validation."""
    return args.hard if split == "train" else 0.0


def chip_jobs(root: Path, split: str, args: argparse.Namespace) -> list[tuple[Path, str, int, int, int, float, float]]:
    """One :func:`render_one` job per chip of ``split``; hard chips (``--hard``) go to training only."""
    n = args.train if split == "train" else args.val
    return [(root, split, i, args.seed, args.chip_size, args.distractors, hard_share(split, args)) for i in range(n)]


def render_one(job: tuple[Path, str, int, int, int, float, float]) -> dict[str, int]:
    """Render chip ``index`` of ``split`` (its own seed, so any process order gives the same data)."""
    root, split, index, seed, size, distractors, hard = job
    image, objects = render_chip(
        np.random.default_rng([seed, SPLITS[split], index]), size=size, distractors=distractors, hard=hard
    )
    name = f"{split}_{index:05d}"
    png = root / "detect" / "images" / split / f"{name}.png"
    Image.fromarray(np.rint(image * 255).astype(np.uint8), mode="L").save(png, compress_level=1)
    _link(png, root / "obb" / "images" / split / png.name)
    for task, fmt in (("detect", detect_label), ("obb", obb_label)):
        lines = [fmt(o, size) for o in objects]
        (root / task / "labels" / split / f"{name}.txt").write_text("".join(f"{line}\n" for line in lines))
    return {c: sum(o.class_name == c for o in objects) for c in ("plane", "ship")}


def scene_jobs(root: Path, args: argparse.Namespace) -> list[tuple[Path, int, int, str, int, int]]:
    """One :func:`render_scene` job per training scene: (root, k, seed, dtype, width, height)."""
    w, h = SCENE_SIZE
    return [(root, k, SCENE_SEED_BASE * (args.seed + 1) + k, ("uint8", "uint16")[k % 2], w, h) for k in range(args.scenes)]


def render_scene(job: tuple[Path, int, int, str, int, int]) -> dict[str, int]:
    """Every tiler window of training scene ``k`` as a chip of the training split, with its labels.

    The scene is planned as ``rs-detect synth --seed SEED`` plans it, each window rendered and stored
    in the scene's dtype, then scaled as the pipeline scales that scene: uint8 by /255, uint16 by the
    2-98 % stretch of all its windows (the pipeline estimates the same stretch from sample windows).
    """
    from rs_detect.config import Config
    from rs_detect.io.reader import ScaleConfig, percentile_stretch
    from rs_detect.io.tiling import iter_tiles

    root, k, seed, dtype, width, height = job
    plan = plan_scene(width, height, seed, tile=TILE, overlap=Config.overlap)
    tiles = list(iter_tiles(width, height, TILE, Config.overlap))
    stored = [quantize(render_window(plan, t.row_off, t.col_off, t.height, t.width), dtype) for t in tiles]
    if dtype == "uint8":
        low, gain = 0.0, 1.0 / 255.0
    else:  # the pipeline's own stretch (io.reader), from all the scene's windows
        low, high = percentile_stretch(np.concatenate([a.ravel() for a in stored]), ScaleConfig().percentiles)
        gain = 1.0 / (high - low)
    counts = {"chips": 0, "plane": 0, "ship": 0, "cut": 0}
    for tile, raw in zip(tiles, stored, strict=True):
        scaled = np.clip((raw.astype(np.float32) - np.float32(low)) * np.float32(gain), 0.0, 1.0)
        name = f"scene{k:04d}_{tile.index:03d}"
        png = root / "detect" / "images" / "train" / f"{name}.png"
        Image.fromarray(np.rint(scaled * 255).astype(np.uint8), mode="L").save(png, compress_level=1)
        _link(png, root / "obb" / "images" / "train" / png.name)
        labels = window_labels(plan.objects, tile.col_off, tile.row_off, tile.width, tile.height)
        size = tile.width
        assert tile.width == tile.height == TILE, "training scenes are at least one window wide and high"
        for task, lines in (("detect", [box_label(o.class_id, box, size) for o, _, box in labels]),
                            ("obb", [corners_label(o.class_id, c, size) for o, c, _ in labels])):
            (root / task / "labels" / "train" / f"{name}.txt").write_text("".join(f"{line}\n" for line in lines))
        counts["chips"] += 1
        for obj, corners, _ in labels:
            counts[obj.class_name] += 1
            counts["cut"] += not np.allclose(corners, obj.corners - np.array([tile.col_off, tile.row_off]))
    return counts


def _link(src: Path, dst: Path) -> None:
    """Share one PNG between the two datasets (Ultralytics finds labels from the image path)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def render_dataset(root: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Write every chip and label, and one data YAML per task; returns chip and object counts (and the
    hard-chip fraction used) per split."""
    import yaml

    shutil.rmtree(root, ignore_errors=True)
    for task in TASKS:
        for kind in ("images", "labels"):
            for split in SPLITS:
                (root / task / kind / split).mkdir(parents=True)
        data = {"path": str((root / task).resolve()), "train": "images/train", "val": "images/val",
                "names": dict(enumerate(DOTA_CLASSES)), "channels": 1}
        (root / f"{task}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    counts: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        jobs = chip_jobs(root, split, args)
        with ProcessPoolExecutor(max_workers=max(1, args.render_workers)) as pool:
            per_chip = list(pool.map(render_one, jobs, chunksize=4))
        counts[split] = {"chips": len(jobs), "hard": hard_share(split, args), **{c: sum(k[c] for k in per_chip) for c in ("plane", "ship")}}
    if args.scenes:
        jobs = scene_jobs(root, args)
        with ProcessPoolExecutor(max_workers=max(1, min(args.render_workers, len(jobs)))) as pool:
            per_scene = list(pool.map(render_scene, jobs))
        scenes = {key: sum(c[key] for c in per_scene) for key in ("chips", "plane", "ship", "cut")}
        counts["train"]["scenes"] = {"scenes": len(jobs), "seeds": [j[2] for j in jobs], "size": list(SCENE_SIZE), **scenes}
        counts["train"]["chips"] += scenes["chips"]
        for c in ("plane", "ship"):
            counts["train"][c] += scenes[c]
    return counts


# --------------------------------------------------------------------------------------------------
# Training, validation, export
# --------------------------------------------------------------------------------------------------


def amp_setting(args: argparse.Namespace) -> str | bool:
    """bf16 skips Ultralytics' AMP self-test, which downloads a model and so cannot run offline."""
    if args.amp == "off" or str(args.device).lower() == "cpu":
        return False
    return "bf16"


def read_results_csv(csv_path: Path) -> dict[str, list[Any]]:
    """results.csv as {column: values}, numbers as floats: what Ultralytics' trainer reads it into."""
    import csv

    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return {}

    def value(v: str) -> Any:
        try:
            return float(v)
        except ValueError:
            return v

    return {k.strip(): [value(r[k].strip()) for r in rows] for k in (rows[0] if rows else {})}


def without_polars() -> bool:
    """Let training run where polars is not installed; True when the fallback was put in.

    Ultralytics' trainer imports polars only to copy results.csv into each checkpoint it saves
    (``BaseTrainer.read_results_csv``); polars is a 55 MB wheel that the GPU machine has to be sent.
    Without it, the same table is read with the csv module instead.
    """
    try:
        import polars  # noqa: F401

        return False
    except ImportError:
        from ultralytics.engine.trainer import BaseTrainer

        BaseTrainer.read_results_csv = lambda self: read_results_csv(Path(self.csv))
        return True


def train(task: str, data_yaml: Path, args: argparse.Namespace) -> Path:
    from ultralytics import YOLO

    without_polars()
    init = getattr(args, f"init_{task}")
    # from scratch: the architecture from its YAML, random weights, nothing downloaded; or a checkpoint
    # of an earlier run of this script (its weights; epochs and optimiser start afresh)
    model = YOLO(str(init) if init else MODEL_YAML[task])
    model.train(
        data=str(data_yaml),
        epochs=args.epochs,
        imgsz=args.imgsz,
        batch=args.batch,
        device=args.device,
        workers=args.workers,
        seed=args.seed,
        deterministic=True,
        pretrained=bool(init),  # Ultralytics drops a checkpoint's weights when this is False
        # fine-tuning: no warm-up (its bias learning rate of 0.1 would throw the trained heads away)
        warmup_epochs=0.0 if init else 3.0,
        amp=amp_setting(args),
        cache=False if args.cache == "none" else args.cache,
        plots=False,
        patience=args.epochs,  # train every epoch: reproducibility over early stopping
        flipud=0.5,  # overhead imagery has no 'up'
        scale=args.scale,
        project=str((args.out / "runs").resolve()),
        name=task,
        exist_ok=True,
        verbose=True,
    )
    return Path(model.trainer.best)


def validate(task: str, weights: Path, data_yaml: Path, args: argparse.Namespace) -> dict[str, float]:
    """mAP50 overall, for plane and for ship, and mAP50-95, on the validation chips."""
    from ultralytics import YOLO

    metrics = YOLO(str(weights)).val(
        data=str(data_yaml), imgsz=args.imgsz, batch=args.batch, device=args.device, workers=args.workers,
        plots=False, project=str((args.out / "runs").resolve()), name=f"{task}_val", exist_ok=True,
    )
    per_class = dict(zip((int(i) for i in metrics.ap_class_index), (float(v) for v in metrics.box.ap50), strict=True))
    return {
        "mAP50": float(metrics.box.map50),
        "mAP50-95": float(metrics.box.map),
        "plane_mAP50": per_class.get(DOTA_CLASSES.index("plane"), 0.0),
        "ship_mAP50": per_class.get(DOTA_CLASSES.index("ship"), 0.0),
    }


def export(weights: Path, args: argparse.Namespace) -> Path:
    """ONNX with a symbolic batch and the spatial size pinned to imgsz (what TensorRT profiles want)."""
    from ultralytics import YOLO

    path = Path(YOLO(str(weights)).export(format="onnx", dynamic=True, opset=17, simplify=True, imgsz=args.imgsz, device="cpu"))
    pin_spatial_dims(path, args.imgsz)
    return path


def anchors(imgsz: int) -> int:
    return sum((imgsz // s) ** 2 for s in STRIDES)


def pin_spatial_dims(path: Path, imgsz: int) -> None:
    """Ultralytics' dynamic export frees height and width too; rs-detect feeds fixed tiles, so fix them."""
    import onnx

    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = imgsz
    dims[3].dim_value = imgsz
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_value = anchors(imgsz)
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def check_onnx(path: Path, task: str, images: list[Path], imgsz: int) -> dict[str, Any]:
    """Shapes, metadata and batch-independence of an exported model, with ONNX Runtime on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp, out = session.get_inputs()[0], session.get_outputs()[0]
    if not (isinstance(inp.shape[0], str) and list(inp.shape[1:]) == [1, imgsz, imgsz]):
        raise SystemExit(f"{path.name}: input shape {inp.shape}, want [batch, 1, {imgsz}, {imgsz}]")
    channels = 4 + len(DOTA_CLASSES) + (1 if task == "obb" else 0)
    meta = session.get_modelmeta().custom_metadata_map
    missing = {"names", "imgsz", "task", "stride"} - set(meta)
    if missing or meta["task"] != task or "plane" not in meta["names"]:
        raise SystemExit(f"{path.name}: metadata {sorted(meta)} lacks {sorted(missing)} or has task {meta.get('task')!r}")
    batch = np.stack([_model_input(p, imgsz) for p in images[:4]])
    (together,) = session.run(None, {inp.name: batch})
    alone = np.concatenate([session.run(None, {inp.name: batch[i : i + 1]})[0] for i in range(len(batch))])
    if together.shape != (len(batch), channels, anchors(imgsz)):
        raise SystemExit(f"{path.name}: output shape {together.shape}, want ({len(batch)}, {channels}, {anchors(imgsz)})")
    diff = float(np.abs(together - alone).max())
    print(f"{path.name}: batch {len(batch)} vs batch 1 max abs diff {diff:.3g}", flush=True)
    if diff >= BATCH_TOLERANCE:
        raise SystemExit(f"{path.name}: batch {len(batch)} and batch 1 outputs differ by {diff:.3g}")
    return {"input": [str(d) for d in inp.shape], "output": [str(d) for d in out.shape], "batch_max_abs_diff": diff,
            "metadata": {k: meta[k] for k in ("task", "imgsz", "stride", "names")}}


def _model_input(png: Path, imgsz: int) -> np.ndarray:
    """A chip as the model sees it: [1, imgsz, imgsz] float32 in [0, 1] (resized if chips differ in size)."""
    image = Image.open(png).convert("L")
    if image.size != (imgsz, imgsz):
        image = image.resize((imgsz, imgsz), Image.BILINEAR)
    return (np.asarray(image, dtype=np.float32) / 255.0)[None]


def init_record(init: Path) -> dict[str, Any]:
    """Which checkpoint a fine-tuning run started from, and the ONNX it was recovered from, if any."""
    import torch

    ckpt = torch.load(init, map_location="cpu", weights_only=False)
    return {"path": str(init), "sha256": sha256(init), "source_onnx": ckpt.get("source_onnx")}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import ultralytics

    try:
        import onnxslim

        slim = onnxslim.__version__
    except ImportError:
        slim = "not installed (export not simplified)"
    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "ultralytics": ultralytics.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxslim": slim}


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def run_task(task: str, args: argparse.Namespace, data: Path) -> dict[str, Any]:
    timings: dict[str, float] = {}
    t = time.perf_counter()
    best = train(task, data / f"{task}.yaml", args)
    timings["train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    metrics = validate(task, best, data / f"{task}.yaml", args)
    timings["val_s"] = time.perf_counter() - t
    t = time.perf_counter()
    onnx_path = export(best, args)
    timings["export_s"] = time.perf_counter() - t
    t = time.perf_counter()
    val_images = sorted((data / task / "images" / "val").glob("*.png"))
    check = check_onnx(onnx_path, task, val_images, args.imgsz)
    timings["check_s"] = time.perf_counter() - t
    final = args.out / ONNX_NAME[task]
    shutil.copyfile(onnx_path, final)
    print(f"{task}: {final} mAP50 plane {metrics['plane_mAP50']:.3f} ship {metrics['ship_mAP50']:.3f}", flush=True)
    init = getattr(args, f"init_{task}")
    return {"onnx": final.name, "sha256": sha256(final), "bytes": final.stat().st_size, "best_pt": str(best),
            "init": init_record(init) if init else None,
            "metrics": metrics, "onnx_check": check, "timings": timings}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("YOLO_CONFIG_DIR", str((args.out / "ultralytics_config").resolve()))
    started = time.perf_counter()
    data = args.out / "data"
    t = time.perf_counter()
    counts = render_dataset(data, args)
    render_s = time.perf_counter() - t
    print(f"rendered {counts} in {render_s:.1f} s", flush=True)
    results = {task: run_task(task, args, data) for task in args.tasks}
    summary = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seed": args.seed,
        "amp": amp_setting(args),
        "versions": versions(),
        "dataset": counts,
        "tasks": results,
        "timings": {"render_s": render_s, "total_s": time.perf_counter() - started},
    }
    report = args.out / "planeship_training.json"
    report.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {report} in {summary['timings']['total_s']:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
