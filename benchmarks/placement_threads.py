"""Where placing a pool spends its CPU, thread by thread, beside bare Dask (issue 26, point 7).

``PYTHONPATH=$PWD python3 benchmarks/placement_threads.py WORKERS ROUNDS``: on a LocalCluster of
WORKERS processes, each round places bare Dask's trivial actors (``workers / 2 + 2 × workers``, as
``zdq bench --suite scale``), then ``QueuePool(client, workers / 2)`` and ``ConsumerPool(..., 2 ×
workers, start=True)``, and reads the CPU time of every thread of every worker (``W``) and of this
process (``L``: the client and the scheduler) before and after each (``/proc/self/task/*/schedstat``,
nanoseconds). Prints the CPU seconds per round by thread name, first round dropped. Threads that
work for what placing does (libzmq's I/O threads: the CurveZMQ handshakes; the ZAP handler; the
brokers' and consumers' threads) move little with the machine's load; the event loops move with
it (their periodic work grows with the time the placement lasts).
"""

from __future__ import annotations

import collections
import re
import sys
import time

from distributed import Client

from zdq import ConsumerPool, QueuePool
from zdq.benchmark.scale import _dask_placement, placement_cluster


def _threads() -> dict[str, float]:
    """CPU seconds of each thread of this process, by ``tid|name`` (names without numbers)."""
    import os
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                cpu = int(f.read().split()[0]) / 1e9
            with open(f"/proc/self/task/{tid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue  # ended meanwhile
        name = names.get(int(tid), "native:" + comm)
        name = re.sub(r"^\d+-", "", re.sub(r"[-_]?\d+$", "", re.sub(r"(zdq-[a-z]+-).*", r"\1*", name)))
        out[f"{tid}|{name}"] = cpu
    return out


def _snapshot(client: Client) -> dict[str, dict[str, float]]:
    snap: dict[str, dict[str, float]] = dict(client.run(_threads))
    snap["local"] = _threads()
    return snap


def _spent(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> collections.Counter[str]:
    spent: collections.Counter[str] = collections.Counter()
    for where, threads in after.items():
        for key, cpu in threads.items():
            prefix = "L " if where == "local" else "W "
            spent[prefix + key.split("|", 1)[1]] += cpu - before.get(where, {}).get(key, 0.0)
    return spent


def main(n: int, rounds: int) -> None:
    with placement_cluster(n) as client:
        q, c = max(1, n // 2), 2 * n
        dask: collections.Counter[str] = collections.Counter()
        zdq: collections.Counter[str] = collections.Counter()
        for r in range(rounds):
            before = _snapshot(client)
            _dask_placement(client, q + c)
            d = _spent(before, _snapshot(client))
            time.sleep(0.5)
            before = _snapshot(client)
            with QueuePool(client, q, keep_results=False) as qp, ConsumerPool(client, qp, n_consumers=c, start=True):
                z = _spent(before, _snapshot(client))
            time.sleep(0.5)
            if r:
                dask.update(d)
                zdq.update(z)
        k = max(1, rounds - 1)
        print(f"CPU s per round (mean of {k}), by thread: bare Dask | zdq")
        rows: dict[str, list[float]] = {}
        for name in set(dask) | set(zdq):
            group = re.sub(r"-\d+$", "", name)  # Dask's pool threads, one per worker: summed
            rows.setdefault(group, [0.0, 0.0])
            rows[group][0] += dask[name] / k
            rows[group][1] += zdq[name] / k
        for name, (a, b) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
            if a + b >= 0.001:
                print(f"  {name:40s} {a:7.3f} {b:7.3f}", flush=True)
        print(f"  {'TOTAL':40s} {sum(dask.values()) / k:7.3f} {sum(zdq.values()) / k:7.3f}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 3)
