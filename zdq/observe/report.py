"""What a ``zdq-report`` holds, decoded at the edge into named types.

A report comes from any process that can write to a worker's stream to the scheduler: a task, or a
worker running another zdq version. Nothing in it is trusted. :func:`decode` checks every field
(numbers finite, non-negative, of the expected kind; strings bounded) and returns a :class:`Report`
holding only entries that passed; an entry that did not is left out and named in
``Report.dropped``. A report whose frame is wrong (not a mapping, an interval that is no number,
lists that are no lists) raises :class:`BadReport`. The monitor never sees the raw dicts.

>>> r = decode("tcp://w", {"interval": 1, "queues": [], "consumers": [{"name": "C-0"}]})
>>> r.consumers, r.dropped
((), ('consumer: pool: missing',))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from zdq.errors import ProtocolError
from zdq.stats import ROUND_TRIP_BOUNDS

__all__ = [
    "BadReport",
    "ConsumerReport",
    "Gone",
    "QueueReport",
    "Report",
    "CONSUMER_COUNTERS",
    "CONSUMER_GAUGES",
    "QUEUE_COUNTERS",
    "QUEUE_GAUGES",
    "INTERVAL_RANGE",
    "decode",
]

#: Counters of a queue (BrokerStats fields): they only grow while their broker lives.
QUEUE_COUNTERS = (
    "tasks_stored", "tasks_acked", "tasks_dead_lettered", "chunks_redelivered", "bad_messages", "tasks_unique_duplicates",
    "tasks_expired", "tasks_throttled", "refused_peers",
)
#: Gauges of a queue: the state now.
QUEUE_GAUGES = (
    "ready_tasks", "delayed_tasks", "leased_tasks", "awaiting_tasks", "dead_tasks", "consumers", "unique_keys", "throttled_tasks",
    "kept_tasks", "kept_bytes",
)
#: Counters of a consumer (ConsumerStats fields).
CONSUMER_COUNTERS = ("tasks_done", "tasks_failed", "tasks_retried", "tasks_cancelled", "tasks_expired")
CONSUMER_GAUGES = ("tasks_in_flight",)
#: A report's interval is clamped to this range (seconds): a forged 1e12 must not stop expiry.
INTERVAL_RANGE = (0.1, 60.0)
#: Longest name, endpoint or id kept (characters).
MAX_STRING = 256
#: Entries read from one report at most (the rest is dropped, as bad).
MAX_ENTRIES = 4096
#: Above this a counter is taken for forged (2**53: exact in a float, and far beyond any real count).
_MAX_INT = 2**53


class BadReport(ProtocolError):
    """A ``zdq-report`` whose frame is wrong: the monitor drops it whole."""


@dataclass(frozen=True)
class QueueReport:
    pool: str
    name: str
    id: str  # the broker's incarnation: a new one when the queue is placed again
    endpoint: str
    host: str
    durable: bool
    counters: dict[str, int]  # QUEUE_COUNTERS
    gauges: dict[str, int]  # QUEUE_GAUGES
    round_trips: tuple[int, ...]  # a count per bound of ROUND_TRIP_BOUNDS, then one above (or empty)
    round_trip_sum: float
    rate_limit: float = 0.0  # the queue's own rate limit, tasks per second (0: none)
    rate_limited_seconds: float = 0.0  # the waits its limits imposed (a counter)


@dataclass(frozen=True)
class ConsumerReport:
    pool: str
    name: str  # its ConsumerPool's name for it: two pools on one QueuePool repeat them
    id: str  # unique per consumer incarnation (the feed's); "" from a feed that sends none
    worker: str
    running: bool
    counters: dict[str, int]  # CONSUMER_COUNTERS
    gauges: dict[str, int]  # CONSUMER_GAUGES


@dataclass(frozen=True)
class Gone:
    kind: str  # "queue" or "consumer"
    pool: str
    name: str
    id: str


@dataclass(frozen=True)
class Report:
    worker: str
    interval: float
    queues: tuple[QueueReport, ...]
    consumers: tuple[ConsumerReport, ...]
    gone: tuple[Gone, ...]
    dropped: tuple[str, ...]  # why entries were left out


class _Bad(Exception):
    pass


def _str(d: dict[str, Any], key: str, default: str | None = None) -> str:
    v = d.get(key, default)
    if v is None:
        raise _Bad(f"{key}: missing")
    if not isinstance(v, str):
        raise _Bad(f"{key}: not a string")
    if len(v) > MAX_STRING:
        raise _Bad(f"{key}: longer than {MAX_STRING}")
    return v


def _int(d: dict[str, Any], key: str) -> int:
    v = d.get(key, 0)
    # bool is an int to Python, never a count here; floats are refused too (a count is whole).
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _MAX_INT:
        raise _Bad(f"{key}: not a count")
    return v


def _float(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise _Bad(f"{what}: not a finite non-negative number")
    return float(v)


def _mapping(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _Bad("not a mapping")
    return v


def _queue(raw: Any) -> QueueReport:
    d = _mapping(raw)
    trips = d.get("round_trips", ())
    if not isinstance(trips, (list, tuple)) or len(trips) not in (0, len(ROUND_TRIP_BOUNDS) + 1):
        raise _Bad("round_trips: not a count per bound")
    return QueueReport(
        pool=_str(d, "pool"),
        name=_str(d, "name"),
        id=_str(d, "id", ""),
        endpoint=_str(d, "endpoint", ""),
        host=_str(d, "host", ""),
        durable=d.get("durable") is True,
        counters={k: _int(d, k) for k in QUEUE_COUNTERS},
        gauges={k: _int(d, k) for k in QUEUE_GAUGES},
        round_trips=tuple(_int({"round_trips": n}, "round_trips") for n in trips),
        round_trip_sum=_float(d.get("round_trip_sum", 0.0), "round_trip_sum"),
        rate_limit=_float(d.get("rate_limit", 0.0), "rate_limit"),
        rate_limited_seconds=_float(d.get("rate_limited_seconds", 0.0), "rate_limited_seconds"),
    )


def _consumer(raw: Any, worker: str) -> ConsumerReport:
    d = _mapping(raw)
    return ConsumerReport(
        pool=_str(d, "pool"),
        name=_str(d, "name"),
        id=_str(d, "id", ""),
        worker=_str(d, "worker", worker),
        running=d.get("running") is True,
        counters={k: _int(d, k) for k in CONSUMER_COUNTERS},
        gauges={k: _int(d, k) for k in CONSUMER_GAUGES},
    )


def _gone(raw: Any) -> Gone:
    if not isinstance(raw, (list, tuple)) or len(raw) not in (3, 4):
        raise _Bad("not (kind, pool, name[, id])")
    d = dict(zip(("kind", "pool", "name", "id"), raw))
    kind = _str(d, "kind")
    if kind not in ("queue", "consumer"):
        raise _Bad("kind: neither queue nor consumer")
    return Gone(kind, _str(d, "pool"), _str(d, "name"), _str(d, "id", ""))


def _list(v: Any, what: str) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, (list, tuple)):
        raise BadReport(f"{what}: not a list")
    return list(v)


def decode(worker: Any, message: Any) -> Report:
    """The report ``message`` (the stream message without ``op``) from ``worker``, checked.

    Raises :class:`BadReport` if the frame is wrong; a wrong entry is only left out."""
    if not isinstance(message, dict):
        raise BadReport("not a mapping")
    if not isinstance(worker, str) or len(worker) > MAX_STRING:
        raise BadReport("the sender's address is not a short string")
    try:
        interval = _float(message.get("interval", 1.0), "interval")
    except _Bad as e:
        raise BadReport(str(e)) from None
    low, high = INTERVAL_RANGE
    interval = min(high, max(low, interval))
    queues, consumers, gone = _list(message.get("queues"), "queues"), _list(message.get("consumers"), "consumers"), _list(
        message.get("gone"), "gone"
    )
    dropped: list[str] = []
    if len(queues) + len(consumers) + len(gone) > MAX_ENTRIES:
        dropped.append(f"more than {MAX_ENTRIES} entries: the rest left out")
        queues = queues[:MAX_ENTRIES]
        consumers = consumers[: max(0, MAX_ENTRIES - len(queues))]
        gone = gone[: max(0, MAX_ENTRIES - len(queues) - len(consumers))]

    def each(kind: str, items: list[Any], read: Any) -> tuple[Any, ...]:
        out = []
        for item in items:
            try:
                out.append(read(item))
            except _Bad as e:
                dropped.append(f"{kind}: {e}")
        return tuple(out)

    return Report(
        worker=worker,
        interval=interval,
        queues=each("queue", queues, _queue),
        consumers=each("consumer", consumers, lambda c: _consumer(c, worker)),
        gone=each("gone", gone, _gone),
        dropped=tuple(dropped),
    )
