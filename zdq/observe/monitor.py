"""The scheduler's side of monitoring: the last report of every live queue and consumer.

:class:`Monitor` is a scheduler extension (``scheduler.extensions["zdq"]``), installed once per
cluster by the first QueuePool that places brokers (:func:`install`, run on the scheduler). It
handles the workers' ``zdq-report`` messages (see :mod:`zdq.observe.feed`) on the scheduler's
event loop, which alone touches its state: handlers, the HTTP page, the Prometheus collector and
``zdq_status`` all run there.

Reports are not trusted: each is decoded by :mod:`zdq.observe.report` before it touches the state,
a bad one (or a bad entry) is dropped with a warning (one per sender a minute), and the stream
handler never raises (Dask would drop the worker that sent it).

What it keeps is bounded: per pool, its live queues (by name: unique in a pool) and consumers (by
the feed's id: ConsumerPools on one QueuePool repeat names), the totals of queues that went away
(so that counters never go backwards), and at most ``_HISTORY`` samples of the pool's totals for the
rate plot; at most ``MAX_KEPT`` queue and consumer entries in all (the oldest dropped). An entry
not reported for ``_STALE_INTERVALS`` of its sender's intervals (at least ``_STALE_MIN`` s) is taken
for gone: its worker died, or its pool closed without a last report.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from zdq.observe.report import (
    CONSUMER_COUNTERS,
    QUEUE_COUNTERS,
    QUEUE_GAUGES,
    BadReport,
    ConsumerReport,
    Gone,
    QueueReport,
    decode,
)
from zdq.observe.tally import RATE_WINDOW, Tally, add_into, step_rate

__all__ = ["Monitor", "ensure_installed", "install", "installed", "MAX_KEPT"]

logger = logging.getLogger(__name__)

#: Samples of each pool's totals kept for the rate plot (one a second: five minutes).
_HISTORY = 300
_STALE_INTERVALS = 5
_STALE_MIN = 10.0
#: Queue and consumer entries kept at most, over all pools (live ones and queues that went away).
MAX_KEPT = 4096
#: A sender's bad reports are logged at most once in this many seconds.
_WARN_EVERY = 60.0
#: Incarnations of a queue whose totals are kept apart (older ones are summed).
_INCARNATIONS = 4
#: Consumer samples kept for its rate (reports: at least STEP_WINDOW seconds of them).
_RATE_SAMPLES = 64


class _Queue:
    __slots__ = ("seen", "interval", "worker", "report", "incarnations", "ended", "recoveries")

    def __init__(self) -> None:
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


class _Consumer:
    __slots__ = ("seen", "interval", "report", "tally", "samples")

    def __init__(self, report: ConsumerReport) -> None:
        self.seen = 0.0
        self.interval = 1.0
        self.report = report
        self.tally = Tally()
        self.samples: deque[tuple[float, float]] = deque(maxlen=_RATE_SAMPLES)  # (time, tasks_done)


class _PoolView:
    __slots__ = ("queues", "consumers", "left", "retired", "history")

    def __init__(self) -> None:
        self.queues: dict[str, _Queue] = {}  # live, by queue name
        self.consumers: dict[str, _Consumer] = {}  # live, by consumer id
        self.left: dict[str, _Queue] = {}  # queues gone or expired: kept for their totals and return
        # Counters of consumers (and of queues' entries) no longer kept: still part of the totals.
        self.retired: dict[str, float] = {}
        # (time, submitted, completed, failed): the pool's totals
        self.history: deque[tuple[float, int, int, int]] = deque(maxlen=_HISTORY)

    def size(self) -> int:
        return len(self.queues) + len(self.consumers) + len(self.left)

    def retire_consumer(self, key: str) -> None:
        c = self.consumers.pop(key, None)
        if c is not None:
            add_into(self.retired, c.tally.totals())

    def retire_queue(self, name: str) -> None:
        q = self.queues.pop(name, None)
        if q is not None:
            self.left[name] = q

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
        for consumer in self.consumers.values():
            add_into(c, consumer.tally.totals())
        g = {k: sum(e.report.gauges[k] for e in self.queues.values() if e.report) for k in QUEUE_GAUGES}
        return {
            "submitted": int(q.get("tasks_stored", 0)),
            "completed": int(c.get("tasks_done", 0)),
            "failed": int(c.get("tasks_failed", 0)),
            "retried": int(c.get("tasks_retried", 0)),
            "dead_lettered": int(q.get("tasks_dead_lettered", 0)),
            "redelivered": int(q.get("chunks_redelivered", 0)),
            "bad_messages": int(q.get("bad_messages", 0)),
            "ready": g["ready_tasks"],
            "delayed": g["delayed_tasks"],
            "leased": g["leased_tasks"],
            "dead": g["dead_tasks"],
            "awaiting": g["awaiting_tasks"],
            "consumers": len(self.consumers),  # live: reported by their workers (running or idle)
            "recoveries": sum(e.recoveries for e in (*self.queues.values(), *self.left.values())),
        }


class Monitor:
    """Scheduler extension: the figures of every live zdq pool, as the workers report them.

    >>> client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.extensions["zdq"].status())  # doctest: +SKIP
    {'pools': {...}, 'reports': 12, ...}
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self._pools: dict[str, _PoolView] = {}
        self._interval = 1.0  # the last good report's, for the page
        self._warned: dict[str, float] = {}  # sender -> when its bad reports were last logged
        self._full_logged = False
        self.reports = 0  # zdq-report messages received: the load this adds to the scheduler
        self.entries = 0  # queues and consumers in them
        self.dropped = 0  # reports and entries dropped as bad
        self.started = time.monotonic()

    # -- handlers (the scheduler's event loop) ---------------------------------------------------
    def on_report(self, worker: Any = "", **message: Any) -> None:
        """The ``zdq-report`` stream handler: never raises (Dask would drop the sending worker)."""
        self.reports += 1
        now = time.monotonic()
        try:
            report = decode(worker, message)
        except BadReport as e:
            self.dropped += 1
            self._warn(worker, now, "a zdq report dropped: %s", e)
            return
        except Exception as e:  # a bug of ours must not cost the cluster its workers either
            self.dropped += 1
            self._warn(worker, now, "a zdq report dropped: could not read it: %r", e)
            return
        if report.dropped:
            self.dropped += len(report.dropped)
            self._warn(worker, now, "%d entries of a zdq report dropped: %s", len(report.dropped), "; ".join(report.dropped[:5]))
        try:
            self._apply(report.worker, report.interval, report.queues, report.consumers, report.gone, now)
            self._expire(now)
        except Exception:
            logger.exception("zdq monitor: a report from %s could not be applied", str(worker)[:256])

    def _warn(self, worker: Any, now: float, msg: str, *args: Any) -> None:
        sender = str(worker)[:256]
        if now - self._warned.get(sender, -_WARN_EVERY) < _WARN_EVERY:
            return
        if len(self._warned) >= 1024:  # bounded: forget the oldest senders
            for key in sorted(self._warned, key=self._warned.__getitem__)[:512]:
                del self._warned[key]
        self._warned[sender] = now
        logger.warning("from %s: " + msg + " (more from this sender not logged for %.0f s)", sender, *args, _WARN_EVERY)

    def _apply(
        self,
        worker: str,
        interval: float,
        queues: tuple[QueueReport, ...],
        consumers: tuple[ConsumerReport, ...],
        gone: tuple[Gone, ...],
        now: float,
    ) -> None:
        self._interval = interval
        self.entries += len(queues) + len(consumers)
        for qr in queues:
            view = self._pool(qr.pool)
            entry = view.queues.get(qr.name) or view.left.pop(qr.name, None) or _Queue()
            view.queues[qr.name] = entry
            if entry.report is not None and entry.report.endpoint != qr.endpoint:
                entry.recoveries += 1
            raw: dict[str, float] = dict(qr.counters)
            raw.update({f"rt{i}": n for i, n in enumerate(qr.round_trips)})
            raw["round_trip_sum"] = qr.round_trip_sum
            # A feed that sends no id: the endpoint tells a broker placed again.
            entry.count(qr.id or qr.endpoint, raw)
            entry.seen, entry.interval, entry.worker, entry.report = now, interval, worker, qr
        for cr in consumers:
            view = self._pool(cr.pool)
            key = cr.id or f"{worker} {cr.name}"  # a feed that sends no id: one name per process
            consumer = view.consumers.get(key)
            if consumer is None:
                consumer = view.consumers[key] = _Consumer(cr)
            totals = consumer.tally.update(key, dict(cr.counters))
            consumer.seen, consumer.interval, consumer.report = now, interval, cr
            consumer.samples.append((now, totals.get("tasks_done", 0)))
        for g in gone:
            left = self._pools.get(g.pool)
            if left is None:
                continue
            if g.kind == "queue":
                left.retire_queue(g.name)
            elif g.id:
                left.retire_consumer(g.id)
            else:
                left.retire_consumer(f"{worker} {g.name}")
        self._bound()

    def _pool(self, name: str) -> _PoolView:
        view = self._pools.get(name)
        if view is None:
            view = self._pools[name] = _PoolView()
        return view

    def _bound(self) -> None:
        excess = sum(view.size() for view in self._pools.values()) - MAX_KEPT
        if excess <= 0:
            return
        if not self._full_logged:
            self._full_logged = True
            logger.warning(
                "zdq monitor: more than %d queues and consumers reported; the oldest are dropped (logged once)", MAX_KEPT
            )
        kept: list[tuple[float, str, str, str]] = []
        for name, view in self._pools.items():
            kept += [(e.seen, name, "left", k) for k, e in view.left.items()]
            kept += [(e.seen, name, "queue", k) for k, e in view.queues.items()]
            kept += [(e.seen, name, "consumer", k) for k, e in view.consumers.items()]
        kept.sort()
        for _, name, kind, key in kept[:excess]:
            view = self._pools[name]
            if kind == "consumer":
                view.retire_consumer(key)
            else:
                view.retire_queue(key)
                view.drop_left(key)

    def _expire(self, now: float) -> None:
        def stale(seen: float, interval: float) -> bool:
            return now - seen > max(_STALE_MIN, _STALE_INTERVALS * interval)

        for name, view in list(self._pools.items()):
            for key in [k for k, e in view.queues.items() if stale(e.seen, e.interval)]:
                view.retire_queue(key)
            for key in [k for k, c in view.consumers.items() if stale(c.seen, c.interval)]:
                view.retire_consumer(key)
            if not view.queues and not view.consumers:
                del self._pools[name]
                continue
            if not view.history or now - view.history[-1][0] >= 1.0:
                t = view.totals()
                view.history.append((now, t["submitted"], t["completed"], t["failed"]))

    def status(self) -> dict[str, Any]:
        """Every live pool: its queues, consumers, totals and rates (JSON-able). Queue counters
        are totals over the queue's incarnations (as in the metrics); consumer figures are each
        consumer's own, with ``rate`` its tasks done per second over the last few reports."""
        now = time.monotonic()
        self._expire(now)
        pools = {}
        for name in sorted(self._pools):
            view = self._pools[name]
            queues = [_queue_status(q, now) for q in view.queues.values()]
            consumers = [_consumer_status(c, now) for c in view.consumers.values()]
            queues.sort(key=lambda s: _natural(s["name"]))
            consumers.sort(key=lambda s: (_natural(s["name"]), s["worker"], s["id"]))
            pools[name] = {
                "queues": queues,
                "consumers": consumers,
                "totals": view.totals(),
                "rates": _rates(view.history, now),
            }
        return {
            "pools": pools,
            "interval": self._interval,
            "reports": self.reports,
            "dropped": self.dropped,
            "uptime": round(now - self.started, 3),
        }


