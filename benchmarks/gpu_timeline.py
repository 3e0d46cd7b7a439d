"""Where an end-to-end scene's time goes on the GPU (a diagnostic, not part of the suite).

    python3 benchmarks/gpu_timeline.py MODEL.torchscript SCENE [--runs 2] [--batch 16] [--threads 12]

CUDA events around every batch's inference on the engine's stream, and around the whole run, against
engine-only batches timed the same way (the same captured graph, fed fp16 directly). Per run it prints,
as one JSON line: the GPU idle before the first batch (``first_ms``), the idle between batches
(``gaps_ms``: the GPU waiting for the host), the busy time per batch against engine-only, the first
batches' spans, the tail after the last batch, and the run's wall time. A host-side wait inside the
engine call (e.g. for the scene's stretch) shows as a long first span. Results:
``benchmarks/results/h200_k_gpu_timeline.txt``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from rs_detect.config import Config
from rs_detect.engines import load_engine
from rs_detect.pipeline import ScenePipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("scene", type=Path)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=12)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_timeline.py: needs a CUDA GPU")
    engine = load_engine(args.model, device="cuda")
    pipe = ScenePipeline(engine, Config(batch_size=args.batch, device="cuda", read_threads=args.threads, classes=None, conf=0.25), None)
    spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    infer_normalized = engine.infer_normalized

    def timed(raw: torch.Tensor, valid: torch.Tensor | None, norm: object) -> torch.Tensor:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = infer_normalized(raw, valid, norm)  # type: ignore[arg-type]
        b.record()
        spans.append((a, b))
        return out

    engine.infer_normalized = timed  # type: ignore[method-assign]
    x = torch.rand((pipe.batch_size, engine.meta.channels, engine.meta.imgsz, engine.meta.imgsz), device="cuda").half()
    for _ in range(3):
        engine.infer(x)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(100):
        engine.infer(x)
    e.record()
    torch.cuda.synchronize()
    engine_ms = s.elapsed_time(e) / 100
    print(json.dumps({"engine_only_ms_per_batch": round(engine_ms, 2)}), flush=True)
    pipe.run(args.scene)  # warm-up
    for run in range(args.runs):
        spans.clear()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        res = pipe.run(args.scene)
        end.record()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        busy = [a.elapsed_time(b) for a, b in spans]
        gaps = [spans[i][1].elapsed_time(spans[i + 1][0]) for i in range(len(spans) - 1)]
        print(json.dumps({
            "run": run, "wall_s": round(wall, 3), "tiles_s": round(res.stats.tiles_read / wall, 1),
            "ratio": round(len(spans) * engine_ms / 1000 / wall, 3), "batches": len(spans),
            "first_ms": round(start.elapsed_time(spans[0][0]), 1), "gaps_ms": round(sum(gaps), 1),
            "busy_per_batch_ms": round(sum(busy) / len(busy), 2), "engine_ms": round(engine_ms, 2),
            "first_spans_ms": [round(b, 1) for b in busy[:5]], "tail_ms": round(spans[-1][1].elapsed_time(end), 1),
            "stages": {k: round(v, 3) for k, v in res.stats.stage_seconds.items()},
        }), flush=True)


if __name__ == "__main__":
    main()
