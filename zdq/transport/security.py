"""CurveZMQ for every zdq socket: keys, server and client set-up, and who may connect.

A pool makes two key pairs when it starts: one for its brokers (servers) and one for its drivers
and consumers (clients). (Payloads are sealed separately, with the pool's payload key: see
:mod:`zdq.codec.results`.) They travel only over Dask's own channel, as arguments of the actors that
need them. A broker runs a ZAP authenticator that admits exactly the pool's client public key: a
peer without it is refused during the handshake, before any of its bytes is read as a message.
Anyone who reaches the port can try as often as they like: each refusal is counted
(``BrokerStats.refused_peers``), and logged once per address a minute at most. So is a handshake
that fails before it reaches the authenticator (libzmq ends it itself: a peer that has the wrong
server key, speaks another security mechanism, or is no ZeroMQ peer), which ZeroMQ's socket monitor
tells the same thread; those are logged once per broker a minute at most (the monitor does not
name the peer). A connection that sends no ZeroMQ greeting (an HTTP request, a port scan) is
dropped by libzmq without any report, and is not counted.

On a ``tcp://`` Dask cluster that channel is clear text: these keys are then no secret from an
observer of it (CurveZMQ's ephemeral session keys still hide the traffic of the sockets), which is
why the relay, whose batches cross that channel themselves, agrees keys of its own that never
cross it (:mod:`zdq.relay.cipher`).

A consumer or driver in the broker's own process reaches it over inproc instead (see
:func:`zdq.transport.sockets.process_context`). ZeroMQ gives inproc connections no security
mechanism; none is needed, because only code running inside that process can open one, and such
code can already read the keys from its memory.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils import z85

from zdq.reporting import Throttle

__all__ = ["PoolKeys", "ClientKeys", "ServerKeys", "Admission", "secure_server", "secure_client"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientKeys:
    """What a driver or consumer holds: its key pair and the brokers' public key (z85)."""

    public: bytes
    secret: bytes
    server_public: bytes

    def __repr__(self) -> str:  # never print a secret
        return f"ClientKeys(public={self.public!r}, secret=<hidden>)"


@dataclass(frozen=True)
class ServerKeys:
    """What a broker holds: its key pair and the one client public key it admits (z85)."""

    public: bytes
    secret: bytes
    client_public: bytes

    def __repr__(self) -> str:
        return f"ServerKeys(public={self.public!r}, secret=<hidden>)"


@dataclass(frozen=True)
class PoolKeys:
    server: ServerKeys
    client: ClientKeys

    @classmethod
    def generate(cls) -> PoolKeys:
        if not zmq.has("curve"):
            raise RuntimeError("this libzmq has no CURVE support")
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        return cls(
            ServerKeys(server_public, server_secret, client_public),
            ClientKeys(client_public, client_secret, server_public),
        )


#: Where ZeroMQ sends a context's handshakes to be judged (RFC 27, ZAP).
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_ZAP_VERSION = b"1.0"


def zap_verdict(request: list[bytes], admitted: dict[bytes, bytes]) -> list[bytes]:
    """The reply to one ZAP request (RFC 27): ``200`` for a CurveZMQ peer whose public key is the
    one its socket's domain admits (``admitted``: ZAP domain -> raw 32-byte client key), ``400``
    for anything else (another key, an unknown domain, another mechanism, a malformed request)."""
    version, request_id = (request + [b"", b""])[:2]
    if version != _ZAP_VERSION or len(request) != 7:
        return [_ZAP_VERSION, request_id, b"400", b"malformed ZAP request", b"", b""]
    domain, mechanism, key = request[2], request[5], request[6]
    allowed = admitted.get(domain)
    if mechanism == b"CURVE" and allowed is not None and key == allowed:
        return [_ZAP_VERSION, request_id, b"200", b"OK", b"zdq", b""]
    return [_ZAP_VERSION, request_id, b"400", b"not this pool's key", b"", b""]


#: A peer address's refused handshakes are logged at most once in this many seconds.
_WARN_EVERY = 60.0

#: A monitor message's first frame starts with the event (16 bits) and its value (32 bits).
_EVENT = struct.Struct("=HI")
#: Protocol errors of the handshake itself (``ZMQ_PROTOCOL_ERROR_ZMTP_*``); the rest
#: (``ZMQ_PROTOCOL_ERROR_ZAP_*``) would be the authenticator's own malformed replies, no peer's.
_ZMTP_ERRORS = 0x10000000
_ZAP_ERRORS = 0x20000000


def _bind_zap(sock: zmq.Socket[Any], wait: float = 2.0) -> None:
    """Bind ``sock`` as its context's ZAP handler; a handler stopping meanwhile frees the name
    within ``wait`` seconds (else the error says so)."""
    give_up = time.monotonic() + wait
    while True:
        try:
            sock.bind(_ZAP_ENDPOINT)
            return
        except zmq.ZMQError as e:
            if e.errno != errno.EADDRINUSE or time.monotonic() > give_up:
                sock.close(linger=0)
                raise zmq.ZMQError(
                    e.errno, f"cannot start the brokers' ZAP handler: {_ZAP_ENDPOINT} is taken in this context ({e})"
                ) from e
            time.sleep(0.005)


