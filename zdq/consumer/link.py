"""The consumer's link to its brokers: sockets, credit, heartbeats and the outbox.

All of it belongs to one thread at a time, the *socket owner*; :class:`Handover` says which and
moves it. With ``max_concurrency`` > 1 the owner is always ``zdq-consumer-<name>``. With
``max_concurrency`` 1 the owner runs each chunk itself, and ``zdq-standby-<name>`` takes the
sockets over when a chunk runs longer than ``_TAKEOVER``: the two threads trade places as often as
chunks run long. Other threads reach the owner only through the outbox (:meth:`Link.post`), the
control queue (:meth:`Link.set_endpoint`) and the consumer's two events, and wake it with the waker.

Credit: a consumer asks for at most ``prefetch`` chunks in all (chunks held + credit outstanding
<= prefetch, over every broker), from its brokers in rotation. A broker where work waits and this
consumer has no credit says READY; the consumer then asks it, or moves a credit that sits unused at
another broker (withdrawn with ``FETCH 0``) to it. A DELIVER beyond the bound (one that raced a
withdrawal) is given back at once with RETURN, which costs the chunk no attempt. Until a broker is
heard saying READY (brokers that do not), a consumer with more brokers than ``prefetch`` moves a
credit that sat unused for ``_PARKED`` to the next broker in rotation, so no queue waits for long.
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
from zdq.consumer.runner import Counters, Runner
from zdq.transport import protocol as p
from zdq.transport.reach import Heard
from zdq.transport.security import ClientKeys
from zdq.transport.sockets import (
    BrokerLinks,
    Waker,
    process_context,
    recv_ready,
    try_send,
)

__all__ = ["Credit", "Handover", "Link"]

logger = logging.getLogger(__name__)

#: How long a busy consumer holds back its request for the next chunk of a broker, waiting for a
#: DONE to that broker to carry it: one message and one broker round fewer per chunk when chunks
#: are short (a single task's round trip), and a prefetch that is still on time when they are long.
_FETCH_DELAY = 0.001
#: Chunks that take at least this long to run (on average) make a consumer ask for the next ones as
#: soon as it starts one: the request's broker round is hidden behind the run.
_EAGER_FETCH = 0.00025
#: A chunk run on the thread that owns the sockets leaves heartbeats and credit unattended; after
#: this long, the standby thread takes the sockets over (see Handover.stand_by).
_TAKEOVER = 0.05
#: Credit unused at a broker for this long is *parked* there: that broker has no work, and the
#: credit may move to one that has (a broker's round is well under a millisecond, so 50 ms of
#: silence is not a DELIVER on its way).
_PARKED = 0.05

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
        """Run a chunk on the owning thread; False if the standby took the sockets meanwhile."""
        me = threading.get_ident()
        start = time.monotonic()
        with self.lock:
            self.since = start
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


class Credit:
    """What the consumer asked each broker for, and holds from each; which broker to ask next.

    Owned by the socket owner. The per-broker lists and the two totals are read and written in
    the I/O loop itself (:meth:`Link._serve`), the hot path; the decisions that are not on it are
    methods here. ``credit[i]`` is 0 or 1: one outstanding request per broker at most.
    """

    def __init__(
        self, socks: list[zmq.Socket[Any]], n: int, prefetch: int, fetching: threading.Event, start: int
    ) -> None:
        self.socks = socks  # BrokerLinks.socks: replaced in place when a broker moves
        self.prefetch = prefetch
        self.fetching = fetching
        self.credit = [0] * n
        self.held: list[set[int]] = [set() for _ in range(n)]  # chunks received and not yet reported
        self.fetch_at = [0.0] * n  # when a busy consumer's FETCH goes out on its own (_FETCH_DELAY)
        # When the credit at each broker was given: 0.0 for credit that rode on a DONE (no clock
        # was read), stamped when first looked at, so it is never taken for parked too early.
        self.asked_at = [0.0] * n
        self.in_flight = 0  # chunks held, over all brokers
        self.outstanding = 0  # sum(credit)
        self.next = start % n if n else 0  # the broker asked first next time (rotation)
        self.wanted: set[int] = set()  # brokers that said READY and have no credit: served first
        # Without READY from brokers, parked credit moves around on its own (only useful when
        # some broker must go without credit: more brokers than prefetch).
        self.rotate = n > prefetch
        self.rebalance_at = 0.0  # no credit can be moved before this

    def ask(self, now: float, *, eager: bool) -> float:
        """Send the FETCHes due; return when the next one held back (or a move) falls due.

        Brokers are asked in rotation while ``held + outstanding < prefetch``, those that said
        READY first. A consumer with nothing in hand asks at once (so does an ``eager`` one); a busy
        one lets its next DONE to that broker carry the request, unless that takes longer than
        _FETCH_DELAY. At the bound, credit parked at one broker may move to another.
        """
        if not self.fetching.is_set():
            if self.outstanding:  # cancelled: let the brokers serve others
                for k, c in enumerate(self.credit):
                    if c:
                        self._withdraw(k)
            return math.inf
        prefetch = self.prefetch
        if self.in_flight + self.outstanding < prefetch:
            credit, fetch_at = self.credit, self.fetch_at
            if self.wanted:
                for j in list(self.wanted):
                    self.wanted.discard(j)
                    if credit[j] == 0 and self.in_flight + self.outstanding < prefetch:
                        self._give(j, now)
            due = math.inf
            n = len(credit)
            i = self.next
            for _ in range(n):
                if self.in_flight + self.outstanding >= prefetch:
                    break
                if credit[i] == 0:
                    if eager or self.in_flight == 0 or now >= fetch_at[i]:
                        self._give(i, now)
                    else:
                        due = min(due, fetch_at[i])
                i = i + 1 if i + 1 < n else 0
            if self.in_flight + self.outstanding < prefetch:
                return due
        if self.outstanding and (self.wanted or self.rotate):  # credit that could move
            return self._rebalance(now) if now >= self.rebalance_at else self.rebalance_at
        return math.inf

    def _give(self, i: int, now: float) -> None:
        if try_send(self.socks[i], _FETCH_ONE):
            self.credit[i] = 1
            self.outstanding += 1
            self.asked_at[i] = now
            self.next = i + 1 if i + 1 < len(self.credit) else 0

    def _withdraw(self, k: int) -> None:
        # Whether or not the broker gets it, the credit is no longer counted: a DELIVER that comes
        # anyway is taken if there is room, else given back.
        try_send(self.socks[k], _WITHDRAW)
        self.credit[k] = 0
        self.outstanding -= 1

    def _rebalance(self, now: float) -> float:
        """At the bound: move credit parked at a broker to one that has work (said READY, or,
        when brokers do not, the next in rotation). Returns when to look again."""
        credit, asked_at = self.credit, self.asked_at
        while True:
            oldest, source = math.inf, -1
            for k, c in enumerate(credit):
                if c:
                    if asked_at[k] == 0.0:
                        asked_at[k] = now
                    if asked_at[k] < oldest:
                        oldest, source = asked_at[k], k
            if source < 0:  # every chunk of the bound is in hand: a DONE will free room
                self.rebalance_at = 0.0
                return math.inf
            if now - oldest < _PARKED:
                self.rebalance_at = oldest + _PARKED
                return self.rebalance_at
            target = self._target()
            if target < 0:
                self.rebalance_at = now + _PARKED
                return self.rebalance_at
            self._withdraw(source)
            self._give(target, now)
            if not self.wanted:  # moves in rotation go one at a time, one per _PARKED
                self.rebalance_at = now + _PARKED
                return self.rebalance_at

    def _target(self) -> int:
        """The broker that should have the next credit moved: one that said READY, else (while no
        broker says READY) the next in rotation that holds no credit and none of our chunks."""
        while self.wanted:
            j = self.wanted.pop()
            if self.credit[j] == 0:
                return j
        if self.rotate:
            n = len(self.credit)
            for step in range(n):
                j = (self.next + step) % n
                if self.credit[j] == 0 and not self.held[j]:
                    return j
        return -1

    def on_ready(self, j: int, now: float) -> None:
        """Broker ``j`` has work and no credit from us."""
        self.rotate = False  # brokers say READY: parked credit moves only when one does
        if self.credit[j] or not self.fetching.is_set():
            return
        if self.in_flight + self.outstanding < self.prefetch:
            self._give(j, now)
        else:
            self.wanted.add(j)
            self.rebalance_at = 0.0

    def on_bye(self, i: int) -> None:
        """Broker ``i`` is going away; ask again if it comes back."""
        self.outstanding -= self.credit[i]
        self.credit[i] = 0

    def forget(self, i: int) -> None:
        """Broker ``i`` was replaced. Chunks held from it still run; their DONE goes to the
        replacement, which acknowledges those it recovered from disk and counts the others as
        duplicates."""
        self.on_bye(i)
        self.fetch_at[i] = 0.0
        self.in_flight -= len(self.held[i])
        self.held[i].clear()
        self.wanted.discard(i)


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
        self._next_beat = 0.0
        #: Why the link stopped on its own (None while it runs or after a requested stop).
        self.failure: str | None = None
        #: The error that kept it from opening its sockets, for ``start()`` to raise.
        self.open_error: BaseException | None = None

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

    def reach(self) -> tuple[list[str], list[tuple[str, str, str]], list[str]]:
        """(From any thread.) The queues heard from; ``(queue, endpoint, why)`` of those reported
        unreachable; and the queues neither heard from nor reported yet."""
        heard = self._heard
        if heard is None:
            return [], [], list(self._queues)
        # A broker placed again whose new endpoint the socket owner has not taken yet: pending,
        # not what was said of its old endpoint.
        moving = {i for i, _ in list(self._control)}
        why = {i: w for i, w in heard.why.items() if i not in moving}
        reached = [self._queues[i] for i, h in enumerate(heard.heard) if h and i not in moving]
        pending = [self._queues[i] for i, h in enumerate(heard.heard) if i in moving or (not h and i not in why)]
        return reached, [(self._queues[i], self._endpoints[i], w) for i, w in sorted(why.items())], pending

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
        self._credit = Credit(links.socks, n, self._settings.prefetch, self._fetching, start)
        self._next_beat = time.monotonic() + self._settings.heartbeat_interval
        for endpoint in self._endpoints:
            links.add(endpoint)
        self._heard = Heard(n, time.monotonic())

    def _on_heard(self, i: int) -> None:
        assert self._heard is not None and self._links is not None
        self._heard.heard[i] = True
        self._links.settle(i)
        if self._heard.why.pop(i, None) is not None:
            logger.warning("consumer %s reaches queue %s at %s now", self.name, self._queues[i], self._endpoints[i])

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

    def _close(self) -> None:
        links, waker = self._links, self._waker
        self._links = self._waker = None
        if links is not None:
            links.close(farewell=_BYE)
        if waker is not None:
            waker.close()

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
                    self._close()
                    return
            elif not turn.stand_by(self._stop):
                return

    def _serve(self) -> bool:
        """The I/O loop; True when the consumer stops, False when the sockets were taken over."""
        links, waker, cr, runner, reach = self._links, self._waker, self._credit, self._runner, self._heard
        assert links is not None and waker is not None and cr is not None and runner is not None and reach is not None
        heard = reach.heard
        poller, socks = links.poller, links.socks
        credit, held, fetch_at, asked_at, wanted = cr.credit, cr.held, cr.fetch_at, cr.asked_at, cr.wanted
        beat = self._settings.heartbeat_interval
        prefetch = cr.prefetch
        inline = runner.inline
        execute, chunks = runner.execute, runner.chunks
        turn, ready, outbox, control = self._turn, self._ready, self._outbox, self._control
        stop, fetching, counters = self._stop, self._fetching, self._counters
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
            while outbox:
                i, out = outbox.popleft()
                if isinstance(out, (p.Done, p.Return, p.Split)) and out.chunk_id in held[i]:
                    held[i].discard(out.chunk_id)
                    cr.in_flight -= 1
                if (
                    isinstance(out, p.Done)
                    and credit[i] == 0
                    and cr.in_flight + cr.outstanding < prefetch
                    and fetching.is_set()
                    and (not wanted or i in wanted)  # else a broker that said READY gets the credit
                ):
                    if wanted:
                        wanted.discard(i)
                    sent = try_send(socks[i], p.encode(out._replace(credit=1)))  # a FETCH riding along
                    credit[i] = int(sent)
                    cr.outstanding += credit[i]
                else:
                    try_send(socks[i], p.encode(out))
            now = time.monotonic()
            wake_at = min(self._next_beat, cr.ask(now, eager=False))
            run_next = bool(ready) and not turn.busy  # busy: the thread it runs on pokes when done
            timeout = 0 if run_next else max(0, math.ceil((wake_at - now) * 1000))
            for sock, _ in poller.poll(timeout):
                index = links.index(sock)
                if index is None:
                    waker.drain()
                    continue
                i = index
                for frames in recv_ready(sock, 1):
                    try:
                        msg = p.decode(frames)
                    except Exception as e:  # noqa: BLE001 - a malformed message is counted and dropped, never fatal
                        counters.bad_chunk()
                        logger.warning(
                            "consumer %s dropped a malformed message from queue %s: %s", self.name, self._queues[i], e
                        )
                        continue
                    if isinstance(msg, p.Deliver):
                        if credit[i]:
                            credit[i] = 0
                            cr.outstanding -= 1
                        elif cr.in_flight + cr.outstanding >= prefetch:
                            # Beyond the bound: it raced a withdrawal. Given back at once (a
                            # RETURN costs it no attempt), it goes to a consumer with room.
                            try_send(sock, p.encode(p.Return(msg.chunk_id)))
                            continue
                        fetch_at[i] = time.monotonic() + _FETCH_DELAY
                        asked_at[i] = 0.0
                        counters.chunks_received += 1
                        cr.in_flight += 1
                        held[i].add(msg.chunk_id)
                        runner.received(msg.chunk_id)
                        if self._early_ack:
                            try_send(sock, p.encode(p.Ack(msg.chunk_id)))
                        if inline:
                            ready.append((i, msg))
                        else:
                            chunks.put((i, msg))
                    elif isinstance(msg, p.Ready):
                        cr.on_ready(i, time.monotonic())
                    elif isinstance(msg, p.Cancel):
                        cancelled = runner.cancel(msg.chunk_id, msg.indexes, announced=not msg.token)
                        if msg.token:
                            try_send(sock, p.encode(p.Cancelled(msg.token, tuple(cancelled))))
                    elif isinstance(msg, p.Bye):
                        cr.on_bye(i)
                    elif not heard[i] and isinstance(msg, p.Heartbeat):  # its answer to our HELLO
                        self._on_heard(i)
            now = time.monotonic()
            if now >= self._next_beat:
                if not self._alive():
                    logger.info("consumer %s: its actor was released; stopping", self.name)
                    self._abandon("its actor was released")
                    return True
                for sock in socks:
                    try_send(sock, _HEARTBEAT)
                self._next_beat = now + beat
                if not reach.settled():
                    self._check_reach(now)
            if ready and not turn.busy and not stop.is_set():
                if turn.chunk_seconds >= _EAGER_FETCH:
                    # Chunks take a while: ask for the next ones now, so that they arrive while
                    # this one runs (the sockets are not read until it is done).
                    cr.ask(now, eager=True)
                if not turn.run_here(execute, *ready.popleft()):
                    # This chunk's DONE waits in the outbox, and the next chunk waits for this
                    # one to end: wake the new owner, asleep in poll.
                    self.poke()
                    return False
        return True
