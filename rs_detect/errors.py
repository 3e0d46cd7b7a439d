"""The error tree users can catch. Every message is one line that names the file and the problem."""

from __future__ import annotations


class RsDetectError(Exception):
    """Base class: the CLI prints ``error: <message>`` and exits 1."""


class InputError(RsDetectError):
    """A scene that is missing, not a raster, corrupt, or asked for bands it does not have."""


class ModelError(RsDetectError):
    """A model file that is missing, not a model, or does not fit the scene or the decoder."""


class ConfigError(RsDetectError):
    """A configuration file or option that is unknown or out of range."""


class OutputError(RsDetectError):
    """An output path that cannot be written."""


class EngineUnavailableError(ModelError):
    """A backend whose runtime (TensorRT, pycuda, CUDA) is not installed here."""
