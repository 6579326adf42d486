"""Small pure pieces of the monitor: monotonic totals over a source's incarnations, windowed rates.

A broker or consumer whose worker is lost is replaced by one whose counters start at 0. Prometheus
takes any decrease of a counter for a reset (and ``rate()`` then over-counts), and the pool's totals
would forget what the lost one did. :class:`Tally` keeps, per series, an offset that grows by the
last value seen of each incarnation that ended: the total it gives never goes down.

>>> t = Tally()
>>> t.update("a", {"done": 5}), t.update("b", {"done": 2})
({'done': 5.0}, {'done': 7.0})
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["Tally", "RATE_WINDOW", "STEP_WINDOW", "add_into", "step_rate", "windowed_rate"]

#: Rates are taken over this many seconds of reports: counters move once per chunk and reports
#: come once a second, so a rate between two consecutive samples swings between 0 and twice the
#: real one.
RATE_WINDOW = 5.0


#: A consumer's counters move in steps (a batch of chunks at a time, a few seconds apart): its rate
#: is taken between the steps seen over this many seconds.
STEP_WINDOW = 10.0


class Tally:
    """Monotonic totals of one source's counters, across its incarnations."""

    __slots__ = ("incarnation", "last", "offsets")

    def __init__(self) -> None:
        self.incarnation: str | None = None
        self.last: dict[str, float] = {}
        self.offsets: dict[str, float] = {}

    def update(self, incarnation: str, raw: Mapping[str, float]) -> dict[str, float]:
        """Take the raw counters of ``incarnation``; return the totals. A new incarnation, or any
        counter that went down (a restart the sender did not tell), ends the previous one."""
        if self.incarnation is not None and (
            incarnation != self.incarnation or any(v < self.last.get(k, 0) for k, v in raw.items())
        ):
            for k, v in self.last.items():
                self.offsets[k] = self.offsets.get(k, 0) + v
        self.incarnation = incarnation
        self.last = dict(raw)
        return self.totals()

    def totals(self) -> dict[str, float]:
        keys = self.last.keys() | self.offsets.keys()
        return {k: self.offsets.get(k, 0) + self.last.get(k, 0) for k in keys}


def add_into(acc: dict[str, float], values: Mapping[str, float]) -> None:
    for k, v in values.items():
        acc[k] = acc.get(k, 0) + v


def windowed_rate(samples: Iterable[tuple[float, float]], window: float = RATE_WINDOW) -> float:
    """Per-second rate of a growing value over the last ``window`` seconds of ``(time, value)``
    samples (oldest first); 0 with fewer than two samples in the window."""
    kept = list(samples)
    if len(kept) < 2:
        return 0.0
    t1, v1 = kept[-1]
    first = next((s for s in kept if s[0] >= t1 - window), kept[-1])
    t0, v0 = first
    return max(0.0, (v1 - v0) / (t1 - t0)) if t1 > t0 else 0.0


def step_rate(samples: Iterable[tuple[float, float]], window: float = STEP_WINDOW) -> float:
    """Per-second rate of a value that grows in steps, from ``(time, value)`` samples (oldest
    first) over the last ``window`` seconds: between the first and the last step seen, so that a
    window holding 2 steps or 3 of a steady flow gives the same rate. Once the last step is older
    than the usual gap between steps (the flow slowed or stopped), the time since it counts too,
    and the rate falls to 0 as the steps leave the window.
    """
    kept = list(samples)
    if len(kept) < 2:
        return 0.0
    now = kept[-1][0]
    kept = [s for s in kept if s[0] >= now - window] or kept[-1:]
    steps = [b for a, b in zip(kept, kept[1:]) if b[1] != a[1]]
    if not steps:
        return 0.0
    if len(steps) == 1:
        return windowed_rate(kept, window)
    (t0, v0), (t1, v1) = steps[0], steps[-1]
    gap = (t1 - t0) / (len(steps) - 1)
    end = t1 if now - t1 <= gap else now
    return max(0.0, (v1 - v0) / (end - t0)) if end > t0 else 0.0
