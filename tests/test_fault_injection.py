"""Fault injection: truncated scenes of every dtype, a full disk for every output format, SIGINT and
SIGKILL at random moments of detect and batch, a killed Dask run, two batch runs on one folder.

Everything runs ``rs-detect`` in a subprocess (a crash must fail the test: exit codes and stderr are
checked, a signal exit is a failure) on data generated here. The targets: no traceback, no exit code
above 2 other than 130, no partial or stale file, no scene lost or done twice. Case counts are
printed at the end of the run (tests/fault_counts.py). The malformed-metadata fuzzing is in
tests/test_faults_metadata.py; a Dask worker killed mid-run in tests/test_batch.py; the reader's
own truncation and Ctrl-C cases in tests/test_faults.py.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from conftest import export_tiny_onnx, write_tif
from fault_counts import record
from rs_detect.cli import cli

REPO = Path(__file__).resolve().parents[1]
TILE = ["--tile-size", "64", "--overlap", "16"]
DTYPES = ["uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64"]
FRACTIONS = (0.05, 0.4, 0.9)
RNG = random.Random(20)  # the "random moments": reproducible


def command() -> list[str]:
    script = Path(sys.executable).parent / "rs-detect"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "rs_detect"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def start(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen([*command(), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(), start_new_session=True)


def catching_sigint(p: subprocess.Popen[str], timeout: float = 60) -> None:
    """Wait until the process handles SIGINT (Python installs its handler as it starts; before that a
    SIGINT ends any program silently, which says nothing about rs-detect)."""
    deadline = time.monotonic() + timeout
    status = Path(f"/proc/{p.pid}/status")
    while time.monotonic() < deadline and p.poll() is None:
        try:
            caught = next(ln for ln in status.read_text().splitlines() if ln.startswith("SigCgt:"))
        except (OSError, StopIteration):
            return  # no /proc: the startup margin of the caller has to do
        if int(caught.split()[1], 16) & (1 << (signal.SIGINT - 1)):
            return
        time.sleep(0.01)


def finish(p: subprocess.Popen[str], timeout: float = 240) -> tuple[int, str]:
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err


def assert_clean(rc: int, err: str, allowed: tuple[int, ...] = (0, 1)) -> None:
    """No crash, no traceback, no raw GDAL line; every line says what it is."""
    assert rc in allowed, f"exit {rc}: {err[-2000:]}"
    assert "Traceback" not in err, err[-3000:]
    for line in err.splitlines():
        assert line == "" or line.startswith(("error:", "warning:", "info:", "interrupted")), line


def leftovers(folder: Path) -> list[Path]:
    """Temporary or lock files anywhere below ``folder``."""
    return [p for p in folder.rglob(".*") if ".tmp" in p.name or p.name.endswith(".lock") or ".rsd-" in p.name]


def many_squares(h: int = 512, w: int = 512) -> np.ndarray:
    img = np.full((h, w), 20, dtype=np.uint8)
    for y in range(8, h - 30, 40):
        for x in range(8, w - 30, 40):
            img[y:y + 24, x:x + 24] = 250
    return img


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_onnx(tmp_path_factory.mktemp("fault_model") / "tiny.onnx", imgsz=64)


# -- truncated scenes ----------------------------------------------------------------------------------


def truncated_archive(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    rng = np.random.default_rng(7)
    base = many_squares(256, 256).astype(np.float64)
    for dtype in DTYPES:
        info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
        data = base * (info.max / 300 if info else 1.0) + rng.normal(0, 2, base.shape)
        data = np.clip(data, info.min, info.max) if info else data
        full = folder / f"full_{dtype}.tif"
        try:
            write_tif(full, data.astype(dtype), blockxsize=64, blockysize=64)
        except (rasterio.errors.RasterioError, TypeError, ValueError):  # a GDAL without this type
            continue
        blob = full.read_bytes()
        full.unlink()
        for frac in FRACTIONS:
            cut = folder / f"{dtype}_{int(frac * 100):02d}.tif"
            cut.write_bytes(blob[: max(8, int(len(blob) * frac))])
            made.append(cut)
    return made


def test_truncated_scenes_of_every_dtype_in_batch(tmp_path: Path, model: Path) -> None:
    scenes = truncated_archive(tmp_path / "cut")
    assert len(scenes) >= 7 * len(FRACTIONS)  # int8 needs GDAL >= 3.7; the rest always
    out = tmp_path / "out"
    runs = 3
    for i in range(runs):
        rc, err = finish(start("batch", tmp_path / "cut", "-o", out, "--model", model, *TILE, "-q", "--force"))
        assert_clean(rc, err)
        summary = json.loads((out / "_run_summary.json").read_text())
        assert len(summary["scenes"]) == len(scenes) and summary["counts"]["skipped"] == 0
        for s in summary["scenes"]:
            if s["status"] == "failed":
                assert s["scene"].split("/")[-1] in s["error"] and "\n" not in s["error"]
                assert not (out / s["scene"]).with_suffix(".geojson").exists()
            else:
                json.loads((out / s["scene"]).with_suffix(".geojson").read_text())  # complete
        failed_lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(failed_lines) == summary["counts"]["failed"]
        assert not leftovers(out)
    for scene in scenes:
        record(f"truncated {scene.stem} (batch, serial)", runs)


def test_truncated_uint16_scene_detect_repeated(tmp_path: Path, model: Path) -> None:
    """The audit's repro, smaller: a uint16 scene cut to 5 % of its size, run again and again."""
    img = (many_squares(1024, 1024).astype(np.uint16) * 200 + 300)
    full = write_tif(tmp_path / "u16.tif", img, blockxsize=64, blockysize=64)
    cut = tmp_path / "t5.tif"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 20])
    out = tmp_path / "t5.geojson"
    runs = 4
    for _ in range(runs):
        rc, err = finish(start(cut, "--model", model, *TILE, "-o", out, "-q"))
        assert_clean(rc, err)
        assert (rc == 0) == out.exists() and not leftovers(tmp_path)
    record("truncated uint16 5% (detect)", runs)


