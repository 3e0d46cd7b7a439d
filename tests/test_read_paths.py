"""Detections do not depend on the reading path: GDAL's slab reader and the block reader (the GPU
path's code, run here on the CPU with zlib for nvCOMP) give the same boxes and scores."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import FakeEngine, paint, planted_grid, write_tif
from rs_detect.config import SAMPLE_MODEL, Config
from rs_detect.engines import load_engine
from rs_detect.io.reader import RasterSource
from rs_detect.pipeline import ScenePipeline
from rs_detect.types import ScaleConfig

DEMO = Path(__file__).resolve().parents[1] / "sample_data" / "demo_scene.tif"


def run(engine, cfg: Config, scene: Path):
    return ScenePipeline(engine, cfg).run(scene)


def assert_same_detections(a, b) -> None:
    fa, fb = a.frame.reset_index(drop=True), b.frame.reset_index(drop=True)
    assert len(fa) == len(fb)
    assert list(fa["class_name"]) == list(fb["class_name"])
    np.testing.assert_array_equal(fa["score"].to_numpy(), fb["score"].to_numpy())
    np.testing.assert_array_equal(np.asarray([g.bounds for g in fa.geometry]), np.asarray([g.bounds for g in fb.geometry]))


def test_uint16_scene_same_detections_on_both_paths(tmp_path: Path) -> None:
    img = paint((1024, 1024), planted_grid()).astype(np.uint16) * 200 + 1000  # the fake engine reads codes back
    scene = write_tif(tmp_path / "u16.tif", img, predictor=2)
    cfg = dict(tile_size=256, overlap=64, scale=ScaleConfig(method="fixed", low=1000.0, high=1000.0 + 255 * 200))
    gdal = run(FakeEngine(256), Config(**cfg, reader="gdal"), scene)
    blocks = run(FakeEngine(256), Config(**cfg, reader="blocks"), scene)
    assert gdal.stats.reader == "GDAL" and blocks.stats.reader.startswith("blocks, deflate + predictor, ")
    assert len(gdal.frame) >= 10  # the planted objects are found at all
    assert_same_detections(gdal, blocks)
    assert blocks.metadata["reader"] == blocks.stats.reader


def test_stretched_scene_same_stretch_and_detections_and_no_gdal_handles_on_the_block_path(tmp_path: Path,
                                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A scene wider than 2048 px is stretched from a grid of sample windows: the block reader reads them
    from the blocks (no GDAL sample read, no GDAL handle but the one that read the header) and gets
    the stretch GDAL's sample gives."""
    rng = np.random.default_rng(11)
    img = (rng.gamma(2.0, 300.0, (640, 2304)) + 200).astype(np.uint16)
    img[paint((640, 2304), planted_grid()) > 0] = 6000  # bright objects for the engine to find
    scene = write_tif(tmp_path / "u16.tif", img, predictor=2, blockxsize=128, blockysize=128)
    opened: list[str] = []
    sampled: list[str] = []
    real_open, real_sample = RasterSource._open, RasterSource._sample_part

    def count_open(self: RasterSource) -> object:
        opened.append(threading.current_thread().name)
        return real_open(self)

    def count_sample(self: RasterSource, job: object) -> object:
        sampled.append(threading.current_thread().name)
        return real_sample(self, job)  # type: ignore[arg-type]

    monkeypatch.setattr(RasterSource, "_open", count_open)
    monkeypatch.setattr(RasterSource, "_sample_part", count_sample)
    cfg = dict(tile_size=512, overlap=64, read_threads=3, batch_size=2)
    gdal = run(FakeEngine(512), Config(**cfg, reader="gdal"), scene)
    assert len(opened) == 1 + 3 and len(sampled) == 8 * 8  # the header's handle and one per reader thread; the grid's windows
    opened.clear()
    sampled.clear()
    blocks = run(FakeEngine(512), Config(**cfg, reader="blocks"), scene)
    assert blocks.stats.reader.startswith("blocks, deflate + predictor, ")
    assert opened == ["MainThread"] and not sampled
    assert blocks.scale == gdal.scale and blocks.scale is not None and blocks.scale.method == "percentile"
    assert blocks.metadata["scale"] == gdal.metadata["scale"]
    assert len(gdal.frame) >= 1
    assert_same_detections(gdal, blocks)


def test_demo_scene_same_detections_on_both_paths() -> None:
    engine = load_engine(SAMPLE_MODEL, device="cpu")
    gdal = run(engine, Config(reader="gdal"), DEMO)
    blocks = run(engine, Config(reader="blocks"), DEMO)
    assert len(gdal.frame) > 10
    assert_same_detections(gdal, blocks)


def test_cli_reader_flag_names_the_path_in_summary_and_metadata(tmp_path: Path, tiny_onnx: Path) -> None:
    from click.testing import CliRunner

    from rs_detect.cli import cli
    from rs_detect.io.writer import read_metadata

    img = np.full((150, 200), 20, dtype=np.uint8)
    img[10:42, 20:52] = 250  # what the tiny model calls a plane
    scene = write_tif(tmp_path / "scene.tif", img, predictor=2)
    outs = {}
    for reader in ("gdal", "blocks"):
        out = tmp_path / f"{reader}.geojson"
        res = CliRunner().invoke(cli, [str(scene), "--model", str(tiny_onnx), "--tile-size", "64", "--overlap", "16",
                                       "--reader", reader, "-o", str(out)])
        assert res.exit_code == 0, res.output
        outs[reader] = (res.output, read_metadata(out), out.read_text())
    assert "[read: GDAL]" in outs["gdal"][0] and "[read: blocks, deflate + predictor, " in outs["blocks"][0]
    assert outs["gdal"][1]["reader"] == "GDAL" and outs["blocks"][1]["reader"].startswith("blocks, ")
    features = [json.loads(t)["features"] for *_, t in outs.values()]
    assert len(features[0]) >= 1 and features[0] == features[1]
    bad = CliRunner().invoke(cli, [str(scene), "--model", str(tiny_onnx), "--reader", "fast"])
    assert bad.exit_code == 2 and "'fast' is not one of" in bad.output


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_same_detections_on_both_paths(tmp_path: Path) -> None:
    """On a GPU: a TorchScript model (random weights, so it finds plenty) on the windows of GDAL's reader
    and of the block reader, cut on the GPU: the same boxes and scores."""
    from fake_tensorrt import mini_torchscript

    img = paint((1024, 1024), planted_grid()).astype(np.uint16) * 200 + 1000
    scene = write_tif(tmp_path / "u16.tif", img, predictor=2)
    model = mini_torchscript(tmp_path / "mini.torchscript", imgsz=256)
    cfg = dict(tile_size=256, overlap=64, batch_size=4, device="cuda")
    engine = load_engine(model, device="cuda")
    gdal = run(engine, Config(**cfg, reader="gdal"), scene)
    blocks = run(engine, Config(**cfg, reader="blocks"), scene)
    assert "blocks" in blocks.stats.reader and "GDAL" in gdal.stats.reader
    assert len(gdal.frame) > 10  # the comparison has detections to compare
    assert_same_detections(gdal, blocks)
