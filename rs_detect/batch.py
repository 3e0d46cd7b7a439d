"""Many scenes: discovery, resume manifests, serial or Dask execution, a run summary, a merged index.

An archive run is a list of :class:`SceneJob` (one scene -> one output in OUTDIR, mirroring the input
tree below the inputs' common root). Each job is run by :func:`process_scene`, the same function
serially in-process and as a Dask task, which:

1. fingerprints the input (size, mtime_ns, a hash of its first and last 64 KiB),
2. removes the scene's old manifest, so a crash from here on leaves the scene "not done",
3. runs the cached :class:`~rs_detect.pipeline.ScenePipeline` (the engine is loaded once per process),
   which writes the output atomically (temporary name + rename, :mod:`rs_detect.io.writer`),
4. writes the manifest ``<output>.done.json`` atomically, *after* the output's rename,
5. returns a small dict (never detections) to the caller.

So "a manifest exists and matches" implies "the output is complete and belongs to this input, model and
config": a rerun skips exactly those scenes, and an interruption at any point (Ctrl-C, a killed process,
a lost Dask worker) loses nothing already written and never leaves a partial output.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rs_detect import __version__
from rs_detect.config import Config, auto_read_threads
from rs_detect.errors import ConfigError, InputError, ModelError, OutputError, RsDetectError
from rs_detect.io.writer import EXTENSIONS, check_writable, format_for

if TYPE_CHECKING:
    import geopandas as gpd
    from distributed import Client

    from rs_detect.pipeline import ScenePipeline

log = logging.getLogger(__name__)

DEFAULT_PATTERNS: tuple[str, ...] = ("*.tif", "*.tiff")
SUMMARY_NAME = "_run_summary.json"
MANIFEST_SUFFIX = ".done.json"
MANIFEST_VERSION = 1
#: Config fields that change speed or placement but not the detections, left out of the config hash.
RESULT_NEUTRAL_KEYS = frozenset({"read_threads", "prefetch", "batch_size", "device", "model"})
#: Test hook (documented in docs/batch.md): path of a marker file holding one scene's relative path.
#: Inside a Dask worker, the first task for that scene renames the marker and kills its own worker
#: process with ``os._exit``, so tests can lose a worker mid-run deterministically. Unset: no effect.
CRASH_HOOK_ENV = "RS_DETECT_BATCH_CRASH_ONCE"
INDEX_FORMATS = ("gpkg", "parquet")
PARTIAL_HASH_BYTES = 1 << 16

Status = Literal["done", "skipped", "failed"]


# -- discovery --------------------------------------------------------------------------------------


def _matches(name: str, patterns: Sequence[str]) -> bool:
    low = name.lower()
    return any(fnmatch(low, p.lower()) for p in patterns)


def _walk(folder: Path, patterns: Sequence[str], exclude: Sequence[Path]) -> Iterator[Path]:
    """Files below ``folder`` whose name matches a pattern; hidden folders and ``exclude`` are pruned."""
    excluded = {os.path.abspath(e) for e in exclude}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and os.path.abspath(os.path.join(dirpath, d)) not in excluded
        )
        for name in sorted(filenames):
            if not name.startswith(".") and _matches(name, patterns):
                yield Path(os.path.abspath(os.path.join(dirpath, name)))


def discover_scenes(
    inputs: Sequence[str | os.PathLike[str]],
    patterns: Sequence[str] = DEFAULT_PATTERNS,
    exclude: Sequence[Path] = (),
) -> tuple[list[Path], Path]:
    """Scenes named by ``inputs`` (files, folders searched recursively with ``patterns``, or globs).

    Returns the absolute scene paths (sorted, each once) and their common root, the folder that
    outputs are mirrored from. A file named explicitly is taken whatever its name; patterns match
    case-insensitively. A missing input or an empty result is an :class:`InputError`.
    """
    patterns = tuple(patterns) or DEFAULT_PATTERNS
    found: dict[str, Path] = {}
    roots: list[str] = []

    def add(path: Path) -> None:
        found.setdefault(str(path), path)

    for raw in inputs:
        path = Path(os.path.abspath(os.path.expanduser(os.fspath(raw))))
        if path.is_file():
            add(path)
        elif path.is_dir():
            roots.append(str(path))
            for f in _walk(path, patterns, exclude):
                add(f)
        elif glob.has_magic(os.fspath(raw)):
            matches = sorted(glob.glob(os.path.expanduser(os.fspath(raw)), recursive=True))
            if not matches:
                raise InputError(f"{raw}: no file matches this pattern")
            for m in matches:
                mp = Path(os.path.abspath(m))
                if mp.is_dir():
                    roots.append(str(mp))
                    for f in _walk(mp, patterns, exclude):
                        add(f)
                elif mp.is_file():
                    add(mp)
        else:
            raise InputError(f"{raw}: no such file or directory")
    if not found:
        raise InputError(f"no scenes found in {', '.join(map(str, inputs))} (patterns {', '.join(patterns)})")
    scenes = sorted(found.values())
    root = Path(os.path.commonpath(roots + [str(s.parent) for s in scenes]))
    return scenes, root


@dataclass(frozen=True)
class SceneJob:
    """One scene of the archive and where its output goes."""

    scene: Path  # absolute path of the input
    rel: str  # path relative to the run's common root, POSIX separators: the scene's id in the run
    output: Path  # absolute path of the per-scene output

    @property
    def manifest(self) -> Path:
        return manifest_path(self.output)


def manifest_path(output: Path) -> Path:
    return output.with_name(output.name + MANIFEST_SUFFIX)


def plan_jobs(scenes: Sequence[Path], root: Path, outdir: Path, fmt: str = "geojson") -> list[SceneJob]:
    """Map each scene to ``outdir/<path below root>.<ext>``.

    Two scenes that would share an output (``x.tif`` and ``x.tiff`` side by side; names that differ only
    in case) keep their full file name instead: ``x.tif.geojson`` and ``x.tiff.geojson``.
    """
    if fmt not in EXTENSIONS:
        raise ConfigError(f"unknown output format {fmt!r} (use {', '.join(EXTENSIONS)})")
    ext = EXTENSIONS[fmt]
    outdir = Path(os.path.abspath(outdir))
    rels = [Path(os.path.relpath(s, root)) for s in scenes]
    counts = Counter(str(r.with_suffix(ext)).lower() for r in rels)
    jobs = []
    for scene, rel in zip(scenes, rels):
        target = rel.with_suffix(ext) if counts[str(rel.with_suffix(ext)).lower()] == 1 else rel.with_name(rel.name + ext)
        jobs.append(SceneJob(scene=scene, rel=rel.as_posix(), output=outdir / target))
    return jobs


# -- fingerprints and manifests ----------------------------------------------------------------------


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    from rs_detect.pipeline import file_sha256

    return file_sha256(path)


def input_fingerprint(path: Path) -> dict[str, Any]:
    """Size, mtime_ns and a hash of the first and last 64 KiB: cheap, and catches rewrites in place."""
    st = path.stat()
    h = hashlib.sha256(str(st.st_size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(PARTIAL_HASH_BYTES))
        if st.st_size > PARTIAL_HASH_BYTES:
            fh.seek(max(PARTIAL_HASH_BYTES, st.st_size - PARTIAL_HASH_BYTES))
            h.update(fh.read(PARTIAL_HASH_BYTES))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "partial_sha256": h.hexdigest()}


def config_digest(cfg: Config, model_path: Path) -> str:
    """Hash of the config fields that change results, plus the model YAML(s) that change its metadata.

    Left out: read_threads, prefetch, batch_size, device (speed and placement) and the model's path (the
    model is identified by its sha256 instead, so moving it does not redo an archive).
    """
    from rs_detect.engines.metadata import sidecar_yaml

    d = cfg.as_dict()
    for key in RESULT_NEUTRAL_KEYS:
        d.pop(key, None)
    if isinstance(cfg.model_meta, str):
        p = Path(cfg.model_meta)
        d["model_meta"] = {"path_sha256": _sha256_file(p) if p.is_file() else None}
    sidecar = sidecar_yaml(model_path) if cfg.model_meta is None else None
    d["model_sidecar_sha256"] = _sha256_file(sidecar) if sidecar else None
    return _sha256_bytes(json.dumps(d, sort_keys=True, default=str).encode())


@dataclass(frozen=True)
class RunIdentity:
    """What a finished scene must match to be skipped (besides its own input fingerprint)."""

    model_path: str
    model_sha256: str
    config_sha256: str

    @staticmethod
    def of(cfg: Config) -> RunIdentity:
        model = cfg.model_path()
        if not model.is_file():
            raise ModelError(f"{model}: model file not found")
        return RunIdentity(str(model.resolve()), _sha256_file(model), config_digest(cfg, model))


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest at ``path``, or None when it is missing or unreadable (then the scene is redone)."""
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("version") == MANIFEST_VERSION else None


