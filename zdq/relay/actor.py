"""The Relay actor: a driver's sockets, inside the workers' network, for a driver outside it.

A client that reaches only the Dask scheduler (Dask Gateway, Kubernetes, a laptop on a cloud
cluster) cannot open zdq's sockets to the brokers. A pool made with ``relay=True`` places this
actor on a worker. It holds one DEALER per broker, with the driver's identity and CURVE keys, and
carries the driver's messages to them and their answers back, in batches, over Dask's own comm
(the actor calls that the scheduler proxies for such a client). A broker sees the driver as if it
were connected itself; the relay never reads a message (payloads stay sealed end to end).

What crosses Dask's comm is encrypted (:mod:`zdq.relay.cipher`): the driver's tunnel calls
:meth:`Relay.hello` first, with its ephemeral public key, and every push and pull after it carries
one batch sealed with the keys they agreed. A push that does not open (tampered with, sealed for
the other direction, after a gap) is refused at the call, and the tunnel places another relay; a
replayed one is dropped.

Who owns what
-------------
The DEALERs and their poller belong to the relay's I/O thread. :meth:`Relay.hello`,
:meth:`Relay.push` and :meth:`Relay.pull` run on the worker's event loop (so does the session:
push opens, pull seals); they meet the I/O thread at two deques (what goes to the brokers, what
came from them) and a waker, never at a socket.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections import deque
from typing import Any

import zmq

from zdq._actor import liveness_probe, worker_address
from zdq.errors import ProtocolError
from zdq.relay.cipher import KeyOffer, RelaySession, ReplayedBatch, Side, pack_pull, unpack_push
from zdq.transport.security import ClientKeys
from zdq.transport.sockets import Waker, close_socket, connect_dealer, process_context, recv_ready, try_send

__all__ = ["Relay", "PULL_BYTES"]

logger = logging.getLogger(__name__)

#: At most this many bytes of broker messages go back in one pull (more wait for the next one).
PULL_BYTES = 16 << 20
#: How long the I/O thread sleeps between checks that its actor is still held.
_IDLE_POLL_MS = 1000


def _size(frames: list[bytes]) -> int:
    return sum(len(f) for f in frames)


_BAD_PUSH = "a sealed push holds a list of (slot, [frame bytes, ...]) and (slot, (gen, endpoint)) pairs"


def _check_items(items: Any) -> None:
    """A TypeError naming what is wrong, before anything of a bad push is carried."""
    if not isinstance(items, list):
        raise TypeError(f"{_BAD_PUSH}, got {type(items).__name__}")
    for item in items:
        if not isinstance(item, tuple) or len(item) != 2:
            raise TypeError(f"{_BAD_PUSH}, got the item {item!r:.80}")
        slot, x = item
        if isinstance(slot, bool) or not isinstance(slot, int) or slot < 0:
            raise TypeError(f"{_BAD_PUSH}: a slot is a non-negative integer, got {slot!r:.80}")
        if isinstance(x, tuple):
            if len(x) != 2 or isinstance(x[0], bool) or not isinstance(x[0], int) or not isinstance(x[1], str):
                raise TypeError(f"{_BAD_PUSH}: a connect is (gen, endpoint), got {x!r:.80}")
        elif not isinstance(x, list) or not x or not all(isinstance(f, (bytes, bytearray, memoryview)) for f in x):
            raise TypeError(f"{_BAD_PUSH}: a message is a non-empty list of bytes frames, got {x!r:.80}")


class Relay:
    """Dask actor that carries one driver's messages to the brokers of its pool and back.

    Parameters
    ----------
    name : str
        The pool's name (for the logs).
    identity : bytes
        The driver's routing identity: the brokers route its results to it.
    keys : ClientKeys, optional
        The pool's CURVE client keys (``None``: unauthenticated sockets).
    max_message_size : int
        The largest message a broker may send.
    """

    def __init__(self, name: str, identity: bytes, keys: ClientKeys | None, max_message_size: int) -> None:
        self.name = name
        self._identity = identity
        self._keys = keys
        self._max = max_message_size
        self._outbox: deque[tuple[int, Any]] = deque()  # (slot, frames), or (slot, (gen, endpoint)) to connect
        self._inbox: deque[tuple[int, int, list[bytes]]] = deque()  # (slot, its socket's gen, frames)
        self._arrived: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waker: Waker | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: str | None = None
        self._session: RelaySession | None = None  # the keys agreed with the tunnel (hello)
        self.worker = ""
        self.carried = [0, 0]  # messages to the brokers, from them

    # -- on the worker's event loop ---------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._arrived = asyncio.Event()
        self.worker = worker_address() or ""
        self._waker = Waker(process_context())
        self._thread = threading.Thread(
            target=self._run, args=(liveness_probe(self),), name=f"zdq-relay-{self.name}", daemon=True
        )
        self._thread.start()

    async def hello(self, driver_public: bytes) -> bytes:
        """Agree this relay's keys with the driver's tunnel: ``driver_public`` is its ephemeral
        X25519 public key; returns this relay's. Once per relay: a second hello is refused (the
        keys of a running relay are never replaced; the tunnel places a new relay instead)."""
        if self._session is not None:
            raise ProtocolError(f"relay of pool {self.name} on {self.worker} already agreed its keys with its driver")
        if not isinstance(driver_public, bytes):
            raise TypeError(f"hello takes the driver's X25519 public key as bytes, got {type(driver_public).__name__}")
        offer = KeyOffer()
        secret = self._keys.secret if self._keys is not None else None
        self._session = offer.agree(driver_public, Side.RELAY, pool=self.name, identity=self._identity, pool_secret=secret)
        return offer.public

    def _agreed(self) -> RelaySession:
        if self._session is None:
            raise ConnectionError(f"relay of pool {self.name} has agreed no keys with its driver yet: hello comes first")
        return self._session

    async def push(self, sealed: bytes) -> int:
        """Open ``sealed`` (a batch the tunnel sealed) and carry its items in order, for each
        ``(slot, x)``: if ``x`` is ``(gen, endpoint)``, connect slot ``slot`` to the broker at
        ``endpoint`` with a new socket (what the old one held is dropped; what comes from the new
        one is tagged ``gen``); if ``x`` is a list of frames, send it to that slot's broker. Returns
        at once (sending is the I/O thread's) the number of items taken (0 for a replay, dropped).

        Raises TypeError for what is not bytes, :class:`~zdq.errors.ProtocolError` for a batch that
        does not open or decode: nothing of it is carried."""
        if not isinstance(sealed, bytes):
            raise TypeError(f"push takes a sealed batch (bytes), got {type(sealed).__name__}")
        try:
            plaintext = self._agreed().open(sealed)
        except ReplayedBatch as e:
            logger.warning("relay of pool %s on %s dropped a push: %s", self.name, self.worker, e)
            return 0
        items = unpack_push(plaintext)
        _check_items(items)  # all of them before any is taken: a bad push carries nothing
        if self._error is not None:
            raise ConnectionError(f"relay of pool {self.name} on {self.worker} stopped: {self._error}")
        self._ensure_started()
        self._outbox.extend(items)
        assert self._waker is not None
        self._waker.wake()
        return len(items)

    async def pull(self, wait: float) -> bytes:
        """The brokers' messages that arrived, as ``(slot, gen, frames)``, oldest first, in one
        batch sealed for the tunnel (:func:`~zdq.relay.cipher.unpack_pull` reads it once opened);
        waits up to ``wait`` seconds for the first one."""
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not math.isfinite(wait) and wait != math.inf:
            raise TypeError(f"pull takes the seconds to wait for a message, got {wait!r:.80}")
        session = self._agreed()
        self._ensure_started()
        assert self._arrived is not None
        if not self._inbox:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout=max(0.0, min(float(wait), 30.0)))
            except asyncio.TimeoutError:
                pass
        if self._error is not None and not self._inbox:
            raise ConnectionError(f"relay of pool {self.name} on {self.worker} stopped: {self._error}")
        out: list[tuple[int, int, list[bytes]]] = []
        size = 0
        while self._inbox and (not out or size < PULL_BYTES):
            entry = self._inbox.popleft()
            out.append(entry)
            size += _size(entry[2])
        return session.seal(pack_pull(out))

    def stop(self) -> None:
        """Close the sockets and end the I/O thread. Idempotent."""
        self._stop.set()
        if self._waker is not None:
            self._waker.wake()
        if self._thread is not None:
            self._thread.join(10)

    def statistics(self) -> dict[str, Any]:
        return {"worker": self.worker, "to_brokers": self.carried[0], "from_brokers": self.carried[1]}

    # -- the I/O thread ---------------------------------------------------------------------------
    def _arrive(self) -> None:
        if self._arrived is not None:
            self._arrived.set()

    def _run(self, alive: Any) -> None:
        assert self._waker is not None and self._loop is not None
        ctx = process_context()
        socks: dict[int, zmq.Socket[Any]] = {}
        slot_of: dict[zmq.Socket[Any], tuple[int, int]] = {}  # socket -> (slot, gen)
        poller = zmq.Poller()
        poller.register(self._waker.socket, zmq.POLLIN)
        try:
            while not self._stop.is_set() and alive():
                while self._outbox:
                    slot, item = self._outbox.popleft()
                    if isinstance(item, tuple):  # (gen, endpoint): connect the slot anew
                        old = socks.pop(slot, None)
                        if old is not None:
                            poller.unregister(old)
                            del slot_of[old]
                            close_socket(old)
                        gen, endpoint = item
                        try:
                            sock = connect_dealer(ctx, endpoint, self._identity, max_message_size=self._max, keys=self._keys)
                        except (zmq.ZMQError, TypeError, ValueError) as e:  # the driver finds the broker silent
                            logger.warning("relay of pool %s cannot connect to %r: %s", self.name, endpoint, e)
                            continue
                        socks[slot], slot_of[sock] = sock, (slot, gen)
                        poller.register(sock, zmq.POLLIN)
                        continue
                    target = socks.get(slot)
                    # Not sent (no socket for the slot, or the broker cannot take it now): the
                    # driver's protocol recovers it, as for a direct link (a chunk unconfirmed is
                    # sent again, a lease unacknowledged expires).
                    if target is not None and try_send(target, item):
                        self.carried[0] += 1
                came = 0
                for sock, _ in poller.poll(_IDLE_POLL_MS):
                    if sock is self._waker.socket:
                        self._waker.drain()
                        continue
                    tag = slot_of.get(sock)
                    if tag is None:
                        continue
                    for frames in recv_ready(sock, 256):
                        self._inbox.append((tag[0], tag[1], [bytes(f) for f in frames]))
                        came += 1
                if came:
                    self.carried[1] += came
                    self._loop.call_soon_threadsafe(self._arrive)
        except Exception as e:  # told to the driver at its next push or pull
            self._error = f"{type(e).__name__}: {e}"
            logger.exception("relay of pool %s failed", self.name)
            try:
                self._loop.call_soon_threadsafe(self._arrive)
            except RuntimeError:
                pass
        finally:
            for sock in socks.values():
                close_socket(sock)
            self._waker.close()
