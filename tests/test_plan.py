"""The run plan (resolved once, printed by --dry-run, written as run metadata) and the synchronous stages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import FakeEngine, write_tif
from rs_detect.cli import cli
from rs_detect.config import Config
from rs_detect.errors import ConfigError
from rs_detect.io.tiling import iter_tiles
from rs_detect.plan import GDAL_CACHEMAX_MB, resolve_plan
from rs_detect.types import ModelMeta


def test_resolve_fills_every_default_from_the_model_then_the_config() -> None:
    engine = FakeEngine(imgsz=256, max_batch=8)
    engine.meta = engine.meta.__class__(**{**engine.meta.__dict__, "conf": 0.4, "conf_by_class": (("plane", 0.6),)})
    plan = resolve_plan(Config(), engine, cores=6)
    assert plan.tiling.tile_size == 256 and plan.tiling.stride == 256 - 192
    assert plan.engine.batch_size == 8 and plan.engine.classes[:2] == ("plane", "ship")
    assert plan.postprocess.conf == 0.4 and dict(plan.postprocess.conf_by_class) == {"plane": 0.6}  # the model's own
    assert plan.execution.read_threads == 4 and plan.execution.cutter_threads == 2  # CPU: up to 4 readers
    assert plan.execution.read_ahead == 2 and plan.execution.decode_ahead == 2 and plan.execution.handover == 1
    user = resolve_plan(Config(conf=0.3, conf_by_class={"ship": 0.7}, tile_size=128, overlap=32, batch_size=3, prefetch=5), engine)
    assert user.postprocess.conf == 0.3 and dict(user.postprocess.conf_by_class) == {"ship": 0.7}  # --conf drops the model's
    assert user.tiling.tile_size == 128 and user.engine.batch_size == 3 and user.execution.read_ahead == 5
    static = FakeEngine(imgsz=256, max_batch=4, min_batch=4, dynamic=False)
    assert resolve_plan(Config(batch_size=2), static).engine.batch_size == 4  # a static engine's batch


@pytest.mark.parametrize(("cfg", "message"), [
    (Config(tile_size=256, overlap=256), "overlap 256 must be smaller than the tile size 256"),
    (Config(overlap=300), "overlap 300 must be smaller than the tile size 256"),  # against the model's size
    (Config(tile_size=512), "tile size 512 is larger than the model input 256"),
    (Config(classes=("plane", "boat")), "--classes: the model has no class 'boat'"),
    (Config(conf_by_class={"boat": 0.5}), "conf_by_class: unknown class 'boat'"),
])
def test_resolve_refuses_settings_that_do_not_fit_together_or_the_model(cfg: Config, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        resolve_plan(cfg, FakeEngine(imgsz=256))


def test_gdal_cachemax_is_set_per_run_unless_the_environment_sets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
    assert resolve_plan(Config(), FakeEngine()).execution.gdal_cachemax_mb == GDAL_CACHEMAX_MB
    monkeypatch.setenv("GDAL_CACHEMAX", "512")
    assert resolve_plan(Config(), FakeEngine()).execution.gdal_cachemax_mb is None


def test_importing_the_package_has_no_side_effect_and_config_needs_no_rasterio() -> None:
    code = ("import os, sys; import rs_detect.config, rs_detect.plan, rs_detect.types; "
            "assert 'rasterio' not in sys.modules, 'config imports rasterio'; "
            "import rasterio, torch, geopandas, pyproj; before = dict(os.environ); "  # their own import-time settings
            "import rs_detect.executor, rs_detect.io.reader, rs_detect.pipeline, rs_detect.cli; "
            "changed = {k for k in set(os.environ) | set(before) if os.environ.get(k) != before.get(k)}; "
            "assert not {k for k in changed if not k.startswith('TORCH')}, changed; "  # torch's lazy submodules set their own
            "assert 'GDAL_CACHEMAX' not in os.environ")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path, tiny_onnx: Path) -> None:
    scene = write_tif(tmp_path / "s.tif", np.zeros((200, 300), dtype=np.uint8))
    runner = CliRunner()
    res = runner.invoke(cli, [str(scene), "--model", str(tiny_onnx), "--overlap", "16", "--conf", "0.3", "--dry-run"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert set(plan) == {"tiling", "scaling", "engine", "execution", "postprocess", "output"}
    assert plan["tiling"]["tile_size"] == 64 and plan["tiling"]["overlap"] == 16 and plan["postprocess"]["conf"] == 0.3
    assert plan["engine"]["backend"] == "onnxruntime" and plan["engine"]["model_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tif"]  # nothing written
    res = runner.invoke(cli, [str(scene), "--model", str(tiny_onnx), "--overlap", "16", "--dry-run=yaml"])
    assert res.exit_code == 0 and yaml.safe_load(res.stdout)["tiling"]["overlap"] == 16
    res = runner.invoke(cli, [str(scene), "--model", str(tiny_onnx), "--overlap", "64", "--dry-run"])
    assert res.exit_code == 1 and "overlap 64 must be smaller than the tile size 64" in res.stderr


def test_the_written_run_metadata_holds_the_plan(tmp_path: Path, tiny_onnx: Path) -> None:
    from rs_detect.io.writer import read_metadata

    scene = write_tif(tmp_path / "s.tif", np.zeros((200, 300), dtype=np.uint8))
    out = tmp_path / "o.geojson"
    runner = CliRunner()
    dry = json.loads(runner.invoke(cli, [str(scene), "--model", str(tiny_onnx), "--overlap", "16", "--dry-run"]).stdout)
    res = runner.invoke(cli, [str(scene), "--model", str(tiny_onnx), "--overlap", "16", "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    meta = read_metadata(out)
    assert meta["plan"] == dry  # what --dry-run printed is what ran
    assert meta["overlap"] == meta["plan"]["tiling"]["overlap"] == 16 and meta["conf"] == meta["plan"]["postprocess"]["conf"]


# -- synchronous stages, driven with plain arrays --------------------------------------------------------


def test_normaliser_scales_plain_tensors(tmp_path: Path) -> None:
    from rs_detect.io.reader import RasterSource
    from rs_detect.preprocess import Normalizer
    from rs_detect.types import RawBatch, ScaleInfo

    src = RasterSource(write_tif(tmp_path / "u16.tif", np.full((40, 50), 1500, dtype=np.uint16)))
    norm = Normalizer(src, torch.device("cpu"), torch.float32, fill_value=0.25, scale=ScaleInfo("fixed", 1000.0, 2000.0))
    src.close()
    raw = torch.tensor([[[[1000, 1500], [2000, 2500]]]], dtype=torch.int32)
    valid = torch.tensor([[[True, True], [True, False]]])
    tile = next(iter_tiles(2, 2, 2, 0))
    out = norm(RawBatch(raw, valid, (tile,)))
    assert out.tolist() == [[[[0.0, 0.5], [1.0, 0.25]]]]  # stretched, clipped where valid, filled where not
    with pytest.raises(ValueError, match="does not match 2 tiles"):
        RawBatch(raw, valid, (tile, tile))


def test_decoder_and_stitch_on_a_plain_raw_tensor() -> None:
    from rs_detect.stages import Thresholds, TileDecoder, stitch_scene

    meta = ModelMeta(names=("plane", "ship"), imgsz=64)
    plan = resolve_plan(Config(conf=0.5, tile_size=64, overlap=16), FakeEngineFor(meta))
    thresholds = Thresholds(plan, meta)
    raw = torch.zeros((2, 6, meta.num_anchors))
    raw[0, :4, 0] = torch.tensor([20.0, 20.0, 10.0, 10.0])  # a plane in tile 0, whole
    raw[0, 4, 0] = 0.9
    raw[1, :4, 1] = torch.tensor([30.0, 30.0, 8.0, 8.0])  # a weak ship in tile 1: under the output threshold
    raw[1, 5, 1] = 0.3
    tiles = tuple(iter_tiles(112, 64, 64, 16))
    dets = TileDecoder(plan, meta, thresholds)(raw, tiles)
    assert dets.frame == "scene" and len(dets) == 2  # decoded down to stitch_conf (0.1)
    assert dets.boxes[dets.class_ids == 1][0].tolist() == [26.0 + tiles[1].col_off, 26.0, 34.0 + tiles[1].col_off, 34.0]
    assert thresholds.passing(dets).tolist() == (dets.scores >= 0.5).tolist()
    out = stitch_scene([dets], plan, meta, thresholds)
    assert out.class_ids.tolist() == [0] and out.boxes[0].tolist() == [15.0, 15.0, 25.0, 25.0]


class FakeEngineFor(FakeEngine):
    def __init__(self, meta: ModelMeta) -> None:
        super().__init__(imgsz=meta.imgsz)
        self.meta = meta
