"""The GPU reading path (rs_detect.io.gpu_blocks) run on the CPU: the same block reads, predictor,
layout and window cuts as on a GPU, with zlib standing in for nvCOMP (InflateDecoder). Every window
must equal what the GDAL slab reader gives."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
import zlib
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.enums import ColorInterp as CI

from rs_detect.errors import InputError
from rs_detect.io import gpu_blocks, tiff_blocks
from rs_detect.io.gpu_blocks import BlockFile, BlockSampler, InflateDecoder, block_layout, gpu_read_plan, gpu_window_batches
from rs_detect.io.prefetch import window_batches
from rs_detect.io.reader import RasterSource
from rs_detect.io.tiling import iter_tiles


def write(path: Path, data: np.ndarray, **kw: object) -> Path:
    bands, h, w = data.shape
    prof = dict(driver="GTiff", width=w, height=h, count=bands, dtype=data.dtype, tiled=True, blockxsize=256, blockysize=256,
                compress="deflate", crs="EPSG:32633", transform=rasterio.transform.from_origin(500000, 4500000, 1, 1))
    prof.update(kw)
    with rasterio.open(path, "w", **prof) as ds:
        ds.write(data)
        if bands == 3:
            ds.colorinterp = (CI.red, CI.green, CI.blue)
    return path


def scene(dtype: str, shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    smooth = np.cumsum(rng.integers(-3, 4, shape), axis=-1)  # neighbours alike: the predictor matters
    return (smooth % (int(info.max) - int(info.min) + 1) + int(info.min)).astype(dtype)


def both_paths(path: Path, size: int = 512, overlap: int = 96, batch: int = 3, device_decoder: bool = False,
               device: str = "cpu") -> tuple[list, list]:
    """GDAL's slab reader vs the block reader: blocks inflated in the reader pool (the default), or,
    with ``device_decoder``, by the device-side decoder's code path (InflateDecoder for nvCOMP).
    ``device``: where the block reader undoes the predictor and cuts (its batches come back on the CPU)."""
    with RasterSource(path, channels=1) as src, ThreadPoolExecutor(2) as pool, ThreadPoolExecutor(2) as cutters:
        layout = block_layout(str(src.path), src.width, src.height, src.dtype, src.count)
        assert not isinstance(layout, str), layout
        tiles = list(iter_tiles(src.width, src.height, size, overlap, src.transform))
        cpu = list(window_batches(src, iter(tiles), pool, batch, size, False, 2, 2, cutters, stride=size - overlap))
        gpu = list(gpu_window_batches(src, layout, iter(tiles), pool, batch, size, torch.device(device), None, ahead=1,
                                      decoder=InflateDecoder() if device_decoder else None))
    if device != "cpu":
        gpu = [dataclasses.replace(b, data=b.data.cpu(), valid=None if b.valid is None else b.valid.cpu(), ready=None) for b in gpu]
    return cpu, gpu


def assert_same(cpu: list, gpu: list) -> None:
    assert [b.tiles for b in cpu] == [b.tiles for b in gpu]
    for a, b in zip(cpu, gpu):
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
        if a.valid is None:
            assert b.valid is None or bool(b.valid.all())
            assert torch.equal(a.data, b.data)
        else:
            assert b.valid is not None and torch.equal(a.valid, b.valid)
            assert torch.equal(_valid_pixels(a), _valid_pixels(b))


def _valid_pixels(batch) -> torch.Tensor:
    """The batch's pixels, 0 where not valid, in int32: torch.where has no uint16 kernel on the CPU in
    some torch versions (2.11)."""
    return torch.where(batch.valid[:, None], batch.data.to(torch.int32), 0)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "int8"])
@pytest.mark.parametrize("predictor", [1, 2])
@pytest.mark.parametrize("device_decoder", [False, True])
def test_windows_equal_gdal_for_each_dtype_and_predictor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, predictor: int,
                                                         device_decoder: bool) -> None:
    monkeypatch.setattr(gpu_blocks, "GROUP_ROWS", 512)  # several decode groups, windows across two of them
    monkeypatch.setattr(gpu_blocks, "HOST_GROUP_ROWS", 512)
    monkeypatch.setattr(gpu_blocks, "HOST_CHUNK", 3)  # jobs that end inside a block row
    data = scene(dtype, (1, 1300, 1100))
    path = write(tmp_path / "s.tif", data, predictor=predictor)
    cpu, gpu = both_paths(path, device_decoder=device_decoder)
    assert_same(cpu, gpu)
    assert len(gpu) == 3 and sum(b.size for b in gpu) == 9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "int8"])
def test_windows_on_cuda_equal_gdal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    """The predictor undone and windows cut by CUDA kernels (a cumulative sum that must wrap around
    in the samples' own width) give GDAL's pixels; the CPU runs the same code in the test above."""
    monkeypatch.setattr(gpu_blocks, "HOST_GROUP_ROWS", 512)
    path = write(tmp_path / "s.tif", scene(dtype, (1, 1300, 1100)), predictor=2)
    cpu, gpu = both_paths(path, device="cuda")
    assert_same(cpu, gpu)
    assert sum(b.size for b in gpu) == 9


def test_short_scene_windows_are_padded_like_the_cpu_path(tmp_path: Path) -> None:
    path = write(tmp_path / "s.tif", scene("uint16", (1, 300, 700)), predictor=2)  # shorter than a window
    cpu, gpu = both_paths(path, size=512, overlap=64)
    assert gpu[0].valid is not None and not bool(gpu[0].valid.all())
    assert_same(cpu, gpu)


def test_uncompressed_and_rgb_pixel_interleaved(tmp_path: Path) -> None:
    assert_same(*both_paths(write(tmp_path / "raw.tif", scene("uint16", (1, 700, 900)), compress="none")))
    rgb = write(tmp_path / "rgb.tif", scene("uint8", (3, 600, 800)), photometric="rgb", interleave="pixel")
    cpu, gpu = both_paths(rgb)
    assert cpu[0].data.shape[1] == 3  # luminance is computed later, from the three bands
    assert_same(cpu, gpu)


def test_blocks_out_of_file_order_and_far_apart_are_read_right(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "s.tif", scene("uint16", (1, 800, 800), seed=3))
    monkeypatch.setattr(tiff_blocks, "MAX_GAP", 16)  # every block its own read
    monkeypatch.setattr(tiff_blocks, "IOV_MAX", 6)
    assert_same(*both_paths(path))


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        (dict(tiled=False), "striped"),
        (dict(compress="lzw"), "lzw"),
        (dict(compress="jpeg"), "jpeg"),
    ],
)
def test_files_the_gpu_path_does_not_take_say_why(tmp_path: Path, kw: dict, reason: str) -> None:
    path = write(tmp_path / "s.tif", scene("uint8", (1, 300, 300)), **kw)
    with RasterSource(path) as src:
        layout, why = gpu_read_plan(src, torch.device("cuda"), "auto")
    assert layout is None and reason in why


def test_float_nodata_and_cpu_device_keep_the_cpu_path(tmp_path: Path) -> None:
    f = write(tmp_path / "f.tif", np.zeros((1, 300, 300), np.float32))
    nd = write(tmp_path / "nd.tif", scene("uint16", (1, 300, 300)), nodata=0)
    ok = write(tmp_path / "ok.tif", scene("uint16", (1, 300, 300)))
    with RasterSource(f) as a, RasterSource(nd) as b, RasterSource(ok) as c:
        assert gpu_read_plan(a, torch.device("cuda"))[1] == "nodata or mask"
        assert gpu_read_plan(b, torch.device("cuda"))[1] == "nodata or mask"
        assert gpu_read_plan(c, torch.device("cpu"))[1] == "engine not on a GPU"
        assert gpu_read_plan(c, torch.device("cuda"), "gdal")[1] == "GDAL reading asked for"


def damaged(path: Path, block: tuple[int, int], at: int, data: bytes):
    """``path``'s layout, after ``data`` is written at byte ``at`` of block (row, column)."""
    with RasterSource(path) as src:
        layout = block_layout(str(src.path), src.width, src.height, src.dtype, src.count)
    assert not isinstance(layout, str)
    raw = bytearray(path.read_bytes())
    o = int(layout.offsets[block]) + at
    raw[o : o + len(data)] = data
    path.write_bytes(bytes(raw))
    return layout


def test_a_corrupt_block_is_a_one_line_input_error(tmp_path: Path) -> None:
    path = write(tmp_path / "s.tif", scene("uint16", (1, 512, 512)))
    layout = damaged(path, (0, 1), 0, b"\x00")  # the zlib header of block (0, 1)
    f = BlockFile(layout)
    buf = np.empty(f.size(slice(0, 2)), np.uint8)
    with pytest.raises(InputError, match=r"s.tif: block 1,0 \(column, row\) is not zlib data"):
        f.read(slice(0, 2), buf)
    f.close()


def test_a_block_that_does_not_inflate_names_file_and_block(tmp_path: Path) -> None:
    path = write(tmp_path / "s.tif", scene("uint16", (1, 512, 512)))
    layout = damaged(path, (1, 0), 2, b"\xff" * 38)  # a valid zlib header, then no DEFLATE stream
    with RasterSource(path) as src, ThreadPoolExecutor(2) as pool:
        tiles = iter_tiles(src.width, src.height, 256, 0, src.transform)
        with pytest.raises(InputError, match=r"s.tif: block 0,1 \(column, row\) does not inflate"):
            list(gpu_window_batches(src, layout, tiles, pool, 4, 256, torch.device("cpu"), None))


def test_groups_in_flight_are_bounded_by_the_pinned_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "s.tif", scene("uint16", (1, 2048, 2048)))  # 8 x 8 blocks of 256: 1 MiB a row of blocks
    monkeypatch.setattr(gpu_blocks, "GROUP_BYTES", 2 << 20)
    monkeypatch.setattr(gpu_blocks, "PINNED_BYTES", 6 << 20)
    seen = []
    real = gpu_blocks.GpuBlockReader._request

    def spy(self, upto: int) -> None:
        real(self, upto)
        seen.append(len(self._buffers))

    monkeypatch.setattr(gpu_blocks.GpuBlockReader, "_request", spy)
    with RasterSource(path) as src, ThreadPoolExecutor(8) as pool:
        layout = block_layout(str(src.path), src.width, src.height, src.dtype, src.count)
        reader = gpu_blocks.GpuBlockReader(src, layout, torch.device("cpu"), pool, None, None)
        assert (reader.group_blocks, reader.ahead) == (2, 2)  # 2 MiB groups; 3 of them fit 6 MiB
        assert reader.chunk == 2  # 16 blocks a group, 8 threads: 2 blocks a job, so that every thread has one
        reader.close()
        tiles = iter_tiles(src.width, src.height, 512, 64, src.transform)
        n = sum(b.size for b in gpu_window_batches(src, layout, tiles, pool, 4, 512, torch.device("cpu"), None))
    assert n == 25 and seen and max(seen) <= 3


