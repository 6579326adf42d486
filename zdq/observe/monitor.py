"""The scheduler's side of monitoring: the last report of every live queue and consumer.

:class:`Monitor` is a scheduler extension (``scheduler.extensions["zdq"]``), installed once per
cluster by the first QueuePool that places brokers (:func:`install`, run on the scheduler). It
handles the workers' ``zdq-report`` messages (see :mod:`zdq.observe.feed`) on the scheduler's
event loop, which alone touches its state: handlers, the HTTP page, the Prometheus collector and
``zdq_status`` all run there.

What it keeps is small and bounded: one dict per queue and per consumer (replaced by each report),
and per pool at most ``_HISTORY`` samples of its totals, one a second, for the rate plot.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

__all__ = ["Monitor", "ensure_installed", "install", "installed", "totals"]

logger = logging.getLogger(__name__)

#: Samples of each pool's totals kept for the rate plot (one a second: five minutes).
_HISTORY = 300
#: A queue or consumer not reported for this many report intervals (at least _STALE_MIN s) is
#: taken for gone: its worker died, or its pool closed without a last report.
_STALE_INTERVALS = 5
_STALE_MIN = 10.0


class _PoolView:
    __slots__ = ("queues", "consumers", "history", "recoveries")

    def __init__(self) -> None:
        self.queues: dict[str, tuple[float, dict[str, Any]]] = {}
        self.consumers: dict[str, tuple[float, dict[str, Any]]] = {}
        # (time, submitted, completed, failed): the pool's totals
        self.history: deque[tuple[float, int, int, int]] = deque(maxlen=_HISTORY)
        # Times each queue was seen at a new endpoint: placed again after its worker was lost.
        self.recoveries: dict[str, int] = {}


def totals(queues: list[dict[str, Any]], consumers: list[dict[str, Any]]) -> dict[str, int]:
    """A pool's counters summed over its queues and consumers (what Prometheus and the page show)."""
    q = lambda key: sum(int(x.get(key, 0)) for x in queues)  # noqa: E731
    c = lambda key: sum(int(x.get(key, 0)) for x in consumers)  # noqa: E731
    return {
        "submitted": q("tasks_stored"),
        "completed": c("tasks_done"),
        "failed": c("tasks_failed"),
        "retried": c("tasks_retried"),
        "dead_lettered": q("tasks_dead_lettered"),
        "redelivered": q("chunks_redelivered"),
        "bad_messages": q("bad_messages"),
        "ready": q("ready_tasks"),
        "delayed": q("delayed_tasks"),
        "leased": q("leased_tasks"),
        "dead": q("dead_tasks"),
        "awaiting": q("awaiting_tasks"),
        "consumers": len(consumers),  # live: reported by their workers (running or idle)
        "recoveries": q("recoveries"),
    }


class Monitor:
    """Scheduler extension: the figures of every live zdq pool, as the workers report them.

    >>> client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.extensions["zdq"].status())  # doctest: +SKIP
    {'pools': {...}, 'reports': 12, ...}
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self._pools: dict[str, _PoolView] = {}
        self._interval = 1.0
        self.reports = 0  # zdq-report messages received: the load this adds to the scheduler
        self.entries = 0  # queues and consumers in them
        self.started = time.monotonic()

    # -- handlers (the scheduler's event loop) ---------------------------------------------------
    def on_report(
        self,
        worker: str = "",
        interval: float = 1.0,
        queues: list[dict[str, Any]] | None = None,
        consumers: list[dict[str, Any]] | None = None,
        gone: list[tuple[str, str, str]] | None = None,
        **_: Any,
    ) -> None:
        self.reports += 1
        self.entries += len(queues or ()) + len(consumers or ())
        self._interval = float(interval) or self._interval
        now = time.monotonic()
        for stats in queues or ():
            stats["worker"] = worker
            view, name = self._pool(str(stats.get("pool", ""))), str(stats["name"])
            before = view.queues.get(name)
            if before is not None and before[1].get("endpoint") != stats.get("endpoint"):
                view.recoveries[name] = view.recoveries.get(name, 0) + 1
            stats["recoveries"] = view.recoveries.get(name, 0)
            view.queues[name] = (now, stats)
        for stats in consumers or ():
            self._pool(str(stats.get("pool", ""))).consumers[str(stats["name"])] = (now, stats)
        for kind, pool, name in gone or ():
            left = self._pools.get(pool)
            if left is not None:
                (left.queues if kind == "queue" else left.consumers).pop(name, None)
        self._expire(now)

    def _pool(self, name: str) -> _PoolView:
        view = self._pools.get(name)
        if view is None:
            view = self._pools[name] = _PoolView()
        return view

    def _expire(self, now: float) -> None:
        stale = now - max(_STALE_MIN, _STALE_INTERVALS * self._interval)
        for name, view in list(self._pools.items()):
            for table in (view.queues, view.consumers):
                for key in [k for k, (seen, _) in table.items() if seen < stale]:
                    del table[key]
            if not view.queues and not view.consumers:
                del self._pools[name]
                continue
            if not view.history or now - view.history[-1][0] >= 1.0:
                t = self._totals(view)
                view.history.append((now, t["submitted"], t["completed"], t["failed"]))

    @staticmethod
    def _totals(view: _PoolView) -> dict[str, int]:
        return totals([s for _, s in view.queues.values()], [s for _, s in view.consumers.values()])

    def status(self) -> dict[str, Any]:
        """Every live pool: its queues, consumers, totals and rates (JSON-able)."""
        now = time.monotonic()
        self._expire(now)
        pools = {}
        for name in sorted(self._pools):
            view = self._pools[name]
            queues = [dict(s, age=round(now - seen, 3)) for seen, s in view.queues.values()]
            consumers = [dict(s, age=round(now - seen, 3)) for seen, s in view.consumers.values()]
            queues.sort(key=lambda s: _natural(s["name"]))
            consumers.sort(key=lambda s: _natural(s["name"]))
            pools[name] = {
                "queues": queues,
                "consumers": consumers,
                "totals": self._totals(view),
                "rates": _rates(view.history, now),
            }
        return {
            "pools": pools,
            "interval": self._interval,
            "reports": self.reports,
            "uptime": round(now - self.started, 3),
        }


def _natural(name: str) -> tuple[str, int]:
    head, _, tail = name.rpartition("-")
    return (head, int(tail)) if tail.isdigit() else (name, 0)


def _rates(history: deque[tuple[float, int, int, int]], now: float) -> dict[str, list[float]]:
    """Per-second rates between consecutive samples: ``t`` (seconds before now), ``submitted``,
    ``completed``, ``failed``. A counter that went down (a broker placed again) counts 0."""
    out: dict[str, list[float]] = {"t": [], "submitted": [], "completed": [], "failed": []}
    samples = list(history)
    for (t0, *a), (t1, *b) in zip(samples, samples[1:]):
        dt = t1 - t0
        if dt <= 0:
            continue
        out["t"].append(round(t1 - now, 2))
        for key, x, y in zip(("submitted", "completed", "failed"), a, b):
            out[key].append(round(max(0, y - x) / dt, 1))
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
