"""Raw batches -> model input, on the engine's device (a synchronous stage: tensors in, tensors out).

Scaling a 1024 x 1024 tile to float costs a few milliseconds of CPU per tile, which at GPU speeds
(thousands of tiles per second) would need more cores than the decoders. So the reader ships raw
pixels (1 or 2 bytes each, in pinned memory) and this step does band combination, the scene-wide
stretch and the nodata fill as a handful of tensor ops where the engine runs.
"""

from __future__ import annotations

import numpy as np
import torch

from rs_detect.io.bands import LUMA
from rs_detect.io.reader import RasterSource
from rs_detect.types import RawBatch, ScaleInfo


#: the smallest value of each pixel dtype that :meth:`Normalizer.apply` scales through a table
_TABLE_BASE = {torch.uint8: 0, torch.int8: -128, torch.uint16: 0, torch.int16: -32768}


class Normalizer:
    """Apply one scene's band plan and scaling to raw batches.

    Two steps: :meth:`upload` moves a raw batch to the engine's device, :meth:`apply` turns raw pixels
    there into the model's input. ``normalizer(batch)`` does both. An engine that runs a captured CUDA
    graph can capture :meth:`apply` together with the model (:meth:`Engine.infer_normalized`): the
    scaling then reads its numbers from a small tensor (:attr:`params`), so one graph serves every scene
    of a dtype, and the main thread launches one graph instead of a handful of kernels per batch.

    ``scale``: the scene's stretch (default: ``src.scale``, measured now if it is not yet).
    ``upload_stream``: a CUDA stream for the host-to-device copies (owned by the caller, the
    :class:`~rs_detect.executor.SceneExecutor`); None copies on the current stream.
    """

    def __init__(self, src: RasterSource, device: torch.device, dtype: torch.dtype, fill_value: float = 0.0,
                 scale: ScaleInfo | None = None, upload_stream: torch.cuda.Stream | None = None) -> None:
        self.device, self.dtype = device, dtype
        self.combine = src.plan.combine
        self.channels = src.channels
        s = scale if scale is not None else src.scale
        #: (low, gain) of the scene-wide stretch: x -> (x - low) * gain
        self.scaling = (float(s.low), 1.0 / float(s.high - s.low))
        self._params: torch.Tensor | None = None
        self.fill = float(fill_value)
        lut = src.lut
        self.lut = None if lut is None else torch.from_numpy(np.ascontiguousarray(lut)).to(device)
        self.luma = torch.from_numpy(LUMA).to(device)
        self._stream = upload_stream

    @property
    def params(self) -> torch.Tensor:
        """[low, gain, fill] as float32 on the device (what :meth:`apply` reads inside a graph)."""
        if self._params is None:
            low, gain = self.scaling
            self._params = torch.tensor([low, gain, self.fill], dtype=torch.float32).to(self.device)
        return self._params

    @property
    def graphable(self) -> bool:
        """Whether :meth:`apply` depends on the scene only through :attr:`params` (no palette, no mixing)."""
        return self.combine in ("direct", "replicate")

    def __call__(self, batch: RawBatch) -> torch.Tensor:
        """The model input for ``batch``, ready on the engine's current stream."""
        raw, valid = self.upload(batch)
        return self.apply(raw, valid)

    def upload(self, batch: RawBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw pixels and validity on the engine's device, ready on its current stream.

        With an upload stream the copies run there: the copy engine moves the next batch while the SMs
        still run this one's inference, and the engine's stream only waits for the copies.
        """
        if self.device.type != "cuda":
            return batch.data, batch.valid
        if batch.data.is_cuda:  # decoded on the GPU (rs_detect.io.gpu_blocks): wait for its stream's event
            consumer = torch.cuda.current_stream(self.device)
            if batch.ready is not None:
                consumer.wait_event(batch.ready)
            for t in (batch.data, batch.valid):  # made on the reader's stream, used on this one
                if t is not None:
                    t.record_stream(consumer)
            return batch.data, batch.valid
        if self._stream is None:
            return batch.data.to(self.device, non_blocking=True), None if batch.valid is None else batch.valid.to(self.device, non_blocking=True)
        consumer = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            raw = batch.data.to(self.device, non_blocking=True)
            valid = None if batch.valid is None else batch.valid.to(self.device, non_blocking=True)
        consumer.wait_stream(self._stream)
        for t in (raw, valid):  # allocated on the upload stream, freed after the engine's use
            if t is not None:
                t.record_stream(consumer)
        return raw, valid

    def apply(self, raw: torch.Tensor, valid: torch.Tensor | None, params: torch.Tensor | None = None) -> torch.Tensor:
        """Raw pixels [N, bands, S, S] (and validity [N, S, S]) on the device -> the model's input.

        ``params``: [low, gain, fill] to read instead of :attr:`params` (a captured graph's own copy).
        """
        p = self.params if params is None else params
        base = _TABLE_BASE.get(raw.dtype) if self.combine in ("direct", "replicate") else None
        if base is not None:
            # 8 and 16-bit pixels: every value the dtype holds, scaled as below, then looked up. The same
            # numbers in two passes over the batch instead of five (on a GPU the scaling ran beside the
            # model in its graph, and its passes over 4 bytes a pixel slowed it)
            table = torch.arange(base, base + (1 << 8 * raw.element_size()), dtype=torch.float32, device=raw.device)
            table = table.sub_(p[0]).mul_(p[1]).clamp_(0.0, 1.0).to(self.dtype)
            index = raw.to(torch.int32)
            if base:
                index.sub_(base)
            x = table.index_select(0, index.view(-1)).view(raw.shape)
            if self.combine == "replicate":
                x = x.expand(-1, self.channels, -1, -1)
            if valid is not None:
                x = torch.where(valid[:, None], x, p[2].to(self.dtype))
            return x.contiguous()
        if self.combine == "palette":
            assert self.lut is not None
            x = self.lut[raw.long().clamp_(0, self.lut.numel() - 1)]
        else:
            x = raw.float()
        if self.combine == "luminance":
            x = torch.einsum("c,nchw->nhw", self.luma, x)[:, None]
        x = x.sub_(p[0]).mul_(p[1]).clamp_(0.0, 1.0)
        if self.combine == "replicate":
            x = x.expand(-1, self.channels, -1, -1)
        if valid is not None:
            x = torch.where(valid[:, None], x, p[2])
        return x.to(self.dtype).contiguous()
