"""Faults a real archive brings, run as users meet them: in a subprocess, where a crash fails the test.

A truncated scene must end in exit 1 with one ``error:`` line that names the file and keeps GDAL's
cause, never a segmentation fault (dataset handles closed while reader threads still read them), and
no output. Ctrl-C mid-run must end in exit 130 with one ``error: ... interrupted`` line and no file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import write_tif

ROOT = Path(__file__).resolve().parent.parent


def rs_detect(*args: object, **kw: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "rs_detect", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)  # type: ignore[call-overload]


def truncated(tmp_path: Path, dtype: str, fraction: float, size: int = 2048) -> Path:
    """A tiled, DEFLATE-compressed scene of ``dtype`` cut to ``fraction`` of its bytes."""
    rng = np.random.default_rng(4)
    base = rng.gamma(2.0, 0.15, (size, size)).clip(0, 1)
    scale = {"uint8": 250, "uint16": 4000, "int16": 3000, "float32": 1.0}[dtype]
    full = write_tif(tmp_path / f"{dtype}.tif", (base * scale).astype(dtype), blockxsize=512, blockysize=512)
    data = full.read_bytes()
    cut = tmp_path / f"{dtype}_{int(fraction * 100)}.tif"
    cut.write_bytes(data[: int(len(data) * fraction)])
    return cut


def assert_clean_read_failure(proc: subprocess.Popen[str], scene: Path, out: Path) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, f"exit {proc.returncode} (139 is a segmentation fault): {err[-2000:]}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert scene.name in errors[0]
    assert "See previous exception" not in errors[0] and "IReadBlock failed" in errors[0], errors[0]  # GDAL's own cause
    assert not out.exists() and not list(out.parent.glob(f".{out.stem}.*tmp*"))


def test_a_truncated_uint16_scene_fails_cleanly_every_time(tmp_path: Path) -> None:
    """issue 20's case: a uint16 scene cut to 5 %, run 10 times (it crashed with exit 139 in about half)."""
    scene = truncated(tmp_path, "uint16", 0.05)
    out = tmp_path / "t5.geojson"
    for _ in range(10):
        assert_clean_read_failure(rs_detect(scene, "-o", out, "-q"), scene, out)


@pytest.mark.parametrize(("dtype", "fraction"), [("uint8", 0.3), ("int16", 0.5), ("float32", 0.8), ("uint16", 0.95)])
def test_scenes_truncated_at_other_lengths_fail_cleanly(tmp_path: Path, dtype: str, fraction: float) -> None:
    scene = truncated(tmp_path, dtype, fraction)
    out = tmp_path / "t.geojson"
    for _ in range(3):
        assert_clean_read_failure(rs_detect(scene, "-o", out, "-q"), scene, out)


def wait_until_open(proc: subprocess.Popen[str], path: Path, timeout: float = 300.0) -> bool:
    """Wait until ``proc`` has ``path`` open (Linux: /proc/PID/fd), i.e. the run is under way; False if it ended first."""
    fd_dir = Path(f"/proc/{proc.pid}/fd")
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if not fd_dir.is_dir():  # no /proc: a generous delay instead
            time.sleep(15)
            return proc.poll() is None
        try:
            if any(os.path.realpath(fd) == str(path.resolve()) for fd in fd_dir.iterdir()):
                return True
        except OSError:  # an fd closed while listing
            pass
        time.sleep(0.05)
    return proc.poll() is None


def test_ctrl_c_stops_every_thread_and_exits_130_with_one_line(tmp_path: Path) -> None:
    """SIGINT mid-scene: exit 130, one ``error: ... interrupted`` line (not click's ``Aborted!``), no file.

    The scene takes the bundled model tens of seconds on a CPU; the signal comes at two moments after the
    scene was opened: while the first tiles and the stretch are read, and during inference.
    """
    rng = np.random.default_rng(1)
    scene = write_tif(tmp_path / "big.tif", rng.integers(0, 255, (6144, 6144), dtype=np.uint8), blockxsize=512, blockysize=512)
    out = tmp_path / "big.geojson"
    for delay in (0.2, 3.0):
        proc = rs_detect(scene, "-o", out, "-q")
        assert wait_until_open(proc, scene), proc.communicate()[1][-2000:]
        time.sleep(delay)
        assert proc.poll() is None, "the run ended before the signal"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        stopped_in = time.monotonic() - t0
        assert proc.returncode == 130, err[-2000:]
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "interrupted" in errors[0] and scene.name in errors[0], err
        assert "Traceback" not in err and "Aborted" not in err, err
        assert not out.exists() and not list(tmp_path.glob(".big.*tmp*"))
        assert stopped_in < 30, stopped_in
