#!/usr/bin/env python3
"""Prove real GPU execution: the same images through ONNX Runtime (CPU, fp32) and TorchScriptEngine (CUDA).

TensorRT cannot be installed on our dev/CI machines, so its backend is tested against a fake of the
TensorRT API; this script is the real-hardware evidence for the GPU path that *can* run there: the
PyTorch backend (``rs_detect.engines.torch.TorchScriptEngine``) in fp16 on CUDA, followed by decode
and NMS on the GPU, compared with the reference backend on the CPU.

It reports, as JSON (``--out``) and one summary line:

* raw outputs: max, 99.9th percentile and mean |diff| for the box channels (pixels) and the score
  channels (the pass check uses the percentile);
* detections after decode + per-image NMS: how many of the reference's boxes the GPU run finds
  again (same class, IoU > ``--match-iou``), and the other way round; a "robust" variant ignores
  boxes whose score lies within 0.1 logit of the threshold (fp16 flips those legitimately);
* throughput of each side (images/s) and of decode + NMS on the GPU;
* the TensorRT backend's CUDA memory path (buffers, addresses, stream, copies) on the real GPU, with
  the fake TensorRT runtime from tests/fake_tensorrt.py standing in for libnvinfer (needs cupy).

Runs where rasterio/geopandas/shapely are absent (the GPU image has none): only torch, torchvision,
numpy, onnx, onnxruntime and pyyaml are needed. ``rs_detect.types`` imports ``rasterio.windows`` and
``affine`` for type annotations only; when they are missing, minimal stand-ins are registered.

Usage (from the repository root):

    python tools/gpu_check.py --onnx M.onnx --torchscript M.torchscript --out gpu_check.json
    python tools/gpu_check.py --onnx M.onnx --pt best.pt --out gpu_check.json   # TorchScript made here (needs ultralytics)
    python tools/gpu_check.py --out gpu_check.json                             # a tiny in-script model, as a smoke test
    python tools/gpu_check.py --make-random-yolo --out y8n_random.pt            # (dev machine) weights for a meaningful pair
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def shim_geo_imports() -> list[str]:
    """Register stand-ins for ``affine.Affine`` and ``rasterio.windows.Window`` where they are missing.

    ``rs_detect.types`` names them in annotations only; the engines and post-processing this script
    uses never touch them. Returns the names of the modules that were stood in for.
    """
    shimmed = []
    for module, attr in (("affine", "Affine"), ("rasterio.windows", "Window")):
        try:
            importlib.import_module(module)
            continue
        except ImportError:
            pass
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in sys.modules or sys.modules[name] is None:
                mod = ModuleType(name)
                mod.__path__ = []  # type: ignore[attr-defined]
                sys.modules[name] = mod
                if i > 1:
                    setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], mod)
        setattr(sys.modules[module], attr, type(attr, (), {"__doc__": f"stand-in for {module}.{attr} (gpu_check)"}))
        shimmed.append(module)
    return shimmed


SHIMMED = shim_geo_imports()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

from rs_detect import DOTA_CLASSES  # noqa: E402
from rs_detect.engines.onnxruntime import OnnxRuntimeEngine  # noqa: E402
from rs_detect.engines.torch import TorchScriptEngine  # noqa: E402
from rs_detect.postprocess.decode import DecodeParams, decode  # noqa: E402
from rs_detect.postprocess.geometry import probiou  # noqa: E402
from rs_detect.postprocess.nms import nms_per_tile  # noqa: E402
from rs_detect.types import Detections, ModelMeta  # noqa: E402


# -- inputs ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", type=Path, help="reference model (ONNX Runtime, CPU, fp32)")
    p.add_argument("--torchscript", type=Path, help="the same model as TorchScript (Ultralytics format='torchscript')")
    p.add_argument("--pt", type=Path, help="Ultralytics weights: export the TorchScript here (needs ultralytics) instead of --torchscript")
    p.add_argument("--device", default="cuda", help="device for the TorchScript side [cuda]")
    p.add_argument("--fp32", action="store_true", help="run the TorchScript side in fp32 (default: fp16 on CUDA)")
    p.add_argument("--images", type=int, default=24, help="number of random images [24]")
    p.add_argument("--npy", type=Path, help="use these images instead: a float array [N, C, S, S] in [0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--conf", type=float, default=None, help="score threshold [auto: the score of the reference's 100th best box per image]")
    p.add_argument("--iou", type=float, default=0.5, help="NMS IoU [0.5]")
    p.add_argument("--match-iou", type=float, default=0.9, help="IoU for a detection to count as the same [0.9]")
    p.add_argument("--timing-iters", type=int, default=10, help="timed batches for the throughput figures [10]; 0 skips")
    p.add_argument("--no-trt-fake", dest="trt_fake", action="store_false",
                   help="skip the TensorRT backend's CUDA-memory check (fake TensorRT runtime, needs cupy)")
    p.add_argument("--out", type=Path, required=True, help="JSON report, or the .pt with --make-random-yolo")
    p.add_argument("--make-random-yolo", action="store_true",
                   help="only write an untrained but non-degenerate YOLOv8n checkpoint to --out (needs ultralytics), then exit")
    return p.parse_args(argv)


def make_images(args: argparse.Namespace, meta: ModelMeta) -> np.ndarray:
    """Random scenes: dark noise with bright rectangles, so a trained model has something to find."""
    if args.npy:
        images = np.load(args.npy).astype(np.float32)
        if images.ndim != 4 or images.shape[1:] != (meta.channels, meta.imgsz, meta.imgsz):
            raise SystemExit(f"{args.npy}: expected [N, {meta.channels}, {meta.imgsz}, {meta.imgsz}], got {list(images.shape)}")
        return images
    rng = np.random.default_rng(args.seed)
    s = meta.imgsz
    images = (rng.random((args.images, meta.channels, s, s), dtype=np.float32) * 0.25).astype(np.float32)
    for img in images:
        for _ in range(rng.integers(5, 30)):
            w, h = rng.integers(s // 64 + 2, s // 12 + 3, size=2)
            x, y = rng.integers(0, s - w), rng.integers(0, s - h)
            img[:, y : y + h, x : x + w] = rng.uniform(0.6, 1.0)
    return images


# -- the tiny in-script model (smoke test without model files) ------------------------------------------


class TinyYoloV8(torch.nn.Module):
    """Strides 8/16/32, DFL box head, sigmoid scores: raw [B, 4 + nc, A], batch-dynamic when exported so."""

    def __init__(self, imgsz: int = 256, channels: int = 1, nc: int = 15, reg: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.nc, self.reg = nc, reg
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(channels, 16, 3, 2, 1), torch.nn.SiLU(), torch.nn.Conv2d(16, 32, 3, 2, 1), torch.nn.SiLU())
        self.down = torch.nn.ModuleList([torch.nn.Conv2d(32, 32, 3, 2, 1) for _ in range(3)])
        self.box = torch.nn.ModuleList([torch.nn.Conv2d(32, 4 * reg, 1) for _ in range(3)])
        self.cls = torch.nn.ModuleList([torch.nn.Conv2d(32, nc, 1) for _ in range(3)])
        for conv in [*self.stem[::2], *self.down]:  # keep activations from shrinking layer by layer
            torch.nn.init.kaiming_normal_(conv.weight)
        for conv in self.cls:  # spread the class logits, so scores vary like a trained model's
            torch.nn.init.normal_(conv.weight, std=1.5)
            torch.nn.init.constant_(conv.bias, -3.0)
        centres, strides = [], []
        for s in (8, 16, 32):
            n = imgsz // s
            ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
            centres.append(torch.stack([xs.flatten() + 0.5, ys.flatten() + 0.5]) * s)
            strides.append(torch.full((n * n,), float(s)))
        self.register_buffer("centres", torch.cat(centres, 1)[None])
        self.register_buffer("strides", torch.cat(strides)[None, None])
        self.register_buffer("bins", torch.arange(reg, dtype=torch.float32).view(1, 1, reg, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        f = self.stem(x)
        feats = []
        for down in self.down:
            f = torch.nn.functional.silu(down(f))
            feats.append(f)
        box = torch.cat([h(p).view(b, 4 * self.reg, -1) for h, p in zip(self.box, feats)], 2)
        cls = torch.cat([h(p).view(b, self.nc, -1) for h, p in zip(self.cls, feats)], 2)
        dist = (box.view(b, 4, self.reg, box.shape[2]).softmax(2) * self.bins).sum(2) * self.strides
        xy = self.centres + (dist[:, 2:] - dist[:, :2]) / 2
        return torch.cat([xy, dist[:, :2] + dist[:, 2:], cls.sigmoid()], 1)


def build_tiny_pair(folder: Path, imgsz: int = 256) -> tuple[Path, Path]:
    """Export the tiny model to ONNX (rs-detect's exporter) and TorchScript (config.txt metadata)."""
    from rs_detect.engines.onnxruntime import export_torch_module_onnx

    model = TinyYoloV8(imgsz).eval()
    onnx_path = export_torch_module_onnx(model, folder / "tiny.onnx", imgsz, 1, DOTA_CLASSES, "detect")
    ts_path = folder / "tiny.torchscript"
    traced = torch.jit.trace(model, torch.zeros(1, 1, imgsz, imgsz), check_trace=False)
    meta = {"names": dict(enumerate(DOTA_CLASSES)), "imgsz": [imgsz, imgsz], "channels": 1, "task": "detect", "stride": 32, "batch": 1}
    traced.save(str(ts_path), _extra_files={"config.txt": json.dumps(meta)})
    return onnx_path, ts_path


def make_random_yolo(out: Path, imgsz: int = 1024, seed: int = 0) -> Path:
    """An untrained YOLOv8n (1 channel, 15 DOTA classes) whose outputs depend on the image.

    Straight from ``yolov8n.yaml`` the activations of an untrained YOLOv8n shrink layer by layer to
    ~1e-8 (BatchNorm running stats still at their defaults) and the class bias makes every score
    the same, so fp16 vs fp32 would compare constants. Here the BatchNorm statistics are recalibrated
    on random scenes and the final class convolutions get logits spread around -3, so scores and
    boxes vary with the input like a trained model's. Needs ultralytics (run it on the dev machine).
    """
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(seed)
    model = YOLO("yolov8n.yaml", task="detect")
    net = DetectionModel("yolov8n.yaml", ch=1, nc=len(DOTA_CLASSES), verbose=False)
    net.names = dict(enumerate(DOTA_CLASSES))
    net.args = {"imgsz": imgsz, "data": ""}
    net.task = "detect"
    rng = np.random.default_rng(seed)

    def scenes(n: int, size: int) -> torch.Tensor:
        args = argparse.Namespace(npy=None, seed=int(rng.integers(1 << 30)), images=n)
        return torch.from_numpy(make_images(args, ModelMeta(names=DOTA_CLASSES, imgsz=size)))

    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    net.train()
    with torch.no_grad():
        for _ in range(4):
            net(scenes(2, 512))
    net.eval()
    head = net.model[-1]
    feats: dict[int, torch.Tensor] = {}
    hooks = [seq[-1].register_forward_hook(lambda mod, inp, out, i=i: feats.__setitem__(i, inp[0])) for i, seq in enumerate(head.cv3)]
    with torch.no_grad():
        net(scenes(2, imgsz))
    for h in hooks:
        h.remove()
    for i, seq in enumerate(head.cv3):
        energy = float(feats[i].pow(2).mean(dim=(0, 2, 3)).sum())
        torch.nn.init.normal_(seq[-1].weight, std=0.75 / max(energy, 1e-12) ** 0.5)
        torch.nn.init.constant_(seq[-1].bias, -3.0)
    for bn in norms:
        bn.momentum = 0.03
    model.model = net
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(str(out))
    return out


def export_torchscript(pt: Path, imgsz: int, folder: Path) -> Path:
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    produced = Path(YOLO(str(pt)).export(format="torchscript", imgsz=imgsz, device="cpu"))
    target = folder / f"{pt.stem}.torchscript"
    produced.replace(target)
    return target


# -- comparison ----------------------------------------------------------------------------------------------


def channel_stats(ref: torch.Tensor, test: torch.Tensor, meta: ModelMeta) -> dict[str, Any]:
    """max, 99.9th percentile and mean |diff| per channel group; max also relative to the reference's scale.

    The percentile is what the pass check uses: across ~10^7 values, fp16 rounding amplified through
    60 layers leaves a few outliers whose size says little about the backend.
    """
    groups = {"box": slice(0, 4), "scores": slice(4, 4 + meta.nc)}
    if meta.task == "obb":
        groups["angle"] = slice(4 + meta.nc, 5 + meta.nc)
    out: dict[str, Any] = {}
    for name, sl in groups.items():
        r, t = ref[:, sl].double(), test[:, sl].double()
        diff = (r - t).abs()
        scale = float(r.abs().max()) or 1.0
        out[name] = {"max_abs_diff": float(diff.max()), "p999_abs_diff": float(np.percentile(diff.float().numpy(), 99.9)),
                     "mean_abs_diff": float(diff.mean()), "ref_max_abs": scale, "max_rel_diff": float(diff.max()) / scale}
    return out


def auto_conf(raw: torch.Tensor, meta: ModelMeta, per_image: int = 100) -> float:
    scores = raw[:, 4 : 4 + meta.nc].amax(1)  # [B, A]
    k = min(per_image, scores.shape[1])
    return max(float(scores.topk(k, dim=1).values[:, -1].median()), 1e-6)


def postprocess(raw: torch.Tensor, meta: ModelMeta, conf: float, iou: float) -> Detections:
    params = DecodeParams.build(meta, conf, None, None)
    return nms_per_tile(decode(raw, meta, params), iou=iou, max_det=300, num_classes=meta.nc)


def match(ref: Detections, test: Detections, iou_thr: float, keep_ref: torch.Tensor, keep_test: torch.Tensor) -> dict[str, Any]:
    """Greedy one-to-one matching per image and class, best reference score first."""
    ref, test = ref.to("cpu"), test.to("cpu")
    keep_ref, keep_test = keep_ref.cpu(), keep_test.cpu()
    matched_ref = torch.zeros(len(ref), dtype=torch.bool)
    matched_test = torch.zeros(len(test), dtype=torch.bool)
    score_diff: list[float] = []
    for tile in torch.unique(torch.cat([ref.tile_ids, test.tile_ids])):
        ri = (ref.tile_ids == tile).nonzero().flatten()
        ti = (test.tile_ids == tile).nonzero().flatten()
        if not len(ri) or not len(ti):
            continue
        if ref.task == "obb":
            sim = probiou(ref.boxes[ri].double(), test.boxes[ti].double()).float()
        else:
            sim = box_iou(ref.boxes[ri], test.boxes[ti])
        sim = torch.where(ref.class_ids[ri, None] == test.class_ids[None, ti], sim, torch.zeros_like(sim))
        for a in ref.scores[ri].argsort(descending=True).tolist():
            cand = sim[a].clone()
            cand[matched_test[ti]] = -1
            b = int(cand.argmax())
            if cand[b] > iou_thr:
                matched_ref[ri[a]] = True
                matched_test[ti[b]] = True
                score_diff.append(abs(float(ref.scores[ri[a]]) - float(test.scores[ti[b]])))

    def frac(num: torch.Tensor, den: torch.Tensor) -> float | None:
        return float(num.sum()) / float(den.sum()) if int(den.sum()) else None

    return {
        "reference_boxes": len(ref),
        "gpu_boxes": len(test),
        "robust_reference_boxes": int(keep_ref.sum()),
        "robust_gpu_boxes": int(keep_test.sum()),
        "matched": int(matched_ref.sum()),
        "recall": frac(matched_ref, torch.ones_like(matched_ref)),
        "precision": frac(matched_test, torch.ones_like(matched_test)),
        "robust_recall": frac(matched_ref & keep_ref, keep_ref),
        "robust_precision": frac(matched_test & keep_test, keep_test),
        "matched_score_max_abs_diff": max(score_diff) if score_diff else None,
    }


#: fewer reference boxes clear of the threshold than this: the detection comparison is inconclusive
MIN_ROBUST_BOXES = 10
#: boxes this close to the threshold (in logit units) may flip between fp16 and fp32: "robust" ignores them
LOGIT_MARGIN = 0.1


def logit(scores: torch.Tensor) -> torch.Tensor:
    return torch.special.logit(scores.double().cpu(), eps=1e-12)


def tensorrt_backend_on_cuda(onnx_path: Path, meta: ModelMeta, images: np.ndarray, ref_raw: torch.Tensor) -> dict[str, Any]:
    """The TensorRT backend's torch-CUDA memory path on this GPU, with the fake TensorRT runtime.

    TensorRT itself is not installed, but everything of ``TensorRTEngine`` around it is real here:
    CUDA buffers allocated once, addresses bound once, uploads and ``execute_async_v3`` on one CUDA
    stream, downloads. The fake (tests/fake_tensorrt.py) reads the bound device memory through cupy
    and runs the ONNX with ONNX Runtime, so the result must equal the reference.
    """
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    import importlib.util

    missing = [m for m in ("cupy", "pytest") if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"{', '.join(missing)} not installed (the fake needs cupy to reach device memory)"}
    import pytest
    sys.path.insert(0, str(REPO / "tests"))
    import fake_tensorrt as ft

    from rs_detect.engines.tensorrt import TensorRTEngine

    patch = pytest.MonkeyPatch()
    try:
        rec = ft.install(patch)
        plan = Path(tempfile.mkdtemp(prefix="gpu_check_trt_")) / "fake.plan"
        plan.write_bytes(ft.plan_for_onnx(onnx_path, (1, 8, 16), spatial=meta.imgsz))
        yaml = {"names": list(meta.names), "imgsz": meta.imgsz, "channels": meta.channels, "task": meta.task}
        engine = TensorRTEngine(plan, device="cuda", model_yaml=yaml)
        out = engine.infer(images)
        torch.cuda.synchronize()
        diff = float((out.cpu() - ref_raw).abs().max())
        scale = float(ref_raw.abs().max()) or 1.0
        handles = {a[0] for a in rec.args("execute_async_v3")}
        result = {
            "output_device": str(out.device),
            "max_abs_diff_vs_reference": diff,
            "executions": rec.count("execute_async_v3"),
            "set_tensor_address_calls": rec.count("set_tensor_address"),
            "pycuda_allocations": rec.count("mem_alloc"),
            "stream_handles": sorted(handles),
            "ok": diff <= 1e-4 * scale and out.device.type == "cuda" and rec.count("set_tensor_address") == 2
                  and rec.count("mem_alloc") == 0 and len(handles) == 1 and 0 not in handles,
        }
        engine.close()
        return result
    except Exception as exc:  # report, do not hide the rest of the check
        return {"error": " ".join(f"{type(exc).__name__}: {exc}".split())[:400], "ok": False}
    finally:
        patch.undo()


def timed(fn: Any, iters: int, sync: bool) -> float:
    """Seconds per call after two warm-up calls."""
    for _ in range(2):
        fn()
    if sync:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if sync:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / max(iters, 1)


def environment(device: torch.device) -> dict[str, Any]:
    import onnxruntime as ort

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "cpu_count": os.cpu_count(),
        "shimmed_modules": SHIMMED,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_capability"] = list(torch.cuda.get_device_capability(device))
    return env


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    onnx_path, ts_path = args.onnx, args.torchscript
    if onnx_path is None and ts_path is None and args.pt is None:
        onnx_path, ts_path = build_tiny_pair(work)
    if onnx_path is None or (ts_path is None and args.pt is None):
        raise SystemExit("give --onnx and --torchscript (or --pt), or neither for the tiny in-script model")
    reference = OnnxRuntimeEngine(onnx_path, device="cpu", threads=os.cpu_count())
    meta = reference.meta
    if ts_path is None:
        ts_path = export_torchscript(args.pt, meta.imgsz, work)
    gpu = TorchScriptEngine(ts_path, device=args.device, half=False if args.fp32 else None)
    if (gpu.meta.names, gpu.meta.imgsz, gpu.meta.task) != (meta.names, meta.imgsz, meta.task):
        raise SystemExit(f"the two models disagree: ONNX {meta.imgsz}px {meta.task} {meta.nc} classes, TorchScript {gpu.meta.imgsz}px {gpu.meta.task} {gpu.meta.nc}")
    images = make_images(args, meta)

    t0 = time.perf_counter()
    ref_raw = reference.infer(images)
    ref_seconds = time.perf_counter() - t0
    gpu_raw = gpu.infer(images.astype(gpu.input_dtype))  # what the pipeline feeds it: tiles read in its input dtype
    if gpu.device.type == "cuda":
        torch.cuda.synchronize()

    conf = args.conf if args.conf is not None else auto_conf(ref_raw, meta)
    ref_dets = postprocess(ref_raw, meta, conf, args.iou)
    gpu_dets = postprocess(gpu_raw, meta, conf, args.iou)
    floor = float(torch.special.logit(torch.tensor(conf, dtype=torch.float64)) + LOGIT_MARGIN)
    detections = match(ref_dets, gpu_dets, args.match_iou, logit(ref_dets.scores) >= floor, logit(gpu_dets.scores) >= floor)

    timing: dict[str, Any] = {"onnxruntime_cpu_images_per_s": len(images) / ref_seconds}
    if args.timing_iters > 0:
        batch = gpu.preferred_batch
        chunk = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])).astype(gpu.input_dtype))
        sync = gpu.device.type == "cuda"
        per_batch = timed(lambda: gpu.infer(chunk), args.timing_iters, sync)
        raw = gpu.infer(chunk)
        post = timed(lambda: postprocess(raw, meta, conf, args.iou), args.timing_iters, sync)
        timing.update({"torchscript_batch": batch, "torchscript_images_per_s": batch / per_batch,
                       "torchscript_ms_per_batch": per_batch * 1e3, "decode_nms_ms_per_batch": post * 1e3})

    trt_cuda = tensorrt_backend_on_cuda(onnx_path, meta, images, ref_raw) if args.trt_fake else {"skipped": "--no-trt-fake"}
    raw_stats = channel_stats(ref_raw, gpu_raw.cpu(), meta)
    # fp16 tolerances are heuristics measured on CPU fp16 with a random YOLOv8n (p99.9: 0.026 score, 2.3 px;
    # 94-95 % of boxes matched); fp32 must agree almost exactly
    tol_scores = 5e-2 if gpu.half else 1e-3
    tol_box = (5e-3 if gpu.half else 1e-3) * meta.imgsz
    tol_match = 0.9 if gpu.half else 0.99
    checks = {
        "raw_scores_p999_abs_diff_ok": raw_stats["scores"]["p999_abs_diff"] <= tol_scores,
        "raw_box_p999_abs_diff_ok": raw_stats["box"]["p999_abs_diff"] <= tol_box,
        "detections_robust_recall_ok": detections["robust_recall"] is None or detections["robust_recall"] >= tol_match,
        "detections_robust_precision_ok": detections["robust_precision"] is None or detections["robust_precision"] >= tol_match,
        # boxes clear of the threshold must exist, else the comparison says nothing (e.g. an untrained
        # Ultralytics model: its class bias makes nearly every score equal, so every box is at the threshold)
        "detections_conclusive": detections["robust_reference_boxes"] >= MIN_ROBUST_BOXES,
        "gpu_output_on_device": gpu_raw.device.type == gpu.device.type,
        "decode_on_device": gpu_dets.boxes.device.type == gpu.device.type,
    }
    if "ok" in trt_cuda:
        checks["tensorrt_backend_cuda_memory_ok"] = bool(trt_cuda["ok"])
    return {
        "passed": all(checks.values()),
        "checks": checks,
        "tolerances": {"scores_p999_abs_diff": tol_scores, "box_p999_abs_diff_px": tol_box, "robust_fraction": tol_match,
                       "robust_logit_margin": LOGIT_MARGIN},
        "environment": environment(gpu.device),
        "models": {"onnx": str(onnx_path), "torchscript": str(ts_path), "imgsz": meta.imgsz, "channels": meta.channels,
                   "task": meta.task, "nc": meta.nc, "anchors": meta.num_anchors},
        "run": {"images": len(images), "source": str(args.npy) if args.npy else f"random rectangles, seed {args.seed}",
                "gpu_device": str(gpu.device), "gpu_precision": "fp16" if gpu.half else "fp32", "gpu_batch_bounds": [gpu.meta.min_batch, gpu.meta.max_batch],
                "conf": conf, "conf_auto": args.conf is None, "nms_iou": args.iou, "match_iou": args.match_iou},
        "raw": raw_stats,
        "detections": detections,
        "timing": timing,
        "tensorrt_backend_with_fake_runtime": trt_cuda,
    }


