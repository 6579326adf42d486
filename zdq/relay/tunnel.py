"""The driver's end of a relay: its DEALERs connect here, and what they say goes to the Relay actor.

The driver keeps its own sockets and protocol, unchanged: with a relay, :class:`~zdq.transport.sockets.BrokerLinks`
asks :meth:`Tunnel.address` where to connect the link of broker ``i`` and gets an inproc address
of this process instead of the broker's port. Behind that address, a ROUTER of the tunnel's I/O
thread takes the driver's messages; a pusher thread carries them to the :class:`~zdq.relay.actor.Relay`
actor in batches (one actor call at a time, so they arrive in order), and a puller thread long-polls
the relay for the brokers' answers, which the I/O thread hands to the driver's sockets.

What the pusher and the puller carry is encrypted with keys agreed with that relay
(:mod:`zdq.relay.cipher`; :class:`~zdq.relay.path.RelayPath` agrees them when it places the relay
and hands the session to :meth:`Tunnel.rebind`): each push is one batch sealed for the relay,
each pull one batch sealed for the driver. A pull that does not open counts the relay as lost
(another, with new keys, replaces it); a replayed one is dropped.

Each (re)connection of a link is a new generation: a new ROUTER at a new address here, a new DEALER
at the relay. Messages of an older generation are dropped on both sides, as a direct link's closed
socket drops them; the driver's protocol recovers them as it does for a direct link.

Who owns what
-------------
=====================================  ===========================================================
state                                  owner
=====================================  ===========================================================
ROUTERs, their poller                  the I/O thread, alone
outbox (driver -> relay)               shared under ``_cond``: the I/O thread adds, the pusher takes
inbox (relay -> driver)                a deque: the puller adds, the I/O thread takes
the relay actor, its session,          shared under ``_cond``: :meth:`rebind` sets, pusher and
its generation                         puller read; a failed call marks that generation lost
a session's sending counter            the pusher (it seals); its receiving counter: the puller
=====================================  ===========================================================
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any, Callable

import zmq

from zdq.errors import ZdqError
from zdq.relay.cipher import RelaySession, ReplayedBatch, pack_push, unpack_pull
from zdq.transport.sockets import Waker, close_socket, new_identity, process_context, recv_ready, try_send

__all__ = ["Tunnel"]

logger = logging.getLogger(__name__)

#: At most this many bytes of driver messages go in one push.
PUSH_BYTES = 16 << 20
#: How long one pull waits at the relay for the brokers' first message.
PULL_WAIT = 1.0


class Tunnel:
    """The inproc end of a relay in the driver's process.

    Parameters
    ----------
    name : str
        The pool's name (for thread names and messages).
    identity : bytes
        The driver's routing identity (what its DEALERs connect with).
    call_timeout : float
        How long one actor call to the relay may take before the relay counts as lost.
    on_lost : callable
        Called (on a tunnel thread) with the error, once per relay that fails.
    """

    def __init__(self, name: str, identity: bytes, call_timeout: float, on_lost: Callable[[BaseException], None]) -> None:
        self.name = name
        self._identity = identity
        self.call_timeout = call_timeout
        self._on_lost = on_lost
        self._prefix = f"inproc://zdq-relay-{new_identity().hex()}"
        self._cond = threading.Condition()
        # -- shared under _cond --------------------------------------------------------------------
        self._relay: Any = None
        self._relay_gen = 0
        self._session: RelaySession | None = None
        self._relay_where = ""
        self._lost: BaseException | None = None
        self._outbox: list[tuple[int, Any]] = []
        self._binds: list[tuple[int, int, str]] = []  # (slot, gen, endpoint) for the I/O thread to bind
        self._gens: dict[int, int] = {}  # slot -> its newest generation
        # -- the puller's, read by the I/O thread ------------------------------------------------
        self._inbox: deque[tuple[int, int, list[bytes]]] = deque()
        self._stop = threading.Event()
        self._waker: Waker | None = None
        self._threads: list[threading.Thread] = []
        self.carried = [0, 0]  # messages to the relay, from it

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self, relay: Any, where: str, session: RelaySession) -> None:
        self.rebind(relay, where, session)
        self._waker = Waker(process_context())
        for target, role in ((self._io, "io"), (self._push, "push"), (self._pull, "pull")):
            thread = threading.Thread(target=target, name=f"zdq-tunnel-{role}-{self.name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._waker is not None:
            self._waker.wake()
        for thread in self._threads:
            thread.join(self.call_timeout + 2)
        with self._cond:
            self._relay = None  # the actor's handle: held, it would keep the actor on its worker
            self._session = None

    def rebind(self, relay: Any, where: str, session: RelaySession) -> None:
        """Carry through ``relay`` (a new Relay actor, on worker ``where``, whose keys were agreed
        as ``session``) from now on. What was not carried yet is dropped: the driver reconnects
        its links through the new relay."""
        with self._cond:
            self._relay, self._relay_where, self._lost = relay, where, None
            self._session = session
            self._relay_gen += 1
            self._outbox.clear()
            self._cond.notify_all()
        self._inbox.clear()

    # -- what BrokerLinks asks ----------------------------------------------------------------------
    def address(self, slot: int, endpoint: str) -> str:
        """Where the driver's link ``slot`` connects to reach the broker at ``endpoint`` (a new
        generation of the link: the relay connects anew too)."""
        with self._cond:
            gen = self._gens.get(slot, 0) + 1
            self._gens[slot] = gen
            self._binds.append((slot, gen, endpoint))
        if self._waker is not None:
            self._waker.wake()
        return f"{self._prefix}-{slot}-{gen}"

    def why(self, slot: int) -> str:
        """Why the broker of ``slot`` may not have answered, as far as the relay path tells."""
        lost = self._lost
        if lost is not None:
            return f"the relay on {self._relay_where} was lost ({lost}); it is being placed again"
        return (
            f"the relay on {self._relay_where} carried the link, but the broker did not answer it (the relay's worker "
            "cannot reach the broker's port?)"
        )

    # -- threads ------------------------------------------------------------------------------------
    def _io(self) -> None:
        assert self._waker is not None
        poller = zmq.Poller()
        poller.register(self._waker.socket, zmq.POLLIN)
        routers: dict[int, tuple[int, zmq.Socket[Any]]] = {}  # slot -> (gen, ROUTER)
        tag: dict[zmq.Socket[Any], tuple[int, int]] = {}  # ROUTER -> (slot, gen)
        ctx = process_context()
        try:
            while not self._stop.is_set():
                with self._cond:
                    binds, self._binds = self._binds, []
                for slot, gen, endpoint in binds:
                    old = routers.pop(slot, None)
                    if old is not None:
                        poller.unregister(old[1])
                        del tag[old[1]]
                        close_socket(old[1])
                    sock = ctx.socket(zmq.ROUTER)
                    sock.setsockopt(zmq.LINGER, 0)
                    sock.setsockopt(zmq.SNDHWM, 0)
                    sock.setsockopt(zmq.RCVHWM, 0)
                    sock.bind(f"{self._prefix}-{slot}-{gen}")
                    routers[slot], tag[sock] = (gen, sock), (slot, gen)
                    poller.register(sock, zmq.POLLIN)
                    self._send_out(slot, (gen, endpoint))  # the relay connects before it sends
                while self._inbox:
                    slot, gen, frames = self._inbox.popleft()
                    current = routers.get(slot)
                    if current is not None and current[0] == gen:
                        try_send(current[1], [self._identity, *frames])
                for sock, _ in poller.poll(1000):
                    if sock is self._waker.socket:
                        self._waker.drain()
                        continue
                    slot_gen = tag.get(sock)
                    if slot_gen is None:
                        continue
                    for frames in recv_ready(sock, 256, router=True):
                        body = [bytes(f) for f in frames[1:]]  # frames[0]: the driver's identity
                        self._send_out(slot_gen[0], body)
        except Exception as e:
            logger.exception("the relay tunnel of pool %s failed", self.name)
            self._fail(self._relay_gen, e)
        finally:
            for _, sock in routers.values():
                close_socket(sock)
            self._waker.close()

    def _send_out(self, slot: int, item: Any) -> None:
        with self._cond:
            self._outbox.append((slot, item))
            self._cond.notify_all()

    def _push(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while not self._stop.is_set() and (not self._outbox or self._lost is not None):
                    self._cond.wait(1.0)
                if self._stop.is_set():
                    return
                items, size, n = [], 0, 0
                for n, (slot, item) in enumerate(self._outbox, 1):
                    items.append((slot, item))
                    size += sum(len(f) for f in item) if isinstance(item, list) else 0
                    if size >= PUSH_BYTES:
                        break
                del self._outbox[:n]
                relay, gen, session = self._relay, self._relay_gen, self._session
            try:
                assert session is not None  # set with the relay, under _cond
                relay.push(session.seal(pack_push(items))).result(timeout=self.call_timeout)
            except Exception as e:
                self._fail(gen, e)
                continue
            self.carried[0] += len(items)

    def _pull(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while not self._stop.is_set() and self._lost is not None:
                    self._cond.wait(1.0)
                relay, gen, session = self._relay, self._relay_gen, self._session
            if self._stop.is_set():
                return
            try:
                assert session is not None  # set with the relay, under _cond
                sealed = relay.pull(PULL_WAIT).result(timeout=PULL_WAIT + self.call_timeout)
                got = unpack_pull(session.open(sealed))
            except ReplayedBatch as e:
                logger.warning("the relay tunnel of pool %s dropped a pull: %s", self.name, str(e))  # text: a kept record holds no frame
                continue
            except Exception as e:  # a failed call, or a batch that did not open: the path is broken
                self._fail(gen, e)
                continue
            if got and gen == self._relay_gen:
                self._inbox.extend(got)
                self.carried[1] += len(got)
                assert self._waker is not None
                self._waker.wake()

    def _fail(self, gen: int, exc: BaseException) -> None:
        with self._cond:
            if gen != self._relay_gen or self._lost is not None or self._stop.is_set():
                return
            self._lost = exc if isinstance(exc, ZdqError) else ZdqError(f"{type(exc).__name__}: {exc}")
        logger.warning("the relay of pool %s on %s failed: %s", self.name, self._relay_where, str(exc))  # text: no frame kept
        try:
            self._on_lost(exc)
        except Exception:
            logger.exception("reporting the lost relay of pool %s failed", self.name)
