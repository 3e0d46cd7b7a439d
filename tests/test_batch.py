"""Batch runs over an archive: discovery, outputs mirroring the tree, failures, resume, Dask, a lost worker.

Everything is generated: small GeoTIFFs in tmp_path and a tiny ONNX model whose "detector" turns bright
8x8 cells into high plane scores, so the pipeline produces real, deterministic detections.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from click.testing import CliRunner
from rasterio.transform import from_origin

from rs_detect import DOTA_CLASSES
from rs_detect.batch import (
    SUMMARY_NAME,
    RunIdentity,
    SceneOutcome,
    clear_pipeline_cache,
    config_digest,
    dask_client,
    discover_scenes,
    input_fingerprint,
    plan_jobs,
    read_detections,
    run_batch,
    why_not_complete,
)
from rs_detect.cli.batch import batch
from rs_detect.config import Config
from rs_detect.errors import InputError
from rs_detect.engines.onnxruntime import export_torch_module_onnx

pytestmark = pytest.mark.filterwarnings(
    "ignore::rasterio.errors.NotGeoreferencedWarning",  # the scene without CRS, on purpose
    "ignore:'crs' was not provided:UserWarning",  # its pixel-coordinate output
)

S = 64  # model input size
TILE = ["--tile-size", "64", "--overlap", "16"]
DASK_TIMEOUT = 120


class BlobDetector(torch.nn.Module):
    """[B,1,S,S] -> YOLOv8-shaped [B, 4+15, A]: each 8x8 cell's mean brightness is its 'plane' score.

    Stride-8 anchors carry a 12x12 box at the cell centre; the stride-16/32 anchors score zero.
    """

    def __init__(self, size: int = S, nc: int = 15) -> None:
        super().__init__()
        g = size // 8
        ys, xs = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
        self.register_buffer("cx", (xs.flatten().float() + 0.5) * 8)
        self.register_buffer("cy", (ys.flatten().float() + 0.5) * 8)
        self.nc = nc
        self.rest = (size // 16) ** 2 + (size // 32) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        cells = torch.nn.functional.avg_pool2d(x, 8).flatten(1)
        n = cells.shape[1]
        score = torch.sigmoid((cells - 0.5) * 20.0)
        wh = torch.full_like(cells, 12.0)
        cls = torch.cat([score.unsqueeze(1), torch.zeros(b, self.nc - 1, n)], 1)
        level8 = torch.cat([self.cx.expand(b, n).unsqueeze(1), self.cy.expand(b, n).unsqueeze(1),
                            wh.unsqueeze(1), wh.unsqueeze(1), cls], 1)
        return torch.cat([level8, torch.zeros(b, 4 + self.nc, self.rest)], 2)


@pytest.fixture(scope="session")
def blob_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-channel, 15-class YOLOv8-shaped ONNX model with Ultralytics-style metadata and dynamic batch."""
    return export_torch_module_onnx(BlobDetector(), tmp_path_factory.mktemp("model") / "blob.onnx", S, 1, DOTA_CLASSES)


def write_scene(path: Path, blobs: list[tuple[int, int]], size: tuple[int, int] = (150, 120), epsg: int | None = 32633,
                origin: tuple[float, float] = (500000.0, 4500000.0), seed: int = 0) -> Path:
    """A uint8 GeoTIFF with 16x16 bright squares at the given (col, row) corners."""
    w, h = size
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 40, size=(h, w), dtype=np.uint8)
    for col, row in blobs:
        data[row:row + 16, col:col + 16] = 250
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "width": w, "height": h, "count": 1, "dtype": "uint8"}
    if epsg is not None:
        profile.update(crs=f"EPSG:{epsg}", transform=from_origin(origin[0], origin[1], 0.5, 0.5))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
    return path


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    """Nested folders, two scenes named scene.tif, one .TIFF, a scene without CRS, one corrupt file."""
    root = tmp_path / "archive"
    write_scene(root / "a" / "scene.tif", [(20, 30), (100, 60)], seed=1)
    write_scene(root / "b" / "scene.tif", [(60, 40)], seed=2)
    write_scene(root / "b" / "deep" / "other.TIFF", [(10, 10), (120, 90)], seed=3)
    write_scene(root / "nocrs.tif", [(70, 70)], epsg=None, seed=4)
    (root / "corrupt.tif").write_text("this is not a GeoTIFF\n")
    (root / "notes.txt").write_text("ignored: not a tif\n")
    (root / ".hidden").mkdir()
    write_scene(root / ".hidden" / "skipme.tif", [], seed=5)
    return root


