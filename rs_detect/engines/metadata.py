"""Model metadata: what the model file says about itself, overridden by a model YAML.

Sources, lowest precedence first:
1. the model file: ONNX custom metadata or an Ultralytics .engine header (names, imgsz, stride, task,
   batch, channels: Ultralytics writes them as Python literals), or a plan's sidecar JSON;
2. a model YAML (``<model>.yaml`` beside the model, or ``model_meta`` in the config) with keys
   ``names``, ``imgsz``, ``channels``, ``task``, ``batch: {min, opt, max}``, ``conf``, ``conf_by_class``,
   ``end2end`` (an NMS-free head) and ``categories`` (class name -> plane/ship/other); the YAML wins.
What the runtime itself reports (input shape, batch dims) is then checked against the result.

A bad value is a :class:`ModelError` when the model file carries it and a :class:`ConfigError`
when a model YAML does (a setting the user wrote, like a config file's).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from rs_detect import DOTA_CLASSES
from rs_detect.errors import ConfigError, ModelError, RsDetectError
from rs_detect.fsutil import load_yaml_mapping
from rs_detect.types import ModelMeta

YAML_KEYS = {"names", "imgsz", "channels", "task", "batch", "stride", "conf", "conf_by_class", "categories", "end2end"}


def _literal(value: Any) -> Any:
    if isinstance(value, str):
        for parse in (json.loads, ast.literal_eval):
            try:
                return parse(value)
            except (ValueError, SyntaxError):
                continue
    return value


def _names(value: Any, source: str, error: type[RsDetectError]) -> tuple[str, ...]:
    value = _literal(value)
    if isinstance(value, Mapping):
        return tuple(str(value[k]) for k in sorted(value, key=lambda k: int(k)))
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value)
    raise error(f"{source}: class names must be a list or an index->name mapping, got {type(value).__name__}")


def _imgsz(value: Any, source: str, error: type[RsDetectError]) -> int:
    value = _literal(value)
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise error(f"{source}: only square inputs are supported, got imgsz {list(value)}")
        value = value[0]
    return int(value)


def from_mapping(
    raw: Mapping[str, Any], base: ModelMeta | None = None, source: str = "", error: type[RsDetectError] = ModelError
) -> ModelMeta:
    """Apply the keys Ultralytics (or a model YAML) writes on top of ``base``; bad values raise ``error``."""
    meta = base or ModelMeta(names=DOTA_CLASSES)
    updates: dict[str, Any] = {}
    if "names" in raw:
        updates["names"] = _names(raw["names"], source, error)
    if "imgsz" in raw:
        updates["imgsz"] = _imgsz(raw["imgsz"], source, error)
    if "channels" in raw:
        updates["channels"] = int(_literal(raw["channels"]))
    if "conf" in raw:
        conf = float(_literal(raw["conf"]))
        if not 0.0 <= conf <= 1.0:
            raise error(f"{source}: conf must be in [0, 1], got {conf}")
        updates["conf"] = conf
    if "conf_by_class" in raw:
        per = _literal(raw["conf_by_class"])
        if not isinstance(per, Mapping):
            raise error(f"{source}: conf_by_class must map class names to thresholds, got {type(per).__name__}")
        pairs = tuple((str(k), float(v)) for k, v in per.items())
        bad = [(k, v) for k, v in pairs if not 0.0 <= v <= 1.0]
        if bad:
            raise error(f"{source}: conf_by_class[{bad[0][0]}] must be in [0, 1], got {bad[0][1]}")
        updates["conf_by_class"] = pairs
    if "end2end" in raw:  # Ultralytics writes it (YOLO26, YOLOv10 exports); a string "True"/"False" in ONNX
        flag = _literal(raw["end2end"])
        if isinstance(flag, str):
            flag = flag.strip().lower() in ("true", "1", "yes")
        updates["end2end"] = bool(flag)
    if "categories" in raw:
        cats = _literal(raw["categories"])
        if not isinstance(cats, Mapping):
            raise error(f"{source}: categories must map class names to plane, ship or other, got {type(cats).__name__}")
        updates["category_overrides"] = tuple((str(k), str(v).strip().lower()) for k, v in cats.items())
    if "stride" in raw:
        updates["stride"] = int(_literal(raw["stride"]))
    if "task" in raw:
        task = str(raw["task"])
        if task not in ("detect", "obb"):
            raise error(f"{source}: task {task!r} is not supported (detect or obb)")
        updates["task"] = task
    batch = raw.get("batch")
    if isinstance(batch, Mapping):
        lo, opt, hi = int(batch.get("min", 1)), int(batch.get("opt", meta.opt_batch)), int(batch.get("max", meta.max_batch))
        if not 1 <= lo <= opt <= hi:
            raise error(f"{source}: batch bounds must satisfy 1 <= min <= opt <= max, got {lo}/{opt}/{hi}")
        updates.update(min_batch=lo, opt_batch=opt, max_batch=hi)
    if source:
        updates["source"] = source
    return replace(meta, **updates)


def load_model_yaml(path: Path) -> dict[str, Any]:
    return load_yaml_mapping(path, "model YAML", YAML_KEYS, ConfigError)


def sidecar_yaml(model: Path) -> Path | None:
    for cand in (model.with_suffix(".yaml"), model.with_suffix(".yml")):
        if cand.is_file():
            return cand
    return None


def model_yaml(model: Path, override: Mapping[str, Any] | Path | None) -> Mapping[str, Any] | None:
    """The model YAML that applies to ``model``: the explicit ``override``, else a sidecar YAML."""
    if override is None:
        override = sidecar_yaml(model)
    if isinstance(override, Path):
        override = load_model_yaml(override)
    return override or None


def resolve(model: Path, file_meta: Mapping[str, Any], override: Mapping[str, Any] | Path | None) -> ModelMeta:
    """File metadata < model YAML (explicit ``override``, else a sidecar YAML)."""
    meta = from_mapping(file_meta, source=str(model))
    yaml_meta = model_yaml(model, override)
    if yaml_meta:
        meta = from_mapping(yaml_meta, meta, source=str(model), error=ConfigError)
    if meta.category_overrides:
        from rs_detect.categories import check_overrides

        check_overrides(dict(meta.category_overrides), meta.names, f"{model}: model YAML")
    return meta


def yaml_sets_batch(model: Path, override: Mapping[str, Any] | Path | None) -> bool:
    """Whether the model YAML fixes the batch bounds (backends then keep them over their defaults)."""
    return isinstance((model_yaml(model, override) or {}).get("batch"), Mapping)
