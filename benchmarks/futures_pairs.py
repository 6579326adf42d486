"""Issue 26, point 3: the futures path against the bare pipeline, with the CPU of every process.

``zdq bench``'s shape: ``LocalCluster`` 2 workers x 1 thread; ``QueuePool(client, 2,
keep_results=False, chunk_size=1000)`` + ``ConsumerPool(client, qp, n_consumers=2)``,
``batch_submit(calls).result()`` of ``N`` no-op calls (``zdq.benchmark.cases.zdq_noop``), and the
bare pipeline (``zdq.benchmark.pipeline``), in turn, ``ROUNDS`` times. Per round: both rates,
their ratio, how long ``batch_submit`` took to return, when (wall) and after how much CPU of the
calling thread it first handed chunks to the driver (``first_ms``, ``first_cpu_ms``: the serial
phase, the whole batch checked and pickled), and CPU ns per task of the driver's calling thread,
the driver's process, and each worker process (``/proc/PID/stat``, ``/proc/self/task/TID/stat``: 10 ms ticks). Prints one
``RESULT`` line (JSON). Run it in alternated pairs (ABBA) against the tree before a change:

    PYTHONPATH=<tree> python3 benchmarks/futures_pairs.py N_TASKS ROUNDS
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from typing import Any

from distributed import Client, LocalCluster

from zdq import ConsumerPool, QueuePool
from zdq.benchmark.pipeline import run_pipeline
from zdq.benchmark.tasks import noop

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu(path: str) -> float:
    """Seconds of CPU (user + system) in a ``stat`` file of /proc."""
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _worker_pid() -> int:
    return os.getpid()


def main(n: int, rounds: int) -> None:
    rows: list[dict[str, Any]] = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(
        cluster
    ) as client:
        pids = list(client.run(_worker_pid).values())
        me = threading.get_native_id()
        with QueuePool(client, 2, keep_results=False, chunk_size=1000) as qp, ConsumerPool(
            client, qp, n_consumers=2
        ) as cp:
            cp.start()
            qp.batch_submit([(noop, i) for i in range(1000)]).result(timeout=120)  # warm up
            handoffs: list[float] = []  # when the caller first hands chunks to the driver
            submit_chunks = qp.driver.submit_chunks

            def timed(*args: Any, **kwargs: Any) -> int:
                if not handoffs:
                    handoffs.extend((time.perf_counter(), time.thread_time()))
                return submit_chunks(*args, **kwargs)

            qp.driver.submit_chunks = timed  # type: ignore[method-assign]
            for _ in range(rounds):
                bare = min(run_pipeline(n, repeat=1))
                calls = [(noop, i) for i in range(n)]
                before = [_cpu(f"/proc/self/task/{me}/stat"), _cpu("/proc/self/stat")] + [
                    _cpu(f"/proc/{pid}/stat") for pid in pids
                ]
                handoffs.clear()
                start, start_cpu = time.perf_counter(), time.thread_time()
                batch = qp.batch_submit(calls)
                submitted = time.perf_counter() - start
                values = batch.result(timeout=300)
                seconds = time.perf_counter() - start
                after = [_cpu(f"/proc/self/task/{me}/stat"), _cpu("/proc/self/stat")] + [
                    _cpu(f"/proc/{pid}/stat") for pid in pids
                ]
                assert len(values) == n
                ns = [round((a - b) * 1e9 / n) for a, b in zip(after, before)]
                rows.append(
                    {
                        "futures": n / seconds,
                        "bare": n / bare,
                        "ratio": bare / seconds,
                        "submit_ms": submitted * 1e3,
                        "first_ms": (handoffs[0] - start) * 1e3,
                        "first_cpu_ms": (handoffs[1] - start_cpu) * 1e3,
                        "cpu_ns": {"calling": ns[0], "driver": ns[1], "workers": ns[2:], "all": ns[1] + sum(ns[2:])},
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    summary = {
        "tree": os.environ.get("PYTHONPATH", ""),
        "load": open("/proc/loadavg").read().split()[:3],
        "futures": statistics.median(r["futures"] for r in rows),
        "bare": statistics.median(r["bare"] for r in rows),
        "ratio": statistics.median(r["ratio"] for r in rows),
        "submit_ms": statistics.median(r["submit_ms"] for r in rows),
        "first_ms": statistics.median(r["first_ms"] for r in rows),
        "first_cpu_ms": statistics.median(r["first_cpu_ms"] for r in rows),
        "cpu_all": statistics.median(r["cpu_ns"]["all"] for r in rows),
        "rows": rows,
    }
    print("RESULT", json.dumps(summary))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
