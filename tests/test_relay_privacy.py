"""relay=True is private: a passive observer of the client <-> scheduler hop reads no task's bytes.

The client reaches the scheduler of a real ``tcp://`` LocalCluster (worker processes) only through
:class:`Tap`, a TCP forwarder in this process that records every byte both ways: the observer. The
relay's actor calls cross it (Dask's default for a client: through the scheduler). A task whose
argument and result hold a marker runs, and the marker must never be among the recorded bytes.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest
from distributed import Client, LocalCluster

from zdq import ConsumerPool, QueuePool
from zdq.errors import ProtocolError

from .conftest import assert_no_zdq_leaks
from .tasks import add

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

_POLL = 0.2  # seconds: how long a tap thread blocks before it looks at its stop flag


class Tap:
    """A TCP forwarder from a port of its own to ``target`` (``tcp://host:port``), recording
    every byte of every connection, each direction as one stream (a marker split between two
    reads is still found). Its threads are its own; :meth:`close` ends them, bounded."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self._target = (host, int(port))
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._streams: list[bytearray] = []
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self.address = ""

    def __enter__(self) -> Tap:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_POLL)
        self.address = f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"
        self._start(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        for sock in [*self._sockets, *([self._listener] if self._listener else [])]:
            sock.close()
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"tap threads did not end within 5 s: {alive}"

    def recorded(self) -> bytes:
        """Everything that crossed, both ways, so far (streams separated by a NUL-free gap)."""
        with self._lock:
            return b"\n--\n".join(bytes(s) for s in self._streams)

    def _start(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=f"tap-{len(self._threads)}", daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                inside, _ = self._listener.accept()
            except TimeoutError:
                continue
            outside = socket.create_connection(self._target, timeout=10)
            for sock in (inside, outside):
                sock.settimeout(_POLL)
                self._sockets.append(sock)
            self._start(self._pump, inside, outside)
            self._start(self._pump, outside, inside)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        stream = bytearray()
        with self._lock:
            self._streams.append(stream)
        while not self._stop.is_set():
            try:
                data = source.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            with self._lock:
                stream += data
            try:
                sink.sendall(data)
            except OSError:
                break
        for sock in (source, sink):  # one side closed: so does the other, as a real hop would
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def tapped(cluster: LocalCluster) -> Iterator[tuple[Tap, Client]]:
    """A client that reaches the scheduler only through a tap (and never the workers directly)."""
    assert cluster.scheduler_address.startswith("tcp://"), "the observer taps a clear-text Dask comm"
    with Tap(cluster.scheduler_address) as tap, Client(tap.address, direct_to_workers=False, timeout="30s") as client:
        yield tap, client
        assert_no_zdq_leaks(client)


@pytest.mark.faults
def test_a_passive_observer_of_the_dask_comm_reads_no_argument_or_result_a_relay_carries(tapped: tuple[Tap, Client]) -> None:
    tap, client = tapped
    marker = b"ZDQ-SECRET-" + os.urandom(8).hex().encode()
    with QueuePool(client, 2, relay=True) as queue_pool:
        relay = queue_pool._relay
        assert relay is not None
        with ConsumerPool(client, queue_pool, n_consumers=2, start=True):
            assert queue_pool.submit(add, marker, b"-one").result(timeout=30) == marker + b"-one"
            batch = queue_pool.batch_submit([(add, marker, b"-%d" % i) for i in range(200)], batch_size=20)
            assert batch.result(timeout=60) == [marker + b"-%d" % i for i in range(200)]
        sent, received = relay.tunnel.carried
    recorded = tap.recorded()
    # The observer saw the relay's traffic (its actor calls crossed the tap), not what it carried.
    assert sent > 0 and received > 0
    assert b"actor_execute" in recorded and b"push" in recorded and b"pull" in recorded
    assert marker not in recorded, "a task's argument or result crossed the Dask comm in clear text"
    assert marker.hex().encode() not in recorded


@pytest.mark.faults
def test_a_relay_refuses_pushes_that_are_not_sealed_by_its_driver_and_keeps_carrying_it(client: Client) -> None:
    # Forged, replayed and reflected batches, sent to the relay of a running pool through Dask as an
    # intruder holding the actor's handle would: none is carried, and the driver's path goes on.
    with QueuePool(client, 1, relay=True) as queue_pool:
        path = queue_pool._relay
        assert path is not None
        actor = path._actor
        with pytest.raises(Exception, match="already agreed its keys"):
            actor.hello(os.urandom(32)).result(timeout=10)
        for counter in (0, 1, 10**6):  # taken, maybe the next, far ahead: forged all the same
            forged = b"ZR\x01\x01" + counter.to_bytes(8, "big") + os.urandom(64)
            with pytest.raises(ProtocolError, match="failed authentication"):
                actor.push(forged).result(timeout=10)
        with pytest.raises(ProtocolError, match="sealed by the relay came to the relay"):
            actor.push(b"ZR\x01\x02" + bytes(8) + os.urandom(64)).result(timeout=10)
        with pytest.raises(TypeError, match="push takes a sealed batch"):
            actor.push([(0, [b"frame"])]).result(timeout=10)
        with ConsumerPool(client, queue_pool, n_consumers=1, start=True):
            assert queue_pool.submit(add, 1, 2).result(timeout=30) == 3
            assert path.replacements == 0

