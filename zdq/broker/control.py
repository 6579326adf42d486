"""A queue's control plane: what other threads ask of a running broker (its statistics, dead
letters, schedules, rate limits, a task's state, its settings), each answered under the loop's
lock from the parts the loop owns (:mod:`zdq.broker.core`). The broker's actor
(:mod:`zdq.broker.actor`) is its one caller in a worker; tests and the in-process harness call it
directly.
"""

from __future__ import annotations

import threading
from dataclasses import asdict
from typing import Any

from zdq.broker.counters import BrokerCounters
from zdq.broker.dispatch import Dispatch
from zdq.broker.expiry import ExpiryWatch
from zdq.broker.intake import Intake
from zdq.broker.leases import LeaseTable
from zdq.broker.peers import PeerTable
from zdq.broker.questions import CancelQuestions
from zdq.broker.rates import RateLimits
from zdq.broker.routing import ResultRouting
from zdq.broker.schedules import ScheduleTable
from zdq.broker.task_state import task_state
from zdq.stats import BrokerStats
from zdq.storage.base import DeadLetter, Storage

__all__ = ["BrokerControl"]


class BrokerControl:
    """The control plane of one broker (see the module docstring); from any thread."""

    def __init__(
        self,
        name: str,
        lock: threading.Lock,
        storage: Storage,
        leases: LeaseTable,
        peer_table: PeerTable,
        routing: ResultRouting,
        intake: Intake,
        rates: RateLimits,
        schedules: ScheduleTable,
        expiry: ExpiryWatch,
        questions: CancelQuestions,
        chunks_out: Dispatch,
        counters: BrokerCounters,
    ) -> None:
        self.name = name
        self._lock = lock
        self._storage = storage
        self._leases = leases
        self._peer_table = peer_table
        self._routing = routing
        self._intake = intake
        self._rates = rates
        self._schedules = schedules
        self._expiry = expiry
        self._questions = questions
        self._chunks_out = chunks_out
        self.counters = counters

    def statistics(self, endpoint: str = "") -> BrokerStats:
        with self._lock:
            c = self._leases.counts()
            routed: dict[str, int] = {}
            for ident, n in self._routing.routed.items():
                name = self._peer_table.name_of(ident)
                routed[name] = routed.get(name, 0) + n
            consumers = self._peer_table.consumer_names()
            return BrokerStats(
                name=self.name,
                endpoint=endpoint,
                durable=self._storage.durable,
                ready_chunks=c.ready_chunks,
                ready_tasks=c.ready_tasks,
                leased_chunks=c.leased_chunks,
                leased_tasks=c.leased_tasks,
                awaiting_tasks=c.done_tasks,
                dead_chunks=c.dead_chunks,
                dead_tasks=c.dead_tasks,
                consumers=len(consumers),
                drivers=self._peer_table.drivers_present(),
                routed_tasks=routed,
                consumer_names=tuple(consumers),
                delayed_chunks=c.delayed_chunks,
                delayed_tasks=c.delayed_tasks,
                unique_keys=len(self._intake.unique.holders) if self._intake.unique is not None else 0,
                **self._rate_stats(),
                **self._kept_figures(),
                **{**asdict(self.counters), "round_trips": tuple(self.counters.round_trips)},
            )

    def _rate_stats(self) -> dict[str, Any]:
        rate, keys, parked = self._rates.describe()
        return {
            "rate_limit": rate,
            "key_rate_limits": keys,
            "throttled_tasks": parked,
            "tasks_throttled": self._rates.tasks_throttled,
            "rate_limited_seconds": self._rates.throttled_seconds,
        }

    def _kept_figures(self) -> dict[str, Any]:
        kept = self._leases.retained
        return {} if kept is None else {"kept_tasks": kept.tasks, "kept_bytes": kept.nbytes}

    def dead_letters(self) -> list[DeadLetter]:
        with self._lock:
            return self._storage.dead_letters()

    def requeue_dead(self, chunk_ids: list[int] | None = None) -> int:
        with self._lock:
            return self._storage.requeue_dead(chunk_ids)

    def purge_dead(self, chunk_ids: list[int] | None = None) -> int:
        with self._lock:
            return self._storage.purge_dead(chunk_ids)

    def purge_ready(self) -> int:
        """Cancel every task of every chunk not yet delivered (``zdq purge``); return how many
        were cancelled (see :meth:`~zdq.broker.questions.CancelQuestions.purge_ready`)."""
        with self._lock:
            n = self._questions.purge_ready()
            self._chunks_out.rescan()  # consumers without credit hear READY at the next round
        return n

    def expired_state(self, task_id: int, owner: bytes | None = None) -> bool:
        """Whether task ``task_id`` (of the driver ``owner``, if given) expired in this broker
        before it was delivered, among the last chunks that did (see :mod:`zdq.broker.expiry`;
        one broker's memory: not kept across a restart)."""
        with self._lock:
            return self._expiry.has_expired(task_id, owner)

    def setting(self, name: bytes, proposed: bytes | None) -> bytes | None:
        with self._lock:
            return self._storage.setting(name, proposed)

    def holds_nothing(self) -> bool:
        with self._lock:
            return self._storage.holds_nothing()

    def consumer_left(self, ident: bytes) -> bool:
        """The pool of consumer ``ident`` saw its worker leave the cluster: its leased chunks return
        to the queue at the loop's next housekeeping (within a heartbeat interval), not a
        heartbeat timeout later. False if it is no consumer of this broker."""
        with self._lock:
            return self._peer_table.left(ident)

    def adopt_setting(self, name: bytes, value: bytes) -> bytes | None:
        """``value`` replaces the setting ``name`` if none is stored or the queue holds nothing
        (:meth:`~zdq.storage.base.Storage.holds_nothing`); return the value kept."""
        with self._lock:
            stored = self._storage.setting(name, None)
            if stored is None or self._storage.holds_nothing():
                self._storage.write_setting(name, value)
                return value
            return stored

    def add_schedule(self, record: bytes) -> bytes:
        with self._lock:
            return self._schedules.add(record)

    def cancel_schedule(self, schedule: int | str) -> bool:
        with self._lock:
            return self._schedules.cancel(schedule)

    def schedules(self) -> list[bytes]:
        with self._lock:
            return self._schedules.records()

    def set_rate_limit(self, rate: float | None, key: bytes = b"") -> None:
        """The queue's own limit (``key`` empty; kept with a durable queue), or a per-call key's;
        tasks per second, ``None`` for none. The loop applies it at its next round."""
        with self._lock:
            if key:
                self._rates.set_key(key, rate)
            else:
                self._rates.set_queue(rate)

    def task_state(self, task_id: int) -> tuple[str, bytes | None, str]:
        """Where task ``task_id`` stands in this queue (:func:`zdq.state`): ``(state, sealed
        results or None, detail)``; see :func:`zdq.broker.task_state.task_state`."""
        with self._lock:  # held: the expiry watch is asked directly (expired_state takes the lock)
            return task_state(self._leases, task_id, self._expiry.has_expired, self._followed)

    def _followed(self, task_id: int) -> int | None:
        """The task a unique task's follower ``task_id`` follows (while it runs, or its results
        are kept), or None."""
        unique = self._intake.unique
        holder = unique.following.get(task_id) if unique is not None else None
        retained = self._leases.retained
        if holder is None and retained is not None:
            holder = retained.aliases.get(task_id)
        return holder
