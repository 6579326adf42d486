"""Issue 26, point 5: what travels on the encrypted links per chunk, by message type.

``zdq bench``'s futures-path case (2 queues, 2 consumers, chunks of 1,000 no-ops, CurveZMQ on)
run RUNS times over N tasks, with ``protocol.decode`` and ``BrokerCore._send`` wrapped in the
workers: "out X" is what brokers send, "in X" what brokers and consumers (same processes) decode.
Bytes are the frames' before encryption.

    PYTHONPATH=<tree> python3 benchmarks/wire_per_chunk.py N RUNS
"""

import sys
import time

from distributed import Client, LocalCluster

from zdq.benchmark.cases import _pools
from zdq.benchmark.results import BenchConfig
from zdq.benchmark.tasks import noop


def install():
    from zdq.broker import core

    if hasattr(core, "_W"):
        core._W.clear()
        return
    W = core._W = {}
    odecode = core.p.decode

    def size(frames):
        return sum(len(f) for f in frames)

    def dec(frames, *a, **k):
        msg = odecode(frames, *a, **k)
        key = "in " + type(msg).__name__
        n, b = W.get(key, (0, 0))
        W[key] = (n + 1, b + size(frames))
        return msg

    core.p.decode = dec
    osend = core.BrokerCore._send
    oenc = core.p.encode

    def send(self, ident, msg):
        key = "out " + type(msg).__name__
        frames = oenc(msg)
        n, b = W.get(key, (0, 0))
        W[key] = (n + 1, b + size(frames))
        return osend(self, ident, msg)

    core.BrokerCore._send = send


def collect():
    from zdq.broker import core

    d = dict(core._W)
    core._W.clear()
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
    ):
        client.run(install)
        with _pools(client, config) as qp:
            client.run(collect)
            for _ in range(runs):
                qp.batch_submit([(noop, i) for i in range(n)]).result()
            time.sleep(0.3)
            stats = client.run(collect)
    for d in stats.values():
        for k, (c, b) in d.items():
            x = tot.setdefault(k, [0, 0])
            x[0] += c
            x[1] += b
    chunks = runs * n / 1000
    for k, (c, b) in sorted(tot.items(), key=lambda kv: -kv[1][1]):
        print(
            f"{k:18s} {c / chunks:6.3f} msgs/chunk {b / chunks:9.1f} bytes/chunk ({b / max(c, 1):8.1f} per message)"
        )
    print(
        "total",
        round(sum(c for c, _ in tot.values()) / chunks, 3),
        "msgs/chunk",
        round(sum(b for _, b in tot.values()) / chunks),
        "bytes/chunk",
    )


if __name__ == "__main__":
    main()
