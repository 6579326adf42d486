"""The scheduler's side of monitoring: the last report of every live queue and consumer.

:class:`Monitor` is a scheduler extension (``scheduler.extensions["zdq"]``), installed once per
cluster by the first QueuePool that places brokers (:func:`install`, run on the scheduler). It
handles the workers' ``zdq-report`` messages (see :mod:`zdq.observe.feed`) on the scheduler's
event loop, which alone touches its state: handlers, the HTTP page, the Prometheus collector and
``zdq_status`` all run there.

Reports are not trusted: each is decoded by :mod:`zdq.observe.report` before it touches the state,
a bad one (or a bad entry) is dropped with a warning (one per sender a minute), and the stream
handler never raises (Dask would drop the worker that sent it). Any task can write a report to its
worker's stream, so a well-formed one is not believed either (:mod:`zdq.observe.placements`):

- its sender is the worker whose stream it came on, as Dask's stream loop knows it; a report that
  names another worker (Dask lets a message's ``worker`` field override its own) is dropped whole;
- a queue's entry is kept only from the worker that its pool's registry record names for it; the
  record is published just after placement, so a new broker's first report or two are dropped,
  and the next ones (the feed sends its whole state every interval) taken;
- a consumer's entry only for a pool that has a record, from the worker that first reported it,
  and at most ``MAX_CONSUMERS_PER_SENDER`` of them per worker;
- a ``gone`` only from the worker that holds the entry.

What it keeps is bounded: per pool, its live queues (by name: unique in a pool) and consumers (by
the feed's id: ConsumerPools on one QueuePool repeat names), the totals of queues that went away
(so that counters never go backwards), and at most 300 samples of the pool's totals for the
rate plot (:mod:`zdq.observe.views`); at most ``MAX_KEPT`` queue and consumer entries in all (the
oldest dropped). An entry not reported for ``_STALE_INTERVALS`` of its sender's intervals (at least ``_STALE_MIN`` s) is taken
for gone: its worker died, or its pool closed without a last report.
"""

from __future__ import annotations

import logging
import sys
import time
from types import FrameType
from typing import Any

from zdq.observe.placements import Placements, RegistryPlacements
from zdq.observe.report import BadReport, ConsumerReport, Gone, QueueReport, decode
from zdq.observe.views import ConsumerEntry, PoolView, QueueEntry, consumer_status, natural, queue_status, rates
from zdq.reporting import Throttle

__all__ = ["Monitor", "ensure_installed", "install", "installed", "MAX_KEPT", "MAX_CONSUMERS_PER_SENDER"]

logger = logging.getLogger(__name__)

_STALE_INTERVALS = 5
_STALE_MIN = 10.0
#: A pool none of whose queues and consumers reports, some of them silent (their workers stopped,
#: not its pool closed), is kept hidden this long (s) for its totals: shown again when they
#: report, its counters go on from where they were.
_HIDDEN_KEEP = 600.0
#: Queue and consumer entries kept at most, over all pools (live ones and queues that went away).
MAX_KEPT = 4096
#: Consumer entries kept per sending worker (its queues are bounded by the registry instead).
MAX_CONSUMERS_PER_SENDER = 256
#: Entries no record vouches for are logged only once their sender has sent them this long (s):
#: a broker reports before its pool's record is published, for a second or two.
_UNVERIFIED_GRACE = 10.0
#: A sender's bad reports are logged at most once in this many seconds.
_WARN_EVERY = 60.0


