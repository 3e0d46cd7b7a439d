"""The error tree users can catch, and the one way an error becomes a line.

Every message names the file (or option) and the problem: ``<file>: <problem>``. The CLI prints it
as ``error: <file>: <problem>`` (:func:`error_line`) and exits 1. Which class, by kind of mistake:

* :class:`InputError` - a scene (or truth file) that is missing, unreadable, or lacks what is asked of it;
* :class:`ConfigError` - a setting that is unknown or out of range, wherever it is written: a flag, a
  config file, or a model YAML (the same ``conf: 1.5`` is a ConfigError in all three);
* :class:`ModelError` - a model file that is missing, not a model, or whose own metadata, shapes or
  runtime disagree with each other or with the settings;
* :class:`OutputError` - an output that cannot be written;
* :class:`EngineUnavailableError` - a backend whose runtime (TensorRT, pycuda, CUDA) is missing here.
"""

from __future__ import annotations


class RsDetectError(Exception):
    """Base class: the CLI prints ``error: <message>`` and exits 1."""


class InputError(RsDetectError):
    """A scene that is missing, not a raster, corrupt, or asked for bands it does not have."""


class ModelError(RsDetectError):
    """A model file that is missing, not a model, or does not fit its metadata, the scene or the decoder."""


class ConfigError(RsDetectError):
    """A setting (flag, config file key, model YAML key) that is unknown or out of range."""


class OutputError(RsDetectError):
    """An output path that cannot be written."""


class EngineUnavailableError(ModelError):
    """A backend whose runtime (TensorRT, pycuda, CUDA) is not installed here."""


def one_line(text: object, limit: int | None = None) -> str:
    """``text`` (an exception or any object) as one line, whitespace collapsed, cut to ``limit`` characters.

    rasterio reports a failed read as "Read failed. See previous exception for details." with GDAL's
    own message in the exception's cause: that message is the one given (it names the block and why).
    """
    if isinstance(text, BaseException) and "See previous exception" in str(text) and text.__cause__ is not None:
        text = text.__cause__
    line = " ".join(str(text).split())
    if not line and isinstance(text, BaseException):
        line = type(text).__name__
    return line if limit is None else line[:limit]


def error_line(exc: BaseException | str) -> str:
    """The line a user sees for a failure: ``error: <file>: <problem>``."""
    return f"error: {one_line(exc)}"
