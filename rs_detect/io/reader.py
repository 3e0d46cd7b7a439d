"""RasterSource: owns the open scene, maps its bands to the model's channels, scales pixels to [0, 1].

Band mapping rule (documented in the README):

* ``--bands`` given: those bands (1-based). As many as the model has channels are used directly; one band
  for a 3-channel model is replicated; three bands for a 1-channel model are combined as luminance
  (0.299 R + 0.587 G + 0.114 B, in the order given).
* not given, 1-channel model: a paletted band is expanded through its colour table to luminance; a
  scene whose colour interpretation names red, green and blue is combined as luminance of those bands
  (whatever their order in the file); else a red band, named by colour interpretation or by its
  description (``red``, ``B04`` as Sentinel-2 names it): a red + NIR file gives the model its visible
  red band, closest to the luminance it sees in RGB scenes; otherwise band 1 (with a warning when the
  scene has more).
* not given, 3-channel model: red, green, blue by colour interpretation, else bands 1-3; a 1-band
  scene is replicated.
* alpha bands are never data: they (and nodata values, NaN, internal or sidecar masks) become the mask.

Scaling: uint8 divides by 255. Other types use one scene-wide percentile stretch (2-98 % by default)
measured on a decimated read (overviews when present, else a grid of sample windows), so every tile
sees the same scaling; ``scale: {method: fixed, low, high}`` sets it by hand. Nodata pixels are
filled with a constant after scaling.

Reads are windowed and thread safe: each thread gets its own dataset handle (rasterio handles must
not be shared across threads, and GDAL releases the GIL while decoding).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import warnings
from concurrent.futures import CancelledError, Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.windows import Window

from rs_detect.errors import InputError
from rs_detect.errors import one_line as _one_line
from rs_detect.memory import mapped_array
from rs_detect.types import ScaleInfo

log = logging.getLogger(__name__)

# GDAL caches decoded blocks up to 5 % of RAM by default: on a 24 GiB machine that is over 1 GiB of
# resident memory that grows with the scene until the cap. The pipeline decodes every block once, into
# slabs of its own (io.prefetch), so the cache has nothing to share: keep it small. A GDAL_CACHEMAX
# the user set is never overridden.
os.environ.setdefault("GDAL_CACHEMAX", "16")
STATS_GRID = 8  # sample windows per axis for the percentile stretch
STATS_THREADS = 4
STATS_WINDOW = 256
STATS_CHUNK_BYTES = 4 << 20  # striped files: a grid row's full-width band is read in whole strips of about this size

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

Combine = Literal["direct", "luminance", "replicate", "palette"]


@dataclass(frozen=True)
class ScaleConfig:
    """How to scale: ``auto`` (uint8: /255, else percentile), ``percentile`` or ``fixed``."""

    method: Literal["auto", "percentile", "fixed"] = "auto"
    low: float | None = None
    high: float | None = None
    percentiles: tuple[float, float] = (2.0, 98.0)


@dataclass(frozen=True)
class BandPlan:
    indexes: tuple[int, ...]
    combine: Combine
    channels: int
    note: str = ""


def plan_bands(
    count: int,
    colorinterp: tuple[ColorInterp, ...],
    channels: int,
    bands: tuple[int, ...] | None,
    name: str,
    descriptions: tuple[str | None, ...] = (),
) -> BandPlan:
    """Which raster bands feed which model channels (see the module docstring for the rule)."""
    if bands:
        bad = [b for b in bands if not 1 <= b <= count]
        if bad:
            raise InputError(f"{name}: band {bad[0]} out of range (the scene has {count} band{'s' if count != 1 else ''})")
        if len(bands) == channels:
            combine: Combine = "palette" if channels == 1 and colorinterp[bands[0] - 1] == ColorInterp.palette else "direct"
            return BandPlan(tuple(bands), combine, channels)
        if len(bands) == 1 and channels == 3:
            return BandPlan(tuple(bands), "replicate", channels)
        if len(bands) == 3 and channels == 1:
            return BandPlan(tuple(bands), "luminance", channels, "luminance of the given bands")
        raise InputError(f"{name}: --bands gives {len(bands)} band(s) but the model takes {channels} channel(s)")

    data = [i + 1 for i in range(count) if colorinterp[i] != ColorInterp.alpha] or [1]
    rgb_ci = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
    rgb = tuple(colorinterp.index(ci) + 1 for ci in rgb_ci) if all(ci in colorinterp for ci in rgb_ci) else None
    if channels == 1:
        if colorinterp[data[0] - 1] == ColorInterp.palette:
            return BandPlan((data[0],), "palette", 1, "palette expanded to luminance")
        if rgb is not None:
            return BandPlan(rgb, "luminance", 1, "luminance of the red, green and blue bands")
        red = [i for i in data if colorinterp[i - 1] == ColorInterp.red or _names_red(descriptions, i)]
        if len(data) > 1 and red:
            return BandPlan((red[0],), "direct", 1, f"band {red[0]}, the red band")
        if len(data) > 1:
            log.warning("%s: %d bands and a 1-channel model: using band %d (choose another with --bands)", name, len(data), data[0])
        return BandPlan((data[0],), "direct", 1)
    if channels == 3:
        if rgb is not None:
            return BandPlan(rgb, "direct", 3)
        if len(data) >= 3:
            return BandPlan(tuple(data[:3]), "direct", 3)
        return BandPlan((data[0],), "replicate", 3, "one band replicated to 3 channels")
    if len(data) < channels:
        raise InputError(f"{name}: the model takes {channels} channels but the scene has {len(data)} data band(s)")
    return BandPlan(tuple(data[:channels]), "direct", channels)


def _names_red(descriptions: tuple[str | None, ...], band: int) -> bool:
    """Band ``band``'s description names it red ("red", "B04", "B4", as Sentinel-2 and Landsat 8/9 files do)."""
    if band > len(descriptions) or not descriptions[band - 1]:
        return False
    words = re.split(r"[^a-z0-9]+", str(descriptions[band - 1]).lower())
    return "red" in words or "b04" in words or "b4" in words


