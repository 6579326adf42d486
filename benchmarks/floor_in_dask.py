"""The round trip's floor where zdq's brokers and consumers live: threads of a Dask worker process.

``zdq bench --suite latency`` compares zdq's ``submit().result()`` with a bare ZeroMQ round trip
through three processes of their own (:mod:`zdq.benchmark.floor`). zdq's brokers and consumers
are not processes of their own: they are threads of Dask worker processes (the architecture's
first decision), sharing each interpreter lock with the worker's event loop (heartbeats, the
system monitor), and the driver shares its process with the client's event loop (and, on a
LocalCluster, the scheduler's). This script measures the same bare round trip laid out as zdq
lays out a lone task:

* ``worker-threads``: a ROUTER thread in a worker process (bound over ipc, as zdq's brokers are
  reached from their own host) forwarding to a DEALER thread of the same process over inproc (a
  lone task's usual consumer: its broker's own), which echoes; the client DEALER in this process.
* ``worker-one-thread``: the same, the ROUTER thread echoing itself (no thread hand-off in the
  worker): what a broker that ran a lone task on its own thread could reach at best.
* ``processes``: :func:`zdq.benchmark.floor.floor_round_trip` over ipc, the suite's own floor.
* ``zdq``: ``submit(noop, i).result()`` on the latency suite's pools (2 queues, 2 consumers).

Each run takes 300 round trips of each, in turn, on one LocalCluster of 2 single-threaded worker
processes; the medians of the runs' p50 and p99 are printed, in milliseconds.

    python3 benchmarks/floor_in_dask.py [RUNS]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

import zmq
from distributed import Client, LocalCluster



def _serve(router: zmq.Socket, dealer: zmq.Socket | None, stop: threading.Event) -> None:
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    while not stop.is_set():
        if not poller.poll(100):
            continue
        sender, payload = router.recv_multipart()
        if dealer is None:
            router.send_multipart([sender, payload])
            continue
        dealer.send_multipart([sender, payload])  # to the consumer thread, which echoes
        router.send_multipart(dealer.recv_multipart())


def _consume(socket: zmq.Socket, stop: threading.Event) -> None:
    while not stop.is_set():
        if socket.poll(100):
            socket.send_multipart(socket.recv_multipart())


def _echoes(worker: Any) -> list[tuple[threading.Event, list[threading.Thread]]]:
    """(On a worker.) The echoes started there: kept on the worker, since this script's functions
    travel by value and would each carry a copy of a module-level list."""
    if not hasattr(worker, "_zdq_floor_echoes"):
        worker._zdq_floor_echoes = []
    return worker._zdq_floor_echoes


def start_echo(one_thread: bool, dask_worker: Any = None) -> str:
    """(On a worker.) Start the ROUTER thread (and its consumer thread); return the endpoint."""
    ctx = zmq.Context.instance()
    stop = threading.Event()
    path = os.path.join(tempfile.mkdtemp(prefix="zdq-floor-dask-"), "broker")
    router = ctx.socket(zmq.ROUTER)
    router.bind(f"ipc://{path}")
    threads = []
    dealer = None
    if not one_thread:
        name = f"inproc://zdq-floor-dask-{id(stop)}"
        consumer = ctx.socket(zmq.PAIR)
        consumer.bind(name)
        dealer = ctx.socket(zmq.PAIR)
        dealer.connect(name)
        threads.append(threading.Thread(target=_consume, args=(consumer, stop), daemon=True))
    threads.append(threading.Thread(target=_serve, args=(router, dealer, stop), daemon=True))
    for thread in threads:
        thread.start()
    _echoes(dask_worker).append((stop, threads))
    return f"ipc://{path}"


def stop_echo(dask_worker: Any = None) -> None:
    """(On a worker.) Stop every echo this script started there."""
    echoes = _echoes(dask_worker)
    for stop, threads in echoes:
        stop.set()
        for thread in threads:
            thread.join(5)
    echoes.clear()


def _round_trips(call: Any, n: int) -> tuple[float, float]:
    took = []
    for i in range(n):
        start = time.perf_counter()
        call(i)
        took.append(time.perf_counter() - start)
    took.sort()
    return took[n // 2] * 1e3, took[int(n * 0.99)] * 1e3


def main(runs: int) -> None:
    from zdq import ConsumerPool, QueuePool
    from zdq.benchmark.floor import floor_round_trip
    from zdq.benchmark.tasks import noop

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, worker_dashboard_address=None
    ) as cluster, Client(cluster) as client:
        worker = sorted(client.run(os.getpid))[0]
        ctx = zmq.Context.instance()
        sockets = {}
        for layout, one in (("worker-threads", False), ("worker-one-thread", True)):
            endpoint = client.run(start_echo, one, workers=[worker])[worker]
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.RCVTIMEO, 10_000)
            sock.connect(endpoint)
            sockets[layout] = sock

        def echo(sock: zmq.Socket) -> Any:
            def call(i: int) -> None:
                payload = b"%d" % i
                sock.send(payload)
                if sock.recv() != payload:
                    raise RuntimeError("the echo mixed up messages")

            return call

        results: dict[str, list[tuple[float, float]]] = {}
        try:
            with QueuePool(client, 2, keep_results=False) as qp, ConsumerPool(client, qp, n_consumers=2) as cp, floor_round_trip(ipc=True) as floor:
                cp.start()
                calls = {layout: echo(sock) for layout, sock in sockets.items()}
                calls["processes"] = floor
                calls["zdq"] = lambda i: qp.submit(noop, i).result(timeout=10)
                for call in calls.values():
                    call(-1)
                for _ in range(runs):
                    for layout, call in calls.items():
                        results.setdefault(layout, []).append(_round_trips(call, 300))
        finally:
            client.run(stop_echo, workers=[worker])
            for sock in sockets.values():
                sock.close(linger=0)
    for layout, runs_ in results.items():
        p50 = statistics.median(r[0] for r in runs_)
        p99 = statistics.median(r[1] for r in runs_)
        print(f"{layout:18s} p50 {p50:.3f} ms  p99 {p99:.3f} ms  ({len(runs_)} runs of 300)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
