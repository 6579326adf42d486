"""The floor of any brokered round trip: bare ZeroMQ, three processes, no queue logic at all.

This process's DEALER sends a few raw bytes to a broker process's ROUTER, which forwards them by
identity to a consumer process's DEALER; the consumer echoes them, and the broker forwards the
echo back to this process. No pickling, no storage, no leases, no credit, no authentication, over
tcp loopback (or, with ``ipc=True``, Unix sockets, as zdq reaches the brokers of its own host):
the least a single-task round trip through a broker can take here.
``zdq bench --suite latency`` measures zdq's ``submit().result()`` against it in the same run.

The broker binds (as zdq's do) and tells its port on a pipe; the consumer and this process
connect. The broker holds what arrives before the consumer has said it is ready, so the first
round trip waits for the consumer's start instead of being dropped by the ROUTER.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import tempfile
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import zmq

__all__ = ["floor_round_trip"]

_CONSUMER = b"consumer"  # the consumer DEALER's routing id: the broker forwards to it by name
_READY = b"ready"  # the consumer's first message: the broker may forward to it from then on
_STOP = b""  # a payload from the client that stops the broker and the consumer
_START_TIMEOUT = 30.0  # seconds for a spawned process to start and bind or connect
_ECHO_TIMEOUT_MS = 10_000  # a round trip slower than this is a broken floor, not a slow one
_STOP_LINGER_MS = 1000  # the broker's last forward (the consumer's stop) may take this long
#: An idle broker or consumer looks this often whether the process that started it is still there:
#: one killed (SIGKILL) never stops them, and they would wait for ever (a receive's timeout, not a
#: poll per message: the floor's own path is untouched).
_ORPHAN_CHECK_MS = 1000


def _recv_or_orphaned(sock: zmq.Socket[Any], parent: int) -> list[bytes] | None:
    """The next message; None once the process that started this one is gone (this one was
    handed to another parent)."""
    while True:
        try:
            return sock.recv_multipart()
        except zmq.Again:
            if os.getppid() != parent:
                return None


def _broker(port_conn: Connection, ipc_path: str | None = None) -> None:
    """ROUTER: a client's ``[payload]`` goes to the consumer as ``[client id, payload]``; the
    consumer's ``[client id, payload]`` goes back to that client as ``[payload]``. Bound on
    ``ipc_path`` if given (sends the endpoint), else on a TCP port of loopback (sends it)."""
    parent = os.getppid()
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.RCVTIMEO, _ORPHAN_CHECK_MS)
    try:
        if ipc_path is not None:
            router.bind(f"ipc://{ipc_path}")
            port_conn.send(f"ipc://{ipc_path}")
        else:
            port_conn.send(f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}")
        port_conn.close()
        ready = False
        held: list[list[bytes]] = []  # client messages from before the consumer was ready
        while True:
            message = _recv_or_orphaned(router, parent)
            if message is None:
                return
            sender, *frames = message
            if sender != _CONSUMER:
                if ready:
                    router.send_multipart([_CONSUMER, sender, *frames])
                else:
                    held.append([_CONSUMER, sender, *frames])
                if frames == [_STOP]:
                    router.setsockopt(zmq.LINGER, _STOP_LINGER_MS)
                    return
            elif frames == [_READY]:
                ready = True
                for message in held:
                    router.send_multipart(message)
                held.clear()
            else:
                router.send_multipart(frames)
    finally:
        router.close()
        ctx.term()


def _consumer(endpoint: str) -> None:
    """DEALER: says it is ready, then echoes every ``[client id, payload]`` until the stop."""
    parent = os.getppid()
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.ROUTING_ID, _CONSUMER)
    dealer.setsockopt(zmq.RCVTIMEO, _ORPHAN_CHECK_MS)
    dealer.connect(endpoint)
    try:
        dealer.send(_READY)
        while True:
            frames = _recv_or_orphaned(dealer, parent)
            if frames is None or frames[-1] == _STOP:
                return
            dealer.send_multipart(frames)
    finally:
        dealer.close(linger=0)
        ctx.term()


def _stop(proc: BaseProcess) -> None:
    """Wait a little for a process that was told to stop, then kill it by its pid."""
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join(5)


@contextlib.contextmanager
def floor_round_trip(*, ipc: bool = False) -> Iterator[Callable[[int], None]]:
    """Start the broker and the consumer; yield one round trip (``call(i)`` sends ``i`` as bytes
    and returns when its echo is back), as :func:`~zdq.benchmark.cases.latency` times zdq's.
    ``ipc``: over Unix sockets (as zdq reaches the brokers of its own host), not TCP loopback.

    Both processes are stopped on exit, killed if they do not stop within seconds.

    >>> with floor_round_trip() as call:                                  # doctest: +SKIP
    ...     call(1)
    """
    spawn = multiprocessing.get_context("spawn")
    port_reader, port_writer = spawn.Pipe(duplex=False)
    scratch = tempfile.TemporaryDirectory(prefix="zdq-floor-") if ipc else None  # mode 0700
    ipc_path = os.path.join(scratch.name, "broker") if scratch is not None else None
    broker = spawn.Process(target=_broker, args=(port_writer, ipc_path), name="zdq-floor-broker", daemon=True)
    consumer: BaseProcess | None = None
    ctx = zmq.Context()
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.RCVTIMEO, _ECHO_TIMEOUT_MS)
    try:
        broker.start()
        port_writer.close()
        if not port_reader.poll(_START_TIMEOUT):
            raise TimeoutError(f"the floor's broker process did not bind within {_START_TIMEOUT:.0f} s (a loaded machine?)")
        endpoint = str(port_reader.recv())
        consumer = spawn.Process(target=_consumer, args=(endpoint,), name="zdq-floor-consumer", daemon=True)
        consumer.start()
        client.connect(endpoint)

        def call(i: int) -> None:
            payload = b"%d" % i
            client.send(payload)
            try:
                echo = client.recv()
            except zmq.Again as e:
                waited = int(client.getsockopt(zmq.RCVTIMEO)) / 1000
                raise TimeoutError(
                    f"the floor's round trip {i} got no echo within {waited:.0f} s: "
                    "its broker or consumer process stopped, or did not start"
                ) from e
            if echo != payload:
                raise RuntimeError(f"the floor's round trip {i} got the echo {echo!r}: its broker mixed up messages")

        # Warm up: the consumer process starts and connects before anything is timed (zdq's
        # pools are placed and warmed up before their round trips too).
        client.setsockopt(zmq.RCVTIMEO, int(_START_TIMEOUT * 1000))
        call(-1)
        client.setsockopt(zmq.RCVTIMEO, _ECHO_TIMEOUT_MS)
        yield call
    finally:
        with contextlib.suppress(zmq.ZMQError):
            client.send(_STOP, zmq.NOBLOCK)
        for proc in (broker, consumer):
            if proc is not None and proc.pid is not None:
                _stop(proc)
        port_reader.close()
        client.close(linger=0)
        ctx.term()
        if scratch is not None:
            scratch.cleanup()
