"""The engine's warm-up and the first scene overlap: ``SceneExecutor.run(engine_ready=...)`` opens and
reads the scene while the warm-up goes on elsewhere, waits for it only before the first inference,
and does not count that wait as the scene's time; ``scene_like`` tells a warm-up what the scene's
batches will look like (on a GPU, the graph for them is captured before the scene, not during it)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FakeEngine, paint, planted_grid, write_tif
from rs_detect.config import Config
from rs_detect.executor import SceneExecutor
from rs_detect.plan import resolve_plan

RUN_THREADS = ("rs-read", "rs-cut", "rs-post", "rs-batches")


def scene(tmp_path: Path, name: str = "s.tif", **kw: object) -> Path:
    img = paint((512, 512), planted_grid()).astype(np.uint16) * 200 + 1000
    return write_tif(tmp_path / name, img, **kw)


def executor(engine: FakeEngine) -> SceneExecutor:
    plan = resolve_plan(Config(tile_size=256, overlap=64, batch_size=2, read_threads=2), engine)
    return SceneExecutor(plan, engine, warmup=False)


def test_engine_ready_is_waited_for_before_the_first_inference_and_not_counted_as_scene_time(tmp_path: Path) -> None:
    engine = FakeEngine(256)
    events: list[tuple[str, float]] = []
    infer = engine.infer_normalized

    def spy(*a, **k):
        events.append(("infer", time.perf_counter()))
        return infer(*a, **k)

    engine.infer_normalized = spy  # type: ignore[method-assign]

    def ready() -> None:
        time.sleep(0.4)
        events.append(("ready", time.perf_counter()))

    t0 = time.perf_counter()
    result = executor(engine).run(scene(tmp_path), engine_ready=ready)
    wall = time.perf_counter() - t0
    kinds = [k for k, _ in events]
    assert kinds[0] == "ready" and kinds.count("ready") == 1 and kinds.count("infer") >= 2
    waited = result.stats.stage_seconds["wait_for_engine"]
    assert waited >= 0.39
    assert 0 < result.stats.seconds <= wall - waited + 1e-3  # the wait is not the scene's time
    assert len(result.detections) > 0


def test_an_engine_that_fails_to_get_ready_fails_the_run_and_stops_its_threads(tmp_path: Path) -> None:
    engine = FakeEngine(256)

    def ready() -> None:
        raise RuntimeError("warm-up failed")

    with pytest.raises(RuntimeError, match="warm-up failed"):
        executor(engine).run(scene(tmp_path), engine_ready=ready)
    assert not [t.name for t in threading.enumerate() if t.name.startswith(RUN_THREADS)]
    assert engine.calls == []


def test_scene_like_tells_dtype_bands_and_whether_scaling_can_join_the_graph(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ex = executor(FakeEngine(256))
    u16 = ex.scene_like(scene(tmp_path))
    assert u16 is not None and (u16.raw_dtype, u16.bands, u16.norm.graphable) == (torch.uint16, 1, True)
    rgb = write_tif(tmp_path / "rgb.tif", np.stack([paint((300, 300), planted_grid())] * 3).astype(np.uint8), photometric="rgb")
    lum = ex.scene_like(rgb)
    assert lum is not None and (lum.raw_dtype, lum.bands, lum.norm.combine, lum.norm.graphable) == (torch.uint8, 3, "luminance", False)
    assert ex.scene_like(tmp_path / "missing.tif") is None
    (tmp_path / "junk.tif").write_bytes(b"not a tiff")
    assert ex.scene_like(tmp_path / "junk.tif") is None
    # the look at the header says nothing: the run warns about the scene, once
    no_crs = scene(tmp_path, "nocrs.tif", crs=None)
    with caplog.at_level(logging.WARNING, logger="rs_detect"):
        assert ex.scene_like(no_crs) is not None
        assert not [r for r in caplog.records if "no CRS" in r.getMessage()]
        ex.run(no_crs)
    assert len([r for r in caplog.records if "no CRS" in r.getMessage()]) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_warm_up_like_a_scene_captures_the_graph_that_scene_runs(tmp_path: Path) -> None:
    """On a GPU the warm-up captures scaling and model together for the scene's dtype: the run then
    captures nothing (the same graph object serves it) and gives what a cold engine gives."""
    from fake_tensorrt import mini_torchscript

    from rs_detect.engines.torch import TorchScriptEngine

    model = mini_torchscript(tmp_path / "mini.torchscript", imgsz=256)
    path = scene(tmp_path)
    cfg = Config(tile_size=256, overlap=64, batch_size=2, read_threads=2, device="cuda")
    warm = TorchScriptEngine(model, device="cuda")
    ex = SceneExecutor(resolve_plan(cfg, warm), warm, like=path)
    assert warm._graph is None and len(warm._fused) == 1
    (graph,) = warm._fused.values()
    result = ex.run(path)
    assert len(warm._fused) == 1 and next(iter(warm._fused.values())) is graph and warm._graph is None
    cold = TorchScriptEngine(model, device="cuda")
    again = SceneExecutor(resolve_plan(cfg, cold), cold, warmup=False).run(path)
    assert torch.equal(result.detections.boxes, again.detections.boxes)
    assert torch.equal(result.detections.scores, again.detections.scores)


def gdal_cache_max() -> int:
    """GDAL's block cache limit in bytes, from rasterio's libgdal (pyogrio's wheel loads a second one)."""
    import ctypes

    import rasterio  # noqa: F401 - loads libgdal

    paths = [line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libgdal" in line.split("/")[-1]]
    path = next((p for p in paths if "rasterio" in p), paths[0])
    lib = ctypes.CDLL(path)
    lib.GDALGetCacheMax64.restype = ctypes.c_int64
    return int(lib.GDALGetCacheMax64())


def test_gdal_block_cache_during_a_run_is_the_planned_megabytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rs_detect.io.reader import RasterSource
    from rs_detect.plan import GDAL_CACHEMAX_MB

    monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
    seen: list[int] = []
    summary = RasterSource.sample_summary

    def spy(self, job):  # a reader thread, inside the run's GDAL settings
        seen.append(gdal_cache_max())
        return summary(self, job)

    monkeypatch.setattr(RasterSource, "sample_summary", spy)
    executor(FakeEngine(256)).run(scene(tmp_path))
    assert seen and set(seen) == {GDAL_CACHEMAX_MB << 20}
