#!/usr/bin/env python3
"""Turn an exported sample model (ONNX) back into an Ultralytics checkpoint that training can continue from.

Why: the bundled ONNX files are the only lasting copy of a training run (the GPU machine keeps
nothing, and ``best.pt`` is not committed). Ultralytics' export fuses every Conv + BatchNorm pair into
one convolution with a bias, so the ONNX initialisers (named after the PyTorch parameters, e.g.
``model.2.cv1.conv.weight``) hold ``W' = W * g / s`` and ``b' = beta - mu * g / s``: the separate
BatchNorm scale is gone. Setting the BatchNorm to the identity would reproduce the model in eval mode,
but in train mode BatchNorm normalises with batch statistics and the first step would wreck the
network. So the BatchNorms are re-calibrated: with the fused weights loaded and identity BatchNorms
(an exact copy of the ONNX function in eval mode), one pass over calibration chips records each
convolution's per-channel mean ``m`` and variance ``v``; then ``running_mean = m``,
``running_var = v``, ``weight = sqrt(v + eps)``, ``bias = m + b'``. Eval mode still computes exactly
``W' x + b'``, and in train mode the batch statistics are close to ``m, v``, so training continues
from the same function.

The result is checked: on chips that were not used for calibration, the checkpoint in eval mode
must give the ONNX model's raw output (ONNX Runtime, CPU) to within 1e-3 (scores) and 0.05 px (boxes).

    python tools/onnx_to_checkpoint.py sample_data/planeship_yolov8n_hbb.onnx --task detect --out hbb_init.pt
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from rs_detect import DOTA_CLASSES  # noqa: E402
from rs_detect_synth import render_chip  # noqa: E402

MODEL_YAML = {"detect": "yolov8n.yaml", "obb": "yolov8n-obb.yaml"}
CALIB_SEED = 424242  # chips for calibration and the check: a seed no training run of the script uses


def chips(n: int, size: int, split: int) -> np.ndarray:
    """``n`` synthetic chips [n, 1, size, size] in [0, 1], as the training script renders them."""
    return np.stack([render_chip(np.random.default_rng([CALIB_SEED, split, i]), size=size)[0][None] for i in range(n)])


def build_model(task: str) -> torch.nn.Module:
    from ultralytics.nn.tasks import DetectionModel, OBBModel

    cls = {"detect": DetectionModel, "obb": OBBModel}[task]
    return cls(MODEL_YAML[task], ch=1, nc=len(DOTA_CLASSES), verbose=False)


def load_fused(model: torch.nn.Module, onnx_path: Path) -> list[tuple[torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.Tensor]]:
    """Copy the ONNX weights in; BatchNorms become identities. Returns (conv, bn, fused bias) per pair."""
    import onnx
    from onnx import numpy_helper
    from ultralytics.nn.modules.conv import Conv

    weights = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in onnx.load(str(onnx_path)).graph.initializer}
    pairs = []
    used = set()
    for name, mod in model.named_modules():
        if isinstance(mod, Conv) and isinstance(mod.bn, torch.nn.BatchNorm2d):
            w, b = weights[f"{name}.conv.weight"], weights[f"{name}.conv.bias"]
            used |= {f"{name}.conv.weight", f"{name}.conv.bias"}
            with torch.no_grad():
                mod.conv.weight.copy_(w)
                mod.bn.running_mean.zero_()
                mod.bn.running_var.fill_(1.0 - mod.bn.eps)  # (z - 0) / sqrt(1) * 1 + b' = z + b'
                mod.bn.weight.fill_(1.0)
                mod.bn.bias.copy_(b)
            pairs.append((mod.conv, mod.bn, b))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".conv.weight") and name in used:
                continue
            key = name
            if key in weights and key not in used:
                p.copy_(weights[key])
                used.add(key)
    missing = [n for n, _ in model.named_parameters() if n not in used and ".bn." not in n and "dfl" not in n]
    if missing:
        raise SystemExit(f"{onnx_path}: no ONNX weights for {missing[:5]} ({len(missing)} parameters)")
    return pairs


def calibrate(model: torch.nn.Module, pairs: list, images: np.ndarray, batch: int = 8) -> None:
    """Per-channel mean and variance of every convolution's output (before its bias), over ``images``."""
    sums = {id(c): [0.0, 0.0, 0] for c, _, _ in pairs}

    def hook(conv: torch.nn.Conv2d, _inp: tuple, out: torch.Tensor) -> None:
        z = out.detach().double()
        s = sums[id(conv)]
        s[0] = s[0] + z.sum(dim=(0, 2, 3))
        s[1] = s[1] + (z * z).sum(dim=(0, 2, 3))
        s[2] += z.numel() // z.shape[1]

    handles = [c.register_forward_hook(hook) for c, _, _ in pairs]
    model.eval()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            model(torch.from_numpy(images[i : i + batch]))
    for h in handles:
        h.remove()
    with torch.no_grad():
        for conv, bn, b in pairs:
            s1, s2, n = sums[id(conv)]
            mean = s1 / n
            var = (s2 / n - mean * mean).clamp_min(1e-6)
            bn.running_mean.copy_(mean.float())
            bn.running_var.copy_(var.float())
            bn.weight.copy_(torch.sqrt(var + bn.eps).float())
            bn.bias.copy_((mean + b.double()).float())


