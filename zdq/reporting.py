"""Failures are never silent: a rate-limited WARNING per failed task, in the driver's process."""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["FailureLog"]

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
                "pool %s: %d more tasks failed in the last %.1f s (the last: %s)",
                self._pool,
                self._unlogged,
                time.monotonic() - self._since,
                self._last,
            )
            self._unlogged = 0
        self._since = time.monotonic()