def slots_of(blocks: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw DEFLATE streams of ``blocks`` laid out at 8-byte aligned slots of one buffer."""
    streams = []
    for b in blocks:
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        streams.append(c.compress(b) + c.flush())
    lens = np.array([len(x) for x in streams], np.int64)
    starts = np.concatenate([[0], np.cumsum(-(-lens // 8) * 8)[:-1]]).astype(np.int64)
    buf = np.zeros(int(starts[-1] + lens[-1]) + 8, np.uint8)
    for s, x in zip(starts, streams):
        buf[s : s + len(x)] = np.frombuffer(x, np.uint8)
    return buf, starts, lens


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16"])
@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("predictor", [1, 2])
def test_undo_predictor_host_is_undo_predictor_in_numpy(dtype: str, samples: int, predictor: int) -> None:
    layout = tiff_blocks.BlockLayout("x.tif", 64, 32, 32, 64, np.dtype(dtype), samples, predictor, "deflate",
                                     np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64))
    raw = np.random.default_rng(1).integers(0, 256, (3, layout.block_bytes), dtype=np.uint8)  # sums that wrap around
    want = tiff_blocks.undo_predictor(torch.from_numpy(raw), layout).numpy()
    got = tiff_blocks.undo_predictor_host(raw, layout)
    assert got.dtype == want.dtype == np.dtype(dtype) and got.shape == want.shape == (3, 32, 64, samples)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("direct", [True, False])
def test_host_inflater_writes_each_block_into_its_row(direct: bool) -> None:
    size = 4096
    rng = np.random.default_rng(5)
    blocks = [np.cumsum(rng.integers(-2, 3, size)).astype(np.uint8).tobytes() for _ in range(5)]
    buf, starts, lens = slots_of(blocks)
    inflater = tiff_blocks.HostInflater(size, direct=direct)
    assert inflater.direct is direct  # libdeflate's own functions are found in the deflate package
    out = np.full((5, size), 7, np.uint8)
    inflater(buf, starts, lens, out)
    assert [bytes(r) for r in out] == blocks


@pytest.mark.parametrize("direct", [True, False])
def test_host_inflater_names_the_block_that_fails_and_why(direct: bool) -> None:
    size = 1000
    good = bytes(range(256)) * 3 + bytes(size - 768)
    inflater = tiff_blocks.HostInflater(size, direct=direct)
    out = np.empty((3, size), np.uint8)
    cases = [(good[:-1], "fewer" if direct else "999 bytes"), (good + b"x", "more" if direct else "does not inflate"), (None, "does not inflate")]
    for bad, why in cases:
        buf, starts, lens = slots_of([good, good if bad is None else bad, good])
        if bad is None:  # a valid stream's first bytes replaced: no DEFLATE block type 3 exists
            buf[starts[1] : starts[1] + 4] = 0xFF
        with pytest.raises(tiff_blocks.BlockInflateError, match=why) as err:
            inflater(buf, starts, lens, out)
        assert err.value.index == 1


# -- the stretch's sample read from the blocks ------------------------------------------------------------


def assert_same_summary(a: object, b: object) -> None:
    """Two :meth:`RasterSource.sample_summary` results are the same: counts, or values in the same order."""
    assert type(a) is type(b)
    if isinstance(a, tuple):
        assert a[0] == b[0] and a[1].dtype == b[1].dtype and np.array_equal(a[1], b[1])  # type: ignore[index]
    else:
        assert a.dtype == b.dtype and np.array_equal(a, b)  # type: ignore[union-attr]


def sampled_both_ways(path: Path, channels: int = 1) -> tuple[list, list, RasterSource]:
    """Every sample job's summary from the blocks and through GDAL (the source is left open)."""
    src = RasterSource(path, channels=channels)
    layout = block_layout(str(src.path), src.width, src.height, src.dtype, src.count)
    assert not isinstance(layout, str), layout
    sampler = BlockSampler(src, layout)
    jobs = src.sample_plan()
    assert len(jobs) > 1 and all(len(cols) == 1 for _, _, cols in jobs)  # a grid of windows, not the decimated scene
    return [sampler(job) for job in jobs], [src.sample_summary(job) for job in jobs], src


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16"])
@pytest.mark.parametrize("predictor", [1, 2])
@pytest.mark.parametrize("block", [128, 256])
def test_block_sampler_gives_gdals_sample_and_stretch(tmp_path: Path, dtype: str, predictor: int, block: int) -> None:
    # wider than 2048 px: a grid of 256 px windows. Blocks of 128 put windows across 3 x 3 blocks and
    # into the padded blocks of the bottom edge; blocks of 256 hold one window each
    path = write(tmp_path / "s.tif", scene(dtype, (1, 700, 2400), seed=predictor), predictor=predictor,
                 blockxsize=block, blockysize=block)
    blocks, gdal, src = sampled_both_ways(path)
    with src:
        windows = [(y, x) for y, _, [(x, _)] in src.sample_plan()]
        if block == 128:
            assert any(y % 128 and x % 128 for y, x in windows)  # across 3 x 3 blocks
            assert any(y + 256 > 700 // 128 * 128 for y, _ in windows)  # into the bottom row of blocks, padded in the file
        else:
            assert all(y % 256 == 0 and x % 256 == 0 for y, x in windows)  # snapped into one block each
        for a, b in zip(blocks, gdal):
            assert_same_summary(a, b)
        assert isinstance(gdal[0], tuple)  # 8/16-bit values are counted
        assert sum(int(c.sum()) for _, c in gdal) == len(gdal) * 256 * 256
        assert src.scale_info(blocks) == src.scale_info(gdal)
        if dtype != "uint8":  # uint8 is divided by 255: no stretch to compare
            assert src.scale_info(blocks).method == "percentile"


def test_block_sampler_luminance_of_pixel_interleaved_rgb(tmp_path: Path) -> None:
    path = write(tmp_path / "rgb.tif", scene("uint8", (3, 150, 2400), seed=4), photometric="rgb", interleave="pixel", predictor=2)
    blocks, gdal, src = sampled_both_ways(path, channels=1)
    with src:
        assert src.plan.combine == "luminance"
        assert isinstance(gdal[0], np.ndarray) and gdal[0].dtype == np.float32 and gdal[0].size == 150 * 256
        for a, b in zip(blocks, gdal):
            assert_same_summary(a, b)


@pytest.mark.parametrize("per_job", [1, 3, 4, 8])
def test_block_sampler_plan_groups_windows_of_a_grid_row_and_keeps_the_stretch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                                per_job: int) -> None:
    monkeypatch.setattr(gpu_blocks, "SAMPLE_JOB_WINDOWS", per_job)
    path = write(tmp_path / "s.tif", scene("uint16", (1, 2200, 2400), seed=9), predictor=2, blockxsize=128, blockysize=128)
    with RasterSource(path) as src, ThreadPoolExecutor(4) as pool:
        layout = block_layout(str(src.path), src.width, src.height, src.dtype, src.count)
        sampler = BlockSampler(src, layout)
        single = src.sample_plan()
        grouped = sampler.plan(single)
        # the same windows in the same order, each job within one grid row, at most per_job windows
        assert [(y, h, [c]) for y, h, cols in grouped for c in cols] == single
        assert all(1 <= len(cols) <= per_job for _, _, cols in grouped)
        assert len(grouped) == len({y for y, _, _ in single}) * -(-len({c for _, _, [c] in single}) // per_job)
        summaries = list(pool.map(sampler, grouped))
        gdal = [src.sample_summary(job) for job in single]
        assert sum(int(c.sum()) for _, c in summaries) == sum(int(c.sum()) for _, c in gdal)  # type: ignore[misc]
        assert src.scale_info(summaries) == src.scale_info(gdal)


def test_block_sampler_grouped_luminance_values_give_gdals_stretch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_blocks, "SAMPLE_JOB_WINDOWS", 4)
    path = write(tmp_path / "rgb.tif", scene("uint16", (3, 600, 2400), seed=10), photometric="rgb", interleave="pixel")
    with RasterSource(path, channels=1) as src:
        assert src.plan.combine == "luminance"
        layout = block_layout(str(src.path), src.width, src.height, src.dtype, src.count)
        sampler = BlockSampler(src, layout)
        grouped = sampler.plan(src.sample_plan())
        assert max(len(cols) for _, _, cols in grouped) == 4
        parts = [sampler(job) for job in grouped]
        assert all(isinstance(p, np.ndarray) and p.dtype == np.float32 for p in parts)  # values, not counts
        assert src.scale_info(parts) == src.scale_info([src.sample_summary(job) for job in src.sample_plan()])


def test_block_sampler_uncompressed(tmp_path: Path) -> None:
    path = write(tmp_path / "raw.tif", scene("uint16", (1, 600, 2200), seed=5), compress="none", blockxsize=128, blockysize=128)
    blocks, gdal, src = sampled_both_ways(path)
    with src:
        assert block_layout(str(src.path), src.width, src.height, src.dtype, src.count).compression == "none"
        for a, b in zip(blocks, gdal):
            assert_same_summary(a, b)
        assert src.scale_info(blocks) == src.scale_info(gdal)


def test_block_sampler_leaves_the_decimated_whole_scene_to_gdal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "s.tif", scene("uint16", (1, 700, 900), seed=6))  # at most 2048 px: one decimated read
    with RasterSource(path) as src:
        layout = block_layout(str(src.path), src.width, src.height, src.dtype, src.count)
        [job] = src.sample_plan()
        assert job[2] == []
        monkeypatch.setattr(BlockFile, "read", lambda *a: pytest.fail("the decimated scene was read from the blocks"))
        assert_same_summary(BlockSampler(src, layout)(job), src.sample_summary(job))


