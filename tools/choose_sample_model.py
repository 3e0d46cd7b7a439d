#!/usr/bin/env python3
"""Score candidate sample models on synthetic scenes and choose one, and its thresholds, by a fixed rule.

Why: the sample models' thresholds and the choice between training runs must come from scenes the
tests never use, by a rule stated before the scores are seen, and anyone must be able to redo it.

    # score: per scene, each candidate runs once (rs-detect --conf 0.3); its detections are then
    # filtered by score from 0.3 to 0.7 and scored per class (IoU 0.5; HBB boxes, OBB rotated polygons)
    python tools/choose_sample_model.py sweep --task hbb --candidate ft4=run4/planeship_yolov8n_hbb.onnx \\
        --candidate ft5=run5/planeship_yolov8n_hbb.onnx --seeds 1001 8 31 32 --work /tmp/select --out sweeps.jsonl
    # choose: per candidate and class, the threshold that maximises pooled min(precision, recall);
    # the candidate with the higher mean of its two classes' values wins
    python tools/choose_sample_model.py choose sweeps.jsonl --task hbb

The sweeps that chose the shipped models are in docs/sample_model_selection.jsonl.gz (README,
"Sample model"): ``choose docs/sample_model_selection.jsonl.gz --task hbb --candidates ft4 ft5``.

Scenes are ``rs-detect synth``'s 6000 x 5000 scenes (each seed as uint8 and as uint16), written under
``--work`` once and reused. Resumable: a (candidate, seed, dtype) already in ``--out`` is skipped. Keep
the test scenes' seeds (tests/test_sample_model.py: 2024, 2026) out of ``--seeds``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SWEEP = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)
CLASSES = ("plane", "ship")
DTYPES = ("uint8", "uint16")
TEST_SEEDS = frozenset({2024, 2026})


def scene(work: Path, seed: int, dtype: str) -> tuple[Path, Path]:
    from rs_detect_synth import write_scene

    tif, truth = work / f"s{seed}_{dtype}.tif", work / f"s{seed}_{dtype}.truth.geojson"
    if not (tif.is_file() and truth.is_file()):
        write_scene(tif, 6000, 5000, seed=seed, truth_path=truth, dtype=dtype)
    return tif, truth


def sweep_rows(pred, truth, task: str, meta: dict[str, object]) -> list[dict[str, object]]:
    """One row per (threshold, class): the counts evaluate() gives for the detections at or above it."""
    from rs_detect.evaluate import duplicate_pairs, evaluate

    rows = []
    for conf in SWEEP:
        kept = pred[pred["score"] >= conf].reset_index(drop=True)
        for s in evaluate(kept, truth, 0.5, "polygon" if task == "obb" else "box", list(CLASSES)):
            rows.append({**meta, "conf": conf, "class_name": s.class_name, "truth": s.truth, "tp": s.tp, "fp": s.fp, "fn": s.fn,
                         "edge_truth": s.edge_truth, "edge_tp": round(s.edge_recall * s.edge_truth),
                         "duplicates": duplicate_pairs(kept[kept["class_name"] == s.class_name])})
    return rows


def cmd_sweep(args: argparse.Namespace) -> int:
    import geopandas as gpd

    if TEST_SEEDS & set(args.seeds):
        raise SystemExit(f"--seeds holds a test scene's seed ({sorted(TEST_SEEDS & set(args.seeds))}): keep them out of choosing")
    candidates = dict(c.split("=", 1) for c in args.candidate)
    args.work.mkdir(parents=True, exist_ok=True)
    done = {(r["candidate"], r["seed"], r["dtype"]) for r in read_rows(args.out)} if args.out.is_file() else set()
    for seed in args.seeds:
        for dtype in DTYPES:
            tif, truth_path = scene(args.work, seed, dtype)
            truth = gpd.read_file(truth_path)
            for name, model in candidates.items():
                if (name, seed, dtype) in done:
                    continue
                out = args.work / f"{name}_{args.task}_s{seed}_{dtype}.geojson"
                tmp = out.with_suffix(".tmp.geojson")
                subprocess.run(["rs-detect", str(tif), "--model", model, "-o", str(tmp), "-q", "--conf", str(SWEEP[0])], check=True)
                tmp.rename(out)
                rows = sweep_rows(gpd.read_file(out), truth, args.task, {"candidate": name, "task": args.task, "seed": seed, "dtype": dtype})
                with args.out.open("a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
            print(f"seed {seed} {dtype}: scored", flush=True)
    return 0


def read_rows(path: Path) -> list[dict[str, object]]:
    """A sweep file (plain JSONL, or gzipped when it ends in .gz)."""
    import gzip

    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def pooled(rows: Iterable[dict]) -> dict[str, float]:
    rows = list(rows)
    tp, fp, fn = (sum(int(r[k]) for r in rows) for k in ("tp", "fp", "fn"))
    edge = sum(int(r["edge_truth"]) for r in rows)
    return {"precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1),
            "edge_recall": sum(int(r["edge_tp"]) for r in rows) / edge if edge else 1.0,
            "duplicates": sum(int(r["duplicates"]) for r in rows), "scenes": len(rows), "tp": tp, "fp": fp, "fn": fn}


def choose(rows: list[dict], task: str) -> tuple[str, dict[str, dict[str, dict]]]:
    """Per candidate and class the threshold with the highest pooled min(P, R) (ties: the lower
    threshold); the winner has the highest mean of those over the classes. Only scenes every candidate
    was scored on count."""
    rows = [r for r in rows if r["task"] == task]
    names = sorted({r["candidate"] for r in rows})
    common = set.intersection(*({(r["seed"], r["dtype"]) for r in rows if r["candidate"] == n} for n in names))
    picks: dict[str, dict[str, dict]] = {}
    for name in names:
        picks[name] = {}
        for cls in CLASSES:
            best = None
            for conf in SWEEP:
                sel = [r for r in rows if r["candidate"] == name and r["class_name"] == cls and r["conf"] == conf
                       and (r["seed"], r["dtype"]) in common]
                p = pooled(sel)
                score = min(p["precision"], p["recall"])
                if best is None or score > best["score"] + 1e-12:
                    best = {"conf": conf, "score": score, **p}
            picks[name][cls] = best
    winner = max(names, key=lambda n: (sum(picks[n][c]["score"] for c in CLASSES) / len(CLASSES), -names.index(n)))
    return winner, picks


def cmd_choose(args: argparse.Namespace) -> int:
    rows = read_rows(args.sweeps)
    if args.candidates:
        rows = [r for r in rows if r["candidate"] in args.candidates]
    if not rows:
        raise SystemExit(f"{args.sweeps}: no rows for those candidates")
    winner, picks = choose(rows, args.task)
    for name, by_class in picks.items():
        mean = sum(v["score"] for v in by_class.values()) / len(by_class)
        print(f"{name}: mean min(P,R) {mean:.4f}" + (" <- chosen" if name == winner else ""))
        for cls, v in by_class.items():
            print(f"  {cls}: conf {v['conf']}  P {v['precision']:.3f}  R {v['recall']:.3f}  edge R {v['edge_recall']:.3f}"
                  f"  ({v['tp']}/{v['fp']}/{v['fn']}, {v['scenes']} scenes, {v['duplicates']} duplicate pairs)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sw = sub.add_parser("sweep", help="score candidates on synthetic scenes")
    sw.add_argument("--task", choices=("hbb", "obb"), required=True)
    sw.add_argument("--candidate", action="append", required=True, metavar="NAME=MODEL.onnx")
    sw.add_argument("--seeds", type=int, nargs="+", required=True)
    sw.add_argument("--work", type=Path, required=True, help="scenes and detections")
    sw.add_argument("--out", type=Path, required=True, help="JSONL of per-scene, per-threshold, per-class counts (appended)")
    ch = sub.add_parser("choose", help="apply the rule to a sweep file")
    ch.add_argument("sweeps", type=Path)
    ch.add_argument("--task", choices=("hbb", "obb"), required=True)
    ch.add_argument("--candidates", nargs="+", help="only these (default: every candidate in the file)")
    args = p.parse_args(argv)
    return cmd_sweep(args) if args.cmd == "sweep" else cmd_choose(args)


if __name__ == "__main__":
    sys.exit(main())
