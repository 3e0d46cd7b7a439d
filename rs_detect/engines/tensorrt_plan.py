"""The TensorRT engine file: a plan, with its metadata in a header or a sidecar.

* a plain plan, as ``trtexec --saveEngine`` writes it;
* an Ultralytics-style ``.engine``: 4-byte little-endian length + JSON metadata + plan;
* a sidecar ``<plan>.json`` beside a plain plan (what ``rs-detect build-engine -o X.plan`` writes, so
  trtexec can still load the plan); read on top of a header.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rs_detect import __version__
from rs_detect.errors import ModelError, one_line
from rs_detect.fsutil import atomic_path, atomic_write_text
from rs_detect.types import ModelMeta

HEADER_LEN_BYTES = 4


def sidecar_path(path: Path) -> Path:
    """``model.plan`` -> ``model.plan.json``: metadata beside a plain plan."""
    return path.with_name(path.name + ".json")


@dataclass(frozen=True)
class EngineFile:
    """A plan's bytes and the metadata found around it."""

    plan: bytes
    metadata: dict[str, Any]
    header: bool
    sidecar: Path | None


def split_header(data: bytes) -> tuple[int, dict[str, Any]]:
    """Ultralytics header: 4-byte little-endian length, then that much JSON. ``(0, {})`` when absent."""
    if len(data) < HEADER_LEN_BYTES:
        return 0, {}
    n = int.from_bytes(data[:HEADER_LEN_BYTES], byteorder="little", signed=False)
    if 0 < n <= len(data) - HEADER_LEN_BYTES:
        try:
            meta = json.loads(data[HEADER_LEN_BYTES : HEADER_LEN_BYTES + n])
        except (ValueError, UnicodeDecodeError):
            return 0, {}  # plan bytes are not JSON: no header
        if isinstance(meta, dict):
            return HEADER_LEN_BYTES + n, meta
    return 0, {}


def read_engine_file(path: Path) -> EngineFile:
    """The plan bytes (header skipped) and its metadata: header, then sidecar JSON on top."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the engine ({exc.strerror})") from None
    offset, meta = split_header(data)
    side = sidecar_path(path)
    found = None
    if side.is_file():
        try:
            extra = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{side}: not a JSON metadata sidecar ({one_line(exc)})") from None
        if not isinstance(extra, dict):
            raise ModelError(f"{side}: a metadata sidecar must be a JSON object")
        meta = {**meta, **extra}
        found = side
    return EngineFile(data[offset:], meta, offset > 0, found)


def write_engine_file(path: Path, plan: bytes | memoryview, meta: Mapping[str, Any]) -> Path | None:
    """``.engine``: header + plan in one file; anything else: the plain plan + ``<name>.json``.

    Returns the sidecar path when one was written. Both files are written atomically.
    """
    path = Path(path)
    blob = json.dumps(meta).encode("utf-8")
    with atomic_path(path, parents=True) as tmp, open(tmp, "wb") as fh:
        if path.suffix.lower() == ".engine":
            fh.write(len(blob).to_bytes(4, byteorder="little", signed=False))
            fh.write(blob)
        fh.write(plan)
    if path.suffix.lower() == ".engine":
        sidecar_path(path).unlink(missing_ok=True)  # a stale sidecar would override the header
        return None
    return atomic_write_text(sidecar_path(path), json.dumps(meta, indent=2))


def engine_metadata(meta: ModelMeta, min_batch: int, opt_batch: int, max_batch: int, fp16: bool, onnx_path: Path, trt_version: str) -> dict[str, Any]:
    """Ultralytics-compatible keys (``batch`` stays an int) plus the profile under ``batch_profile``."""
    return {
        "description": f"TensorRT engine built by rs-detect {__version__} from {onnx_path.name}",
        "author": "rs-detect",
        "version": __version__,
        "tensorrt": trt_version,
        "task": meta.task,
        "stride": meta.stride,
        "imgsz": [meta.imgsz, meta.imgsz],
        "channels": meta.channels,
        "names": {i: n for i, n in enumerate(meta.names)},
        "batch": max_batch,
        "batch_profile": {"min": min_batch, "opt": opt_batch, "max": max_batch},
        "fp16": fp16,
        "end2end": meta.end2end,
        "args": {"dynamic": True, "batch": max_batch, "half": fp16},
    }
