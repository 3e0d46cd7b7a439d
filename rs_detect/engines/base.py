"""The Engine interface every backend implements: load once, ``infer(images) -> raw output``.

``infer`` takes any number of images and honours the model's batch bounds itself: it splits a batch
larger than ``meta.max_batch`` and pads one smaller than ``meta.min_batch`` (a static engine has
min == max), so callers never see a batch-size error.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from rs_detect.postprocess.decode import check_output_shape
from rs_detect.types import ModelMeta

if TYPE_CHECKING:  # engines import without rasterio
    from rs_detect.preprocess import Normalizer


@dataclass(frozen=True)
class SceneLike:
    """What the batches of a coming scene look like, for a warm-up that prepares for exactly them: their
    raw pixel dtype and band count, and a :class:`~rs_detect.preprocess.Normalizer` for such a scene
    (its scaling numbers are placeholders: a captured graph reads the real scene's from a tensor)."""

    norm: Normalizer
    raw_dtype: torch.dtype
    bands: int


class Engine(ABC):
    """One loaded model on one device."""

    #: short backend name used in logs and output metadata
    backend: str = "base"

    def __init__(self, meta: ModelMeta, device: torch.device) -> None:
        self.meta = meta
        self.device = device
        self._checked = False

    @property
    def input_dtype(self) -> np.dtype:
        """The dtype ``infer`` wants its images in (float32 unless the model takes float16)."""
        return np.dtype(np.float32)

    @property
    def preferred_batch(self) -> int:
        return max(self.meta.min_batch, min(self.meta.opt_batch, self.meta.max_batch))

    @abstractmethod
    def _infer(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Run exactly one batch within the bounds; returns raw output [B, C, A] as a torch tensor."""

    def infer(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        n = int(images.shape[0])
        lo, hi = self.meta.min_batch, self.meta.max_batch
        if n > hi:
            return torch.cat([self.infer(images[i : i + hi]) for i in range(0, n, hi)])
        if n < lo:
            pad_shape = (lo - n, *images.shape[1:])
            if isinstance(images, torch.Tensor):
                images = torch.cat([images, images.new_zeros(pad_shape)])
            else:
                images = np.concatenate([images, np.zeros(pad_shape, dtype=images.dtype)])
        out = self._infer(images)
        if not self._checked:
            check_output_shape(tuple(out.shape), self.meta, f"{self.meta.source or self.backend}")
            self._checked = True
        return out[:n]

    def infer_normalized(self, raw: torch.Tensor, valid: torch.Tensor | None, norm: Normalizer) -> torch.Tensor:
        """Raw pixels on the engine's device -> raw output, scaled by ``norm`` first.

        A backend may run the scaling inside the model's own launch (the TorchScript engine captures
        both in one CUDA graph); this default scales, then calls :meth:`infer`.
        """
        return self.infer(norm.apply(raw, valid))

    def warmup(self, batch: int, like: SceneLike | None = None) -> None:  # noqa: B027 - optional hook
        """Prepare for batches of ``batch`` before the first scene (e.g. capture a CUDA graph), for
        scenes ``like`` the given one where known (what :meth:`infer_normalized` will be given)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the runtime's resources (sessions, contexts, device buffers)."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
