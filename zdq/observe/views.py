"""What the monitor keeps per pool: its live queues and consumers, and the totals of those gone.

Touched only by the scheduler's event loop, through :class:`~zdq.observe.monitor.Monitor`. The
counters are kept as totals over each source's incarnations (:class:`~zdq.observe.tally.Tally`),
so that a queue or consumer placed again after its worker was lost never makes them go backwards.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from zdq.observe.report import QUEUE_COUNTERS, QUEUE_GAUGES, ConsumerReport, QueueReport
from zdq.observe.tally import RATE_WINDOW, Tally, add_into, step_rate

__all__ = ["ConsumerEntry", "PoolView", "QueueEntry", "consumer_status", "natural", "queue_status", "rates"]

#: Samples of each pool's totals kept for the rate plot (one a second: five minutes).
_HISTORY = 300
#: Incarnations of a queue whose totals are kept apart (older ones are summed).
_INCARNATIONS = 4
#: Consumer samples kept for its rate (reports: at least STEP_WINDOW seconds of them).
_RATE_SAMPLES = 64


class QueueEntry:
    __slots__ = ("seen", "interval", "worker", "report", "incarnations", "ended", "recoveries", "told_gone")

    def __init__(self) -> None:
        self.told_gone = False  # left because its worker said so (its pool closed), not silent
        self.seen = 0.0
        self.interval = 1.0
        self.worker = ""
        self.report: QueueReport | None = None
        # A Tally per incarnation (the feed's id), most recent last: QUEUE_COUNTERS, then the
        # histogram's buckets and sum. Per incarnation, not one: two same-named pools on a cluster
        # report the same queue name in turn, and switching one Tally between them would add each
        # one's counts again at every turn.
        self.incarnations: dict[str, Tally] = {}
        self.ended: dict[str, float] = {}  # the totals of incarnations no longer kept apart
        self.recoveries = 0  # times seen at a new endpoint: placed again after its worker was lost

    def count(self, incarnation: str, raw: dict[str, float]) -> None:
        tally = self.incarnations.pop(incarnation, None) or Tally()
        self.incarnations[incarnation] = tally
        tally.update(incarnation, raw)
        while len(self.incarnations) > _INCARNATIONS:
            add_into(self.ended, self.incarnations.pop(next(iter(self.incarnations))).totals())

    def totals(self) -> dict[str, float]:
        out = dict(self.ended)
        for tally in self.incarnations.values():
            add_into(out, tally.totals())
        return out


class ConsumerEntry:
    __slots__ = ("seen", "interval", "report", "sender", "tally", "samples")

    def __init__(self, report: ConsumerReport, sender: str) -> None:
        self.sender = sender  # the worker that reported it first: the only one that may update it
        self.seen = 0.0
        self.interval = 1.0
        self.report = report
        self.tally = Tally()
        self.samples: deque[tuple[float, float]] = deque(maxlen=_RATE_SAMPLES)  # (time, tasks_done)


class PoolView:
    __slots__ = ("queues", "consumers", "silent", "left", "retired", "history")

    def __init__(self) -> None:
        self.queues: dict[str, QueueEntry] = {}  # live, by queue name
        self.consumers: dict[str, ConsumerEntry] = {}  # live, by consumer id
        # Consumers whose reports stopped (a stopped or starved worker), not told gone: kept for
        # their totals and their return, when they report the same counters again.
        self.silent: dict[str, ConsumerEntry] = {}
        self.left: dict[str, QueueEntry] = {}  # queues gone or expired: kept for their totals and return
        # Counters of consumers (and of queues' entries) no longer kept: still part of the totals.
        self.retired: dict[str, float] = {}
        # (time, submitted, completed, failed): the pool's totals
        self.history: deque[tuple[float, int, int, int]] = deque(maxlen=_HISTORY)

    def size(self) -> int:
        return len(self.queues) + len(self.consumers) + len(self.silent) + len(self.left)

    def retire_consumer(self, key: str) -> None:
        """The consumer ``key`` is gone for good (told so, or dropped to keep the monitor
        bounded): its totals stay in the pool's."""
        c = self.consumers.pop(key, None) or self.silent.pop(key, None)
        if c is not None:
            add_into(self.retired, c.tally.totals())

    def silence_consumer(self, key: str) -> None:
        """The consumer ``key`` stopped reporting: no longer shown, its totals still counted, and
        taken back as it was (its own counters, not added again) if it reports again."""
        c = self.consumers.pop(key, None)
        if c is not None:
            self.silent[key] = c

    def consumer(self, key: str) -> ConsumerEntry | None:
        """The entry of consumer ``key``, live or silent (then live again)."""
        c = self.consumers.get(key)
        if c is None:
            c = self.silent.pop(key, None)
            if c is not None:
                self.consumers[key] = c
        return c

    def retire_queue(self, name: str, *, told: bool = False) -> None:
        """Queue ``name`` left: its worker said so (``told``: its pool closed), or went silent."""
        q = self.queues.pop(name, None)
        if q is not None:
            q.told_gone = told
            self.left[name] = q

    def live(self) -> bool:
        """Whether a queue or consumer of the pool reports: only then is it shown."""
        return bool(self.queues or self.consumers)

    def may_return(self, now: float, keep: float) -> bool:
        """Whether a pool without live entries is kept, hidden, for its totals: a consumer or
        queue of it went silent (its workers stopped, not its pool closed) within ``keep``
        seconds of ``now``. Shown again when they report, its counters never go backwards."""
        silent = [c.seen for c in self.silent.values()] + [q.seen for q in self.left.values() if not q.told_gone]
        return bool(silent) and now - max(silent) <= keep

    def drop_left(self, name: str) -> None:
        q = self.left.pop(name, None)
        if q is not None:
            add_into(self.retired, {f"q:{k}": v for k, v in q.totals().items()})

    def totals(self) -> dict[str, int]:
        """The pool's counters summed over its queues and consumers (what Prometheus and the page
        show): counters over every incarnation, gauges over the live ones."""
        q: dict[str, float] = {}
        for entry in (*self.queues.values(), *self.left.values()):
            add_into(q, entry.totals())
        add_into(q, {k[2:]: v for k, v in self.retired.items() if k.startswith("q:")})
        c = {k: v for k, v in self.retired.items() if not k.startswith("q:")}
        for consumer in (*self.consumers.values(), *self.silent.values()):
            add_into(c, consumer.tally.totals())
        g = {k: sum(e.report.gauges[k] for e in self.queues.values() if e.report) for k in QUEUE_GAUGES}
        return {
            "submitted": int(q.get("tasks_stored", 0)),
            "completed": int(c.get("tasks_done", 0)),
            "failed": int(c.get("tasks_failed", 0)),
            "retried": int(c.get("tasks_retried", 0)),
            "dead_lettered": int(q.get("tasks_dead_lettered", 0)),
            # Expired before delivery (the broker's count) or before they started (a consumer's).
            "expired": int(q.get("tasks_expired", 0)) + int(c.get("tasks_expired", 0)),
            "redelivered": int(q.get("chunks_redelivered", 0)),
            "bad_messages": int(q.get("bad_messages", 0)),
            "refused_peers": int(q.get("refused_peers", 0)),
            "ready": g["ready_tasks"],
            "delayed": g["delayed_tasks"],
            "leased": g["leased_tasks"],
            "dead": g["dead_tasks"],
            "awaiting": g["awaiting_tasks"],
            "consumers": len(self.consumers),  # live: reported by their workers (running or idle)
            "recoveries": sum(e.recoveries for e in (*self.queues.values(), *self.left.values())),
        }