def value_counts(values: np.ndarray) -> tuple[int, np.ndarray] | None:
    """``(base, counts)`` of 8/16-bit integers: ``counts[v - base]`` values equal ``v``, where ``base`` is
    the dtype's smallest value (0 unsigned), so that counts of any samples of one dtype add up index by
    index. None for any other dtype."""
    if values.dtype.kind not in "ui" or values.dtype.itemsize > 2:
        return None
    base = int(np.iinfo(values.dtype).min)
    return base, np.bincount(values.astype(np.int32) - base if base else values, minlength=1)


def percentiles_from_counts(base: int, counts: np.ndarray, dtype: np.dtype, qs: tuple[float, ...] | list[float]) -> np.ndarray:
    """``np.percentile`` (linear) of the values that ``counts`` (from :func:`value_counts`) counts.

    The order statistics around each percentile come from the cumulative counts and are interpolated
    exactly as numpy interpolates them, so the result is the same to the last bit.
    """
    cum = np.cumsum(counts)
    n = int(cum[-1])
    q = np.true_divide(qs, 100)
    virtual = (n - 1) * q  # numpy's virtual index for the linear method
    prev = np.floor(virtual)
    top = virtual >= n - 1  # numpy takes index -1 (the largest value) twice, and its gamma from -1
    gamma = virtual - np.where(top, -1, prev)
    prev[top] = n - 1
    nxt = np.where(top, n - 1, prev + 1)

    def order_stat(k: np.ndarray) -> np.ndarray:  # the k-th smallest value, in the sample's dtype
        return (np.searchsorted(cum, k, side="right") + base).astype(dtype)

    a, b = order_stat(prev), order_stat(nxt)
    diff = b - a  # numpy's _lerp, step by step
    out = np.add(a, diff * gamma)
    np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5, casting="unsafe")
    return out


def percentiles(values: np.ndarray, qs: tuple[float, ...] | list[float]) -> np.ndarray:
    """``np.percentile(values, qs)`` (linear), from a histogram where the values are 8/16-bit integers.

    A sample of a scene holds millions of values, and the first batch waits for the stretch: counting
    them (``np.bincount``) takes a quarter of the time of the partial sort ``np.percentile`` does.
    """
    counted = value_counts(values) if values.size else None
    if counted is None:
        return np.asarray(np.percentile(values, qs), dtype=np.float64)
    return percentiles_from_counts(*counted, values.dtype, qs)


def add_counts(parts: list[tuple[int, np.ndarray]]) -> tuple[int, np.ndarray]:
    """The counts of several samples of one dtype (:func:`value_counts`) as one."""
    total = np.zeros(max(len(c) for _, c in parts), dtype=np.int64)
    for _, counts in parts:
        total[: len(counts)] += counts
    return parts[0][0], total


