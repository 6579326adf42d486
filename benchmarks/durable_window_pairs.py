"""Issue 26, point 5, third pass: pools with different windows in turn, in one cluster.

``zdq bench``'s layout (``LocalCluster`` 2 workers x 1 thread, 2 queues, 2 consumers, chunks of
1,000 no-ops). Each round opens one pool per variant, in turn (order reversed every other round,
so that every variant sees the same load), times 3 batches of N no-ops and keeps the median run's
rate. A variant is ``t:W`` (transient) or ``d:W`` (durable, LMDB synced), ``W`` the pool's
``window=`` or ``-`` for its default (a durable pool's is ``zdq.durable.window``). One line per
round (load, rates in M/s), then every rate as JSON.

    PYTHONPATH=<tree> python3 benchmarks/durable_window_pairs.py N ROUNDS t:-,d:16,d:-
"""

from __future__ import annotations

import json
import sys
import tempfile
from typing import Any

from distributed import Client

from zdq.benchmark.cases import _client, _noop_calls, _pools, _time_batches
from zdq.benchmark.results import BenchConfig, CaseResult


def rate(client: Client, config: BenchConfig, variant: str) -> float:
    """The median run's tasks per second of one pool of ``variant``."""
    kind, window = variant.split(":")
    options: dict[str, Any] = {} if window == "-" else {"window": int(window)}
    result = CaseResult("no-op", variant, config.tasks)
    if kind == "d":
        with tempfile.TemporaryDirectory(prefix="zdq-window-") as dirpath:
            with _pools(client, config, durability="durable", dirpath=dirpath, **options) as qp:
                _time_batches(qp, _noop_calls, config.tasks, config.repeat, result)
    else:
        with _pools(client, config, **options) as qp:
            _time_batches(qp, _noop_calls, config.tasks, config.repeat, result)
    return config.tasks / sorted(result.seconds)[len(result.seconds) // 2]


def main() -> None:
    n, rounds, variants = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
    config = BenchConfig(tasks=n, repeat=3)
    rates: dict[str, list[float]] = {v: [] for v in variants}
    with _client(config) as client:  # zdq bench's embedded cluster: 2 workers x 1 thread
        for r in range(rounds):
            for variant in variants if r % 2 == 0 else variants[::-1]:
                rates[variant].append(rate(client, config, variant))
            with open("/proc/loadavg") as f:
                load = f.read().split()[0]
            print(load, {v: round(x[-1] / 1e6, 3) for v, x in rates.items()}, flush=True)
    print(json.dumps(rates))


if __name__ == "__main__":
    main()
