"""Model commands: ``inspect``, ``export``, ``build-engine`` (the seed's workflow, checked at every step).

    rs-detect export best.pt --imgsz 1024            # Ultralytics, dynamic=True, proven batch-dynamic
    rs-detect inspect best.onnx                      # exit 0: dynamic batch; exit 1: static (and why)
    rs-detect build-engine best.onnx --fp16          # TensorRT, profile 1/8/32, metadata in the header
    rs-detect scene.tif --model best.engine --device cuda
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from rs_detect.cli.detect import fail
from rs_detect.engines.registry import EXPORT_FORMATS
from rs_detect.errors import RsDetectError


@click.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON instead of text.")
@click.option("--model-yaml", type=click.Path(path_type=Path), help="Model YAML whose names/imgsz/task override the file's metadata.")
@click.option("--no-run", is_flag=True, help="Do not execute the model (ONNX: graph scan only).")
def inspect(model: Path, as_json: bool, model_yaml: Path | None, no_run: bool) -> None:
    """Describe MODEL (.onnx, .engine/.plan, .torchscript) and say whether its batch is truly dynamic.

    \b
    ONNX: runs 1 and 3 random images through ONNX Runtime (per-image outputs must match) and scans the
    graph for nodes that bake a batch size in (a static export whose input dims were edited later).
    Exit 0 when the model can be used with dynamic batching, 1 when not (static batch N) or on error.
    """
    from rs_detect.engines import inspect_model

    try:
        info = inspect_model(model, model_yaml, run=not no_run)
    except RsDetectError as exc:
        fail(exc)
        return
    click.echo(json.dumps(info.to_dict(), indent=2) if as_json else info.render())
    sys.exit(info.exit_code)


@click.command("export")
@click.argument("weights", type=click.Path(path_type=Path))
@click.option("--imgsz", type=click.IntRange(min=32), default=1024, show_default=True, help="Input size (square).")
@click.option("--opset", type=click.IntRange(min=11), default=17, show_default=True, help="ONNX opset.")
@click.option("--half", is_flag=True, help="fp16 weights (ONNX; I/O stays float32).")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default="onnx", show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output file [default: WEIGHTS with the format's suffix].")
@click.option("--device", default="cpu", show_default=True, help="Device Ultralytics exports on (cpu, 0, cuda:0).")
def export(weights: Path, imgsz: int, opset: int, half: bool, fmt: str, output: Path | None, device: str) -> None:
    """Export Ultralytics WEIGHTS.pt with a truly dynamic batch (dynamic=True), then prove it.

    Needs the optional extra: pip install 'rs-detect[export]'. Fails (exit 1) if the result is not
    batch-dynamic. For a plain torch model use rs_detect.engines.onnxruntime.export_torch_module_onnx.
    """
    from rs_detect.engines.ultralytics import export_ultralytics

    try:
        info = export_ultralytics(weights, imgsz=imgsz, opset=opset, half=half, fmt=fmt, output=output, device=device)  # type: ignore[arg-type]
    except RsDetectError as exc:
        fail(exc)
        return
    click.echo(f"{info.path}: {info.batch.verdict}")
    if info.format == "onnx":
        click.echo(f"next: rs-detect build-engine {info.path} --fp16")


@click.command("build-engine")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--min-batch", type=click.IntRange(min=1), default=1, show_default=True, help="Smallest batch of the profile.")
@click.option("--opt-batch", type=click.IntRange(min=1), default=8, show_default=True, help="Batch TensorRT tunes for.")
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True, help="Largest batch (buffers are sized for it).")
@click.option("--fp16", is_flag=True, help="Allow fp16 kernels (BuilderFlag.FP16).")
@click.option("--workspace", type=click.FloatRange(min=0, min_open=True), help="Builder workspace limit in GiB.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Engine file [default: MODEL.engine]. .engine: metadata header; .plan: plain plan + .plan.json.")
def build_engine(model: Path, min_batch: int, opt_batch: int, max_batch: int, fp16: bool, workspace: float | None, output: Path | None) -> None:
    """Build a TensorRT engine from a batch-dynamic MODEL.onnx (one optimization profile).

    \b
    Same as: trtexec --onnx=MODEL.onnx --minShapes=images:1x1x1024x1024
             --optShapes=images:8x1x1024x1024 --maxShapes=images:32x1x1024x1024 --saveEngine=MODEL.plan
    A static-batch ONNX is refused (see rs-detect inspect). Needs TensorRT 10+ (pip install tensorrt).
    """
    from rs_detect.engines.tensorrt import build_engine as build

    try:
        result = build(model, output, min_batch, opt_batch, max_batch, fp16, workspace)
    except RsDetectError as exc:
        fail(exc)
        return
    where = f"metadata in {result.sidecar.name}" if result.sidecar else "metadata in the engine header"
    precision = "fp16" if fp16 else "fp32"
    click.echo(f"{result.path}: TensorRT engine, batch {min_batch}/{opt_batch}/{max_batch} (min/opt/max), {precision}, {where}")
    click.echo(f"same as: {result.trtexec_line(model)}")
