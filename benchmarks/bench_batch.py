"""Archive throughput of ``rs-detect batch``: scenes/s serially and on a local Dask cluster (not a test).

    python benchmarks/bench_batch.py                       # 12 scenes of 2048x2048, workers 1,2
    python benchmarks/bench_batch.py --scenes 16 --size 2048 --workers 1,2,4 --model m.onnx \\
        --csv runs/bench_batch.csv

For each setting the same archive is run twice into the same OUTDIR with ``force``:

* cold: what ``rs-detect batch --workers N`` costs from nothing (cluster start, worker imports, engine
  loading, then the scenes); serial cold includes loading the engine in this process;
* warm: the same cluster (or process) again with its engines already loaded: the steady throughput
  an archive of thousands of scenes sees; repeated ``--repeat`` times, the median is reported.

Other work on the machine skews these numbers: the script prints the load average before and after.

The model is ``--model``, else the first ``sample_data/*.onnx``, else ``/tmp/dev/yolov8n.onnx`` (an
untrained 1-channel 15-class YOLOv8n). Prints a table and writes a CSV.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rs_detect.batch import (  # noqa: E402
    BatchSummary,
    RunIdentity,
    WorkerSpec,
    clear_pipeline_cache,
    dask_client,
    run_batch,
    warm_workers,
)
from rs_detect.config import Config  # noqa: E402


def default_model() -> Path:
    for cand in sorted((ROOT / "sample_data").glob("*.onnx")) + [Path("/tmp/dev/yolov8n.onnx")]:
        if cand.is_file():
            return cand
    raise SystemExit("no model: pass --model (no sample_data/*.onnx and no /tmp/dev/yolov8n.onnx)")


def write_scenes(folder: Path, count: int, size: int) -> list[Path]:
    """Tiled, DEFLATE-compressed uint8 GeoTIFFs: textured noise with bright boxes, in two subfolders."""
    import rasterio
    from rasterio.transform import from_origin

    paths = []
    for i in range(count):
        rng = np.random.default_rng(i)
        data = rng.normal(90, 25, (size, size)).clip(0, 255).astype(np.uint8)
        for _ in range(40):
            y, x = rng.integers(0, size - 40, 2)
            h, w = rng.integers(8, 40, 2)
            data[y:y + h, x:x + w] = 230
        path = folder / f"part{i % 2}" / f"scene_{i:03d}.tif"
        path.parent.mkdir(parents=True, exist_ok=True)
        profile = {"driver": "GTiff", "width": size, "height": size, "count": 1, "dtype": "uint8", "tiled": True,
                   "blockxsize": 256, "blockysize": 256, "compress": "deflate", "crs": "EPSG:32633",
                   "transform": from_origin(500000 + i * size * 0.5, 4500000, 0.5, 0.5)}
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data, 1)
        paths.append(path)
    return paths


def timed(run: Callable[[], BatchSummary]) -> tuple[BatchSummary, float]:
    t0 = time.perf_counter()
    summary = run()
    return summary, time.perf_counter() - t0


def row(label: str, workers: int, cold: BatchSummary, warm: BatchSummary, cold_s: float, warm_times: list[float]) -> dict[str, Any]:
    n = warm.counts["done"]
    assert n == cold.counts["done"] and not warm.failed and not cold.failed, "a scene failed: see the summary"
    warm_s = statistics.median(warm_times)
    return {
        "mode": label,
        "workers": workers,
        "scenes": n,
        "tiles": warm.tiles_done,
        "cold_s": round(cold_s, 2),
        "cold_scenes_per_s": round(n / cold_s, 3),
        "warm_s": round(warm_s, 2),
        "warm_s_min": round(min(warm_times), 2),
        "warm_scenes_per_s": round(n / warm_s, 3),
        "warm_tiles_per_s": round(warm.tiles_done / warm_s, 2),
    }


def bench(archive: Path, work: Path, cfg: Config, worker_counts: list[int], repeat: int) -> list[dict[str, Any]]:
    """Cold runs one after another, then warm runs interleaved round by round (serial, N1, N2, ...), so
    that other load on the machine falls on every setting alike rather than on one."""
    labels = [("serial", 1)] + [("dask", n) for n in worker_counts]
    cold: dict[tuple[str, int], tuple[BatchSummary, float]] = {}
    clear_pipeline_cache()  # cold serial: the engine is loaded again in this process
    cold[labels[0]] = timed(lambda: run_batch([archive], work / "out-serial", cfg, force=True))
    for n in worker_counts:
        cold[("dask", n)] = timed(lambda: run_batch([archive], work / f"out-dask{n}", cfg, workers=n, force=True))
    print(f"cold done; load average {os.getloadavg()[0]:.2f}", flush=True)

    warm_times: dict[tuple[str, int], list[float]] = {lab: [] for lab in labels}
    last: dict[tuple[str, int], BatchSummary] = {}
    with ExitStack() as stack:
        addresses: dict[int, str] = {}
        for n in worker_counts:
            client, _ = stack.enter_context(dask_client(workers=n))
            client.wait_for_workers(n, timeout=300)
            warm_workers(client, WorkerSpec(cfg, RunIdentity.of(cfg), max(1, (os.cpu_count() or 1) // n)))
            addresses[n] = client.scheduler_info()["address"]
        for rnd in range(repeat):
            for lab in labels:
                mode, n = lab
                if mode == "serial":
                    summary, secs = timed(lambda: run_batch([archive], work / "out-serial", cfg, force=True))
                else:
                    summary, secs = timed(lambda: run_batch([archive], work / f"out-dask{n}", cfg, scheduler=addresses[n], force=True))
                last[lab] = summary
                warm_times[lab].append(secs)
            print(f"round {rnd + 1}: " + ", ".join(f"{m}{n} {warm_times[(m, n)][-1]:.1f} s" for m, n in labels)
                  + f"; load average {os.getloadavg()[0]:.2f}", flush=True)
    return [row(m, n, cold[(m, n)][0], last[(m, n)], cold[(m, n)][1], warm_times[(m, n)]) for m, n in labels]


def print_table(rows: list[dict[str, Any]]) -> None:
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(str(r[k]).rjust(w) for k, w in zip(keys, widths)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=12)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts for the Dask runs")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--tile-size", type=int, help="default: the model's input size")
    ap.add_argument("--overlap", type=int, default=192)
    ap.add_argument("--repeat", type=int, default=3, help="warm runs per setting (the median is reported)")
    ap.add_argument("--csv", type=Path, default=ROOT / "runs" / "bench_batch.csv")
    ap.add_argument("--workdir", type=Path, help="keep scenes and outputs here (default: a temporary folder)")
    args = ap.parse_args()

    model = args.model or default_model()
    cfg = Config(model=str(model), tile_size=args.tile_size, overlap=args.overlap)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rs-bench-batch-"))
    try:
        archive = work / "archive"
        if not archive.is_dir():
            write_scenes(archive, args.scenes, args.size)
        print(f"model {model}; {args.scenes} scenes of {args.size}x{args.size}; {os.cpu_count()} CPU cores; "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        rows = bench(archive, work, cfg, [int(w) for w in args.workers.split(",")], args.repeat)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        base = rows[0]["warm_scenes_per_s"]
        for r in rows:
            r["warm_speedup"] = round(r["warm_scenes_per_s"] / base, 2)
        print()
        print_table(rows)
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"\nwrote {args.csv}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":  # required: Dask's worker processes are spawned and re-import this module
    main()
