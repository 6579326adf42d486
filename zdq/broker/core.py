"""The broker loop: one queue, one ROUTER socket, one thread.

:class:`BrokerCore` knows nothing of Dask (tests and fuzzers drive it directly); the actor that
places it on a worker is :class:`zdq.broker.actor.Broker`.

One round of the loop drains the socket (up to ``_ROUND`` messages), each through the route table
(message type to handler: one dict lookup and a call; a type a broker does not accept is counted
and dropped), writes every PUT of the round in one storage transaction (group commit), confirms
them, records every DONE, routes the results to their drivers, answers SYNCs, then hands ready
chunks to consumers with credit.

Who owns what
-------------
Every piece below is the loop thread's, one class each; the control plane
(:class:`~zdq.broker.control.BrokerControl`, ``BrokerCore.control``: statistics, dead letters,
settings, schedules, rate limits, a task's state) takes ``_lock``, which the loop holds for each
round and each timer.

========================================  ==========================================================
State                                     Owner
========================================  ==========================================================
socket, route table, the round's lists    :class:`BrokerCore` (the loop)
PUTs stored (group commit), held-back     :class:`~zdq.broker.intake.Intake`; the core tells its
CONFIRMs, unique keys                     unique keys when a holder ends, is lost or expires
peers (credit, liveness, names), the      :class:`~zdq.broker.peers.PeerTable`, written by the core;
consumers with credit                     routing and questions read it
each chunk's state (ready, leased, done)  :class:`~zdq.broker.leases.LeaseTable`
results to drivers: waiting, routed,      :class:`~zdq.broker.routing.ResultRouting`
resends, receipts
cancel questions asked of consumers       :class:`~zdq.broker.questions.CancelQuestions`
expiry times, chunks that expired         :class:`~zdq.broker.expiry.ExpiryWatch`
chunks out to consumers, READY notices    :class:`~zdq.broker.dispatch.Dispatch`
rate limits (token buckets, parked chunks) :class:`~zdq.broker.rates.RateLimits`
schedules                                 :class:`~zdq.broker.schedules.ScheduleTable`
counters                                  each field has one writer: ``orphan_results`` routing's,
                                          ``chunks_redelivered`` dispatch's, ``chunks_stored``,
                                          ``tasks_stored`` and ``tasks_unique_duplicates`` the
                                          intake's, the others the core's
========================================  ==========================================================
"""

from __future__ import annotations

import bisect
import logging
import math
import struct
import threading
import time
from typing import Any, Callable

import zmq

from zdq.config import PoolSettings
from zdq.errors import ProtocolError, StorageError
from zdq.names import unnamed_peer
from zdq.reporting import Throttle
from zdq.stats import ROUND_TRIP_BOUNDS
from zdq.broker.control import BrokerControl
from zdq.broker.counters import BrokerCounters
from zdq.broker.dispatch import Dispatch
from zdq.broker.expiry import ExpiryWatch
from zdq.broker.intake import CONFIRM_BATCH, Intake
from zdq.broker.leases import LeaseTable
from zdq.broker.peers import Peer, PeerTable
from zdq.broker.questions import CancelQuestions
from zdq.broker.rates import RateLimits
from zdq.broker.retained import Retained
from zdq.broker.routing import ResultRouting
from zdq.broker.schedules import ScheduleTable
from zdq.codec.schedules import SCHEDULED
from zdq.storage.base import Storage
from zdq.transport import protocol as p
from zdq.transport.sockets import close_socket, is_local_peer

__all__ = ["BrokerCore", "BrokerCounters"]

logger = logging.getLogger(__name__)

