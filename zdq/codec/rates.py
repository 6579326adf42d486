"""Rate limits as users write them: ``"100/s"``, ``"6000/m"``, ``"10/h"`` or tasks per second.

A limit is checked here, at the call that gives it (``QueuePool(rate_limit=)``, ``submit(...,
rate_limit=)``, ``set_rate_limit``, ``zdq rate-limit``), and travels as a float of tasks per
second; ``None`` (or ``0``) means no limit. These are Celery's forms (``"100/m"``, a bare number
is per second).

A pool's limit is its total: each of its ``n`` queues' brokers enforces ``limit / n``
(:func:`share`), and so does each queue for a per-call limit. A rate-limited submission is cut into
chunks of at most :func:`chunk_cap` tasks, so that the starts it allows are smooth (a broker lets
a chunk's first :func:`burst` tasks start together, and its consumer spaces the others).

>>> rate_of("100/s"), rate_of("6000/m"), rate_of("36/h"), rate_of(2.5), rate_of(None)
(100.0, 100.0, 0.01, 2.5, None)
>>> chunk_cap(200.0), chunk_cap(5.0)
(10, 1)

A limit is between :data:`MIN_RATE` and :data:`MAX_RATE` tasks per second (a limit outside is a
mistake: one task in eleven days, or none at all), and a key is a function's ``module:qualname``
of at most :data:`MAX_KEY` bytes: others are refused at the call.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

__all__ = ["BURST_SECONDS", "MAX_KEY", "MAX_RATE", "MIN_RATE", "burst", "chunk_cap", "format_rate", "limited_chunk_size", "rate_fault", "rate_key_of", "rate_of", "share"]

_PER = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}
#: A rate-limited chunk holds at most this many seconds of its rate (at least one task).
SMOOTH_SECONDS = 0.05
#: A rate limit's bucket holds at most this many seconds of its rate (at least one task): two of
#: the chunks the client cuts for it, so that a broker's round that wakes a little late loses
#: nothing (the tokens go on filling past one chunk), while a minute's starts stay within 0.2 % of
#: the limit.
BURST_SECONDS = 2 * SMOOTH_SECONDS
#: The slowest and fastest limits accepted, tasks per second (one task in about eleven days; a
#: billion a second, far beyond what a queue starts): others are refused as mistakes.
MIN_RATE, MAX_RATE = 1e-6, 1e9
#: The longest key of a per-function limit, in bytes (the wire's, ``zdq.transport.protocol.MAX_KEY``).
MAX_KEY = 1024


def rate_of(rate: Any, what: str = "rate_limit") -> float | None:
    """Tasks per second of a limit written ``"N/s"``, ``"N/m"``, ``"N/h"`` or as a number of tasks
    per second; ``None`` (or ``0``) for no limit.

    Raises
    ------
    TypeError
        Not a string, a number or None.
    ValueError
        A string of another form, or a rate that is negative, not finite, or outside
        :data:`MIN_RATE` to :data:`MAX_RATE` tasks per second.
    """
    if rate is None:
        return None
    if isinstance(rate, str):
        count, slash, unit = rate.strip().partition("/")
        per = _PER.get(unit.strip().lower()) if slash else 1.0
        try:
            value = float(count)
        except ValueError:
            value = math.nan
        if per is None or math.isnan(value):
            raise ValueError(f"{what} must be like '100/s', '6000/m' or '10/h' (or tasks per second), got {rate!r:.80}")
        value /= per
    elif isinstance(rate, numbers.Real) and not isinstance(rate, bool):
        value = float(rate)
    else:
        raise TypeError(f"{what} must be a string like '100/s' or a number of tasks per second, got {rate!r:.80}")
    fault = rate_fault(value)
    if fault is not None:
        raise ValueError(f"{what} {fault}, got {rate!r:.80}" + (f" = {value:g}/s" if 0 <= value < math.inf else ""))
    return value or None


def rate_fault(rate: float) -> str | None:
    """Why ``rate`` (tasks per second, ``0``: no limit) is no limit zdq takes, or ``None``: the one
    check of a limit given at a call (:func:`rate_of`), of each queue's share of it (:func:`share`)
    and of a rate that comes off the wire (a PUT's tags, ``zdq.transport.protocol.unpack_tags``):
    a peer cannot store a rate the API refuses (``5e-324`` made a broker's waits infinite).

    >>> rate_fault(100.0), rate_fault(0.0), rate_fault(1e-9)
    (None, None, 'must be 1e-06 to 1e+09 tasks per second (or none)')
    """
    if not 0 <= rate < math.inf:
        return "must be a non-negative, finite rate"
    if rate and not MIN_RATE <= rate <= MAX_RATE:
        return f"must be {MIN_RATE:g} to {MAX_RATE:g} tasks per second (or none)"
    return None


def burst(rate: float) -> float:
    """How many tasks a bucket of ``rate`` per second holds (:data:`BURST_SECONDS` of it, at least
    one): a chunk of at most this many starts at once; the rest of a larger one is spaced ``1 /
    rate`` apart by its consumer (see :mod:`zdq.broker.rates`).

    >>> burst(200.0), burst(2.0)
    (20.0, 1.0)
    """
    return max(1.0, rate * BURST_SECONDS)


def share(rate: float | None, n_queues: int) -> float | None:
    """Each queue's part of a pool's limit (the pool's queues split it evenly).

    Raises
    ------
    ValueError
        That part is slower than :data:`MIN_RATE`: no queue would take it (a PUT carries it).
    """
    if rate is None:
        return None
    part = rate / max(1, n_queues)
    fault = rate_fault(part)
    if fault is not None:
        raise ValueError(f"a limit of {rate:g}/s split among {n_queues} queues is {part:g}/s each; each queue's part {fault}")
    return part


def chunk_cap(rate: float) -> int:
    """The most tasks a chunk limited to ``rate`` per second (one queue's share) should hold."""
    return max(1, int(rate * SMOOTH_SECONDS))


def limited_chunk_size(free: int, rates: Iterable[float | None]) -> int:
    """Tasks per chunk of a pool whose queues hold ``rates`` (each queue's own, ``None``: none):
    ``free`` (its settings' chunk size) capped by :func:`chunk_cap` of the slowest, or ``free``
    when no queue is limited.

    >>> limited_chunk_size(1000, [100.0, None]), limited_chunk_size(1000, [None])
    (5, 1000)
    """
    limits = [rate for rate in rates if rate]
    return min(free, chunk_cap(min(limits))) if limits else free


def rate_key_of(fn: Any, what: str = "") -> bytes:
    """The bucket of a per-call limit: the function's ``module:qualname`` (a bound method's or a
    ``functools.partial``'s function's), as Celery keys a task's ``rate_limit`` by task name. A
    task given by name (``"package.module:function"``) is keyed by that name (the function's own
    bucket when the name is where it is defined). ``what`` names the argument in errors
    (``"key"``, ``"--key"``).

    >>> rate_key_of("billing.api:call"), rate_key_of("jobs:make.<locals>.send")
    (b'billing.api:call', b'jobs:make.<locals>.send')

    Raises
    ------
    ValueError
        A key longer than :data:`MAX_KEY` bytes in UTF-8 (it would not be the function's own), or
        a string that is no function's ``module:qualname`` (``"not a name"``: no task carries it,
        so its limit would limit nothing).
    """
    if type(fn) is str:
        key = _checked_key(fn, what)
        if not _is_key_form(fn):
            raise ValueError(
                f"{what}{': ' if what else ''}a rate limit's key must be a function's 'module:qualname' (as "
                f"'package.module:function' or 'package.module:Class.method', the key its tasks carry), got {fn!r:.80}"
            )
        return key
    fn = getattr(fn, "func", fn)  # functools.partial
    fn = getattr(fn, "__func__", fn)  # bound methods
    module = getattr(fn, "__module__", None) or "?"
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__qualname__
    return _checked_key(f"{module}:{name}", what)


def _checked_key(name: str, what: str = "") -> bytes:
    key = name.encode()
    if not key or len(key) > MAX_KEY:
        raise ValueError(
            f"{what}{': ' if what else ''}a rate limit's key must be 1 to {MAX_KEY} bytes in UTF-8, got {len(key)}: {name!r:.80}"
        )
    return key


def _is_key_form(name: str) -> bool:
    """Whether ``name`` is a ``module:qualname`` that :func:`rate_key_of` makes of a function: a
    dotted module path (``?`` for a function without one), a colon, then a dotted qualified name
    whose parts are identifiers or ``<locals>``, ``<lambda>`` and the like."""
    module, colon, qualname = name.partition(":")
    modules_ok = module == "?" or all(part.isidentifier() for part in module.split("."))
    return bool(colon) and modules_ok and all(
        part.isidentifier() or (part[:1] == "<" and part[-1:] == ">" and part[1:-1].isidentifier())
        for part in qualname.split(".")
    )


def format_rate(rate: float | None) -> str:
    """``"100/s"`` for 100.0, ``"-"`` for no limit: how the page and ``zdq status`` show it."""
    if not rate:
        return "-"
    if rate >= 1:
        return f"{rate:.4g}/s"
    return f"{rate * 60:.4g}/m" if rate * 60 >= 1 else f"{rate * 3600:.4g}/h"
