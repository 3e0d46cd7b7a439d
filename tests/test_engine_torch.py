"""TorchScriptEngine: Ultralytics-style TorchScript (config.txt metadata), one code path for CPU and CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_tif
from fake_tensorrt import MiniYolo, mini_torchscript

from rs_detect.engines import load_engine
from rs_detect.engines.torch import TorchScriptEngine, _Graph, load_torchscript
from rs_detect.errors import ConfigError, EngineUnavailableError, ModelError
from rs_detect.io.reader import RasterSource
from rs_detect.postprocess.decode import DecodeParams, decode
from rs_detect.postprocess.nms import nms_per_tile
from rs_detect.preprocess import Normalizer


@pytest.fixture(scope="module")
def ts_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mini_torchscript(tmp_path_factory.mktemp("ts") / "mini.torchscript")


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 64, 64), dtype=np.float32)


def test_metadata_from_config_txt_and_default_bounds(ts_path: Path) -> None:
    engine = TorchScriptEngine(ts_path)
    m = engine.meta
    assert m.names[:2] == ("plane", "ship") and m.nc == 15 and m.imgsz == 64 and m.channels == 1
    assert (m.min_batch, m.opt_batch, m.max_batch, m.dynamic_batch) == (1, 8, 32, True)
    assert engine.device == torch.device("cpu") and not engine.half and engine.input_dtype == np.float32
    _, raw = load_torchscript(ts_path)
    assert raw["batch"] == 2 and raw["imgsz"] == [64, 64]


def test_output_matches_the_eager_model(ts_path: Path) -> None:
    engine = TorchScriptEngine(ts_path)
    x = _images(5)
    out = engine.infer(x)
    with torch.no_grad():
        ref = MiniYolo().eval()(torch.from_numpy(x))  # same seed -> same weights as the traced one
    assert out.dtype == torch.float32 and out.device.type == "cpu" and tuple(out.shape) == (5, 19, 84)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(engine.infer(torch.from_numpy(x[:2])), ref[:2], rtol=1e-5, atol=1e-4)


def test_model_yaml_sets_batch_bounds_and_names(ts_path: Path, tmp_path: Path) -> None:
    engine = TorchScriptEngine(ts_path, model_yaml={"batch": {"min": 2, "opt": 4, "max": 6}})
    assert (engine.meta.min_batch, engine.meta.opt_batch, engine.meta.max_batch) == (2, 4, 6)
    out = engine.infer(_images(13))  # split 6 + 6 + 1 (padded to 2)
    assert tuple(out.shape) == (13, 19, 84)
    sidecar = tmp_path / "mini.yaml"
    sidecar.write_text("names: [" + ", ".join(f"k{i}" for i in range(15)) + "]\n")
    copy = tmp_path / "mini.torchscript"
    copy.write_bytes(ts_path.read_bytes())
    assert TorchScriptEngine(copy).meta.names[0] == "k0"


def test_decode_and_nms_run_on_its_output(ts_path: Path) -> None:
    engine = TorchScriptEngine(ts_path)
    raw = engine.infer(_images(3))
    params = DecodeParams.build(engine.meta, conf=0.5, conf_by_class=None, classes=None)
    dets = nms_per_tile(decode(raw, engine.meta, params), iou=0.5, max_det=50, num_classes=engine.meta.nc)
    assert dets.boxes.device == raw.device and len(dets) > 0
    assert int(dets.tile_ids.max()) <= 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(ts_path: Path) -> None:
    with pytest.raises(EngineUnavailableError, match="PyTorch sees no CUDA GPU"):
        TorchScriptEngine(ts_path, device="cuda")


def test_bad_files_and_devices(tmp_path: Path, ts_path: Path) -> None:
    junk = tmp_path / "junk.torchscript"
    junk.write_bytes(b"nope")
    with pytest.raises(ModelError, match="not a TorchScript model"):
        TorchScriptEngine(junk)
    with pytest.raises(ModelError, match="not found"):
        TorchScriptEngine(tmp_path / "missing.torchscript")
    with pytest.raises(ConfigError, match="not supported|unknown device"):  # a setting, as in a config file
        TorchScriptEngine(ts_path, device="tpu")


def test_plain_torchscript_without_config_txt(tmp_path: Path) -> None:
    """A TorchScript saved without Ultralytics metadata: DOTA defaults + a model YAML for imgsz."""
    path = tmp_path / "plain.torchscript"
    torch.jit.trace(MiniYolo().eval(), torch.zeros(1, 1, 64, 64), check_trace=False).save(str(path))
    engine = TorchScriptEngine(path, model_yaml={"imgsz": 64})
    assert engine.meta.nc == 15 and tuple(engine.infer(_images(2)).shape) == (2, 19, 84)
    bad = tmp_path / "badmeta.torchscript"
    torch.jit.trace(MiniYolo().eval(), torch.zeros(1, 1, 64, 64), check_trace=False).save(str(bad), _extra_files={"config.txt": "{oops"})
    with pytest.raises(ModelError, match="config.txt metadata is not JSON"):
        TorchScriptEngine(bad)


def test_load_engine_picks_it_by_suffix(ts_path: Path) -> None:
    with load_engine(ts_path) as engine:
        assert isinstance(engine, TorchScriptEngine) and engine.backend == "torchscript"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp16_matches_cpu_fp32(ts_path: Path) -> None:
    cpu = TorchScriptEngine(ts_path, device="cpu")
    gpu = TorchScriptEngine(ts_path, device="cuda")
    assert gpu.half and gpu.input_dtype == np.float16 and gpu.meta.opt_batch == 16
    x = _images(20)
    out = gpu.infer(x.astype(np.float16))
    assert out.device.type == "cuda" and out.dtype == torch.float32
    ref = cpu.infer(x)
    scale = ref.abs().amax(dim=(0, 2), keepdim=True).clamp(min=1)
    assert float(((out.cpu() - ref).abs() / scale).max()) < 2e-2
    params = DecodeParams.build(gpu.meta, conf=0.5, conf_by_class=None, classes=None)
    assert decode(out, gpu.meta, params).boxes.device.type == "cuda"
    assert json.dumps(gpu.raw_metadata)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replay_matches_eager_for_full_padded_and_larger_batches(ts_path: Path) -> None:
    eager = TorchScriptEngine(ts_path, device="cuda", cuda_graphs=False)
    graphs = TorchScriptEngine(ts_path, device="cuda", cuda_graphs=True)
    graphs.warmup(8)
    assert graphs._graph is not None and graphs._graph.batch == 8 and eager._graph is None
    outs = []
    for n, seed in ((8, 1), (5, 2), (8, 3), (12, 4)):  # full, padded into the graph, full again, eager (too big)
        x = torch.from_numpy(_images(n, seed)).half().cuda()
        got, want = graphs.infer(x), eager.infer(x)
        assert got.shape == want.shape == (n, *want.shape[1:])
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
        outs.append(got)
    # each result is its own tensor: later replays did not overwrite the first batch's output
    torch.testing.assert_close(outs[0], eager.infer(torch.from_numpy(_images(8, 1)).half().cuda()), atol=2e-3, rtol=2e-3)


class _Syncs(torch.nn.Module):
    """A forward pass that synchronises (a data-dependent shape): it cannot be captured as a CUDA graph."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = MiniYolo()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + (x > 2).nonzero().sum() * 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_module_that_cannot_be_captured_runs_eagerly_with_a_warning(ts_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, meta = load_torchscript(ts_path)
    path = tmp_path / "syncs.torchscript"
    torch.jit.trace(_Syncs().eval(), torch.zeros(1, 1, 64, 64), check_trace=False).save(str(path), _extra_files={"config.txt": json.dumps(meta)})
    engine = TorchScriptEngine(path, device="cuda")
    with caplog.at_level("WARNING", logger="rs_detect.engines.torch"):
        engine.warmup(4)
    assert not engine.cuda_graphs and engine._graph is None
    assert "cannot be captured as a CUDA graph" in caplog.text
    x = torch.from_numpy(_images(4)).half().cuda()
    assert engine.infer(x).shape[0] == 4  # eager, and the CUDA context still works


