"""What the ``rs-detect`` command does to start and end quickly (nothing here changes a result).

* :func:`no_gc`: the cyclic garbage collector paused while a command imports its modules. torch,
  pandas and their kind create about a million objects as they import, almost none of them garbage,
  and the collector would walk them all several times over (0.2 s of a run's start).
* :class:`InBackground`: one call in a thread of its own while the main thread goes on (the engine
  loads and warms up while the command imports what writes its output).
* :func:`leave` once a command has finished, from the console entry point: the exit a finished
  command needs (threads waited for, atexit handlers, streams flushed) without the interpreter's
  teardown of every module and of torch's, ONNX Runtime's and GDAL's C++ state (0.5-0.8 s with
  torch and geopandas imported), memory the process is about to give back anyway.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import threading
from collections.abc import Callable, Iterator
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