class _ZapHandler:
    """The ZAP handler of one context: a thread that judges every CurveZMQ handshake of the
    context's broker sockets, each socket under a domain that admits one client key.

    Lean on purpose (issue 26, point 7): pyzmq's ThreadAuthenticator runs an asyncio loop and
    its general checks for each request (0.4 ms of CPU a handshake, a third of a handshake's
    cost); this one receives, compares one key and answers. Owned by ``_authenticators`` (under
    ``_zap_lock``); stopped with its context's last domain.

    The same thread reads each broker socket's monitor (:meth:`watch`) for the handshakes libzmq
    fails before they reach ZAP, and counts them as refusals too.
    """

    def __init__(self, ctx: zmq.Context[Any]) -> None:
        self._ctx = ctx
        self.admitted: dict[bytes, bytes] = {}  # domain -> raw client key; read by the thread
        self.admissions: dict[bytes, Admission] = {}  # domain -> its admission, which counts refusals
        self._warned = Throttle(_WARN_EVERY)  # the thread's: when each address's refusal was logged
        self._socket = ctx.socket(zmq.REP)
        self._socket.setsockopt(zmq.LINGER, 0)
        _bind_zap(self._socket)
        self._wake_address = f"inproc://zdq-zap-stop-{os.urandom(8).hex()}"
        self._wake_in = ctx.socket(zmq.PAIR)
        self._wake_in.setsockopt(zmq.LINGER, 0)
        self._wake_in.bind(self._wake_address)
        self._wake_out = ctx.socket(zmq.PAIR)
        self._wake_out.setsockopt(zmq.LINGER, 0)
        self._wake_out.connect(self._wake_address)
        self._monitors: dict[bytes, zmq.Socket[Any]] = {}  # domain -> its socket's monitor; the thread's
        #: Monitors connected by ``secure_server`` (on the broker's thread, while the socket's
        #: monitor is bound: connected later, after the socket closed, one would wait for ever for
        #: its peer, and hold a descriptor), handed to the thread by ``watch`` (under ``_zap_lock``).
        self._handed: dict[bytes, zmq.Socket[Any]] = {}
        self._thread = threading.Thread(target=self._serve, name="zdq-zap", daemon=True)
        self._thread.start()

    def watch(self, domain: bytes, monitor: zmq.Socket[Any]) -> None:
        """Read ``monitor`` (connected to the monitor of the socket of ``domain``) from now on;
        under ``_zap_lock``, which orders every message to the thread."""
        self._handed[domain] = monitor
        try:
            self._wake_out.send(b"+" + domain, zmq.NOBLOCK)
        except zmq.ZMQError:  # the context is closing: the thread ends with it
            self._handed.pop(domain, None)
            monitor.close(linger=0)

    def unwatch(self, domain: bytes) -> None:
        """Stop reading it (under ``_zap_lock``)."""
        try:
            self._wake_out.send(b"-" + domain, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the context is closing: the thread ends with it

    def _serve(self) -> None:
        sock, wake, monitors = self._socket, self._wake_in, self._monitors
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if wake in ready:
                    order = wake.recv()
                    if not order:
                        return
                    self._order(poller, order)
                if sock in ready:
                    request = sock.recv_multipart()
                    reply = zap_verdict(request, self.admitted)
                    sock.send_multipart(reply)
                    if reply[2] != b"200":
                        self._refused(request)
                if len(ready) > (wake in ready) + (sock in ready):
                    for domain, monitor in monitors.items():
                        if monitor in ready:
                            self._monitored(domain, monitor.recv_multipart())
        except zmq.ZMQError as e:  # the context is terminating: its sockets stop with it
            logger.debug("zdq ZAP handler stopped: %s", e)
        finally:
            for monitor in [*monitors.values(), *self._handed.values()]:
                monitor.close(linger=0)
            monitors.clear()
            try:
                # At once: a closed socket's inproc name is freed later, by ZeroMQ's reaper, and
                # the context's next broker binds a new handler there meanwhile.
                sock.unbind(_ZAP_ENDPOINT)
            except zmq.ZMQError:
                pass
            sock.close(linger=0)
            wake.close(linger=0)

    def _order(self, poller: zmq.Poller, order: bytes) -> None:
        """``+domain``: read that socket's monitor from now on; ``-domain``: no longer."""
        domain = order[1:]
        monitor = self._monitors.pop(domain, None)
        if monitor is not None:
            poller.unregister(monitor)
            monitor.close(linger=0)
        monitor = self._handed.pop(domain, None)
        if monitor is not None:
            if order[:1] == b"+":
                poller.register(monitor, zmq.POLLIN)
                self._monitors[domain] = monitor
            else:
                monitor.close(linger=0)

    def _monitored(self, domain: bytes, message: list[bytes]) -> None:
        """A monitor event of ``domain``'s socket: a handshake libzmq failed counts as refused."""
        if len(message) < 2 or len(message[0]) < _EVENT.size:
            return
        event, value = _EVENT.unpack_from(message[0])
        if event != zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL or not _ZMTP_ERRORS <= value < _ZAP_ERRORS:
            return
        admission = self.admissions.get(domain)
        if admission is not None:
            admission.refused += 1
        if not self._warned.due("handshake " + domain.decode(), time.monotonic()):
            return
        why = {
            zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "a CurveZMQ box did not open: the peer has another server key",
            zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "the peer does not use CurveZMQ",
        }.get(value, f"not a CurveZMQ peer of this pool: protocol error {value:#x}")
        logger.warning(
            "zdq broker at %s refused a handshake (%s; more of these not logged for %.0f s; the queue's "
            "statistics count them all: refused_peers)",
            message[1].decode(errors="replace")[:64], why, _WARN_EVERY,
        )

    def _refused(self, request: list[bytes]) -> None:
        """Count a refused handshake for its socket's broker, and log it unless its address's
        last one was logged within ``_WARN_EVERY``: a flood of handshakes from one address (new
        keys each time) costs the log one line a minute."""
        # A refused request may be malformed: its missing frames read as empty.
        frames = request + [b""] * (7 - len(request))
        domain, address, mechanism, key = frames[2], frames[3], frames[5], frames[6]
        admission = self.admissions.get(domain)
        if admission is not None:
            admission.refused += 1
        peer = address.decode(errors="replace")[:64] or "?"
        if not self._warned.due(peer, time.monotonic()):
            return
        shown = z85.encode(key)[:8] if len(key) == 32 else key[:8]
        logger.warning(
            "zdq broker refused a peer at %s (%s) with an unknown CURVE key %r (more refusals from this address "
            "not logged for %.0f s; the queue's statistics count them all: refused_peers)",
            peer, mechanism.decode(errors="replace")[:16], shown, _WARN_EVERY,
        )

    def stop(self, join: float = 2.0) -> None:
        """Stop the thread (it closes its sockets); bounded by ``join`` seconds."""
        try:
            self._wake_out.send(b"", zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the context is closing: the thread ends with it
        self._thread.join(join)
        self._wake_out.close(linger=0)


class Admission:
    """A broker socket's entry in its context's authenticator; :meth:`stop` withdraws it.

    ZeroMQ answers every handshake of a context through one ZAP handler, so the brokers of a
    process share one authenticator (a :class:`_ZapHandler`), each under a ZAP domain of its own
    that admits only its pool's client key. The authenticator stops with its last domain.
    ``refused`` counts the handshakes it refused for this socket (written by the handler's thread
    alone; kept after :meth:`stop`).
    """

    def __init__(self, ctx: zmq.Context[Any], domain: str) -> None:
        self._ctx = ctx
        self.domain = domain
        self.refused = 0

    def stop(self) -> None:
        """Withdraw this socket's domain. Idempotent."""
        with _zap_lock:
            entry = _authenticators.get(id(self._ctx))
            if entry is None or self.domain not in entry[1]:
                return
            auth, domains = entry
            domains.discard(self.domain)
            auth.admitted.pop(self.domain.encode(), None)
            auth.admissions.pop(self.domain.encode(), None)
            auth.unwatch(self.domain.encode())
            if not domains:
                del _authenticators[id(self._ctx)]
                auth.stop()


_zap_lock = threading.Lock()
#: The running authenticator of each context (by ``id``: the entry keeps the context alive) and
#: the domains it serves.
_authenticators: dict[int, tuple[_ZapHandler, set[str]]] = {}


def secure_server(ctx: zmq.Context[Any], sock: zmq.Socket[Any], keys: ServerKeys) -> Admission:
    """Make ``sock`` (not yet bound) a CURVE server that admits only the pool's clients.

    Returns its admission; stop it when the socket is closed.
    """
    domain = f"zdq-{os.urandom(8).hex()}"
    admission = Admission(ctx, domain)
    with _zap_lock:
        entry = _authenticators.get(id(ctx))
        if entry is None:
            entry = _authenticators[id(ctx)] = (_ZapHandler(ctx), set())
        entry[0].admissions[domain.encode()] = admission
        entry[0].admitted[domain.encode()] = z85.decode(keys.client_public)
        entry[1].add(domain)
        # Handshakes that fail before ZAP (a wrong server key...) only the socket's monitor sees.
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, addr=monitor_address(domain.encode()))
        monitor.setsockopt(zmq.LINGER, 0)
        entry[0].watch(domain.encode(), monitor)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
    # Without a ZAP handler (its thread ended), libzmq would admit any CurveZMQ client that has
    # the server's public key: with this, it refuses them all instead.
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    return admission


def monitor_address(domain: bytes) -> str:
    """Where the monitor of the broker socket of ZAP ``domain`` publishes its events."""
    return f"inproc://zdq-refusals-{domain.decode()}"


def secure_client(sock: zmq.Socket[Any], keys: ClientKeys) -> None:
    """Make ``sock`` (not yet connected) a CURVE client of the pool's brokers."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
