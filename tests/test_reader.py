"""Band mapping, scene-wide scaling, nodata, and the slab reader (each block decoded once)."""

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
from rs_detect.errors import ConfigError, InputError
from rs_detect.executor import measure_scale
from rs_detect.io.prefetch import SlabReader, reset_slab_peak, slab_memory, window_batches
from rs_detect.io.reader import RasterSource, ScaleConfig, add_counts, percentiles, percentiles_from_counts, plan_bands, value_counts
from rs_detect.io.tiling import iter_tiles
from rs_detect.pipeline import ScenePipeline
from rs_detect.preprocess import Normalizer
from rs_detect.types import RawBatch


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


@pytest.mark.parametrize(
    ("ci", "descriptions", "want"),
    [
        ((CI.gray, CI.undefined), ("B04 red (665 nm)", "B08 nir (842 nm)"), (1,)),  # sen2ships' layout
        ((CI.gray, CI.undefined), ("B08 nir (842 nm)", "B04 red (665 nm)"), (2,)),
        ((CI.undefined, CI.red), (None, None), (2,)),
        ((CI.gray, CI.undefined), ("nir", "infrared"), (1,)),  # "infrared" is no red band: band 1
        ((CI.gray, CI.undefined), ("B4", None), (1,)),
    ],
)
def test_band_plan_picks_the_red_band_of_a_multispectral_file(ci: tuple, descriptions: tuple, want: tuple) -> None:
    plan = plan_bands(2, ci, 1, None, "s.tif", descriptions)
    assert (plan.indexes, plan.combine) == (want, "direct")
    assert plan_bands(2, ci, 1, (1,), "s.tif", descriptions).indexes == (1,)  # --bands wins


def test_band_plan_refusals() -> None:
    with pytest.raises(InputError, match="band 5 out of range"):
        plan_bands(4, (CI.gray,) * 4, 1, (5,), "s.tif")
    with pytest.raises(InputError, match="takes 4 channels"):
        plan_bands(1, (CI.gray,), 4, None, "s.tif")


def cut_batches(src: RasterSource, tiles, pool: ThreadPoolExecutor, *args: object, **kwargs: object):
    """``window_batches`` with a cutter pool of two threads of its own (the executor's, in a run)."""
    with ThreadPoolExecutor(2, thread_name_prefix="rs-cut") as cutters:
        yield from window_batches(src, tiles, pool, *args, cutters=cutters, **kwargs)


def normalize(path: Path, **kw: object) -> tuple[torch.Tensor, RasterSource]:
    src = RasterSource(path, **kw)
    tile = next(iter_tiles(src.width, src.height, 256, 32))
    with ThreadPoolExecutor(2) as pool:
        (batch,) = list(cut_batches(src, [tile], pool, 4, 256, pin=False, depth=1, threads=2))
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


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int8, np.int16])
def test_percentiles_from_counts_equal_numpys_to_the_last_bit_whole_or_added_up(dtype: type) -> None:
    rng = np.random.default_rng(7)
    info = np.iinfo(dtype)
    for i in range(400):
        lo, hi = sorted(int(v) for v in rng.integers(info.min, info.max + 1, 2))
        values = rng.integers(lo, (lo if i % 9 == 0 else hi) + 1, int(rng.integers(1, 5000))).astype(dtype)
        qs = [0.0, 100.0] if i % 5 == 0 else sorted(rng.uniform(0, 100, 3).tolist())
        got, want = percentiles(values, qs), np.percentile(values, qs)
        assert got.dtype == want.dtype and np.array_equal(got, want), (values.size, qs, got, want)
        # the background stretch: each sample job counts its part, and the counts are added
        parts = np.array_split(values, int(rng.integers(1, 9)))
        base, counts = add_counts([c for c in map(value_counts, parts) if c is not None])
        assert counts.sum() == values.size
        assert np.array_equal(percentiles_from_counts(base, counts, np.dtype(dtype), qs), want)
    floats = rng.normal(size=1000).astype(np.float32)  # anything else is numpy's own
    assert value_counts(floats) is None
    assert np.array_equal(percentiles(floats, [2.0, 98.0]), np.percentile(floats, [2.0, 98.0]))