def test_block_sampler_names_a_corrupt_block(tmp_path: Path) -> None:
    path = write(tmp_path / "s.tif", scene("uint16", (1, 512, 2304), seed=7))
    with RasterSource(path) as src:
        x = next(cols[0][0] for y, _, cols in src.sample_plan() if y < 256)  # the first window, in block row 0
    layout = damaged(path, (0, x // 256), 2, b"\xff" * 38)  # a valid zlib header, then no DEFLATE stream
    with RasterSource(path) as src:
        job = next(j for j in src.sample_plan() if j[2][0][0] == x and j[0] < 256)
        with pytest.raises(InputError, match=rf"s.tif: block {x // 256},0 \(column, row\) does not inflate"):
            BlockSampler(src, layout)(job)


def test_block_sampler_from_many_threads(tmp_path: Path) -> None:
    path = write(tmp_path / "s.tif", scene("int16", (1, 600, 2400), seed=8), predictor=2, blockxsize=128, blockysize=128)
    with RasterSource(path) as src, ThreadPoolExecutor(8) as pool:
        layout = block_layout(str(src.path), src.width, src.height, src.dtype, src.count)
        jobs = src.sample_plan() * 4
        threaded = list(pool.map(BlockSampler(src, layout), jobs))
        for a, job in zip(threaded, jobs):
            assert_same_summary(a, src.sample_summary(job))


@pytest.mark.parametrize("mode", ["blocks", "gdal"])
def test_scene_batches_says_how_its_path_samples_and_whether_it_needs_handles(tmp_path: Path, mode: str) -> None:
    path = write(tmp_path / "s.tif", scene("uint16", (1, 600, 2400), seed=9), predictor=2)
    with RasterSource(path) as src, ThreadPoolExecutor(2) as pool, ThreadPoolExecutor(2) as cutters:
        tiles = iter_tiles(src.width, src.height, 512, 64, src.transform)
        chosen = gpu_blocks.scene_batches(src, tiles, mode, torch.device("cpu"), None, pool, cutters, 2, 512, False, 2, 2, 448)
        if mode == "blocks":
            assert isinstance(chosen.sample, BlockSampler) and not chosen.needs_handles
            assert chosen.label.startswith("blocks, ")
        else:
            assert chosen.sample == src.sample_summary and chosen.needs_handles and chosen.label == "GDAL"
        parts = [chosen.sample(job) for job in src.sample_plan()]
        assert src.scale_info(parts) == src.scale_info()
        assert sum(b.size for b in chosen.batches) == len(list(iter_tiles(src.width, src.height, 512, 64, src.transform)))