def queue_status(q: QueueEntry, now: float) -> dict[str, Any]:
    r = q.report
    assert r is not None  # a live queue has had a report
    totals = q.totals()
    trips = sorted((k for k in totals if k.startswith("rt") and k[2:].isdigit()), key=lambda k: int(k[2:]))
    return {
        "name": r.name,
        "pool": r.pool,
        "id": r.id,
        "worker": q.worker,
        "host": r.host,
        "endpoint": r.endpoint,
        "durable": r.durable,
        **r.gauges,
        **{k: int(totals.get(k, 0)) for k in QUEUE_COUNTERS},
        "round_trips": [int(totals[k]) for k in trips],
        "round_trip_sum": totals.get("round_trip_sum", 0.0),
        "rate_limit": r.rate_limit,
        "rate_limited_seconds": round(totals.get("rate_limited_seconds", 0.0), 3),
        "recoveries": q.recoveries,
        "age": round(now - q.seen, 3),
    }


def consumer_status(c: ConsumerEntry, now: float) -> dict[str, Any]:
    r = c.report
    return {
        "name": r.name,
        "pool": r.pool,
        "id": r.id,
        "worker": r.worker,
        "running": r.running,
        **r.counters,
        **r.gauges,
        "rate": round(step_rate(c.samples), 1),
        "age": round(now - c.seen, 3),
    }


def natural(name: str) -> tuple[str, int]:
    head, _, tail = name.rpartition("-")
    return (head, int(tail)) if tail.isdigit() and len(tail) < 10 else (name, 0)


def rates(history: deque[tuple[float, int, int, int]], now: float) -> dict[str, list[float]]:
    """Per-second rates at each sample over the window before it: ``t`` (seconds before now),
    ``submitted``, ``completed``, ``failed``. The totals never go down; a rate is never negative."""
    out: dict[str, list[float]] = {"t": [], "submitted": [], "completed": [], "failed": []}
    samples = list(history)
    j = 0
    for i in range(1, len(samples)):
        t1 = samples[i][0]
        while j < i - 1 and samples[j][0] < t1 - RATE_WINDOW:  # the oldest sample in the window
            j += 1
        t0 = samples[j][0]
        if t1 <= t0:
            continue
        out["t"].append(round(t1 - now, 2))
        for k, key in enumerate(("submitted", "completed", "failed"), start=1):
            out[key].append(round(max(0, samples[i][k] - samples[j][k]) / (t1 - t0), 1))
    return out
