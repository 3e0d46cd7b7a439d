"""Start-up: the CPU path imports nothing it does not use, and what replaced an import gives the same answers.

* NMS: :func:`rs_detect.postprocess.nms.batched_nms` runs torchvision's compiled NMS op without the
  torchvision package (whose import brings torch._dynamo and sympy): identical to
  ``torchvision.ops.batched_nms``, including where torchvision switches strategy.
* The ``rs-detect`` command on the ONNX Runtime CPU path, run in a fresh process, never imports
  torchvision, torch._dynamo, sympy, onnx, ultralytics, matplotlib or TensorRT.
* GDAL's messages are routed in pyogrio's GDAL copy without importing pyogrio (and so pandas).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from conftest import two_squares, write_tif
from fake_tensorrt import mini_torchscript

from rs_detect.cli.startup import InBackground, cuda_device_asked, no_gc, start_cuda_early
from rs_detect.postprocess import nms as rs_nms

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "sample_data" / "demo_scene.tif"

#: imported by none of the ONNX Runtime CPU path's stages (checked on a whole run of the command)
NOT_ON_CPU_PATH = ("torchvision", "torch._dynamo", "sympy", "torch.fx.experimental.symbolic_shapes", "onnx", "ultralytics",
                   "matplotlib", "tensorrt", "pycuda", "distributed", "PIL")
#: nor by the TorchScript path, on the CPU or on CUDA (torch.distributed itself comes with ``import torch``)
NOT_ON_TORCH_PATH = ("torchvision", "torch._dynamo", "sympy", "torch.fx.experimental.symbolic_shapes", "torch.distributed.fsdp",
                     "torch._inductor", "onnxruntime", "onnx", "ultralytics", "matplotlib", "tensorrt", "pycuda", "distributed", "PIL")


def child(code: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    os = __import__("os")
    env_path = os.pathsep.join([str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])  # the caller's too
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": env_path})


# -- NMS ------------------------------------------------------------------------------------------------


def random_boxes(rng: np.random.Generator, n: int, groups: int, extent: float = 200.0, size: float = 30.0,
                 ties: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xy = rng.uniform(0, extent, (n, 2))
    wh = rng.uniform(1, size, (n, 2))
    boxes = torch.from_numpy(np.concatenate([xy, xy + wh], 1).astype(np.float32))
    scores = rng.uniform(0, 1, n).astype(np.float32)
    if ties:  # a few distinct scores only: the order among equals must match too
        scores = np.round(scores * 4) / 4
    return boxes, torch.from_numpy(scores), torch.from_numpy(rng.integers(0, groups, n))


@pytest.mark.parametrize("n,groups,ties", [(0, 1, False), (1, 1, False), (40, 1, False), (300, 5, False), (300, 40, True),
                                           (999, 3, False), (1001, 3, False), (2500, 30, False), (2500, 7, True)])
def test_batched_nms_is_torchvisions(n: int, groups: int, ties: bool) -> None:
    import torchvision.ops

    rng = np.random.default_rng(n * 31 + groups)
    for iou in (0.3, 0.5, 0.7):
        boxes, scores, idxs = random_boxes(rng, n, groups, ties=ties)
        ours = rs_nms.batched_nms(boxes, scores, idxs, iou)
        assert ours.dtype == torch.int64
        assert torch.equal(ours, torchvision.ops.batched_nms(boxes, scores, idxs, iou))
        assert torch.equal(rs_nms.nms(boxes, scores, iou), torchvision.ops.nms(boxes, scores, iou))


def test_batched_nms_switches_strategy_where_torchvision_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """One NMS per group above ``VANILLA_ABOVE`` coordinates, offset boxes at or below: as torchvision."""
    import torchvision.ops.boxes as tv_boxes

    per_group: list[int] = []
    vanilla = tv_boxes._batched_nms_vanilla
    monkeypatch.setattr(tv_boxes, "_batched_nms_vanilla", lambda *a: per_group.append(1) or vanilla(*a))
    calls: list[int] = []
    ours = rs_nms.nms
    monkeypatch.setattr(rs_nms, "nms", lambda *a: calls.append(1) or ours(*a))
    rng = np.random.default_rng(5)
    limit = rs_nms.VANILLA_ABOVE["cpu"] // 4
    for n, expect_vanilla in ((limit, False), (limit + 1, True)):
        boxes, scores, idxs = random_boxes(rng, n, 3)
        per_group.clear()
        calls.clear()
        tv_boxes.batched_nms(boxes, scores, idxs, 0.5)
        rs_nms.batched_nms(boxes, scores, idxs, 0.5)
        assert bool(per_group) == expect_vanilla, f"torchvision's strategy at {n} boxes"
        assert len(calls) == (len(torch.unique(idxs)) if expect_vanilla else 1), f"ours at {n} boxes"


def test_nms_op_loads_without_the_torchvision_package(tmp_path: Path) -> None:
    res = child("""
        import sys, torch
        from rs_detect.postprocess.nms import batched_nms
        b = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [0., 0., 10., 10.]])
        keep = batched_nms(b, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 1]), 0.5)
        print(keep.tolist(), sorted(m for m in sys.modules if m.split('.')[0] in ('torchvision', 'sympy') or m.startswith('torch._dynamo')))
    """, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["[0,", "2]", "[]"]


# -- the command's imports ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_crop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1024 x 1024 of the bundled scene with planes and ships in it (the NMS runs on real candidates)."""
    out = tmp_path_factory.mktemp("startup") / "crop.tif"
    with rasterio.open(DEMO) as src:
        win = Window(1800, 1700, 1024, 1024)
        prof = src.profile | {"width": 1024, "height": 1024, "transform": src.window_transform(win)}
        with rasterio.open(out, "w", **prof) as dst:
            dst.write(src.read(window=win))
    return out


