"""Raw batches -> model input, on the engine's device.

Scaling a 1024 x 1024 tile to float costs a few milliseconds of CPU per tile, which at GPU speeds
(thousands of tiles per second) would need more cores than the decoders. So the reader ships raw
pixels (1 or 2 bytes each, in pinned memory) and this step does band combination, the scene-wide
stretch and the nodata fill as a handful of tensor ops where the engine runs.
"""

from __future__ import annotations

import numpy as np
import torch

from rs_detect.io.prefetch import RawBatch
from rs_detect.io.reader import LUMA, RasterSource


class Normalizer:
    """Apply one scene's band plan and scaling to raw batches."""

    def __init__(self, src: RasterSource, device: torch.device, dtype: torch.dtype, fill_value: float = 0.0) -> None:
        self.device, self.dtype = device, dtype
        self.combine = src.plan.combine
        self.channels = src.channels
        self._src = src  # the stretch is read on first use: it may still be measured while tiles decode
        self._scaling: tuple[float, float] | None = None
        self.fill = float(fill_value)
        lut = src.lut
        self.lut = None if lut is None else torch.from_numpy(np.ascontiguousarray(lut)).to(device)
        self.luma = torch.from_numpy(LUMA).to(device)
        self._stream: torch.cuda.Stream | None = None

    @property
    def scaling(self) -> tuple[float, float]:
        """(low, gain) of the scene-wide stretch: x -> (x - low) * gain."""
        if self._scaling is None:
            s = self._src.scale
            self._scaling = (float(s.low), 1.0 / float(s.high - s.low))
        return self._scaling

    def __call__(self, batch: RawBatch) -> torch.Tensor:
        """The model input for ``batch``, ready on the engine's current stream.

        On a GPU the upload and scaling run on a stream of their own: the copy engine moves the next
        batch while the SMs still run this one's inference, and the engine's stream only waits for an
        event (engine-only speed has no upload to pay; end-to-end should not pay it either).
        """
        if self.device.type != "cuda":
            return self._prepare(batch)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        consumer = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            x = self._prepare(batch)
        consumer.wait_stream(self._stream)
        x.record_stream(consumer)  # allocated on the upload stream, freed after the engine's use
        return x

    def _prepare(self, batch: RawBatch) -> torch.Tensor:
        nb = self.device.type == "cuda"
        x = batch.data.to(self.device, non_blocking=nb)
        if self.combine == "palette":
            assert self.lut is not None
            x = self.lut[x.long().clamp_(0, self.lut.numel() - 1)]
        else:
            x = x.float()
        if self.combine == "luminance":
            x = torch.einsum("c,nchw->nhw", self.luma, x)[:, None]
        low, gain = self.scaling
        x = x.sub_(low).mul_(gain).clamp_(0.0, 1.0)
        if self.combine == "replicate":
            x = x.expand(-1, self.channels, -1, -1)
        if batch.valid is not None:
            valid = batch.valid.to(self.device, non_blocking=nb)[:, None]
            x = torch.where(valid, x, torch.full((), self.fill, device=self.device))
        return x.to(self.dtype).contiguous()
