"""Temporary names for files written atomically, and the removal of those a killed run left behind.

A temporary file sits beside its destination as ``.<stem>.rsd-<host>-<pid>-<random>.tmp<suffix>``
(``<host>``: 8 hex digits of a hash of the host name). The name says who writes it, so a later run
can tell a file whose writer is gone (a SIGKILL, a power cut) from one still being written:

* written on this host by a process that no longer exists: stale;
* written on another host (a Dask worker on a shared folder): stale only when untouched for
  :data:`STALE_AFTER_S`.

Only names of exactly this pattern are ever removed. SQLite's ``-wal``/``-shm``/``-journal`` side files
of a temporary GeoPackage and the ``.crs`` file of a GeoJSON being given its CRS go with it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

#: A temporary file of another host is left alone until it has not changed for this long.
STALE_AFTER_S = 3600.0
_TAG = "rsd"
_NAME = re.compile(rf"^\.(?P<stem>.*)\.{_TAG}-(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)-[0-9a-z]{{8}}\.tmp(?P<rest>[^/]*)$")


def host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_name(path: Path, suffix: str | None = None) -> Path:
    """A fresh temporary path beside ``path`` that names this host and process."""
    suffix = path.suffix if suffix is None else suffix
    return path.with_name(f".{path.stem}.{_TAG}-{host_tag()}-{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_stale(path: Path, now: float | None = None) -> bool:
    """Whether ``path`` is one of our temporary files whose writer is gone (see the module doc)."""
    m = _NAME.match(path.name)
    if m is None:
        return False
    if m["host"] == host_tag():
        pid = int(m["pid"])
        return pid != os.getpid() and not _alive(pid)
    try:
        age = (now or time.time()) - path.lstat().st_mtime
    except OSError:
        return False
    return age > STALE_AFTER_S


def remove_stale(folder: Path, recursive: bool = False, stem: str | None = None) -> list[Path]:
    """Remove the stale temporary files in ``folder`` (below it too with ``recursive``); returns them.

    ``stem``: only those of one destination (``.<stem>.rsd-...``). Hidden folders are not entered.
    """
    removed: list[Path] = []
    prefix = f".{stem}.{_TAG}-" if stem is not None else "."
    walker = os.walk(folder) if recursive else [(str(folder), [], _names(folder))]
    for dirpath, dirnames, filenames in walker:
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(prefix) or f".{_TAG}-" not in name:
                continue
            path = Path(dirpath) / name
            if is_stale(path):
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    log.debug("%s: stale temporary file not removed (%s)", path, exc)
                    continue
                removed.append(path)
    if removed:
        log.debug("removed %d temporary file(s) left by killed runs in %s", len(removed), folder)
    return removed


def _names(folder: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(folder) if e.is_file(follow_symlinks=False)]
    except OSError:
        return []
