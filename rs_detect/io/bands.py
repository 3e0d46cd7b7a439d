"""Which raster bands feed which model channels.

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
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
from rasterio.enums import ColorInterp

from rs_detect.errors import InputError

log = logging.getLogger("rs_detect.io.reader")

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

Combine = Literal["direct", "luminance", "replicate", "palette"]


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
