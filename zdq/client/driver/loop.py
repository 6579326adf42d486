"""The driver's I/O thread: one DEALER per broker, a control queue, a route table.

The thread does the I/O and nothing else: it hands every event to the :class:`~.ledger.Ledger`
(accounting) or to the :class:`~.links.Links` (the brokers' states) and sends what they decide.

Requests from other threads go through one mechanism: :meth:`DriverLoop.post` queues a command
and returns a :class:`concurrent.futures.Future`; the thread runs the command in its next round,
and the command settles the future at once (a reconnect, a fail) or parks it in the table of
pending requests (:mod:`.requests`), keyed by the token of the question sent to a broker (a SYNC
for a count, a recovery or a reroute; a CANCEL), until the broker's answer comes, its broker is
lost, its deadline passes or the thread stops. Every future is settled: a stopped loop fails what is still queued or
pending with :class:`~zdq.errors.ClosedError`, so no caller waits on a thread that is gone.

Who owns what
-------------
=========================================  ==========================================================
state                                      owner
=========================================  ==========================================================
sockets (``BrokerLinks``), the links       the I/O thread alone
(with the receipts owed)
the control queue                          any thread appends (a deque: atomic); the I/O thread pops
``consumers``                              written by the pool (an int); read by the I/O thread
``_ended``                                 set once by the I/O thread as it ends; read by posters
ledger, outcomes, links, requests          see their modules
=========================================  ==========================================================

The most frequent messages (RESULTS, CONFIRM) are tested first by type; the others go through the
route table, a dict from message type to handler that :meth:`DriverLoop._route` fills with
handlers whose argument types mypy checks against the message type.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import zmq

from zdq.config import PoolSettings
from zdq.errors import (
    BrokerLost,
    BrokerUnreachable,
    ClosedError,
    DuplicateTask,
    ProtocolError,
    SerializationError,
    StorageFull,
    TaskLost,
    ZdqError,
)
from zdq.futures import CallbackRunner
from zdq.codec.results import loads_results
from zdq.codec.unique import parse_held
from zdq.transport import protocol as p
from zdq.transport.reach import CLIENT_OUTSIDE, OPEN_TO_CLIENT, describe
from zdq.transport.security import ClientKeys
from zdq.transport.sockets import BrokerLinks, Route, Waker, recv_ready, try_send

from .ledger import Ledger
from .links import RACK_BATCH, RACK_DELAY, Link, Links, LinkState
from .records import NO_CONSUMER, Record
from .requests import RecoverySync, Requests, RerouteSync, StatusAsk

__all__ = ["DriverLoop"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=p.Message)
#: Messages read from a broker's socket per wake-up while chunks pour in (a window's worth).
_CONFIRM_BURST = 16
Command = Callable[["Future[Any]"], None]



#: What a task of a transient queue lost with its worker fails with (reviewer 27a: a task that
#: ended its process read only that the queue was lost, and looked for a fault of the cluster).
_LOST_WITH_ITS_WORKER = (
    "queue {name} was lost with its worker, and this task lived only in its memory (a worker dies when it is "
    "killed, runs out of memory, or runs a task that ends its process, as os._exit or a crash in C code does: "
    "a durable queue keeps its tasks and dead-letters one that keeps killing its worker; hard=True runs a task "
    "in a process of its own)"
)


class DriverLoop:
    """The I/O thread of one driver (constructed idle; :meth:`start` starts it)."""

    def __init__(
        self,
        ledger: Ledger,
        links: Links,
        settings: PoolSettings,
        *,
        name: str,
        driver_name: str,
        queue_names: list[str],
        identity: bytes,
        keys: ClientKeys | None,
        route: Route | None,
        callbacks: CallbackRunner,
    ) -> None:
        self._ledger = ledger
        self._outcomes = ledger.outcomes
        self._links = links
        self._settings = settings
        self.name = name
        self.driver_name = driver_name
        self._queue_names = queue_names
        self._identity = identity
        self._keys = keys
        self._route_via = route
        self._callbacks = callbacks
        self.consumers = 0
        self._requests = Requests(ledger, links, name=name, driver_name=driver_name, queue_names=queue_names)
        #: Each queue's last answer to a count (a STATUS), and when: reprs show it, never ask.
        self.last_counts = self._requests.last_counts
        self._control: deque[tuple[Command, Future[Any]]] = deque()
        self._stop = threading.Event()
        self._ended = False  # set by the thread as it ends: commands posted later fail at once
        self._thread: threading.Thread | None = None
        self._waker: Waker | None = None
        self._bl: BrokerLinks | None = None
        self._routes: dict[type, Callable[[Link, Any], None]] = {}
        self._route(p.Heartbeat, self._on_heartbeat)
        self._route(p.QueueStatus, self._requests.on_status)
        self._route(p.Lost, self._on_lost)
        self._route(p.Cancelled, self._requests.on_cancelled)
        self._route(p.Bye, self._on_bye)
        self._route(p.Who, self._on_who)

    def _route(self, kind: type[M], handler: Callable[[Link, M], None]) -> None:
        """Route messages of type ``kind`` to ``handler`` (mypy checks that they match)."""
        self._routes[kind] = handler

    # -- other threads ---------------------------------------------------------------------------
    def post(self, command: Callable[[Future[T]], None]) -> Future[T]:
        """Run ``command`` on the I/O thread in its next round; it settles the future it is given,
        at once or when a broker answers. The future fails with ClosedError if the loop stops
        first."""
        fut: Future[T] = Future()
        self._control.append((command, fut))
        if self._ended:
            self._fail_commands()
        elif self._waker is not None:
            self._waker.wake()
        return fut

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on the I/O thread; its future holds what it returns (or raises)."""

        def run(fut: Future[T]) -> None:
            fut.set_result(fn())

        return self.post(run)

    def stalled_for(self, now: float) -> float:
        """Seconds since the I/O thread's last heartbeat tick, while it runs (0 when it was never
        started or has ended). It ticks every heartbeat interval, however idle."""
        thread = self._thread
        if thread is None or self._ended or not thread.is_alive():
            return 0.0
        return max(0.0, now - self._links.ticked_at)

    def where(self) -> str:
        """The I/O thread's stack as it is now, for a report of a stall."""
        thread = self._thread
        frame = None if thread is None or thread.ident is None else sys._current_frames().get(thread.ident)
        return "(not running)" if frame is None else "".join(traceback.format_stack(frame))

    def start(self, ctx: zmq.Context[Any], waker: Waker) -> None:
        """Start the thread and wait (30 s at most) until its sockets are open."""
        self._waker = waker
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ctx, ready), name=f"zdq-driver-{self.name}", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise ZdqError(f"the driver of pool {self.name} did not start within 30 s")
        if self._ledger.failed_by is not None:
            error = self._ledger.failed_by
            raise ZdqError(f"the driver of pool {self.name} could not start: {error!r}") from error

    def stop(self, timeout: float) -> None:
        """Stop the thread and wait for it (not from itself)."""
        self._stop.set()
        if self._thread is None:  # never started: nothing will run what was posted
            self._ended = True
            self._fail_commands()
        if self._waker is not None:
            self._waker.wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _fail_commands(self) -> None:
        while self._control:
            try:
                _, fut = self._control.popleft()
            except IndexError:  # another thread took the last one
                return
            if not fut.done():
                fut.set_exception(ClosedError(f"the driver of pool {self.name} has stopped"))

    # -- the thread ------------------------------------------------------------------------------
    def _run(self, ctx: zmq.Context[Any], ready: threading.Event) -> None:
        assert self._waker is not None
        self._callbacks.adopt_current_thread()
        hello = p.encode(p.Hello(p.Role.DRIVER, self.driver_name.encode()[:256]))
        bl = self._bl = BrokerLinks(
            ctx, self._identity, hello, keys=self._keys, max_message_size=self._settings.max_message_size, route=self._route_via
        )
        try:
            for link in self._links.links:
                bl.add(link.endpoint)
            ready.set()
            self._serve(bl, self._waker)
        except BaseException as e:
            with self._ledger.cond:
                self._ledger.failed_by = e
            logger.exception("%s failed", self.driver_name)
        finally:
            ready.set()
            bl.close(farewell=p.encode(p.Bye()))
            self._ended = True
            self._fail_commands()
            self._requests.end()
            with self._ledger.cond:
                self._ledger.cond.notify_all()

    def _serve(self, bl: BrokerLinks, waker: Waker) -> None:
        poller, socks = bl.poller, bl.socks
        poller.register(waker.socket, zmq.POLLIN)
        # pyzmq's compiled zmq_poll over the poller's own list (kept current by register and
        # unregister when a broker moves): Poller.poll's Python layer is skipped on every turn.
        poll, polled, index_of, monotonic = zmq.zmq_poll, poller.sockets, bl.index, time.monotonic
        ledger, outcomes = self._ledger, self._outcomes
        link_of = self._links.links
        n_brokers = len(link_of)
        beat = self._settings.heartbeat_interval
        next_beat = monotonic() + beat
        rack_due = math.inf
        rack_full = False
        control, stop = self._control, self._stop
        while not stop.is_set():
            while control:
                command, fut = control.popleft()
                try:
                    command(fut)
                except Exception as e:  # the request fails, never the loop
                    if not fut.done():
                        fut.set_exception(e)
                    else:
                        logger.exception("%s: a command failed", self.driver_name)
                del command, fut  # not held until the next command: it may hold a chunk and its results
            if ledger.loose:  # read without the lock: a stale answer only delays to the next wake
                ledger.coalesce(n_brokers, self.consumers)
            if ledger.queued:
                self._send_queued(socks)
            if ledger.pinned:  # unique tasks, each for the broker that owns its key
                self._send_pinned(socks)
            now = monotonic()
            wake_at = min(next_beat, rack_due)
            if self._requests.heard_waits:
                wake_at = min(wake_at, self._requests.check_heard(bl, now))
            timeout = max(0, math.ceil((wake_at - now) * 1000))
            if outcomes.settlements:
                # Last thing before sleeping: a caller woken by its result gets this process's
                # interpreter at once, instead of waiting for this thread to finish its round.
                outcomes.settle_all()
            if timeout and outcomes.fold_due:  # read without the lock: a hint
                # Kept results wait to be folded for their reader (a join): a step of them in a
                # turn where nothing is ready, so that what arrives waits at most one step.
                events = poll(polled, 0)
                if not events:
                    outcomes.fold_some()
            else:
                events = poll(polled, timeout)
            for sock, _ in events:
                index = index_of(sock)
                if index is None:
                    waker.drain()
                    continue
                link = link_of[index]
                owed = link.racks
                # Chunks pouring in (more than one unconfirmed): the broker's confirms come in
                # batches (it holds them back, up to 8): read them in one go, one wake of the
                # submitter for them all. Otherwise one message a wake-up (no extra syscall).
                burst = _CONFIRM_BURST if ledger.buffered_chunks > 1 else 1  # read without the lock: a hint
                for frames in recv_ready(sock, burst):
                    chunk_id = self._handle(link, frames)
                    if chunk_id is not None:
                        if not owed and rack_due == math.inf:
                            rack_due = monotonic() + RACK_DELAY
                        owed.append(chunk_id)
                        rack_full = rack_full or len(owed) >= RACK_BATCH
            now = monotonic()
            if now >= rack_due or rack_full:
                self._send_racks(socks)
                rack_due = math.inf
                rack_full = False
            if now >= next_beat:
                self._tick(bl, now, now - next_beat + beat)
                next_beat = now + beat
        outcomes.settle_all()
        self._send_racks(socks)
        outcomes.failures.flush()

    def _send_queued(self, socks: list[zmq.Socket[Any]]) -> None:
        """Send the queued chunks, each to the broker the round robin picks (as one at a time
        would: the queues stay as even), those for one broker gathered into one PUTS of at most
        :data:`~zdq.transport.protocol.PUTS_CHUNKS` chunks or about
        :data:`~zdq.transport.protocol.PUTS_BYTES` bytes: one send here and one receive, decode and
        round there for them all. Each chunk counts against its broker's window as a PUT's."""
        ledger, links, window = self._ledger, self._links, self._settings.window
        if len(ledger.queued) == 1:  # a lone task's chunk (read without the lock: take() tells)
            b = links.pick(window)
            if b is not None:
                rec = ledger.take(b)
                if rec is None:  # cancelled meanwhile
                    links.unsent(b)
                else:
                    self._send_run(socks, b, [rec])
            return
        runs: dict[int, list[Record]] = {}
        sizes: dict[int, int] = {}
        while ledger.queued:
            b = links.pick(window)
            if b is None:
                break  # every broker is down or full: chunks wait (bounded) for room
            rec = ledger.take(b)
            if rec is None:  # cancelled meanwhile
                links.unsent(b)
                break
            run = runs.setdefault(b, [])
            run.append(rec)
            sizes[b] = sizes.get(b, 0) + rec.nbytes
            if len(run) >= p.PUTS_CHUNKS or sizes[b] >= p.PUTS_BYTES:
                del runs[b], sizes[b]
                if not self._send_run(socks, b, run):
                    break
        for b, run in runs.items():
            self._send_run(socks, b, run)

    def _send_run(self, socks: list[zmq.Socket[Any]], b: int, run: list[Record]) -> bool:
        """Send chunks taken for broker ``b``: a PUT for one, a PUTS for more. False if its socket
        cannot take them now: they are first in line again."""
        if len(run) == 1:
            frames = p.encode(_put_of(run[0]))
        else:
            frames = p.encode(p.Puts(tuple(_put_of(rec) for rec in run)))
        if try_send(socks[b], frames):
            return True
        self._links.unsent(b, len(run))
        self._ledger.put_back_run(run)
        return False

    def _send_pinned(self, socks: list[zmq.Socket[Any]]) -> None:
        """Send the unique tasks queued for each broker up with room in its window; those of a
        broker down wait for it (a durable queue placed again holds their keys), never for another."""
        ledger, window = self._ledger, self._settings.window
        for b in list(ledger.pinned):
            link = self._links[b]
            if link.state is LinkState.UNREACHABLE:  # it would never be sent: fails now, as that queue's tasks did
                self._outcomes.fail_pinned(b, BrokerUnreachable(
                    f"queue {self._queue_names[b]}, which owns this unique task's key, was placed again and this "
                    f"process ({self.driver_name}) cannot reach it; the task was not queued"
                ))
                continue
            while link.state is LinkState.UP and link.unconfirmed < window:
                rec = ledger.take_pinned(b)
                if rec is None:
                    break
                link.unconfirmed += 1
                if not try_send(socks[b], p.encode(_put_of(rec))):
                    link.unconfirmed -= 1
                    ledger.put_back(rec)
                    break

    def _send_racks(self, socks: list[zmq.Socket[Any]]) -> None:
        """Tell each broker which chunks' results arrived: it may forget them now."""
        for index, racks in self._links.take_racks():
            try_send(socks[index], p.encode(p.Rack(racks)))

    def _tick(self, bl: BrokerLinks, now: float, gap: float = 0.0) -> None:
        """Every heartbeat interval: heartbeats, links never answered, expired requests, and a
        fresh snapshot of the links for the other threads. ``gap``: the time since the previous
        tick; past the heartbeat timeout, this thread itself did not run (:meth:`_was_paused`)."""
        if gap > self._settings.heartbeat_timeout:
            self._was_paused(gap, now)
        socks = bl.socks
        beat = p.encode(p.Heartbeat())
        for link in self._links.links:
            if link.state is LinkState.UP or link.state is LinkState.RECOVERING:
                try_send(socks[link.index], beat)
            if link.heard:
                bl.settle(link.index)  # its connection needs no watching any more
        for link in self._links.due_unreachable(now, self._settings.connect_timeout):
            self._unreachable(bl, link)
        ledger, outcomes = self._ledger, self._outcomes
        if (ledger.queued or ledger.loose) and self._links.all_unreachable():
            exc = BrokerUnreachable(
                self._describe_unreachable(
                    bl,
                    self._links.links,
                    f"pool {self.name} has no queue this process ({self.driver_name}) can reach: its brokers were "
                    f"placed again and did not answer within {self._settings.connect_timeout:g} s",
                )
            )
            outcomes.fail_unsent(exc)
        self._links.ticked(now)
        self._requests.check_statuses(now)

    def _was_paused(self, gap: float, now: float) -> None:
        """This thread did not run for ``gap`` seconds (its process was stopped, or starved of CPU
        or the GIL): the brokers' messages of that time are still unread, so none is taken as
        silent for it; the cause is said here, once, instead of a silence blamed on each queue."""
        logger.warning(
            "%s: its I/O thread did not run for %.1f s (this process was stopped, or starved of CPU or the GIL), "
            "so it heard no queue meanwhile; the queues get a heartbeat timeout to be heard again before any is "
            "taken as silent", self.driver_name, gap,
        )
        self._links.paused(gap, now)

    # -- messages --------------------------------------------------------------------------------
    def _handle(self, link: Link, frames: list[Any]) -> int | None:
        """Handle one message; return the chunk id to acknowledge if it carried results.

        A message that breaks anything is counted and dropped, and fails only its own tasks: the
        loop that carries every other message of the pool goes on.
        """
        if link.state is not LinkState.UP:
            if link.state is LinkState.DOWN:
                return None  # a late message from a broker declared lost
            if link.state is LinkState.UNREACHABLE:
                name = self._queue_names[link.index]
                logger.warning("%s: queue %s at %s answers now", self.driver_name, name, link.endpoint)
            self._links.answered(link)  # the broker placed again answers: it takes work
            self._requests.check_statuses(time.monotonic())
        link.seen = time.monotonic()
        try:
            msg = p.decode(frames)
            if type(msg) is p.Results:
                return self._on_results(link, msg)
            if type(msg) is p.Confirms:
                self._on_confirms(link, msg)
                return None
            if type(msg) is p.Confirm:
                self._on_confirm(link, msg)
                return None
            if type(msg) is p.Expired:  # an outcome as RESULTS are: acknowledged (RACK) the same way
                return self._on_expired(link, msg)
            route = self._routes.get(type(msg))
            if route is None:
                raise ProtocolError(f"{type(msg).__name__} is not accepted by a driver")
            route(link, msg)
        except Exception as e:
            self._outcomes.bad += 1
            logger.warning("%s dropped a message from queue %s: %s", self.driver_name, self._queue_names[link.index], e)
        return None

    def _on_confirm(self, link: Link, msg: p.Confirm) -> None:
        stored = msg.status is p.Status.STORED
        follows = not stored and msg.status is p.Status.DUPLICATE  # a unique task's, held by another chunk
        rec = self._ledger.confirm(msg.seq, link.index, stored or follows, msg.chunk_id, follows)
        link.unconfirmed -= 1
        link.confirmed_at = time.monotonic()
        if not stored and not follows:
            detail = msg.detail.decode(errors="replace")
            name = self._queue_names[link.index]
            exc: ZdqError = (
                StorageFull(f"queue {name} is full; the chunk was not stored: {detail}")
                if msg.status is p.Status.FULL
                else unique_held(rec, msg.detail, name)
                if msg.status is p.Status.UNIQUE_HELD
                else ZdqError(f"queue {name} refused a chunk ({msg.status.name}): {detail}")
            )
            self._outcomes.fail_records([rec], exc)

    def _on_confirms(self, link: Link, msg: p.Confirms) -> None:
        """Several chunks stored at once: one lock and one wake of the submitter for them all."""
        confirmed, unknown = self._ledger.confirm_stored(msg.seqs, link.index, msg.chunk_ids)
        link.unconfirmed -= confirmed
        link.confirmed_at = time.monotonic()
        if unknown:
            raise ProtocolError(f"CONFIRMS of {len(unknown)} unknown chunks (seqs {unknown[:8]})")

    def _on_results(self, link: Link, msg: p.Results) -> int:
        try:
            base, values, errors = loads_results(msg.results, self._ledger.payload_key, lenient=True)
        except Exception as e:  # noqa: BLE001 - forged, or an object that pickles but does not unpickle here
            name = self._queue_names[link.index]
            refused: ZdqError = SerializationError(
                f"the results of chunk {msg.chunk_id} from queue {name} cannot be unpickled in this process: "
                f"{type(e).__name__}: {e}"
            )
            refused.__cause__ = e
            confirmed = self._refuse(link, msg.seq, msg.chunk_id, msg.consumer, refused)
        else:
            try:
                confirmed = self._outcomes.intake(link.index, msg.seq, msg.chunk_id, msg.consumer, base, values, errors)
            except ProtocolError as e:  # not the chunk's (another chunk's, replayed)
                confirmed = self._refuse(link, msg.seq, msg.chunk_id, msg.consumer, self._not_its_own(link, msg.chunk_id, e))
        if confirmed:  # the broker held its CONFIRM back and the results came first: they confirm it
            link.unconfirmed -= 1
            link.confirmed_at = time.monotonic()
        return msg.chunk_id

    def _on_expired(self, link: Link, msg: p.Expired) -> int:
        """The chunk's expiry passed before its broker delivered it: its tasks fail with
        TaskExpired (those not settled before), through the path results take."""
        try:
            confirmed = self._outcomes.intake_expired(link.index, msg.seq, msg.chunk_id, msg.base, msg.n_tasks)
        except ProtocolError as e:  # tasks outside the chunk
            confirmed = self._refuse(link, msg.seq, msg.chunk_id, NO_CONSUMER, self._not_its_own(link, msg.chunk_id, e))
        if confirmed:
            link.unconfirmed -= 1
            link.confirmed_at = time.monotonic()
        return msg.chunk_id

    def _not_its_own(self, link: Link, chunk_id: int, e: ProtocolError) -> ProtocolError:
        """What the tasks of chunk ``chunk_id`` fail with when the outcomes sent for it decode to
        another chunk's (tasks outside it, an error outside them)."""
        refused = ProtocolError(f"the results of chunk {chunk_id} from queue {self._queue_names[link.index]} are refused: {e}")
        refused.__cause__ = e
        return refused

    def _refuse(self, link: Link, seq: int, chunk_id: int, consumer: bytes, error: ZdqError) -> bool:
        """Outcomes refused (forged, another chunk's replayed, or an object that pickles but does
        not unpickle here) fail their own chunk's tasks with ``error`` and are acknowledged as any:
        the broker may forget the chunk, running it again would give the same bytes. Dropped, they
        would leave the chunk's futures waiting for ever. Return whether they confirmed the chunk."""
        self._outcomes.bad += 1
        logger.warning("%s: %s (%r)", self.driver_name, error, error.__cause__)
        return self._outcomes.intake_refused(link.index, seq, chunk_id, consumer, error)

    def _on_heartbeat(self, link: Link, msg: p.Heartbeat) -> None:
        pass  # being heard is what counts (``link.seen``)

    def _on_who(self, link: Link, msg: p.Who) -> None:
        # The broker does not know this driver (it says HELLO first on every link: a broker that
        # asks heard something else first). Introduced again, it resends what it holds for us.
        assert self._bl is not None
        self._bl.hello(link.index)

    def _on_bye(self, link: Link, msg: p.Bye) -> None:
        logger.info("%s: queue %s is shutting down", self.driver_name, self._queue_names[link.index])

    def _on_lost(self, link: Link, msg: p.Lost) -> None:
        self._outcomes.fail_seq(
            msg.seq, TaskLost(
                f"the consumer of chunk {msg.chunk_id} died, or was stopped while it ran, after acknowledging it early "
                "(at most once: it does not run again)"
            )
        )

    # -- commands (run on the I/O thread, posted by the facade) ----------------------------------
    def ask_status(self, ask: StatusAsk, fut: Future[list[p.QueueStatus | None]]) -> None:
        assert self._bl is not None
        # Receipts owed go first: when the reply comes, the broker has taken them (one socket
        # keeps order), so a pool closed right after its results came leaves nothing to re-run.
        self._send_racks(self._bl.socks)
        self._requests.ask_status(self._bl.socks, ask, fut)

    def ask_cancel(self, rec: Record, indexes: tuple[int, ...], fut: Future[list[int]]) -> None:
        assert self._bl is not None
        self._requests.ask_cancel(self._bl.socks, rec, indexes, fut)

    def wait_heard(self, deadline: float, fut: Future[dict[int, str]]) -> None:
        assert self._bl is not None
        self._requests.wait_heard(self._bl, deadline, fut)

    def broker_lost(self, broker: int, memory_lost: bool) -> None:
        assert self._bl is not None
        if not self._links.lost(broker):
            return
        self._bl.disconnect(broker)  # nothing more is queued for a dead peer
        self._requests.drop(broker)
        self._requeue(broker)
        self._requests.check_statuses(time.monotonic())
        if memory_lost:
            name = self._queue_names[broker]
            n = self._outcomes.fail_confirmed(
                broker, BrokerLost(_LOST_WITH_ITS_WORKER.format(name=name))
            )
            if n:
                logger.warning("%s: %d tasks of lost queue %s failed with BrokerLost", self.driver_name, n, name)
            else:
                logger.info("%s: queue %s was lost with its worker; none of this driver's tasks were in it", self.driver_name, name)

    def _requeue(self, broker: int) -> None:
        n = self._ledger.requeue(broker)
        if n:
            logger.info("%s: %d unconfirmed chunks of queue %s will be sent again", self.driver_name, n, self._queue_names[broker])

    def reconnect(self, broker: int, endpoint: str, worker: str) -> None:
        assert self._bl is not None
        self._bl.replace(broker, endpoint)
        self._links.reconnected(broker, endpoint, worker, time.monotonic())
        self._requests.drop(broker)
        self._requeue(broker)
        self._requests.check_statuses(time.monotonic())
        # Which confirmed chunks did the queue keep? A durable queue serves every chunk it stored,
        # except those acknowledged early (at most once) whose results never came: they are lost.
        seqs = self._ledger.seqs_of(broker, confirmed=True)
        for start in range(0, max(len(seqs), 1), p.MAX_CHUNK_TASKS):
            token = self._requests.ask(RecoverySync(broker))
            try_send(self._bl.socks[broker], p.encode(p.Sync(token, tuple(seqs[start : start + p.MAX_CHUNK_TASKS]))))

    def reroute(self, broker: int) -> None:
        assert self._bl is not None
        if not self._links.rerouted(broker, time.monotonic()):
            return  # lost: its placement again reconnects it
        self._bl.replace(broker, self._links[broker].endpoint)  # a new socket says HELLO: the broker resends results
        self._requests.drop(broker)  # questions on the old path will not be answered
        seqs = self._ledger.seqs_of(broker, confirmed=False)
        for start in range(0, len(seqs), p.MAX_CHUNK_TASKS):
            asked = tuple(seqs[start : start + p.MAX_CHUNK_TASKS])
            token = self._requests.ask(RerouteSync(broker, asked))
            try_send(self._bl.socks[broker], p.encode(p.Sync(token, asked)))

    def fail_confirmed(self, broker: int, exc: BaseException) -> int:
        return self._outcomes.fail_confirmed(broker, exc)

    def _unreachable(self, bl: BrokerLinks, link: Link) -> None:
        """A broker placed again never answered: what it never confirmed goes to the others, what
        it holds fails (this process cannot reach it to get the results)."""
        self._requeue(link.index)
        self._requests.drop(link.index)
        name = self._queue_names[link.index]
        exc = BrokerUnreachable(
            self._describe_unreachable(
                bl,
                [link],
                f"queue {name} was placed again, and this process ({self.driver_name}) heard nothing from it within "
                f"{self._settings.connect_timeout:g} s; its tasks failed",
            )
        )
        n = self._outcomes.fail_confirmed(link.index, exc) + self._outcomes.fail_pinned(link.index, exc)
        logger.error("%s: %s (%d tasks failed)", self.driver_name, exc, n)

    def _describe_unreachable(self, bl: BrokerLinks, unheard: list[Link], subject: str) -> str:
        every = all(k in unheard or k.state is LinkState.UNREACHABLE for k in self._links.links)
        return describe(
            subject,
            [(self._queue_names[k.index], k.endpoint, k.worker, bl.why(k.index)) for k in unheard],
            CLIENT_OUTSIDE if every else OPEN_TO_CLIENT,
        )