GOOD = ["a/scene.tif", "b/deep/other.TIFF", "b/scene.tif", "nocrs.tif"]


def invoke(*args: str) -> tuple[int, str, dict]:
    """Run ``batch`` through click; return exit code, output and the summary JSON."""
    result = CliRunner().invoke(batch, list(args), catch_exceptions=False)
    outdir = Path(args[args.index("-o") + 1])
    summary = json.loads((outdir / SUMMARY_NAME).read_text()) if (outdir / SUMMARY_NAME).exists() else {}
    return result.exit_code, result.output, summary


def statuses(summary: dict) -> dict[str, str]:
    return {s["scene"]: s["status"] for s in summary["scenes"]}


def mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != SUMMARY_NAME}


def frame_rows(path: Path) -> list[tuple]:
    gdf = read_detections(path)
    return sorted((r.class_name, round(r.score, 4), r.px_x1, r.px_y1, r.px_x2, r.px_y2, r.geometry.wkt)
                  for r in gdf.itertuples())


# -- discovery and fingerprints (no model) -------------------------------------------------------------


def test_discover_mirrors_tree_and_avoids_clashes(archive: Path, tmp_path: Path) -> None:
    scenes, root = discover_scenes([archive])
    rels = [s.relative_to(root).as_posix() for s in scenes]
    assert root == archive
    assert rels == sorted(GOOD + ["corrupt.tif"])  # case-insensitive *.tif/*.tiff, hidden folder pruned

    # two inputs: the common root is their parent, so a/ and b/ keep their names
    scenes, root = discover_scenes([archive / "a", archive / "b"], patterns=["*.tif"])
    assert root == archive
    jobs = plan_jobs(scenes, root, tmp_path / "out")
    assert [j.output.relative_to(tmp_path / "out").as_posix() for j in jobs] == ["a/scene.geojson", "b/scene.geojson"]

    # a glob and an explicit file (taken whatever its extension)
    extra = archive / "img.jp2"
    extra.write_bytes(b"x")
    scenes, root = discover_scenes([str(archive / "*" / "scene.tif"), extra])
    assert sorted(s.name for s in scenes) == ["img.jp2", "scene.tif", "scene.tif"] and root == archive

    # x.tif and x.TIFF side by side keep their full names
    write_scene(archive / "a" / "scene.TIFF", [], seed=9)
    scenes, root = discover_scenes([archive / "a"])
    jobs = plan_jobs(scenes, root, tmp_path / "out", "gpkg")
    assert sorted(j.output.name for j in jobs) == ["scene.TIFF.gpkg", "scene.tif.gpkg"]

    with pytest.raises(InputError, match="no such file"):
        discover_scenes([archive / "missing"])
    with pytest.raises(InputError, match="no scenes found"):
        discover_scenes([archive], patterns=["*.png"])
    with pytest.raises(InputError, match="no file matches"):
        discover_scenes([str(archive / "*.png")])


def test_fingerprints(tmp_path: Path, blob_onnx: Path) -> None:
    base = Config(model=str(blob_onnx))
    # speed knobs and the model's location do not change results; thresholds do
    assert config_digest(base, blob_onnx) == config_digest(Config(model="/elsewhere.onnx", read_threads=1, prefetch=5, batch_size=3), blob_onnx)
    assert config_digest(base, blob_onnx) != config_digest(Config(model=str(blob_onnx), conf=0.3), blob_onnx)
    assert config_digest(base, blob_onnx) != config_digest(Config(model=str(blob_onnx), crs="native"), blob_onnx)

    scene = write_scene(tmp_path / "s.tif", [(10, 10)])
    fp = input_fingerprint(scene)
    write_scene(scene, [(50, 50)])  # same size, new pixels
    fp2 = input_fingerprint(scene)
    assert fp["size"] == fp2["size"] and fp["partial_sha256"] != fp2["partial_sha256"]


