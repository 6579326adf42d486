"""``zdq_*`` Prometheus metrics, served by Dask's own ``/metrics`` on the scheduler.

Dask's handler writes ``prometheus_client.REGISTRY``; a collector registered there once per process
reads the monitors of the schedulers running in it (normally one) at each scrape. Labels are pool
and queue names only: their number is bounded by the pools' sizes, never by tasks, and the monitor
keeps at most ``MAX_KEPT`` entries. Counters are the monitor's totals over every incarnation of a
queue or consumer (one placed again after its worker was lost starts at 0): they never go backwards.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from zdq.stats import ROUND_TRIP_BOUNDS

__all__ = ["register", "COUNTERS", "GAUGES"]

logger = logging.getLogger(__name__)

#: Counters per queue: metric name -> the BrokerStats field it reads.
_QUEUE_COUNTERS = {
    "zdq_tasks_submitted": ("tasks_stored", "Tasks stored in the queue (submitted by any producer, or a schedule's ticks)."),
    "zdq_tasks_acked": ("tasks_acked", "Tasks whose results the queue received (done or failed)."),
    "zdq_tasks_dead_lettered": ("tasks_dead_lettered", "Tasks moved to the queue's dead letters."),
    "zdq_chunks_redelivered": ("chunks_redelivered", "Chunks leased again after their consumer was lost."),
    "zdq_bad_messages": ("bad_messages", "Malformed or forged messages the queue dropped."),
    "zdq_refused_peers": ("refused_peers", "Handshakes the queue refused: peers without the pool's CURVE key."),
    "zdq_tasks_unique_duplicates": (
        "tasks_unique_duplicates", "Unique tasks not queued: their key was held (they got the holder's outcome)."
    ),
    "zdq_tasks_throttled": ("tasks_throttled", "Tasks that waited for a rate limit's token."),
    "zdq_rate_limited_seconds": ("rate_limited_seconds", "Seconds the queue's rate limits held its ready work back."),
}
#: Counters per pool, summed over its consumers (those gone too): metric name -> the pool's total.
_POOL_COUNTERS = {
    "zdq_tasks_completed": ("completed", "Tasks run to a result by the pool's consumers."),
    "zdq_tasks_failed": ("failed", "Tasks that failed for good on a consumer (after their retries)."),
    "zdq_tasks_retried": ("retried", "Failed attempts that were retried."),
    "zdq_tasks_expired": ("expired", "Tasks whose expiry (expires=) passed before they started: never run."),
}
#: Gauges per queue: metric name -> (BrokerStats field, help).
_QUEUE_GAUGES = {
    "zdq_queue_ready": ("ready_tasks", "Tasks waiting in the queue, ready to run."),
    "zdq_queue_delayed": ("delayed_tasks", "Tasks stored whose release time (delay=, eta=) has not come."),
    "zdq_queue_leased": ("leased_tasks", "Tasks leased to consumers."),
    "zdq_queue_dead": ("dead_tasks", "Dead-lettered tasks kept in the queue."),
    "zdq_queue_awaiting": ("awaiting_tasks", "Tasks done whose results await the driver's receipt."),
    "zdq_queue_consumers": ("consumers", "Consumers connected to the queue."),
    "zdq_queue_unique_keys": ("unique_keys", "Unique keys held by queued or running tasks (submit(unique_key=))."),
    "zdq_queue_throttled": ("throttled_tasks", "Tasks waiting now for a per-call rate limit's token."),
    "zdq_rate_limit_tasks_per_second": ("rate_limit", "The queue's own rate limit (its share of the pool's); 0: none."),
    "zdq_queue_kept_results": ("kept_tasks", "Tasks whose results the queue keeps after their driver took them (result_ttl)."),
    "zdq_queue_kept_bytes": ("kept_bytes", "Bytes of results the queue keeps after their driver took them (result_ttl)."),
}
COUNTERS = (*_QUEUE_COUNTERS, *_POOL_COUNTERS)
GAUGES = (*_QUEUE_GAUGES, "zdq_consumers_live")

_lock = threading.Lock()
_registered = False
_monitors: weakref.WeakSet[Any] = weakref.WeakSet()


class _Collector:
    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        try:
            status = _merged_status()
        except Exception:  # the rest of Dask's /metrics must not fail with it
            logger.exception("zdq metrics: the monitor's status failed")
            status = {}
        families: dict[str, Any] = {}
        for name, (_, help_) in _QUEUE_COUNTERS.items():
            families[name] = CounterMetricFamily(name, help_, labels=["pool", "queue"])
        for name, (_, help_) in _POOL_COUNTERS.items():
            families[name] = CounterMetricFamily(name, help_, labels=["pool"])
        for name, (_, help_) in _QUEUE_GAUGES.items():
            families[name] = GaugeMetricFamily(name, help_, labels=["pool", "queue"])
        live = GaugeMetricFamily("zdq_consumers_live", "Live consumers of the pool (running or idle).", labels=["pool"])
        rtt = HistogramMetricFamily(
            "zdq_chunk_round_trip_seconds", "From a chunk's lease to its DONE at the broker.", labels=["pool", "queue"]
        )
        for pool, view in status.items():
            for q in view["queues"]:
                labels = [pool, q["name"]]
                for name, (field, _) in _QUEUE_COUNTERS.items():
                    families[name].add_metric(labels, float(q.get(field, 0)))
                for name, (field, _) in _QUEUE_GAUGES.items():
                    families[name].add_metric(labels, float(q.get(field, 0)))
                buckets = q.get("round_trips")
                if buckets:
                    bounds = [*(f"{b:g}" for b in ROUND_TRIP_BOUNDS), "+Inf"]
                    cumulative, acc = [], 0
                    for bound, count in zip(bounds, buckets):
                        acc += int(count)
                        cumulative.append((bound, float(acc)))
                    rtt.add_metric(labels, cumulative, sum_value=float(q.get("round_trip_sum", 0.0)))
            for name, (field, _) in _POOL_COUNTERS.items():
                families[name].add_metric([pool], float(view["totals"][field]))
            live.add_metric([pool], float(len(view["consumers"])))
        yield from families.values()
        yield live
        yield rtt


def _merged_status() -> dict[str, Any]:
    pools: dict[str, Any] = {}
    for monitor in list(_monitors):
        if getattr(getattr(monitor.scheduler, "status", None), "name", "running") != "running":
            continue
        pools.update(monitor.status()["pools"])
    return pools


def register(dask_scheduler: Any) -> None:
    """Add the scheduler's monitor to the metrics; register the collector once per process.
    Without ``prometheus_client`` (Dask then serves no metrics either) this does nothing."""
    global _registered
    try:
        import prometheus_client
    except ImportError:
        logger.info("prometheus_client is not installed: no zdq metrics on /metrics")
        return
    _monitors.add(dask_scheduler.extensions["zdq"])
    with _lock:
        if not _registered:
            prometheus_client.REGISTRY.register(_Collector())
            _registered = True