def scaled_by_arithmetic(raw: torch.Tensor, valid: torch.Tensor | None, p: torch.Tensor, dtype: torch.dtype, channels: int) -> torch.Tensor:
    """What Normalizer.apply computes, written out pixel by pixel in float32 (the stretch, the fill)."""
    x = raw.float().sub_(p[0]).mul_(p[1]).clamp_(0.0, 1.0).expand(-1, channels, -1, -1)
    if valid is not None:
        x = torch.where(valid[:, None], x, p[2])
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.uint16, torch.int16])
@pytest.mark.parametrize("out", [torch.float16, torch.float32])
def test_scaling_through_a_table_gives_the_arithmetics_numbers_exactly(dtype: torch.dtype, out: torch.dtype) -> None:
    info = torch.iinfo(dtype)
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(info.min, info.max + 1, (3, 1, 48, 48), generator=g, dtype=torch.int64).to(dtype)
    raw[0, 0, 0, :2] = torch.tensor([info.min, info.max])  # both ends of the table
    valid = torch.rand(3, 48, 48, generator=g) > 0.3
    span = info.max - info.min
    for combine, channels in (("direct", 1), ("replicate", 3)):
        norm = Normalizer.__new__(Normalizer)
        norm.combine, norm.channels, norm.dtype, norm.lut = combine, channels, out, None
        for low, high in ((info.min, info.max), (info.min + 0.3 * span, info.min + 0.31 * span), (info.min + 1.5, info.min + 7.25)):
            p = torch.tensor([low, 1.0 / (high - low), 0.37])
            for v in (None, valid):
                got = norm.apply(raw, v, p)
                want = scaled_by_arithmetic(raw, v, p, out, channels)
                assert got.dtype == out and got.shape == want.shape and torch.equal(got, want)


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


def _all_batches(src: RasterSource, tiles: list, size: int, batch: int = 3, threads: int = 3) -> list:
    with ThreadPoolExecutor(threads) as pool:
        return list(cut_batches(src, tiles, pool, batch, size, pin=False, depth=2, threads=threads))


@pytest.mark.parametrize("private_mapping", [True, False], ids=["platform", "no-mmap"])
def test_slab_arrays_are_counted_while_any_view_lives(monkeypatch, private_mapping: bool) -> None:
    """A slab is an anonymous private mapping (a plain array where Python's mmap has none, as on
    Windows: forced in the second case), writable, counted in slab_memory() until its last view is gone."""
    import gc
    import sys

    import rs_detect.io.prefetch as prefetch
    import rs_detect.memory as memory

    if not private_mapping:
        monkeypatch.setattr(memory, "_ANON_FLAGS", None)
    elif sys.platform.startswith("linux"):
        assert memory._ANON_FLAGS is not None  # Linux slabs are mappings of their own
    gc.collect()  # slabs of earlier tests still waiting for the collector would be freed mid-test
    before = slab_memory()["live"]
    slab = prefetch.mapped_array((2, 30, 40), np.dtype(np.uint16))
    slab[:] = 7
    view = slab[:, 5:10, :20]
    assert slab.shape == (2, 30, 40) and int(view.sum()) == 7 * 2 * 5 * 20
    assert slab_memory()["live"] == before + 2 * 30 * 40 * 2
    del slab
    gc.collect()
    assert slab_memory()["live"] == before + 2 * 30 * 40 * 2  # the view holds it
    del view
    gc.collect()
    assert slab_memory()["live"] == before


