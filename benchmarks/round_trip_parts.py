"""Which part of a lone round trip is the driver's: zdq, a bare client of zdq's brokers, the floor.

``zdq bench --suite latency`` sets zdq's ``submit(noop, i).result()`` beside the floor of any
brokered design (bare ZeroMQ, three processes, no pickling, no authentication). This script puts
two clients between them, on the same brokers and consumers, to split the difference:

- ``bare``: the least a Python driver of zdq's protocol does for a lone task, on the caller's
  thread alone: the task pickled and sealed as zdq's driver packs a lone chunk, a PUT on a DEALER of
  its own (the pool's CURVE keys, over the broker's Unix socket as zdq's driver reaches it), the
  messages read until the RESULTS of its chunk, unsealed and unpickled, and their receipt (RACK).
  No future, no ledger, no I/O thread: what is left of zdq's round trip without the driver.
- ``handed``: the same client with its sockets owned by a thread of their own, as the driver's
  I/O thread owns them: the caller packs the chunk, hands it over (a deque and an eventfd) and
  waits on a lock that the thread releases once the result is in. Its difference from ``bare``
  is the cost of the two thread hand-offs alone.

Each kind runs blocks of 20 round trips, the kinds in a random order in each round of blocks, so
that the machine's drift falls on all of them alike; the percentiles are over every round trip
of the kind. The layout is the latency suite's (2 workers x 1 thread, 2 queues, 2 consumers with
``max_concurrency=1``).

    python3 benchmarks/round_trip_parts.py [ROUNDS] [--no-auth]

Used for issue 26, point 4 (benchmarks/RESULTS.md, nineteenth session).
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import zmq
from distributed import Client, LocalCluster

from zdq import ConsumerPool, QueuePool
from zdq.benchmark.floor import floor_round_trip
from zdq.benchmark.tasks import noop
from zdq.codec.results import loads_results
from zdq.codec.tasks import PICKLED, call_task, dumps_chunk, dumps_task
from zdq.transport import protocol as p
from zdq.transport.ipc import ipc_endpoint
from zdq.transport.security import ClientKeys, secure_client

_BLOCK = 20  # round trips of one kind in a row
_GAP = 0.0003  # seconds between round trips: each starts with every thread asleep, as the suite's
_WAIT_MS = 10_000  # a round trip slower than this is a broken run
_FIRST_TASK = 1 << 40  # the bare clients' task ids: far above the pool's own


class _Bare:
    """A driver of zdq's protocol reduced to a lone round trip: one DEALER per broker, its own identity."""

    def __init__(self, ctx: zmq.Context[Any], endpoints: list[str], keys: ClientKeys | None, payload_key: bytes | None) -> None:
        self._key = payload_key
        self.socks: list[zmq.Socket[Any]] = []
        for endpoint in endpoints:
            sock = ctx.socket(zmq.DEALER)
            if keys is not None:
                secure_client(sock, keys)
            sock.setsockopt(zmq.IDENTITY, os.urandom(16))
            sock.setsockopt(zmq.RCVTIMEO, _WAIT_MS)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(ipc_endpoint(endpoint) or endpoint)
            sock.send_multipart(p.encode(p.Hello(p.Role.DRIVER, b"round-trip-parts")))
            self.socks.append(sock)
        self._seq = 0
        self._task = _FIRST_TASK

    def pack(self, i: int) -> tuple[int, int, list[Any]]:
        """The PUT of ``noop(i)`` as zdq's driver packs a lone task: ``(broker, seq, frames)``."""
        self._seq += 1
        self._task += 1
        chunk = dumps_chunk(self._task, [dumps_task(call_task(noop, (i,)))], self._key, PICKLED)
        return i % len(self.socks), self._seq, p.encode(p.Put(self._seq, 1, chunk, 0.0, 0, self._task))

    def answer(self, sock: zmq.Socket[Any], frames: list[Any]) -> tuple[int, Any] | None:
        """``(seq, value)`` if ``frames`` are RESULTS (acknowledged at once); None for anything else."""
        msg = p.decode(frames)
        if type(msg) is not p.Results:
            return None  # CONFIRM, HEARTBEAT
        _, values, errors = loads_results(msg.results, self._key)
        if errors:
            raise RuntimeError(f"the bare client's task failed: {errors}")
        sock.send_multipart(p.encode(p.Rack((msg.chunk_id,))))
        return msg.seq, values[0]

    def call(self, i: int) -> None:
        broker, seq, frames = self.pack(i)
        sock = self.socks[broker]
        sock.send_multipart(frames)
        while True:
            try:
                received = sock.recv_multipart()
            except zmq.Again:
                raise TimeoutError(f"the bare client's round trip {i} got no result within {_WAIT_MS / 1000:.0f} s") from None
            got = self.answer(sock, received)
            if got is not None and got[0] == seq:
                if got[1] != i:
                    raise RuntimeError(f"the bare client's round trip {i} got {got[1]!r}")
                return

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