_ROUND = 1024  # messages drained per round: bounds a group commit and keeps timers responsive
#: A poll that returns this much later than it was asked to (seconds) means the loop did not run
#: meanwhile: its process was stopped (SIGSTOP) or starved. What peers sent during the gap is read
#: before the work that fell due in it goes out: a CANCEL of a delayed task now due must land
#: before its release (reviewer 27b: the task ran, its cancellation lost). libzmq's I/O thread,
#: stopped too, hands messages over a moment after the loop wakes: up to CATCH_UP is spent reading
#: them, until a poll of CATCH_UP_POLL_MS brings nothing.
STALL = 0.5
CATCH_UP = 0.5
CATCH_UP_POLL_MS = 20
_DRIVER = p.Role.DRIVER
# The loop's receives and sends call pyzmq's compiled socket methods directly, with plain int flags
# (as zdq.transport.sockets does): the Python layers above them cost more than the I/O itself on
# a single task's round trip.
_recv = zmq.backend.Socket.recv
_send_frame = zmq.backend.Socket.send
_poll = zmq.zmq_poll
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_ZERO_COPY = 65536  # pyzmq's own threshold: smaller frames are copied anyway
_encode = p.encode


class _Round:
    """What one round of the loop gathered, to handle together. One per broker, used by every
    round: a round's end takes each list it used and leaves an empty one in its place (most
    rounds use one or two of them: a lone task's PUT, DONE or RACK)."""

    __slots__ = ("cancels", "dones", "drivers_heard", "early_acks", "head", "now", "puts", "racks", "syncs", "unique")

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.head: Any = None  # the head frame of the message being routed (a HELLO's tells its transport)
        self.cancels: list[tuple[bytes, p.Cancel]] = []
        self.puts: list[tuple[bytes, p.Put]] = []
        self.dones: list[tuple[bytes, p.Done]] = []
        self.racks: list[tuple[bytes, tuple[int, ...]]] = []
        self.syncs: list[tuple[bytes, p.Sync]] = []
        self.drivers_heard: set[bytes] = set()
        self.early_acks = False
        self.unique = False  # a PUT of the round carries a unique key



def _answer_sync(core: BrokerCore, ident: bytes, status: p.QueueStatus) -> None:
    """Send a SYNC's answer. One that cannot be encoded (a count out of its field's range: a
    bookkeeping fault) is logged and dropped, never the loop's end (reviewer 28b: a peer's
    flood drove a count negative, and the next SYNC, the driver's own, ended the loop)."""
    try:
        core._send(ident, status)
    except (struct.error, OverflowError, ValueError) as e:
        core.counters.bad_messages += 1
        logger.error("broker %s: a SYNC's answer could not be sent (%s): %r", core.name, e, status)


def _catch_up(polled: list[Any], lock: Any, round_: Callable[[], None], ready: bool) -> None:
    """After a stall (see :data:`STALL`): the loop's rounds (``round_``, under ``lock``) read what
    came meanwhile on the sockets ``polled``, before anything falls due."""
    until = time.monotonic() + CATCH_UP
    while ready or (time.monotonic() < until and zmq.zmq_poll(polled, CATCH_UP_POLL_MS)):
        with lock:
            round_()
        ready = False


