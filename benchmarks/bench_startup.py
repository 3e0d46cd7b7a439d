"""Start-up cost of the ``rs-detect`` command: wall time minus the scene time it reports (not a test).

    # the ONNX Runtime CPU path on the bundled scene, 7 fresh processes
    python benchmarks/bench_startup.py sample_data/demo_scene.tif --runs 7
    # TorchScript on CUDA, plus the import profile of one more run
    python benchmarks/bench_startup.py scene.tif --model yolov8n.torchscript --device cuda \
        --importtime imports.txt [--cprofile run.prof] [--json out.json] [-- --batch-size 16]

Each run is ``python -m rs_detect SCENE -o TMP/out_N.geojson [--model M] [--device D] [EXTRA]`` in a
fresh process (the interpreter running this script, so the same venv), timed from the start of the
process to its exit. The scene time is the one the command's summary line reports (``... in 3.4 s``:
open, read, infer, stitch and write; one decimal); wall minus scene is what the command spends
outside it: interpreter start, imports, engine loading and warm-up, and interpreter exit.

One untimed run goes first (``--no-warmup-run`` skips it), so that every timed run finds the ``.pyc``
files compiled and the scene and model in the page cache. ``--importtime FILE`` runs once more
under ``python -X importtime`` and writes the 20 imports of largest cumulative time (and, after
them, the whole log) to FILE; ``--cprofile FILE`` runs once more under cProfile.

Runs anywhere rs-detect runs: a machine without a GPU (ONNX Runtime on the CPU) or ``--device cuda``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(r"^(?P<scene>\S.*): \d+ tiles read, .* in (?P<seconds>\d+(?:\.\d+)?) s(?: -> .*)?$", re.M)
IMPORT_LINE = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)\s*$")


def command(args: argparse.Namespace, output: Path, python_flags: tuple[str, ...] = ()) -> list[str]:
    cmd = [sys.executable, *python_flags, "-m", "rs_detect", str(args.scene), "-o", str(output)]
    if args.model:
        cmd += ["--model", str(args.model)]
    if args.device:
        cmd += ["--device", args.device]
    return cmd + list(args.extra)


def child_env() -> dict[str, str]:
    """The current environment, with this checkout first on the path (the benchmark measures it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # the runs measure start-up with compiled .pyc files
    return env


def run_once(cmd: list[str], timeout: float) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=timeout, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr.strip()[-2000:]}")
    return wall, proc


def scene_seconds(stdout: str) -> float:
    """The scene time of the summary line (``SCENE: N tiles read, ... in 3.4 s -> OUT``)."""
    found = SUMMARY.findall(stdout)
    if not found:
        sys.exit(f"error: no summary line in the command's output:\n{stdout.strip()[-1000:]}")
    return float(found[-1][1])