def main(argv: list[str] | None = None) -> int:
    from rs_detect.errors import RsDetectError, error_line
    from rs_detect.fsutil import atomic_write_text

    args = parse_args(argv)
    if args.make_random_yolo:
        print(make_random_yolo(args.out, seed=args.seed))
        return 0
    try:
        report = run(args)
    except RsDetectError as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    atomic_write_text(args.out, json.dumps(report, indent=2), parents=True)
    d, r, t = report["detections"], report["raw"], report["timing"]
    failed = [k for k, ok in report["checks"].items() if not ok]
    print(f"{'PASS' if report['passed'] else 'FAIL (' + ', '.join(failed) + ')'}: {report['run']['gpu_device']} {report['run']['gpu_precision']} vs ONNX Runtime CPU fp32; "
          f"scores |diff| p99.9 {r['scores']['p999_abs_diff']:.2e} (max {r['scores']['max_abs_diff']:.2e}), "
          f"boxes |diff| p99.9 {r['box']['p999_abs_diff']:.3f} px (max {r['box']['max_abs_diff']:.3f}); "
          f"{d['matched']}/{d['reference_boxes']} reference boxes matched ({d['gpu_boxes']} on the GPU); "
          f"{t.get('torchscript_images_per_s', float('nan')):.1f} img/s GPU vs {t['onnxruntime_cpu_images_per_s']:.1f} img/s CPU -> {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