class BrokerCore:
    """The broker loop over a bound ROUTER socket and a storage backend.

    Parameters
    ----------
    socket : zmq.Socket[Any]
        A bound ROUTER; the core owns it from :meth:`start` on and closes it on :meth:`stop`.
    storage : Storage
        An opened backend; closed on :meth:`stop`.
    settings : PoolSettings
        Heartbeat interval and timeout.
    creator : bytes
        Identity of the driver whose pool placed this broker: it takes the results that no
        other driver will (see the module docstring).
    """

    def __init__(
        self,
        name: str,
        socket: zmq.Socket[Any],
        storage: Storage,
        settings: PoolSettings,
        alive: Callable[[], bool] = lambda: True,
        creator: bytes = b"",
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._alive = alive
        self._sock = socket
        self._work = _Round()  # what each round gathers (the loop's)
        self._polled = [(socket, zmq.POLLIN)]  # for zmq_poll: the loop's wait, and the end of a round's drain
        self._leases = LeaseTable(storage)
        if settings.result_ttl is not None:  # results kept after their receipt, for zdq.result()
            self._leases.retained = Retained(storage, settings.result_ttl, settings.result_bytes)
        elif storage.durable:  # kept by an earlier run of the queue with result_ttl: no longer wanted
            storage.unretain([chunk_id for chunk_id, _ in storage.retained()])
        self._schedules = ScheduleTable(name, storage)
        self._storage = storage
        self._ready = storage.ready_order  # its count is read after every round
        self._durable = storage.durable
        self._settings = settings
        self._on_stop = on_stop  # releases what the actor set up around the loop (ZAP domain, inproc name)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._discard = False  # set by stop(discard=True) before the loop is told to stop
        self._thread: threading.Thread | None = None
        self._peer_table = PeerTable()
        self._peers = self._peer_table.by_ident  # read on every message: one attribute fewer
        self._error: BaseException | None = None
        self.counters = BrokerCounters()
        # A durable queue's chunks that wait keep their expiry across a restart (a scan, at start only).
        self._expiry = ExpiryWatch((i, m) for i in storage.waiting_ids() if (m := storage.meta(i)) is not None)
        self._rates = RateLimits(storage)
        self._chunks_out = Dispatch(
            self._leases, self._peer_table, self._send, self.counters, self._expire, self._rates, expired=self._expire_chunk
        )
        # Chunks in: the round's PUTs stored, unique keys admitted, CONFIRMs held back.
        self._intake = Intake(
            name, storage, self._leases, self._chunks_out, self._send, self._expiry, self.counters, settings.heartbeat_timeout
        )
        self._routing = ResultRouting(
            self._leases,
            self._peers,
            self._send,
            creator=creator,
            # A driver silent this long is taken for gone: its results go to the creator.
            orphaned_after=max(60.0, 4 * settings.heartbeat_timeout),
            counters=self.counters,
            confirmed=self._intake.confirmed,
        )
        self._questions = CancelQuestions(
            name, self._leases, self._peers, self._send, timeout=settings.heartbeat_timeout
        )
        self._routes = self._route_table()
        self._failed_log = Throttle(60.0)  # the loop's: messages whose handling raised, logged once a minute
        #: What other threads ask of this queue, under the loop's lock (:mod:`zdq.broker.control`).
        self.control = BrokerControl(
            name, self._lock, storage, self._leases, self._peer_table, self._routing, self._intake, self._rates,
            self._schedules, self._expiry, self._questions, self._chunks_out, self.counters,
        )

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"zdq-broker-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0, *, discard: bool = False) -> None:
        """Stop the loop, close the socket and the storage. Idempotent. ``discard``: the queue's
        placement failed: its storage is discarded (:meth:`~zdq.storage.base.Storage.discard`).
        A later plain stop (the slot closing after a discard whose join timed out) keeps the
        discard: the loop's ``finally`` reads the flag only when it ends."""
        self._discard = self._discard or discard
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("broker %s loop did not stop within %.1fs", self.name, timeout)
        else:
            close_socket(self._sock)
            self._close_storage()

    def _close_storage(self) -> None:
        if self._discard:
            self._storage.discard()
        else:
            self._storage.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        # The loop's own names are locals, and its one socket is polled through pyzmq's compiled
        # zmq_poll (not Poller.poll's Python layer): every iteration pays them, about two per
        # single-task round trip (issue 26, point 4).
        polled = self._polled
        poll, monotonic, wall = zmq.zmq_poll, time.monotonic, time.time
        stopped, lock = self._stop.is_set, self._lock
        intake = self._intake
        confirms = intake.confirms
        beat = self._settings.heartbeat_interval
        next_beat = monotonic() + beat
        storage = self._storage
        delayed = storage.delayed_order  # its next_at, and the expiry watch's: attributes, read each turn
        durable = self._durable
        schedules = self._schedules
        expiry = self._expiry
        rates = self._rates
        inf = math.inf
        try:
            while not stopped():
                due = min(next_beat, intake.confirm_due) if confirms else next_beat
                # Wall clock; inf when no chunk is delayed and none carries an expiry.
                release = min(delayed.next_at, expiry.next_at)
                if release < inf:
                    # The poll ends when the next delayed chunk is due (or the next expiry comes):
                    # nothing polls while they wait.
                    due = min(due, monotonic() + (release - wall()))
                if schedules.wake_at < due:
                    due = schedules.wake_at
                if rates.wake_at < due:  # a rate limit holds work back until then: no polling
                    due = rates.wake_at
                turn = monotonic()
                wait_ms = max(0, min(100, math.ceil((due - turn) * 1000)))
                ready = poll(polled, wait_ms)  # the sockets' events: a list, empty when none came
                now = monotonic()
                if now - turn > wait_ms * 0.001 + STALL:
                    _catch_up(polled, lock, self._round, bool(ready))
                    # What the rounds stored may be delayed or carry an expiry.
                    release = min(delayed.next_at, expiry.next_at)
                    now = monotonic()
                elif ready:
                    with lock:
                        self._round()
                    release = min(delayed.next_at, expiry.next_at)
                    now = monotonic()
                if release < inf:
                    if delayed.next_at <= wall():
                        with lock:
                            self._chunks_out.release_due(now)
                    if expiry.next_at <= wall():
                        with lock:
                            self._expire_due(now)
                if confirms and (now >= intake.confirm_due or len(confirms) >= CONFIRM_BATCH):
                    with lock:
                        intake.send_confirms()
                if now >= rates.wake_at:
                    with lock:
                        self._chunks_out.run(now)
                if now >= schedules.wake_at:
                    with lock:
                        fired = schedules.fire(wall())
                        if fired:
                            intake.ticked(fired)
                            self._chunks_out.run(now)
                if now >= next_beat:
                    if not self._alive():
                        logger.info("broker %s: its actor was released; stopping", self.name)
                        break
                    with lock:
                        if now - next_beat > self._settings.heartbeat_timeout - beat:
                            self._was_deaf(now - next_beat + beat)
                        self._housekeeping(now)
                    next_beat = now + beat
                elif durable:
                    self._storage.commit()
        except BaseException as e:  # the loop must never die silently
            self._error = e
            logger.exception("broker %s loop failed", self.name)
        finally:
            with self._lock:
                self._farewell()
                close_socket(self._sock)
                self._close_storage()
            if self._on_stop is not None:
                # Also when the loop stops by itself (its pool was dropped without close()): the
                # ZAP handler thread and the inproc name must not outlive the broker.
                try:
                    self._on_stop()
                except Exception:
                    logger.exception("broker %s: releasing its socket's admission failed", self.name)

    def _round(self) -> None:
        work = self._work
        work.now = time.monotonic()
        route = self._routes.get
        decode = p.decode
        sock, polled = self._sock, self._polled
        # The socket drained here (as recv_ready does, without its generator): after a poll said
        # it is readable, up to _ROUND messages, each the peer's identity then its frames; a
        # zero-timeout zmq_poll says when none is left (get(EVENTS) builds an enum in Python).
        for _ in range(_ROUND):
            try:
                ident = _recv(sock, _NOBLOCK)
                frame = _recv(sock, _NOBLOCK, copy=False)
            except zmq.Again:
                break
            frames = [frame]
            while frame.more:
                frame = _recv(sock, _NOBLOCK, copy=False)
                frames.append(frame)
            msg = None
            try:
                msg = decode(frames)
                handler = route(type(msg))
                if handler is None:  # a broker-to-peer command sent to the broker
                    raise ProtocolError(f"{type(msg).__name__} is not accepted by a broker")
                work.head = frames[0]
                handler(ident, msg, work)
            except ProtocolError as e:
                self._bad(ident, e)
            except Exception as e:  # noqa: BLE001 - a bug of zdq's on this message costs it, not the queue
                self._bad(ident, e)
                if self._failed_log.due(type(e).__name__, time.monotonic()):
                    logger.exception(
                        "broker %s: handling a %s from %s failed; the message is dropped (counted in "
                        "bad_messages; more of these not logged for %.0f s)",
                        self.name, "message" if msg is None else type(msg).__name__, self._peer_table.name_of(ident),
                        self._failed_log.every,
                    )
            if not _poll(polled, 0):
                break
        now = work.now
        if work.puts:
            puts, work.puts = work.puts, []
            unique, work.unique = work.unique, False
            # A round's one plain PUT on a transient queue (a lone task's) may be stored and
            # delivered in one pass; a CANCEL in its round is asked first, as usual.
            if len(puts) > 1 or unique or work.cancels or self._durable or not self._intake.deliver_lone(puts, now):
                self._intake.store(puts, unique)
        if work.dones:
            dones, work.dones = work.dones, []
            self._finish(dones, now)
        if work.cancels:  # after the round's PUTs are stored and DONEs recorded
            cancels, work.cancels = work.cancels, []
            for ident, cancel in cancels:
                self._questions.ask(ident, cancel, now)
        routing = self._routing
        if work.racks:
            racks, work.racks = work.racks, []
            for ident, chunk_ids in racks:
                routing.receipt(ident, chunk_ids)
        if work.drivers_heard:
            work.drivers_heard = set()
            if routing.waiting:
                routing.route_waiting(now)
        if work.syncs:
            syncs, work.syncs = work.syncs, []
            for ident, sync in syncs:
                _answer_sync(self, ident, routing.status(ident, sync))
        if self._rates.active or self._ready.n:  # Dispatch.run's own first test, without its call
            self._chunks_out.run(now)
        if self._durable:
            # An early acknowledgement (at most once) is written at once: held back, a broker
            # that died in the meantime would serve the chunk again after a restart.
            self._storage.commit(force=work.early_acks)
        work.early_acks = False

    # -- the route table: what each message a peer sends does -------------------------------------
    def _route_table(self) -> dict[type[Any], Callable[[bytes, Any, _Round], None]]:
        return (
            p.Routes[bytes, _Round]()
            # The two messages of every task, and the consumers' credit: kept short.
            .add(p.Put, self._on_put)
            .add(p.Puts, self._on_puts)
            .add(p.Done, self._on_done)
            .add(p.Fetch, self._on_fetch)
            .add(p.Heartbeat, self._on_heartbeat)
            .add(p.Rack, self._on_rack)
            .add(p.Sync, self._on_sync)
            .add(p.Hello, self._on_hello)
            .add(p.Return, self._on_return)
            .add(p.Ack, self._on_ack)
            .add(p.Dead, self._on_dead)
            .add(p.Split, self._on_split)
            .add(p.Retried, self._on_retried)
            .add(p.Cancel, self._on_cancel)
            .add(p.Cancelled, self._on_cancelled)
            .add(p.Bye, self._on_bye)
            .table
        )

    def _on_put(self, ident: bytes, msg: p.Put, work: _Round) -> None:
        work.puts.append((ident, msg))
        if msg.unique_key:  # the one test a plain PUT pays for unique tasks
            work.unique = True
        peer = self._peers.get(ident)
        if peer is not None and peer.role is _DRIVER and not peer.gone:
            peer.last_seen = work.now  # a known driver: the common case, kept short
            if self._routing.waiting:
                work.drivers_heard.add(ident)
        else:
            self._driver_heard(ident, work)

    def _on_puts(self, ident: bytes, msg: p.Puts, work: _Round) -> None:
        """Several chunks in one message: each a PUT of this round (stored in its one transaction,
        confirmed with the round's other chunks)."""
        for put in msg.puts:
            self._on_put(ident, put, work)

    def _on_done(self, ident: bytes, msg: p.Done, work: _Round) -> None:
        work.dones.append((ident, msg))
        if ident not in self._peers:
            self._who(ident)
        self._peer_table.credit(ident, msg.credit, work.now)

    def _on_fetch(self, ident: bytes, msg: p.Fetch, work: _Round) -> None:
        if ident not in self._peers:
            self._who(ident)
        self._peer_table.credit(ident, msg.credit, work.now, revoke=msg.credit == 0)

    def _on_heartbeat(self, ident: bytes, msg: p.Heartbeat, work: _Round) -> None:
        peer = self._peers.get(ident)
        if peer is None:
            self._who(ident)
            return
        peer.last_seen = work.now
        if peer.role is p.Role.DRIVER:
            self._driver_heard(ident, work)

    def _who(self, ident: bytes) -> None:
        """A peer this broker does not know speaks: in practice a consumer taken for gone after a
        silence (its worker stopped or starved past heartbeat-timeout), now going on. It is asked
        to say HELLO again (WHO): it is then admitted under its name, and gives its credit anew.
        Forgotten, it would beat unanswered and idle for ever, blaming the network."""
        self._send(ident, p.Who())

    def _on_rack(self, ident: bytes, msg: p.Rack, work: _Round) -> None:
        work.racks.append((ident, msg.chunk_ids))
        peer = self._peers.get(ident)
        if peer is not None and peer.role is p.Role.DRIVER and not peer.gone:
            peer.last_seen = work.now
            if self._routing.waiting:
                work.drivers_heard.add(ident)
        else:
            self._driver_heard(ident, work)

    def _on_sync(self, ident: bytes, msg: p.Sync, work: _Round) -> None:
        work.syncs.append((ident, msg))
        self._driver_heard(ident, work)

    def _on_hello(self, ident: bytes, msg: p.Hello, work: _Round) -> None:
        name = msg.name.decode(errors="replace")
        if msg.role is p.Role.DRIVER:
            # A driver says HELLO on each new connection (through a new relay, say): results sent
            # on its previous one may have been lost with it. They go again.
            self._routing.resend_to(ident)
            self._driver_heard(ident, work).name = name
        else:
            consumer = self._peer_table.consumer(ident, work.now)
            consumer.name = name
            consumer.local = is_local_peer(work.head)
            # A consumer says HELLO on each new connection. Chunks leased to it before may have
            # been lost with its previous connection (ZeroMQ drops what was queued on a pipe
            # that a new connection of the same identity takes over): they go back to the
            # queue, without using an attempt; a DONE for them from this consumer still counts.
            returned = self._leases.reclaim(ident)
            if returned:
                logger.info(
                    "broker %s: consumer %s reconnected; %d chunks leased to it go back to the queue",
                    self.name, name, len(returned),
                )
        self._send(ident, p.Heartbeat())

    def _on_return(self, ident: bytes, msg: p.Return, work: _Round) -> None:
        held = self._leases.get(msg.chunk_id)
        if held is not None and held.holder == ident:
            self._leases.give_back(msg.chunk_id, count_attempt=False)

    def _on_ack(self, ident: bytes, msg: p.Ack, work: _Round) -> None:
        held = self._leases.get(msg.chunk_id)
        if held is None or held.holder != ident or not self._leases.ack_early(msg.chunk_id):
            raise ProtocolError(f"ACK of chunk {msg.chunk_id} that is not leased to this peer")
        work.early_acks = True

    def _on_dead(self, ident: bytes, msg: p.Dead, work: _Round) -> None:
        reason = msg.reason.decode(errors="replace")
        try:
            meta = self._leases.dead_letter(ident, msg.chunk_id, msg.chunk, reason, msg.task_id)
        except StorageError as e:
            logger.error("broker %s could not store a dead letter: %s", self.name, e)
            return
        if meta is None:  # a late word: the chunk's holder now runs the task
            return
        self.counters.tasks_dead_lettered += 1
        if meta.owner == SCHEDULED:  # not kept: its error reaches the schedule (its DONE follows)
            logger.warning("queue %s: a tick of schedule %d used up its attempts: %s", self.name, meta.seq, reason[:200])

    def _on_split(self, ident: bytes, msg: p.Split, work: _Round) -> None:
        try:
            split = self._leases.split_by(ident, msg.chunk_id, msg.parts)
        except StorageError as e:
            logger.error("broker %s could not split chunk %d: %s", self.name, msg.chunk_id, e)
            return
        if split:
            self.counters.chunks_split += 1

    def _on_retried(self, ident: bytes, msg: p.Retried, work: _Round) -> None:
        self._leases.note_failed(ident, msg.chunk_id, msg.failed)

    def _on_cancel(self, ident: bytes, msg: p.Cancel, work: _Round) -> None:
        work.cancels.append((ident, msg))
        self._driver_heard(ident, work)

    def _on_cancelled(self, ident: bytes, msg: p.Cancelled, work: _Round) -> None:
        self._questions.answered(ident, msg)

    def _on_bye(self, ident: bytes, msg: p.Bye, work: _Round) -> None:
        peer = self._peers.get(ident)
        if peer is None:
            return
        if peer.role is p.Role.CONSUMER:
            del self._peers[ident]
            # A consumer that says goodbye is alive: what it still holds (a chunk it was asked to
            # stop running, those it had not started) did not kill it, and costs no attempt. Only
            # a consumer that went silent (heartbeat timeout: killed, or its process died) counts
            # one against its chunks.
            self._expire(ident, peer, count_attempt=False)
        else:
            peer.gone = True  # kept: its results may now go to the creator
            self._routing.driver_left(ident, work.now)

    def _bad(self, ident: bytes, error: Exception) -> None:
        self.counters.bad_messages += 1
        logger.debug("broker %s dropped a message from %s: %s", self.name, self._peer_table.name_of(ident), error)

    # -- peers ----------------------------------------------------------------------------------
    def _driver_heard(self, ident: bytes, work: _Round) -> Peer:
        work.drivers_heard.add(ident)
        was = self._peers.get(ident)
        if was is not None and was.role is p.Role.CONSUMER:
            # A peer is one role at a time: a consumer that speaks as a driver gives back what it
            # held, or its chunks would be leased to no consumer for ever (reviewer 28b).
            self._expire(ident, was, count_attempt=False)
        return self._peer_table.driver(ident, work.now)

    def _expire(self, ident: bytes, consumer: Peer, *, count_attempt: bool = True) -> None:
        self._questions.consumer_left(ident)
        returned, lost = self._leases.expire(ident, count_attempt=count_attempt)
        for chunk_id, held in lost:  # acknowledged early: at most once, so it is not run again
            self._send(held.meta.owner, p.Lost(held.meta.seq, chunk_id))
            if held.meta.unique_key and self._intake.unique is not None:
                self._intake.unique.lost(chunk_id)
        if returned or lost:
            logger.info(
                "broker %s: consumer %s left, %d leased chunks return to the queue",
                self.name,
                consumer.name or unnamed_peer(ident),
                len(returned),
            )

    def _send(self, ident: bytes, msg: p.Message) -> bool:
        """Send ``msg`` to a peer; False if it cannot take it now (leases and resends recover).

        :func:`~zdq.transport.sockets.try_send` with the peer's identity first, without building
        a list of the frames: what a broker sends is one or two frames (a head, then a chunk's or
        its results' payload). High-water marks are lifted, so a refusal comes at the first frame
        only: a message never goes in part.
        """
        frames = _encode(msg)
        last = frames.pop()
        sock = self._sock
        try:
            _send_frame(sock, ident, _NOBLOCK_MORE)
            for frame in frames:  # a head: small, copied
                _send_frame(sock, frame, _NOBLOCK_MORE)
            _send_frame(sock, last, _NOBLOCK, copy=len(last) < _ZERO_COPY)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                return False
            raise

    # -- results --------------------------------------------------------------------------------
    def _finish(self, dones: list[tuple[bytes, p.Done]], now: float) -> None:
        leases, routing, counters = self._leases, self._routing, self.counters
        for ident, done in dones:
            chunk_id = done.chunk_id
            try:
                held = leases.done_by(ident, chunk_id, done.results)
            except ProtocolError as e:
                self._bad(ident, e)
                continue
            if held is None:
                counters.duplicate_dones += 1
                continue
            meta = held.meta
            if meta.owner == SCHEDULED:  # a schedule's tick: its results are the schedule's
                self._schedules.done(meta.seq, done.results)
                leases.forget_now(chunk_id)
                # Written now, not within 50 ms: a broker killed meanwhile would run the tick
                # again. Ticks are rare; a round of ordinary chunks pays nothing for this.
                self._storage.commit(force=True)
            else:
                # The results go first (their driver waits for them); the counters after.
                routing.finished(chunk_id, held, now)
                if meta.unique_key and self._intake.unique is not None:  # its key is free; its followers get the results
                    self._intake.unique.ended(chunk_id, held.consumer, held.results)
            counters.chunks_acked += 1
            counters.tasks_acked += meta.n_tasks
            if held.leased_at:  # per chunk, not per task: a bisect of ten bounds
                took = now - held.leased_at
                counters.round_trips[bisect.bisect_left(ROUND_TRIP_BOUNDS, took)] += 1
                counters.round_trip_sum += took

    # -- expiry (see zdq.broker.expiry) ---------------------------------------------------------
    def _expire_due(self, now: float) -> None:
        """Chunks whose expiry came and that still wait (ready or delayed) are expired now."""
        for chunk_id in self._expiry.due(time.time()):
            self._expire_chunk(chunk_id, now, just_leased=False)
        if self._durable:
            self._storage.commit()

    def _expire_chunk(self, chunk_id: int, now: float, *, just_leased: bool = True) -> None:
        """The chunk's expiry passed before it was delivered: it never is. Its driver is told
        (EXPIRED, held like results until its RACK). ``just_leased``: Dispatch leased it a
        moment ago, and did not send it."""
        held = self._leases.expire_unsent(chunk_id, just_leased=just_leased)
        if held is None:
            return  # delivered (its consumer checks), done, or gone
        meta = held.meta
        n = meta.n_tasks - len(self._storage.cancelled(chunk_id))
        self.counters.tasks_expired += n
        self._expiry.note(chunk_id, meta)
        logger.debug("broker %s: chunk %d (%d tasks) expired before it was delivered", self.name, chunk_id, n)
        if meta.owner == SCHEDULED:  # a schedule's tick has no driver to tell; the next tick runs
            self._leases.forget_now(chunk_id)
            return
        self._routing.finished(chunk_id, held, now)
        if meta.unique_key and self._intake.unique is not None:  # its key is free; its followers expired with it
            self._intake.unique.expired(chunk_id)

    # -- time -----------------------------------------------------------------------------------
    def _was_deaf(self, gap: float) -> None:
        """The loop did not run for ``gap`` seconds (its process was stopped, or starved of the
        GIL): what its peers sent meanwhile is still unread, so none of them is taken as silent
        for it. A consumer that did die meanwhile is found a heartbeat timeout later."""
        logger.warning(
            "broker %s: its loop did not run for %.1f s (its process was stopped or starved); its consumers "
            "get a heartbeat timeout to be heard again before any is taken as lost", self.name, gap,
        )
        self._peer_table.hear_all(time.monotonic())

    def _housekeeping(self, now: float) -> None:
        self._questions.expire(now)
        deadline = now - self._settings.heartbeat_timeout
        for ident, peer in self._peer_table.silent_consumers(deadline):
            why = "its worker left the cluster" if peer.last_seen == -math.inf else "missed its heartbeats"
            logger.warning("broker %s: consumer %s %s", self.name, peer.name or unnamed_peer(ident), why)
            self._expire(ident, peer)
        # Results sent to a driver that has been silent since: send them again when it (or, if it
        # is gone, the creator) speaks. They were not deleted; the driver records each task once.
        self._routing.resend_unheard(deadline)
        if self._intake.unique is not None:
            self._intake.unique.housekeeping()
        for ident, peer in self._peers.items():
            if not peer.gone:
                self._send(ident, p.Heartbeat())
        if self._leases.retained is not None:
            self._leases.retained.expire()
        self._schedules.rewake()  # follows a jump of the wall clock
        self._chunks_out.run(now)
        self._storage.commit()

    def _farewell(self) -> None:
        self._intake.send_confirms()
        for ident, peer in list(self._peers.items()):
            if peer.gone:
                continue
            try:
                self._send(ident, p.Bye())
            except zmq.ZMQError:
                break