def percentile_stretch(sample: np.ndarray, qs: tuple[float, float]) -> tuple[float, float]:
    """(low, high) of a percentile stretch of ``sample``; a flat sample gets high = low + 1."""
    return _stretch_bounds(percentiles(sample, qs))


def _stretch_bounds(low_high: np.ndarray) -> tuple[float, float]:
    lo, hi = (float(v) for v in low_high)
    return lo, (hi if hi > lo else lo + 1.0)


class RasterSource:
    """An open scene: georeferencing, band plan, scene-wide scaling, and thread-safe windowed reads."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        channels: int = 1,
        bands: tuple[int, ...] | None = None,
        scale: ScaleConfig = ScaleConfig(),
        fill_value: float = 0.0,
        background_scale: bool = False,
        handles: int = 0,
        pool: ThreadPoolExecutor | None = None,
    ) -> None:
        """``background_scale``: measure the scene-wide stretch while the first tiles decode;
        :attr:`scale` waits for it (and re-raises its error) on first use. With ``pool`` (the reader
        threads' pool) its sample reads are queued there now, one job per sample window, ahead of
        any tile: all the reader threads measure it first, and the first batch, which waits for it,
        comes sooner (on the H200 four threads of its own took 0.12 s of a 32k scene's start, under
        the tile reads' contention). Without a pool it runs in threads of its own.

        ``handles``: dataset handles to open now, one after another, for that many reader threads
        (plus the stretch's threads): opened by many threads at once, rasterio handles take about 20 times
        longer (each open hands the GIL back and forth); these are taken by threads on their first read.
        """
        self.path = Path(path)
        self.name = self.path.name
        if not self.path.exists():
            raise InputError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a directory, not a raster")
        self._local = threading.local()
        self._handles: list[rasterio.DatasetReader] = []
        self._spare: list[rasterio.DatasetReader] = []
        self._lock = threading.Lock()
        ds = self._dataset()
        self.width: int = ds.width
        self.height: int = ds.height
        self.count: int = ds.count
        self.dtype = np.dtype(ds.dtypes[0])
        self.block_shapes = ds.block_shapes
        self.overviews = ds.overviews(1)
        self.crs, self.transform, self.georef = self._georeferencing(ds)
        self.plan = plan_bands(ds.count, tuple(ds.colorinterp), channels, bands, str(self.path), tuple(ds.descriptions))
        self.channels = channels
        self.fill_value = float(fill_value)
        self.nodata = ds.nodata
        flags = [ds.mask_flag_enums[i - 1] for i in self.plan.indexes]
        self.has_mask = any(f != [MaskFlags.all_valid] for f in flags) or self.dtype.kind == "f"
        self._lut = self._palette_lut(ds) if self.plan.combine == "palette" else None
        self._scale: ScaleInfo | None = None
        self._scale_cfg = scale
        self._scale_job: Future[ScaleInfo] | None = None
        self._sample_jobs: list[Future[np.ndarray]] | None = None
        background = background_scale and self._needs_statistics(scale)
        for _ in range(max(0, handles) + (STATS_THREADS if background and pool is None else 0)):
            self._spare.append(self._open())
        if background and pool is not None:
            self._sample_jobs = [pool.submit(self._sample_summary, job) for job in self._sample_plan()]
            self._scale_job = Future()
            self._sampled = 0
            for f in self._sample_jobs:
                f.add_done_callback(self._when_sampled)
        elif background:
            self._scale_pool = ThreadPoolExecutor(1, thread_name_prefix="rs-scale")
            self._scale_job = self._scale_pool.submit(lambda: self._scale_info(scale))
            self._scale_pool.shutdown(wait=False)
        else:
            self._scale = self._scale_info(scale)

    @property
    def scale(self) -> ScaleInfo:
        """The scene-wide scaling (waits for the background measurement, if one is running)."""
        if self._scale is None:
            assert self._scale_job is not None
            self._scale = self._scale_job.result()
        return self._scale

    def _sample_summary(self, job: tuple[int, int, list[tuple[int, int]]]) -> np.ndarray | tuple[int, np.ndarray]:
        """One sample job's valid values, counted where they are 8/16-bit integers (in the job's thread)."""
        values = self._sample_part(job)
        return value_counts(values) or values

    def _when_sampled(self, _: Future[np.ndarray | tuple[int, np.ndarray]]) -> None:
        """A sample job ended: the thread that ends the last one computes the stretch, right away.

        Not the first batch's thread when it asks for it: on the H200 that thread waited about 35 ms
        for the stretch of a 32k scene after its first batch was cut, the GPU idle meanwhile (adding 4
        million values into a histogram, between the reader and cutter threads' turns for the GIL).
        Each job counts its own values now, and the last one adds 64 small histograms.
        """
        assert self._sample_jobs is not None and self._scale_job is not None
        with self._lock:
            self._sampled += 1
            if self._sampled < len(self._sample_jobs):
                return
        try:
            try:
                info = self._scale_from_parts([f.result() for f in self._sample_jobs], self._scale_cfg)
            except BaseException as exc:  # a read error, or the jobs cancelled by close()
                self._scale_job.set_exception(exc)
            else:
                self._scale_job.set_result(info)
        except InvalidStateError:  # close() cancelled the stretch itself first
            pass

    # -- dataset handles ---------------------------------------------------------------------------

    def _open(self) -> rasterio.DatasetReader:
        try:
            with warnings.catch_warnings():
                # a missing geotransform is reported once, in our own words (_georeferencing)
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                ds = rasterio.open(self.path)
        except RasterioIOError as exc:
            raise InputError(f"{self.path}: not a readable raster ({_one_line(exc)})") from None
        except RasterioError as exc:
            raise InputError(f"{self.path}: cannot open ({_one_line(exc)})") from None
        with self._lock:
            self._handles.append(ds)
        return ds

    def _dataset(self) -> rasterio.DatasetReader:
        """This thread's handle: its own, else a spare one opened up front, else a new one."""
        ds = getattr(self._local, "ds", None)
        if ds is None:
            with self._lock:
                ds = self._spare.pop() if self._spare else None
            if ds is None:
                ds = self._open()
            self._local.ds = ds
        return ds

    def close(self) -> None:
        if self._scale is None:  # the stretch's jobs hold dataset handles: let them finish before the handles close
            for job in [self._scale_job, *(self._sample_jobs or [])]:
                if job is not None:
                    job.cancel()
                    try:
                        job.exception()
                    except CancelledError:
                        pass
        with self._lock:
            for ds in self._handles:
                ds.close()
            self._handles.clear()
            self._spare.clear()
        self._local = threading.local()

    def __enter__(self) -> RasterSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- georeferencing ----------------------------------------------------------------------------

    def _georeferencing(self, ds: rasterio.DatasetReader) -> tuple[CRS | None, Affine, str]:
        gcps, gcp_crs = ds.gcps
        if ds.transform.is_identity and gcps:
            from rasterio.transform import from_gcps

            log.warning("%s: georeferenced by %d GCPs only: using their least-squares affine fit", self.name, len(gcps))
            return gcp_crs, from_gcps(gcps), "gcps"
        if ds.crs is None:
            log.warning("%s: no CRS in the file: detections are written in pixel coordinates (x = column, y = row)", self.name)
            return None, ds.transform, "none"
        return ds.crs, ds.transform, "transform"

    # -- scaling -----------------------------------------------------------------------------------

    def _palette_lut(self, ds: rasterio.DatasetReader) -> np.ndarray:
        cmap = ds.colormap(self.plan.indexes[0])
        lut = np.zeros(max(256, max(cmap) + 1), dtype=np.float32)
        for k, (r, g, b, *_rest) in cmap.items():
            lut[k] = 0.299 * r + 0.587 * g + 0.114 * b
        return lut

    def _needs_statistics(self, cfg: ScaleConfig) -> bool:
        """Percentile stretch (asked for, or auto on anything but uint8 and palettes): a sample read."""
        return cfg.method == "percentile" or (cfg.method == "auto" and not (self.dtype == np.uint8 or self.plan.combine == "palette"))

    def _scale_info(self, cfg: ScaleConfig) -> ScaleInfo:
        if cfg.method == "fixed":
            if cfg.low is None or cfg.high is None or not cfg.high > cfg.low:
                raise InputError(f"{self.path}: fixed scaling needs low < high, got {cfg.low}..{cfg.high}")
            return ScaleInfo("fixed", float(cfg.low), float(cfg.high))
        if not self._needs_statistics(cfg):
            return ScaleInfo("divide", 0.0, 255.0)
        return self._scale_from(self._stats_sample(), cfg)

    def _scale_from_parts(self, parts: list[np.ndarray | tuple[int, np.ndarray]], cfg: ScaleConfig) -> ScaleInfo:
        """The stretch from the sample jobs' results: all counts (8/16-bit integers), or all values."""
        counted = [p for p in parts if isinstance(p, tuple)]
        if not counted:
            return self._scale_from(np.concatenate([p for p in parts if not isinstance(p, tuple)]), cfg)
        assert len(counted) == len(parts)
        base, counts = add_counts(counted)
        if not counts.any():
            return ScaleInfo("percentile", 0.0, 1.0, cfg.percentiles)
        return ScaleInfo("percentile", *_stretch_bounds(percentiles_from_counts(base, counts, self.dtype, cfg.percentiles)), cfg.percentiles)

    def _scale_from(self, sample: np.ndarray, cfg: ScaleConfig) -> ScaleInfo:
        if sample.size == 0:
            return ScaleInfo("percentile", 0.0, 1.0, cfg.percentiles)
        return ScaleInfo("percentile", *percentile_stretch(sample, cfg.percentiles), cfg.percentiles)

    def _stats_sample(self) -> np.ndarray:
        """Valid combined-channel values from a decimated read: overviews if any, else sample windows."""
        jobs = self._sample_plan()
        if len(jobs) == 1:
            return self._sample_part(jobs[0])
        with ThreadPoolExecutor(min(len(jobs), os.cpu_count() or 1, STATS_THREADS), thread_name_prefix="rs-stats") as pool:
            return np.concatenate(list(pool.map(self._sample_part, jobs)))

    def _sample_plan(self) -> list[tuple[int, int, list[tuple[int, int]]]]:
        """The stretch's sample reads, as (row_off, height, [(col_off, width), ...]) jobs.

        With overviews, or a scene of at most 2048 pixels, one decimated read of the whole scene (an
        empty window list). Else a grid of sample windows, each snapped inside the block it starts in
        so that it decodes one block, not up to four: a job per window on a tiled file, a job per grid
        row on a striped one (one full-width read decodes its strips once for all of the row's windows).
        """
        if self.overviews or max(self.width, self.height) <= 2048:
            return [(0, self.height, [])]
        bh, bw = self.block_shapes[0]
        size_y, size_x = min(STATS_WINDOW, self.height), min(STATS_WINDOW, self.width)
        striped = self.is_striped

        def starts(length: int, size: int, block: int) -> list[int]:
            out = []
            for g in range(STATS_GRID):
                pos = int((length - size) * (g + 0.5) / STATS_GRID)
                if size <= block < length:  # slide back inside its block, keeping the offset within it
                    pos = min(pos // block * block + min(pos % block, block - size), length - size)
                out.append(pos)
            return sorted(set(out))

        cols = [(x, size_x) for x in starts(self.width, size_x, bw if not striped else self.width)]
        rows = starts(self.height, size_y, bh)
        if striped:
            return [(y, size_y, cols) for y in rows]
        return [(y, size_y, [c]) for y in rows for c in cols]

    def _sample_part(self, job: tuple[int, int, list[tuple[int, int]]]) -> np.ndarray:
        """The valid values of one sample job (in any thread, on that thread's own dataset handle)."""
        y, h, cols = job
        ds = self._dataset()
        try:
            if not cols:  # the decimated whole scene
                f = max(1, max(self.width, self.height) // 1024)
                shape = (len(self.plan.indexes), max(1, self.height // f), max(1, self.width // f))
                return self._valid_values(ds.read(self.plan.indexes, out_shape=shape, resampling=Resampling.nearest, masked=self.has_mask))
            if self.is_striped:
                # the grid row's strips, each decoded once for all of its windows, a few at a time: read
                # whole, a 256-row band of a 32k-wide uint16 scene is 16 MB, and 8 of them at once put
                # 190 MB on the peak of the scene's first second (H200, benchmarks/results/h200_h_*).
                # Each band's windows are taken in one indexing step: every Python step between reads
                # waits for the GIL, which the reader and cutter threads hold most of the time
                row_bytes = self.width * len(self.plan.indexes) * self.dtype.itemsize
                strip = self.block_shapes[0][0]
                step = max(strip, STATS_CHUNK_BYTES // max(row_bytes, 1) // strip * strip)
                columns = np.concatenate([np.arange(x, x + w) for x, w in cols])
                # without a mask, the bands are read into one buffer in a mapping of its own, unmapped
                # when the job ends: from the heap, 8 jobs' 4 MB bands stayed resident in the reader
                # threads' arenas until the next trim, on top of the scene's first slabs
                buf = None if self.has_mask else mapped_array((len(self.plan.indexes), min(step, h), self.width), self.dtype)
                parts = []
                for y0 in range(y, y + h, step):
                    rows = min(step, y + h - y0)
                    band = ds.read(self.plan.indexes, window=Window(0, y0, self.width, rows), masked=self.has_mask,
                                   out=None if buf is None else buf[:, :rows])
                    parts.append(self._valid_values(band[:, :, columns]))
                return np.concatenate(parts)
            return np.concatenate([self._valid_values(ds.read(self.plan.indexes, window=Window(x, y, w, h), masked=self.has_mask)) for x, w in cols])
        except RasterioError as exc:
            raise InputError(f"{self.path}: read failed while measuring the scene's value range ({_one_line(exc)})") from None

    def _valid_values(self, arr: np.ndarray | np.ma.MaskedArray) -> np.ndarray:
        """The valid values of the model's channels, flat: raw integers where the bands pass through
        unchanged (one band, or one replicated), else float32."""
        data = np.ma.getdata(arr)
        if self.plan.combine in ("direct", "replicate") and data.dtype.kind in "ui" and data.shape[0] == 1:
            return data[0][~np.ma.getmaskarray(arr)[0]] if np.ma.is_masked(arr) else data.ravel()
        data = data.astype(np.float32)
        mask = np.ma.getmaskarray(arr).any(axis=0) | ~np.isfinite(data).all(axis=0)
        combined = self._combine(data)
        return combined[:, ~mask].ravel()

    # -- reading -----------------------------------------------------------------------------------

    def _combine(self, data: np.ndarray) -> np.ndarray:
        """Raw bands [B, h, w] -> model channels [C, h, w] (still in raw units)."""
        if self.plan.combine == "direct":
            return data
        if self.plan.combine == "palette":
            assert self._lut is not None
            return self._lut[np.clip(data.astype(np.int64), 0, len(self._lut) - 1)]
        if self.plan.combine == "luminance":
            return np.tensordot(LUMA, data, axes=1)[None].astype(np.float32)
        return np.repeat(data, self.channels, axis=0)

    @property
    def lut(self) -> np.ndarray | None:
        """Palette index -> luminance, for a paletted band (else None)."""
        return self._lut

    @property
    def is_striped(self) -> bool:
        """Blocks span the full width (strips): a window read decodes whole rows, so slabs are whole strips."""
        block_h, block_w = self.block_shapes[0]
        return block_w >= self.width and self.width > 1

    def read_raw(self, window: Window, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw bands [B, h, w] in the file's dtype, and the valid-pixel mask [h, w] (None: all valid).

        Scaling happens later, on the engine's device (see :mod:`rs_detect.preprocess`), so the reader
        only decodes: the cheapest work per pixel that the CPU has to do. ``out``, when it is a
        [B, h, w] array of the file's dtype (a view into a slab or a batch slot; GDAL writes through its
        strides), receives the pixels directly: no temporary tile, no second copy.
        """
        ds = self._dataset()
        shape = (len(self.plan.indexes), int(window.height), int(window.width))
        if out is not None and not (out.shape == shape and out.dtype == self.dtype):
            out = None
        try:
            raw = ds.read(self.plan.indexes, window=window, out=out)
            valid = None
            if self.has_mask:
                valid = ds.read_masks(self.plan.indexes[0], window=window) != 0
                if self.dtype.kind == "f":
                    valid &= np.isfinite(raw).all(axis=0)
        except RasterioError as exc:
            raise InputError(
                f"{self.path}: read failed at window col={int(window.col_off)} row={int(window.row_off)} "
                f"({_one_line(exc)})"
            ) from None
        return raw, valid

    def read_preview(self, max_size: int = 2048) -> tuple[np.ndarray, float]:
        """A decimated, scaled [C, h, w] view of the whole scene and its decimation factor."""
        ds = self._dataset()
        f = max(1.0, max(self.width, self.height) / max_size)
        shape = (len(self.plan.indexes), max(1, int(self.height / f)), max(1, int(self.width / f)))
        arr = ds.read(self.plan.indexes, out_shape=shape, resampling=Resampling.average)
        data = self._combine(arr.astype(np.float32))
        s = self.scale
        return np.clip((data - s.low) / (s.high - s.low), 0, 1), f
