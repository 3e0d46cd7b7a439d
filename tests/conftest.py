"""Shared fixtures: GeoTIFF factories, a fake engine that 'sees' planted objects, a tiny ONNX model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import torch
from affine import Affine
from rasterio.transform import from_origin

from rs_detect import DOTA_CLASSES
from rs_detect.engines.base import Engine
from rs_detect.engines.onnxruntime import export_torch_module_onnx
from rs_detect.types import ModelMeta

SHARED_TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "geotiff"
UTM = "EPSG:32633"
NORTH_UP = from_origin(500000.0, 4500000.0, 0.5, 0.5)


def write_tif(
    path: Path,
    data: np.ndarray,
    crs: str | None = UTM,
    transform: Affine = NORTH_UP,
    nodata: float | None = None,
    tiled: bool = True,
    **profile: object,
) -> Path:
    """Write [bands, h, w] (or [h, w]) as a GeoTIFF."""
    if data.ndim == 2:
        data = data[None]
    prof = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype=data.dtype,
                crs=crs, transform=transform, nodata=nodata, compress="deflate")
    if tiled:
        prof.update(tiled=True, blockxsize=256, blockysize=256)
    prof.update(profile)
    with rasterio.open(path, "w", **prof) as ds:
        ds.write(data)
    return path


def two_squares() -> np.ndarray:
    """A 150 x 200 uint8 scene with two bright 32 px squares: something for the tiny model to find."""
    img = np.full((150, 200), 20, dtype=np.uint8)
    img[10:42, 20:52] = 250
    img[90:122, 140:172] = 250
    return img


@pytest.fixture
def tif_factory(tmp_path: Path):
    def make(name: str, data: np.ndarray, **kw: object) -> Path:
        return write_tif(tmp_path / name, data, **kw)

    return make


def one_error_line(res, *needles: str, outputs: tuple[Path, ...] = ()) -> str:
    """A CLI failure as users must see it: exit 1, exactly one ``error:`` line naming ``needles``,
    no traceback, and none of ``outputs`` (nor a temporary file of theirs) left behind."""
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], lines[0]
    for p in outputs:
        assert not p.exists()
        assert not list(p.parent.glob(f".{p.stem}.*tmp*"))
    return lines[0]


# -- planted objects and the fake engine ------------------------------------------------------------


@dataclass(frozen=True)
class Planted:
    """An object drawn with a unique pixel code; class = plane for odd codes, ship for even ones."""

    code: int
    cx: float
    cy: float
    w: float
    h: float
    angle: float = 0.0  # radians, xywhr convention

    @property
    def class_name(self) -> str:
        return "plane" if self.code % 2 else "ship"

    def polygon(self) -> shapely.Polygon:
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = (self.w / 2 * c, self.w / 2 * s), (-self.h / 2 * s, self.h / 2 * c)
        pts = [(self.cx + sx * dx[0] + sy * dy[0], self.cy + sx * dx[1] + sy * dy[1]) for sx, sy in ((1, 1), (1, -1), (-1, -1), (-1, 1))]
        return shapely.Polygon(pts)

    def aabb(self) -> tuple[float, float, float, float]:
        return tuple(self.polygon().bounds)  # type: ignore[return-value]


def paint(shape: tuple[int, int], objects: list[Planted]) -> np.ndarray:
    """uint8 image (background 0) with each object's pixels (centres inside its polygon) set to its code."""
    img = np.zeros(shape, dtype=np.uint8)
    for o in objects:
        x1, y1, x2, y2 = o.aabb()
        xs = np.arange(max(0, int(x1)), min(shape[1], int(math.ceil(x2))))
        ys = np.arange(max(0, int(y1)), min(shape[0], int(math.ceil(y2))))
        if not len(xs) or not len(ys):
            continue
        gx, gy = np.meshgrid(xs + 0.5, ys + 0.5)
        inside = shapely.contains_xy(o.polygon(), gx, gy)
        sub = img[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]
        sub[inside] = o.code
    return img


def planted_grid() -> list[Planted]:
    """A dozen axis-aligned objects, several on the edges of a 256/64 tile grid."""
    spots = [(100, 100), (256, 120), (192, 300), (320, 256), (256, 192), (448, 450), (700, 700), (212, 630),
             (640, 200), (830, 830), (500, 80), (90, 500)]
    return [Planted(code=i + 1, cx=x, cy=y, w=20 + 2 * i, h=12 + i) for i, (x, y) in enumerate(spots)]