def _put_of(rec: Record) -> p.Put:
    """The PUT of a record (its payload, its timing and tags when it has any)."""
    payload = rec.payload
    assert payload is not None
    t = rec.timing
    if t is None:
        return p.Put(rec.seq, rec.n, payload, 0.0, 0, rec.base)
    return p.Put(
        rec.seq, rec.n, payload, t.not_before, t.priority, rec.base,
        t.expires, t.rate_key, t.rate, t.unique_key, t.unique_for,
    )


def unique_held(rec: Record, detail: bytes, queue: str) -> DuplicateTask:
    """The error of a unique task refused because its key's ``unique_for`` window is not over."""
    free_at, why = parse_held(detail)
    key = rec.timing.unique_key.decode(errors="replace") if rec.timing is not None else ""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(free_at)) if free_at else "later"
    return DuplicateTask(
        f"task {rec.base} was not queued: {why} (queue {queue}); the key is free again at {when} "
        f"(in {max(0.0, free_at - time.time()):.1f} s)",
        key,
        free_at,
    )


def wait_all(futures: list[Future[T]], timeout: float) -> tuple[list[T], int]:
    """The results of the futures settled within ``timeout`` (those that failed are skipped), and
    how many were not settled in time."""
    done, not_done = concurrent.futures.wait(futures, timeout)
    return [f.result() for f in futures if f in done and f.exception() is None], len(not_done)
