"""Typed statistics: what ``pool.statistics()`` returns, never printed, always inspectable."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BrokerStats", "ConsumerStats", "DriverStats", "PoolStats"]


@dataclass(frozen=True)
class BrokerStats:
    """A broker's counters, taken in one actor call.

    ``name`` is the queue's name; ``routed_tasks`` counts the tasks whose results went to each
    driver, by the name the driver announced (``queue_pool.driver.driver_name``);
    ``consumer_names`` are the consumers connected now, by the names their ConsumerPool gave them.
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

    @property
    def pending_tasks(self) -> int:
        """Tasks stored and not yet acknowledged (ready or leased)."""
        return self.ready_tasks + self.leased_tasks


@dataclass(frozen=True)
class ConsumerStats:
    name: str
    worker: str
    running: bool
    chunks_received: int
    tasks_done: int
    tasks_failed: int
    tasks_in_flight: int
    bad_chunks: int


@dataclass(frozen=True)
class DriverStats:
    """What the driver (the client side of a QueuePool) knows without asking anyone."""

    tasks_submitted: int
    tasks_completed: int
    tasks_failed: int
    foreign_tasks: int
    duplicate_results: int
    chunks_unconfirmed: int
    chunks_outstanding: int
    bad_messages: int
    links_down: int = 0  # brokers lost and not yet placed again


@dataclass(frozen=True)
class PoolStats:
    driver: DriverStats
    brokers: list[BrokerStats]
    name: str = ""  # the pool's