def run_modules(tmp_path: Path, *args: object) -> tuple[set[str], str]:
    """``rs-detect ARGS`` in a fresh process: the modules it had imported at its exit, and its stdout."""
    res = child(f"""
        import atexit, json, sys
        atexit.register(lambda: print("MODULES", json.dumps(sorted(sys.modules))))
        sys.argv = ["rs-detect", *{[str(a) for a in args]!r}]
        from rs_detect.cli import main
        main()
    """, tmp_path)
    assert res.returncode == 0, res.stderr
    assert " detections (" in res.stdout, res.stdout
    return set(json.loads(res.stdout.split("MODULES ", 1)[1])), res.stdout


def among(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in packages))


def test_cpu_run_imports_nothing_it_does_not_use(demo_crop: Path, tmp_path: Path) -> None:
    out = tmp_path / "crop.geojson"
    modules, _ = run_modules(tmp_path, demo_crop, "-o", out, "--device", "cpu")
    assert json.loads(out.read_text())["features"], "the crop has planes and ships: the NMS ran on them"
    assert {"onnxruntime", "geopandas", "rs_detect.postprocess.nms"} <= modules  # what the run does use
    assert not among(modules, NOT_ON_CPU_PATH)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_torchscript_run_imports_nothing_it_does_not_use(device: str, tmp_path: Path) -> None:
    """The PyTorch backend's path (``--model X.torchscript``): on CUDA the engine also captures its graph."""
    model = mini_torchscript(tmp_path / "mini.torchscript")
    scene = write_tif(tmp_path / "scene.tif", np.tile(two_squares(), (2, 2)))
    modules, _ = run_modules(tmp_path, scene, "--model", model, "--device", device, "--overlap", 16, "-o", tmp_path / "out.gpkg")
    assert "rs_detect.engines.torch" in modules and (tmp_path / "out.gpkg").is_file()
    assert not among(modules, NOT_ON_TORCH_PATH)


def test_gdal_messages_reach_pyogrios_gdal_without_importing_it(tmp_path: Path) -> None:
    res = child("""
        import sys
        from rs_detect import gdal_messages
        n = gdal_messages.route_to_logging()
        routed = sorted(lib._name for lib in gdal_messages._installed)
        bundled = gdal_messages._bundled_gdal("pyogrio")
        before = "pyogrio" in sys.modules, "pandas" in sys.modules
        import pyogrio
        print(n, before, bundled and bundled[0] in routed, gdal_messages._gdal_libraries() == routed)
    """, tmp_path)
    assert res.returncode == 0, res.stderr
    n, *rest = res.stdout.split(" ", 1)
    assert int(n) >= 1
    # pyogrio and pandas not imported to find the library; pyogrio, imported after, uses the copy routed
    assert rest[0].strip() in ("(False, False) True True", "(False, False) [] True")


# -- start-up helpers ----------------------------------------------------------------------------------


def test_in_background_returns_and_raises_in_the_caller() -> None:
    import threading

    seen: list[str] = []
    job = InBackground(lambda: seen.append(threading.current_thread().name) or 7, name="rs-test")
    assert job.result() == 7 and seen == ["rs-test"]
    inline = InBackground(lambda: threading.current_thread().name, name="rs-test", thread=False)
    assert inline.result() == threading.current_thread().name

    def boom() -> None:
        raise ValueError("from the thread")

    with pytest.raises(ValueError, match="from the thread"):
        InBackground(boom, name="rs-test").result()


@pytest.mark.parametrize(("argv", "index"), [
    (["s.tif", "--device", "cuda"], 0), (["detect", "s.tif", "--device=cuda:1"], 1), (["s.tif", "-o", "o.gpkg", "--device", "cuda:2"], 2),
    (["s.tif"], None), (["s.tif", "--device", "cpu"], None), (["batch", "/archive", "--device", "cuda"], None),
    (["--help"], None), (["s.tif", "--device", "cuda:x"], None), (["s.tif", "--", "--device", "cuda"], None), ([], None)])
def test_cuda_is_started_early_only_for_a_detect_command_on_a_cuda_device(argv: list[str], index: int | None) -> None:
    assert cuda_device_asked(argv) == index


