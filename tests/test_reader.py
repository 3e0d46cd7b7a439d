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


def test_stretch_sample_windows_decode_one_block_each_and_match_the_scene(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    img = (rng.gamma(2.0, 400.0, (2600, 3000)) + 300).clip(0, 65535).astype(np.uint16)
    for layout in ({"tiled": True}, {"tiled": False, "blockysize": 8}):
        src = RasterSource(write_tif(tmp_path / f"s{len(layout)}.tif", img, **layout))
        jobs = src._sample_bands()
        bh, bw = src.block_shapes[0]
        assert len(jobs) == 8 and all(len(cols) == 8 for _, _, cols in jobs)
        for y, h, cols in jobs:
            assert y // bh == (y + h - 1) // bh or src.is_striped  # one row of blocks per window
            for x, w in cols:
                assert src.is_striped or x // bw == (x + w - 1) // bw  # one block per window
                assert 0 <= x and x + w <= src.width and 0 <= y and y + h <= src.height
        lo, hi = np.percentile(img, (2, 98))
        assert src.scale.low == pytest.approx(lo, rel=0.03) and src.scale.high == pytest.approx(hi, rel=0.03)
        src.close()


def test_block_cache_covers_a_tile_row_of_blocks_and_is_bounded(tmp_path: Path) -> None:
    tiled = RasterSource(write_tif(tmp_path / "t.tif", np.zeros((300, 40000), dtype=np.uint16), blockxsize=512, blockysize=512))
    # (1024 + 2 * 512) rows x 40000 columns x 2 bytes, plus a quarter for LRU slack
    assert tiled.block_cache_bytes(1024) == 2048 * 40000 * 2 * 5 // 4
    small = RasterSource(write_tif(tmp_path / "small.tif", np.zeros((300, 300), dtype=np.uint8)))
    assert small.block_cache_bytes(1024) == 32 << 20  # never below GDAL's working minimum
    striped = RasterSource(write_tif(tmp_path / "s.tif", np.zeros((300, 4000), dtype=np.uint8), tiled=False))
    assert striped.block_cache_bytes(1024) is None  # row bands decode each strip once anyway


def test_pipeline_raises_gdal_block_cache_while_reading_and_restores_it(tmp_path: Path) -> None:
    path = write_tif(tmp_path / "t.tif", paint((600, 700), planted_grid()))
    seen: list[str | None] = []

    class Spy(FakeEngine):
        def _infer(self, images):  # type: ignore[no-untyped-def]
            seen.append(rasterio.env.get_gdal_config("GDAL_CACHEMAX"))
            return super()._infer(images)

    before = rasterio.env.get_gdal_config("GDAL_CACHEMAX")
    ScenePipeline(Spy(256), Config(tile_size=256, overlap=32)).run(path)
    assert seen and all(int(v) == 32 << 20 for v in seen)
    assert rasterio.env.get_gdal_config("GDAL_CACHEMAX") == before


def test_slots_are_filled_whole_from_uninitialised_memory(tmp_path: Path) -> None:
    from rs_detect.io.prefetch import _fill

    rng = np.random.default_rng(5)
    for shape in ((300, 400), (200, 400)):  # full tiles; tiles padded below (the scene is shorter than a tile)
        img = rng.integers(1, 255, shape, dtype=np.uint8)
        src = RasterSource(write_tif(tmp_path / f"t{shape[0]}.tif", img))
        tile = next(iter_tiles(400, shape[0], 256, 32))
        data = np.full((1, 256, 256), 77, dtype=np.uint8)  # garbage, as torch.empty leaves it
        valid = np.ones((256, 256), dtype=bool)
        empty, needs_mask = _fill(src, tile, data, valid)
        h, w = tile.height, tile.width
        np.testing.assert_array_equal(data[0, :h, :w], img[:h, :w])
        assert not empty
        if h == 256:
            assert not needs_mask
        else:
            assert needs_mask and h == 200 and not data[0, h:, :].any()
            assert valid[:h, :w].all() and not valid[h:, :].any()
        src.close()


def test_full_tiles_decode_into_the_callers_buffer(tmp_path: Path) -> None:
    img = np.arange(300 * 400, dtype=np.uint16).reshape(300, 400)
    src = RasterSource(write_tif(tmp_path / "t.tif", img))
    tile = next(iter_tiles(400, 300, 256, 32))
    buf = np.empty((1, 256, 256), dtype=np.uint16)
    raw, _ = src.read_raw(tile.window, out=buf)
    assert raw is buf and np.array_equal(buf[0], img[:256, :256])
    wrong = np.empty((1, 256, 256), dtype=np.uint8)  # not the file's dtype: read into a new array
    raw, _ = src.read_raw(tile.window, out=wrong)
    assert raw is not wrong and raw.dtype == np.uint16


def test_heap_trimmer_trims_at_most_once_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    from rs_detect import memory

    calls: list[int] = []
    monkeypatch.setattr(memory, "_TRIM", lambda pad: calls.append(pad) or 1)
    slow = memory.HeapTrimmer(every_s=3600)
    for _ in range(5):
        slow()
    assert calls == [] and slow.trims == 0
    eager = memory.HeapTrimmer(every_s=0.0)
    for _ in range(3):
        eager()
    assert calls == [0, 0, 0] and eager.trims == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_upload_stream_gives_the_cpu_input(tmp_path: Path) -> None:
    """The upload/scaling stream hands the engine's stream the same input the CPU path computes."""
    rng = np.random.default_rng(9)
    img = rng.integers(300, 3800, (700, 900)).astype(np.uint16)
    img[:100, :100] = 0
    src = RasterSource(write_tif(tmp_path / "u16.tif", img, nodata=0))
    cpu = Normalizer(src, torch.device("cpu"), torch.float32)
    gpu = Normalizer(src, torch.device("cuda"), torch.float16)
    with ThreadPoolExecutor(2) as pool:
        batches = list(window_batches(src, iter_tiles(900, 700, 256, 32), pool, 4, 256, pin=True, depth=2))
    outs = [gpu(b) for b in batches]  # all queued before any is read back
    for b, out in zip(batches, outs):
        assert out.dtype == torch.float16 and out.device.type == "cuda"
        np.testing.assert_allclose(out.float().cpu().numpy(), cpu(b).numpy(), atol=1e-3)


# -- the stretch measured alongside the first reads ---------------------------------------------------


def test_background_scale_matches_and_overlaps_the_first_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline starts reading tiles before the stretch is known, and gets the same stretch."""
    import threading

    rng = np.random.default_rng(7)
    path = write_tif(tmp_path / "s.tif", (rng.gamma(2.0, 300.0, (1300, 1500)) + 200).astype(np.uint16))
    want = RasterSource(path).scale
    assert want.method == "percentile"
    assert RasterSource(path, background_scale=True).scale == want

    # the statistics wait until a tile has been read: a pipeline that measured them first would hang
    first_read = threading.Event()
    real_sample, real_read = RasterSource._stats_sample, RasterSource.read_raw

    def sample_after_a_read(self: RasterSource, ds: object) -> np.ndarray:
        assert first_read.wait(timeout=20), "no tile was read while the stretch was being measured"
        return real_sample(self, ds)

    def read(self: RasterSource, *a: object, **k: object) -> object:
        first_read.set()
        return real_read(self, *a, **k)

    monkeypatch.setattr(RasterSource, "_stats_sample", sample_after_a_read)
    monkeypatch.setattr(RasterSource, "read_raw", read)
    res = ScenePipeline(FakeEngine(imgsz=512), Config(batch_size=2, read_threads=2)).run(path)
    assert res.metadata["scale"]["low"] == want.low and res.metadata["scale"]["high"] == want.high
    assert res.stats.tiles_read == res.stats.tiles_total > 4


def test_background_scale_error_reaches_the_caller_as_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_tif(tmp_path / "s.tif", np.full((600, 700), 900, dtype=np.uint16))

    def broken(self: RasterSource, ds: object) -> np.ndarray:
        raise InputError(f"{self.path}: read failed while measuring the scene's value range (boom)")

    monkeypatch.setattr(RasterSource, "_stats_sample", broken)
    src = RasterSource(path, background_scale=True)  # opening does not wait for the statistics
    with pytest.raises(InputError, match="s.tif: read failed while measuring"):
        src.scale
    src.close()
    with pytest.raises(InputError, match="measuring the scene's value range"):
        ScenePipeline(FakeEngine(imgsz=512), Config(batch_size=2)).run(path)
    # uint8 needs no statistics: nothing runs in the background
    assert RasterSource(write_tif(tmp_path / "u8.tif", np.zeros((60, 70), dtype=np.uint8)), background_scale=True)._scale_job is None
