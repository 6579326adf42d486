"""Issue 26, point 5 (authentication): per chunk, where the CPU of each process's threads goes,
with CurveZMQ and without, in one cluster.

``zdq bench``'s layout (``LocalCluster`` 2 workers x 1 thread, ``QueuePool(client, 2)``, two
consumers, chunks of 1,000 no-ops), two pools placed side by side (one with authentication, one
without); ROUNDS rounds, each a ``batch_submit`` of N no-ops to each pool in turn (ABBA order).
For each batch: its wall time and every thread's CPU (``/proc/PID/task/TID/schedstat``, nanoseconds)
in the driver and both workers, grouped by role (libzmq's I/O threads, brokers, consumers, ...).

    PYTHONPATH=<tree> python3 benchmarks/point5_auth.py N ROUNDS
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time

from distributed import Client, LocalCluster

from zdq.benchmark.cases import _pools
from zdq.benchmark.results import BenchConfig
from zdq.benchmark.tasks import noop

_ROLES = (("zdq-broker-", "broker"), ("zdq-consumer-", "consumer io"), ("zdq-exec-", "consumer exec"),
          ("zdq-driver-", "driver io"), ("zdq-callbacks-", "driver callbacks"), ("ZMQbg/IO", "zmq io"),
          ("MainThread", "main"))


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process (``schedstat``: nanoseconds), summed by role."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
            with open(f"/proc/self/task/{tid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        name = names.get(int(tid), comm)
        role = next((r for prefix, r in _ROLES if name.startswith(prefix)), "other " + name.rstrip("0123456789-_")[:18])
        out[role] = out.get(role, 0.0) + ns / 1e9
    return out


def snapshot(client: Client) -> dict[str, dict[str, float]]:
    workers = client.run(thread_cpu)
    out = {f"w{i} {role}": v for i, w in enumerate(sorted(workers)) for role, v in workers[w].items()}
    return out | {f"drv {role}": v for role, v in thread_cpu().items()}


def main() -> None:
    n, rounds = int(sys.argv[1]), int(sys.argv[2])
    config = BenchConfig(tasks=n)
    chunks = n / config.batch_size
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                     worker_dashboard_address=None) as cluster,
        Client(cluster) as client,
        _pools(client, config) as secure,
        _pools(client, config, auth=False) as plain,
    ):
        pools = {"auth": secure, "plain": plain}
        seconds: dict[str, list[float]] = {"auth": [], "plain": []}
        cpu: dict[str, dict[str, list[float]]] = {"auth": {}, "plain": {}}
        for r in range(rounds):
            order = ["auth", "plain"] if r % 2 == 0 else ["plain", "auth"]
            for kind in order:
                before = snapshot(client)
                start = time.perf_counter()
                pools[kind].batch_submit([(noop, i) for i in range(n)]).result()
                seconds[kind].append(time.perf_counter() - start)
                after = snapshot(client)
                for key in after:
                    cpu[kind].setdefault(key, []).append(1e6 * (after[key] - before.get(key, 0.0)) / chunks)
    ratios = [p / a for a, p in zip(seconds["auth"], seconds["plain"])]
    print(json.dumps({"load": os.getloadavg()[0], "rate auth/plain per round": [round(x, 3) for x in ratios],
                      "median": round(statistics.median(ratios), 3)}))
    print(f"{'us CPU per chunk (median)':28s} {'auth':>8s} {'plain':>8s} {'paired diff':>12s}")
    keys = sorted(set(cpu["auth"]) | set(cpu["plain"]))
    zeros = [0.0] * rounds
    totals = {kind: [sum(cpu[kind].get(k, zeros)[r] for k in keys) for r in range(rounds)] for kind in cpu}
    for key in keys:
        a, p = cpu["auth"].get(key, zeros), cpu["plain"].get(key, zeros)
        if statistics.median(a) or statistics.median(p):
            # the diff of each round's pair (the same moment's load), then their median
            diff = statistics.median(x - y for x, y in zip(a, p))
            print(f"{key:28s} {statistics.median(a):8.1f} {statistics.median(p):8.1f} {diff:12.1f}")
    diffs = sorted(x - y for x, y in zip(totals["auth"], totals["plain"]))
    q = len(diffs) // 4
    print(f"{'total':28s} {statistics.median(totals['auth']):8.1f} {statistics.median(totals['plain']):8.1f} "
          f"{statistics.median(diffs):12.1f} (quartiles {diffs[q]:.1f} .. {diffs[-q - 1]:.1f})")
    print("wall us per chunk: auth", round(1e6 * statistics.median(seconds["auth"]) / chunks, 1),
          "plain", round(1e6 * statistics.median(seconds["plain"]) / chunks, 1))


if __name__ == "__main__":
    main()
