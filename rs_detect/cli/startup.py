"""What the ``rs-detect`` command does to start and end quickly (nothing here changes a result).

* :func:`no_gc`: the cyclic garbage collector paused while a command imports its modules. torch,
  pandas and their kind create about a million objects as they import, almost none of them garbage,
  and the collector would walk them all several times over (0.2 s of a run's start).
* :class:`InBackground`: one call in a thread of its own while the main thread goes on (the engine
  loads and warms up while the command imports what writes its output).
* :func:`start_cuda_early`: the CUDA driver and the GPU's primary context started in a thread of
  their own while torch imports, when the command line asks ``detect`` for a CUDA device (the driver
  call gives up Python's lock; torch finds the context made and uses it).
* :func:`leave` once a command has finished, from the console entry point: the exit a finished
  command needs (threads waited for, atexit handlers, streams flushed) without the interpreter's
  teardown of every module and of torch's, ONNX Runtime's and GDAL's C++ state (0.5-0.8 s with
  torch and geopandas imported), memory the process is about to give back anyway.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Generic, NoReturn, TypeVar

T = TypeVar("T")


@contextmanager
def no_gc() -> Iterator[None]:
    """The cyclic collector paused inside (reference counting still frees everything at once)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


COMMANDS = ("detect", "synth", "eval", "inspect", "export", "build-engine", "batch")


def cuda_device_asked(argv: Sequence[str]) -> int | None:
    """The CUDA device index a ``detect`` command line asks for with ``--device cuda[:N]``, else None
    (another command, another device, or no ``--device``: a config file's device is read later)."""
    args = list(argv)
    if not args or (args[0] in COMMANDS and args[0] != "detect") or args[0].startswith("-"):
        return None
    value = None
    for i, a in enumerate(args):
        if a == "--":
            break
        if a == "--device" and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith("--device="):
            value = a.split("=", 1)[1]
    if value is None or not value.startswith("cuda"):
        return None
    index = value[5:] if value.startswith("cuda:") else "0" if value == "cuda" else None
    return int(index) if index is not None and index.isdigit() else None


def start_cuda_early(argv: Sequence[str]) -> threading.Thread | None:
    """Initialise the CUDA driver and retain device N's primary context in a daemon thread, when
    ``argv`` asks ``detect`` for ``--device cuda[:N]`` (``RS_DETECT_EARLY_CUDA=0`` turns it off).

    That takes a few hundred milliseconds in the driver, which holds no Python lock, so it runs while
    the main thread imports torch; torch's own CUDA start then finds the context (the runtime uses the
    primary context) instead of creating it. Where the driver is missing or fails nothing happens here,
    and torch reports the problem as it always does. The context stays retained for the process.
    cuDNN's libraries are left to the warm-up: on an H100 they loaded in 23 ms, and the first forward
    pass took as long with them loaded first (0.47 s against 0.49 s).
    """
    index = cuda_device_asked(argv)
    if index is None or os.environ.get("RS_DETECT_EARLY_CUDA", "1").strip().lower() in ("0", "false", "no", "off"):
        return None

    def init() -> None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            if lib.cuInit(0) != 0:
                return
            dev, ctx = ctypes.c_int(), ctypes.c_void_p()
            if lib.cuDeviceGet(ctypes.byref(dev), index) == 0:
                lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)
        except (OSError, AttributeError):  # no driver here: torch says so later, in its own words
            pass

    thread = threading.Thread(target=init, name="rs-cuda-init", daemon=True)
    thread.start()
    return thread


class InBackground(Generic[T]):
    """``fn()`` started now in a daemon thread; :meth:`result` waits for it and returns its value or
    raises its exception (with its own traceback) in the calling thread.

    A daemon thread, so that Ctrl-C in the main thread ends the command at once instead of waiting for
    the call to finish; only the main thread gets signals, and it is always the one that waits.
    """

    def __init__(self, fn: Callable[[], T], name: str, thread: bool = True) -> None:
        """``thread=False``: ``fn()`` runs now, in the calling thread (a call that must stay in it)."""
        self._fn = fn
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        if thread:
            self._thread.start()
        else:
            self._run()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as exc:  # re-raised by result() in the waiting thread
            self._error = exc

    def result(self) -> T:
        if self._thread.ident is not None:
            self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._value  # type: ignore[return-value]


def leave(code: object) -> NoReturn:
    """End the process of a finished command with ``code`` (as ``sys.exit`` takes it).

    Every output is closed and renamed into place by now. A thread other than the daemons still
    running, or a message for a code, and Python's own exit is used (it waits for the thread, prints
    the message). Otherwise the atexit handlers run (logging's flush, weakref and tempfile finalizers,
    multiprocessing's children, GDAL's quiet handler), stdout and stderr are flushed, and the process
    ends there.
    """
    if not (code is None or isinstance(code, int)) or any(
            t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        gc.freeze()  # Python's exit: at least its last collection does not walk every object again
        sys.exit(code)
    atexit._run_exitfuncs()  # what Python's exit runs first (the stdlib's own hook; no public name)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(code or 0)
