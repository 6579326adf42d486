"""The workers' side of monitoring: one feed per worker process reports its brokers and consumers.

Thread ownership: the ``zdq-feed`` thread alone reads the sources' statistics and builds reports;
it hands each report to the worker's event loop (``add_callback``), which alone writes to the
worker's batched stream to the scheduler. Sources are added and removed under ``_lock`` by the
actors' threads.

Why one message per process and second, and nothing per task: the counters already exist (the
broker's ``BrokerCounters``, the consumer's ``Counters``); the feed only reads them, at
``report-interval``. A pool of 100 queues on 4 workers adds 4 small messages a second to the
scheduler, and Dask's batched stream coalesces them with the worker's own traffic.

A scheduler without zdq's monitor would drop the worker's stream on an unknown message (Dask
treats that as a broken connection), so the feed first asks the scheduler whether the monitor is
installed (an RPC that fails harmlessly) and sends nothing until it is.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import asdict
from typing import Any, Callable

from zdq import config
from zdq.stats import BrokerStats, ConsumerStats

__all__ = ["REPORT_OP", "Source", "add_source", "remove_source", "local_broker"]

logger = logging.getLogger(__name__)

#: The stream operation the scheduler's monitor handles.
REPORT_OP = "zdq-report"
#: How long to wait for the scheduler's answer whether the monitor is installed.
_ASK_TIMEOUT = 5.0
#: Asked again this often while the scheduler has no monitor (a pool may install it later).
_ASK_EVERY = 10.0


class Source:
    """Something the feed reports: a broker or a consumer of a pool, in this process.

    ``statistics`` is its own statistics call (cheap: a copy of counters under its lock);
    ``alive`` says whether it still runs (a source whose actor was dropped stops being reported).
    ``owner`` is the actor itself, for :func:`local_broker`. ``id`` is unique to this source (names
    repeat: two ConsumerPools on one QueuePool both have ``GeneralConsumer-0``, and a queue placed
    again keeps its name): the monitor keys consumers by it and tells a new incarnation by it.
    """

    __slots__ = ("kind", "pool", "name", "host", "statistics", "alive", "owner", "id")

    def __init__(
        self,
        kind: str,
        pool: str,
        name: str,
        statistics: Callable[[], BrokerStats | ConsumerStats],
        alive: Callable[[], bool],
        *,
        host: str = "",
        owner: Any = None,
    ) -> None:
        self.kind = kind  # "queue" or "consumer"
        self.pool = pool
        self.name = name
        self.host = host
        self.statistics = statistics
        self.alive = alive
        self.owner = owner
        self.id = uuid.uuid4().hex


class _Feed:
    """The process's feed: a thread that runs while there is a source to report."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: dict[int, Source] = {}
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._gone: list[Source] = []  # removed since the last report: reported once more, then gone

    def add(self, source: Source) -> None:
        interval = config.seconds_or_none(config.get("report-interval"), "zdq.report-interval")
        worker = _worker()
        with self._lock:
            self._sources[id(source)] = source
            # Reporting turned off on this worker, or not on a worker (a broker driven directly, in
            # a test): the source is only listed, for local_broker().
            if interval and worker is not None and (self._thread is None or not self._thread.is_alive()):
                self._wake = threading.Event()
                self._thread = threading.Thread(
                    target=self._run, args=(worker, interval, self._wake), name="zdq-feed", daemon=True
                )
                self._thread.start()

    def remove(self, source: Source) -> None:
        with self._lock:
            if self._sources.pop(id(source), None) is not None and self._thread is not None:
                self._gone.append(source)  # its last counts and its going, in the next report
            if not self._sources:
                self._wake.set()  # the thread sends a last report without it, then ends

    def find(self, kind: str, name: str) -> Source | None:
        with self._lock:
            for source in self._sources.values():
                if source.kind == kind and source.name == name:
                    return source
        return None

    def _run(self, worker: Any, interval: float, wake: threading.Event) -> None:
        # The first report (and the question whether the monitor is installed) waits an interval,
        # as every later one does: the feed starts with a pool's first actor, and asking and
        # reporting at once put a scheduler round trip and a report per worker into the pool's
        # placement, which monitoring does not need (issue 26, point 7). A source removed
        # meanwhile wakes it, as below.
        wake.wait(interval)
        installed, asked = False, -_ASK_EVERY
        while True:
            with self._lock:
                # Read under the lock that remove() sets it under: a wake-up for a feed that had
                # emptied and was fed again must not leave the event set (the wait would spin).
                wake.clear()
                sources = [s for s in self._sources.values() if s.alive()]
                # What went since the last report is reported once more, with its going: what it
                # did in its last interval counts (reviewer 24: a consumer closed as it finished
                # its last 200 tasks left them out of the totals).
                gone = self._gone + [s for s in self._sources.values() if not s.alive()]
                self._sources = {id(s): s for s in sources}
                self._gone = []
                last = not sources
                if last and self._thread is threading.current_thread():
                    self._thread = None  # a source added from now on starts a new thread
            now = time.monotonic()
            if not installed and now - asked >= _ASK_EVERY:
                asked = now
                installed = _monitor_installed(worker)
            if installed:
                report = _report(sources + gone, interval)
                report["gone"] = [(s.kind, s.pool, s.name, s.id) for s in gone]
                try:
                    worker.loop.add_callback(_send, worker, report)
                except RuntimeError as e:  # the worker's loop is closing: nothing more to report to
                    logger.debug("zdq feed: the worker is closing: %s", e)
                    last = True
            if last:
                return
            wake.wait(interval)


def _send(worker: Any, report: dict[str, Any]) -> None:
    stream = getattr(worker, "batched_stream", None)
    if stream is not None and not stream.closed():
        stream.send({"op": REPORT_OP, **report})


def _report(sources: list[Source], interval: float) -> dict[str, Any]:
    queues, consumers = [], []
    for s in sources:
        try:
            stats = asdict(s.statistics())
        except Exception as e:  # a source stopping meanwhile: reported again next time, or gone
            logger.debug("zdq feed: statistics of %s %s failed: %s", s.kind, s.name, e)
            continue
        stats["pool"] = s.pool
        stats["id"] = s.id
        # Counts travel, not lists that grow with the pool (names of consumers and drivers).
        stats.pop("consumer_names", None)
        stats.pop("routed_tasks", None)
        stats.pop("key_rate_limits", None)
        if s.kind == "queue":
            stats["host"] = s.host
            queues.append(stats)
        else:
            consumers.append(stats)
    return {"interval": interval, "queues": queues, "consumers": consumers}


def _worker() -> Any:
    from distributed import get_worker

    try:
        return get_worker()
    except ValueError:
        return None


def _monitor_installed(worker: Any) -> bool:
    async def ask() -> bool:
        return bool(await worker.scheduler.zdq_monitor_installed())

    try:
        future = asyncio.run_coroutine_threadsafe(ask(), worker.loop.asyncio_loop)
        return future.result(_ASK_TIMEOUT)
    except Exception as e:  # no monitor (an unknown operation), or no answer in time
        logger.debug("zdq feed: the scheduler has no zdq monitor (%s); asking again in %.0f s", e, _ASK_EVERY)
        return False


_feed = _Feed()


def add_source(source: Source) -> None:
    """Report ``source`` from now on (every ``zdq.report-interval``; ``null`` turns it off)."""
    _feed.add(source)


def remove_source(source: Source) -> None:
    _feed.remove(source)


def local_broker(name: str) -> Any:
    """The Broker actor of queue ``name`` in this process, or None (for ``zdq dead-letters``)."""
    source = _feed.find("queue", name)
    return None if source is None else source.owner