@pytest.mark.parametrize("tiled", [True, False], ids=["tiled", "striped"])
def test_slab_memory_is_bounded_by_the_width_never_the_height_and_freed(tmp_path: Path, tiled: bool) -> None:
    """The reader holds a few rows of windows of the scene's width, whatever its height, and
    unmaps every slab when the scene is done (memory must not grow from scene to scene)."""
    width, size, overlap, batch, depth = 900, 256, 32, 3, 2
    layout = {"tiled": True, "blockxsize": 128, "blockysize": 128} if tiled else {"tiled": False, "blockysize": 8}
    peaks = []
    for height in (1300, 8000):
        img = np.random.default_rng(height).integers(1, 65535, (2, height, width), dtype=np.uint16)
        path = write_tif(tmp_path / f"h{height}.tif", img, **layout)
        src = RasterSource(path, channels=2)
        tiles = list(iter_tiles(width, height, size, overlap))
        slab_rows = SlabReader(src, None, 3).rows  # type: ignore[arg-type]  # the pool is not used to size
        reset_slab_peak()
        with ThreadPoolExecutor(3) as pool:
            n = sum(b.size for b in cut_batches(src, tiles, pool, batch, size, pin=False, depth=depth, threads=3,
                                                    stride=size - overlap))
        src.close()
        assert n == len(tiles)
        mem = slab_memory()
        assert mem["live"] == 0  # every slab unmapped once the scene is done
        peaks.append(mem["peak"])
    # (depth + 1) batches of 3 tiles span at most 3 strides of rows of 4 windows; the next row's
    # read-ahead adds a stride, the window a tile, and rounding to whole slabs a slab at each end (one more
    # for slack): a bound that the tall scene's height does not enter, and under half of that scene
    stride = size - overlap
    bound = (4 * stride + size + 3 * slab_rows) * width * 2 * 2
    assert 0 < peaks[0] <= bound and 0 < peaks[1] <= bound
    assert bound < 8000 * width * 2 * 2 / 2


@pytest.mark.parametrize(
    "layout",
    [
        {"tiled": True, "blockxsize": 128, "blockysize": 128},
        {"tiled": True, "blockxsize": 256, "blockysize": 512},
        {"tiled": False, "blockysize": 1},
        {"tiled": False, "blockysize": 16},
        {"tiled": False, "blockysize": 1300},  # one strip taller than the largest slab
        {"tiled": True, "blockxsize": 512, "blockysize": 1296},  # blocks taller than the largest slab
    ],
    ids=["tiled128", "tiled256x512", "strip1", "strip16", "one-strip", "tall-blocks"],
)
def test_slabs_give_every_window_as_a_window_read_does(tmp_path: Path, layout: dict) -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(1, 65535, (2, 1300, 900), dtype=np.uint16)
    img[:, 1000:, :200] = 0  # nodata: the mask travels with the pixels
    src = RasterSource(write_tif(tmp_path / "s.tif", img, nodata=0, **layout), channels=2)
    assert src.plan.indexes == (1, 2)
    tiles = list(iter_tiles(src.width, src.height, 320, 48))
    batches = _all_batches(src, tiles, 320)
    got = [(t, b.data[i].numpy(), None if b.valid is None else b.valid[i].numpy()) for b in batches for i, t in enumerate(b.tiles)]
    assert [t.index for t, *_ in got] == [t.index for t in tiles]  # scene order, nothing lost
    for t, data, valid in got:
        want, mask = src.read_raw(t.window)
        h, w = t.height, t.width
        np.testing.assert_array_equal(data[:, :h, :w], want)
        assert not data[:, h:, :].any() and not data[:, :, w:].any()  # padding is zero, not garbage
        if valid is None:  # a batch of all-valid tiles carries no mask
            assert mask is None or mask.all()
        else:
            np.testing.assert_array_equal(valid[:h, :w], mask if mask is not None else True)
            assert not valid[h:, :].any() and not valid[:, w:].any()
    assert any(v is not None and not v.all() for *_, v in got)  # the nodata corner was masked


