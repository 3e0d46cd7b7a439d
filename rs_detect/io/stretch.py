"""The scene-wide percentile stretch, exactly as ``np.percentile`` (linear) computes it, from counts.

A sample of a scene holds millions of values, and the first batch waits for the stretch: counting
8/16-bit integers (``np.bincount``) takes a quarter of the time of the partial sort ``np.percentile``
does, and counts of several samples add up index by index, so each sample read can count its own.
"""

from __future__ import annotations

import numpy as np


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


def add_summaries(parts: list[np.ndarray | tuple[int, np.ndarray]]) -> np.ndarray | tuple[int, np.ndarray]:
    """Sample summaries of one scene as one: counts (:func:`value_counts`) added up, or the values
    themselves put together (percentiles do not depend on their order)."""
    counted = [p for p in parts if isinstance(p, tuple)]
    if not counted:
        return np.concatenate(parts)  # type: ignore[arg-type]
    assert len(counted) == len(parts)
    return add_counts(counted)


def percentile_stretch(sample: np.ndarray, qs: tuple[float, float]) -> tuple[float, float]:
    """(low, high) of a percentile stretch of ``sample``; a flat sample gets high = low + 1."""
    return stretch_bounds(percentiles(sample, qs))


def stretch_bounds(low_high: np.ndarray) -> tuple[float, float]:
    lo, hi = (float(v) for v in low_high)
    return lo, (hi if hi > lo else lo + 1.0)
