"""RasterSource: owns the open scene, maps its bands to the model's channels, scales pixels to [0, 1].

Band mapping: :mod:`rs_detect.io.bands`. Scaling: uint8 divides by 255. Other types use one
scene-wide percentile stretch (2-98 % by default, :mod:`rs_detect.io.stretch`) measured on a
decimated read (overviews when present, else a grid of sample windows), so every tile sees the same
scaling; ``scale: {method: fixed, low, high}`` sets it by hand. Nodata pixels are filled with a
constant after scaling.

Reads are windowed and thread safe: each thread gets its own dataset handle (rasterio handles must
not be shared across threads, and GDAL releases the GIL while decoding). This module starts no
thread: the threads that read through a source belong to :class:`rs_detect.executor.SceneExecutor`,
which finishes them all before the source closes.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.windows import Window

from rs_detect.errors import InputError
from rs_detect.errors import one_line as _one_line
from rs_detect.gdal_messages import route_this_thread
from rs_detect.io.location import scene_path
from rs_detect.io.bands import LUMA, BandPlan, Combine, plan_bands
from rs_detect.io.stretch import add_counts, add_summaries, percentile_stretch, percentiles, percentiles_from_counts, stretch_bounds, value_counts
from rs_detect.memory import mapped_array
from rs_detect.types import ScaleConfig, ScaleInfo

__all__ = ["LUMA", "BandPlan", "Combine", "RasterSource", "ScaleConfig", "add_counts", "gdal_message", "percentile_stretch",
           "percentiles", "percentiles_from_counts", "plan_bands", "value_counts"]

log = logging.getLogger(__name__)

STATS_GRID = 8  # sample windows per axis for the percentile stretch
STATS_WINDOW = 256
STATS_CHUNK_BYTES = 4 << 20  # striped files: a grid row's full-width band is read in whole strips of about this size


class RasterSource:
    """An open scene: georeferencing, band plan, scene-wide scaling, and thread-safe windowed reads."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        channels: int = 1,
        bands: tuple[int, ...] | None = None,
        scale: ScaleConfig = ScaleConfig(),
        fill_value: float = 0.0,
        handles: int = 0,
    ) -> None:
        """``handles``: dataset handles to open now for that many reader threads (:meth:`open_handles`);
        a caller that learns only later whether its threads read through GDAL opens them then.

        Nothing here starts a thread. The stretch (:attr:`scale`) is measured on first use, in the
        calling thread; a caller with reader threads runs the :meth:`sample_plan` jobs there instead
        (:func:`rs_detect.executor.measure_scale`). Close the source only once every thread that reads
        through it has finished (the executor's shutdown order).
        """
        self.path = scene_path(path)  # a URL or /vsi path stays as written (Path would fold its "//")
        self.name = self.path.name
        if not self.path.exists():
            raise InputError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a directory, not a raster")
        route_this_thread()  # a thread that opens a scene (e.g. a Dask worker's) never waits on GDAL's global handler mutex
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
        self.scale_config = scale
        self._scale: ScaleInfo | None = None
        self.open_handles(handles)

    @property
    def scale(self) -> ScaleInfo:
        """The scene-wide scaling, measured in this thread on first use (sequential sample reads)."""
        if self._scale is None:
            self._scale = self.scale_info()
        return self._scale

    # -- dataset handles ---------------------------------------------------------------------------

    def _open(self) -> rasterio.DatasetReader:
        try:
            with warnings.catch_warnings():
                # a missing geotransform is reported once, in our own words (_georeferencing)
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                ds = rasterio.open(self.path)
        except RasterioIOError as exc:
            raise InputError(f"{self.path}: not a readable raster ({gdal_message(exc)})") from None
        except RasterioError as exc:
            raise InputError(f"{self.path}: cannot open ({gdal_message(exc)})") from None
        with self._lock:
            self._handles.append(ds)
        return ds

    def open_handles(self, n: int) -> None:
        """Open ``n`` more dataset handles now, one after another, for that many reader threads to take
        on their first read: opened by many threads at once, rasterio handles take about 20 times
        longer (each open hands the GIL back and forth). About 1 ms each on a big tiled file, so the
        block reader, whose threads never read through GDAL, opens none."""
        for _ in range(max(0, n)):
            ds = self._open()
            with self._lock:
                self._spare.append(ds)

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
        """Close every handle (only once no thread reads through this source any more)."""
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

    def needs_statistics(self, cfg: ScaleConfig | None = None) -> bool:
        """Percentile stretch (asked for, or auto on anything but uint8 and palettes): a sample read."""
        cfg = cfg or self.scale_config
        return cfg.method == "percentile" or (cfg.method == "auto" and not (self.dtype == np.uint8 or self.plan.combine == "palette"))

    def scale_info(self, parts: list[np.ndarray | tuple[int, np.ndarray]] | None = None) -> ScaleInfo:
        """The scaling :attr:`scale_config` asks for. A stretch comes from ``parts`` (the
        :meth:`sample_summary` of every :meth:`sample_plan` job) when given, else from sample reads
        made now, in this thread, one after another."""
        cfg = self.scale_config
        if cfg.method == "fixed":
            if cfg.low is None or cfg.high is None or not cfg.high > cfg.low:
                raise InputError(f"{self.path}: fixed scaling needs low < high, got {cfg.low}..{cfg.high}")
            return ScaleInfo("fixed", float(cfg.low), float(cfg.high))
        if not self.needs_statistics(cfg):
            return ScaleInfo("divide", 0.0, 255.0)
        if parts is None:
            parts = [self.sample_summary(job) for job in self.sample_plan()]
        total = add_summaries(parts)
        if not isinstance(total, tuple):
            if total.size == 0:
                return ScaleInfo("percentile", 0.0, 1.0, cfg.percentiles)
            return ScaleInfo("percentile", *percentile_stretch(total, cfg.percentiles), cfg.percentiles)
        base, counts = total
        if not counts.any():
            return ScaleInfo("percentile", 0.0, 1.0, cfg.percentiles)
        return ScaleInfo("percentile", *stretch_bounds(percentiles_from_counts(base, counts, self.dtype, cfg.percentiles)), cfg.percentiles)

    def sample_summary(self, job: tuple[int, int, list[tuple[int, int]]]) -> np.ndarray | tuple[int, np.ndarray]:
        """One sample job's valid values, counted where they are 8/16-bit integers (any thread)."""
        return self._summary(self._sample_part(job))

    def summarize(self, arr: np.ndarray | np.ma.MaskedArray) -> np.ndarray | tuple[int, np.ndarray]:
        """A sample window read some other way (raw bands [B, h, w] of the plan, in the file's dtype)
        summarised as :meth:`sample_summary` summarises its own reads: the block reader reads its
        sample from the blocks, and its stretch must be the one GDAL's sample gives."""
        return self._summary(self._valid_values(arr))

    @staticmethod
    def _summary(values: np.ndarray) -> np.ndarray | tuple[int, np.ndarray]:
        return value_counts(values) or values

    def sample_plan(self) -> list[tuple[int, int, list[tuple[int, int]]]]:
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
                # whole, a 256-row band of a 32k-wide uint16 scene is 16 MB, and 8 of them at once would
                # add over 100 MB to the peak of the scene's first second. Each band's windows are taken
                # in one indexing step: every Python step between reads waits for the GIL
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
            raise InputError(f"{self.path}: read failed while measuring the scene's value range ({gdal_message(exc)})") from None

    def _valid_values(self, arr: np.ndarray | np.ma.MaskedArray) -> np.ndarray:
        """The valid values of the model's channels, flat: raw integers where the bands pass through
        unchanged (one band, or one replicated), else float32."""
        # a plain array (every read of a file without nodata or mask) leaves numpy.ma alone: its first use
        # imports it (about 12 ms), under the import lock, while every reader thread waits at that line
        masked = type(arr) is not np.ndarray
        data = np.ma.getdata(arr) if masked else arr
        invalid = np.ma.getmaskarray(arr) if masked else None
        if self.plan.combine in ("direct", "replicate") and data.dtype.kind in "ui" and data.shape[0] == 1:
            return data[0][~invalid[0]] if invalid is not None and invalid.any() else data.ravel()
        data = data.astype(np.float32)
        mask = ~np.isfinite(data).all(axis=0)
        if invalid is not None:
            mask |= invalid.any(axis=0)
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
                f"({gdal_message(exc)})"
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


def gdal_message(exc: BaseException) -> str:
    """``exc`` in one line, with GDAL's own reason where rasterio only says "See previous exception"
    (rasterio chains GDAL's error as the cause: e.g. "IReadBlock failed at X offset 0, Y offset 2")."""
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc and "previous exception" in str(exc):
        return _one_line(cause)
    return _one_line(exc)
