"""Band mapping, scene-wide scaling, nodata, and the two read strategies (windows vs row bands)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.enums import ColorInterp as CI

from conftest import FakeEngine, paint, planted_grid, write_tif
from rs_detect.config import Config
from rs_detect.errors import InputError
from rs_detect.io.prefetch import RawBatch, RowBandReads, window_batches
from rs_detect.io.reader import RasterSource, ScaleConfig, plan_bands
from rs_detect.io.tiling import iter_tiles
from rs_detect.pipeline import ScenePipeline
from rs_detect.preprocess import Normalizer


@pytest.mark.parametrize(
    ("count", "ci", "channels", "bands", "want"),
    [
        (1, (CI.gray,), 1, None, ((1,), "direct")),
        (3, (CI.red, CI.green, CI.blue), 1, None, ((1, 2, 3), "luminance")),
        (4, (CI.blue, CI.green, CI.red, CI.alpha), 1, None, ((3, 2, 1), "luminance")),  # BGRA order
        (1, (CI.palette,), 1, None, ((1,), "palette")),
        (2, (CI.gray, CI.undefined), 1, None, ((1,), "direct")),
        (1, (CI.gray,), 3, None, ((1,), "replicate")),
        (4, (CI.blue, CI.green, CI.red, CI.alpha), 3, None, ((3, 2, 1), "direct")),
        (4, (CI.gray,) * 4, 1, (2,), ((2,), "direct")),
        (4, (CI.gray,) * 4, 1, (4, 3, 2), ((4, 3, 2), "luminance")),
        (4, (CI.gray,) * 4, 3, (2,), ((2,), "replicate")),
    ],
)
def test_band_plan_rule(count: int, ci: tuple, channels: int, bands: tuple | None, want: tuple) -> None:
    plan = plan_bands(count, ci, channels, bands, "s.tif")
    assert (plan.indexes, plan.combine) == want


def test_band_plan_refusals() -> None:
    with pytest.raises(InputError, match="band 5 out of range"):
        plan_bands(4, (CI.gray,) * 4, 1, (5,), "s.tif")
    with pytest.raises(InputError, match="takes 4 channels"):
        plan_bands(1, (CI.gray,), 4, None, "s.tif")


def normalize(path: Path, **kw: object) -> tuple[torch.Tensor, RasterSource]:
    src = RasterSource(path, **kw)
    tile = next(iter_tiles(src.width, src.height, 256, 32))
    with ThreadPoolExecutor(2) as pool:
        (batch,) = list(window_batches(src, [tile], pool, 4, 256, pin=False, depth=1))
    assert isinstance(batch, RawBatch)
    return Normalizer(src, torch.device("cpu"), torch.float32, fill_value=0.0)(batch)[0], src


def test_uint16_percentile_stretch_and_nodata_fill(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(1000, 3000, (200, 220)).astype(np.uint16)
    img[:20, :20] = 0  # nodata
    x, src = normalize(write_tif(tmp_path / "u16.tif", img, nodata=0))
    lo, hi = np.percentile(img[img > 0], (2, 98))
    assert src.scale.method == "percentile"
    assert src.scale.low == pytest.approx(lo, rel=0.01) and src.scale.high == pytest.approx(hi, rel=0.01)
    want = np.clip((img.astype(np.float32) - src.scale.low) / (src.scale.high - src.scale.low), 0, 1)
    want[:20, :20] = 0.0
    np.testing.assert_allclose(x[0, :200, :220].numpy(), want, atol=1e-5)
    assert float(x[0, 200:, :].abs().max()) == 0.0 and float(x[0, :, 220:].abs().max()) == 0.0  # padding


def test_fixed_scale_and_float_nan(tmp_path: Path) -> None:
    img = np.linspace(-10, 30, 100 * 100, dtype=np.float32).reshape(100, 100)
    img[5, 5] = np.nan
    x, src = normalize(write_tif(tmp_path / "f.tif", img), scale=ScaleConfig("fixed", 0.0, 20.0))
    assert (src.scale.low, src.scale.high) == (0.0, 20.0)
    np.testing.assert_allclose(x[0, 50, :100].numpy(), np.clip(img[50] / 20.0, 0, 1), atol=1e-6)
    assert float(x[0, 5, 5]) == 0.0


def test_rgb_luminance_and_palette(tmp_path: Path) -> None:
    rgb = np.stack([np.full((64, 64), v, dtype=np.uint8) for v in (200, 100, 50)])
    x, _ = normalize(write_tif(tmp_path / "rgb.tif", rgb, photometric="RGB"))
    assert float(x[0, 0, 0]) == pytest.approx((0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255, abs=1e-5)
    pal = np.zeros((64, 64), dtype=np.uint8)
    pal[:, 32:] = 1
    path = write_tif(tmp_path / "pal.tif", pal)
    with rasterio.open(path, "r+") as ds:
        ds.write_colormap(1, {0: (0, 0, 0, 255), 1: (255, 255, 255, 255)})
    x, src = normalize(path)
    assert src.plan.combine == "palette"
    assert float(x[0, 0, 0]) == 0.0 and float(x[0, 0, 40]) == pytest.approx(1.0)


def test_striped_row_bands_give_the_same_tiles_as_windows(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (700, 900), dtype=np.uint8)
    src = RasterSource(write_tif(tmp_path / "striped.tif", img, tiled=False, blockysize=1))
    assert src.is_striped
    tiles = list(iter_tiles(src.width, src.height, 256, 48))
    by_window = [src.read_raw(t.window)[0] for t in tiles]
    with ThreadPoolExecutor(3) as pool:
        by_band = list(RowBandReads(src, pool, 3)(tiles))
    assert [r.tile.index for r in by_band] == [t.index for t in tiles]
    for a, b in zip(by_window, by_band):
        np.testing.assert_array_equal(a, b.data)


def test_striped_and_tiled_scenes_give_the_same_detections(tmp_path: Path) -> None:
    objects = planted_grid()
    img = paint((900, 1000), objects)
    cfg = Config(tile_size=256, overlap=64, read_threads=3)
    tiled = ScenePipeline(FakeEngine(256), cfg).run(write_tif(tmp_path / "t.tif", img))
    striped = ScenePipeline(FakeEngine(256), cfg).run(write_tif(tmp_path / "s.tif", img, tiled=False, blockysize=16))
    assert len(tiled.detections) == len(objects)
    assert torch.equal(tiled.detections.boxes, striped.detections.boxes)


def test_all_nodata_tiles_are_skipped_and_counted(tmp_path: Path) -> None:
    img = np.zeros((600, 600), dtype=np.uint8)
    img[500:, 500:] = 7
    result = ScenePipeline(FakeEngine(256), Config(tile_size=256, overlap=32)).run(write_tif(tmp_path / "nd.tif", img, nodata=0))
    assert result.stats.tiles_total == 9
    assert result.stats.tiles_read == 1 and result.stats.tiles_skipped == 8
