"""One scene, the same function serially and as a Dask task: a process-wide engine cache, the outcome."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rs_detect.batch.discovery import SceneJob
from rs_detect.batch.manifest import (
    RunIdentity, _sha256_bytes, input_fingerprint, read_manifest, why_not_complete, write_manifest,
)
from rs_detect.config import Config
from rs_detect.errors import ModelError, RsDetectError, one_line
from rs_detect.fsutil import file_sha256

if TYPE_CHECKING:
    from rs_detect.pipeline import ScenePipeline

Status = Literal["done", "skipped", "failed"]


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a process needs to build (once) the pipeline that runs this batch's scenes."""

    config: Config
    identity: RunIdentity
    threads: int | None = None  # ONNX Runtime intra-op threads; None: the engine's default
    run_id: str = ""  # written into each manifest: a retried task finds its scene finished by this run
    pinned: bool = False  # each worker process has one GPU (CUDA_VISIBLE_DEVICES): record it per scene

    @property
    def cache_key(self) -> tuple[str, str, str, str, int | None]:
        full = _sha256_bytes(json.dumps(self.config.as_dict(), sort_keys=True, default=str).encode())
        return (self.identity.model_path, self.identity.model_sha256, full, str(self.config.device), self.threads)


_PIPELINES: OrderedDict[tuple[str, str, str, str, int | None], ScenePipeline] = OrderedDict()
_PIPELINES_LOCK = threading.Lock()
_PIPELINES_MAX = 2


def get_pipeline(spec: WorkerSpec) -> ScenePipeline:
    """The process's pipeline for ``spec``: the engine is loaded on first use and reused for every scene.

    Keyed by (model path, model sha256, config hash, device, threads); at most two are kept, the least
    recently used one is closed. The model file this process sees must have the planned sha256 (a worker
    on another machine with a different file at that path fails loudly instead of mixing models).
    """
    key = spec.cache_key
    with _PIPELINES_LOCK:
        if key in _PIPELINES:
            _PIPELINES.move_to_end(key)
            return _PIPELINES[key]
        from rs_detect.engines import backend_for, load_engine
        from rs_detect.pipeline import ScenePipeline

        cfg = spec.config
        path = Path(spec.identity.model_path)
        if not path.is_file():
            raise ModelError(f"{path}: model file not found on {socket.gethostname()}")
        if file_sha256(path) != spec.identity.model_sha256:
            raise ModelError(f"{path}: the model on {socket.gethostname()} differs from the one this run was planned with (sha256 mismatch)")
        model_yaml = Path(cfg.model_meta) if isinstance(cfg.model_meta, str) else cfg.model_meta
        kwargs: dict[str, Any] = {}
        if spec.threads and backend_for(path) == "onnxruntime":
            kwargs["threads"] = spec.threads
        engine = load_engine(path, device=str(cfg.device), model_yaml=model_yaml, **kwargs)
        pipeline = ScenePipeline(engine, cfg, path, model_sha256=spec.identity.model_sha256)  # just verified
        _PIPELINES[key] = pipeline
        while len(_PIPELINES) > _PIPELINES_MAX:
            _, old = _PIPELINES.popitem(last=False)
            old.engine.close()
        return pipeline


def clear_pipeline_cache() -> None:
    """Close and forget every cached engine of this process (tests; long-lived library users)."""
    with _PIPELINES_LOCK:
        while _PIPELINES:
            _, old = _PIPELINES.popitem()
            old.engine.close()