def test_batches_allocate_a_mask_only_where_a_slot_can_have_invalid_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = np.random.default_rng(4).integers(1, 255, (700, 900), dtype=np.uint8)
    masks: list[bool] = []
    real = torch.empty

    def empty(*shape: object, **kw: object) -> torch.Tensor:
        if kw.get("dtype") is torch.bool:
            masks.append(True)
        return real(*shape, **kw)

    monkeypatch.setattr("rs_detect.io.prefetch.torch.empty", empty)
    src = RasterSource(write_tif(tmp_path / "plain.tif", img))
    full = [t for t in iter_tiles(900, 700, 256, 32) if (t.height, t.width) == (256, 256)]
    batches = _all_batches(src, full, 256)
    assert batches and all(b.valid is None for b in batches) and not masks  # no nodata, no padding: no mask at all
    src = RasterSource(write_tif(tmp_path / "nd.tif", img, nodata=0))
    batches = _all_batches(src, full, 256)
    assert len(masks) == len(batches)  # a scene with a mask: every batch gets a slot for it
    with ThreadPoolExecutor(1) as pool:  # a padded tile without a mask slot is refused, not left as garbage
        reader = SlabReader(RasterSource(write_tif(tmp_path / "small.tif", img[:200])), pool, 1)
        tile = next(iter_tiles(900, 200, 256, 32))
        reader.request(reader.span(tile))
        with pytest.raises(ValueError, match="needs a mask slot"):
            reader.cut(tile, reader.hold(tile), np.empty((1, 256, 256), np.uint8), None)


