"""What a block-read scene's first batch waits for (a diagnostic, not part of the suite): the stretch's
sample jobs and the first group's inflate jobs on a reader pool, queued as a scene queues them, each
way below in turn, ``--repeat`` times; medians in milliseconds from the first job queued.

    python3 benchmarks/probe_first_batch.py SCENE.tif [--device cuda] [--threads 14] [--repeat 7]

The ways: the sample read one window a job or ``SAMPLE_JOB_WINDOWS`` (4, 8) a job; the reader threads'
compressed-byte buffers kept for the thread or new to each scene (as before); Python's GIL switch
interval at 0.5 ms instead of 5 ms; the pool's CPUs kept busy just before (clock ramp-up); the first
group's jobs queued ahead of the sample's instead of behind them (later groups behind both). The scene
must be one the block reader takes (tiled, no mask: ``gpu_read_plan``), wider than 2048 px.

Before the ways, how long the sample holds the GIL in one thread: a watcher thread asks for the GIL
every 50 us (switch interval 1 us, so Python code hands it over at once); what it waits beyond its
own sleep is time the sample's thread held the GIL in calls that do not release it.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rs_detect.io import gpu_blocks as gb  # noqa: E402
from rs_detect.io.reader import RasterSource  # noqa: E402

WAYS = {  # name: (sample windows a job, buffers new each scene, GIL switch interval, CPUs busy just before, group 0 first)
    "a job per window, buffers new each scene (before)": (1, True, None, False, False),
    "4 windows a job, buffers kept (now)": (4, False, None, False, False),
    "4 windows a job, buffers new each scene": (4, True, None, False, False),
    "a job per window, buffers kept": (1, False, None, False, False),
    "8 windows a job, buffers kept": (8, False, None, False, False),
    "now, GIL switch interval 0.5 ms": (4, False, 0.0005, False, False),
    "before, GIL switch interval 0.5 ms": (1, True, 0.0005, False, False),
    "now, the pool's CPUs busy just before": (4, False, None, True, False),
    "now, group 0's jobs queued before the sample's": (4, False, None, False, True),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scene")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=14)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    dev = torch.device(args.device)
    src = RasterSource(args.scene)
    layout, why = gb.gpu_read_plan(src, dev, "blocks")
    if layout is None:
        raise SystemExit(f"{args.scene}: the block reader does not take it ({why})")
    if not all(len(cols) == 1 for _, _, cols in src.sample_plan()):
        raise SystemExit(f"{args.scene}: its sample is one decimated read (at most 2048 px, or overviews)")
    pool = ThreadPoolExecutor(args.threads, thread_name_prefix="rs-read")
    list(pool.map(lambda _: None, range(100)))  # the threads started
    sampler = gb.BlockSampler(src, layout)
    stream = torch.cuda.Stream(device=dev) if dev.type == "cuda" else None
    t = time.perf_counter()
    for job in src.sample_plan():
        sampler(job)
    print(f"the sample in one thread, a job per window: {(time.perf_counter() - t) * 1e3:.1f} ms", flush=True)
    idle = gil_waits(lambda: time.sleep(0.1))[1]
    for _ in range(3):
        wall, waits = gil_waits(lambda: [sampler(job) for job in src.sample_plan()])
        held = np.clip(waits - np.median(idle), 0, None)
        print(f"  watched: {wall * 1e3:.1f} ms, the GIL held against the watcher {held.sum() * 1e3:.1f} ms"
              f" (longest wait {waits.max() * 1e3:.2f} ms; idle {np.median(idle) * 1e6:.0f} us a wait)", flush=True)

    def busy(_: int) -> None:
        t = time.perf_counter()
        a = np.random.default_rng(0).random(200_000)
        while time.perf_counter() - t < 0.03:
            a.sort()

    def first_batch(per_job: int, fresh: bool, switch: float | None, warm_cpus: bool, group_first: bool) -> tuple[float, float]:
        gb.SAMPLE_JOB_WINDOWS = per_job
        if fresh:
            gb._THREAD_SCRATCH = threading.local()
        old = sys.getswitchinterval()
        if switch:
            sys.setswitchinterval(switch)
        if warm_cpus:
            list(pool.map(busy, range(args.threads)))
        reader = gb.GpuBlockReader(src, layout, dev, pool, None, stream)
        try:
            t = time.perf_counter()
            if group_first:
                reader._request(1)
            jobs = [pool.submit(sampler, job) for job in sampler.plan(src.sample_plan())]
            reader._request(1 + reader.ahead)  # as the first batch's _decode(0) queues them
            wait(jobs)
            sample = time.perf_counter() - t
            for f in reader._reads[0]:
                f.result()
            group = time.perf_counter() - t
        finally:
            reader.close()
            sys.setswitchinterval(old)
        return sample * 1e3, group * 1e3

    for way in WAYS.values():  # once untimed: pinned buffers, page cache
        first_batch(*way)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in WAYS}
    for _ in range(args.repeat):
        for name, way in WAYS.items():
            times[name].append(first_batch(*way))
    print(f"{'way':<52} {'sample done':>12} {'group 0 done':>13}   ms, median of {args.repeat} (group 0: min..max)")
    for name, v in times.items():
        a = np.array(v)
        print(f"{name:<52} {np.median(a[:, 0]):12.1f} {np.median(a[:, 1]):13.1f}   {a[:, 1].min():.1f}..{a[:, 1].max():.1f}")
    return 0


def gil_waits(fn) -> tuple[float, np.ndarray]:
    """``fn``'s wall time, and each wait of a watcher thread that sleeps 50 us and asks for the GIL again."""
    stop, waits = threading.Event(), []

    def watch() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            time.sleep(0.00005)
            waits.append(time.perf_counter() - t)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    watcher = threading.Thread(target=watch)
    watcher.start()
    time.sleep(0.01)
    try:
        t = time.perf_counter()
        fn()
        wall = time.perf_counter() - t
    finally:
        stop.set()
        watcher.join()
        sys.setswitchinterval(old)
    return wall, np.array(waits)


if __name__ == "__main__":
    raise SystemExit(main())
