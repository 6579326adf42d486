"""Issue 26, point 2: the daskqueue path against the futures path and the bare pipeline, one run.

The bench's shape: ``LocalCluster`` 2 workers x 1 thread. Each round runs, in turn, the bare
pipeline (``zdq.benchmark.pipeline``), the futures path (``QueuePool(client, 2,
keep_results=False, chunk_size=1000)`` + 2 consumers, ``batch_submit(calls).result()``) and the
daskqueue path (``QueuePool(client, 1)``, ``ConsumerPool(..., n_consumers=2, batch_size=1000)``,
``batch_submit(calls, batch_size=10_000)``, ``start``, ``join``, ``results``: fresh pools, as
``zdq bench``). For the daskqueue path it also reports its phases, the CPU of the driver's I/O
thread per task (``/proc/self/task/TID/stat``), the messages that thread sent per chunk handed off
and received, and how long ``results()`` took. Prints one ``RESULT`` line (JSON). Run it in
alternated pairs (ABBA) against the tree before a change, each tree by its PYTHONPATH:

    PYTHONPATH=<tree> python3 benchmarks/daskqueue_pairs.py N_TASKS ROUNDS
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from typing import Any

from distributed import Client

import zdq.client.driver.loop as driver_loop
from zdq import ConsumerPool, QueuePool
from zdq.benchmark.cases import _client
from zdq.benchmark.pipeline import run_pipeline
from zdq.benchmark.results import BenchConfig
from zdq.benchmark.tasks import noop

_TICK = os.sysconf("SC_CLK_TCK")
_sent = [0]
_real_try_send = driver_loop.try_send


def _counting_try_send(sock: Any, frames: Any, *args: Any, **kwargs: Any) -> bool:
    _sent[0] += 1
    return _real_try_send(sock, frames, *args, **kwargs)


driver_loop.try_send = _counting_try_send  # the driver's I/O thread's sends, counted
_received = [0]
_real_handle = driver_loop.DriverLoop._handle


def _counting_handle(self: Any, link: Any, frames: Any) -> Any:
    _received[0] += 1
    return _real_handle(self, link, frames)


driver_loop.DriverLoop._handle = _counting_handle  # type: ignore[method-assign]  # and its receipts


def _thread_cpu(native_id: int) -> float:
    """Seconds of CPU (user + system) of one thread of this process."""
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _io_thread() -> int:
    threads = [t for t in threading.enumerate() if t.name.startswith("zdq-driver-")]
    assert len(threads) == 1, [t.name for t in threads]
    assert threads[0].native_id is not None
    return threads[0].native_id


def daskqueue_round(client: Client, n: int) -> dict[str, float]:
    calls = [(noop,) for _ in range(n)]
    out: dict[str, float] = {}
    with QueuePool(client, 1) as qp, ConsumerPool(client, qp, n_consumers=2, batch_size=1000) as cp:
        qp.batch_submit([(noop,) for _ in range(1000)], batch_size=10_000)
        cp.start()
        cp.join(timeout=120)
        cp.results()
        tid = _io_thread()
        sent0, got0, cpu0 = _sent[0], _received[0], _thread_cpu(tid)
        t0 = time.perf_counter()
        qp.batch_submit(calls, batch_size=10_000)
        t1 = time.perf_counter()
        cp.start()
        cp.join(timeout=300)
        t2 = time.perf_counter()
        cpu_io = _thread_cpu(tid) - cpu0
        sent, received = _sent[0] - sent0, _received[0] - got0
        got = cp.results()
        t3 = time.perf_counter()
        assert sum(len(v) for v in got.values()) == n + 1000, {k: len(v) for k, v in got.items()}
    out["dq_rate"] = n / (t3 - t0)
    out["dq_submit_s"] = t1 - t0
    out["dq_run_s"] = t2 - t1
    out["dq_results_s"] = t3 - t2
    out["dq_io_cpu_ns_per_task"] = cpu_io / n * 1e9
    out["dq_sent_per_chunk"] = sent / (n / 1000)
    out["dq_received_per_chunk"] = received / (n / 1000)
    return out


def futures_round(qp: QueuePool, n: int) -> float:
    calls = [(noop, i) for i in range(n)]
    t0 = time.perf_counter()
    qp.batch_submit(calls).result(timeout=300)
    return n / (time.perf_counter() - t0)


def main() -> None:
    n, rounds = int(sys.argv[1]), int(sys.argv[2])
    rows: list[dict[str, float]] = []
    with _client(BenchConfig()) as client:  # zdq bench's embedded cluster: 2 workers x 1 thread
        for _ in range(rounds):
            row: dict[str, float] = {"bare": n / min(run_pipeline(n, 1000, 1))}
            with (
                QueuePool(client, 2, keep_results=False, chunk_size=1000) as qp,
                ConsumerPool(client, qp, n_consumers=2) as cp,
            ):
                cp.start()
                qp.batch_submit([(noop, i) for i in range(1000)]).result(timeout=120)
                row["futures"] = futures_round(qp, n)
            row.update(daskqueue_round(client, n))
            row["dq_vs_futures"] = row["dq_rate"] / row["futures"]
            row["futures_vs_bare"] = row["futures"] / row["bare"]
            rows.append(row)
    median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print("RESULT", json.dumps({"median": median, "rows": rows, "load": os.getloadavg()}))


if __name__ == "__main__":
    main()
