"""The whole run: discovery, skipping finished scenes, serial or Dask execution, the summary and the index."""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from rs_detect.batch.cluster import OnResult, dask_client, run_dask
from rs_detect.batch.gpus import plan_gpus
from rs_detect.batch.discovery import DEFAULT_PATTERNS, SceneJob, discover_scenes, plan_jobs
from rs_detect.batch.manifest import RunIdentity, why_not_complete
from rs_detect.batch.outdir import locked
from rs_detect.batch.summary import BatchSummary, check_index_format, write_index
from rs_detect.batch.worker import SceneOutcome, WorkerSpec, finished_by, get_pipeline, process_scene
from rs_detect.config import Config, auto_read_threads
from rs_detect.errors import ConfigError, OutputError
from rs_detect.io.tempfiles import remove_stale
from rs_detect.io.writer import check_writable

log = logging.getLogger(__name__)


def run_serial(jobs: Sequence[SceneJob], spec: WorkerSpec, on_result: OnResult) -> None:
    """One scene after another in this process, with one engine."""
    for job in jobs:
        on_result(SceneOutcome.from_dict(process_scene(job, spec)))


def _execute(
    todo: Sequence[SceneJob], config: Config, identity: RunIdentity, summary: BatchSummary, record: OnResult,
    workers: int | None, scheduler: str | None, run_id: str = "", gpus: Sequence[str] | None = None,
) -> None:
    """Run ``todo`` serially or on Dask (``summary.mode`` says which); every outcome goes to ``record``."""
    if not todo:
        return
    if summary.mode == "serial":
        spec = WorkerSpec(config, identity, run_id=run_id)
        get_pipeline(spec)  # a model that cannot load fails the run now, not once per scene
        run_serial(todo, spec, record)
        return
    with dask_client(workers, scheduler, str(config.device), gpus) as (client, n):
        summary.workers = n
        threads = max(1, (os.cpu_count() or 1) // n) if scheduler is None else None  # share this host's cores
        if threads is not None and config.read_threads is None:  # and their readers too
            config = replace(config, read_threads=auto_read_threads(str(config.device), threads))
        summary.gpus = list(gpus or [])
        run_dask(todo, WorkerSpec(config, identity, threads, run_id=run_id, pinned=bool(gpus)), client, record)


def _make_outdir(outdir: Path) -> Path | None:
    """Create ``outdir`` (and missing parents); returns the topmost folder created, None if it existed."""
    top = None
    for p in [outdir, *outdir.parents]:
        if p.exists():
            break
        top = p
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{outdir}: cannot create the output folder ({exc.strerror or exc})") from None
    return top


def _remove_if_empty(outdir: Path, top: Path | None) -> None:
    """Undo :func:`_make_outdir` for a run that wrote nothing: the folders it made, if still empty."""
    if top is None:
        return
    for p in [outdir, *outdir.parents]:
        try:
            p.rmdir()
        except OSError:
            return
        if p == top:
            return


def _reconcile(summary: BatchSummary, todo: Sequence[SceneJob], spec: WorkerSpec) -> None:
    """After an interruption: scenes this run finished whose report did not come back (a Dask task
    that ended while the run stopped) are recorded from their manifests, so the summary matches them."""
    for job in todo:
        if job.rel not in summary.outcomes and finished_by(job, spec):
            outcome = SceneOutcome.skipped(job)
            outcome.status = "done"
            summary.add(outcome)


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
    wait: bool = False,
    gpus: Sequence[str] | None = None,
) -> BatchSummary:
    """Run every scene of ``inputs`` into ``outdir``; returns the summary (also written to OUTDIR).

    Serial in this process unless ``workers`` (a local Dask cluster) or ``scheduler`` (an existing one)
    is given. Finished scenes whose manifest matches are skipped unless ``force``. Failed scenes are
    recorded and the others go on; check :attr:`BatchSummary.failed`. Ctrl-C writes the summary of what
    finished (``interrupted: true``) and re-raises.

    One run at a time per ``outdir`` (:mod:`rs_detect.batch.outdir`): a second one fails with an
    :class:`OutputError` naming the holder, or with ``wait`` waits for it. A run that fails before
    any scene (a bad model, an unreachable scheduler) leaves no output folder it created.

    GPUs (:func:`rs_detect.batch.gpus.plan_gpus`): with ``device="cuda"`` and several visible GPUs, or
    ``gpus`` given, the run starts one local Dask worker per GPU, pinned to it; the summary records the
    GPU of every scene. ``gpus`` with another device pins the worker processes all the same (tests).
    """
    if workers is not None and scheduler is not None:
        raise ConfigError("give either workers (a local cluster) or scheduler (an existing one), not both")
    outdir = Path(os.path.abspath(outdir))
    index = Path(os.path.abspath(index)) if index is not None else None
    if index is not None:
        check_index_format(index)
    scenes, root = discover_scenes(inputs, patterns, exclude=[outdir])
    jobs = plan_jobs(scenes, root, outdir, fmt)
    if gpus is not None and str(config.device) != "cuda":
        pinned: list[str] | None = list(gpus)  # the assignment without GPUs (tests on the CPU)
    else:
        pinned = plan_gpus(str(config.device), tuple(gpus) if gpus is not None else None, workers, scheduler)
    identity = RunIdentity.of(config)  # a missing model fails before OUTDIR exists
    created = _make_outdir(outdir)
    try:
        if index is not None:
            check_writable(index)  # after OUTDIR exists: the index may live inside it
        with locked(outdir, wait=wait, on_wait=lambda msg: log.warning("%s", msg)):
            return _run_locked(jobs, outdir, config, identity, fmt, workers, scheduler, index, force, progress, on_result, pinned)
    except BaseException:
        _remove_if_empty(outdir, created)
        raise


def _run_locked(
    jobs: Sequence[SceneJob], outdir: Path, config: Config, identity: RunIdentity, fmt: str, workers: int | None,
    scheduler: str | None, index: Path | None, force: bool, progress: bool, on_result: OnResult | None,
    gpus: list[str] | None = None,
) -> BatchSummary:
    remove_stale(outdir, recursive=True)  # temporary files of killed runs (their writers are gone)
    mode = "serial" if workers is None and scheduler is None and not gpus else ("dask-scheduler" if scheduler else "dask-local")
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

    run_id = uuid.uuid4().hex[:12]
    start = time.perf_counter()
    try:
        with bar:
            _execute(todo, config, identity, summary, record, workers, scheduler, run_id, gpus)
    except KeyboardInterrupt:
        summary.interrupted = True
        summary.seconds = time.perf_counter() - start
        _reconcile(summary, todo, WorkerSpec(config, identity, run_id=run_id))
        remove_stale(outdir, recursive=True)  # what the stopped workers were writing
        summary.write()
        raise
    summary.seconds = time.perf_counter() - start
    if index is not None:
        summary.index = write_index(summary, index, config.crs)
    summary.write()
    return summary
