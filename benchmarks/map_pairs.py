"""Issue 26, point 6: the futures path, ``Executor.map`` and ``queue_pool.map`` in one run.

The bench's shape: 2 workers x 1 thread, ``QueuePool(client, 2, keep_results=False,
chunk_size=1000)``, 2 consumers. Prints one ``RESULT`` line: the rates, the driver process's CPU
per task (``time.process_time``) and the map/futures ratios. Run it in alternated pairs (ABBA)
against the tree before a change, each tree by its PYTHONPATH:

    PYTHONPATH=<tree> python3 benchmarks/map_pairs.py N_FUTURES N_MAP [map|qpmap]

``map`` or ``qpmap``: a cProfile of that case (the calling thread only) is printed first.
"""

from __future__ import annotations

import cProfile
import json
import pstats
import sys
import time
from collections.abc import Callable
from typing import Any

from distributed import Client, LocalCluster

from zdq import ConsumerPool, QueuePool
from zdq.benchmark.tasks import noop


def _timed(out: dict[str, float], name: str, n: int, run: Callable[[], Any], profile: cProfile.Profile | None) -> None:
    """``run()``'s rate and the process's CPU per task, under ``profile`` if given."""
    start, cpu = time.perf_counter(), time.process_time()
    if profile is not None:
        profile.enable()
    run()
    if profile is not None:
        profile.disable()
    out[name] = n / (time.perf_counter() - start)
    out[f"{name}_cpu_us"] = (time.process_time() - cpu) / n * 1e6


def main() -> None:
    n_futures, n_map = int(sys.argv[1]), int(sys.argv[2])
    profiled = sys.argv[3] if len(sys.argv) > 3 else ""
    profile = cProfile.Profile() if profiled else None
    out: dict[str, float] = {}
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, worker_dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
        QueuePool(client, 2, keep_results=False, chunk_size=1000) as qp,
        ConsumerPool(client, qp, n_consumers=2) as cp,
    ):
        cp.start()
        qp.batch_submit([(noop, i) for i in range(1000)]).result(timeout=120)  # warm up
        _timed(out, "futures", n_futures,
               lambda: qp.batch_submit([(noop, i) for i in range(n_futures)]).result(timeout=300), None)
        with qp.executor() as executor:
            def mapped() -> None:
                count = sum(1 for _ in executor.map(noop, range(n_map), buffersize=20_000))
                assert count == n_map

            _timed(out, "map", n_map, mapped, profile if profiled == "map" else None)
        _timed(out, "qpmap", n_map, lambda: [f.result(300) for f in qp.map(noop, range(n_map))],
               profile if profiled == "qpmap" else None)
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(18)
    out["map/fut"] = out["map"] / out["futures"]
    out["qpmap/fut"] = out["qpmap"] / out["futures"]
    print("RESULT", json.dumps({k: round(v, 3) for k, v in out.items()}))


if __name__ == "__main__":
    main()
