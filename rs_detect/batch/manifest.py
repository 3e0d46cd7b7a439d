"""Fingerprints of inputs, the identity of a run (model + config), and the per-scene ``.done.json`` manifests."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rs_detect import __version__
from rs_detect.config import Config
from rs_detect.errors import ModelError, OutputError
from rs_detect.fsutil import atomic_write_text, file_sha256
from rs_detect.io.location import RemoteScene

if TYPE_CHECKING:
    from rs_detect.batch.discovery import SceneJob
    from rs_detect.batch.worker import SceneOutcome

MANIFEST_VERSION = 1
#: Config fields that change speed or placement but not the detections, left out of the config hash.
RESULT_NEUTRAL_KEYS = frozenset({"read_threads", "prefetch", "reader", "batch_size", "device", "model"})
PARTIAL_HASH_BYTES = 1 << 16


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def input_fingerprint(path: Path) -> dict[str, Any]:
    """Size, mtime_ns and a hash of the first and last 64 KiB: cheap, and catches rewrites in place.

    A remote scene (a URL) is identified by its name alone: all three are None, and a finished remote
    scene is skipped while the model, config and output match (``--force`` redoes it).
    """
    if isinstance(path, RemoteScene):
        return {"size": None, "mtime_ns": None, "partial_sha256": None}
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

    Left out: read_threads, prefetch, reader, batch_size, device (speed and placement) and the model's path (the
    model is identified by its sha256 instead, so moving it does not redo an archive).
    """
    from rs_detect.engines.metadata import sidecar_yaml

    d = cfg.as_dict()
    for key in RESULT_NEUTRAL_KEYS:
        d.pop(key, None)
    if isinstance(cfg.model_meta, str):
        p = Path(cfg.model_meta)
        d["model_meta"] = {"path_sha256": file_sha256(p) if p.is_file() else None}
    sidecar = sidecar_yaml(model_path) if cfg.model_meta is None else None
    d["model_sidecar_sha256"] = file_sha256(sidecar) if sidecar else None
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
        return RunIdentity(str(model.resolve()), file_sha256(model), config_digest(cfg, model))


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
    if isinstance(job.scene, RemoteScene):
        return None if doc.get("input", {}).get("path") == str(job.scene) else "input changed"
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
    """Write ``text`` whole or not at all, flushed to disk before the rename (:func:`rs_detect.fsutil.atomic_write_text`).

    Created like any output (mode 0666 less the umask, 0644 under the usual umask 022), not 0600.
    """
    try:
        atomic_write_text(path, text, fsync=True)
    except OSError as exc:  # a full disk, a folder gone: one line naming the file
        from rs_detect.io.writer import write_problem

        raise OutputError(f"{path}: cannot write ({write_problem(exc, path.parent)})") from None


def write_manifest(job: SceneJob, identity: RunIdentity, fingerprint: dict[str, Any], outcome: SceneOutcome, run_id: str = "") -> None:
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
        "run_id": run_id,
    }
    _atomic_write_text(job.manifest, json.dumps(doc, indent=1, sort_keys=True))