# -- serial runs through the CLI -----------------------------------------------------------------------


def test_cli_archive_resume_force(archive: Path, tmp_path: Path, blob_onnx: Path) -> None:
    out = tmp_path / "out"
    index = out / "index.gpkg"
    args = [str(archive), "-o", str(out), "--model", str(blob_onnx), *TILE, "--index", str(index)]

    code, text, summary = invoke(*args)
    assert code == 1, text  # the corrupt scene fails the run ...
    assert statuses(summary) == {**{s: "done" for s in GOOD}, "corrupt.tif": "failed"}  # ... and only it
    failed = next(s for s in summary["scenes"] if s["status"] == "failed")
    assert "corrupt.tif" in failed["error"] and "not a readable raster" in failed["error"]
    assert "corrupt.tif: " in text and "failed" in text and "tiles/s" in text
    for rel in ("a/scene.geojson", "b/scene.geojson", "b/deep/other.geojson", "nocrs.geojson"):
        assert (out / rel).is_file() and (out / (rel + ".done.json")).is_file()
    assert not (out / "corrupt.geojson").exists() and not (out / "corrupt.geojson.done.json").exists()
    assert not list(out.rglob(".*tmp*"))

    # detections where the blobs are, one output per scene
    a = read_detections(out / "a" / "scene.geojson")
    assert len(a) > 0 and set(a["class_name"]) == {"plane"} and a.crs.to_epsg() == 4326
    assert summary["per_class"]["plane"] == sum(s["detections"] for s in summary["scenes"])
    nocrs = next(s for s in summary["scenes"] if s["scene"] == "nocrs.tif")
    assert nocrs["crs"] is None and any("no CRS" in w for w in nocrs["warnings"])

    # the merged index: every georeferenced scene, a scene column with relative paths, one CRS
    idx = read_detections(index)
    assert sorted(set(idx["scene"])) == ["a/scene.tif", "b/deep/other.TIFF", "b/scene.tif"]
    assert idx.crs.to_epsg() == 4326
    assert len(idx) == sum(s["detections"] for s in summary["scenes"] if s["scene"] != "nocrs.tif")
    assert summary["index"]["excluded"] == ["nocrs.tif"]

    # a rerun skips every finished scene and touches none of their files
    before = mtimes(out)
    code, text, summary = invoke(*args)
    assert code == 1
    assert statuses(summary) == {**{s: "skipped" for s in GOOD}, "corrupt.tif": "failed"}
    assert summary["per_class"]["plane"] > 0 and summary["tiles"] == 0
    after = mtimes(out)
    assert {k: v for k, v in after.items() if k != "index.gpkg"} == {k: v for k, v in before.items() if k != "index.gpkg"}

    # a rewritten input is redone, the others are still skipped
    write_scene(archive / "b" / "scene.tif", [(20, 20), (90, 80)], seed=7)
    code, text, summary = invoke(*args)
    assert statuses(summary)["b/scene.tif"] == "done"
    assert [s for s, st in statuses(summary).items() if st == "skipped"] == ["a/scene.tif", "b/deep/other.TIFF", "nocrs.tif"]
    assert mtimes(out)["b/scene.geojson"] != after["b/scene.geojson"]
    assert mtimes(out)["a/scene.geojson"] == after["a/scene.geojson"]

    # the corrupt file removed: everything is finished, exit 0
    (archive / "corrupt.tif").unlink()
    code, text, summary = invoke(*args, "--quiet")
    assert code == 0 and text == ""
    assert set(statuses(summary).values()) == {"skipped"}

    # a config change (or --force) redoes every scene
    code, _, summary = invoke(*args, "--conf", "0.3", "-q")
    assert code == 0 and set(statuses(summary).values()) == {"done"}
    code, _, summary = invoke(*args, "--conf", "0.3", "-q", "--force")
    assert code == 0 and set(statuses(summary).values()) == {"done"}


