"""The one table between numpy, torch and ONNX element types.

Backends, the tile cutter and the model inspector ask here instead of keeping their own tables.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

#: numpy dtype -> torch dtype, exactly (no widening)
NUMPY_TO_TORCH: dict[np.dtype, torch.dtype] = {
    np.dtype(np.bool_): torch.bool,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.int8): torch.int8,
    np.dtype(np.uint16): torch.uint16,
    np.dtype(np.int16): torch.int16,
    np.dtype(np.uint32): torch.uint32,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
}

#: raster pixel dtypes that travel to the engine's device as they are; any other is staged as float32
PIXEL_DTYPES: frozenset[np.dtype] = frozenset(np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32))

#: ONNX Runtime's input/output type strings -> numpy dtype
ONNX_TYPES: dict[str, np.dtype] = {
    "tensor(float16)": np.dtype(np.float16),
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(bool)": np.dtype(np.bool_),
}


def torch_dtype(dtype: Any) -> torch.dtype:
    """The torch dtype of a numpy dtype (or anything ``np.dtype`` accepts)."""
    dt = np.dtype(dtype)
    try:
        return NUMPY_TO_TORCH[dt]
    except KeyError:
        raise TypeError(f"no torch dtype for numpy {dt}") from None


def pixel_torch_dtype(dtype: Any) -> torch.dtype:
    """The torch dtype raw pixels of ``dtype`` are staged in on their way to the engine."""
    dt = np.dtype(dtype)
    return NUMPY_TO_TORCH[dt] if dt in PIXEL_DTYPES else torch.float32


def model_input_dtype(name: Any) -> np.dtype:
    """A model input's dtype as the engines feed it: float16 when the model takes float16, else float32.

    ``name`` may be a numpy dtype, ``"float16"``, or an ONNX Runtime type string (``"tensor(float16)"``).
    """
    if isinstance(name, str):
        dt = ONNX_TYPES.get(name) or (np.dtype(name) if name in ("float16", "float32", "float64") else None)
    else:
        dt = np.dtype(name)
    return np.dtype(np.float16) if dt == np.float16 else np.dtype(np.float32)
