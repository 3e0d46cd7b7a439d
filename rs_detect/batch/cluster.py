"""Dask: a client on an existing cluster or a new local one, engines warmed on every worker, one task per scene."""

from __future__ import annotations

import logging
import os
import socket
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rs_detect.batch.discovery import SceneJob
from rs_detect.batch.worker import SceneOutcome, WorkerSpec, get_pipeline, one_line_error, process_scene
from rs_detect.errors import ConfigError, ModelError, RsDetectError

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

OnResult = Callable[[SceneOutcome], None]


def run_dask(jobs: Sequence[SceneJob], spec: WorkerSpec, client: Client, on_result: OnResult, retries: int = 2) -> None:
    """One task per scene on ``client``; only the small outcome dicts come back.

    A worker lost mid-task makes the scheduler run that task again elsewhere (up to
    ``distributed.scheduler.allowed-failures`` times; ``retries`` covers exceptions outside the task's own
    error handling). A scene that keeps killing its workers is reported failed with the KilledWorker error.
    """
    from distributed import as_completed

    try:
        from distributed.scheduler import KilledWorker
    except ImportError:  # pragma: no cover - older distributed
        KilledWorker = RuntimeError  # noqa: N806

    warm_workers(client, spec)
    key = f"rs-detect-scene-{spec.run_id or uuid.uuid4().hex[:8]}"
    futures = {
        client.submit(process_scene, job, spec, key=f"{key}-{i}", retries=retries, pure=False): job
        for i, job in enumerate(jobs)
    }
    resubmitted: dict[str, int] = {}
    try:
        pending = as_completed(futures)
        for fut in pending:
            job = futures[fut]
            try:
                outcome = SceneOutcome.from_dict(fut.result())
            except KilledWorker as exc:  # the scene killed its workers again and again
                outcome = SceneOutcome(scene=job.rel, status="failed", input=str(job.scene), error=one_line_error(exc))
            except Exception as exc:  # noqa: BLE001 - any other loss: a lost scheduler, a key lost with its worker
                # the result was lost with its worker after the task ended ("Couldn't gather keys"):
                # run it again under a new key; the task finds its own manifest of this run and
                # returns it without redoing the scene
                n = resubmitted.get(job.rel, 0)
                if n >= retries:
                    outcome = SceneOutcome(scene=job.rel, status="failed", input=str(job.scene), error=one_line_error(exc))
                else:
                    resubmitted[job.rel] = n + 1
                    again = client.submit(process_scene, job, spec, key=f"{key}-{job.rel}-again{n + 1}", retries=retries, pure=False)
                    futures[again] = job
                    pending.add(again)
                    continue
            on_result(outcome)
    finally:
        left = [f for f in futures if not f.done()]
        if left:
            client.cancel(left)  # do not leave work running on a shared cluster


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
def dask_client(workers: int | None = None, scheduler: str | None = None, device: str = "cpu",
                gpus: Sequence[str] | None = None) -> Iterator[tuple[Client, int]]:
    """A client on ``scheduler`` (a running cluster) or on a new local cluster of ``workers`` processes.

    Local clusters use processes with one thread each (GIL-free scaling; each process loads its engine
    once). With ``gpus`` (see :mod:`rs_detect.batch.gpus`) one worker per GPU, each started with
    ``CUDA_VISIBLE_DEVICES`` set to its GPU: by dask-cuda's LocalCUDACluster when it is installed and the
    device is cuda, else by this module.
    Yields the client and the number of workers; the cluster is closed on exit, even on Ctrl-C.
    """
    try:
        from distributed import Client
    except ImportError:
        raise ConfigError("--workers/--scheduler need dask.distributed: pip install 'rs-detect[dist]'") from None
    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except Exception as exc:  # noqa: BLE001 - OSError, TimeoutError, ValueError for an address that is no URL
            raise ConfigError(f"{scheduler}: cannot connect to the Dask scheduler ({one_line_error(exc)[:160]})") from None
        try:
            yield client, max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))
        finally:
            client.close()
        return
    n = len(gpus) if gpus else int(workers or 1)
    # after Ctrl-C this process leaves at once; multiprocessing's resource tracker then finds the
    # cluster's semaphores unreleased and would warn about each (it cleans them up all the same)
    quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
    if quiet not in os.environ.get("PYTHONWARNINGS", ""):
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), quiet]))
    before = _child_pids()
    cluster = None
    try:
        cluster = _local_cluster(n, device, list(gpus) if gpus else None)
        client = Client(cluster)
    except KeyboardInterrupt:
        _stop_now(cluster, _child_pids() - before)
        raise
    try:
        yield client, n
    except KeyboardInterrupt:
        _stop_now(cluster, _child_pids() - before)
        raise
    finally:
        client.close()
        cluster.close()


def _local_cluster(n: int, device: str, gpus: list[str] | None = None) -> Any:
    from distributed import LocalCluster

    if str(device).startswith("cuda"):
        try:
            from dask_cuda import LocalCUDACluster  # type: ignore[import-not-found]
        except ImportError:
            if not gpus:
                log.warning("dask-cuda is not installed and fewer than 2 GPUs are visible: %d local workers will share the default GPU", n)
        else:
            extra = {"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else {}
            return LocalCUDACluster(n_workers=n, threads_per_worker=1, silence_logs=logging.ERROR, dashboard_address=None,
                                    preload=[PRELOAD], **extra)
    if gpus:
        return _pinned_cluster(gpus)
    with warnings.catch_warnings():
        # the scheduler's HTTP routes move off a busy default port and warn about it: nothing to act on
        warnings.filterwarnings("ignore", message="Port .* is already in use", category=UserWarning)
        return LocalCluster(n_workers=n, threads_per_worker=1, processes=True, silence_logs=logging.ERROR,
                            dashboard_address=None, preload=[PRELOAD])


def _pinned_cluster(gpus: list[str]) -> Any:
    """One worker process per GPU without dask-cuda: each started with CUDA_VISIBLE_DEVICES=<its GPU>."""
    from distributed import Nanny, Scheduler, SpecCluster

    workers = {
        f"gpu-{gpu}": {"cls": Nanny, "options": {"nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": gpu}, "preload": [PRELOAD],
                                                  "silence_logs": logging.ERROR}}
        for gpu in gpus
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Port .* is already in use", category=UserWarning)
        return SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": None}},
                           silence_logs=logging.ERROR)


def _child_pids() -> set[int]:
    """This process's multiprocessing children (local workers), by pid."""
    import psutil

    pids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "--multiprocessing-fork" in cmd:
            pids.add(child.pid)
    return pids


def _stop_now(cluster: object | None, started: set[int]) -> None:
    """Ctrl-C: end the local workers at once (a graceful close waits seconds for their running scenes).

    A scene cut short leaves only a temporary file named after its dead worker process, which the run
    removes right after (:func:`rs_detect.io.tempfiles.remove_stale`); the cluster's own shutdown
    messages about the vanished workers are not shown.
    """
    import signal

    logging.getLogger("distributed").setLevel(logging.CRITICAL)
    nannies = list(getattr(cluster, "workers", {}).values())
    for nanny in nannies:
        if hasattr(nanny, "auto_restart"):
            nanny.auto_restart = False  # a killed worker is not to come back
    pids = set(started)  # the worker processes this run started (also while the cluster was starting)
    for nanny in nannies:
        pid = getattr(getattr(getattr(nanny, "process", None), "process", None), "pid", None)
        if pid:
            pids.add(pid)
    for pid in sorted(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


#: Run in every local worker process as it starts (Dask's ``preload``): see :func:`dask_setup`.
PRELOAD = "rs_detect.batch.cluster"


def dask_setup(worker: object) -> None:
    """Dask preload hook of the local workers: leave the terminal's process group.

    Ctrl-C at a terminal signals the whole foreground process group: each worker would print a
    KeyboardInterrupt traceback and die mid-scene. In a session of their own they do not see it; the
    run itself handles Ctrl-C (it stops the workers, writes the summary and removes what they were
    writing). Workers still end with their nanny, which lives in the run's process. Until this runs,
    workers started by the ``rs-detect`` command ignore SIGINT from their first imports on
    (:mod:`rs_detect.cli` sees to that in processes spawned from it).
    """
    import signal

    try:
        os.setsid()
    except OSError:  # already a session or group leader
        pass
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: setsid is enough for the terminal's Ctrl-C
        pass
    from rs_detect.gdal_messages import route_to_logging

    route_to_logging()  # GDAL's warnings become the scene's warnings in the run summary