def test_each_block_is_decoded_once_in_whole_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Overlapping windows share their blocks: the decode reads tile the scene exactly, block-aligned."""
    img = np.random.default_rng(2).integers(0, 255, (1500, 1700), dtype=np.uint8)
    for layout in ({"tiled": True, "blockxsize": 128, "blockysize": 128}, {"tiled": False, "blockysize": 8}):
        src = RasterSource(write_tif(tmp_path / f"s{len(layout)}.tif", img, **layout))
        reads: list[tuple[int, int, int, int]] = []
        real = RasterSource.read_raw
        monkeypatch.setattr(RasterSource, "read_raw", lambda self, w, out=None: reads.append(
            (int(w.col_off), int(w.row_off), int(w.width), int(w.height))) or real(self, w, out))
        tiles = list(iter_tiles(src.width, src.height, 512, 128))
        assert sum(len(b.tiles) for b in _all_batches(src, tiles, 512)) == len(tiles) == 20
        monkeypatch.setattr(RasterSource, "read_raw", real)
        count = np.zeros(img.shape, dtype=np.int32)
        bh, bw = src.block_shapes[0]
        for x, y, w, h in reads:
            count[y : y + h, x : x + w] += 1
            assert y % bh == 0 and (y + h) % bh in (0, src.height % bh)  # whole blocks (or strips)
            assert x % bw == 0 or src.is_striped
        assert (count == 1).all()  # every pixel decoded exactly once
        src.close()


def test_slabs_in_memory_stay_bounded_by_two_rows_of_windows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = np.random.default_rng(3).integers(0, 255, (8000, 600), dtype=np.uint8)
    src = RasterSource(write_tif(tmp_path / "tall.tif", img, blockxsize=256, blockysize=256))
    live: list[int] = []
    real = SlabReader.request

    def request(self: SlabReader, indexes: range) -> None:
        for i in indexes:  # one at a time, to see the peak
            real(self, [i])
            live.append(len(self.slabs))

    monkeypatch.setattr(SlabReader, "request", request)
    tiles = list(iter_tiles(src.width, src.height, 512, 64))
    assert sum(len(b.tiles) for b in _all_batches(src, tiles, 512, batch=2)) == len(tiles)
    assert len(live) == -(-8000 // 256)  # every slab requested once
    # batch 2 = one row of windows (stride 448); depth 2: three rows in flight, two tile heights read ahead
    bound = (3 * 448 + 512 + 2 * 512) // 256 + 2
    assert max(live) <= bound < len(live) / 2


def test_finished_slabs_arrays_are_reused_and_every_window_still_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slab's arrays go to the next slab of its height: a few arrays serve the whole scene (no
    allocation per slab, which left glibc's heap holding freed slabs), and no stale pixel leaks."""
    rng = np.random.default_rng(4)
    img = rng.integers(1, 60000, (6000, 700)).astype(np.uint16)
    img[3000:3100, :] = 0  # nodata rows: the reused masks must be rewritten too
    path = write_tif(tmp_path / "tall.tif", img, nodata=0, blockxsize=256, blockysize=256)
    src = RasterSource(path)
    arrays: list[int] = []
    real = SlabReader.request

    def request(self: SlabReader, indexes: range) -> None:
        real(self, indexes)
        arrays.extend(id(self.slabs[i].data) for i in indexes if i in self.slabs)

    monkeypatch.setattr(SlabReader, "request", request)
    tiles = list(iter_tiles(src.width, src.height, 512, 64))
    batches = [b for b in _all_batches(src, tiles, 512, batch=2)]
    assert len(arrays) == -(-6000 // 256) and len(set(arrays)) <= 12 < len(arrays)
    with rasterio.open(path) as ds:
        for b in batches:
            for k, t in enumerate(b.tiles):
                want = ds.read(1, window=t.window)
                got = b.data[k, 0, : t.height, : t.width].numpy()
                np.testing.assert_array_equal(got, want)
                if b.valid is not None:
                    np.testing.assert_array_equal(b.valid[k, : t.height, : t.width].numpy(), want != 0)


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
        jobs = src.sample_plan()
        bh, bw = src.block_shapes[0]
        if src.is_striped:  # a job per grid row: one full-width read for its 8 windows
            assert len(jobs) == 8 and all(len(cols) == 8 for _, _, cols in jobs)
        else:  # a job per window, so that all the reader threads share them
            assert len(jobs) == 64 and all(len(cols) == 1 for _, _, cols in jobs)
        for y, h, cols in jobs:
            assert y // bh == (y + h - 1) // bh or src.is_striped  # one row of blocks per window
            for x, w in cols:
                assert src.is_striped or x // bw == (x + w - 1) // bw  # one block per window
                assert 0 <= x and x + w <= src.width and 0 <= y and y + h <= src.height
        lo, hi = np.percentile(img, (2, 98))
        assert src.scale.low == pytest.approx(lo, rel=0.03) and src.scale.high == pytest.approx(hi, rel=0.03)
        src.close()


def test_striped_stretch_sample_reads_a_few_strips_at_a_time_and_samples_the_windows(tmp_path: Path, monkeypatch) -> None:
    """A striped grid row is read in bands of whole strips of about STATS_CHUNK_BYTES (not 256 rows of
    the full width at once), and the sample holds exactly the pixels of the plan's windows."""
    import rs_detect.io.reader as reader_mod

    rng = np.random.default_rng(4)
    img = rng.integers(300, 60000, (2600, 3000), dtype=np.uint16)
    src = RasterSource(write_tif(tmp_path / "striped.tif", img, tiled=False, blockysize=8))
    row_bytes = 3000 * 2
    monkeypatch.setattr(reader_mod, "STATS_CHUNK_BYTES", row_bytes * 20)  # 20 rows: bands of 2 strips (16 rows)
    real = src._dataset()
    heights: list[int] = []
    outs: list[object] = []

    class Spy:
        def read(self, *args, window=None, **kwargs):
            heights.append(int(window.height))
            outs.append(kwargs.get("out"))
            return real.read(*args, window=window, **kwargs)

    monkeypatch.setattr(src, "_dataset", lambda: Spy())
    jobs = src.sample_plan()
    sample = np.concatenate([src._sample_part(job) for job in jobs])
    want = np.concatenate([img[y : y + h, x : x + w].ravel() for y, h, cols in jobs for x, w in cols])
    assert np.array_equal(np.sort(sample), np.sort(want))
    assert heights and max(heights) == 16 and sum(heights) == sum(h for _, h, _ in jobs)
    # no mask: every band goes into its job's own scratch mapping (not the heap, where it stays resident)
    import mmap

    def base(a: object) -> object:
        while isinstance(a, np.ndarray) and a.base is not None:
            a = a.base
        return a.obj if isinstance(a, memoryview) else a

    assert all(isinstance(base(o), mmap.mmap) for o in outs)
    src.close()


def test_cuts_fill_slots_whole_from_uninitialised_memory(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    for shape in ((300, 400), (200, 400)):  # full tiles; tiles padded below (the scene is shorter than a tile)
        img = rng.integers(1, 255, shape, dtype=np.uint8)
        src = RasterSource(write_tif(tmp_path / f"t{shape[0]}.tif", img))
        tile = next(iter_tiles(400, shape[0], 256, 32))
        with ThreadPoolExecutor(2) as pool:
            reader = SlabReader(src, pool, 2)
            reader.request(reader.span(tile))
            data = np.full((1, 256, 256), 77, dtype=np.uint8)  # garbage, as torch.empty leaves it
            valid = np.ones((256, 256), dtype=bool)
            empty, needs_mask = reader.cut(tile, reader.hold(tile), data, valid)
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
    slab = np.zeros((1, 256, 400), dtype=np.uint16)  # a strided view (a slab's columns): written in place
    view = slab[:, :, 100:356]
    raw, _ = src.read_raw(rasterio.windows.Window(100, 0, 256, 256), out=view)
    assert raw is view and np.array_equal(slab[0, :, 100:356], img[:256, 100:356]) and not slab[0, :, :100].any()


def test_handles_for_reader_threads_are_opened_up_front_and_taken_on_first_read(tmp_path: Path) -> None:
    img = np.arange(600 * 700, dtype=np.uint16).reshape(600, 700)
    src = RasterSource(write_tif(tmp_path / "t.tif", img), handles=3, scale=ScaleConfig("fixed", 0.0, 1.0))
    assert len(src._handles) == 4 and len(src._spare) == 3  # the main thread's, and three spares
    import threading

    together = threading.Barrier(3)  # three threads for sure (a pool starts threads only as it needs them)
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda _: (together.wait(), src._dataset())[1], range(3)))
        assert len({id(ds) for ds in got}) == 3 and not src._spare  # each took a spare
        list(cut_batches(src, list(iter_tiles(700, 600, 256, 32)), pool, 2, 256, pin=False, depth=1, threads=3))
    assert len(src._handles) == 4  # reading the scene on those threads opened no other handle
    src.close()
    assert not src._handles


