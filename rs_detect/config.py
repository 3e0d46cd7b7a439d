"""The user's settings: defaults < a YAML config file < command-line flags, each value range-checked.

Unknown keys are refused (a typo must not silently fall back to a default). What is left open here
(``None``: the model's or the machine's default) and every rule across fields or against the model is
settled once by :func:`rs_detect.plan.resolve_plan`, which turns a :class:`Config` and a loaded
engine into the run's :class:`~rs_detect.plan.RunPlan`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from rs_detect.errors import ConfigError
from rs_detect.fsutil import load_yaml_mapping
from rs_detect.types import ScaleConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_MODEL = REPO_ROOT / "sample_data" / "planeship_yolov8n_hbb.onnx"


def default_model() -> Path:
    """``$RS_DETECT_MODEL`` if set, else the bundled sample model."""
    env = os.environ.get("RS_DETECT_MODEL")
    return Path(env) if env else SAMPLE_MODEL


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset), else all."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def auto_read_threads(device: str, cores: int | None = None) -> int:
    """Reader threads when ``read_threads`` is not set: on a GPU, all cores but four (at most 16); on the CPU, up to 4.

    On a GPU the readers are what keeps the engine busy, and the main, post-processing, cutter and
    batching threads need the GIL and a core too (measured in benchmarks/results/). On the CPU the model itself
    wants the cores.
    """
    n = available_cores() if cores is None else max(1, int(cores))
    if str(device).startswith("cuda"):
        return max(2, min(16, n - 4))
    return max(1, min(4, n))


def cutter_threads(threads: int) -> int:
    """Cutter threads for ``threads`` reader threads: half as many (a cut is mostly a copy without the
    GIL; half as many cutters as readers measured as fast as as many, and every thread more is one
    more waiting for the GIL that the engine's and the post-processing threads need)."""
    return max(2, threads // 2)


def auto_prefetch(device: str, batch_size: int = 16) -> int:
    """Batches read ahead when ``prefetch`` is not set: about 48 tiles on a GPU (3 batches of 16, 6 of
    8, 1 of 32 or more), 2 batches on the CPU.

    Each batch ahead is one more pinned batch resident (32 MB at 16 x 1024 x 1024 uint16) and holds the
    slabs its rows need, so the depth is set in tiles. Three more batches are alive behind the
    read-ahead (one finished and waiting to be handed over, one in the hand-over queue, one in the
    engine), so at batch 32 one batch ahead still keeps 128 tiles in flight (measured in
    benchmarks/results/). On the CPU the model is the slow stage and 2 suffice.
    """
    if not str(device).startswith("cuda"):
        return 2
    return max(1, 48 // max(1, batch_size))


@dataclass(frozen=True)
class Config:
    model: str | None = None
    model_meta: str | dict[str, Any] | None = None  # a model YAML path or inline mapping
    tile_size: int | None = None  # default: the model's input size
    overlap: int = 192
    batch_size: int | None = None  # default: the engine's preferred batch
    conf: float | None = None  # default: the model's own (model YAML 'conf'), else 0.25
    conf_by_class: dict[str, float] = field(default_factory=dict)
    iou: float = 0.5
    classes: tuple[str, ...] | None = ("plane", "ship")  # categories and/or model class names (rs_detect.categories)
    max_det: int = 300
    bands: tuple[int, ...] | None = None
    device: Literal["cpu", "cuda"] | str = "cpu"
    crs: Literal["wgs84", "native"] = "wgs84"
    scale: ScaleConfig = ScaleConfig()
    merge_iou: float = 0.5
    merge_ios: float = 0.6
    stitch_conf: float = 0.1  # whole boxes down to this score may stand in for a piece cut by a tile edge
    exclusive_classes: tuple[str, ...] = ("plane", "ship")  # never nest (categories or names, among the model's classes): the lower-scoring nested box goes; () disables
    exclusive_ios: float = 0.7
    duplicate_ios: float | None = 0.5  # a box this much inside a higher-scoring one of its class is a duplicate; None: keep
    edge_margin: float = 3.0
    nodata_fill: float = 0.0
    read_threads: int | None = None  # None: auto_read_threads(device)
    prefetch: int | None = None  # batches read ahead of the engine; None: auto_prefetch(device, batch)
    reader: Literal["auto", "gdal", "blocks", "nvcomp"] = "auto"  # auto: blocks decoded on the GPU where the file allows (rs_detect.io.gpu_blocks)

    def __post_init__(self) -> None:
        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        check(self.overlap >= 0, f"overlap must be >= 0, got {self.overlap}")
        check(self.tile_size is None or self.tile_size >= 32, f"tile_size must be >= 32, got {self.tile_size}")
        check(self.batch_size is None or self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("conf", "iou", "merge_iou", "merge_ios", "exclusive_ios", "duplicate_ios", "stitch_conf"):
            v = getattr(self, name)
            if v is None:
                continue
            check(0.0 <= v <= 1.0, f"{name} must be in [0, 1], got {v}")
        for k, v in self.conf_by_class.items():
            check(0.0 <= float(v) <= 1.0, f"conf_by_class[{k}] must be in [0, 1], got {v}")
        check(self.max_det >= 1, f"max_det must be >= 1, got {self.max_det}")
        check(self.crs in ("wgs84", "native"), f"crs must be wgs84 or native, got {self.crs!r}")
        check(str(self.device) == "cpu" or str(self.device).startswith("cuda"), f"device must be cpu or cuda[:N], got {self.device!r}")
        check(self.bands is None or all(int(b) >= 1 for b in self.bands), f"bands are 1-based, got {self.bands}")
        check(self.reader in ("auto", "gdal", "blocks", "nvcomp"), f"reader must be auto, gdal, blocks or nvcomp, got {self.reader!r}")
        check((self.read_threads is None or self.read_threads >= 1) and (self.prefetch is None or self.prefetch >= 1),
              "read_threads and prefetch must be >= 1")

    def model_path(self) -> Path:
        return Path(self.model) if self.model else default_model()

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scale"] = asdict(self.scale)
        return d

    def updated(self, **overrides: Any) -> Config:
        """A copy with the given (non-None) overrides applied, e.g. from CLI flags."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


_FIELDS = {f.name for f in fields(Config)}
_SCALE_KEYS = {"method", "low", "high", "percentiles"}


def _coerce(key: str, value: Any, where: str) -> Any:
    if key == "scale":
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: scale must be a mapping with keys {sorted(_SCALE_KEYS)}")
        unknown = sorted(set(value) - _SCALE_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key 'scale.{unknown[0]}' (allowed: {', '.join(sorted(_SCALE_KEYS))})")
        method = value.get("method", "auto")
        if method not in ("auto", "percentile", "fixed"):
            raise ConfigError(f"{where}: scale.method must be auto, percentile or fixed, got {method!r}")
        pct = tuple(float(p) for p in value.get("percentiles", (2.0, 98.0)))
        return ScaleConfig(method=method, low=value.get("low"), high=value.get("high"), percentiles=pct)  # type: ignore[arg-type]
    if key in ("classes", "bands", "exclusive_classes") and value is not None:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return tuple(int(v) for v in value) if key == "bands" else tuple(str(v) for v in value)
    return value


def load_config(path: Path | None = None, **overrides: Any) -> Config:
    """Defaults < ``path`` (YAML) < ``overrides`` (None means 'not given')."""
    values: dict[str, Any] = {}
    if path is not None:
        raw = load_yaml_mapping(path, "config file", _FIELDS, ConfigError, lambda key: f"unknown config key {key!r}")
        values = {k: _coerce(k, v, str(path)) for k, v in raw.items()}
    values.update({k: _coerce(k, v, "command line") for k, v in overrides.items() if v is not None})
    try:
        return Config(**values)
    except TypeError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None
    except ConfigError as exc:  # name the file the values came from (flags are checked by the CLI first)
        if path is None or str(path) in str(exc):
            raise
        raise ConfigError(f"{path}: {exc}") from None
