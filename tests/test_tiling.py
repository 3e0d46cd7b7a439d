"""Property tests of the window grid: full coverage, inside the scene, overlap at least as asked."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rs_detect.errors import ConfigError
from rs_detect.io.tiling import axis_starts, grid_shape, iter_tiles, tile_count

sizes = st.integers(min_value=32, max_value=2048)


@st.composite
def grids(draw: st.DrawFn) -> tuple[int, int, int, int]:
    size = draw(sizes)
    overlap = draw(st.integers(min_value=0, max_value=size - 1))
    width = draw(st.integers(min_value=1, max_value=60_000))
    height = draw(st.integers(min_value=1, max_value=60_000))
    return width, height, size, overlap


@given(st.integers(min_value=1, max_value=200_000), sizes, st.data())
@settings(max_examples=300, deadline=None)
def test_axis_covers_every_pixel_inside_with_overlap(length: int, size: int, data: st.DataObject) -> None:
    overlap = data.draw(st.integers(min_value=0, max_value=size - 1))
    starts = axis_starts(length, size, overlap)
    span = min(size, length)
    assert starts[0] == 0
    assert starts[-1] + span == length  # the last window snaps to the edge
    assert all(0 <= s and s + span <= length for s in starts)  # never outside
    assert starts == sorted(set(starts))
    for a, b in zip(starts, starts[1:]):
        assert a + span >= b + overlap  # overlap at least the requested one (so no gaps either)


@given(grids())
@settings(max_examples=60, deadline=None)
def test_tiles_cover_scene_row_by_row(grid: tuple[int, int, int, int]) -> None:
    width, height, size, overlap = grid
    rows, cols = grid_shape(width, height, size, overlap)
    if rows * cols > 5000:
        return  # the axis test covers huge scenes; here we check the 2-D grid itself
    tiles = list(iter_tiles(width, height, size, overlap))
    assert len(tiles) == tile_count(width, height, size, overlap) == rows * cols
    assert [t.index for t in tiles] == list(range(len(tiles)))
    assert [(t.row, t.col) for t in tiles] == [(r, c) for r in range(rows) for c in range(cols)]  # row by row
    covered_x = np.zeros(width, dtype=bool)
    covered_y = np.zeros(height, dtype=bool)
    for t in tiles:
        assert t.col_off >= 0 and t.row_off >= 0
        assert t.col_off + t.width <= width and t.row_off + t.height <= height
        assert t.width == min(size, width) and t.height == min(size, height)
        covered_x[t.col_off : t.col_off + t.width] = True
        covered_y[t.row_off : t.row_off + t.height] = True
        left, top, right, bottom = t.interior
        assert left == (t.col > 0) and top == (t.row > 0)
        assert right == (t.col < cols - 1) and bottom == (t.row < rows - 1)
    assert covered_x.all() and covered_y.all()


def test_tiny_scene_is_one_padded_window() -> None:
    (tile,) = list(iter_tiles(300, 200, 1024, 192))
    assert (tile.width, tile.height) == (300, 200)
    assert tile.interior == (False, False, False, False)


def test_huge_scene_counts() -> None:
    # 50k x 50k at 1024/192: stride 832 -> ceil((50000 - 1024) / 832) = 59 starts + the snapped last one
    assert grid_shape(50_000, 50_000, 1024, 192) == (60, 60)


def test_tile_transform_is_window_transform() -> None:
    from affine import Affine

    t = Affine(0.5, 0, 500000, 0, -0.5, 4500000)
    tiles = list(iter_tiles(2000, 2000, 1024, 192, t))
    tile = tiles[1]
    assert tile.transform @ (0, 0) == t @ (tile.col_off, tile.row_off)


@pytest.mark.parametrize("args", [(0, 1024, 0), (100, 0, 0), (100, 64, 64), (100, 64, -1)])
def test_bad_arguments_raise_config_error(args: tuple[int, int, int]) -> None:
    with pytest.raises(ConfigError):
        axis_starts(*args)