def test_reader_threads_default_to_the_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rs_detect import config as config_module
    from rs_detect.config import auto_read_threads

    assert [auto_read_threads("cuda", n) for n in (2, 8, 16, 64)] == [2, 4, 12, 16]
    assert [auto_read_threads("cpu", n) for n in (1, 2, 16)] == [1, 2, 4]
    monkeypatch.setattr(config_module, "available_cores", lambda: 6)
    assert ScenePipeline(FakeEngine(256), Config()).read_threads == 4  # the CPU: up to 4
    assert ScenePipeline(FakeEngine(256), Config(read_threads=3)).read_threads == 3
    with pytest.raises(ConfigError, match="read_threads"):
        Config(read_threads=0)


def test_prefetch_defaults_to_the_device_and_the_batch() -> None:
    """Unset: about 48 tiles ahead on a GPU (3 batches of 16: YOLOv8n fell from 0.83 to 0.72-0.74 of
    engine speed with 2; 1 of 32, which keeps 128 tiles in flight with the three batches behind it); 2
    batches on the CPU."""
    from rs_detect.config import auto_prefetch

    assert [auto_prefetch(d) for d in ("cuda", "cuda:1", "cpu")] == [3, 3, 2]
    assert [auto_prefetch("cuda", b) for b in (1, 8, 16, 24, 32, 64)] == [48, 6, 3, 2, 1, 1]
    assert [auto_prefetch("cpu", b) for b in (1, 32)] == [2, 2]
    assert ScenePipeline(FakeEngine(256), Config()).prefetch == 2  # FakeEngine is on the CPU
    assert ScenePipeline(FakeEngine(256), Config(prefetch=5)).prefetch == 5
    with pytest.raises(ConfigError, match="prefetch"):
        Config(prefetch=0)


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


