"""ONNX Runtime backend: the embedded default on a CPU (CUDA when onnxruntime-gpu is installed)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rs_detect.dtypes import model_input_dtype
from rs_detect.engines import metadata
from rs_detect.engines.base import Engine
from rs_detect.errors import ModelError, one_line
from rs_detect.types import ModelMeta

log = logging.getLogger(__name__)

DEFAULT_DYNAMIC_MAX = 32


def check_input_dims(meta: ModelMeta, dims: list[Any], where: str) -> ModelMeta:
    """Check [N, C, H, W] input dims against the metadata; return the meta with its batch bounds."""
    if len(dims) != 4:
        raise ModelError(f"{where}: input has {len(dims)} dims, expected [batch, channels, height, width]")
    n, c, h, w = dims
    if isinstance(c, int) and c != meta.channels:
        raise ModelError(f"{where}: the model input has {c} channel(s) but its metadata/YAML says {meta.channels}")
    for d, label in ((h, "height"), (w, "width")):
        if isinstance(d, int) and d != meta.imgsz:
            raise ModelError(f"{where}: the model input {label} is {d} but its metadata/YAML says imgsz {meta.imgsz}")
    if isinstance(n, int) and n > 0:
        return meta.with_batch(n, n, n, dynamic=False)
    hi = meta.max_batch if meta.max_batch > 1 else DEFAULT_DYNAMIC_MAX
    return meta.with_batch(meta.min_batch, min(meta.opt_batch, hi), hi, dynamic=True)


class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"

    def __init__(self, path: Path, device: str = "cpu", model_yaml: Mapping[str, Any] | Path | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        if not path.is_file():
            raise ModelError(f"{path}: model file not found")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
        opts.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ModelError(f"{path}: --device cuda needs onnxruntime-gpu (installed onnxruntime has only {ort.get_available_providers()})")
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped Fail/InvalidProtobuf errors
            raise ModelError(f"{path}: not a loadable ONNX model ({one_line(exc, 200)})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise ModelError(f"{path}: expected one image input and at least one output, got {len(inputs)} input(s)")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self._dtype = model_input_dtype(inputs[0].type)
        file_meta = self.session.get_modelmeta().custom_metadata_map
        meta = metadata.resolve(path, file_meta, model_yaml)
        meta = check_input_dims(meta, list(inputs[0].shape), str(path))
        out_dims = list(outputs[0].shape)
        if len(out_dims) == 3 and all(isinstance(d, int) for d in out_dims[1:]):
            from rs_detect.postprocess.decode import check_output_shape

            check_output_shape((1, *out_dims[1:]), meta, str(path))
        super().__init__(meta, torch.device("cpu"))

    @property
    def input_dtype(self) -> np.dtype:
        return self._dtype

    def _infer(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            images = images.cpu().numpy()
        images = np.ascontiguousarray(images, dtype=self._dtype)
        out = self.session.run([self.output_name], {self.input_name: images})[0]
        return torch.from_numpy(out)

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
