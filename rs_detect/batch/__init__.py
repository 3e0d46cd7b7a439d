"""Many scenes (``rs-detect batch``): discovery, resume manifests, serial or Dask execution, a run summary, a merged index.

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

The package, one module per job:

* :mod:`~rs_detect.batch.discovery` finds the scenes and plans their outputs;
* :mod:`~rs_detect.batch.manifest` fingerprints inputs and writes/reads the manifests;
* :mod:`~rs_detect.batch.worker` runs one scene (the process-wide engine cache lives there);
* :mod:`~rs_detect.batch.cluster` runs the scenes on Dask (:mod:`~rs_detect.batch.gpus`: one worker per GPU);
* :mod:`~rs_detect.batch.summary` keeps the run summary and writes the merged index;
* :mod:`~rs_detect.batch.runner` ties them together (:func:`run_batch`).
"""


from __future__ import annotations

from rs_detect.batch.cluster import dask_client, run_dask, warm_workers
from rs_detect.batch.discovery import DEFAULT_PATTERNS, MANIFEST_SUFFIX, SceneJob, discover_scenes, manifest_path, plan_jobs
from rs_detect.batch.manifest import RunIdentity, config_digest, input_fingerprint, read_manifest, why_not_complete, write_manifest
from rs_detect.batch.runner import run_batch, run_serial
from rs_detect.batch.summary import SUMMARY_NAME, BatchSummary, check_index_format, read_detections, write_index
from rs_detect.batch.worker import SceneOutcome, WorkerSpec, clear_pipeline_cache, get_pipeline, one_line_error, process_scene

__all__ = [
    "BatchSummary", "DEFAULT_PATTERNS", "MANIFEST_SUFFIX", "RunIdentity", "SUMMARY_NAME", "SceneJob", "SceneOutcome",
    "WorkerSpec", "check_index_format", "clear_pipeline_cache", "config_digest", "dask_client", "discover_scenes",
    "get_pipeline", "input_fingerprint", "manifest_path", "one_line_error", "plan_jobs", "process_scene",
    "read_detections", "read_manifest", "run_batch", "run_dask", "run_serial", "warm_workers", "why_not_complete",
    "write_index", "write_manifest",
]
