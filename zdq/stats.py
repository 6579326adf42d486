"""Typed statistics: what ``pool.statistics()`` returns, never printed, always inspectable.

Their reprs fit on a screen: a counter at zero is left out (the attribute is still there), and
peers are shown by name (see :mod:`zdq.names`), never by their identity bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["BrokerStats", "ConsumerStats", "DriverStats", "PoolStats", "QueueState", "ROUND_TRIP_BOUNDS"]

#: Upper bounds (seconds) of the buckets of ``BrokerStats.round_trips``: a chunk's time from its
#: delivery to a consumer to its DONE at the broker.
ROUND_TRIP_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _shown(value: Any) -> bool:
    # Names, endpoints and flags always; numbers and collections when not zero or empty.
    return isinstance(value, (str, bool)) or bool(value)


class _Compact:
    """``Name(field=value, ...)`` without the counters at zero and the empty collections."""

    def __repr__(self) -> str:
        shown = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr and _shown(getattr(self, f.name))]  # type: ignore[arg-type]
        return f"{type(self).__name__}({', '.join(shown)})"


@dataclass(frozen=True, repr=False)
class BrokerStats(_Compact):
    """A broker's counters, taken in one actor call.

    ``name`` is the queue's name; ``routed_tasks`` counts the tasks whose results went to each
    driver, by the driver's name (``DriverStats.name``); ``consumer_names`` are the consumers
    connected now, by the names their ConsumerPool gave them.
    """

    name: str
    endpoint: str
    durable: bool
    ready_chunks: int
    ready_tasks: int
    leased_chunks: int
    leased_tasks: int
    awaiting_tasks: int  # results delivered, the driver's receipt still on its way
    dead_chunks: int
    dead_tasks: int
    chunks_stored: int
    tasks_stored: int
    chunks_acked: int
    tasks_acked: int
    chunks_redelivered: int
    duplicate_dones: int
    bad_messages: int
    orphan_results: int
    dropped_results: int
    chunks_split: int
    tasks_dead_lettered: int
    consumers: int
    drivers: int
    routed_tasks: dict[str, int] = field(default_factory=dict)
    consumer_names: tuple[str, ...] = ()
    delayed_chunks: int = 0  # stored, their release time not come yet (not counted as ready)
    delayed_tasks: int = 0
    tasks_unique_duplicates: int = 0  # unique tasks not queued: their key was held (see BrokerCounters)
    unique_keys: int = 0  # unique keys held now by queued or running tasks
    tasks_expired: int = 0  # their ``expires=`` passed before they were delivered: they never ran
    #: Rate limits (see :mod:`zdq.broker.rates`): the queue's own (tasks per second, its share of
    #: the pool's; 0: none) and the per-call ones by key; ``throttled_tasks`` wait now for a key's
    #: token (counted among the delayed); ``tasks_throttled`` waited for a token since the broker
    #: started, and ``rate_limited_seconds`` sums the waits limits imposed on ready work.
    rate_limit: float = 0.0
    key_rate_limits: dict[str, float] = field(default_factory=dict)
    throttled_tasks: int = 0
    tasks_throttled: int = 0
    rate_limited_seconds: float = 0.0
    #: Results kept after their driver took them (``result_ttl``), for zdq.result(): tasks, bytes.
    kept_tasks: int = 0
    kept_bytes: int = 0
    #: Handshakes the queue's socket refused: a peer without the pool's CURVE key (logged once
    #: per address a minute at most; see :mod:`zdq.transport.security`).
    refused_peers: int = 0
    #: Chunks by round trip (DELIVER to DONE): a count per bound of ``ROUND_TRIP_BOUNDS``, then
    #: one above them; ``round_trip_sum`` is their total time in seconds.
    round_trips: tuple[int, ...] = field(default=(), repr=False)
    round_trip_sum: float = field(default=0.0, repr=False)

    @property
    def pending_tasks(self) -> int:
        """Tasks stored and not yet acknowledged (delayed, ready or leased)."""
        return self.ready_tasks + self.delayed_tasks + self.leased_tasks


@dataclass(frozen=True, repr=False)
class ConsumerStats(_Compact):
    name: str
    worker: str
    running: bool
    chunks_received: int
    tasks_done: int
    tasks_failed: int
    tasks_in_flight: int
    bad_chunks: int
    tasks_cancelled: int = 0  # cancelled before they started: skipped, never run
    tasks_expired: int = 0  # their ``expires=`` passed before they started here: never run
    tasks_retried: int = 0  # failed attempts that were retried
    #: The queues this consumer cannot reach, each ``"<queue> at <endpoint>: <why>"``: never
    #: heard from within ``connect-timeout``, or heard from once and silent since for
    #: ``heartbeat-timeout`` (cleared when heard again).
    unreachable: tuple[str, ...] = ()


@dataclass(frozen=True, repr=False)
class DriverStats(_Compact):
    """What the driver (the client side of a QueuePool) knows without asking anyone.

    ``name`` is the name it announces to the brokers (their ``routed_tasks`` keys);
    ``queues_down`` names the queues lost and not yet placed again. ``duplicate_results``
    counts results that arrived for tasks that had their outcome already, and were dropped: a
    task run twice, or results a broker sent again to a driver that did not acknowledge them in
    time (no task ran again: ``BrokerStats.chunks_redelivered`` says when tasks did).
    ``foreign_tasks`` counts outcomes of chunks this driver holds no record of: results a durable
    queue kept for a driver of an earlier run or one that left, and the runs of this driver's own
    dead letters requeued (a requeue makes a new chunk, whose outcomes are then counted here).
    """

    tasks_submitted: int
    tasks_completed: int
    tasks_failed: int
    foreign_tasks: int
    duplicate_results: int
    chunks_unconfirmed: int
    chunks_outstanding: int
    bad_messages: int
    links_down: int = 0  # brokers lost and not yet placed again
    tasks_cancelled: int = 0  # cancelled before they started (they never ran)
    name: str = ""
    queues_down: tuple[str, ...] = ()


@dataclass(frozen=True, repr=False)
class PoolStats:
    driver: DriverStats
    brokers: list[BrokerStats]
    name: str = ""  # the pool's
    #: The queues whose statistics are not in ``brokers``, each with why (it did not answer in
    #: time, its worker is lost, or this pool is attached and its owner holds the brokers).
    missing: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        brokers = "".join(f"\n    {b!r}," for b in self.brokers)
        missing = "".join(f"\n    {q}: {why}," for q, why in self.missing.items())
        tail = f",\n  missing={{{missing}\n  }}" if self.missing else ""
        return f"PoolStats(name={self.name!r},\n  driver={self.driver!r},\n  brokers=[{brokers}\n  ]{tail})"


_STATES = {
    "down": "down (lost with its worker, being placed again)",
    "recovering": "recovering (placed again, catching up)",
    "unreachable": "unreachable (placed again where this process cannot reach it; its tasks failed)",
}


@dataclass(frozen=True)
class QueueState:
    """What a driver knows of one queue without asking it: for reprs, which never block.

    Attributes
    ----------
    name : str
        The queue's name.
    state : str
        ``"up"``, ``"down"`` (lost with its worker, being placed again), ``"recovering"`` or
        ``"unreachable"`` (placed again, and this process cannot reach it).
    awaiting : int
        Tasks this driver sent to the queue whose results have not arrived.
    pending : int or None
        Tasks ready or leased in the queue when it last answered a count (``get_queue_size()``,
        ``join()``...), from every producer; ``None`` if it never did.
    counted_ago : float or None
        Seconds since that count.
    """

    name: str
    state: str
    awaiting: int
    pending: int | None = None
    counted_ago: float | None = None

    def describe(self) -> str:
        """``<name>: up, 3 awaiting results, 5 pending (counted 0.2 s ago)``."""
        parts = [_STATES.get(self.state, self.state)]
        if self.awaiting:
            parts.append(f"{self.awaiting} awaiting results")
        if self.pending is not None and self.counted_ago is not None:
            parts.append(f"{self.pending} pending (counted {self.counted_ago:.1f} s ago)")
        return f"{self.name}: {', '.join(parts)}"
