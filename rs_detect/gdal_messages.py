"""GDAL's own messages ("Warning 1: ...") as rs-detect log lines instead of raw lines on stderr.

Outside a ``rasterio.Env`` GDAL prints warnings straight to stderr with its default handler, from
any thread (``Warning 1: TIFFFetchNormalTag: IO error during reading of "GeoPixelScale"; tag
ignored``). :func:`route_to_logging` installs a process-wide handler in every GDAL library loaded in
this process (rasterio's and pyogrio's wheels each bring one) that hands warnings to the
``rs_detect.gdal`` logger, once per distinct message, collapsed to one line; errors are left to the
exceptions rasterio and pyogrio raise from them (rs-detect reports those with the file's name), and
debug messages are dropped. rasterio's own handler, pushed while it opens a dataset, still comes
first there. Where no GDAL library can be found this does nothing.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import threading

log = logging.getLogger("rs_detect.gdal")

_CPLE_WARNING = 2
_HANDLER_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.c_char_p)
_installed: list[ctypes.CDLL] = []
_seen: set[str] = set()
_lock = threading.Lock()


def _handle(level: int, code: int, message: bytes | None) -> None:
    if level != _CPLE_WARNING or not message:
        return
    text = " ".join(message.decode("utf-8", "replace").split())
    with _lock:
        if text in _seen:
            return
        _seen.add(text)
    log.warning("GDAL: %s", text[:300])


_CALLBACK = _HANDLER_TYPE(_handle)  # kept alive for the process's lifetime


def _gdal_libraries() -> list[str]:
    try:
        with open("/proc/self/maps") as fh:
            return sorted({line.split()[-1] for line in fh if "libgdal" in line and line.rstrip().endswith(tuple("0123456789o"))})
    except OSError:
        return []


def route_to_logging() -> int:
    """Install the handler in every GDAL library loaded now (import rasterio and pyogrio first);
    returns how many. Safe to call again (libraries already handled are skipped)."""
    import importlib

    for name in ("rasterio", "pyogrio"):  # load both GDAL copies before looking for them
        importlib.import_module(name)

    done = {lib._name for lib in _installed}
    for path in _gdal_libraries():
        if path in done:
            continue
        try:
            lib = ctypes.CDLL(path)
            lib.CPLSetErrorHandler.restype = ctypes.c_void_p
            lib.CPLSetErrorHandler.argtypes = [_HANDLER_TYPE]
            lib.CPLSetErrorHandler(_CALLBACK)
        except (OSError, AttributeError):
            continue
        _installed.append(lib)
    return len(_installed)


@atexit.register
def _quiet_at_exit() -> None:
    """No Python callback once the interpreter is going away: GDAL's quiet handler instead."""
    for lib in _installed:
        try:
            quiet = ctypes.cast(lib.CPLQuietErrorHandler, ctypes.c_void_p)
            lib.CPLSetErrorHandler.argtypes = [ctypes.c_void_p]
            lib.CPLSetErrorHandler(quiet)
        except (OSError, AttributeError):
            pass
