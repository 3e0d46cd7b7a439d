"""TorchScript models for the GPU benchmark: random-weight YOLOv8m/YOLOv8n (1 channel, 15 classes, 1024).

Speed does not depend on the weights, so the architectures come straight from Ultralytics' YAML
definitions (nothing is downloaded). ``--v8n-pt`` exports a trained YOLOv8n checkpoint instead of a
random one, so decode and NMS see real detections.

    python benchmarks/make_models.py --out /tmp/models [--v8n-pt best.pt]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rs_detect import DOTA_CLASSES  # noqa: E402
from rs_detect.engines.ultralytics import export_ultralytics  # noqa: E402


def random_checkpoint(arch: str, path: Path) -> Path:
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel(f"{arch}.yaml", ch=1, nc=len(DOTA_CLASSES), verbose=False)
    model.names = dict(enumerate(DOTA_CLASSES))
    model.args = {"task": "detect", "imgsz": 1024, "channels": 1}
    torch.save({"model": model.half(), "ema": None, "epoch": -1, "optimizer": None, "train_args": {"task": "detect", "imgsz": 1024}}, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--v8n-pt", type=Path)
    ap.add_argument("--archs", default="yolov8m,yolov8n")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for arch in args.archs.split(","):
        pt = args.v8n_pt if arch == "yolov8n" and args.v8n_pt else random_checkpoint(arch, args.out / f"{arch}.pt")
        info = export_ultralytics(pt, imgsz=1024, fmt="torchscript", output=args.out / f"{arch}.torchscript")
        print(f"{arch}: {args.out / f'{arch}.torchscript'} from {pt} (batch dynamic: {info.batch.dynamic})", flush=True)


if __name__ == "__main__":
    main()
