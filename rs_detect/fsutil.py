"""Files written whole or not at all, the one file hash, and the one YAML loader.

Every file rs-detect writes (detections, previews, exported models, engines, sidecars, synthetic
scenes) goes through :func:`atomic_path`: the writer fills a temporary name in the destination
folder and the finished file is renamed over the target, so a failure or Ctrl-C never leaves a
partial or corrupt file under the real name.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rs_detect.errors import RsDetectError, one_line
from rs_detect.io.tempfiles import remove_stale, temp_name

#: files SQLite (GeoPackage) and GDAL may leave beside a temporary file that failed
_COMPANIONS = ("-wal", "-shm", "-journal", ".aux.xml", ".crs")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (models, scenes, checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, parents: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that does not exist yet; rename it over ``path`` on success.

    The temporary name is ``.<stem>.rsd-<host>-<pid>-<random>.tmp<suffix>``: hidden, unique, with the
    target's suffix, so GDAL/OGR drivers and PIL pick the right format and create the file themselves,
    and naming its writer, so a later write to the same destination removes those of killed writers
    (:mod:`rs_detect.io.tempfiles`). When
    the block raises, the temporary file (and any SQLite journal or GDAL sidecar of it) is removed
    and the target is left as it was. ``parents=True`` creates the destination folder first.
    """
    path = Path(path)
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, stem=path.stem)  # what killed runs left for this destination
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        for p in (tmp, *(Path(f"{tmp}{c}") for c in _COMPANIONS)):
            p.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | memoryview, *, fsync: bool = False, parents: bool = False) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_path`; ``fsync`` flushes it to disk before the rename."""
    with atomic_path(path, parents=parents) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, fsync: bool = False, parents: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_path`."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync, parents=parents)


def load_yaml_mapping(
    path: Path,
    what: str,
    allowed: set[str] | frozenset[str],
    error: Callable[[str], RsDetectError],
    unknown_message: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """A YAML file that must hold a mapping of known keys, or one ``error`` naming the file and the problem.

    ``what`` names the file in messages ("config file", "model YAML"); ``unknown_message(key)`` words
    the unknown-key problem (default: ``unknown key 'k' (allowed: ...)``). An empty file is ``{}``.
    """
    import yaml  # only runs that read YAML pay for it

    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise error(f"{path}: not valid YAML ({one_line(exc, 160)})") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: a {what} must be a mapping of keys to values")
    unknown = sorted(set(map(str, raw)) - set(allowed))
    if unknown:
        text = unknown_message(unknown[0]) if unknown_message else f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})"
        raise error(f"{path}: {text}")
    return raw
