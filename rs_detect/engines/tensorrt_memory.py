"""Device memory for the TensorRT backend: allocated once per engine, bound once, reused every batch.

torch CUDA tensors when torch sees a GPU (the output then stays on the GPU, so decode and NMS run
there too); otherwise pycuda, as in the seed, with pinned host buffers and async copies on one stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import Any

import numpy as np
import torch

from rs_detect.dtypes import torch_dtype
from rs_detect.errors import EngineUnavailableError, one_line

Shape = tuple[int, ...]


class TorchBuffers:
    """Buffers as torch tensors on one device, one stream; the output stays on that device.

    Used with CUDA tensors in production; the tests run the same code with CPU tensors (stream 0)
    against the fake TensorRT, which reads the raw addresses.
    """

    def __init__(self, device: torch.device, specs: Mapping[str, tuple[Shape, np.dtype]]) -> None:
        self.device = device
        self.tensors = {name: torch.empty(shape, dtype=torch_dtype(dtype), device=device) for name, (shape, dtype) in specs.items()}
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def handle(self) -> int:
        return int(self.stream.cuda_stream) if self.stream is not None else 0

    def address(self, name: str) -> int:
        return int(self.tensors[name].data_ptr())

    def _on_stream(self) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def upload(self, name: str, images: np.ndarray | torch.Tensor) -> None:
        dst = self.tensors[name]
        src = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
        if self.stream is not None and src.device.type == "cuda":
            self.stream.wait_stream(torch.cuda.current_stream(src.device))  # src may still be being written
        with self._on_stream():
            dst[: src.shape[0]].copy_(src.to(dst.dtype), non_blocking=True)

    def download(self, name: str, shape: Shape) -> torch.Tensor:
        count = int(np.prod(shape))
        with self._on_stream():
            out = self.tensors[name].view(-1)[:count].view(shape).to(torch.float32, copy=True)
        if self.stream is not None:
            # no host sync: whoever uses ``out`` on the caller's stream waits for this stream, so the
            # next batch can be queued while this one is decoded (the copy above is ordered before it)
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            out.record_stream(current)
        return out

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def close(self) -> None:
        self.tensors.clear()


class PycudaBuffers:
    """The seed's memory scheme, done once: pinned host buffers, device allocations, one stream."""

    def __init__(self, specs: Mapping[str, tuple[Shape, np.dtype]]) -> None:
        cuda = import_pycuda()
        self.cuda = cuda
        self.host = {name: cuda.pagelocked_empty(int(np.prod(shape)), dtype) for name, (shape, dtype) in specs.items()}
        self.dev = {name: cuda.mem_alloc(int(self.host[name].nbytes)) for name in specs}
        self.stream = cuda.Stream()
        self.device = torch.device("cpu")

    @property
    def handle(self) -> int:
        return int(self.stream.handle)

    def address(self, name: str) -> int:
        return int(self.dev[name])

    def upload(self, name: str, images: np.ndarray | torch.Tensor) -> None:
        arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else images
        host = self.host[name][: arr.size]
        host.reshape(arr.shape)[...] = arr  # converts to the engine dtype into pinned memory
        self.cuda.memcpy_htod_async(self.dev[name], host, self.stream)

    def download(self, name: str, shape: Shape) -> torch.Tensor:
        host = self.host[name][: int(np.prod(shape))]
        self.cuda.memcpy_dtoh_async(host, self.dev[name], self.stream)
        self.stream.synchronize()
        return torch.from_numpy(host.reshape(shape).astype(np.float32, copy=True))

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        for alloc in self.dev.values():
            alloc.free()
        self.dev.clear()
        self.host.clear()


def import_pycuda() -> ModuleType:
    try:
        import pycuda.autoinit  # noqa: F401 - creates the CUDA context TensorRT runs in
        import pycuda.driver as cuda
    except ImportError:
        raise EngineUnavailableError(
            "TensorRT needs device memory: install PyTorch with CUDA support, or pycuda (pip install pycuda)"
        ) from None
    except Exception as exc:  # pycuda's own LogicError/RuntimeError when no GPU or driver answers
        raise EngineUnavailableError(f"TensorRT needs a CUDA GPU: pycuda could not start ({one_line(exc)})") from None
    return cuda


def cuda_torch_device(device: str) -> torch.device | None:
    """The torch CUDA device to run on, or None when torch sees no GPU (then pycuda is used)."""
    if not torch.cuda.is_available():
        return None
    if device.startswith("cuda:"):
        return torch.device(device)
    return torch.device("cuda", torch.cuda.current_device())


@contextlib.contextmanager
def on_device(device: torch.device | None) -> Iterator[None]:
    if device is not None and device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield
