"""Issue 26, point 5: per chunk, what a durable queue's commits cost its broker, and what travels
on the encrypted links.

``zdq bench``'s layout (``LocalCluster`` 2 workers x 1 thread, ``QueuePool(client, 2)``, two
consumers, chunks of 1,000 no-ops), RUNS batches of N tasks, with the workers' code wrapped
(``client.run``) to count:

- ``commits`` (a durable pool): synced commits that store chunks (``LMDBStorage._write``) and
  those of held bookkeeping alone (``LMDBStorage.commit``), the explicit meta-page flushes of a
  tree with one flush a commit (``LMDBStorage._sync_meta``, design 2; none before), the broker loop's wall time inside each
  (it does nothing else meanwhile), and the broker threads' CPU (``/proc/PID/task/TID/stat``,
  10 ms ticks). One JSON line.
- ``wire`` (a transient pool, CurveZMQ on): messages and bytes (frames before encryption) by type:
  "out X" what brokers send, "in X" what brokers and consumers (the same processes) decode.

Run it in alternated pairs against the tree before a change, each tree by its PYTHONPATH:

    PYTHONPATH=<tree> python3 benchmarks/point5_counts.py commits|wire N RUNS
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

from zdq.benchmark.cases import _pools
from zdq.benchmark.results import BenchConfig
from zdq.benchmark.tasks import noop


def _add(counts: dict[str, Any], key: str, *values: float) -> None:
    old = counts.get(key, [0.0] * len(values))
    counts[key] = [a + b for a, b in zip(old, values)]


def install_commits() -> None:
    from zdq.storage import lmdb as zl

    counts = zl._POINT5 = {}  # type: ignore[attr-defined]
    write, commit = zl.LMDBStorage._write, zl.LMDBStorage.commit

    def timed_write(self: Any, records: list[Any], dead: Any = None) -> None:
        start = time.perf_counter()
        write(self, records, dead)
        _add(counts, "put_commits", 1, len(records), time.perf_counter() - start)

    def timed_commit(self: Any, force: bool = False) -> None:
        held = len(self._pending) + len(self._marks)
        start = time.perf_counter()
        commit(self, force=force)
        if held and not (self._pending or self._marks):
            _add(counts, "own_commits", 1, time.perf_counter() - start)

    zl.LMDBStorage._write, zl.LMDBStorage.commit = timed_write, timed_commit
    sync_meta = getattr(zl.LMDBStorage, "_sync_meta", None)
    if sync_meta is not None:  # a tree with one flush a commit (design 2): its explicit meta flushes

        def timed_sync_meta(self: Any) -> None:
            start = time.perf_counter()
            sync_meta(self)
            _add(counts, "meta_flushes", 1, time.perf_counter() - start)

        zl.LMDBStorage._sync_meta = timed_sync_meta


def install_wire() -> None:
    from zdq.broker import core

    counts = core._POINT5 = {}  # type: ignore[attr-defined]
    decode, encode, send = core.p.decode, core.p.encode, core.BrokerCore._send

    def counted_decode(frames: Any) -> Any:
        msg = decode(frames)
        _add(counts, "in " + type(msg).__name__, 1, sum(len(f) for f in frames))
        return msg

    def counted_send(self: Any, ident: bytes, msg: Any) -> Any:
        _add(counts, "out " + type(msg).__name__, 1, sum(len(f) for f in encode(msg)))
        return send(self, ident, msg)

    core.p.decode, core.BrokerCore._send = counted_decode, counted_send


def collect(mode: str) -> dict[str, Any]:
    """The counts since the last call, and the broker threads' CPU seconds."""
    from zdq.broker import core
    from zdq.storage import lmdb as zl

    module: Any = zl if mode == "commits" else core
    out = dict(module._POINT5)
    module._POINT5.clear()
    tick = os.sysconf("SC_CLK_TCK")
    cpu = 0.0
    for t in threading.enumerate():
        if t.name.startswith("zdq-broker-") and t.native_id is not None:
            with open(f"/proc/self/task/{t.native_id}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / tick
    return out | {"cpu": [cpu]}


def measure(mode: str, n: int, runs: int) -> dict[str, list[float]]:
    config = BenchConfig(tasks=n, repeat=runs)
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            worker_dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
        tempfile.TemporaryDirectory(prefix="zdq-point5-") as tmp,
    ):
        client.run(install_commits if mode == "commits" else install_wire)
        options = (
            {"durability": "durable", "dirpath": f"{tmp}/q"}
            if mode == "commits"
            else {}
        )
        with _pools(client, config, **options) as qp:
            before = client.run(collect, mode)
            for _ in range(runs):
                qp.batch_submit([(noop, i) for i in range(n)]).result()
            time.sleep(0.3)  # the last acknowledgements
            after = client.run(collect, mode)
    total: dict[str, list[float]] = {}
    for worker in after.values():
        for key, values in worker.items():
            _add(total, key, *values)
    total["cpu"][0] -= sum(w["cpu"][0] for w in before.values())
    return total


def main() -> None:
    mode, n, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    total = measure(mode, n, runs)
    chunks = runs * n / 1000
    if mode == "commits":
        puts, stored, put_s = total.get("put_commits", [0, 0, 0.0])
        own, own_s = total.get("own_commits", [0, 0.0])
        metas, metas_s = total.get("meta_flushes", [0, 0.0])
        print(
            json.dumps(
                {
                    "load": os.getloadavg()[0],
                    "chunks_per_put_commit": round(stored / max(puts, 1), 2),
                    "put_commits_per_100_chunks": round(100 * puts / chunks, 2),
                    "own_commits_per_100_chunks": round(100 * own / chunks, 2),
                    "loop_in_put_commits_us_per_chunk": round(1e6 * put_s / chunks, 1),
                    "loop_in_own_commits_us_per_chunk": round(1e6 * own_s / chunks, 1),
                    # design 2 only (0 before): env.sync(True) on its own, the loop blocked in it
                    "meta_flushes_per_100_chunks": round(100 * metas / chunks, 2),
                    "loop_in_meta_flushes_us_per_chunk": round(1e6 * metas_s / chunks, 1),
                    "broker_cpu_us_per_chunk": round(1e6 * total["cpu"][0] / chunks, 1),
                }
            )
        )
        return
    del total["cpu"]
    for key, (count, size) in sorted(total.items(), key=lambda kv: -kv[1][1]):
        print(
            f"{key:18s} {count / chunks:6.3f} msgs/chunk {size / chunks:9.1f} bytes/chunk"
        )


if __name__ == "__main__":
    main()
