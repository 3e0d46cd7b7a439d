"""How many fault-injection cases ran and how often each (printed at the end of pytest's run)."""

from __future__ import annotations

from collections import Counter

COUNTS: Counter[str] = Counter()


def record(case: str, times: int = 1) -> None:
    COUNTS[case] += times
