"""Alternated pairs of single-task round trips: the code of two trees, in turn, on one machine.

    python3 benchmarks/round_trip_pairs.py OLD_TREE NEW_TREE [PAIRS]

Each side is a fresh process with ``PYTHONPATH`` on its tree: a LocalCluster of 2 workers × 1
thread, 2 queues, 2 consumers with ``max_concurrency=1`` (``zdq bench --suite latency``'s layout),
5 runs of 300 ``submit(noop, i).result()`` and 300 floor round trips (TCP and ipc) each, and the
driver process's CPU time per round trip. Sides go OLD NEW, NEW OLD, ... (ABBA); the medians of the
per-pair ratios are printed with each side's load. Used for issue 26 point 4 (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import inspect
import json
import os
import statistics
import subprocess
import sys
import time


def _side() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from distributed import Client, LocalCluster

    from zdq import ConsumerPool, QueuePool
    from zdq.benchmark.cases import (
        _round_trips as trips,  # the latency suite's own timing
    )
    from zdq.benchmark.floor import floor_round_trip
    from zdq.benchmark.results import percentiles
    from zdq.benchmark.tasks import noop

    runs = []
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, worker_dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
        QueuePool(client, 2, keep_results=False) as qp,
        ConsumerPool(client, qp, n_consumers=2, max_concurrency=1) as cp,
    ):
        cp.start()
        qp.batch_submit([(noop, i) for i in range(1000)]).result(timeout=120)
        # A tree from before the ipc floor times the TCP floor twice.
        kwargs = {"ipc": True} if "ipc" in inspect.signature(floor_round_trip).parameters else {}
        with floor_round_trip() as floor, floor_round_trip(**kwargs) as ipc_floor:
            for i in range(300):
                qp.submit(noop, i).result(timeout=10)
            for _ in range(5):
                cpu = time.process_time()
                z = percentiles(trips(lambda i: qp.submit(noop, i).result(timeout=10), 300))
                cpu = (time.process_time() - cpu) / 300
                f = percentiles(trips(floor, 300))
                g = percentiles(trips(ipc_floor, 300))
                runs.append([z[0] * 1e3, z[1] * 1e3, f[0] * 1e3, f[1] * 1e3, cpu * 1e3, g[0] * 1e3])
    print(json.dumps(runs))


def _run(tree: str) -> list[list[float]]:
    env = {**os.environ, "PYTHONPATH": tree}
    out = subprocess.run(
        [sys.executable, __file__, "--side"], cwd=tree, env=env, capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    old, new = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    pairs = []
    for k in range(n):
        order = (old, new) if k % 2 == 0 else (new, old)
        got = {}
        for tree in order:
            got[tree] = _run(tree)
            load = os.getloadavg()[0]
            med = [statistics.median(r[i] for r in got[tree]) for i in range(6)]
            print(
                f"{'new' if tree == new else 'old'} load {load:.1f}: zdq p50 {med[0]:.3f} p99 {med[1]:.3f} ms, floor tcp "
                f"{med[2]:.3f} ipc {med[5]:.3f} ms, driver cpu/rt {med[4]:.3f} ms",
                flush=True,
            )
        pairs.append((got[old], got[new]))

    def ratio(i: int) -> list[float]:
        return [
            statistics.median(r[i] for r in b) / statistics.median(r[i] for r in a) for a, b in pairs
        ]

    for name, i in (("zdq p50", 0), ("zdq p99", 1), ("driver cpu/rt", 4)):
        rs = ratio(i)
        print(f"{name} new/old: median {statistics.median(rs):.3f} ({', '.join(f'{r:.2f}' for r in rs)})")
    for label, side in (("old", 0), ("new", 1)):
        vs_tcp = statistics.median(statistics.median(r[0] / r[2] for r in p[side]) for p in pairs)
        vs_ipc = statistics.median(statistics.median(r[0] / r[5] for r in p[side]) for p in pairs)
        print(f"{label}: zdq p50 / floor p50 (same run) {vs_tcp:.2f} over TCP, {vs_ipc:.2f} over ipc")


if __name__ == "__main__":
    _side() if sys.argv[1:] == ["--side"] else main()