def why_not_complete(job: SceneJob, identity: RunIdentity) -> str | None:
    """None when ``job`` is finished for this input, model and config; else the reason it must run."""
    doc = read_manifest(job.manifest)
    if doc is None:
        return "no manifest"
    try:
        out_size = job.output.stat().st_size
    except OSError:
        return "output missing"
    if doc.get("output", {}).get("size") != out_size:
        return "output size differs from the manifest"
    if doc.get("model_sha256") != identity.model_sha256:
        return "model changed"
    if doc.get("config_sha256") != identity.config_sha256:
        return "config changed"
    try:
        st = job.scene.stat()
    except OSError:
        return "input missing"
    recorded = doc.get("input", {})
    if recorded.get("size") != st.st_size or recorded.get("mtime_ns") != st.st_mtime_ns:
        return "input changed"
    if recorded.get("partial_sha256") != input_fingerprint(job.scene)["partial_sha256"]:
        return "input changed"
    return None


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it and rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(job: SceneJob, identity: RunIdentity, fingerprint: dict[str, Any], outcome: SceneOutcome) -> None:
    """Record a finished scene; called only after its output has been renamed into place."""
    doc = {
        "version": MANIFEST_VERSION,
        "software": f"rs-detect {__version__}",
        "scene": job.rel,
        "input": {"path": str(job.scene), **fingerprint},
        "model_path": identity.model_path,
        "model_sha256": identity.model_sha256,
        "config_sha256": identity.config_sha256,
        "output": {"path": job.output.name, "size": job.output.stat().st_size, "crs": outcome.crs},
        "result": {k: getattr(outcome, k) for k in ("tiles_total", "tiles_read", "tiles_skipped", "detections", "per_class", "seconds")},
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "worker": outcome.worker,
    }
    _atomic_write_text(job.manifest, json.dumps(doc, indent=1, sort_keys=True))