def test_the_early_cuda_check_knows_every_command() -> None:
    """cuda_device_asked runs before the commands are imported, so it keeps their names itself."""
    from rs_detect.cli import cli
    from rs_detect.cli.startup import COMMANDS

    assert set(COMMANDS) == set(cli.commands)


def test_early_cuda_start_ends_quietly_and_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where there is no driver (this machine) or a GPU, the thread ends by itself and raises nothing."""
    thread = start_cuda_early(["s.tif", "--device", "cuda"])
    assert thread is not None and thread.daemon
    thread.join(30)
    assert not thread.is_alive()
    monkeypatch.setenv("RS_DETECT_EARLY_CUDA", "0")
    assert start_cuda_early(["s.tif", "--device", "cuda"]) is None
    assert start_cuda_early(["s.tif"]) is None


def test_no_gc_restores_the_collector(tmp_path: Path) -> None:
    import gc

    assert gc.isenabled()
    with no_gc():
        assert not gc.isenabled()
        with no_gc():
            pass
        assert not gc.isenabled()
    assert gc.isenabled()
    res = child("import gc, rs_detect.cli; print(gc.isenabled())", tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "True", res.stderr


def test_reader_threads_route_gdal_warnings_without_gdals_global_mutex(tmp_path: Path, demo_crop: Path) -> None:
    """The executor's reader threads, a thread that opens a scene, and the thread that routes get a GDAL
    handler of their own.

    GDAL calls its process-wide handler under a global mutex; the Python handler needs the GIL, and a
    thread calling GDAL while holding the GIL deadlocked against it (a truncated TIFF, whose every handle
    warns, hung about one run in 20 of the fault-injection repro). Here the process-wide handler is made
    GDAL's quiet one after routing: a warning raised in a thread still reaches the log only through that
    thread's own handler, so each line below shows which threads have one.
    """
    res = child("""
        import ctypes, logging, sys, threading
        from rs_detect import gdal_messages
        from rs_detect.executor import _Threads
        from rs_detect.plan import ExecutionPlan

        logging.basicConfig(stream=sys.stdout, format="%(message)s")
        gdal_messages.route_to_logging()
        rio = next(lib for lib in gdal_messages._installed if "rasterio" in lib._name)
        rio.CPLSetErrorHandler.argtypes = [ctypes.c_void_p]
        rio.CPLSetErrorHandler(ctypes.cast(rio.CPLQuietErrorHandler, ctypes.c_void_p))  # the global path: silent

        def warn(text):
            rio.CPLError(2, 1, b"%s", text.encode())

        warn("from the routing thread")
        t = threading.Thread(target=warn, args=("from a plain thread",)); t.start(); t.join()
        ex = ExecutionPlan(read_threads=2, cutter_threads=1, read_ahead=1, handover=1, decode_ahead=1, pin_memory=False,
                           gdal_cachemax_mb=None)
        with _Threads(ex) as threads:
            for f in [threads.readers.submit(warn, f"from reader {i}") for i in range(2)]:
                f.result()
            threads.cutters.submit(warn, "from a cutter").result()

        def open_then_warn():  # e.g. a Dask worker's thread running a scene
            from rs_detect.io.reader import RasterSource
            with RasterSource("SCENE"):
                pass
            warn("from a thread that opened a scene")
        t = threading.Thread(target=open_then_warn); t.start(); t.join()
    """.replace("SCENE", str(demo_crop)), tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "GDAL: from the routing thread"
    # not the plain thread nor the cutter
    assert sorted(lines[1:]) == ["GDAL: from a thread that opened a scene", "GDAL: from reader 0", "GDAL: from reader 1"]


# -- benchmarks/bench_startup.py ------------------------------------------------------------------------


def test_bench_startup_runs_the_command_and_reads_its_summary(demo_crop: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_startup
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    line = "demo.tif: 20 tiles read, 0 skipped (nodata), 36 detections (plane 15, ship 21) in 3.4 s -> o.geojson [read: GDAL]"
    assert bench_startup.scene_seconds(f"info: x\n{line}\n") == 3.4
    rows = bench_startup.parse_importtime("import time:       300 |       1200 | torch\nimport time:    10 |     2000 |   rs_detect.types\n")
    assert rows == [(0.0012, 0.0003, 0, "torch"), (0.002, 1e-05, 1, "rs_detect.types")]

    out, imports = tmp_path / "runs.json", tmp_path / "imports.txt"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_startup.py"), str(demo_crop), "--device", "cpu", "-n", "1",
                          "--no-warmup-run", "--json", str(out), "--importtime", str(imports), "--", "--batch-size", "2"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    (run,) = doc["runs"]
    assert run["wall"] > run["scene"] > 0 and abs(run["outside"] - (run["wall"] - run["scene"])) < 1e-6
    assert doc["command"][-2:] == ["--batch-size", "2"] and "med" in res.stdout
    top = [ln for ln in imports.read_text().splitlines() if ln and not ln.startswith("#")]
    assert len(top) > 20 and top[1].split()[-1] == "rs_detect.cli"  # the header, then the largest import
