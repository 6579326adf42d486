"""When, in what order and under which limits a task is served: what its broker must know of it.

A submission's ``delay=``, ``eta=``, ``priority=`` and ``expires=`` are checked here, at the call,
and become one small :class:`Timing` shared by every chunk of the submission; a rate limit's bucket
and a unique task's key join it the same way. It travels in each PUT (the release time and priority
in the head, the rest in a third frame only when set: not in the pickled chunk, which the broker
never unpickles) and the broker keeps it in the chunk's :class:`~zdq.storage.base.ChunkMeta`,
stored with the chunk on a durable queue.

Clock: a ``delay`` is turned into a wall-clock time (``time.time()``) here, in the submitting
process, when the call is made; ``eta`` is one already. The broker compares it with its own wall
clock. So the time a task waits in the driver's buffers (a full window) counts toward its delay, a
chunk resent to a queue placed again keeps its time, and a durable queue releases it at the same
time after a restart. The price: a broker's clock that is ``s`` seconds ahead of the submitter's
releases ``s`` seconds early (behind: late); hosts are expected to keep their clocks in step (NTP).

>>> t = timing_of(None, None, 5)
>>> t.priority, t.not_before
(5, 0.0)
>>> timing_of(None, None, None) is None
True
"""

from __future__ import annotations

import datetime
import math
import numbers
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_PRIORITY", "MIN_PRIORITY", "Timing", "expiry_of", "timing_of"]

#: Priorities travel as signed 32-bit integers.
MIN_PRIORITY, MAX_PRIORITY = -(2**31), 2**31 - 1
#: The last release time taken: the end of the year 9999 (what a datetime can say).
_LATEST = 253402300799.0
#: An expiry already past is kept as a positive time (0.0 means "never expires").
_EARLIEST = 1e-6


@dataclass(frozen=True, slots=True)
class Timing:
    """The release time and priority of a submission's chunks.

    Attributes
    ----------
    not_before : float
        Wall-clock seconds (``time.time()``) before which no task of the chunk starts; ``0.0``:
        at once.
    priority : int
        Higher is served first within a queue; equal priorities are first in, first out.
    expires : float
        Wall-clock seconds after which no task of the chunk starts (it fails with
        :class:`~zdq.errors.TaskExpired`); ``0.0``: never.
    rate_key : bytes
        The rate-limit bucket the chunk's starts are counted in (a per-call limit's: its
        function's name); ``b""``: the queue's own limit, if any.
    rate : float
        That bucket's limit in tasks per second, as the submitter gave it; ``0.0``: none given.
    unique_key : bytes
        A unique task's key: while a task with it is queued or running in the pool, another is not
        queued; ``b""``: not unique.
    unique_for : float
        Seconds the unique key stays taken after the submission even once the task ended; ``0.0``:
        only while queued or running.
    """

    not_before: float = 0.0
    priority: int = 0
    expires: float = 0.0
    rate_key: bytes = b""
    rate: float = 0.0
    unique_key: bytes = b""
    unique_for: float = 0.0

    @property
    def tagged(self) -> bool:
        """Whether it holds more than a release time and a priority (a PUT's third frame)."""
        return bool(self.expires or self.rate_key or self.rate or self.unique_key or self.unique_for)


def timing_of(delay: Any, eta: Any, priority: Any, expires: Any = None) -> Timing | None:
    """The :class:`Timing` of a call's keywords, or ``None`` when none was given (the plain path).

    ``expires`` is seconds from now (a number or ``timedelta``) or a timezone-aware ``datetime``.

    Raises
    ------
    TypeError
        ``delay`` is not a number (or ``timedelta``), ``eta`` not a ``datetime``, ``priority`` not
        an integer, ``expires`` none of its three forms.
    ValueError
        ``delay`` is negative or not finite, ``eta`` has no timezone, both are given, or
        ``priority`` is out of the 32-bit range, ``expires`` is negative or not finite, comes
        before the release time, or is a naive datetime.
    """
    if delay is None and eta is None and priority is None and expires is None:
        return None
    not_before = 0.0
    if delay is not None:
        if eta is not None:
            raise ValueError("give delay or eta, not both")
        not_before = time.time() + _seconds(delay)
    elif eta is not None:
        # A time already past (before 1970 included: the wire takes no negative time) is "at once".
        not_before = max(_wall_clock(eta), 0.0)
    if not_before > _LATEST:
        raise ValueError(
            f"{'delay' if delay is not None else 'eta'} is past the year 9999 ({delay if delay is not None else eta!r:.80}): "
            "a task that never runs is not a delayed task"
        )
    if priority is None:
        priority = 0
    elif isinstance(priority, numbers.Integral) and not isinstance(priority, bool):
        priority = int(priority)  # numpy's integers too
    else:
        raise TypeError(f"priority must be an integer, got {priority!r:.80}")
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority must fit in 32 bits ({MIN_PRIORITY} to {MAX_PRIORITY}), got {priority}")
    expiry = 0.0 if expires is None else expiry_of(expires)
    if expiry and not_before and expiry <= not_before:
        raise ValueError("expires comes before the task's release time (delay or eta): it could never run")
    if not not_before and not priority and not expiry:
        return None  # priority=0 alone: the plain path
    return Timing(not_before, priority, expiry)


def expiry_of(expires: Any) -> float:
    """The wall-clock time (``time.time()``) of an ``expires=``: seconds from now (a number or
    ``timedelta``) or a timezone-aware ``datetime``.

    Raises
    ------
    TypeError, ValueError
        As :func:`timing_of` says of ``expires``.
    """
    if isinstance(expires, datetime.datetime):
        at = _wall_clock(expires, "expires")
    elif isinstance(expires, datetime.timedelta) or (isinstance(expires, numbers.Real) and not isinstance(expires, bool)):
        at = time.time() + _seconds(expires, "expires")
    else:
        raise TypeError(f"expires must be seconds (a number or timedelta) or a timezone-aware datetime, got {expires!r:.80}")
    if at > _LATEST:
        raise ValueError(f"expires is past the year 9999 ({expires!r:.80}): leave it out for a task that never expires")
    return max(at, _EARLIEST)


def _seconds(delay: Any, what: str = "delay") -> float:
    if isinstance(delay, datetime.timedelta):
        seconds = delay.total_seconds()
    elif isinstance(delay, numbers.Real) and not isinstance(delay, bool):
        seconds = float(delay)
    else:
        raise TypeError(f"{what} must be a number of seconds (or a timedelta), got {delay!r:.80}")
    if not 0 <= seconds < math.inf:
        raise ValueError(f"{what} must be a non-negative, finite number of seconds, got {delay!r}")
    return seconds


def _wall_clock(eta: Any, what: str = "eta") -> float:
    if not isinstance(eta, datetime.datetime):
        raise TypeError(f"{what} must be a timezone-aware datetime, got {eta!r:.80}")
    if eta.tzinfo is None or eta.utcoffset() is None:
        raise ValueError(
            f"{what} must be timezone-aware (a naive datetime's time is ambiguous across hosts), got {eta!r}: "
            "use e.g. datetime.now(timezone.utc) + timedelta(...)"
        )
    return eta.timestamp()