# -- one scene (the Dask task) -------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a process needs to build (once) the pipeline that runs this batch's scenes."""

    config: Config
    identity: RunIdentity
    threads: int | None = None  # ONNX Runtime intra-op threads; None: the engine's default

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
        if _sha256_file(path) != spec.identity.model_sha256:
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
    msg = " ".join(str(exc).split())
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
            self.messages.append(" ".join(record.getMessage().split()))


@contextmanager
def _captured_warnings() -> Iterator[list[str]]:
    logger = logging.getLogger("rs_detect")
    handler = _CaptureWarnings()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def _in_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return False
    return True


def _crash_hook(job: SceneJob) -> None:
    """The documented test hook (:data:`CRASH_HOOK_ENV`): lose this worker once, on this scene."""
    marker = os.environ.get(CRASH_HOOK_ENV)
    if not marker or not _in_dask_worker():
        return
    path = Path(marker)
    try:
        if path.read_text().strip() != job.rel:
            return
        os.replace(path, path.with_name(path.name + ".fired"))  # only one attempt can win the rename
    except OSError:
        return
    os._exit(70)


def process_scene(job: SceneJob, spec: WorkerSpec) -> dict[str, Any]:
    """Run one scene and record it; returns :meth:`SceneOutcome.to_dict` (the Dask task).

    Any exception becomes a ``failed`` outcome with a one-line error, so one bad scene never stops the
    others. KeyboardInterrupt and SystemExit pass through (the run is being stopped).
    """
    _crash_hook(job)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    outcome = SceneOutcome(scene=job.rel, status="failed", input=str(job.scene), worker=worker, started_at=time.time())
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
            write_manifest(job, spec.identity, fingerprint, outcome)
        except Exception as exc:  # noqa: BLE001 - isolate every failure to its scene
            outcome.status = "failed"
            outcome.output = None
            outcome.error = one_line_error(exc)
    outcome.warnings = list(captured)
    outcome.finished_at = time.time()
    return outcome.to_dict()


