"""Socket set-up and addressing: every zdq socket is made here.

Brokers bind a ROUTER on their worker's own host (the address :mod:`zdq.transport.addresses`
chooses, never a wildcard) on a free port (in ``zdq.ports`` when it is set), and report the
endpoint; drivers and consumers connect DEALERs to it.
zdq does its own flow control (driver windows, consumer credit), so ZeroMQ's high-water marks are
lifted rather than left to silently drop messages on a ROUTER.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import threading
from collections.abc import Iterator
from typing import Any, Protocol, cast

import zmq

from zdq.errors import AddressError
from zdq.transport.addresses import tcp_endpoint
from zdq.transport.ipc import ipc_endpoint
from zdq.transport.reach import Watch, over_ipc
from zdq.transport.security import Admission, ClientKeys, ServerKeys, secure_client, secure_server

__all__ = [
    "new_identity",
    "process_context",
    "serve_locally",
    "stop_serving_locally",
    "local_endpoint",
    "is_local_peer",
    "bind_router",
    "connect_dealer",
    "close_socket",
    "try_send",
    "recv_ready",
    "Waker",
    "BrokerLinks",
    "Route",
]

logger = logging.getLogger(__name__)


def new_identity() -> bytes:
    """A random 16-byte routing identity for a driver or consumer."""
    return os.urandom(16)


# -- one context per process, and the brokers it serves in-process ------------------------------
# Every zdq socket of a process (brokers, consumers, drivers) lives in one ZeroMQ context: one
# socket I/O thread per process instead of one per actor, and a consumer placed on a broker's own
# worker reaches that broker over inproc. An inproc message is handed from one thread to the other:
# no TCP, no socket I/O thread on either side, no CurveZMQ (ZeroMQ gives inproc connections no
# security mechanism, and only code inside the process can reach one). On a single task's round
# trip the broker-consumer hops were half of the socket I/O threads' work and of the encryption.
_process_lock = threading.Lock()
_process_pid = 0
_process_ctx: zmq.Context[Any] | None = None
_local: dict[str, str] = {}  # a broker's TCP endpoint -> its inproc endpoint in _process_ctx


def process_context() -> zmq.Context[Any]:
    """This process's zdq context (a forked child makes its own, and forgets its parent's brokers).

    One context holds every zdq socket of the process, and ZeroMQ's default allows 1,023: a worker
    with a few hundred consumers of many queues ran out (every consumer has a socket per broker).
    So the context allows 65,535 (ZeroMQ's own limit), and the process's soft limit on open files
    is raised to its hard limit (best effort, once per process): each socket needs a descriptor,
    each TCP connection another.
    """
    global _process_pid, _process_ctx
    with _process_lock:
        if _process_ctx is None or _process_pid != os.getpid():
            try:
                import resource

                soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
                if soft != resource.RLIM_INFINITY and soft < target:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (ImportError, ValueError, OSError) as e:  # no resource module (Windows), or not allowed
                logger.debug("could not raise the limit on open files: %s", e)
            ctx = zmq.Context()
            try:
                ctx.MAX_SOCKETS = min(65536, ctx.get(zmq.SOCKET_LIMIT))
            except zmq.ZMQError as e:
                logger.warning("zdq sockets of this process are limited to %d: %s", ctx.MAX_SOCKETS, e)
            _process_ctx = ctx
            _process_pid = os.getpid()
            _local.clear()
        return _process_ctx


def serve_locally(sock: zmq.Socket[Any], endpoint: str) -> None:
    """Bind broker socket ``sock`` (of :func:`process_context`) on inproc too, for this process's
    consumers and drivers that connect to ``endpoint``."""
    address = f"inproc://zdq-broker-{new_identity().hex()}"
    sock.bind(address)
    with _process_lock:
        _local[endpoint] = address


def stop_serving_locally(endpoint: str) -> None:
    with _process_lock:
        _local.pop(endpoint, None)


def local_endpoint(ctx: zmq.Context[Any], endpoint: str) -> str | None:
    """The inproc endpoint of the broker at ``endpoint`` if it runs in this process and ``ctx``
    reaches it; else None."""
    with _process_lock:
        if ctx is not _process_ctx or _process_pid != os.getpid():
            return None
        return _local.get(endpoint)


def is_local_peer(frame: zmq.Frame) -> bool:
    """Whether a received frame came over inproc (from this process): only TCP peers have an address."""
    try:
        frame.get("Peer-Address")
    except zmq.ZMQError:
        return True
    return False


def _tune(sock: zmq.Socket[Any], max_message_size: int | None) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    if max_message_size is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)


def bind_router(
    ctx: zmq.Context[Any],
    host: str,
    *,
    max_message_size: int,
    keys: ServerKeys | None = None,
    ports: tuple[int, int] | None = None,
) -> tuple[zmq.Socket[Any], str, Admission | None]:
    """Bind a ROUTER on address ``host`` at a free port, of ``ports`` (both ends included) if
    given (a CURVE server if ``keys`` are given).

    Returns the socket, its connectable endpoint, and its admission to stop after it closes.

    Raises
    ------
    AddressError
        ``host`` is no address of this host, or every port of ``ports`` is taken.
    """
    sock = ctx.socket(zmq.ROUTER)
    auth = None
    try:
        _tune(sock, max_message_size)
        if keys is not None:
            auth = secure_server(ctx, sock, keys)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if ":" in host:
            sock.setsockopt(zmq.IPV6, 1)
        port = _bind_port(sock, host, ports)
    except Exception:
        sock.close(linger=0)
        if auth is not None:
            auth.stop()
        raise
    return sock, tcp_endpoint(host, port), auth


def _bind_port(sock: zmq.Socket[Any], host: str, ports: tuple[int, int] | None) -> int:
    bind_host = f"[{host}]" if ":" in host else host
    try:
        if ports is None:
            return sock.bind_to_random_port(f"tcp://{bind_host}")
        low, high = ports
        count = high - low + 1
        start = random.randrange(count)  # brokers placed at once on one host rarely try the same port
        for k in range(count):
            port = low + (start + k) % count
            if _bind_if_free(sock, f"tcp://{bind_host}:{port}"):
                return port
    except zmq.ZMQError as e:
        if e.errno != errno.EADDRNOTAVAIL:
            raise
        raise AddressError(
            f"cannot bind a broker on {host}: it is no address of this host ({e}); set zdq.bind-host to "
            "an interface or address of the worker's host"
        ) from e
    raise AddressError(
        f"no free port for a broker on {host} in zdq.ports {low}-{high}: "
        + ("it is" if count == 1 else f"all {count} are")
        + " in use (by other brokers or programs); widen the range"
    )


def _bind_if_free(sock: zmq.Socket[Any], address: str) -> bool:
    """Bind ``sock`` at ``address``; False if its port is taken."""
    try:
        sock.bind(address)
    except zmq.ZMQError as e:
        if e.errno == errno.EADDRINUSE:
            return False
        raise
    return True


def connect_dealer(
    ctx: zmq.Context[Any],
    endpoint: str,
    identity: bytes,
    *,
    max_message_size: int | None = None,
    keys: ClientKeys | None = None,
) -> zmq.Socket[Any]:
    """A DEALER with ``identity`` connected to ``endpoint`` (a CURVE client if ``keys`` are given)."""
    return _connect(_dealer(ctx, identity, max_message_size, keys), endpoint)


def _dealer(
    ctx: zmq.Context[Any], identity: bytes, max_message_size: int | None, keys: ClientKeys | None
) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.DEALER)
    try:
        _tune(sock, max_message_size)
        if keys is not None:
            secure_client(sock, keys)
        sock.setsockopt(zmq.IDENTITY, identity)
    except Exception:
        sock.close(linger=0)
        raise
    return sock


def _connect(sock: zmq.Socket[Any], endpoint: str) -> zmq.Socket[Any]:
    try:
        if endpoint.startswith("tcp://["):
            sock.setsockopt(zmq.IPV6, 1)
        sock.connect(endpoint)
    except Exception:
        sock.close(linger=0)
        raise
    return sock


# The hot path calls pyzmq's compiled socket methods directly, with plain int flags: the Python layer
# above them (argument checks, enum flag arithmetic, RCVMORE lookups, exceptions as the end of a
# drain) cost more than the sends and receives themselves on the single-task round trip.
_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv
_get = zmq.backend.Socket.get
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_ZERO_COPY = 65536  # pyzmq's own threshold: smaller frames are copied anyway


def try_send(sock: zmq.Socket[Any], frames: list[Any]) -> bool:
    """Send without ever blocking an I/O thread; False if the peer cannot take it now.

    A DEALER whose broker is unreachable (gone, or refusing our handshake) would block a plain
    send forever. What is not sent is recovered by the protocol: unconfirmed chunks are resent,
    unacknowledged leases expire. (High-water marks are lifted, so a refusal can only come at the
    first frame: a message is never sent in part.)
    """
    last = len(frames) - 1
    try:
        # Small frames are copied (cheaper than pyzmq's zero-copy bookkeeping); large ones are not.
        for i in range(last):
            _send(sock, frames[i], _NOBLOCK_MORE, copy=len(frames[i]) < _ZERO_COPY)
        _send(sock, frames[last], _NOBLOCK, copy=len(frames[last]) < _ZERO_COPY)
        return True
    except zmq.Again:
        return False


def recv_ready(sock: zmq.Socket[Any], limit: int, *, router: bool = False) -> Iterator[list[Any]]:
    """The messages waiting on ``sock`` (at most ``limit``), as lists of frames; never blocks.

    Meant for right after a poll reported ``sock`` readable: the first receive is tried at once,
    and the socket's event flags (not an exception) tell when it has nothing more. With ``limit``
    1 they are not read at all (a syscall and 3 µs): the next poll tells instead, which suits
    sockets that mostly get one message per wake-up (a driver's, a consumer's, a waker).

    On a ROUTER (``router=True``) the first frame, the peer's routing identity, comes as bytes:
    a ROUTER always has the message's own frames after it.
    """
    for i in range(limit):
        try:
            if router:
                frames: list[Any] = [_recv(sock, _NOBLOCK)]
                frame = _recv(sock, _NOBLOCK, copy=False)
                frames.append(frame)
            else:
                frame = _recv(sock, _NOBLOCK, copy=False)
                frames = [frame]
        except zmq.Again:
            return
        while frame.more:
            frame = _recv(sock, _NOBLOCK, copy=False)
            frames.append(frame)
        yield frames
        if i + 1 == limit or not cast(int, _get(sock, _EVENTS)) & _POLLIN:
            return


def close_socket(sock: zmq.Socket[Any] | None) -> None:
    """Close ``sock`` at once, dropping unsent messages."""
    if sock is not None and not sock.closed:
        sock.close(linger=0)


class Waker:
    """Wakes a thread blocked in a :class:`zmq.Poller` from any other thread.

    The I/O thread registers :attr:`socket` in its poller; other threads call :meth:`wake`. Wakes
    that arrive while one is pending are merged, so a burst of submissions costs one wake-up.

    With ``eventfd`` (where the system has one), :attr:`socket` is a Linux eventfd, not a ZeroMQ
    socket: a wake is one ``write`` and a drain one ``read``, where an inproc message costs
    ZeroMQ's pipe and mailbox on both sides (about 3.5 us less per wake and drain, measured
    alone). The poller returns the descriptor itself (an int) when it is readable. The lock
    orders :meth:`wake` against :meth:`close`: a wake never writes to a descriptor closed (and
    perhaps reused) meanwhile.
    """

    def __init__(self, ctx: zmq.Context[Any], *, eventfd: bool = False) -> None:
        self._lock = threading.Lock()
        self._fd = -1
        if eventfd and hasattr(os, "eventfd"):
            self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.socket: Any = self._fd
            self._out: zmq.Socket[Any] | None = None
            return
        address = f"inproc://zdq-waker-{new_identity().hex()}"
        self.socket = ctx.socket(zmq.PAIR)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(address)
        self._out = ctx.socket(zmq.PAIR)
        self._out.setsockopt(zmq.LINGER, 0)
        self._out.setsockopt(zmq.SNDHWM, 4)
        self._out.connect(address)

    def wake(self) -> None:
        with self._lock:
            if self._out is None:
                if self._fd >= 0:
                    os.eventfd_write(self._fd, 1)  # a counter: wakes pending merge into one
                return
            if self._out.closed:
                return
            try:
                _send(self._out, b"", _NOBLOCK)
            except zmq.Again:
                pass  # a wake is already pending

    def drain(self) -> None:
        if self._out is None:
            with self._lock:  # as wake(): never a descriptor closed, and perhaps reused, meanwhile
                if self._fd >= 0:  # -1: closed by close(), the thread is stopping
                    try:
                        os.eventfd_read(self._fd)  # every wake pending, at once
                    except BlockingIOError:  # none pending
                        pass
            return
        for _ in recv_ready(self.socket, 1):  # merged wakes: at most SNDHWM more, each a poll
            pass

    def close(self) -> None:
        with self._lock:
            if self._out is None:
                fd, self._fd = self._fd, -1
                if fd >= 0:
                    os.close(fd)
                return
            close_socket(self._out)
        close_socket(self.socket)


class Route(Protocol):
    """Where a driver's links go instead of the brokers' ports (a relay's tunnel)."""

    def address(self, slot: int, endpoint: str) -> str: ...

    def why(self, slot: int) -> str: ...


class BrokerLinks:
    """The DEALERs of a driver or consumer I/O thread, one per broker, in one poller.

    Each new link introduces itself with ``hello`` (so the broker knows the peer at once); a link
    can be replaced when its broker is placed again elsewhere. A link to a broker of this process
    goes over inproc when ``ctx`` is :func:`process_context`; with a ``route`` (a relay's
    :class:`~zdq.relay.tunnel.Tunnel`), every link goes over inproc to the address it gives. A TCP link is watched (a
    :class:`~zdq.transport.reach.Watch`) until its owner settles it (:meth:`settle`), having heard from
    the broker: :meth:`why` says what its connection went through meanwhile.
    """

    def __init__(
        self,
        ctx: zmq.Context[Any],
        identity: bytes,
        hello: list[Any],
        *,
        keys: ClientKeys | None,
        max_message_size: int | None,
        route: Route | None = None,
    ) -> None:
        self._ctx = ctx
        self._route = route
        self._identity = identity
        self._hello = hello
        self._keys = keys
        self._max = max_message_size
        self.poller = zmq.Poller()
        self.socks: list[zmq.Socket[Any]] = []
        self._index: dict[zmq.Socket[Any], int] = {}
        self._watches: dict[int, Watch] = {}
        #: The address each link connected to: inproc, ipc (a broker of this host) or the TCP endpoint.
        self.addresses: list[str] = []
        self._endpoints: dict[int, str] = {}  # the TCP endpoint of each link that went over ipc, for why()

    def _open(self, i: int, endpoint: str) -> zmq.Socket[Any]:
        local = self._route.address(i, endpoint) if self._route is not None else local_endpoint(self._ctx, endpoint)
        if local is not None:  # the broker is in this process: inproc, which needs no keys
            sock = connect_dealer(self._ctx, local, self._identity, max_message_size=self._max)
            self._via(i, local)
        else:
            # A broker of this host is reached over its Unix socket (still CurveZMQ), else over TCP.
            address = ipc_endpoint(endpoint) or endpoint
            self._via(i, address)
            self._endpoints[i] = endpoint
            sock = _dealer(self._ctx, self._identity, self._max, self._keys)
            try:
                # before connecting: it sees the first attempt
                self._watches[i] = Watch(sock, "Unix-socket" if address != endpoint else "TCP")
                _connect(sock, address)
            except Exception:
                self.settle(i)
                close_socket(sock)
                raise
        sock.send_multipart(self._hello)
        self.poller.register(sock, zmq.POLLIN)
        return sock

    def _via(self, i: int, address: str) -> None:
        if i < len(self.addresses):
            self.addresses[i] = address
        else:
            self.addresses.append(address)

    def add(self, endpoint: str) -> None:
        sock = self._open(len(self.socks), endpoint)
        self._index[sock] = len(self.socks)
        self.socks.append(sock)

    def hello(self, i: int) -> bool:
        """Say HELLO again on link ``i`` (its broker asked, WHO: it had forgotten this peer)."""
        return try_send(self.socks[i], self._hello)

    def disconnect(self, i: int) -> None:
        """Close link ``i`` (its broker is gone): nothing more is queued for it. Until
        :meth:`replace`, its slot holds a closed socket, which sends nothing."""
        self.settle(i)
        old = self.socks[i]
        if old.closed:
            return
        self.poller.unregister(old)
        del self._index[old]
        close_socket(old)

    def replace(self, i: int, endpoint: str) -> None:
        """Point link ``i`` at ``endpoint`` (its broker was placed again), with a new socket."""
        self.disconnect(i)
        self.socks[i] = self._open(i, endpoint)
        self._index[self.socks[i]] = i

    def index(self, sock: Any) -> int | None:
        return self._index.get(sock)

    def why(self, i: int) -> str:
        """Why the broker of link ``i`` has not been heard from, as far as its connection tells."""
        watch = self._watches.get(i)
        if watch is not None:
            address = self.addresses[i]
            if address.startswith("ipc://"):  # name the path actually used, not the TCP endpoint
                return over_ipc(address, self._endpoints[i], watch.why())
            return watch.why()
        return self._route.why(i) if self._route is not None else "the broker, in this process, did not answer"

    def settle(self, i: int) -> None:
        """Link ``i``'s broker was heard from: stop watching its connection. Idempotent."""
        watch = self._watches.pop(i, None)
        if watch is not None:
            watch.close()

    def close(self, farewell: list[Any] | None = None) -> None:
        for i in list(self._watches):
            self.settle(i)
        for sock in self.socks:
            if sock.closed:
                continue
            if farewell is not None:
                try:
                    sock.send_multipart(farewell, zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            close_socket(sock)
        self.socks.clear()
        self._index.clear()