def _queue_status(q: _Queue, now: float) -> dict[str, Any]:
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
        "recoveries": q.recoveries,
        "age": round(now - q.seen, 3),
    }


def _consumer_status(c: _Consumer, now: float) -> dict[str, Any]:
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


def _natural(name: str) -> tuple[str, int]:
    head, _, tail = name.rpartition("-")
    return (head, int(tail)) if tail.isdigit() and len(tail) < 10 else (name, 0)


def _rates(history: deque[tuple[float, int, int, int]], now: float) -> dict[str, list[float]]:
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


# -- installation (run on the scheduler) ------------------------------------------------------------
def _installed_handler(comm: Any = None) -> bool:
    return True


def install(dask_scheduler: Any = None) -> bool:
    """Install the monitor, its page and its metrics on this scheduler; idempotent. Run with
    ``client.run_on_scheduler(install)``. Returns True if it was installed by this call."""
    if isinstance(dask_scheduler.extensions.get("zdq"), Monitor):
        return False
    monitor = Monitor(dask_scheduler)
    dask_scheduler.extensions["zdq"] = monitor
    dask_scheduler.stream_handlers["zdq-report"] = monitor.on_report
    dask_scheduler.handlers["zdq_monitor_installed"] = _installed_handler
    dask_scheduler.handlers["zdq_status"] = lambda comm=None: monitor.status()
    from zdq.observe import metrics, page

    page.add_routes(dask_scheduler)
    metrics.register(dask_scheduler)
    logger.info("zdq monitor installed on the scheduler")
    return True


def installed(dask_scheduler: Any = None) -> bool:
    return isinstance(dask_scheduler.extensions.get("zdq"), Monitor)


def ensure_installed(client: Any) -> None:
    """Install the monitor on ``client``'s scheduler if it is not there (one call per pool
    placement). A scheduler that cannot (zdq not importable there) keeps running without it: the
    workers' feeds then send nothing, and the pool works as before."""
    try:
        client.run_on_scheduler(install)
    except Exception as e:
        logger.warning("zdq monitor not installed on the scheduler (no /zdq page, zdq status or zdq_* metrics): %s", e)
