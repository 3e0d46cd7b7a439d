"""Pure functions that cut a width x height raster into model-sized windows.

Windows are visited row by row. Along each axis the start positions step by ``size - overlap`` and
the last one snaps inward (SAHI's habit) so it ends exactly at the scene edge: every pixel is covered,
no window leaves the raster, and neighbouring windows overlap by at least ``overlap``. An axis
shorter than ``size`` gets one window of the whole axis (the tile is padded when read).
"""

from __future__ import annotations

from collections.abc import Iterator

from affine import Affine
from rasterio.windows import Window

from rs_detect.errors import ConfigError
from rs_detect.types import Tile


def axis_starts(length: int, size: int, overlap: int) -> list[int]:
    """Start offsets along one axis of ``length`` pixels for windows of ``size`` with ``overlap``."""
    if length <= 0:
        raise ConfigError(f"raster axis length must be positive, got {length}")
    if size <= 0:
        raise ConfigError(f"tile size must be positive, got {size}")
    if not 0 <= overlap < size:
        raise ConfigError(f"overlap must be in [0, tile size), got {overlap} for tile size {size}")
    if length <= size:
        return [0]
    stride = size - overlap
    starts = list(range(0, length - size, stride))
    starts.append(length - size)  # snap the last window inward
    return starts


def grid_shape(width: int, height: int, size: int, overlap: int) -> tuple[int, int]:
    """(rows, cols) of the window grid."""
    return len(axis_starts(height, size, overlap)), len(axis_starts(width, size, overlap))


def tile_count(width: int, height: int, size: int, overlap: int) -> int:
    rows, cols = grid_shape(width, height, size, overlap)
    return rows * cols


def iter_tiles(width: int, height: int, size: int, overlap: int, transform: Affine = Affine.identity()) -> Iterator[Tile]:
    """Tiles row by row; each carries its window, its own affine transform and which edges are interior."""
    xs = axis_starts(width, size, overlap)
    ys = axis_starts(height, size, overlap)
    index = 0
    for r, y in enumerate(ys):
        h = min(size, height - y)
        for c, x in enumerate(xs):
            w = min(size, width - x)
            window = Window(x, y, w, h)
            interior = (c > 0, r > 0, c < len(xs) - 1, r < len(ys) - 1)
            yield Tile(index=index, row=r, col=c, window=window, transform=transform @ Affine.translation(x, y), interior=interior)
            index += 1