class Monitor:
    """Scheduler extension: the figures of every live zdq pool, as the workers report them.

    >>> client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.extensions["zdq"].status())  # doctest: +SKIP
    {'pools': {...}, 'reports': 12, ...}
    """

    def __init__(self, scheduler: Any, placements: Placements | None = None) -> None:
        self.scheduler = scheduler
        self._placements: Placements = RegistryPlacements(scheduler) if placements is None else placements
        self._unverified_since: dict[str, float] = {}  # sender -> start of its run of unverified entries
        self._pools: dict[str, PoolView] = {}
        self._interval = 1.0  # the last good report's, for the page
        self._warned = Throttle(_WARN_EVERY)  # when each sender's bad reports were last logged
        self._full_logged = False
        self.reports = 0  # zdq-report messages received: the load this adds to the scheduler
        self.entries = 0  # queues and consumers in them
        self.dropped = 0  # reports and entries dropped as bad
        self.unverified = 0  # entries dropped as no registry record vouches for them
        self.started = time.monotonic()

    # -- handlers (the scheduler's event loop) ---------------------------------------------------
    def on_report(self, /, worker: Any = "", **message: Any) -> None:
        """The ``zdq-report`` stream handler: never raises (Dask would drop the sending worker).

        ``self`` is positional-only: Dask calls ``handler(**message)``, and a message with a
        ``self`` field must land in ``message`` (and be dropped as bad), not fail the call before
        this body runs."""
        self.reports += 1
        now = time.monotonic()
        sender = _stream_sender()
        if sender is not None and sender != worker:
            self.dropped += 1
            self._warn(sender, now, "a zdq report dropped: it claims to come from worker %s", str(worker)[:256])
            return
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
            queues, consumers = self._vouched(report.worker, report.queues, report.consumers, report.gone, now)
            self._apply(report.worker, report.interval, queues, consumers, report.gone, now)
            self._expire(now)
        except Exception:
            logger.exception("zdq monitor: a report from %s could not be applied", str(worker)[:256])

    def _warn(self, worker: Any, now: float, msg: str, *args: Any) -> None:
        sender = str(worker)[:256]
        if not self._warned.due(sender, now):
            return
        logger.warning("from %s: " + msg + " (more from this sender not logged for %.0f s)", sender, *args, _WARN_EVERY)

    def _vouched(
        self,
        worker: str,
        queues: tuple[QueueReport, ...],
        consumers: tuple[ConsumerReport, ...],
        gone: tuple[Gone, ...],
        now: float,
    ) -> tuple[tuple[QueueReport, ...], tuple[ConsumerReport, ...]]:
        """The entries of ``worker``'s report that the pools' registry vouches for, its consumers
        bounded; the others are counted, and logged once they outlast the placement race. An
        entry the same report tells gone (its last counts, sent as it went: its pool's record may
        be withdrawn already) is taken only as an update of one this worker reported before."""
        if not queues and not consumers:
            return queues, consumers
        self._placements.refresh()
        going = {(g.kind, g.pool, g.name if g.kind == "queue" else _gone_key(g, worker)) for g in gone}
        kept_q: list[QueueReport] = []
        kept_c: list[ConsumerReport] = []
        refused: list[str] = []
        for q in queues:
            going_now = ("queue", q.pool, q.name) in going
            entry = self._pools.get(q.pool, _NO_VIEW).queues.get(q.name) if going_now else None
            if (entry is not None and entry.worker == worker) or self._placements.holds(q.pool, q.name, worker):
                kept_q.append(q)
            elif not going_now:  # one going that nothing vouches for is dropped, and not counted
                refused.append(f"queue {q.name} of pool {q.pool}")
        for c in consumers:
            key = _consumer_key(c, worker)
            going_now = ("consumer", c.pool, key) in going
            view = self._pools.get(c.pool, _NO_VIEW)
            known = (view.consumers.get(key) or view.silent.get(key)) if going_now else None
            if (known is not None and known.sender == worker) or (
                self._placements.has_pool(c.pool) and self._consumer_of(c, worker)
            ):
                kept_c.append(c)
            elif not going_now:
                refused.append(f"consumer {c.name} of pool {c.pool}")
        bounded = self._bounded(worker, tuple(kept_c), now)
        if not refused:
            self._unverified_since.pop(worker, None)
            return tuple(kept_q), bounded
        self.unverified += len(refused)
        if len(self._unverified_since) >= 1024 and worker not in self._unverified_since:
            self._unverified_since.clear()  # bounded; at worst a warning comes a grace later
        since = self._unverified_since.setdefault(worker, now)
        if now - since >= _UNVERIFIED_GRACE:
            self._warn(
                worker, now,
                "%d entries of zdq reports dropped (e.g. %s): no pool's registry record names this worker for "
                "them (a forged report, or a pool whose record could not be published)",
                len(refused), refused[0][:600],
            )
        return tuple(kept_q), bounded

    def _consumer_of(self, cr: ConsumerReport, worker: str) -> bool:
        """Whether ``worker`` may report consumer ``cr``: the consumer runs on ``worker`` (a feed
        reports its own worker's consumers), and it is new or ``worker`` reported it first."""
        if cr.worker and cr.worker != worker:
            return False
        entry = self._pools.get(cr.pool)
        key = _consumer_key(cr, worker)
        consumer = None if entry is None else entry.consumers.get(key) or entry.silent.get(key)
        return consumer is None or consumer.sender == worker

    def _bounded(self, worker: str, consumers: tuple[ConsumerReport, ...], now: float) -> tuple[ConsumerReport, ...]:
        """``consumers`` without the new ones beyond ``MAX_CONSUMERS_PER_SENDER`` for ``worker``."""
        def known(c: ConsumerReport) -> bool:
            view, key = self._pools.get(c.pool, _NO_VIEW), _consumer_key(c, worker)
            return key in view.consumers or key in view.silent

        new = [c for c in consumers if not known(c)]
        if not new:
            return consumers
        held = sum(
            1 for view in self._pools.values() for c in (*view.consumers.values(), *view.silent.values()) if c.sender == worker
        )
        room = MAX_CONSUMERS_PER_SENDER - held
        if len(new) <= room:
            return consumers
        refused = {id(c) for c in new[max(0, room):]}
        self.dropped += len(refused)
        self._warn(
            worker, now, "%d consumers of zdq reports dropped: a worker is shown with %d consumers at most",
            len(refused), MAX_CONSUMERS_PER_SENDER,
        )
        return tuple(c for c in consumers if id(c) not in refused)

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
            raw["rate_limited_seconds"] = qr.rate_limited_seconds
            # A feed that sends no id: the endpoint tells a broker placed again.
            entry.count(qr.id or qr.endpoint, raw)
            entry.seen, entry.interval, entry.worker, entry.report = now, interval, worker, qr
        for cr in consumers:
            view = self._pool(cr.pool)
            key = _consumer_key(cr, worker)
            consumer = view.consumer(key)
            if consumer is None:
                consumer = view.consumers[key] = ConsumerEntry(cr, worker)
            totals = consumer.tally.update(key, dict(cr.counters))
            consumer.seen, consumer.interval, consumer.report = now, interval, cr
            consumer.samples.append((now, totals.get("tasks_done", 0)))
        for g in gone:  # only the worker that holds an entry tells it gone
            left = self._pools.get(g.pool)
            if left is None:
                continue
            if g.kind == "queue":
                q = left.queues.get(g.name)
                if q is not None and q.worker == worker:
                    left.retire_queue(g.name, told=True)
                continue
            key = _gone_key(g, worker)
            c = left.consumers.get(key) or left.silent.get(key)
            if c is not None and c.sender == worker:
                left.retire_consumer(key)
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
            kept += [(e.seen, name, "consumer", k) for k, e in (*view.consumers.items(), *view.silent.items())]
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
                view.silence_consumer(key)
            if not view.live():
                # Kept, hidden, while its pool is published (its first queue's report may be yet
                # to come, as its consumers' last ones come: reviewer 24), or while some of it fell
                # silent (workers stopped) not long ago; else closed: its series end.
                if not (self._placements.has_pool(name) or view.may_return(now, _HIDDEN_KEEP)):
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
            if not view.live():  # kept for its totals while its workers are silent: not shown
                continue
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
            "unverified": self.unverified,
            "uptime": round(now - self.started, 3),
        }