def parse_importtime(log: str) -> list[tuple[float, float, int, str]]:
    """The rows of a ``-X importtime`` log: (cumulative s, self s, depth, module); depth 0 = not imported by another module."""
    rows = []
    for line in log.splitlines():
        m = IMPORT_LINE.match(line)
        if m:
            rows.append((int(m.group(2)) / 1e6, int(m.group(1)) / 1e6, (len(m.group(3)) - 1) // 2, m.group(4)))
    return rows


def importtime_report(args: argparse.Namespace, out_dir: Path) -> str:
    wall, proc = run_once(command(args, out_dir / "importtime.geojson", ("-X", "importtime")), args.timeout)
    rows = parse_importtime(proc.stderr)
    total_top = sum(c for c, _, depth, _ in rows if depth == 0)
    lines = [f"# python -X importtime, one run: wall {wall:.2f} s, scene {scene_seconds(proc.stdout):.1f} s, "
             f"{len(rows)} modules imported, {total_top:.2f} s in top-level imports",
             "# top 20 by cumulative time (seconds; depth 0 = imported by rs-detect or the interpreter itself)",
             f"{'cumulative':>10} {'self':>7} {'depth':>5}  module"]
    lines += [f"{c:10.3f} {s:7.3f} {d:5d}  {name}" for c, s, d, name in sorted(rows, key=lambda r: -r[0])[:20]]
    lines += ["", "# the whole log", *(line for line in proc.stderr.splitlines() if IMPORT_LINE.match(line))]
    Path(args.importtime).write_text("\n".join(lines) + "\n")
    return "\n".join(lines[:23])


def environment(args: argparse.Namespace) -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    except OSError:
        commit = None
    gpu = None
    if args.device and args.device.startswith("cuda") and shutil.which("nvidia-smi"):
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip().splitlines()[:1]
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit, "host": platform.node(),
        "cpus": os.cpu_count(), "gpu": gpu[0] if gpu else None, "python": platform.python_version(),
        "torch": version("torch"), "torchvision": version("torchvision"), "onnxruntime": version("onnxruntime"),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="More rs-detect options go after --, e.g. -- --batch-size 16 --overlap 128.")
    ap.add_argument("scene", type=Path)
    ap.add_argument("--model", type=Path, help="model file (default: rs-detect's own default, the bundled sample model)")
    ap.add_argument("--device", help="cpu, cuda or cuda:N (default: rs-detect's own)")
    ap.add_argument("--runs", "-n", type=int, default=5, help="timed runs, each a fresh process [5]")
    ap.add_argument("--no-warmup-run", dest="warmup_run", action="store_false", help="time the first run too")
    ap.add_argument("--importtime", metavar="FILE", help="one more run under python -X importtime; top 20 and the log to FILE")
    ap.add_argument("--cprofile", metavar="FILE", help="one more run under cProfile; its stats to FILE (pstats format)")
    ap.add_argument("--json", metavar="FILE", help="the runs and the environment as JSON")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds one run may take [600]")
    argv = sys.argv[1:] if argv is None else list(argv)
    extra: list[str] = []
    if "--" in argv:  # everything after -- goes to rs-detect as it is
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    args = ap.parse_args(argv)
    args.extra = extra
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if not args.scene.exists():
        ap.error(f"{args.scene}: no such file")

    env = environment(args)
    print(f"# bench_startup: {env['date']}, commit {env['commit']}, {env['host']} ({env['cpus']} CPUs"
          f"{', ' + env['gpu'] if env['gpu'] else ''}), Python {env['python']}, torch {env['torch']}, "
          f"onnxruntime {env['onnxruntime']}")
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        out_dir = Path(tmp)
        print("# " + " ".join(command(args, out_dir / "out_N.geojson")))
        if args.warmup_run:
            run_once(command(args, out_dir / "warmup.geojson"), args.timeout)
        runs = []
        print(f"{'run':>4} {'wall s':>8} {'scene s':>8} {'wall-scene s':>13}")
        for i in range(args.runs):
            wall, proc = run_once(command(args, out_dir / f"out_{i}.geojson"), args.timeout)
            scene = scene_seconds(proc.stdout)
            runs.append({"wall": round(wall, 3), "scene": scene, "outside": round(wall - scene, 3)})
            print(f"{i + 1:>4} {wall:8.2f} {scene:8.1f} {wall - scene:13.2f}", flush=True)
        med = {k: statistics.median(r[k] for r in runs) for k in ("wall", "scene", "outside")}
        print(f"{'med':>4} {med['wall']:8.2f} {med['scene']:8.2f} {med['outside']:13.2f}")
        if args.importtime:
            print(importtime_report(args, out_dir))
            print(f"# import log -> {args.importtime}")
        if args.cprofile:
            run_once(command(args, out_dir / "cprofile.geojson", ("-m", "cProfile", "-o", str(Path(args.cprofile).resolve()))), args.timeout)
            print(f"# cProfile stats -> {args.cprofile} (python -m pstats {args.cprofile})")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "command": command(args, Path("OUT.geojson")), "runs": runs,
                                               "median": med}, indent=2) + "\n")


if __name__ == "__main__":
    main()