@dataclass
class SceneOutcome:
    """What the caller learns about one scene: small, JSON-friendly, never the detections."""

    scene: str
    status: Status
    input: str = ""
    output: str | None = None
    error: str | None = None
    tiles_total: int = 0
    tiles_read: int = 0
    tiles_skipped: int = 0
    detections: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0  # running the scene (engine loading excluded, see load_seconds)
    crs: str | None = None  # WKT of the output's CRS; None: pixel coordinates (scene without CRS)
    worker: str = ""
    gpu: str | None = None  # the GPU (as CUDA_VISIBLE_DEVICES names it) of a worker pinned to one
    warnings: list[str] = field(default_factory=list)
    load_seconds: float = 0.0  # loading the engine, on the first scene a process runs
    started_at: float = 0.0  # epoch seconds, for throughput over a run's scenes
    finished_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> SceneOutcome:
        return SceneOutcome(**d)

    @staticmethod
    def skipped(job: SceneJob) -> SceneOutcome:
        """A finished scene, its numbers taken from its manifest."""
        doc = read_manifest(job.manifest) or {}
        res = doc.get("result", {})
        return SceneOutcome(
            scene=job.rel, status="skipped", input=str(job.scene), output=str(job.output),
            tiles_total=int(res.get("tiles_total", 0)), tiles_read=int(res.get("tiles_read", 0)),
            tiles_skipped=int(res.get("tiles_skipped", 0)), detections=int(res.get("detections", 0)),
            per_class=dict(res.get("per_class", {})), seconds=float(res.get("seconds", 0.0)),
            crs=doc.get("output", {}).get("crs"), worker=str(doc.get("worker", "")),
        )


def one_line_error(exc: BaseException) -> str:
    """RsDetectError messages as they are; anything else prefixed with its type."""
    msg = " ".join(str(exc).split())  # not one_line: an empty message stays empty here
    if isinstance(exc, RsDetectError):
        return msg
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


class _CaptureWarnings(logging.Handler):
    """Collects the rs_detect warnings logged by this thread while one scene runs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(one_line(record.getMessage()))


@contextmanager
def _captured_warnings() -> Iterator[list[str]]:
    logger = logging.getLogger("rs_detect")
    handler = _CaptureWarnings()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)



def finished_by(job: SceneJob, spec: WorkerSpec) -> bool:
    """Whether this run (``spec.run_id``) already finished ``job``: its manifest says so and matches."""
    doc = read_manifest(job.manifest)
    return bool(doc) and doc.get("run_id") == spec.run_id and why_not_complete(job, spec.identity) is None


def process_scene(job: SceneJob, spec: WorkerSpec) -> dict[str, Any]:
    """Run one scene and record it; returns :meth:`SceneOutcome.to_dict` (the Dask task).

    Any exception becomes a ``failed`` outcome with a one-line error, so one bad scene never stops the
    others. KeyboardInterrupt and SystemExit pass through (the run is being stopped).
    """
    worker = f"{socket.gethostname()}:{os.getpid()}"
    if spec.run_id and finished_by(job, spec):  # a retry after the result was lost with its worker
        again = SceneOutcome.skipped(job)
        again.status = "done"
        return again.to_dict()
    outcome = SceneOutcome(scene=job.rel, status="failed", input=str(job.scene), worker=worker, started_at=time.time(),
                           gpu=os.environ.get("CUDA_VISIBLE_DEVICES") if spec.pinned else None)
    with _captured_warnings() as captured:
        try:
            t0 = time.perf_counter()
            pipeline = get_pipeline(spec)
            outcome.load_seconds = round(time.perf_counter() - t0, 3)
            start = time.perf_counter()
            fingerprint = input_fingerprint(job.scene)
            job.manifest.unlink(missing_ok=True)  # from here on, a crash leaves the scene "not done"
            job.output.parent.mkdir(parents=True, exist_ok=True)
            result = pipeline.run(job.scene, job.output, progress=False)
            stats = result.stats
            outcome.status = "done"
            outcome.output = str(job.output)
            outcome.tiles_total, outcome.tiles_read, outcome.tiles_skipped = stats.tiles_total, stats.tiles_read, stats.tiles_skipped
            outcome.detections = stats.detections
            outcome.per_class = dict(sorted(stats.per_class.items()))
            outcome.crs = None if result.frame.crs is None else result.frame.crs.to_wkt()
            outcome.seconds = round(time.perf_counter() - start, 3)
            write_manifest(job, spec.identity, fingerprint, outcome, spec.run_id)
        except Exception as exc:  # noqa: BLE001 - isolate every failure to its scene
            outcome.status = "failed"
            outcome.output = None
            outcome.error = one_line_error(exc)
    outcome.warnings = list(captured)
    outcome.finished_at = time.time()
    return outcome.to_dict()

