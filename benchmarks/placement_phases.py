"""Where placing a pool spends its time, phase by phase, beside bare Dask (issue 26, point 7).

``PYTHONPATH=$PWD python3 benchmarks/placement_phases.py WORKERS ROUNDS``: on a LocalCluster of
WORKERS processes, each round places bare Dask's trivial actors (``workers / 2 + 2 × workers`` of
them, as ``zdq bench --suite scale``), once fetching their proxies one ``result()`` at a time
(``dask_seq``) and once at once (``dask``, the suite's floor), then ``QueuePool(client, workers / 2)``
and ``ConsumerPool(..., 2 × workers, start=True)``. It prints the seconds of each, the ratio, the
CPU of every process (workers, scheduler and client) over each, and the seconds of each phase of
the pools' placement (the client's functions timed by wrapping them: nothing else changes).
Alternate trees (old, new, new, old) and drop each process's first round (imports, warm-up).
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Any

import psutil
from distributed import Client

from zdq import ConsumerPool, QueuePool
from zdq.benchmark.scale import _dask_placement, placement_cluster
from zdq.client import brokers, consumer_pool, consumer_reach, consumers, queue_pool

PHASES: list[tuple[str, float]] = []


def timed(owner: Any, name: str, label: str) -> None:
    """Wrap ``owner.name`` to note its seconds under ``label``."""
    f = getattr(owner, name)

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            PHASES.append((label, time.perf_counter() - start))

    setattr(owner, name, wrapper)


for _owner, _name, _label in (
    (brokers.PlacedQueues, "place", "brokers.place"),
    (queue_pool, "ensure_installed", "ensure_installed"),
    (queue_pool.QueuePool, "_start_driver", "start_driver"),
    (queue_pool.QueuePool, "_check_reach", "qp.check_reach"),
    (brokers.PlacedQueues, "publish", "publish"),
    (queue_pool.QueuePool, "_supervise", "qp.supervise"),
    (consumers.ConsumerSlots, "place_all", "consumers.place_all"),
    (consumer_reach.ConsumerReach, "check_reach", "consumers.check_reach"),
    (consumers.ConsumerSlots, "each", "consumers.each"),
    (consumer_pool, "allowed_workers", "allowed_workers"),
):
    timed(_owner, _name, _label)


def _cpu() -> float:
    t = psutil.Process().cpu_times()
    return float(t.user + t.system)


def all_cpu(client: Client) -> float:
    return sum(client.run(_cpu).values()) + _cpu()


def main(n: int, rounds: int) -> None:
    with placement_cluster(n) as client:
        q, c = max(1, n // 2), 2 * n
        for _ in range(rounds):
            seq = _dask_placement(client, q + c, one_by_one=True)
            time.sleep(0.5)
            c0 = all_cpu(client)
            dask = _dask_placement(client, q + c)
            dask_cpu = all_cpu(client) - c0
            time.sleep(0.5)
            PHASES.clear()
            c0 = all_cpu(client)
            t0 = time.perf_counter()
            with QueuePool(client, q, keep_results=False) as qp:
                t1 = time.perf_counter()
                with ConsumerPool(client, qp, n_consumers=c, start=True):
                    t2 = time.perf_counter()
                    zdq_cpu = all_cpu(client) - c0
            print(
                f"n={n} dask_seq={seq:.2f}s dask={dask:.2f}s zdq={t2 - t0:.2f}s (qp {t1 - t0:.2f} cp {t2 - t1:.2f}) "
                f"ratio={(t2 - t0) / dask:.2f} per_actor={(t2 - t0) / (q + c):.4f} cpu_dask={dask_cpu:.2f} "
                f"cpu_zdq={zdq_cpu:.2f} cpu_ratio={zdq_cpu / dask_cpu:.2f}",
                flush=True,
            )
            print("   " + ", ".join(f"{k}={v:.3f}" for k, v in PHASES), flush=True)
            time.sleep(1)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2)
