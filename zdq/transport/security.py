"""CurveZMQ for every zdq socket: keys, server and client set-up, and who may connect.

A pool makes two key pairs when it starts: one for its brokers (servers) and one for its drivers
and consumers (clients). (Payloads are sealed separately, with the pool's payload key: see
:mod:`zdq.codec.results`.) They travel only over Dask's own channel, as arguments of the actors that
need them. A broker runs a ZAP authenticator that admits exactly the pool's client public key: a
peer without it is refused during the handshake, before any of its bytes is read as a message.

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

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

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


class _OnlyPoolClients:
    def __init__(self, allowed: bytes) -> None:
        self._allowed = allowed

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key == self._allowed
        if not ok:
            logger.warning("zdq broker refused a peer with an unknown CURVE key %r", key[:8])
        return ok


class Admission:
    """A broker socket's entry in its context's authenticator; :meth:`stop` withdraws it.

    ZeroMQ answers every handshake of a context through one ZAP handler, so the brokers of a
    process share one authenticator, each under a ZAP domain of its own that admits only its
    pool's client key. The authenticator stops with its last domain.
    """

    def __init__(self, ctx: zmq.Context[Any], domain: str) -> None:
        self._ctx = ctx
        self.domain = domain

    def stop(self) -> None:
        """Withdraw this socket's domain. Idempotent."""
        with _zap_lock:
            entry = _authenticators.get(id(self._ctx))
            if entry is None or self.domain not in entry[1]:
                return
            auth, domains = entry
            domains.discard(self.domain)
            auth.credentials_providers.pop(self.domain, None)
            if not domains:
                del _authenticators[id(self._ctx)]
                auth.stop()


_zap_lock = threading.Lock()
#: The running authenticator of each context (by ``id``: the entry keeps the context alive) and
#: the domains it serves.
_authenticators: dict[int, tuple[ThreadAuthenticator, set[str]]] = {}


def secure_server(ctx: zmq.Context[Any], sock: zmq.Socket[Any], keys: ServerKeys) -> Admission:
    """Make ``sock`` (not yet bound) a CURVE server that admits only the pool's clients.

    Returns its admission; stop it when the socket is closed.
    """
    domain = f"zdq-{os.urandom(8).hex()}"
    with _zap_lock:
        entry = _authenticators.get(id(ctx))
        if entry is None:
            auth = ThreadAuthenticator(ctx, log=logging.getLogger("zdq.transport.zap"))
            auth.start()
            entry = _authenticators[id(ctx)] = (auth, set())
        entry[0].configure_curve_callback(domain=domain, credentials_provider=_OnlyPoolClients(keys.client_public))
        entry[1].add(domain)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
    return Admission(ctx, domain)


def secure_client(sock: zmq.Socket[Any], keys: ClientKeys) -> None:
    """Make ``sock`` (not yet connected) a CURVE client of the pool's brokers."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
