"""Warnings that must not flood the log: failed tasks (a rate-limited WARNING per failed task, in
the driver's process), and whatever a sender can repeat at will (:class:`Throttle`: the monitor's
bad reports, the brokers' refused handshakes)."""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

__all__ = ["FailureLog", "Throttle"]

logger = logging.getLogger("zdq.tasks")

#: The first failures are logged in full, with their remote traceback...
_IN_FULL = 5
#: ...then as a count, at most this often.
_EVERY = 10.0


class FailureLog:
    """Logs failed tasks where the user looks: the first ones in full, then a count every few
    seconds (a million failing tasks must not flood the log, nor slow the driver's I/O thread).
    Owned by the driver's I/O thread."""

    def __init__(self, pool: str) -> None:
        self._pool = pool
        self._logged = 0
        self._unlogged = 0
        self._last: str = ""
        self._since = 0.0

    def note(self, base: int, errors: dict[int, Any]) -> None:
        """Failures of tasks ``base + i`` for each ``i`` in ``errors`` (their ErrorInfo)."""
        for i, info in errors.items():
            what = f"{getattr(info, 'type_name', type(info).__name__)}: {getattr(info, 'message', info)}"
            if self._logged < _IN_FULL:
                self._logged += 1
                logger.warning(
                    "pool %s: task %d failed: %s%s%s",
                    self._pool,
                    base + i,
                    what,
                    "\n" if getattr(info, "traceback", "") else "",
                    getattr(info, "traceback", "").rstrip(),
                )
                if self._logged == _IN_FULL:
                    logger.warning("pool %s: further task failures are counted every %.0f s", self._pool, _EVERY)
                    self._since = time.monotonic()
            else:
                self._unlogged += 1
                self._last = what
        if self._unlogged and time.monotonic() - self._since >= _EVERY:
            self.flush()

    def flush(self) -> None:
        if self._unlogged:
            logger.warning(
                "pool %s: %d more %s failed in the last %.1f s (the last: %s)",
                self._pool,
                self._unlogged,
                "task" if self._unlogged == 1 else "tasks",
                time.monotonic() - self._since,
                self._last,
            )
            self._unlogged = 0
        self._since = time.monotonic()


class Throttle:
    """Which senders' warnings to log now: one per sender every ``every`` seconds at most, and at
    most ``kept`` senders remembered, so at most ``kept`` lines every ``every`` seconds however many
    senders there are. A warning anyone can trigger at will (a forged report, a handshake with a
    wrong key) must not let them grow the log without bound; what it warns of is counted elsewhere.

    Not thread-safe: each throttle has one caller (the scheduler's event loop, a ZAP thread).

    >>> t = Throttle(60.0)
    >>> t.due("10.0.0.7", 0.0), t.due("10.0.0.7", 30.0), t.due("10.0.0.7", 61.0)
    (True, False, True)
    """

    def __init__(self, every: float, kept: int = 1024) -> None:
        self.every = every
        self._kept = kept
        # sender -> when its last warning was logged, oldest first (a sender logged again moves
        # to the end), so the expired ones are dropped from the front, each once.
        self._logged: collections.OrderedDict[str, float] = collections.OrderedDict()

    def due(self, sender: str, now: float) -> bool:
        """Whether to log ``sender``'s warning at ``now`` (monotonic seconds); True notes it logged."""
        logged = self._logged
        last = logged.get(sender)
        if last is not None and now - last < self.every:
            return False
        while logged and now - next(iter(logged.values())) >= self.every:
            logged.popitem(last=False)
        if len(logged) >= self._kept:
            # Every sender remembered was logged within ``every``: forgetting one would let a
            # flood from many addresses log a line per attempt again.
            return False
        logged.pop(sender, None)
        logged[sender] = now
        return True
