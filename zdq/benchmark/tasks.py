"""The tasks the benchmarks run: importable by every worker because zdq is installed there."""

from __future__ import annotations

import time
from typing import Any


def noop(x: Any = None) -> Any:
    """Returns its argument: measures the queue, not the work."""
    return x


def sleep_ms(ms: float) -> float:
    """I/O-bound work: releases the GIL while it waits."""
    time.sleep(ms / 1000)
    return ms


def spin(n: int = 20_000) -> int:
    """CPU-bound work (about a millisecond of pure Python)."""
    total = 0
    for i in range(n):
        total += i * i
    return total


def now(x: Any = None) -> float:
    """When the task started (wall clock): release lateness is this minus its release time."""
    return time.time()