_NO_VIEW = PoolView()


def _consumer_key(cr: ConsumerReport, worker: str) -> str:
    return cr.id or f"{worker} {cr.name}"  # a feed that sends no id: one name per process


def _gone_key(gone: Gone, worker: str) -> str:
    """The key of the consumer a ``gone`` names, as :func:`_consumer_key` makes it of a report."""
    return gone.id or f"{worker} {gone.name}"


def _stream_sender() -> str | None:
    """The worker whose stream the report being handled came on, or None when not called by
    Dask's stream loop (a test calling :meth:`Monitor.on_report`).

    Why the stack: Dask calls a stream handler with ``**merge({"worker": <the stream's worker>},
    message)``, so a message that holds a ``worker`` field overrides the address Dask gives; only
    its stream loop (``handle_stream``, two frames up) still holds the address in ``extra``."""
    frame: FrameType | None = sys._getframe(2)
    for _ in range(3):
        if frame is None:
            return None
        if frame.f_code.co_name == "handle_stream":
            extra = frame.f_locals.get("extra")
            worker = extra.get("worker") if isinstance(extra, dict) else None
            return worker if isinstance(worker, str) else None
        frame = frame.f_back
    return None


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
    workers' feeds then send nothing, and the pool works as before. A scheduler that does not
    answer within ``placement-timeout`` is a :class:`~zdq.errors.PlacementError`: nothing could
    be placed there either."""
    from zdq._actor import scheduler_call
    from zdq.errors import PlacementError

    try:
        scheduler_call(client, "zdq's monitor install", client.run_on_scheduler, install)
    except PlacementError:
        raise
    except Exception as e:
        logger.warning("zdq monitor not installed on the scheduler (no /zdq page, zdq status or zdq_* metrics): %s", e)
