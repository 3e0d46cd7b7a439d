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
import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from rs_detect import DOTA_CLASSES
from rs_detect.errors import ConfigError, ModelError, RsDetectError
from rs_detect.fsutil import load_yaml_mapping
from rs_detect.types import ModelMeta

YAML_KEYS = {"names", "imgsz", "channels", "task", "batch", "stride", "conf", "conf_by_class", "categories", "end2end"}


#: Longest metadata value parsed as a literal (1000 class names fit easily); longer ones are refused.
MAX_LITERAL_CHARS = 100_000
#: Bounds that catch nonsense before it reaches an allocation (a 1e9-pixel input, 10^4 channels).
MAX_IMGSZ = 1 << 15
MAX_CHANNELS = 64
MAX_CLASSES = 100_000


class _BadValue(Exception):
    """A metadata value that does not parse or convert; :func:`from_mapping` adds the key and the file."""


def _show(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _literal(value: Any) -> Any:
    """A string as the JSON or Python literal it holds, else the string itself.

    Ultralytics writes ``names``, ``imgsz`` and friends with ``str()``; a model file may hold anything,
    so parsing is bounded: over :data:`MAX_LITERAL_CHARS`, nested past the interpreter's recursion
    limit, or out of range of a float, the value is refused (never an exception of another kind).
    """
    if not isinstance(value, str):
        return value
    if len(value) > MAX_LITERAL_CHARS:
        raise _BadValue(f"is {len(value)} characters long (at most {MAX_LITERAL_CHARS})")
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(value)
        except (ValueError, SyntaxError, TypeError):
            continue
        except (RecursionError, MemoryError):
            raise _BadValue("is nested too deeply") from None
    return value


def _int(value: Any, lo: int = 1, hi: int | None = None) -> int:
    """A whole number in [lo, hi] from an int, an integral float, or a string holding one."""
    value = _literal(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _BadValue(f"must be a whole number, got {_show(value)}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise _BadValue(f"must be a whole number, got {_show(value)}")
    number = int(value)
    if number < lo or (hi is not None and number > hi):
        raise _BadValue(f"must be in [{lo}, {hi if hi is not None else 'inf'}], got {_show(number)}")
    return number


def _float(value: Any) -> float:
    value = _literal(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _BadValue(f"must be a number, got {_show(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise _BadValue(f"must be a number in [0, 1], got {_show(value)}") from None
    if not 0.0 <= number <= 1.0:  # also refuses nan
        raise _BadValue(f"must be in [0, 1], got {_show(number)}")
    return number


def _names(value: Any) -> tuple[str, ...]:
    value = _literal(value)
    if isinstance(value, Mapping):
        try:
            keyed = {_int(k, lo=0): v for k, v in value.items()}
        except _BadValue:
            raise _BadValue(f"must map class indices 0..n-1 to names, got keys {_show(list(value)[:5])}") from None
        if sorted(keyed) != list(range(len(keyed))):
            raise _BadValue(f"must map class indices 0..n-1 to names, got indices {_show(sorted(keyed)[:5])}")
        value = [keyed[k] for k in range(len(keyed))]
    if not isinstance(value, (list, tuple)):
        raise _BadValue(f"must be a list or an index->name mapping, got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_CLASSES:
        raise _BadValue(f"must hold 1 to {MAX_CLASSES} names, got {len(value)}")
    if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        bad = next(v for v in value if not isinstance(v, (str, int, float)) or isinstance(v, bool))
        raise _BadValue(f"must hold plain names, got {_show(bad)}")
    return tuple(str(v) for v in value)


def _imgsz(value: Any) -> int:
    value = _literal(value)
    if isinstance(value, (list, tuple)):
        if not value:
            raise _BadValue("must not be empty")
        sizes = [_int(v, 1, MAX_IMGSZ) for v in value]
        if len(set(sizes)) != 1:
            raise _BadValue(f"must be square (only square inputs are supported), got {sizes}")
        value = sizes[0]
    return _int(value, 1, MAX_IMGSZ)


def _conf_by_class(value: Any) -> tuple[tuple[str, float], ...]:
    per = _literal(value)
    if not isinstance(per, Mapping):
        raise _BadValue(f"must map class names to thresholds, got {type(per).__name__}")
    pairs = []
    for k, v in per.items():
        try:
            pairs.append((str(k), _float(v)))
        except _BadValue as exc:
            raise _BadValue(f"[{k}] {exc}") from None
    return tuple(pairs)


def _task(value: Any) -> str:
    task = str(value) if isinstance(value, str) else _show(value)
    if task not in ("detect", "obb"):
        raise _BadValue(f"{_show(task)} is not supported (detect or obb)")
    return task


def _batch(value: Mapping[str, Any], meta: ModelMeta) -> dict[str, int]:
    lo = _int(value.get("min", 1))
    opt = _int(value.get("opt", meta.opt_batch))
    hi = _int(value.get("max", meta.max_batch))
    if not lo <= opt <= hi:
        raise _BadValue(f"bounds must satisfy 1 <= min <= opt <= max, got {lo}/{opt}/{hi}")
    return {"min_batch": lo, "opt_batch": opt, "max_batch": hi}


def _end2end(value: Any) -> bool:
    """Ultralytics writes it for YOLO26/YOLOv10 exports (a string "True"/"False" in ONNX)."""
    flag = _literal(value)
    if isinstance(flag, str):
        flag = flag.strip().lower() in ("true", "1", "yes")
    if not isinstance(flag, (bool, int, float)):
        raise _BadValue(f"must be true or false, got {_show(flag)}")
    return bool(flag)


def _categories(value: Any) -> tuple[tuple[str, str], ...]:
    cats = _literal(value)
    if not isinstance(cats, Mapping):
        raise _BadValue(f"must map class names to plane, ship or other, got {type(cats).__name__}")
    return tuple((str(k), str(v).strip().lower()) for k, v in cats.items())


_FIELDS: dict[str, tuple[str, Any]] = {
    # metadata key -> (ModelMeta field, converter)
    "names": ("names", _names),
    "imgsz": ("imgsz", _imgsz),
    "channels": ("channels", lambda v: _int(v, 1, MAX_CHANNELS)),
    "conf": ("conf", _float),
    "conf_by_class": ("conf_by_class", _conf_by_class),
    "stride": ("stride", lambda v: _int(v, 1, MAX_IMGSZ)),
    "task": ("task", _task),
    "end2end": ("end2end", _end2end),
    "categories": ("category_overrides", _categories),
}


def from_mapping(
    raw: Mapping[str, Any], base: ModelMeta | None = None, source: str = "", error: type[RsDetectError] = ModelError
) -> ModelMeta:
    """Apply the keys Ultralytics (or a model YAML) writes on top of ``base``.

    Any value that does not parse or is out of range raises ``error`` (:class:`ModelError` for the
    model file's metadata, :class:`ConfigError` for a model YAML) naming the file, the key and the
    problem, in one line, whatever the value holds.
    """
    meta = base or ModelMeta(names=DOTA_CLASSES)
    updates: dict[str, Any] = {}
    where = f"{source}: " if source else ""
    what = "model metadata" if error is ModelError else "model YAML"
    for key, (attr, convert) in _FIELDS.items():
        if key not in raw:
            continue
        try:
            updates[attr] = convert(raw[key])
        except _BadValue as exc:
            sep = "" if str(exc).startswith("[") else " "
            raise error(f"{where}{key}{sep}{exc} (in its {what})") from None
    batch = raw.get("batch")
    if isinstance(batch, Mapping):
        try:
            updates.update(_batch(batch, meta))
        except _BadValue as exc:
            raise error(f"{where}batch {exc} (in its {what})") from None
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
