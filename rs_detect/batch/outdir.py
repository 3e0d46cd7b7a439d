"""One batch run per output folder: a lock that names its holder, and the cleanup of killed runs' leftovers.

The lock is ``OUTDIR/.rs-detect.lock``, held with ``flock`` for the whole run: the kernel releases it
when the holder exits in any way (Ctrl-C, SIGKILL, a crash), so a lock is never stale. The file holds
the holder's host, pid and start time, which a second run prints when it refuses to start (or, with
``--wait``, while it waits). The file is removed when the run ends; a run that finds it again after
taking the lock checks that it locked the file that is still there (the usual unlink race).

``flock`` works between processes of one host and on most local and cluster file systems; on an NFS
mount without lock support it is a no-op there, and two hosts could then both run.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from rs_detect.errors import OutputError

LOCK_NAME = ".rs-detect.lock"


def holder(path: Path) -> str:
    """Who holds the lock at ``path``, as the lock file says ('another run' when unreadable)."""
    try:
        doc = json.loads(path.read_text())
        return f"host {doc['host']}, pid {doc['pid']}, started {doc['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another run"


@contextmanager
def locked(outdir: Path, wait: bool = False, on_wait: Callable[[str], None] | None = None, poll_s: float = 0.5) -> Iterator[Path]:
    """Hold ``outdir``'s lock for the body; without ``wait`` a held lock is an :class:`OutputError`."""
    path = outdir / LOCK_NAME
    told = False
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise OutputError(f"{outdir}: cannot create the lock file ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            who = holder(path)
            if not wait:
                raise OutputError(f"{outdir}: another rs-detect batch run is using this folder ({who}); "
                                  "wait for it to end, or give --wait") from None
            if not told and on_wait is not None:
                on_wait(f"{outdir}: waiting for the run using this folder ({who})")
                told = True
            time.sleep(poll_s)
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file between our open and our lock
            os.close(fd)
            continue
        break
    try:
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield path
    finally:
        try:
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)
