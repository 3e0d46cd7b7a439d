"""One worker per GPU (issue 21), on the CPU: the GPU list is faked through CUDA_VISIBLE_DEVICES, and the
pinned workers run the CPU engine while recording the GPU their process was given."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import export_tiny_onnx, write_tif
from rs_detect.batch import run_batch
from rs_detect.batch.gpus import plan_gpus, visible_gpus
from rs_detect.cli import cli
from rs_detect.config import Config
from rs_detect.errors import ConfigError


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0, 2,3")
    assert visible_gpus() == ["0", "2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_gpus() == []


def test_plan_gpus_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2,3")
    assert plan_gpus("cuda", None, None, None) == ["0", "2", "3"]  # the default: every visible GPU
    assert plan_gpus("cuda", ("0", "3"), None, None) == ["0", "3"]
    assert plan_gpus("cuda", None, 2, None) == ["0", "2"]
    assert plan_gpus("cuda:1", None, None, None) is None  # an explicit device: no pinning
    assert plan_gpus("cpu", None, 2, None) is None
    assert plan_gpus("cuda", None, None, "tcp://h:8786") is None
    with pytest.raises(ConfigError, match=r"GPU 5 is not visible \(visible: 0, 2, 3\)"):
        plan_gpus("cuda", ("5",), None, None)
    with pytest.raises(ConfigError, match="needs --device cuda"):
        plan_gpus("cpu", ("0",), None, None)
    with pytest.raises(ConfigError, match="does not match --gpus"):
        plan_gpus("cuda", ("0", "2"), 3, None)
    with pytest.raises(ConfigError, match="only 3 GPUs are visible"):
        plan_gpus("cuda", None, 4, None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert plan_gpus("cuda", None, None, None) is None  # one GPU: serial, as before


def test_cli_gpus_usage(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["batch", str(tmp_path), "-o", str(tmp_path / "o"), "--gpus", "0"])
    assert r.exit_code == 2 and "--gpus needs --device cuda" in r.output
    r = CliRunner().invoke(cli, ["batch", str(tmp_path), "-o", str(tmp_path / "o"), "--gpus", "0", "--device", "cuda", "--scheduler", "tcp://h:1"])
    assert r.exit_code == 2 and "exclude each other" in r.output


def test_one_worker_per_gpu_records_each_scenes_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two fake GPUs: two worker processes, each started with its own CUDA_VISIBLE_DEVICES; every scene
    says which one ran it, and the table counts scenes per GPU."""
    model = export_tiny_onnx(tmp_path / "tiny.onnx")
    (tmp_path / "a").mkdir()
    img = np.full((200, 200), 20, np.uint8)
    img[40:72, 40:72] = 250
    for i in range(6):
        write_tif(tmp_path / "a" / f"s{i}.tif", np.roll(img, 9 * i, axis=0))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    summary = run_batch([tmp_path / "a"], tmp_path / "out", Config(model=str(model), tile_size=64, overlap=16), gpus=["3", "5"])
    assert summary.mode == "dask-local" and summary.workers == 2 and summary.gpus == ["3", "5"]
    gpus = {o.scene: o.gpu for o in summary.outcomes.values()}
    assert len(gpus) == 6 and set(gpus.values()) <= {"3", "5"} and all(o.status == "done" for o in summary.outcomes.values())
    workers = {o.worker for o in summary.outcomes.values()}
    assert len(workers) <= 2  # one process per GPU
    by_worker = {}
    for o in summary.outcomes.values():
        by_worker.setdefault(o.worker, set()).add(o.gpu)
    assert all(len(g) == 1 for g in by_worker.values())  # a worker process always reports the same GPU
    written = json.loads((tmp_path / "out" / "_run_summary.json").read_text())
    assert written["gpus"] == ["3", "5"] and {s["gpu"] for s in written["scenes"]} <= {"3", "5"}
    assert "scenes per GPU: 3 " in summary.table()