def test_a_scene_run_trims_the_heap_once_its_threads_are_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the scenes of a batch run the freed slabs' pages go back to the OS: one trim after the pools end."""
    import threading

    from rs_detect import executor as executor_module

    seen: list[list[str]] = []
    monkeypatch.setattr(executor_module, "trim_heap", lambda: seen.append([t.name for t in threading.enumerate()]) or True)
    scene = write_tif(tmp_path / "s.tif", np.random.default_rng(2).integers(0, 255, (600, 700)).astype(np.uint8))
    ScenePipeline(FakeEngine(256), Config(read_threads=2)).run(scene)
    assert len(seen) == 1
    assert not [n for n in seen[0] if n.startswith(("rs-read", "rs-cut", "rs-post"))]


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
        batches = list(cut_batches(src, iter_tiles(900, 700, 256, 32), pool, 4, 256, pin=True, depth=2, threads=2))
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
    with ThreadPoolExecutor(2) as pool:
        assert measure_scale(RasterSource(path), pool).result(timeout=30) == want

    # the statistics wait until a tile has been read: a pipeline that measured them first would hang
    first_read = threading.Event()
    real_sample, real_read = RasterSource._sample_part, RasterSource.read_raw

    def sample_after_a_read(self: RasterSource, job: object) -> np.ndarray:
        assert first_read.wait(timeout=20), "no tile was read while the stretch was being measured"
        return real_sample(self, job)  # type: ignore[arg-type]

    def read(self: RasterSource, *a: object, **k: object) -> object:
        first_read.set()
        return real_read(self, *a, **k)

    monkeypatch.setattr(RasterSource, "_sample_part", sample_after_a_read)
    monkeypatch.setattr(RasterSource, "read_raw", read)
    res = ScenePipeline(FakeEngine(imgsz=512), Config(batch_size=2, read_threads=2)).run(path)
    assert res.metadata["scale"]["low"] == want.low and res.metadata["scale"]["high"] == want.high
    assert res.stats.tiles_read == res.stats.tiles_total > 4


