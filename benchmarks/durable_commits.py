"""Issue 26, point 5: what a durable queue's commits cost its broker, per chunk.

``zdq bench``'s durable case (``QueuePool(client, 2, durability="durable")``, two consumers,
chunks of 1,000 no-ops) run RUNS times over N tasks, with the workers' ``LMDBStorage`` and
``BrokerCore._store`` wrapped (``client.run``) to count: synced commits that store chunks and
those of held bookkeeping alone, the broker loop's wall time inside each (the loop does nothing
else meanwhile), chunks leased while ``_store`` ran before its commit, and the broker threads'
CPU (``/proc/PID/task/TID/stat``, 10 ms ticks). Prints one JSON line. Run it in alternated pairs
against the tree before a change, each tree by its PYTHONPATH:

    PYTHONPATH=<tree> python3 benchmarks/durable_commits.py N RUNS
"""

import json
import os
import sys
import tempfile
import threading
import time

from distributed import Client, LocalCluster

from zdq.benchmark.cases import _pools
from zdq.benchmark.results import BenchConfig
from zdq.benchmark.tasks import noop


def install():
    from zdq.broker import core
    from zdq.storage import lmdb as zl

    if hasattr(zl, "_C"):
        zl._C.clear()
        return
    C = zl._C = {}
    ow, oc, opm, ost = (
        zl.LMDBStorage._write,
        zl.LMDBStorage.commit,
        zl.LMDBStorage.put_many,
        core.BrokerCore._store,
    )

    def add(k, v):
        C[k] = C.get(k, 0) + v

    def w(self, records, dead=None):
        add("put_commits", 1)
        add("chunks", len(records))
        t = time.perf_counter()
        r = ow(self, records, dead)
        add("put_commit_s", time.perf_counter() - t)
        return r

    def c(self, force=False):
        n0 = len(self._pending) + len(self._marks)
        t = time.perf_counter()
        r = oc(self, force=force)
        dt = time.perf_counter() - t
        if n0 and not (self._pending or self._marks):
            add("own_commits", 1)
            add("own_commit_s", dt)
        return r

    def pm(self, entries):
        add("early_leases", len(self._leased) - C.pop("_leased0", len(self._leased)))
        return opm(self, entries)

    def st(self, puts, unique=False):
        C["_leased0"] = len(self._storage._leased)
        return ost(self, puts, unique)

    (
        zl.LMDBStorage._write,
        zl.LMDBStorage.commit,
        zl.LMDBStorage.put_many,
        core.BrokerCore._store,
    ) = w, c, pm, st


def broker_cpu():
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for t in threading.enumerate():
        if t.name.startswith("zdq-broker-") and t.native_id is not None:
            with open(f"/proc/self/task/{t.native_id}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def collect():
    from zdq.storage import lmdb as zl

    d = dict(zl._C)
    zl._C.clear()
    d["cpu"] = broker_cpu()
    return d


def main():
    n, runs = int(sys.argv[1]), int(sys.argv[2])
    config = BenchConfig(tasks=n, repeat=3)
    tot = {}
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            worker_dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
        tempfile.TemporaryDirectory(dir="/tmp/dur") as tmp,
    ):
        client.run(install)
        with _pools(client, config, durability="durable", dirpath=f"{tmp}/q") as qp:
            cpu0 = sum(d["cpu"] for d in client.run(collect).values())
            for _ in range(runs):
                qp.batch_submit([(noop, i) for i in range(n)]).result()
            stats = client.run(collect)
    for d in stats.values():
        for k, v in d.items():
            tot[k] = tot.get(k, 0) + v
    tot["cpu"] -= cpu0
    chunks = runs * n / 1000
    out = {
        "load": os.getloadavg()[0],
        "chunks_per_put_commit": tot["chunks"] / tot["put_commits"],
    }
    for k in ("put_commits", "own_commits", "early_leases"):
        out[k + "_per_100_chunks"] = 100 * tot.get(k, 0) / chunks
    for k in ("put_commit_s", "own_commit_s", "cpu"):
        out[k.replace("_s", "") + "_us_per_chunk"] = 1e6 * tot.get(k, 0) / chunks
    print(json.dumps({k: round(v, 2) for k, v in out.items()}))


if __name__ == "__main__":
    main()