class _Handed:
    """:class:`_Bare` with its sockets owned by a thread of their own (the driver's I/O thread's
    place): the caller packs the chunk, hands it over and waits for its result."""

    def __init__(self, bare: _Bare) -> None:
        self._bare = bare
        self._wake = os.eventfd(0, os.EFD_NONBLOCK)
        self._handed: collections.deque[tuple[int, int, list[Any], threading.Lock, list[Any]]] = collections.deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="round-trip-parts-io", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        bare, waiting = self._bare, {}
        poller = zmq.Poller()
        poller.register(self._wake, zmq.POLLIN)
        for sock in bare.socks:
            poller.register(sock, zmq.POLLIN)
        while not self._stop.is_set():
            for sock, _ in poller.poll(100):
                if sock == self._wake:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._wake)
                    while self._handed:
                        broker, seq, frames, done, box = self._handed.popleft()
                        waiting[seq] = (done, box)
                        bare.socks[broker].send_multipart(frames)
                    continue
                got = bare.answer(sock, sock.recv_multipart())
                if got is not None and got[0] in waiting:
                    done, box = waiting.pop(got[0])
                    box.append(got[1])
                    done.release()

    def call(self, i: int) -> None:
        broker, seq, frames = self._bare.pack(i)
        done, box = threading.Lock(), list[Any]()
        done.acquire()
        self._handed.append((broker, seq, frames, done, box))
        os.eventfd_write(self._wake, 1)
        if not done.acquire(timeout=_WAIT_MS / 1000):
            raise TimeoutError(f"the handed client's round trip {i} got no result within {_WAIT_MS / 1000:.0f} s")
        if box != [i]:
            raise RuntimeError(f"the handed client's round trip {i} got {box!r}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        os.close(self._wake)


@contextlib.contextmanager
def _clients(auth: bool) -> Iterator[dict[str, Callable[[int], Any]]]:
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, worker_dashboard_address=None) as cluster,
        Client(cluster) as client,
        QueuePool(client, 2, keep_results=False, chunk_size=1000, auth=auth) as qp,
        ConsumerPool(client, qp, n_consumers=2, max_concurrency=1) as cp,
        floor_round_trip() as floor,
        floor_round_trip(ipc=True) as ipc_floor,
        contextlib.ExitStack() as stack,
    ):
        cp.start()
        ctx = zmq.Context()
        stack.callback(ctx.term)
        bare = _Bare(ctx, qp.endpoints, qp.client_keys, qp.payload_key)
        stack.callback(bare.close)
        handed_bare = _Bare(ctx, qp.endpoints, qp.client_keys, qp.payload_key)
        stack.callback(handed_bare.close)
        handed = _Handed(handed_bare)
        stack.callback(handed.close)  # before its sockets close (the stack unwinds in reverse)
        kinds: dict[str, Callable[[int], Any]] = {
            "zdq": lambda i: qp.submit(noop, i).result(timeout=_WAIT_MS / 1000),
            "bare": bare.call,
            "handed": handed.call,
            "floor": floor,
            "ipc floor": ipc_floor,
        }
        for call in kinds.values():  # warm up: connections made, consumers fetching
            for i in range(100):
                call(i)
        yield kinds


def main(rounds: int, auth: bool) -> None:
    with _clients(auth) as kinds:
        seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
        order = list(kinds)
        for _ in range(rounds):
            random.shuffle(order)
            for kind in order:
                call, out = kinds[kind], seconds[kind]
                for i in range(_BLOCK):
                    start = time.perf_counter()
                    call(i)
                    out.append(time.perf_counter() - start)
                    time.sleep(_GAP)
    floor = sorted(seconds["floor"])[len(seconds["floor"]) // 2]
    print(f"{rounds * _BLOCK} round trips of each kind, {'with' if auth else 'without'} authentication")
    print(f"{'kind':10s} {'p50 us':>7s} {'p90 us':>7s} {'p99 us':>7s} {'p50/floor':>10s}")
    for kind, xs in seconds.items():
        xs.sort()
        n = len(xs)
        print(f"{kind:10s} {xs[n // 2] * 1e6:7.0f} {xs[int(n * 0.9)] * 1e6:7.0f} {xs[int(n * 0.99)] * 1e6:7.0f} {xs[n // 2] / floor:10.2f}")


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # the with-blocks close: the cluster, the floors and their files


if __name__ == "__main__":
    flags = [a for a in sys.argv[1:] if a.startswith("-")]
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    if set(flags) - {"--no-auth"} or len(args) > 1 or (args and not (args[0].isdigit() and int(args[0]) >= 1)):
        sys.exit(f"usage: {sys.argv[0]} [ROUNDS >= 1] [--no-auth]")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    main(int(args[0]) if args else 150, auth="--no-auth" not in flags)
