"""``rs-detect eval PRED TRUTH``: precision, recall, F1 and AP50 per class."""

from __future__ import annotations

import json
from pathlib import Path

import click

from rs_detect.cli.detect import fail
from rs_detect.errors import RsDetectError


@click.command("eval")
@click.argument("pred", type=click.Path(path_type=Path))
@click.argument("truth", type=click.Path(path_type=Path))
@click.option("--iou", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True, help="IoU for a match.")
@click.option("--match", type=click.Choice(["box", "polygon"]), default="box", show_default=True,
              help="Compare axis-aligned pixel boxes, or (rotated) polygons in the truth's CRS.")
@click.option("--classes", help="Comma-separated classes to score [default: all in either file].")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the scores as JSON.")
def eval_cmd(pred: Path, truth: Path, iou: float, match: str, classes: str | None, json_path: Path | None) -> None:
    """Score detections PRED against ground truth TRUTH (duplicates count as false positives)."""
    from rs_detect.evaluate import as_json, evaluate_files, table
    from rs_detect.fsutil import atomic_write_text as write_text_atomic

    try:
        names = [c.strip() for c in classes.split(",")] if classes else None
        scores = evaluate_files(pred, truth, iou, match, names)  # type: ignore[arg-type]
        if json_path:
            write_text_atomic(json_path, json.dumps({"pred": str(pred), "truth": str(truth), "iou": iou,
                                                     "match": match, "classes": as_json(scores)}, indent=2))
    except RsDetectError as exc:
        fail(exc)
        return
    click.echo(table(scores))
