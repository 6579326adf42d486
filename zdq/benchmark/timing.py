"""The ``timing`` suite of ``zdq bench``: delayed tasks.

- **release lateness**: on an idle pool (one queue, one consumer), tasks with an ``eta`` each
  ``_SPACING`` apart, so that every release finds the pool idle; a task's lateness is when it
  started (its own ``time.time()`` on the consumer) minus its ``eta``. p50 and p99 in ms (medians
  over ``repeat`` runs). Driver, broker and consumer share a host here: no clock skew is in it.
- **delayed memory**: ``delayed_tasks`` tasks submitted with a delay of an hour (``submit_iter``,
  chunks of ``batch_size``); the broker worker's resident memory before and after, per delayed
  task and per chunk, and the CPU the broker's process spends while they wait (it should be the
  idle process's own: nothing polls the delayed chunks).
"""

from __future__ import annotations

import datetime
import gc
import statistics
import time
from typing import Any

from distributed import Client

from zdq.benchmark.results import BenchConfig, CaseResult, percentiles
from zdq.benchmark.tasks import noop, now

__all__ = ["delayed_memory", "release_lateness"]

_SPACING = 0.02  # seconds between two releases: each finds the consumer idle
_LEAD = 0.2  # the first release, after the submissions are stored
_WAIT = 5.0  # seconds the broker's CPU is watched while the delayed tasks wait


def release_lateness(client: Client, config: BenchConfig, samples: int = 200) -> CaseResult:
    from zdq import ConsumerPool, QueuePool

    result = CaseResult("release", f"zdq eta= on an idle pool ({samples} releases)", samples)
    p50s, p99s, earliest = [], [], []
    with QueuePool(client, 1) as qp, ConsumerPool(client, qp, n_consumers=1) as cp:
        cp.start()
        qp.submit(noop, -1).result(timeout=60)  # warm up
        for _ in range(config.repeat):
            first = time.time() + _LEAD
            etas = [first + i * _SPACING for i in range(samples)]
            futures = [qp.submit(now, eta=datetime.datetime.fromtimestamp(t, datetime.timezone.utc)) for t in etas]
            starts = [f.result(timeout=60 + samples * _SPACING) for f in futures]
            result.seconds.append(max(starts) - first)
            late = [s - t for s, t in zip(starts, etas)]
            earliest.append(min(late))
            p50, p99 = percentiles(late)
            p50s.append(p50 * 1e3)
            p99s.append(p99 * 1e3)
    result.extra = {
        "late_p50_ms": statistics.median(p50s),
        "late_p99_ms": statistics.median(p99s),
        "least_late_ms": min(earliest) * 1e3,  # negative: a task started before its time (a bug)
    }
    return result


def _broker_process(dask_worker: Any = None) -> tuple[int, float]:
    import psutil

    gc.collect()
    proc = psutil.Process()
    cpu = proc.cpu_times()
    return proc.memory_info().rss, cpu.user + cpu.system


def delayed_memory(client: Client, config: BenchConfig) -> CaseResult:
    from zdq import QueuePool

    n = config.delayed_tasks
    result = CaseResult("delayed mem", "zdq delay=3600 (submit_iter)", n)
    with QueuePool(client, 1, chunk_size=config.batch_size) as qp:
        qp.submit(noop, -1)  # (no consumer: stays queued; the broker's imports are warm)
        qp.flush(timeout=60)
        worker = qp._workers()[0]
        (rss_before, _), = client.run(_broker_process, workers=[worker]).values()
        start = time.perf_counter()
        qp.submit_iter(((noop, i) for i in range(n)), delay=3600, batch_size=config.batch_size)
        qp.flush(timeout=600)
        result.seconds.append(time.perf_counter() - start)
        (rss_after, cpu_before), = client.run(_broker_process, workers=[worker]).values()
        time.sleep(_WAIT)
        (_, cpu_after), = client.run(_broker_process, workers=[worker]).values()
        [stats] = qp.broker_statistics()
    grown = rss_after - rss_before
    result.extra = {
        "delayed_tasks": stats.delayed_tasks,
        "delayed_chunks": stats.delayed_chunks,
        "broker_rss_growth_mib": grown / 2**20,
        "bytes_per_delayed_task": grown / n,
        "bytes_per_delayed_chunk": grown / max(1, stats.delayed_chunks),
        "broker_cpu_percent_while_waiting": 100 * (cpu_after - cpu_before) / _WAIT,
    }
    return result
