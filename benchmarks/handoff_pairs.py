"""Issue 26, point 2: the daskqueue path's hand-off alone, and what it costs each thread.

``batch_submit`` of N ``(noop,)`` calls in chunks of 1,000 to ``QueuePool(client, 1)`` with no
consumer, then ``flush()`` (every chunk stored and confirmed), less the time spent pickling
(``Chunking.pack_batch``); ROUNDS times per process, each on a fresh pool. Also the CPU of the
driver's I/O thread and of the broker's thread (``/proc/PID/task/TID/stat``, 10 ms ticks) per
chunk over all rounds. ``--durable`` puts the queue on LMDB. Prints one ``RESULT`` line (JSON).
Run it in alternated pairs (ABBA) against the tree before a change, each tree by its PYTHONPATH:

    PYTHONPATH=<tree> python3 benchmarks/handoff_pairs.py N ROUNDS [--durable]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from typing import Any

from distributed import Client, LocalCluster

from zdq import QueuePool
from zdq.benchmark.tasks import noop
from zdq.codec.chunking import Chunking

_packing = [0.0]
_real_pack = Chunking.pack_batch


def _timed_pack(self: Any, *args: Any, **kwargs: Any) -> Any:
    start = time.perf_counter()
    try:
        return _real_pack(self, *args, **kwargs)
    finally:
        _packing[0] += time.perf_counter() - start


Chunking.pack_batch = _timed_pack  # type: ignore[method-assign]


def threads_cpu(prefix: str) -> float:
    """Seconds of CPU of this process's threads whose name starts with ``prefix``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for t in threading.enumerate():
        if t.name.startswith(prefix) and t.native_id is not None:
            with open(f"/proc/self/task/{t.native_id}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def main() -> None:
    n, rounds = int(sys.argv[1]), int(sys.argv[2])
    durable = "--durable" in sys.argv
    chunks = n // 1000
    best, io_cpu, broker_cpu = [], 0.0, 0.0
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, worker_dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
        tempfile.TemporaryDirectory() as tmp,
    ):
        for r in range(rounds):
            options: dict[str, Any] = {"durability": "durable", "dirpath": f"{tmp}/{r}"} if durable else {}
            with QueuePool(client, 1, **options) as qp:
                qp.batch_submit([(noop,)], batch_size=1000)
                qp.flush(timeout=60)
                calls = [(noop,) for _ in range(n)]
                b0 = sum(client.run(threads_cpu, "zdq-broker-").values())
                io0, _packing[0] = threads_cpu("zdq-driver-"), 0.0
                start = time.perf_counter()
                qp.batch_submit(calls, batch_size=1000)
                qp.flush(timeout=120)
                best.append(time.perf_counter() - start - _packing[0])
                io_cpu += threads_cpu("zdq-driver-") - io0
                broker_cpu += sum(client.run(threads_cpu, "zdq-broker-").values()) - b0
    out = {
        "best_us_per_chunk": min(best) / chunks * 1e6,
        "median_us_per_chunk": sorted(best)[len(best) // 2] / chunks * 1e6,
        "io_thread_cpu_us_per_chunk": io_cpu / (rounds * chunks) * 1e6,
        "broker_thread_cpu_us_per_chunk": broker_cpu / (rounds * chunks) * 1e6,
        "load": os.getloadavg(),
    }
    print("RESULT", json.dumps(out))


if __name__ == "__main__":
    main()