# -- the run summary ----------------------------------------------------------------------------------


@dataclass
class BatchSummary:
    """Every scene of the run once (keyed by its relative path), with totals and the merged index."""

    outdir: Path
    mode: str = "serial"
    workers: int = 1
    model: str = ""
    model_sha256: str = ""
    config_sha256: str = ""
    started: str = ""
    seconds: float = 0.0
    outcomes: dict[str, SceneOutcome] = field(default_factory=dict)
    index: dict[str, Any] | None = None
    interrupted: bool = False

    def add(self, outcome: SceneOutcome) -> None:
        """Record a scene; a second report for the same scene (a retried task) replaces the first."""
        self.outcomes[outcome.scene] = outcome

    def by_status(self, status: Status) -> list[SceneOutcome]:
        return [o for k, o in sorted(self.outcomes.items()) if o.status == status]

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(o.status for o in self.outcomes.values())
        return {s: c.get(s, 0) for s in ("done", "skipped", "failed")}

    @property
    def failed(self) -> bool:
        return self.counts["failed"] > 0

    def per_class(self, statuses: Iterable[Status] = ("done", "skipped")) -> dict[str, int]:
        total: Counter[str] = Counter()
        wanted = set(statuses)
        for o in self.outcomes.values():
            if o.status in wanted:
                total.update(o.per_class)
        return dict(sorted(total.items()))

    @property
    def tiles_done(self) -> int:
        """Tiles run through the engine in this run (skipped scenes excluded)."""
        return sum(o.tiles_read for o in self.by_status("done"))

    @property
    def tiles_per_s(self) -> float:
        return self.tiles_done / self.seconds if self.seconds > 0 else 0.0

    @property
    def scenes_per_s(self) -> float:
        return self.counts["done"] / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "software": f"rs-detect {__version__}",
            "outdir": str(self.outdir),
            "mode": self.mode,
            "workers": self.workers,
            "model": self.model,
            "model_sha256": self.model_sha256,
            "config_sha256": self.config_sha256,
            "started": self.started,
            "seconds": round(self.seconds, 3),
            "interrupted": self.interrupted,
            "counts": self.counts,
            "per_class": self.per_class(),
            "per_class_this_run": self.per_class(("done",)),
            "tiles": self.tiles_done,
            "tiles_per_s": round(self.tiles_per_s, 3),
            "scenes_per_s": round(self.scenes_per_s, 4),
            "index": self.index,
            "scenes": [o.to_dict() for _, o in sorted(self.outcomes.items())],
        }

    def write(self, path: Path | None = None) -> Path:
        path = path or self.outdir / SUMMARY_NAME
        _atomic_write_text(path, json.dumps(self.to_dict(), indent=1, default=str))
        return path

    def table(self) -> str:
        """The human summary printed at the end of ``rs-detect batch``."""
        rows = [("", "scenes", "tiles", "detections", "seconds")]
        for status in ("done", "skipped", "failed"):
            items = self.by_status(status)  # type: ignore[arg-type]
            if status == "failed":
                rows.append((status, str(len(items)), "-", "-", "-"))
                continue
            rows.append((
                status, str(len(items)), str(sum(o.tiles_read for o in items)), str(sum(o.detections for o in items)),
                f"{sum(o.seconds for o in items):.1f}" if status == "done" else "-",
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        per = ", ".join(f"{k} {v}" for k, v in self.per_class().items()) or "none"
        lines.append(f"detections per class (done + skipped): {per}")
        lines.append(
            f"{self.tiles_done} tiles in {self.seconds:.1f} s: {self.tiles_per_s:.1f} tiles/s, "
            f"{self.scenes_per_s:.2f} scenes/s ({self.mode}, {self.workers} worker{'s' if self.workers != 1 else ''})"
        )
        if self.index:
            lines.append(f"index: {self.index.get('path')} ({self.index.get('features')} detections, {self.index.get('crs_name')})")
            for note in self.index.get("notes", []):
                lines.append(f"  note: {note}")
        warned = [(o.scene, w) for o in self.outcomes.values() if o.status == "done" for w in o.warnings]
        if warned:
            lines.append("warnings:")
            lines.extend(f"  {scene}: {w}" for scene, w in sorted(warned))
        failed = self.by_status("failed")
        if failed:
            lines.append("failed:")
            lines.extend(f"  {o.scene}: {o.error}" for o in failed)
        if self.interrupted:
            lines.append("interrupted: rerun the same command to finish the remaining scenes")
        return "\n".join(lines)


# -- executors ---------------------------------------------------------------------------------------

OnResult = Callable[[SceneOutcome], None]


def run_serial(jobs: Sequence[SceneJob], spec: WorkerSpec, on_result: OnResult) -> None:
    """One scene after another in this process, with one engine."""
    for job in jobs:
        on_result(SceneOutcome.from_dict(process_scene(job, spec)))


def run_dask(jobs: Sequence[SceneJob], spec: WorkerSpec, client: Client, on_result: OnResult, retries: int = 2) -> None:
    """One task per scene on ``client``; only the small outcome dicts come back.

    A worker lost mid-task makes the scheduler run that task again elsewhere (up to
    ``distributed.scheduler.allowed-failures`` times; ``retries`` covers exceptions outside the task's own
    error handling). A scene that keeps killing its workers is reported failed with the KilledWorker error.
    """
    from distributed import as_completed

    warm_workers(client, spec)
    run_id = uuid.uuid4().hex[:8]
    futures = {
        client.submit(process_scene, job, spec, key=f"rs-detect-scene-{run_id}-{i}", retries=retries, pure=False): job
        for i, job in enumerate(jobs)
    }
    try:
        for fut in as_completed(futures):
            job = futures[fut]
            try:
                outcome = SceneOutcome.from_dict(fut.result())
            except Exception as exc:  # noqa: BLE001 - KilledWorker, lost scheduler, unpicklable result
                outcome = SceneOutcome(scene=job.rel, status="failed", input=str(job.scene), error=one_line_error(exc))
            on_result(outcome)
    finally:
        pending = [f for f in futures if not f.done()]
        if pending:
            client.cancel(pending)  # do not leave work running on a shared cluster


def _warm(spec: WorkerSpec) -> str:
    get_pipeline(spec)
    return f"{socket.gethostname()}:{os.getpid()}"


def warm_workers(client: Client, spec: WorkerSpec) -> list[str]:
    """Load the engine on every current worker, in parallel, before any scene is submitted.

    A model that cannot load (missing on a worker, different sha256, no CUDA there) then fails the run
    at once with its one-line error instead of failing every scene; workers that join later (adaptive
    clusters, restarted workers) load it on their first scene.
    """
    try:
        return sorted(client.run(_warm, spec).values())
    except RsDetectError:
        raise
    except Exception as exc:  # noqa: BLE001 - a worker's own error type, re-raised by client.run
        raise ModelError(f"{spec.identity.model_path}: cannot prepare the Dask workers ({one_line_error(exc)})") from None


@contextmanager
def dask_client(workers: int | None = None, scheduler: str | None = None, device: str = "cpu") -> Iterator[tuple[Client, int]]:
    """A client on ``scheduler`` (a running cluster) or on a new local cluster of ``workers`` processes.

    Local clusters use processes with one thread each (GIL-free scaling; each process loads its engine
    once). With ``device == "cuda"`` and dask-cuda installed, a LocalCUDACluster pins one worker per GPU.
    Yields the client and the number of workers; the cluster is closed on exit, even on Ctrl-C.
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ConfigError("--workers/--scheduler need dask.distributed: pip install 'rs-detect[dist]'") from None
    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise ConfigError(f"{scheduler}: cannot connect to the Dask scheduler ({' '.join(str(exc).split())[:160]})") from None
        try:
            yield client, max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))
        finally:
            client.close()
        return
    n = int(workers or 1)
    cluster = None
    if str(device) == "cuda":
        try:
            from dask_cuda import LocalCUDACluster  # type: ignore[import-not-found]

            cluster = LocalCUDACluster(n_workers=n, threads_per_worker=1, silence_logs=logging.ERROR, dashboard_address=None)
        except ImportError:
            log.warning("dask-cuda is not installed: %d local workers will share the default GPU", n)
    if cluster is None:
        with warnings.catch_warnings():
            # the scheduler's HTTP routes move off a busy default port and warn about it: nothing to act on
            warnings.filterwarnings("ignore", message="Port .* is already in use", category=UserWarning)
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, silence_logs=logging.ERROR, dashboard_address=None)
    client = Client(cluster)
    try:
        yield client, n
    finally:
        client.close()
        cluster.close()


# -- the merged index ---------------------------------------------------------------------------------


def read_detections(path: Path) -> gpd.GeoDataFrame:
    """A per-scene output back as a GeoDataFrame (any of the writer's formats)."""
    import geopandas as gpd

    from rs_detect.io.writer import LAYER

    fmt = format_for(path)
    if fmt == "parquet":
        return gpd.read_parquet(path)
    return gpd.read_file(path, engine="pyogrio", layer=LAYER)


def write_index(summary: BatchSummary, path: Path, crs_mode: str) -> dict[str, Any]:
    """Merge the finished scenes' outputs into one GeoPackage/GeoParquet with a ``scene`` column.

    CRS rule: ``--crs wgs84`` gives WGS84. ``--crs native`` keeps the scenes' CRS when they all share
    one, else reprojects every scene to WGS84 (and says so in ``notes``). Scenes without a CRS (pixel
    coordinates) cannot share a map with the others and are left out, listed in ``excluded``.
    Written atomically, after all scenes.
    """
    import geopandas as gpd
    import pandas as pd
    from pyproj import CRS as ProjCRS

    from rs_detect.io.writer import write_detections

    frames: list[tuple[str, gpd.GeoDataFrame]] = []
    excluded: list[str] = []
    notes: list[str] = []
    for o in summary.by_status("done") + summary.by_status("skipped"):
        if o.output is None:
            continue
        if o.crs is None:
            excluded.append(o.scene)
            continue
        gdf = read_detections(Path(o.output))
        gdf = gdf.set_crs(ProjCRS.from_wkt(o.crs), allow_override=True)  # the manifest's CRS is the truth
        gdf["scene"] = o.scene
        frames.append((o.scene, gdf))
    frames.sort(key=lambda t: t[0])
    if excluded:
        notes.append(f"{len(excluded)} scene(s) without a CRS (pixel coordinates) left out: {', '.join(sorted(excluded))}")
    wgs84 = ProjCRS.from_epsg(4326)
    crss = {f.crs.to_wkt() for _, f in frames}
    if crs_mode == "native" and len(crss) == 1:
        target = frames[0][1].crs
    else:
        target = wgs84
        if crs_mode == "native" and len(crss) > 1:
            notes.append(f"scenes have {len(crss)} different CRSs: the index is reprojected to WGS84")
    parts = []
    for scene, gdf in frames:
        if not gdf.crs.equals(target):
            try:
                gdf = gdf.to_crs(target)
            except Exception as exc:  # noqa: BLE001 - pyproj raises several types
                excluded.append(scene)
                notes.append(f"{scene}: cannot reproject to {target.name} ({one_line_error(exc)[:120]}): left out")
                continue
        parts.append(gdf)
    if parts:
        merged = gpd.GeoDataFrame(pd.concat(parts, ignore_index=True), geometry="geometry", crs=target)
    else:
        merged = gpd.GeoDataFrame({"scene": pd.array([], dtype="str")}, geometry=gpd.GeoSeries([], crs=target), crs=target)
    meta = {"software": f"rs-detect {__version__}", "scenes": len(parts), "excluded": sorted(excluded),
            "model_sha256": summary.model_sha256, "config_sha256": summary.config_sha256}
    write_detections(merged, path, meta)
    return {"path": str(path), "features": len(merged), "scenes": len(parts), "crs_name": target.name,
            "excluded": sorted(excluded), "notes": notes}


def check_index_format(path: Path) -> None:
    """Refuse an index that is not a GeoPackage or GeoParquet, before any scene is run."""
    if format_for(path) not in INDEX_FORMATS:
        raise OutputError(f"{path}: the merged index must be a GeoPackage (.gpkg) or GeoParquet (.parquet)")


# -- the whole run ------------------------------------------------------------------------------------


def _execute(
    todo: Sequence[SceneJob], config: Config, identity: RunIdentity, summary: BatchSummary, record: OnResult,
    workers: int | None, scheduler: str | None,
) -> None:
    """Run ``todo`` serially or on Dask (``summary.mode`` says which); every outcome goes to ``record``."""
    if not todo:
        return
    if summary.mode == "serial":
        spec = WorkerSpec(config, identity)
        get_pipeline(spec)  # a model that cannot load fails the run now, not once per scene
        run_serial(todo, spec, record)
        return
    with dask_client(workers, scheduler, str(config.device)) as (client, n):
        summary.workers = n
        threads = max(1, (os.cpu_count() or 1) // n) if scheduler is None else None  # share this host's cores
        if threads is not None and config.read_threads is None:  # and their readers too
            config = replace(config, read_threads=auto_read_threads(str(config.device), threads))
        run_dask(todo, WorkerSpec(config, identity, threads), client, record)


def run_batch(
    inputs: Sequence[str | os.PathLike[str]],
    outdir: str | os.PathLike[str],
    config: Config,
    *,
    patterns: Sequence[str] = DEFAULT_PATTERNS,
    fmt: str = "geojson",
    workers: int | None = None,
    scheduler: str | None = None,
    index: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: bool = False,
    on_result: OnResult | None = None,
) -> BatchSummary:
    """Run every scene of ``inputs`` into ``outdir``; returns the summary (also written to OUTDIR).

    Serial in this process unless ``workers`` (a local Dask cluster) or ``scheduler`` (an existing one)
    is given. Finished scenes whose manifest matches are skipped unless ``force``. Failed scenes are
    recorded and the others go on; check :attr:`BatchSummary.failed`. Ctrl-C writes the summary of what
    finished (``interrupted: true``) and re-raises.
    """
    if workers is not None and scheduler is not None:
        raise ConfigError("give either workers (a local cluster) or scheduler (an existing one), not both")
    outdir = Path(os.path.abspath(outdir))
    index = Path(os.path.abspath(index)) if index is not None else None
    if index is not None:
        check_index_format(index)
    scenes, root = discover_scenes(inputs, patterns, exclude=[outdir])
    jobs = plan_jobs(scenes, root, outdir, fmt)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{outdir}: cannot create the output folder ({exc.strerror or exc})") from None
    if index is not None:
        check_writable(index)  # after OUTDIR exists: the index may live inside it
    identity = RunIdentity.of(config)
    mode = "serial" if workers is None and scheduler is None else ("dask-scheduler" if scheduler else "dask-local")
    summary = BatchSummary(
        outdir=outdir, mode=mode, model=identity.model_path, model_sha256=identity.model_sha256,
        config_sha256=identity.config_sha256, started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    todo = []
    for job in jobs:
        if not force and why_not_complete(job, identity) is None:
            summary.add(SceneOutcome.skipped(job))
        else:
            todo.append(job)

    from tqdm import tqdm

    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="scene", desc="scenes", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)

    def record(outcome: SceneOutcome) -> None:
        summary.add(outcome)
        bar.update(1)
        bar.set_postfix(failed=summary.counts["failed"], refresh=False)
        if on_result is not None:
            on_result(outcome)

    start = time.perf_counter()
    try:
        with bar:
            _execute(todo, config, identity, summary, record, workers, scheduler)
    except KeyboardInterrupt:
        summary.interrupted = True
        summary.seconds = time.perf_counter() - start
        summary.write()
        raise
    summary.seconds = time.perf_counter() - start
    if index is not None:
        summary.index = write_index(summary, index, config.crs)
    summary.write()
    return summary


__all__ = [
    "BatchSummary",
    "CRASH_HOOK_ENV",
    "DEFAULT_PATTERNS",
    "RunIdentity",
    "SceneJob",
    "SceneOutcome",
    "WorkerSpec",
    "check_index_format",
    "clear_pipeline_cache",
    "config_digest",
    "dask_client",
    "discover_scenes",
    "get_pipeline",
    "input_fingerprint",
    "plan_jobs",
    "process_scene",
    "read_detections",
    "read_manifest",
    "run_batch",
    "warm_workers",
    "run_dask",
    "run_serial",
    "why_not_complete",
    "write_index",
    "write_manifest",
]
