"""The consumer's link to its brokers: sockets, credit, heartbeats and the outbox.

All of it belongs to one thread at a time, the *socket owner*; :class:`Handover` says which and
moves it. With ``max_concurrency`` > 1 the owner is always ``zdq-consumer-<name>``. With
``max_concurrency`` 1 the owner runs each chunk itself, and ``zdq-standby-<name>`` takes the
sockets over when a chunk runs longer than ``_TAKEOVER``: the two threads trade places as often as
chunks run long. Other threads reach the owner only through the outbox (:meth:`Link.post`), the
control queue (:meth:`Link.set_endpoint`) and the consumer's two events, and wake it with the waker.

Credit: what to ask each broker for is decided by :class:`~zdq.consumer.credit.Credit`, a pure
object that the socket owner runs: the loop tells it what arrives and leaves, and sends the
FETCHes it decides. Each message from a broker goes through one route table (message type to
handler); a type a consumer does not accept is counted and dropped like a malformed one.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from zdq.config import PoolSettings
from zdq.consumer.credit import EAGER_FETCH, Credit
from zdq.consumer.runner import Counters, Runner
from zdq.errors import ProtocolError
from zdq.transport import protocol as p
from zdq.transport.reach import WENT_SILENT, Heard
from zdq.transport.security import ClientKeys
from zdq.transport.sockets import (
    BrokerLinks,
    Waker,
    process_context,
    recv_ready,
    try_send,
)

__all__ = ["Handover", "Link"]

logger = logging.getLogger(__name__)

#: A chunk run on the thread that owns the sockets leaves heartbeats and credit unattended; after
#: this long, the standby thread takes the sockets over (see Handover.stand_by).
_TAKEOVER = 0.05

_FETCH_ONE = p.encode(p.Fetch(1))
_WITHDRAW = p.encode(p.Fetch(0))
_HEARTBEAT = p.encode(p.Heartbeat())
_BYE = p.encode(p.Bye())


class Handover:
    """Which thread owns the sockets, and the one rule by which the other takes them.

    The owner runs a chunk through :meth:`run_here`; the other thread waits in :meth:`stand_by`
    and becomes the owner once that chunk has run for ``_TAKEOVER``. The previous owner learns it
    when its chunk ends (``run_here`` returns False) and stands by in turn. ``owner`` and ``since``
    change under ``lock``; ``busy`` and ``chunk_seconds`` are written by the thread running a
    chunk and read by the owner.
    """

    __slots__ = ("busy", "chunk_seconds", "lock", "owner", "since")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner = 0  # the owning thread's ident
        self.since: float | None = None  # when the owner started the chunk it runs itself
        self.busy = False  # a chunk is running inline: the next one waits for it
        self.chunk_seconds = 0.0  # how long chunks take to run (moving average)

    def claim(self) -> None:
        """The calling thread owns the sockets (the I/O thread, as it opens them)."""
        with self.lock:
            self.owner = threading.get_ident()
            self.since = None

    def owns(self) -> bool:
        return self.owner == threading.get_ident()

    def run_here(self, execute: Callable[[int, p.Deliver], None], broker: int, deliver: p.Deliver) -> bool:
        """Run a chunk on the owning thread; False if the standby took the sockets meanwhile.

        Only the owner calls it, so ``owner`` is this thread's ident. ``since`` (None between
        runs: what the standby reads, under its lock) and ``busy`` are set without the lock, each
        store atomic; the end takes the lock, to learn atomically whether the sockets are still
        this thread's."""
        me = self.owner
        start = self.since = time.monotonic()
        self.busy = True
        execute(broker, deliver)
        with self.lock:
            self.busy = False
            kept = self.owner == me
            if kept:
                self.since = None
        self.chunk_seconds = 0.8 * self.chunk_seconds + 0.2 * (time.monotonic() - start)
        return kept

    def stand_by(self, stop: threading.Event) -> bool:
        """Wait for the owner's chunk to run long, then take the sockets over; False once stopped
        (the owner, serving, closes them)."""
        me = threading.get_ident()
        while True:
            stopping = stop.wait(_TAKEOVER)
            with self.lock:
                since = self.since
                if since is not None and (stopping or time.monotonic() - since >= _TAKEOVER):
                    self.owner = me
                    self.since = None
                    return True
            if stopping:
                return False