class FakeEngine(Engine):
    """Emits raw YOLOv8 tensors [B, 4+nc(+1), A] for the coded objects it finds in each image.

    Like a real detector it only sees the tile: an object cut by the tile edge gets the box of its
    visible part. Each object also gets a weaker, shifted duplicate so per-tile NMS has work to do.
    """

    backend = "fake"

    def __init__(self, imgsz: int = 256, task: str = "detect", max_batch: int = 8, min_batch: int = 1, dynamic: bool = True) -> None:
        meta = ModelMeta(names=DOTA_CLASSES, imgsz=imgsz, channels=1, task=task,  # type: ignore[arg-type]
                         min_batch=min_batch, opt_batch=max_batch, max_batch=max_batch, dynamic_batch=dynamic, source="fake")
        super().__init__(meta, torch.device("cpu"))
        self.calls: list[int] = []

    def _infer(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        imgs = np.asarray(images, dtype=np.float32)
        self.calls.append(imgs.shape[0])
        meta = self.meta
        out = torch.zeros((imgs.shape[0], meta.output_channels, meta.num_anchors))
        for b in range(imgs.shape[0]):
            codes = np.rint(imgs[b, 0] * 255).astype(np.int32)
            slot = 0
            for code in np.unique(codes[codes > 0]):
                ys, xs = np.nonzero(codes == code)
                cls = 0 if code % 2 else 1
                if meta.task == "obb":
                    pts = shapely.multipoints(np.stack([np.concatenate([xs, xs + 1, xs, xs + 1]),
                                                        np.concatenate([ys, ys, ys + 1, ys + 1])], axis=1))
                    rect = np.asarray(shapely.minimum_rotated_rectangle(pts).exterior.coords)[:4]
                    e1, e2 = rect[1] - rect[0], rect[2] - rect[1]
                    box = [*rect.mean(axis=0), np.hypot(*e1), np.hypot(*e2)]
                    angle = math.atan2(e1[1], e1[0])
                else:
                    x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
                    box = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
                    angle = 0.0
                for dup, (score, shift) in enumerate(((0.9, 0.0), (0.6, 1.5))):
                    a = slot * 2 + dup
                    out[b, 0, a] = box[0] + shift
                    out[b, 1, a] = box[1] + shift
                    out[b, 2, a] = box[2]
                    out[b, 3, a] = box[3]
                    out[b, 4 + cls, a] = score
                    if meta.task == "obb":
                        out[b, 4 + meta.nc, a] = angle
                slot += 1
        return out


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


# -- a tiny real ONNX model -------------------------------------------------------------------------


class TinyYolo(torch.nn.Module):
    """A YOLOv8-shaped head without learning: bright areas of each grid cell score as 'plane'."""

    def __init__(self, imgsz: int, nc: int = 15) -> None:
        super().__init__()
        self.nc = nc
        centres, sizes = [], []
        for s in (8, 16, 32):
            n = imgsz // s
            ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
            centres.append(torch.stack([(xs.flatten() + 0.5) * s, (ys.flatten() + 0.5) * s]))
            sizes.append(torch.full((2, n * n), float(s)))
        self.register_buffer("centres", torch.cat(centres, 1))
        self.register_buffer("sizes", torch.cat(sizes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([torch.nn.functional.avg_pool2d(x, s).flatten(1) for s in (8, 16, 32)], 1)  # [B, A]
        b = x.shape[0]
        plane = torch.sigmoid((pooled - 0.7) * 40.0)[:, None]
        rest = (pooled[:, None] * 0.0).expand(-1, self.nc - 1, -1)
        boxes = torch.cat([self.centres, self.sizes])[None].expand(b, -1, -1)
        return torch.cat([boxes, plane, rest], 1)


class _MeanChannels(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.mean(1, keepdim=True))


def export_tiny_onnx(path: Path, imgsz: int = 64, channels: int = 1, task: str = "detect", dynamic: bool = True) -> Path:
    """:class:`TinyYolo` through rs-detect's own exporter (Ultralytics-style metadata, dynamic batch)."""
    model: torch.nn.Module = TinyYolo(imgsz) if channels == 1 else _MeanChannels(TinyYolo(imgsz))
    return export_torch_module_onnx(model, path, imgsz, channels, DOTA_CLASSES, task, dynamic=dynamic)


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 px, 1-channel, 15-class YOLOv8-shaped ONNX with a dynamic batch."""
    return export_tiny_onnx(tmp_path_factory.mktemp("models") / "tiny.onnx", imgsz=64)


# -- the fake TensorRT and the three kinds of batch export ------------------------------------------


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch):  # -> fake_tensorrt.FakeState
    """The fake TensorRT and pycuda (tests/fake_tensorrt.py), pycuda memory path."""
    import fake_tensorrt as ft

    return ft.install_pycuda_path(monkeypatch)


@pytest.fixture(scope="session")
def batch_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A truly dynamic export, a static one (the seed's trap), and the static one with dims edited to 'batch'."""
    from fake_tensorrt import edit_batch_dims, mini_onnx

    d = tmp_path_factory.mktemp("batch_models")
    out = {"dynamic": mini_onnx(d / "dynamic.onnx"), "static": mini_onnx(d / "static.onnx", dynamic=False)}
    out["edited"] = edit_batch_dims(out["static"], d / "edited.onnx")
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    """The fault-injection suite's case counts (tests/test_faults*.py), for the record."""
    import sys

    counts = getattr(sys.modules.get("fault_counts"), "COUNTS", None)
    if counts:
        terminalreporter.write_sep("-", "fault-injection cases run (case: times)")
        for case, n in sorted(counts.items()):
            terminalreporter.write_line(f"{case}: {n}")