def test_interrupted_run_keeps_finished_scenes(archive: Path, tmp_path: Path, blob_onnx: Path) -> None:
    """Ctrl-C after two scenes: both are kept and recorded; the rerun does only the rest."""
    (archive / "corrupt.tif").unlink()
    out = tmp_path / "out"
    cfg = Config(model=str(blob_onnx), tile_size=64, overlap=16)
    seen: list[str] = []

    def stop_after_two(outcome: SceneOutcome) -> None:
        seen.append(outcome.scene)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch([archive], out, cfg, on_result=stop_after_two)
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["interrupted"] is True and sorted(statuses(summary)) == sorted(seen)
    assert not list(out.rglob(".*tmp*"))
    again = run_batch([archive], out, cfg)
    assert {s: o.status for s, o in again.outcomes.items()} == {s: ("skipped" if s in seen else "done") for s in GOOD}


def test_index_crs_rules(tmp_path: Path, blob_onnx: Path) -> None:
    """--crs native: one shared CRS is kept; mixed CRSs are reprojected to WGS84 (and said so)."""
    root = tmp_path / "utm"
    write_scene(root / "z33.tif", [(20, 20)], epsg=32633)
    write_scene(root / "z33b.tif", [(60, 60)], epsg=32633, seed=3)
    cfg = Config(model=str(blob_onnx), tile_size=64, overlap=16, crs="native")
    s = run_batch([str(root)], str(tmp_path / "o1"), cfg, index=str(tmp_path / "o1" / "i.parquet"), fmt="gpkg")
    idx = read_detections(tmp_path / "o1" / "i.parquet")
    assert idx.crs.to_epsg() == 32633 and s.index is not None and s.index["notes"] == []
    assert read_detections(tmp_path / "o1" / "z33.gpkg").crs.to_epsg() == 32633
    assert len(idx) == s.per_class()["plane"] > 0

    write_scene(root / "z32.tif", [(30, 30)], epsg=32632, origin=(700000.0, 4500000.0))
    s = run_batch([root], tmp_path / "o1", cfg, index=tmp_path / "o1" / "i.parquet", fmt="gpkg")
    assert [o.status for _, o in sorted(s.outcomes.items())] == ["done", "skipped", "skipped"]
    idx = read_detections(tmp_path / "o1" / "i.parquet")
    assert idx.crs.to_epsg() == 4326 and "reprojected to WGS84" in s.index["notes"][0]
    assert set(idx["scene"]) == {"z32.tif", "z33.tif", "z33b.tif"}
    lon = idx.geometry.bounds["minx"]
    assert ((lon > 8) & (lon < 17)).all()  # UTM 32N/33N near the central meridians: plausible longitudes


