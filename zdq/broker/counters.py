"""What a broker counts: one dataclass, written by the broker loop alone, read by statistics and the feed.

It stands in a module of its own because every part of the broker (the core, dispatch, result
routing) counts into it, and those parts are imported by the core.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zdq.stats import ROUND_TRIP_BOUNDS

__all__ = ["BrokerCounters"]


@dataclass
class BrokerCounters:
    """What a broker counts, as the statistics report it."""

    chunks_stored: int = 0
    tasks_stored: int = 0
    chunks_acked: int = 0
    tasks_acked: int = 0
    chunks_redelivered: int = 0
    duplicate_dones: int = 0
    bad_messages: int = 0
    orphan_results: int = 0
    dropped_results: int = 0
    chunks_split: int = 0
    tasks_dead_lettered: int = 0
    #: Unique tasks' PUTs not stored: their key was held (they followed its chunk, or its window refused them).
    tasks_unique_duplicates: int = 0
    tasks_expired: int = 0  # their expiry passed before they were delivered: never sent, never run
    #: Chunks by the time from their DELIVER to their DONE: one count per bound of
    #: ``ROUND_TRIP_BOUNDS``, and a last one above them (the Prometheus histogram).
    round_trips: list[int] = field(default_factory=lambda: [0] * (len(ROUND_TRIP_BOUNDS) + 1))
    round_trip_sum: float = 0.0