# -- a full disk -------------------------------------------------------------------------------------------


@pytest.fixture
def full_disk(tmp_path: Path):
    """A folder with almost no room: a 256 KiB tmpfs filled to 8 KiB free where it can be mounted
    (root), else None (the tests then inject ENOSPC into the writers)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode == 0 \
        if hasattr(os, "geteuid") and os.geteuid() == 0 else False
    if not ok:
        yield None, mnt
        return
    try:
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        (mnt / "filler").write_bytes(b"\0" * max(0, free - 8192))
        yield mnt / "filler", mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def inject_enospc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a small file system: every writer writes a little, then fails as a full disk does."""
    import geopandas as gpd

    import rs_detect.io.writer as writer

    def partial_then_full(path: object, *args: object, **kwargs: object) -> None:
        Path(str(path)).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gpd.GeoDataFrame, "to_file", lambda self, path, *a, **k: partial_then_full(path))
    monkeypatch.setattr(writer, "_write_parquet", lambda gdf, path, meta: partial_then_full(path))


@pytest.mark.parametrize("fmt", ["geojson", "gpkg", "parquet"])
def test_full_disk_is_one_line_for_every_format(full_disk: tuple[Path | None, Path], tmp_path: Path, model: Path,
                                                fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    filler, disk = full_disk
    if filler is None:
        inject_enospc(monkeypatch)
    scene = write_tif(tmp_path / "many.tif", many_squares())
    out = disk / f"many.{fmt}"
    res = CliRunner().invoke(cli, [str(scene), "--model", str(model), *TILE, "-o", str(out), "-q"])
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.output, res.stderr
    assert str(out) in lines[0] and ("no space" in lines[0].lower() or "No space" in lines[0]), lines[0]
    assert sorted(p.name for p in disk.iterdir()) == ([filler.name] if filler else [])  # nothing partial left
    record(f"full disk: detect -o .{fmt} ({'tmpfs' if filler else 'ENOSPC injected'})")


def test_full_disk_batch(full_disk: tuple[Path | None, Path], tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    filler, disk = full_disk
    if filler is None:
        inject_enospc(monkeypatch)
    (tmp_path / "a").mkdir()
    for i in range(3):
        write_tif(tmp_path / "a" / f"s{i}.tif", many_squares())
    out = disk / "out"
    res = CliRunner().invoke(cli, ["batch", str(tmp_path / "a"), "-o", str(out), "--model", str(model), *TILE, "-q"])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("error:") for ln in lines), res.stderr
    assert any("space" in ln.lower() for ln in lines), res.stderr
    done = [p for p in disk.rglob("*.done.json")]
    assert not done and not leftovers(disk)  # no scene claims to be finished, nothing partial
    record(f"full disk: batch of 3 ({'tmpfs' if filler else 'ENOSPC injected'})")


# -- signals at random moments -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fault_archive")
    for i in range(6):
        write_tif(folder / f"s{i}.tif", np.roll(many_squares(), 7 * i, axis=1))
    return folder


def timed_run(*args: object) -> float:
    t0 = time.perf_counter()
    rc, err = finish(start(*args))
    assert_clean(rc, err, (0,))
    return time.perf_counter() - t0


@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_detect_stopped_at_random_moments(archive: Path, tmp_path: Path, model: Path, sig: str) -> None:
    scene = archive / "s0.tif"
    out = tmp_path / "s0.geojson"
    whole = timed_run(scene, "--model", model, *TILE, "-o", out, "-q")
    reference = json.loads(out.read_text())["features"]
    out.unlink()
    runs = 2
    for _ in range(runs):
        p = start(scene, "--model", model, *TILE, "-o", out, "-q")
        catching_sigint(p)
        time.sleep(RNG.uniform(0, whole))
        p.send_signal(getattr(signal, sig))
        rc, err = finish(p)
        if sig == "SIGINT":
            assert_clean(rc, err, (0, 130))
            assert len([ln for ln in err.splitlines() if ln.strip()]) <= 1
            assert not leftovers(tmp_path)
        else:
            assert rc in (0, -9), err
        if out.exists():  # finished before the signal: complete
            assert json.loads(out.read_text())["features"] == reference
            out.unlink()
    # whatever a killed run left, the next run removes it and writes the output
    rc, err = finish(start(scene, "--model", model, *TILE, "-o", out, "-q"))
    assert_clean(rc, err, (0,))
    assert json.loads(out.read_text())["features"] == reference and not leftovers(tmp_path)
    record(f"detect {sig} at a random moment", runs)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_batch_stopped_at_random_moments_resumes_each_scene_once(archive: Path, tmp_path: Path, model: Path, sig: str) -> None:
    out = tmp_path / "out"
    args = ("batch", archive, "-o", out, "--model", model, *TILE, "-q")
    whole = timed_run(*args, "-o", tmp_path / "reference")
    runs = 2 if sig == "SIGINT" else 1
    for i in range(runs):
        target = out / str(i)
        p = start(*args[:3], target, *args[4:])
        catching_sigint(p)
        time.sleep(RNG.uniform(0, whole))
        p.send_signal(getattr(signal, sig))
        rc, err = finish(p)
        manifests = {m.name.removesuffix(".geojson.done.json") for m in target.glob("*.done.json")}
        if sig == "SIGINT":
            assert_clean(rc, err, (0, 130))
            if rc == 130:
                assert err.strip().startswith("interrupted") and len(err.strip().splitlines()) == 1, err
                if (target / "_run_summary.json").exists():
                    summary = json.loads((target / "_run_summary.json").read_text())
                    done = {s["scene"].removesuffix(".tif") for s in summary["scenes"] if s["status"] == "done"}
                    assert done == manifests  # the summary matches the manifests on disk
        else:
            assert rc in (0, -9), err
        # the next run: no stale lock, no leftovers, and every scene exactly once over both runs
        rc, err = finish(start(*args[:3], target, *args[4:]))
        assert_clean(rc, err, (0,))
        summary = json.loads((target / "_run_summary.json").read_text())
        skipped = {s["scene"].removesuffix(".tif") for s in summary["scenes"] if s["status"] == "skipped"}
        done = {s["scene"].removesuffix(".tif") for s in summary["scenes"] if s["status"] == "done"}
        assert skipped == manifests and done.isdisjoint(manifests) and len(done | skipped) == 6
        assert not leftovers(target)
    record(f"batch (serial) {sig} at a random moment, then resumed", runs)


def test_batch_with_dask_workers_interrupted(archive: Path, tmp_path: Path, model: Path) -> None:
    """Ctrl-C (to the whole process group, as a terminal sends it) while 2 local workers run scenes."""
    out = tmp_path / "out"
    p = start("batch", archive, "-o", out, "--model", model, *TILE, "-q", "--workers", "2")
    deadline = time.monotonic() + 180
    while not list(out.glob("*.done.json")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the cluster is up and scenes are being finished
    t0 = time.perf_counter()
    os.killpg(p.pid, signal.SIGINT)
    rc, err = finish(p)
    took = time.perf_counter() - t0
    assert_clean(rc, err, (0, 130))
    if rc == 130:
        assert len([ln for ln in err.splitlines() if ln.strip()]) == 1 and took < 10, (err, took)
        summary = json.loads((out / "_run_summary.json").read_text())
        done = {s["scene"] for s in summary["scenes"] if s["status"] == "done"}
        assert done == {m.name.removesuffix(".geojson.done.json") + ".tif" for m in out.glob("*.done.json")}
    assert not leftovers(out)
    rc, err = finish(start("batch", archive, "-o", out, "--model", model, *TILE, "-q"))
    assert_clean(rc, err, (0,))
    summary = json.loads((out / "_run_summary.json").read_text())
    assert summary["counts"]["done"] + summary["counts"]["skipped"] == 6
    record("batch --workers 2: Ctrl-C to the process group, then resumed")


# -- two runs on one folder --------------------------------------------------------------------------------


def test_two_batch_runs_on_one_folder(archive: Path, tmp_path: Path, model: Path) -> None:
    out = tmp_path / "out"
    args = ("batch", archive, "-o", out, "--model", model, *TILE, "-q")
    first = start(*args)
    lock = out / ".rs-detect.lock"
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text()) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    second = start(*args)
    rc2, err2 = finish(second)
    waiting = start(*args, "--wait")
    rc1, err1 = finish(first)
    rc3, err3 = finish(waiting)
    assert_clean(rc1, err1, (0,))
    if rc2 == 1:  # refused while the first held the folder
        assert_clean(rc2, err2)
        assert f"pid {first.pid}" in err2 and "another rs-detect batch run" in err2 and "--wait" in err2
        assert len(err2.strip().splitlines()) == 1
    assert_clean(rc3, err3, (0,))
    assert [ln for ln in err3.splitlines() if ln.startswith("warning:")] in ([], [ln for ln in err3.splitlines() if "waiting" in ln])
    summary = json.loads((out / "_run_summary.json").read_text())
    assert summary["counts"] == {"done": 0, "skipped": 6, "failed": 0}  # the waiting run redid nothing
    assert not leftovers(out) and not lock.exists()
    record("two batch runs on one folder (+ one with --wait)")


def test_zz_fault_counts_were_recorded() -> None:
    from fault_counts import COUNTS

    assert all(n >= 1 for n in COUNTS.values())
