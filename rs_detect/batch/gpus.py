"""GPUs for a local batch run: which are visible, which the run uses, one worker pinned to each.

A worker is pinned to a GPU by starting its process with ``CUDA_VISIBLE_DEVICES`` set to that one
GPU, so ``cuda`` (``cuda:0``) in the worker is that GPU. With dask-cuda installed its
``LocalCUDACluster`` does the same; without it the run starts one Dask worker process per GPU
itself. The visible GPUs are ``CUDA_VISIBLE_DEVICES`` when it is set, else every GPU torch sees.
"""

from __future__ import annotations

import os

from rs_detect.errors import ConfigError


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (indices or UUIDs)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch, no driver: no GPU
        return []


def plan_gpus(device: str, gpus: tuple[str, ...] | None, workers: int | None, scheduler: str | None) -> list[str] | None:
    """The GPUs to start one local worker on each, or None (no pinning: serial, CPU, or a given cluster).

    * ``--gpus 0,2``: those (each must be visible), one worker each; ``--device cuda`` required.
    * ``--device cuda`` with several visible GPUs: all of them, or the first N with ``--workers N``.
    * ``cuda:N``, one visible GPU, the CPU, or ``--scheduler``: no pinning here.
    """
    device = str(device)
    if gpus is not None:
        if device != "cuda":
            raise ConfigError(f"--gpus needs --device cuda (got --device {device})")
        if scheduler is not None:
            raise ConfigError("--gpus is for a local cluster; a cluster given by --scheduler places its own workers")
        seen = visible_gpus()
        unknown = [g for g in gpus if g not in seen]
        if unknown:
            raise ConfigError(f"--gpus: GPU {unknown[0]} is not visible (visible: {', '.join(seen) or 'none'})")
        if len(set(gpus)) != len(gpus):
            raise ConfigError(f"--gpus: GPU {next(g for g in gpus if gpus.count(g) > 1)} is named twice")
        if workers is not None and workers != len(gpus):
            raise ConfigError(f"--workers {workers} does not match --gpus (one worker per GPU: {len(gpus)})")
        return list(gpus)
    if device != "cuda" or scheduler is not None:
        return None
    seen = visible_gpus()
    if workers is not None:
        if len(seen) < 2:
            return None  # one GPU (or none seen): the workers share it, as before
        if workers > len(seen):
            raise ConfigError(f"--workers {workers}: only {len(seen)} GPUs are visible ({', '.join(seen)}); one worker per GPU")
        return seen[:workers]
    return seen if len(seen) >= 2 else None