@pytest.mark.parametrize("dtype,tiled", [(np.uint16, True), (np.int16, True), (np.uint16, False), (np.float32, True)])
def test_background_scale_is_computed_by_the_reader_threads_and_matches(tmp_path: Path, dtype: type, tiled: bool,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """With the reader pool, the grid of sample jobs (a scene over 2048 px) ends in a stretch that a reader
    thread computes as soon as the last job is done: nobody asks for it, and it equals the stretch
    measured in the caller (same sample, same percentiles)."""
    import threading

    rng = np.random.default_rng(3)
    img = rng.gamma(2.0, 300.0, (2300, 2600)) - (800 if dtype == np.int16 else -200)
    path = write_tif(tmp_path / "s.tif", img.astype(dtype), tiled=tiled)
    want = RasterSource(path).scale
    threads: list[str] = []
    real = RasterSource.scale_info

    def record(self: RasterSource, *a: object) -> object:
        threads.append(threading.current_thread().name)
        return real(self, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(RasterSource, "scale_info", record)
    src = RasterSource(path, handles=3)
    assert len(src.sample_plan()) > 1
    with ThreadPoolExecutor(3, thread_name_prefix="rs-read") as pool:
        job = measure_scale(src, pool)
        assert job.result(timeout=30) == want  # without src.scale
        assert threads and all(t.startswith("rs-read") for t in threads)
    src.close()


def test_shutting_down_while_the_stretch_is_measured_cancels_it_quietly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    import threading
    from concurrent.futures import CancelledError

    path = write_tif(tmp_path / "s.tif", np.random.default_rng(0).integers(0, 4000, (2300, 2600)).astype(np.uint16))
    release = threading.Event()
    real = RasterSource._sample_part
    running: list[bool] = []

    def slow(self: RasterSource, job: object) -> np.ndarray:
        running.append(True)
        assert release.wait(timeout=20)
        running.pop()
        return real(self, job)  # type: ignore[arg-type]

    monkeypatch.setattr(RasterSource, "_sample_part", slow)
    src = RasterSource(path, handles=1)
    pool = ThreadPoolExecutor(1)
    job = measure_scale(src, pool)
    threading.Timer(0.2, release.set).start()
    pool.shutdown(wait=True, cancel_futures=True)  # cancels the queued jobs, waits for the running one
    assert not running  # no read is running when the source closes
    src.close()
    with pytest.raises(CancelledError):
        job.result(timeout=1)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


def test_background_scale_error_reaches_the_caller_as_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_tif(tmp_path / "s.tif", np.full((600, 700), 900, dtype=np.uint16))

    def broken(self: RasterSource, job: object) -> np.ndarray:
        raise InputError(f"{self.path}: read failed while measuring the scene's value range (boom)")

    monkeypatch.setattr(RasterSource, "_sample_part", broken)
    src = RasterSource(path)  # opening does not wait for the statistics
    with ThreadPoolExecutor(1) as pool:
        job = measure_scale(src, pool)
        with pytest.raises(InputError, match="s.tif: read failed while measuring"):
            job.result(timeout=30)
    src.close()
    with pytest.raises(InputError, match="measuring the scene's value range"):
        ScenePipeline(FakeEngine(imgsz=512), Config(batch_size=2)).run(path)
    # uint8 needs no statistics: nothing is queued, the scaling is known at once
    u8 = RasterSource(write_tif(tmp_path / "u8.tif", np.zeros((60, 70), dtype=np.uint8)))
    with ThreadPoolExecutor(1) as pool:
        job = measure_scale(u8, pool)
        assert job.done() and job.result().method == "divide"


def test_stretch_sample_of_a_plain_array_leaves_numpy_ma_unimported(tmp_path: Path) -> None:
    """The block reader's sample jobs summarise plain arrays in many threads at once; a first use of
    numpy.ma there would import it under the import lock while they all wait. Masked reads still count
    only their valid values."""
    import subprocess
    import sys
    import textwrap

    path = write_tif(tmp_path / "s.tif", (np.arange(64 * 64).reshape(64, 64) % 5000).astype(np.uint16))
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from pathlib import Path
        from rs_detect.io.reader import RasterSource
        with RasterSource(Path({str(path)!r}), channels=1, handles=0) as src:
            base, counts = src.summarize(np.array([[[3, 3, 7]]], dtype=np.uint16))
        assert base == 0 and counts[3] == 2 and counts[7] == 1 and counts.sum() == 3
        assert "numpy.ma" not in sys.modules, "numpy.ma imported"
        import numpy.ma as ma
        with RasterSource(Path({str(path)!r}), channels=1, handles=0) as src:
            base, counts = src.summarize(ma.masked_array([[[3, 3, 7]]], mask=[[[False, True, False]]], dtype=np.uint16))
        assert counts[3] == 1 and counts[7] == 1 and counts.sum() == 2
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