def test_cli_refuses_bad_usage(archive: Path, tmp_path: Path, blob_onnx: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(batch, [str(archive), "-o", str(tmp_path / "o"), "--workers", "2", "--scheduler", "tcp://x:1"])
    assert r.exit_code == 2 and "exclude each other" in r.output
    r = runner.invoke(batch, [str(archive / "nothing"), "-o", str(tmp_path / "o"), "--model", str(blob_onnx)])
    assert r.exit_code == 1 and "no such file or directory" in r.output
    r = runner.invoke(batch, [str(archive), "-o", str(tmp_path / "o"), "--model", str(blob_onnx), "--index", str(tmp_path / "i.geojson")])
    assert r.exit_code == 1 and "GeoPackage (.gpkg) or GeoParquet" in r.output
    r = runner.invoke(batch, [str(archive), "-o", str(tmp_path / "o"), "--model", str(tmp_path / "missing.onnx")])
    assert r.exit_code == 1 and "model file not found" in r.output


# -- Dask ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[str]:
    """One local cluster (2 worker processes, 1 thread each) for this module's Dask tests, made by the
    same code as ``--workers 2``. Yields the scheduler address."""
    with dask_client(workers=2) as (client, n):
        assert n == 2
        client.wait_for_workers(2, timeout=DASK_TIMEOUT)
        yield client.scheduler_info()["address"]


def test_dask_cluster_matches_serial(archive: Path, tmp_path: Path, blob_onnx: Path, dask_cluster: str) -> None:
    address = dask_cluster
    serial, dask = tmp_path / "serial", tmp_path / "dask"
    code, _, s_sum = invoke(str(archive), "-o", str(serial), "--model", str(blob_onnx), *TILE, "-q")
    code_d, _, d_sum = invoke(str(archive), "-o", str(dask), "--model", str(blob_onnx), *TILE, "-q", "--scheduler", address)
    assert code == code_d == 1
    assert d_sum["mode"] == "dask-scheduler" and d_sum["workers"] == 2
    assert statuses(d_sum) == statuses(s_sum)
    for rel in ("a/scene.geojson", "b/scene.geojson", "b/deep/other.geojson", "nocrs.geojson"):
        assert frame_rows(dask / rel) == frame_rows(serial / rel), rel
    assert {s["scene"]: s["per_class"] for s in d_sum["scenes"]} == {s["scene"]: s["per_class"] for s in s_sum["scenes"]}
    # the engines ran in the worker processes, not in this one
    assert all(s["worker"].split(":")[-1] != str(os.getpid()) for s in d_sum["scenes"] if s["status"] == "done")


def test_dask_lost_worker_completes_each_scene_once(archive: Path, tmp_path: Path, blob_onnx: Path, dask_cluster: str) -> None:
    """A worker process is killed with SIGKILL as soon as the first scene is reported (the other
    worker is busy with a scene then, and this one usually too): the nanny restarts it, the scheduler
    reruns whatever it held, and the run still finishes every scene exactly once."""
    import signal

    from distributed import Client

    address = dask_cluster
    (archive / "corrupt.tif").unlink()
    out = tmp_path / "out"
    cfg = Config(model=str(blob_onnx), tile_size=64, overlap=16)
    reports: list[str] = []
    with Client(address, timeout=DASK_TIMEOUT) as client:
        pids_before = set(client.run(os.getpid).values())
        victim = max(pids_before)

        def kill_once(outcome: SceneOutcome) -> None:
            reports.append(outcome.scene)
            if len(reports) == 1:
                os.kill(victim, signal.SIGKILL)

        summary = run_batch([archive], out, cfg, scheduler=address, on_result=kill_once)
        client.wait_for_workers(2, timeout=DASK_TIMEOUT)  # the nanny brings the lost worker back
        pids_after = set(client.run(os.getpid).values())

    assert victim in pids_before - pids_after and len(pids_after) == 2  # it died and was replaced
    assert sorted(reports) == sorted(GOOD)  # one report per scene
    assert {s: o.status for s, o in summary.outcomes.items()} == {s: "done" for s in GOOD}
    identity = RunIdentity.of(cfg)
    for job in plan_jobs(*discover_scenes([archive]), out):
        assert why_not_complete(job, identity) is None, job.rel  # manifest matches the output
        assert json.loads(job.manifest.read_text())["scene"] == job.rel
    assert not list(out.rglob(".*tmp*"))
    written = json.loads((out / SUMMARY_NAME).read_text())
    assert sorted(s["scene"] for s in written["scenes"]) == sorted(GOOD)
    # the rerun (serial) finds everything finished
    clear_pipeline_cache()
    again = run_batch([archive], out, cfg)
    assert {o.status for o in again.outcomes.values()} == {"skipped"}


def test_local_workers_share_the_cores_among_their_readers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With read_threads unset, a local cluster's workers split this host's cores for their readers
    too (each would otherwise take all cores but four); a configured number is left alone."""
    import contextlib

    from rs_detect.batch import runner as b

    seen: list[b.WorkerSpec] = []

    @contextlib.contextmanager
    def fake_client(workers: int | None, scheduler: str | None, device: str, gpus: object = None) -> Iterator[tuple[object, int]]:
        yield object(), 4

    monkeypatch.setattr(b, "dask_client", fake_client)
    monkeypatch.setattr(b, "run_dask", lambda todo, spec, client, record: seen.append(spec))
    monkeypatch.setattr(b.os, "cpu_count", lambda: 32)
    identity = b.RunIdentity("m.onnx", "0" * 64, "1" * 64)
    for cfg in (Config(device="cuda"), Config(device="cpu"), Config(device="cuda", read_threads=3)):
        b._execute([object()], cfg, identity, b.BatchSummary(tmp_path, mode="dask-local"), lambda *a: None, 4, None)  # type: ignore[list-item]
    assert [s.threads for s in seen] == [8, 8, 8]
    assert [s.config.read_threads for s in seen] == [4, 4, 3]  # cuda: 8 - 4; cpu: min(4, 8); as configured
