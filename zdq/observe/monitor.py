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
(so that counters never go backwards), and at most 300 samples of the pool's totals for the
rate plot (:mod:`zdq.observe.views`); at most ``MAX_KEPT`` queue and consumer entries in all (the
oldest dropped). An entry not reported for ``_STALE_INTERVALS`` of its sender's intervals (at least ``_STALE_MIN`` s) is taken
for gone: its worker died, or its pool closed without a last report.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from zdq.observe.report import BadReport, ConsumerReport, Gone, QueueReport, decode
from zdq.observe.views import ConsumerEntry, PoolView, QueueEntry, consumer_status, natural, queue_status, rates

__all__ = ["Monitor", "ensure_installed", "install", "installed", "MAX_KEPT"]

logger = logging.getLogger(__name__)

_STALE_INTERVALS = 5
_STALE_MIN = 10.0
#: Queue and consumer entries kept at most, over all pools (live ones and queues that went away).
MAX_KEPT = 4096
#: A sender's bad reports are logged at most once in this many seconds.
_WARN_EVERY = 60.0


class Monitor:
    """Scheduler extension: the figures of every live zdq pool, as the workers report them.

    >>> client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.extensions["zdq"].status())  # doctest: +SKIP
    {'pools': {...}, 'reports': 12, ...}
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self._pools: dict[str, PoolView] = {}
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
            entry = view.queues.get(qr.name) or view.left.pop(qr.name, None) or QueueEntry()
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
                consumer = view.consumers[key] = ConsumerEntry(cr)
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

    def _pool(self, name: str) -> PoolView:
        view = self._pools.get(name)
        if view is None:
            view = self._pools[name] = PoolView()
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
            queues = [queue_status(q, now) for q in view.queues.values()]
            consumers = [consumer_status(c, now) for c in view.consumers.values()]
            queues.sort(key=lambda s: natural(s["name"]))
            consumers.sort(key=lambda s: (natural(s["name"]), s["worker"], s["id"]))
            pools[name] = {
                "queues": queues,
                "consumers": consumers,
                "totals": view.totals(),
                "rates": rates(view.history, now),
            }
        return {
            "pools": pools,
            "interval": self._interval,
            "reports": self.reports,
            "dropped": self.dropped,
            "uptime": round(now - self.started, 3),
        }


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
