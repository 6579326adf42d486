"""Issue 26, point 3: the futures path against the bare pipeline, with the CPU of every process.

``zdq bench``'s shape: ``LocalCluster`` 2 workers x 1 thread; ``QueuePool(client, 2,
keep_results=False, chunk_size=1000)`` + ``ConsumerPool(client, qp, n_consumers=2)``,
``batch_submit(calls).result()`` of ``N`` no-op calls (``zdq.benchmark.cases.zdq_noop``), and the
bare pipeline (``zdq.benchmark.pipeline``), in turn, ``ROUNDS`` times. Per round: both rates,
their ratio, how long ``batch_submit`` took to return, when (wall) and after how much CPU of the
calling thread it first handed chunks to the driver (``first_ms``, ``first_cpu_ms``: the serial
phase, the whole batch checked and pickled), and CPU ns per task of the driver's calling thread, its I/O thread,
the driver's process, and each worker process (``/proc/PID/task/TID/schedstat``: nanoseconds, summed
over a process's threads alive at both reads; ``stat``'s 10 ms ticks where there is none). Prints one
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
    """Seconds of CPU of the process or thread whose ``stat`` file of /proc is ``path``: from its
    ``schedstat`` (nanoseconds; a process's is its main thread's only, so a process is summed over
    its threads), else from ``stat`` (user + system, 10 ms ticks)."""
    base = path.rsplit("/", 1)[0]
    try:
        if "/task/" in path:
            return _schedstat(f"{base}/schedstat")
        return sum(_schedstat(f"{base}/task/{tid}/schedstat") for tid in os.listdir(f"{base}/task"))
    except OSError:
        pass
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _schedstat(path: str) -> float:
    try:
        with open(path) as f:
            return int(f.read().split()[0]) / 1e9
    except FileNotFoundError:  # a thread that ended meanwhile
        return 0.0


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
                io = [t.native_id for t in threading.enumerate() if t.name.startswith("zdq-driver")][0]
                before = [_cpu(f"/proc/self/task/{me}/stat"), _cpu("/proc/self/stat"), _cpu(f"/proc/self/task/{io}/stat")] + [
                    _cpu(f"/proc/{pid}/stat") for pid in pids
                ]
                handoffs.clear()
                start, start_cpu = time.perf_counter(), time.thread_time()
                batch = qp.batch_submit(calls)
                submitted = time.perf_counter() - start
                values = batch.result(timeout=300)
                seconds = time.perf_counter() - start
                after = [_cpu(f"/proc/self/task/{me}/stat"), _cpu("/proc/self/stat"), _cpu(f"/proc/self/task/{io}/stat")] + [
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
                        "cpu_ns": {"calling": ns[0], "driver": ns[1], "io": ns[2], "workers": ns[3:], "all": ns[1] + sum(ns[3:])},
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
        "cpu_calling": statistics.median(r["cpu_ns"]["calling"] for r in rows),
        "cpu_io": statistics.median(r["cpu_ns"]["io"] for r in rows),
        "cpu_driver": statistics.median(r["cpu_ns"]["driver"] for r in rows),
        "cpu_workers": statistics.median(sum(r["cpu_ns"]["workers"]) for r in rows),
        "rows": rows,
    }
    print("RESULT", json.dumps(summary))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
