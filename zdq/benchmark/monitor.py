"""``zdq bench --suite monitor``: what watching a pool costs the Dask scheduler.

A LocalCluster with its dashboard is started, bare Dask's own load on the scheduler is measured
over a quiet interval, then a pool of ``--queues`` queues (100 by default) and ``--consumers``
consumers is placed and runs ``--tasks`` no-op tasks. Measured:

- **messages**: ``zdq-report`` messages the scheduler received per second (one per worker process
  and ``report-interval``, whatever the number of queues), and queue/consumer entries per second;
- **scheduler CPU**: the scheduler's CPU (this process: a LocalCluster's scheduler runs in it) over a
  quiet interval with the pool placed and reporting, minus bare Dask's, as a share of one core;
- **page and scrape**: milliseconds to serve ``/zdq/status.json`` and ``/metrics`` at that size;
- **throughput** of the no-op tasks with reporting on, for comparison with ``--suite quick``.
"""

from __future__ import annotations

import time
import urllib.request
from typing import Any

import psutil
from distributed import Client, LocalCluster

from zdq.benchmark.tasks import noop

__all__ = ["run_monitor", "format_monitor"]

#: Seconds of quiet over which load is measured.
_QUIET_SECONDS = 5.0


def _cpu() -> float:
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


def _monitor_counts(dask_scheduler: Any = None) -> tuple[int, int]:
    monitor = dask_scheduler.extensions.get("zdq")
    return (0, 0) if monitor is None else (monitor.reports, monitor.entries)


def _fetch_ms(url: str, repeat: int = 5) -> float:
    took = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as response:
            response.read()
        took.append(time.perf_counter() - t0)
    return sorted(took)[len(took) // 2] * 1000


def run_monitor(queues: int, consumers: int, workers: int, tasks: int, quiet: float = _QUIET_SECONDS) -> dict[str, Any]:
    from zdq import ConsumerPool, QueuePool

    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0",
            worker_dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(workers, timeout=300)
        http = str(cluster.dashboard_link).rsplit("/status", 1)[0]
        time.sleep(1.0)
        c0 = _cpu()
        time.sleep(quiet)
        bare = (_cpu() - c0) / quiet
        with QueuePool(client, queues, keep_results=False) as qp, ConsumerPool(client, qp, n_consumers=consumers, start=True):
            t0 = time.perf_counter()
            qp.batch_submit([(noop, i) for i in range(tasks)]).result(timeout=600)
            rate = tasks / (time.perf_counter() - t0)
            time.sleep(2.0)  # every worker's feed has found the monitor and reports
            r0, e0 = client.run_on_scheduler(_monitor_counts)
            c0, w0 = _cpu(), time.perf_counter()
            time.sleep(quiet)
            elapsed = time.perf_counter() - w0
            load = (_cpu() - c0) / elapsed
            r1, e1 = client.run_on_scheduler(_monitor_counts)
            status_ms = _fetch_ms(f"{http}/zdq/status.json")
            metrics_ms = _fetch_ms(f"{http}/metrics")
    return {
        "queues": queues,
        "consumers": consumers,
        "workers": workers,
        "tasks": tasks,
        "tasks_per_second": rate,
        "reports_per_second": (r1 - r0) / elapsed,
        "entries_per_second": (e1 - e0) / elapsed,
        "scheduler_cpu_bare": bare,
        "scheduler_cpu_with_pool": load,
        "scheduler_cpu_added": max(0.0, load - bare),
        "status_json_ms": status_ms,
        "metrics_ms": metrics_ms,
    }


def format_monitor(report: dict[str, Any]) -> str:
    r = report
    return "\n".join(
        [
            f"pool: {r['queues']} queues, {r['consumers']} consumers on {r['workers']} workers; "
            f"{r['tasks']} no-op tasks at {r['tasks_per_second']:,.0f}/s",
            f"scheduler receives {r['reports_per_second']:.2f} zdq-report messages/s "
            f"({r['entries_per_second']:.1f} queue/consumer entries/s)",
            f"scheduler CPU: {r['scheduler_cpu_bare'] * 100:.2f}% of a core bare, "
            f"{r['scheduler_cpu_with_pool'] * 100:.2f}% with the pool reporting "
            f"(+{r['scheduler_cpu_added'] * 100:.2f}%; this process also hosts the client)",
            f"/zdq/status.json served in {r['status_json_ms']:.1f} ms, /metrics in {r['metrics_ms']:.1f} ms (median of 5)",
        ]
    )