def check(model: torch.nn.Module, onnx_path: Path, images: np.ndarray) -> tuple[float, float]:
    """Largest |diff| of the box channels (px) and of the class scores between checkpoint and ONNX."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (ref,) = session.run(None, {session.get_inputs()[0].name: images})
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(images))
    out = (out[0] if isinstance(out, (list, tuple)) else out).numpy()
    nc = len(DOTA_CLASSES)
    return float(np.abs(out[:, :4] - ref[:, :4]).max()), float(np.abs(out[:, 4 : 4 + nc] - ref[:, 4 : 4 + nc]).max())


def save_checkpoint(model: torch.nn.Module, path: Path, source: Path, task: str) -> None:
    """The layout Ultralytics loads with ``YOLO(path)`` (what its trainer writes, without optimiser state)."""
    from ultralytics import __version__

    model.names = dict(enumerate(DOTA_CLASSES))
    model.args = {"task": task, "imgsz": 1024, "channels": 1}
    ckpt = {"model": model.half(), "ema": None, "epoch": -1, "optimizer": None, "train_args": {"task": task, "imgsz": 1024},
            "version": __version__, "source_onnx": {"path": str(source), "sha256": hashlib.sha256(source.read_bytes()).hexdigest()}}
    tmp = path.with_suffix(".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)


def convert(onnx_path: Path, task: str, out: Path, calib: int = 48, test: int = 4, size: int = 1024) -> dict[str, float]:
    model = build_model(task)
    pairs = load_fused(model, onnx_path)
    calibrate(model, pairs, chips(calib, size, 0))
    box, score = check(model, onnx_path, chips(test, size, 1))
    print(f"{onnx_path.name} -> {out.name}: {len(pairs)} BatchNorms re-calibrated on {calib} chips; "
          f"vs ONNX on {test} other chips: box |diff| {box:.3g} px, score |diff| {score:.3g}", flush=True)
    if box > 0.05 or score > 1e-3:
        raise SystemExit(f"{onnx_path}: the checkpoint does not reproduce the ONNX model (box {box:.3g}, score {score:.3g})")
    save_checkpoint(model, out, onnx_path, task)
    return {"box_max_abs_diff_px": box, "score_max_abs_diff": score}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("onnx", type=Path)
    p.add_argument("--task", choices=tuple(MODEL_YAML), required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--calib", type=int, default=48, help="calibration chips")
    args = p.parse_args(argv)
    convert(args.onnx, args.task, args.out, args.calib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
