"""What the ``rs-detect`` command does to start and end quickly (nothing here changes a result).

* :func:`no_gc`: the cyclic garbage collector paused while a command imports its modules. torch,
  pandas and their kind create about a million objects as they import, almost none of them garbage,
  and the collector would walk them all several times over (0.2 s of a run's start).
* :class:`InBackground`: one call in a thread of its own while the main thread goes on (the engine
  loads and warms up while the command imports what writes its output).
* :func:`settle` once a command has finished, from the console entry point: everything still alive
  is moved out of the collector's sight, so that the interpreter's exit does not walk it all once
  more just before the process ends (0.3-0.5 s with torch and geopandas imported).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

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


def settle() -> None:
    """Before a finished command's process exits: nothing alive now is left for the exit's collection."""
    gc.freeze()