def test_capture_failure_falls_back_to_eager_once(ts_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The fallback's logic on the CPU: a capture that raises leaves a working eager engine and one warning."""
    from rs_detect.engines import torch as ts

    engine = TorchScriptEngine(ts_path, device="cpu")
    engine.cuda_graphs = True  # as on CUDA; capture itself needs a GPU, so it is made to fail here
    calls: list[int] = []

    def refuse(fn: object, inputs: tuple[torch.Tensor, ...]) -> object:
        calls.append(int(inputs[0].shape[0]))
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(engine, "_capture", refuse)
    monkeypatch.setattr(ts.torch.cuda, "synchronize", lambda *a: None)
    want = TorchScriptEngine(ts_path, device="cpu").infer(_images(3))
    with caplog.at_level("WARNING", logger="rs_detect.engines.torch"):
        got = engine.infer(_images(3))  # the first batch tries to capture, then runs eagerly
        again = engine.infer(_images(3))  # no second attempt
    assert calls == [3] and not engine.cuda_graphs
    assert caplog.text.count("cannot be captured as a CUDA graph") == 1
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(again, want)


def test_cuda_graphs_are_off_on_the_cpu_and_by_environment(ts_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = TorchScriptEngine(ts_path, device="cpu", cuda_graphs=True)
    assert not engine.cuda_graphs
    engine.warmup(4)  # nothing to capture on the CPU: a no-op
    assert engine._graph is None
    from rs_detect.engines import torch as ts

    monkeypatch.setenv("RS_DETECT_CUDA_GRAPHS", "0")
    assert not ts.cuda_graphs_default()
    monkeypatch.setenv("RS_DETECT_CUDA_GRAPHS", "1")
    assert ts.cuda_graphs_default()


def test_gpu_check_tool_runs_without_the_geo_packages(tmp_path: Path) -> None:
    """tools/gpu_check.py must run where rasterio/geopandas/shapely are absent (the GPU image)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    code = (
        "import runpy, sys\n"
        "for m in ('rasterio', 'affine', 'shapely', 'geopandas', 'pyogrio'):\n"
        "    sys.modules[m] = None\n"
        f"sys.argv = ['gpu_check', '--device', 'cpu', '--images', '3', '--timing-iters', '1', '--out', {str(tmp_path / 'r.json')!r}]\n"
        f"runpy.run_path({str(repo / 'tools' / 'gpu_check.py')!r}, run_name='__main__')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["environment"]["shimmed_modules"] == ["affine", "rasterio.windows"]
    assert report["detections"]["matched"] == report["detections"]["reference_boxes"] > 0
    assert report["raw"]["scores"]["max_abs_diff"] < 1e-4 and report["raw"]["box"]["p999_abs_diff"] < 1e-2
    assert res.stdout.startswith("PASS: cpu fp32 vs ONNX Runtime CPU fp32")


def _normalizers(tmp_path: Path, device: str, dtype: torch.dtype) -> list[Normalizer]:
    """Normalizers of two uint16 scenes with different stretches, and of one uint8 scene."""
    rng = np.random.default_rng(5)
    out = []
    for name, lo, hi, dt in (("a", 1000, 3000, np.uint16), ("b", 200, 60000, np.uint16), ("c", 0, 255, np.uint8)):
        src = RasterSource(write_tif(tmp_path / f"{name}.tif", rng.integers(lo, hi, (80, 90)).astype(dt)))
        out.append(Normalizer(src, torch.device(device), dtype, fill_value=0.25))
    return out


def _raw(n: int, dtype: torch.dtype, seed: int, masked: bool, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 255 if dtype == torch.uint8 else 4000, (n, 1, 64, 64), generator=g).to(dtype)
    valid = (torch.rand((n, 64, 64), generator=g) > 0.3) if masked else None
    return raw.to(device), None if valid is None else valid.to(device)


class _EagerGraph:
    """Stands in for a CUDA graph on the CPU: replay() runs the captured function on the static inputs again."""

    def __init__(self, fn, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:  # noqa: ANN001
        self.fn, self.inputs, self.output, self.replays = fn, inputs, output, 0

    def replay(self) -> None:
        self.replays += 1
        with torch.inference_mode():
            self.output.copy_(self.fn(*self.inputs))


def test_fused_scaling_graph_bookkeeping_on_the_cpu(ts_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """infer_normalized's graph logic (one graph per raw dtype; scaling, mask and padding copied into its
    own inputs) with the capture replaced by an eager stand-in: the same results as scaling, then infer."""
    engine = TorchScriptEngine(ts_path, device="cpu")
    ref = TorchScriptEngine(ts_path, device="cpu")
    engine.cuda_graphs = True
    captured: list[tuple[torch.dtype, int]] = []

    def capture(fn, inputs):  # noqa: ANN001, ANN202
        static = tuple(t.clone() for t in inputs)
        with torch.inference_mode():
            output = fn(*static).clone()
        captured.append((static[0].dtype, int(static[0].shape[0])))
        return _Graph(_EagerGraph(fn, static, output), static, output)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "_capture", capture)
    engine.warmup(4)  # the model-only graph, batch 4
    a, b, c = _normalizers(tmp_path, "cpu", torch.float32)
    assert a.params[0] != b.params[0] and a.graphable
    steps = [(a, 4, torch.uint16, False), (a, 3, torch.uint16, True), (a, 4, torch.uint16, False),  # full, padded + mask, mask gone
             (b, 4, torch.uint16, False), (c, 2, torch.uint8, True), (a, 4, torch.uint16, True)]   # new scaling, new dtype, back
    outs = []
    for i, (norm, n, dtype, masked) in enumerate(steps):
        raw, valid = _raw(n, dtype, i, masked)
        got = engine.infer_normalized(raw, valid, norm)
        want = ref.infer(norm.apply(raw.clone(), valid))
        assert got.shape == (n, 19, 84)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        outs.append((got, want))
    assert captured == [(torch.float32, 4), (torch.uint16, 4), (torch.uint8, 4)]  # model only, then one per raw dtype
    assert len(engine._fused) == 2
    for got, want in outs:  # each result is its own tensor: later replays did not overwrite it
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    raw, _ = _raw(6, torch.uint16, 9, False)  # larger than the graph: eager, still right
    torch.testing.assert_close(engine.infer_normalized(raw, None, a), ref.infer(a.apply(raw.clone(), None)), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fused_scaling_graph_matches_scaling_then_eager(ts_path: Path, tmp_path: Path) -> None:
    graphs = TorchScriptEngine(ts_path, device="cuda", cuda_graphs=True)
    eager = TorchScriptEngine(ts_path, device="cuda", cuda_graphs=False)
    graphs.warmup(4)
    a, b, c = _normalizers(tmp_path, "cuda", torch.float16)
    outs = []
    for i, (norm, n, dtype, masked) in enumerate([(a, 4, torch.uint16, False), (a, 3, torch.uint16, True), (a, 4, torch.uint16, False),
                                                  (b, 4, torch.uint16, False), (c, 2, torch.uint8, True), (a, 4, torch.uint16, True)]):
        raw, valid = _raw(n, dtype, i, masked, "cuda")
        got = graphs.infer_normalized(raw, valid, norm)
        want = eager.infer(norm.apply(raw.clone(), valid))
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
        outs.append((got, want))
    assert len(graphs._fused) == 2 and graphs.cuda_graphs
    for got, want in outs:
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_scene_through_fused_graphs_matches_the_eager_run(ts_path: Path, tmp_path: Path) -> None:
    """A whole uint16 scene (nodata corner, padded edge tiles) on CUDA: graphs and eager give the same detections.

    54 tiles in batches of 6: every batch is full, so both runs use the same kernels (a padded batch
    could pick other convolution kernels, and one of these ~900 random-weight boxes could flip)."""
    from rs_detect.config import Config
    from rs_detect.pipeline import ScenePipeline

    rng = np.random.default_rng(11)
    img = rng.integers(300, 3800, (300, 430)).astype(np.uint16)
    img[:40, :50] = 0
    path = write_tif(tmp_path / "scene.tif", img, nodata=0)
    cfg = Config(tile_size=64, overlap=16, batch_size=6, device="cuda", read_threads=3, classes=None, conf=0.5)
    runs = []
    for graphs in (True, False):
        engine = TorchScriptEngine(ts_path, device="cuda", cuda_graphs=graphs)
        runs.append(ScenePipeline(engine, cfg).run(path))
        assert engine.cuda_graphs == graphs and (len(engine._fused) == 1) == graphs
    fused, eager = (r.detections for r in runs)
    assert len(eager) > 10 and len(fused) == len(eager)
    torch.testing.assert_close(fused.boxes, eager.boxes, atol=0.05, rtol=0)
    torch.testing.assert_close(fused.scores, eager.scores, atol=2e-3, rtol=0)
    assert runs[0].stats.tiles_read == runs[1].stats.tiles_read == runs[0].stats.tiles_total == 54
