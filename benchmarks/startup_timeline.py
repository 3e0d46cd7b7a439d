"""Where one ``rs-detect`` command's start-up goes: its steps, their threads and times (not a test).

    python benchmarks/startup_timeline.py --json timeline.json -- SCENE --model m.torchscript --device cuda

Runs the command in this process (``rs_detect.cli.main`` with the arguments after ``--``) with its
main steps wrapped in timers: importing the command's modules, the engine's loading, CUDA's start,
the warm-up, the imports that write the output, the scene itself and writing it. Each step is a row
(name, thread, start and end in seconds since the process started, from /proc/self/stat), printed
as a table on stderr when the command ends and written to ``--json``. ``bench_startup.py`` gives
the figures over several fresh runs; this shows which steps overlap and which wait.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def process_age() -> float:
    """Seconds since this process started (Linux), else 0."""
    try:
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start)
    except (OSError, ValueError, IndexError):
        return 0.0


T0 = time.perf_counter() - process_age()
ROWS: list[dict[str, Any]] = []


def record(name: str, t0: float, t1: float) -> None:
    ROWS.append({"step": name, "thread": threading.current_thread().name, "start": round(t0 - T0, 3), "end": round(t1 - T0, 3)})


def timed(owner: Any, attr: str, name: str | None = None, once: bool = False) -> None:
    """Wrap ``owner.attr`` so that each call (``once``: the first) is recorded as a step."""
    fn = getattr(owner, attr)
    label = name or attr
    done = [False]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if once and done[0]:
            return fn(*args, **kwargs)
        done[0] = True
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record(label, t0, time.perf_counter())

    setattr(owner, attr, wrapper)


def report(path: str | None) -> None:
    record("exit", time.perf_counter(), time.perf_counter())
    rows = sorted(ROWS, key=lambda r: r["start"])
    print(f"{'step':<34} {'thread':<14} {'start':>7} {'end':>7} {'took':>7}", file=sys.stderr)
    for r in rows:
        print(f"{r['step']:<34} {r['thread'][:14]:<14} {r['start']:7.3f} {r['end']:7.3f} {r['end'] - r['start']:7.3f}", file=sys.stderr)
    if path:
        Path(path).write_text(json.dumps({"argv": sys.argv, "steps": rows}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the steps here")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the rs-detect arguments")
    args = ap.parse_args()
    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    sys.argv = ["rs-detect", *argv]  # what the command's early CUDA start reads
    record("interpreter and this script", T0, time.perf_counter())
    t0 = time.perf_counter()
    import rs_detect.cli as cli  # torch and the command's own modules

    record("import rs_detect.cli (torch)", t0, time.perf_counter())
    t0 = time.perf_counter()
    import rs_detect.cli.detect  # noqa: F401
    import rs_detect.engines as engines
    import rs_detect.executor as executor
    import rs_detect.plan as plan

    record("import the run's modules", t0, time.perf_counter())
    detect = sys.modules["rs_detect.cli.detect"]  # rs_detect.cli.detect, the attribute, is the click command
    import torch

    timed(engines, "load_engine", "load the engine")
    timed(plan, "resolve_plan")
    timed(torch.cuda, "init", "torch.cuda.init (CUDA start)", once=True)
    timed(executor.SceneExecutor, "__init__", "executor (streams, warm-up)")
    timed(executor.SceneExecutor, "run", "the scene")
    timed(executor, "write_detections", "write the output")
    timed(detect, "import_output_modules", "import geopandas, pyogrio, pyproj")
    try:
        import rs_detect.engines.torch as ts

        timed(ts, "load_torchscript", "torch.jit.load")
        timed(ts.TorchScriptEngine, "warmup", "warm-up (CUDA graph)")
        timed(ts, "torch_device", "torch_device (CUDA start)")
    except ImportError:
        pass
    real_leave = cli.leave

    def leave(code: object) -> None:
        report(args.json)
        real_leave(code)

    cli.leave = leave
    cli.main(argv)


if __name__ == "__main__":
    main()