class Link:
    """The consumer's sockets and the I/O loop that serves them (see the module docstring).

    Built by the actor's ``start()``, which then runs :meth:`io_main` on ``zdq-consumer-<name>``
    and, with ``max_concurrency`` 1, :meth:`take_turns` on ``zdq-standby-<name>``.
    """

    def __init__(
        self,
        name: str,
        identity: bytes,
        endpoints: list[str],
        settings: PoolSettings,
        stop: threading.Event,
        fetching: threading.Event,
        counters: Counters,
        *,
        keys: ClientKeys | None,
        early_ack: bool,
        alive: Callable[[], bool],
        queues: Sequence[str],
    ) -> None:
        self.name = name
        self._queues = queues  # the brokers' queue names, for the logs
        self._identity = identity
        self._endpoints = list(endpoints)
        self._settings = settings
        self._stop = stop
        self._fetching = fetching
        self._counters = counters
        self._keys = keys
        self._early_ack = early_ack
        self._alive = alive
        self._runner: Runner | None = None
        self._turn = Handover()
        self._outbox: deque[tuple[int, p.Message]] = deque()  # any thread appends, the owner sends
        self._control: deque[tuple[int, str]] = deque()  # brokers placed again: (index, endpoint)
        self._ready: deque[tuple[int, p.Deliver]] = deque()  # chunks to run on the owning thread
        self._waker: Waker | None = None
        self._links: BrokerLinks | None = None
        self._credit: Credit | None = None
        self._heard: Heard | None = None
        # Message type -> handler, built once the sockets are open (see _routes).
        self._route_table: dict[type[Any], Callable[[int, Any, zmq.Socket[Any]], None]] | None = None
        self._next_beat = 0.0
        #: Why the link stopped on its own (None while it runs or after a requested stop).
        self.failure: str | None = None
        #: The error that kept it from opening its sockets, for ``start()`` to raise.
        self.open_error: BaseException | None = None
        # Until when (monotonic) the chunks running at a requested stop may end and report before
        # the sockets close (leave_by(), before the stop event): 0, a stop from inside, waits not.
        self._leave_by = 0.0
        #: Set once the sockets are closed (the consumer's BYE sent): what a stop waits for.
        self.closed = threading.Event()

    def attach(self, runner: Runner) -> None:
        """The runner whose chunks this link receives and reports (set before the threads start)."""
        self._runner = runner

    @property
    def in_flight(self) -> int:
        credit = self._credit
        return 0 if credit is None else credit.in_flight

    # -- from any thread --------------------------------------------------------------------------
    def poke(self) -> None:
        waker = self._waker
        if waker is not None:
            waker.wake()

    def post(self, broker: int, msg: p.Message) -> None:
        """Hand a message to the thread that owns the sockets (from any thread)."""
        self._outbox.append((broker, msg))
        if self._turn.owner != threading.get_ident():
            self.poke()  # the owner sleeps in poll; the owner itself sends it on its next turn

    def set_endpoint(self, broker: int, endpoint: str) -> None:
        self._control.append((broker, endpoint))
        self.poke()

    def leave_by(self, deadline: float) -> None:
        """A requested stop comes next (set before the stop event): the chunks running then may
        end, and their DONEs go, until ``deadline`` (monotonic) before the sockets close."""
        self._leave_by = deadline

    def reach(self) -> tuple[list[str], list[tuple[str, str, str]], list[str]]:
        """(From any thread.) The queues heard from; ``(queue, endpoint, why)`` of those reported
        unreachable (never heard from, or :meth:`silent` since); and the queues neither heard from
        nor reported yet."""
        heard = self._heard
        if heard is None:
            return [], [], list(self._queues)
        # A broker placed again whose new endpoint the socket owner has not taken yet: pending,
        # not what was said of its old endpoint.
        moving = {i for i, _ in list(self._control)}
        why = {i: w for i, w in [*heard.why.items(), *heard.silent.items()] if i not in moving}
        reached = [self._queues[i] for i, h in enumerate(heard.heard) if h and i not in moving and i not in why]
        pending = [self._queues[i] for i, h in enumerate(heard.heard) if i in moving or (not h and i not in why)]
        return reached, [(self._queues[i], self._endpoints[i], w) for i, w in sorted(why.items())], pending

    def silent(self) -> list[str]:
        """(From any thread.) The queues heard from once whose brokers have sent nothing for the
        heartbeat timeout since: cut off after this consumer reached them (a network cut, their
        workers stopped or starved). They are among :meth:`reach`'s unreachable ones."""
        heard = self._heard
        return [] if heard is None else [self._queues[i] for i in sorted(heard.silent)]

    # -- the socket owner -------------------------------------------------------------------------
    def io_main(self, ready: threading.Event) -> None:
        """The I/O thread: open the sockets, then serve them (taking turns with the standby)."""
        self._turn.claim()
        try:
            self._open()
        except Exception as e:  # noqa: BLE001 - ZMQError (too many sockets or files), a bad endpoint...
            logger.error("consumer %s could not open its sockets: %s", self.name, e)
            self.open_error = e
            self._abandon(f"could not open its sockets: {e}")
            self._close()
            return
        finally:
            ready.set()
        self.take_turns()

    def _open(self) -> None:
        ctx = process_context()
        waker = self._waker = Waker(ctx)
        hello = p.encode(p.Hello(p.Role.CONSUMER, self.name.encode()[:256]))
        links = self._links = BrokerLinks(
            ctx, self._identity, hello, keys=self._keys, max_message_size=self._settings.max_message_size
        )
        links.poller.register(waker.socket, zmq.POLLIN)
        n = len(self._endpoints)
        # Consumers start their rotation at different brokers (identities are random).
        start = int.from_bytes(self._identity[:4], "big")
        socks = links.socks  # replaced in place when a broker moves

        def send_fetch(i: int, credit: int) -> bool:
            return try_send(socks[i], _FETCH_ONE if credit else _WITHDRAW)

        self._credit = Credit(send_fetch, n, self._settings.prefetch, start, self._fetching.is_set)
        self._next_beat = time.monotonic() + self._settings.heartbeat_interval
        for endpoint in self._endpoints:
            links.add(endpoint)
        self._heard = Heard(n, time.monotonic())
        self._route_table = self._routes().table

    def _routes(self) -> p.Routes[int, zmq.Socket[Any]]:
        """What the socket owner does with each message a broker sends: handlers of (the broker's
        index, the message, its socket), built once the sockets are open. Closures over what they
        use: DELIVER is the consumer's hot path, one lookup and a call."""
        cr, runner, heard, counters = self._credit, self._runner, self._heard, self._counters
        assert cr is not None and runner is not None and heard is not None
        ready, chunks, inline, early_ack = self._ready, runner.chunks, runner.inline, self._early_ack
        delivered, received, monotonic = cr.delivered, runner.received, time.monotonic

        def on_deliver(i: int, msg: p.Deliver, sock: zmq.Socket[Any]) -> None:
            if not delivered(i, msg.chunk_id, monotonic()):
                # Beyond the bound: it raced a withdrawal. Given back at once (a RETURN costs it
                # no attempt), it goes to a consumer with room.
                try_send(sock, p.encode(p.Return(msg.chunk_id)))
                return
            counters.chunks_received += 1
            received(msg.chunk_id, i)
            if early_ack:
                try_send(sock, p.encode(p.Ack(msg.chunk_id)))
            if inline:
                ready.append((i, msg))
            else:
                chunks.put((i, msg))

        def on_ready(i: int, msg: p.Ready, sock: zmq.Socket[Any]) -> None:
            cr.on_ready(i, monotonic())

        def on_cancel(i: int, msg: p.Cancel, sock: zmq.Socket[Any]) -> None:
            cancelled = runner.cancel(msg.chunk_id, msg.indexes, announced=not msg.token)
            if msg.token:
                try_send(sock, p.encode(p.Cancelled(msg.token, tuple(cancelled))))

        def on_retried(i: int, msg: p.Retried, sock: zmq.Socket[Any]) -> None:
            runner.retried(msg.chunk_id, msg.failed)

        def on_bye(i: int, msg: p.Bye, sock: zmq.Socket[Any]) -> None:
            cr.on_bye(i)

        def on_heartbeat(i: int, msg: p.Heartbeat, sock: zmq.Socket[Any]) -> None:
            if not heard.heard[i] or heard.silent:  # its answer to our HELLO, or a silence ended
                self._on_heard(i)

        def on_who(i: int, msg: p.Who, sock: zmq.Socket[Any]) -> None:
            # The broker took this consumer for gone (it was silent past heartbeat-timeout: its
            # worker stopped or starved) and forgot it, with the credit it held: introduce
            # ourselves again; the broker's READY then asks for credit anew.
            logger.warning(
                "consumer %s: queue %s at %s had taken it for gone (silent past heartbeat-timeout); it says HELLO again",
                self.name, self._queues[i], self._endpoints[i],
            )
            cr.on_bye(i)
            assert self._links is not None
            self._links.hello(i)
            if not heard.heard[i] or heard.silent:
                self._on_heard(i)

        return (
            p.Routes[int, zmq.Socket[Any]]()
            .add(p.Deliver, on_deliver)
            .add(p.Ready, on_ready)
            .add(p.Cancel, on_cancel)
            .add(p.Bye, on_bye)
            .add(p.Heartbeat, on_heartbeat)
            .add(p.Who, on_who)
            .add(p.Retried, on_retried)
        )

    def _on_heard(self, i: int) -> None:
        assert self._heard is not None and self._links is not None
        self._heard.heard[i] = True
        self._links.settle(i)
        if self._heard.why.pop(i, None) is not None:
            logger.warning("consumer %s reaches queue %s at %s now", self.name, self._queues[i], self._endpoints[i])
        if self._heard.silent.pop(i, None) is not None:
            logger.warning("consumer %s hears queue %s at %s again", self.name, self._queues[i], self._endpoints[i])

    def _check_reach(self, now: float) -> None:
        """Report the brokers not heard from ``connect-timeout`` after connecting: never silently idle."""
        assert self._heard is not None and self._links is not None
        for i in self._heard.overdue(now, self._settings.connect_timeout):
            why = self._links.why(i)
            self._heard.why[i] = why
            logger.warning(
                "consumer %s cannot reach queue %s at %s: no answer within %g s: %s",
                self.name, self._queues[i], self._endpoints[i], self._settings.connect_timeout, why,
            )

    def _check_silence(self, now: float) -> None:
        """Report the brokers heard from before that sent nothing for the heartbeat timeout (each
        beats every heartbeat interval): a consumer cut off after it reached them says so, in its
        statistics and its reach, rather than idling in silence. Heard again, the report ends."""
        assert self._heard is not None
        timeout = self._settings.heartbeat_timeout
        for i in self._heard.went_silent(now, timeout):
            self._heard.silent[i] = f"{WENT_SILENT} for {timeout:g} s"
            logger.warning(
                "consumer %s has heard nothing from queue %s at %s for %g s (it did before): the network between "
                "them is cut, or that broker's worker is stopped or starved",
                self.name, self._queues[i], self._endpoints[i], timeout,
            )

    def _close(self) -> None:
        links, waker = self._links, self._waker
        self._links = self._waker = None
        try:
            if links is not None:
                links.close(farewell=_BYE)
            if waker is not None:
                waker.close()
        finally:
            self.closed.set()

    def _abandon(self, reason: str) -> None:
        """Stop from inside: end the execution thread and the task threads too."""
        self.failure = reason
        self._fetching.clear()
        self._stop.set()
        if self._runner is not None:
            self._runner.shutdown()

    def take_turns(self) -> None:
        """Serve the sockets while this thread owns them, stand by while the other thread does.
        The last owner closes the sockets."""
        turn = self._turn
        while True:
            if turn.owns():
                try:
                    stopped = self._serve()
                except Exception as e:
                    logger.exception("consumer %s I/O loop failed", self.name)
                    self._abandon(f"its I/O loop failed: {e!r}")
                    stopped = True
                if stopped:
                    self._leave()
                    self._close()
                    return
            elif not turn.stand_by(self._stop):
                return

    def _leave(self) -> None:
        """The consumer stops (the socket owner, its loop ended): the chunks running may end and
        report until the stop's deadline, their DONEs (and RETURNs of chunks not started) sent as
        they come and a heartbeat each interval, no other message read. Those still running then
        send nothing when they end (:meth:`Runner.abandon`): the BYE that follows gives them back
        to their queues with every chunk not started, costing them no attempt, and they run
        again elsewhere."""
        runner, links, waker, outbox = self._runner, self._links, self._waker, self._outbox
        if runner is None or links is None or waker is None:
            return
        socks, beat = links.socks, self._settings.heartbeat_interval
        wake = [(waker.socket, zmq.POLLIN)]
        next_beat = time.monotonic() + beat

        def send_outbox() -> None:  # DONEs and RETURNs as they are (no FETCH rides along: leaving)
            while outbox:
                i, out = outbox.popleft()
                try_send(socks[i], p.encode(out))

        while True:
            send_outbox()
            now = time.monotonic()
            if not runner.running() or now >= self._leave_by:
                break
            if now >= next_beat:  # the brokers keep this consumer's chunks while it finishes them
                for sock in socks:
                    try_send(sock, _HEARTBEAT)
                next_beat = now + beat
            if zmq.zmq_poll(wake, max(1, math.ceil((min(self._leave_by, next_beat) - now) * 1000))):
                waker.drain()
        abandoned = runner.abandon()
        send_outbox()  # what ended as the wait did
        if abandoned and self._leave_by > 0:
            logger.warning(
                "consumer %s stopped while %s ran: %s; the tasks running now run on here to their end, their "
                "results dropped",
                self.name, "1 chunk" if abandoned == 1 else f"{abandoned} chunks",
                "acknowledged early (at most once), their tasks fail with TaskLost" if self._early_ack
                else "given back to their queues whole, they run again where the queues still serve",
            )

    def _serve(self) -> bool:
        """The I/O loop; True when the consumer stops, False when the sockets were taken over."""
        links, waker, cr, runner, reach = self._links, self._waker, self._credit, self._runner, self._heard
        routes = self._route_table
        assert links is not None and waker is not None and cr is not None and runner is not None and reach is not None
        assert routes is not None
        route = routes.get
        # pyzmq's compiled zmq_poll over the poller's own list (kept current by register and
        # unregister when a broker moves): Poller.poll's Python layer is skipped on every turn.
        poll, polled, socks, index = zmq.zmq_poll, links.poller.sockets, links.socks, links.index
        done_type, monotonic, ceil = p.Done, time.monotonic, math.ceil
        beat = self._settings.heartbeat_interval
        execute = runner.execute
        turn, ready, outbox, control = self._turn, self._ready, self._outbox, self._control
        stop, counters = self._stop, self._counters
        heard_at = reach.last
        while not stop.is_set():
            while control:
                # Taken off the queue only once applied: reach() counts a broker still queued here
                # as pending, so no thread reads its old verdict in between.
                i, endpoint = control[0]
                if endpoint == self._endpoints[i]:
                    # Started with it already (the pool told it twice): a second socket of the same
                    # identity would take over the first's pipe, and drop a DELIVER on its way.
                    control.popleft()
                    continue
                self._endpoints[i] = endpoint
                links.replace(i, endpoint)
                reach.restart(i, time.monotonic())
                control.popleft()
                cr.forget(i)
                runner.broker_replaced(i)  # what the broker before gave never starts here now
            while outbox:
                i, out = outbox.popleft()
                if type(out) is done_type:
                    if cr.done(i, out.chunk_id):
                        # A FETCH riding along: one message and one broker round fewer.
                        carrying = done_type(out.chunk_id, out.n_tasks, out.results, 1)
                        if not try_send(socks[i], p.encode(carrying)):
                            cr.unsent(i)
                        continue
                elif isinstance(out, (p.Return, p.Split)):
                    cr.reported(i, out.chunk_id)
                try_send(socks[i], p.encode(out))
            now = monotonic()
            wake_at = min(self._next_beat, cr.ask(now, eager=False))
            # A chunk to run next: no wait (busy: the thread it runs on pokes when done).
            timeout = 0 if ready and not turn.busy else max(0, ceil((wake_at - now) * 1000))
            for sock, _ in poll(polled, timeout):
                at = index(sock)  # the broker's index
                if at is None:
                    waker.drain()
                    continue
                heard_at[at] = now
                for frames in recv_ready(sock, 1):
                    try:
                        msg = p.decode(frames)
                        handler = route(type(msg))
                        if handler is None:  # a broker-to-driver command sent to a consumer
                            raise ProtocolError(f"{type(msg).__name__} is not accepted by a consumer")
                    except Exception as e:  # noqa: BLE001 - a malformed message is counted and dropped, never fatal
                        counters.bad_chunk()
                        logger.warning(
                            "consumer %s dropped a malformed message from queue %s: %s", self.name, self._queues[at], e
                        )
                        continue
                    handler(at, msg, sock)
            now = monotonic()
            if now >= self._next_beat:
                if now - self._next_beat > beat:
                    # This loop did not run for beats (its process stopped or starved): the
                    # brokers' heartbeats are still unread, not missing.
                    reach.was_deaf(now)
                if not self._alive():
                    logger.info("consumer %s: its actor was released; stopping", self.name)
                    self._abandon("its actor was released")
                    return True
                for sock in socks:
                    try_send(sock, _HEARTBEAT)
                self._next_beat = now + beat
                if not reach.settled():
                    self._check_reach(now)
                self._check_silence(now)
            if ready and not turn.busy and not stop.is_set():
                if turn.chunk_seconds >= EAGER_FETCH:
                    # Chunks take a while: ask for the next ones now, so that they arrive while
                    # this one runs (the sockets are not read until it is done).
                    cr.ask(now, eager=True)
                if not turn.run_here(execute, *ready.popleft()):
                    # This chunk's DONE waits in the outbox, and the next chunk waits for this
                    # one to end: wake the new owner, asleep in poll.
                    self.poke()
                    return False
        return True
