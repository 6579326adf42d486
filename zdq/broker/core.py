"""The broker loop: one queue, one ROUTER socket, one thread.

:class:`BrokerCore` knows nothing of Dask (tests and fuzzers drive it directly); the actor that
places it on a worker is :class:`zdq.broker.actor.Broker`.

One round of the loop drains the socket (up to ``_ROUND`` messages), writes every PUT of the round
in one storage transaction (group commit), confirms them, records every DONE, routes the results to
their drivers, answers SYNCs, then hands ready chunks to consumers with credit. The state of every
chunk is in the :class:`~zdq.broker.leases.LeaseTable`; this module keeps the peers (drivers and
consumers: credit, liveness) and the routing of results.

Routing results: they go to the driver that submitted the chunk. If that driver cannot take them
now (it is not connected, or not yet: a consumer may reach a queue placed again before its driver
does), they wait, and are sent when it speaks. Results whose driver left (BYE) or has been silent
for ``_orphaned_after``, or that a previous incarnation of a durable queue stored for a driver this
one never met, go to the driver that placed this broker (its *creator*), marked foreign (seq 0).
Nothing is dropped: a chunk leaves the queue only when a driver acknowledges its results (RACK).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import zmq

from zdq.config import PoolSettings
from zdq.errors import ProtocolError, StorageError, StorageFull
from zdq.names import unnamed_peer
from zdq.stats import ROUND_TRIP_BOUNDS, BrokerStats
from zdq.broker.leases import Held, LeaseTable
from zdq.broker.schedules import ScheduleTable
from zdq.schedules import SCHEDULED
from zdq.storage.base import ChunkMeta, DeadLetter, Storage
from zdq.transport import protocol as p
from zdq.transport.sockets import close_socket, is_local_peer, recv_ready, try_send

__all__ = ["BrokerCore", "BrokerCounters"]

logger = logging.getLogger(__name__)

_ROUND = 1024  # messages drained per round: bounds a group commit and keeps timers responsive
#: A CONFIRM is held back this long (or until this many are held): if the chunk's results are sent
#: first, RESULTS confirms it and the CONFIRM is never sent. On a single-task round trip that saves
#: a message, two socket-thread wake-ups and a driver wake-up per task; when chunks pour in, the
#: batch limit releases confirms long before a driver's window (16 by default) fills.
_CONFIRM_DELAY = 0.002
_CONFIRM_BATCH = 8
#: A consumer without credit is told READY at most this often while chunks wait for it.
_READY_EVERY = 0.1
_DRIVER = p.Role.DRIVER


@dataclass
class BrokerCounters:
    """What a broker counts, as the statistics report it."""

    chunks_stored: int = 0
    tasks_stored: int = 0
    chunks_acked: int = 0
    tasks_acked: int = 0
    chunks_redelivered: int = 0
    duplicate_dones: int = 0
    bad_messages: int = 0
    orphan_results: int = 0
    dropped_results: int = 0
    chunks_split: int = 0
    tasks_dead_lettered: int = 0
    #: Chunks by the time from their DELIVER to their DONE: one count per bound of
    #: ``ROUND_TRIP_BOUNDS``, and a last one above them (the Prometheus histogram).
    round_trips: list[int] = field(default_factory=lambda: [0] * (len(ROUND_TRIP_BOUNDS) + 1))
    round_trip_sum: float = 0.0


@dataclass
class _Peer:
    role: p.Role
    name: str = ""  # announced in its HELLO: what statistics and logs show
    credit: int = 0
    local: bool = False  # in the broker's own process (connected over inproc): served first
    last_seen: float = 0.0
    notified: float = 0.0  # when it was last told READY
    routed: int = 0  # tasks whose results were sent to it (a driver)
    gone: bool = False  # said BYE


class _Question:
    """A driver's CANCEL being answered: the tasks found cancelled so far, and how many consumers
    holding some of them have still to answer."""

    __slots__ = ("driver", "token", "cancelled", "waiting")

    def __init__(self, driver: bytes, token: int) -> None:
        self.driver = driver
        self.token = token
        self.cancelled: set[int] = set()
        self.waiting = 0


class _Round:
    """What one round of the loop gathered, to handle together (a plain class: made every round)."""

    __slots__ = ("cancels", "dones", "drivers_heard", "early_acks", "puts", "racks", "syncs")

    def __init__(self) -> None:
        self.cancels: list[tuple[bytes, p.Cancel]] = []
        self.puts: list[tuple[bytes, p.Put]] = []
        self.dones: list[tuple[bytes, p.Done]] = []
        self.racks: list[tuple[bytes, tuple[int, ...]]] = []
        self.syncs: list[tuple[bytes, p.Sync]] = []
        self.drivers_heard: set[bytes] = set()
        self.early_acks = False


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
        self._leases = LeaseTable(storage)
        self._schedules = ScheduleTable(name, storage)
        self._storage = storage
        self._durable = storage.durable
        self._settings = settings
        self._creator = creator
        self._on_stop = on_stop  # releases what the actor set up around the loop (ZAP domain, inproc name)
        # A driver silent this long is taken for gone: its results go to the creator.
        self._orphaned_after = max(60.0, 4 * settings.heartbeat_timeout)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peers: dict[bytes, _Peer] = {}
        self._with_credit: deque[bytes] = deque()
        # Done chunks whose results are not with a driver (some may have been kept by the queue
        # before it last stopped).
        self._waiting: dict[int, None] = {i: None for i, _ in self._leases.done_entries()}
        self._ready_scan = 0.0
        self._error: BaseException | None = None
        self.counters = BrokerCounters()
        # CONFIRMs held back, by (driver, seq): the chunk id to confirm.
        self._confirms: dict[tuple[bytes, int], int] = {}
        self._confirm_due = math.inf
        # CANCELs passed on to the consumers holding the chunks, by the token they were given:
        # (the driver's question, the consumer, chunk id, chunk index -> driver index, deadline).
        self._asked: dict[int, tuple[_Question, bytes, int, dict[int, int], float]] = {}
        self._tokens = itertools.count(1)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"zdq-broker-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop, close the socket and the storage. Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("broker %s loop did not stop within %.1fs", self.name, timeout)
        else:
            close_socket(self._sock)
            self._storage.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- control plane --------------------------------------------------------------------------
    def statistics(self, endpoint: str = "") -> BrokerStats:
        with self._lock:
            c = self._leases.counts()
            drivers = {i: peer for i, peer in self._peers.items() if peer.role is p.Role.DRIVER}
            routed: dict[str, int] = {}
            for ident, peer in drivers.items():
                name = self._name_of(ident)
                routed[name] = routed.get(name, 0) + peer.routed
            consumers = sorted(self._name_of(i) for i, peer in self._peers.items() if peer.role is p.Role.CONSUMER)
            return BrokerStats(
                name=self.name,
                endpoint=endpoint,
                durable=self._storage.durable,
                ready_chunks=c.ready_chunks,
                ready_tasks=c.ready_tasks,
                leased_chunks=c.leased_chunks,
                leased_tasks=c.leased_tasks,
                awaiting_tasks=c.done_tasks,
                dead_chunks=c.dead_chunks,
                dead_tasks=c.dead_tasks,
                consumers=len(consumers),
                drivers=sum(1 for peer in drivers.values() if not peer.gone),
                routed_tasks=routed,
                consumer_names=tuple(consumers),
                delayed_chunks=c.delayed_chunks,
                delayed_tasks=c.delayed_tasks,
                **{**asdict(self.counters), "round_trips": tuple(self.counters.round_trips)},
            )

    def _name_of(self, ident: bytes) -> str:
        """A peer as people see it: the name it announced, never its identity bytes."""
        peer = self._peers.get(ident)
        return peer.name if peer is not None and peer.name else unnamed_peer(ident)

    def dead_letters(self) -> list[DeadLetter]:
        with self._lock:
            return self._storage.dead_letters()

    def requeue_dead(self, chunk_ids: list[int] | None = None) -> int:
        with self._lock:
            return self._storage.requeue_dead(chunk_ids)

    def purge_dead(self, chunk_ids: list[int] | None = None) -> int:
        with self._lock:
            return self._storage.purge_dead(chunk_ids)

    def purge_ready(self) -> int:
        """Cancel every task of every chunk not yet delivered, ready or delayed (``zdq purge``);
        return how many were cancelled.

        The chunks are not deleted: their drivers wait for their futures. Delayed ones are made
        ready at once. A consumer that gets one skips its cancelled tasks (as for ``future.cancel()``) and
        reports them ``TaskCancelled``, so every future settles and every count and receipt stays
        as for any task.
        """
        n = 0
        with self._lock:
            for chunk_id in self._storage.waiting_ids():
                meta = self._storage.meta(chunk_id)
                if meta is None:
                    continue
                before = len(self._storage.cancelled(chunk_id))
                if self._storage.cancel(chunk_id, range(meta.n_tasks)):
                    n += meta.n_tasks - before
                    # Nothing of it will run: its futures need not wait for its release time.
                    self._storage.release_now(chunk_id)
            self._storage.commit(force=True)
            self._ready_scan = 0.0  # consumers without credit hear READY at the next round
        return n

    def setting(self, name: bytes, proposed: bytes | None) -> bytes | None:
        with self._lock:
            return self._storage.setting(name, proposed)

    def add_schedule(self, record: bytes) -> None:
        with self._lock:
            self._schedules.add(record)

    def cancel_schedule(self, schedule_id: int) -> bool:
        with self._lock:
            return self._schedules.cancel(schedule_id)

    def schedules(self) -> list[bytes]:
        with self._lock:
            return self._schedules.records()

    # -- the loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        beat = self._settings.heartbeat_interval
        next_beat = time.monotonic() + beat
        storage = self._storage
        schedules = self._schedules
        try:
            while not self._stop.is_set():
                due = min(next_beat, self._confirm_due) if self._confirms else next_beat
                release = storage.next_release  # wall clock; inf when no chunk is delayed
                if release < math.inf:
                    # The poll ends when the next delayed chunk is due: nothing polls while they wait.
                    due = min(due, time.monotonic() + (release - time.time()))
                if schedules.wake_at < due:
                    due = schedules.wake_at
                wait_ms = max(0, min(100, math.ceil((due - time.monotonic()) * 1000)))
                if poller.poll(wait_ms):
                    with self._lock:
                        self._round()
                now = time.monotonic()
                release = storage.next_release
                if release < math.inf and release <= time.time():
                    with self._lock:
                        self._release_due(now)
                if self._confirms and (now >= self._confirm_due or len(self._confirms) >= _CONFIRM_BATCH):
                    with self._lock:
                        self._send_confirms()
                if now >= schedules.wake_at:
                    with self._lock:
                        if schedules.fire(time.time()):
                            self._dispatch(now)
                if now >= next_beat:
                    if not self._alive():
                        logger.info("broker %s: its actor was released; stopping", self.name)
                        break
                    with self._lock:
                        self._housekeeping(now)
                    next_beat = now + beat
                elif self._durable:
                    self._storage.commit()
        except BaseException as e:  # the loop must never die silently
            self._error = e
            logger.exception("broker %s loop failed", self.name)
        finally:
            with self._lock:
                self._farewell()
                close_socket(self._sock)
                self._storage.close()
            if self._on_stop is not None:
                # Also when the loop stops by itself (its pool was dropped without close()): the
                # ZAP handler thread and the inproc name must not outlive the broker.
                try:
                    self._on_stop()
                except Exception:
                    logger.exception("broker %s: releasing its socket's admission failed", self.name)

    def _round(self) -> None:
        work = _Round()
        now = time.monotonic()
        puts, dones = work.puts, work.dones
        peers = self._peers
        decode = p.decode
        for frames in recv_ready(self._sock, _ROUND, router=True):
            ident = frames[0]
            try:
                msg = decode(frames[1:])
                kind = type(msg)
                # The two messages of every task, handled here; the others by _on_message.
                if kind is p.Done:
                    dones.append((ident, msg))  # type: ignore[arg-type]
                    self._credit(ident, msg.credit, now)  # type: ignore[union-attr]
                elif kind is p.Put:
                    puts.append((ident, msg))  # type: ignore[arg-type]
                    peer = peers.get(ident)
                    if peer is not None and peer.role is _DRIVER and not peer.gone:
                        peer.last_seen = now  # a known driver: the common case, kept short
                        if self._waiting:
                            work.drivers_heard.add(ident)
                    else:
                        self._driver_heard(ident, now, work)
                else:
                    self._on_message(ident, frames[1], msg, work, now)
            except ProtocolError as e:
                self._bad(ident, e)
        if puts:
            self._store(puts)
        if dones:
            self._finish(dones, now)
        for ident, cancel in work.cancels:  # after the round's PUTs are stored and DONEs recorded
            self._cancel(ident, cancel, now)
        for ident, chunk_ids in work.racks:
            self._leases.forget(chunk_ids, ident)
        if self._waiting and work.drivers_heard:
            self._route_waiting(work.drivers_heard)
        for ident, sync in work.syncs:
            self._answer(ident, sync)
        self._dispatch(now)
        if self._durable:
            # An early acknowledgement (at most once) is written at once: held back, a broker
            # that died in the meantime would serve the chunk again after a restart.
            self._storage.commit(force=work.early_acks)

    def _on_message(self, ident: bytes, head: Any, msg: p.Message, work: _Round, now: float) -> None:
        kind = type(msg)
        if kind is p.Fetch:
            self._credit(ident, msg.credit, now, revoke=msg.credit == 0)  # type: ignore[union-attr]
        elif kind is p.Heartbeat:
            peer = self._peers.get(ident)
            if peer is not None:
                peer.last_seen = now
                if peer.role is p.Role.DRIVER:
                    self._driver_heard(ident, now, work)
        elif kind is p.Rack:
            work.racks.append((ident, msg.chunk_ids))  # type: ignore[union-attr]
            peer = self._peers.get(ident)
            if peer is not None and peer.role is p.Role.DRIVER and not peer.gone:
                peer.last_seen = now
                if self._waiting:
                    work.drivers_heard.add(ident)
            else:
                self._driver_heard(ident, now, work)
        elif kind is p.Sync:
            work.syncs.append((ident, msg))  # type: ignore[arg-type]
            self._driver_heard(ident, now, work)
        elif kind is p.Hello:
            name = msg.name.decode(errors="replace")  # type: ignore[union-attr]
            if msg.role is p.Role.DRIVER:  # type: ignore[union-attr]
                # A driver says HELLO on each new connection (through a new relay, say): results
                # sent on its previous one may have been lost with it (ZeroMQ drops what was
                # queued on a pipe that a new connection of the same identity takes over). They
                # go again; the driver takes each task's result once.
                self._unsend(lambda held: held.driver == ident)
                self._driver_heard(ident, now, work).name = name
            else:
                consumer = self._consumer(ident, now)
                consumer.name = name
                consumer.local = is_local_peer(head)
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
        elif kind is p.Return:
            held = self._leases.get(msg.chunk_id)  # type: ignore[union-attr]
            if held is not None and held.holder == ident:
                self._leases.give_back(msg.chunk_id, count_attempt=False)  # type: ignore[union-attr]
        elif kind is p.Ack:
            self._early_ack(ident, msg.chunk_id)  # type: ignore[union-attr]
            work.early_acks = True
        elif kind is p.Dead:
            self._dead(ident, msg)  # type: ignore[arg-type]
        elif kind is p.Split:
            self._split(ident, msg)  # type: ignore[arg-type]
        elif kind is p.Cancel:
            work.cancels.append((ident, msg))  # type: ignore[arg-type]
            self._driver_heard(ident, now, work)
        elif kind is p.Cancelled:
            self._on_cancelled(ident, msg)  # type: ignore[arg-type]
        elif kind is p.Bye:
            self._peer_left(ident)
        else:  # a broker-to-peer command sent to the broker
            raise ProtocolError(f"{kind.__name__} is not accepted by a broker")

    def _bad(self, ident: bytes, error: Exception) -> None:
        self.counters.bad_messages += 1
        logger.debug("broker %s dropped a message from %s: %s", self.name, self._name_of(ident), error)

    # -- peers ----------------------------------------------------------------------------------
    def _driver_heard(self, ident: bytes, now: float, work: _Round) -> _Peer:
        peer = self._peers.get(ident)
        if peer is None or peer.role is not p.Role.DRIVER:
            peer = self._peers[ident] = _Peer(p.Role.DRIVER)
        peer.last_seen = now
        peer.gone = False
        work.drivers_heard.add(ident)
        return peer

    def _consumer(self, ident: bytes, now: float) -> _Peer:
        peer = self._peers.get(ident)
        if peer is None or peer.role is not p.Role.CONSUMER:
            peer = self._peers[ident] = _Peer(p.Role.CONSUMER)
        peer.last_seen = now
        return peer

    def _credit(self, ident: bytes, credit: int, now: float, *, revoke: bool = False) -> None:
        consumer = self._peers.get(ident)
        if consumer is None or consumer.role is _DRIVER:
            consumer = self._consumer(ident, now)
        else:
            consumer.last_seen = now
        if revoke:
            consumer.credit = 0  # a DELIVER already sent may still reach it: it gives it back
            return
        had = consumer.credit
        # Credit is capped: a consumer cannot make the broker lease the whole queue to it.
        consumer.credit = min(consumer.credit + credit, 1024)
        if had == 0 and consumer.credit > 0:
            # A consumer in this process is served first: its chunks and results cross no socket
            # thread and no network (see zdq.transport.sockets.process_context).
            if consumer.local:
                self._with_credit.appendleft(ident)
            else:
                self._with_credit.append(ident)

    def _peer_left(self, ident: bytes) -> None:
        peer = self._peers.get(ident)
        if peer is None:
            return
        if peer.role is p.Role.CONSUMER:
            del self._peers[ident]
            self._expire(ident, peer)
        else:
            peer.gone = True  # kept: its results may now go to the creator
            for chunk_id, held in self._leases.done_entries():
                if held.driver == ident:
                    held.driver = None
                    self._waiting[chunk_id] = None
                    self._leases.keep(chunk_id, held)
            if self._waiting:
                self._route_waiting(set())

    def _expire(self, ident: bytes, consumer: _Peer) -> None:
        if self._asked:
            self._forget_questions(lambda holder, deadline: holder == ident)
        returned, lost = self._leases.expire(ident)
        for chunk_id, held in lost:  # acknowledged early: at most once, so it is not run again
            self._send(held.meta.owner, p.Lost(held.meta.seq, chunk_id))
        if returned or lost:
            logger.info(
                "broker %s: consumer %s left, %d leased chunks return to the queue",
                self.name,
                consumer.name or unnamed_peer(ident),
                len(returned),
            )

    def _send(self, ident: bytes, msg: p.Message) -> bool:
        try:
            # False: that peer cannot take more now; leases and resends recover.
            return try_send(self._sock, [ident, *p.encode(msg)])
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                return False
            raise

    # -- chunks in ------------------------------------------------------------------------------
    def _store(self, puts: list[tuple[bytes, p.Put]]) -> None:
        entries = [(ChunkMeta(ident, put.seq, put.n_tasks, put.not_before, put.priority), put.chunk) for ident, put in puts]
        status, detail = p.Status.STORED, b""
        try:
            ids = self._leases.put(entries)
        except StorageFull as e:
            status, detail = p.Status.FULL, str(e).encode()[:1024]
            logger.warning("broker %s storage is full: %s", self.name, e)
        except StorageError as e:
            status, detail = p.Status.ERROR, str(e).encode()[:1024]
            logger.error("broker %s could not store %d chunks: %s", self.name, len(puts), e)
        if status is p.Status.STORED:
            self.counters.chunks_stored += len(puts)
            self.counters.tasks_stored += sum(put.n_tasks for _, put in puts)
            if not self._confirms:
                self._confirm_due = time.monotonic() + _CONFIRM_DELAY
            for (ident, put), chunk_id in zip(puts, ids):
                self._confirms[(ident, put.seq)] = chunk_id
        else:
            for ident, put in puts:
                self._send(ident, p.Confirm(put.seq, 0, status, detail))

    def _send_confirms(self) -> None:
        # The chunks were committed in their round (group commit): confirming them now is safe.
        for (ident, seq), chunk_id in self._confirms.items():
            self._send(ident, p.Confirm(seq, chunk_id, p.Status.STORED))
        self._confirms.clear()
        self._confirm_due = math.inf

    # -- chunks out -----------------------------------------------------------------------------
    def _release_due(self, now: float) -> None:
        """Delayed chunks whose time has come join the ready FIFO of their priority, and go at
        once to consumers with credit (those without are told READY now, not at the next scan)."""
        if self._storage.release_due(time.time()):
            self._ready_scan = 0.0
            self._dispatch(now)

    def _dispatch(self, now: float) -> None:
        leases = self._leases
        while self._with_credit:
            ident = self._with_credit[0]
            consumer = self._peers.get(ident)
            if consumer is None or consumer.credit <= 0:
                self._with_credit.popleft()
                continue
            leased = leases.lease(ident, now)
            if leased is None:
                return
            cancelled = self._storage.cancelled(leased.chunk_id)
            if cancelled:  # told first (one pipe keeps order): the consumer skips these tasks
                self._send(ident, p.Cancel(0, leased.chunk_id, 0, tuple(sorted(cancelled))))
            if not self._send(ident, p.Deliver(leased.chunk_id, leased.meta.n_tasks, leased.attempt, leased.payload)):
                leases.give_back(leased.chunk_id, count_attempt=False)
                del self._peers[ident]
                self._expire(ident, consumer)
                continue
            if leased.attempt > 1:
                self.counters.chunks_redelivered += 1
            consumer.credit -= 1
            self._with_credit.popleft()
            if consumer.credit > 0:
                self._with_credit.append(ident)
        if now - self._ready_scan >= _READY_EVERY and self._storage.has_ready():
            # Work waits and no consumer has credit here: tell those that could ask (a consumer
            # spreads a bounded prefetch over several queues, and may have parked it elsewhere).
            self._ready_scan = now
            for ident, peer in self._peers.items():
                if peer.role is p.Role.CONSUMER and peer.credit == 0 and now - peer.notified >= _READY_EVERY:
                    peer.notified = now
                    self._send(ident, p.Ready())

    def _early_ack(self, ident: bytes, chunk_id: int) -> None:
        held = self._leases.get(chunk_id)
        if held is None or held.holder != ident or not self._leases.ack_early(chunk_id):
            self._bad(ident, ProtocolError(f"ACK of chunk {chunk_id} that is not leased to this peer"))

    def _dead(self, ident: bytes, msg: p.Dead) -> None:
        held = self._leases.held_by(ident, msg.chunk_id)
        if held is None:
            self._bad(ident, ProtocolError(f"DEAD of chunk {msg.chunk_id} that is not leased to this peer"))
            return
        meta = self._leases.meta(msg.chunk_id) or held.meta
        reason = msg.reason.decode(errors="replace")
        if meta.owner == SCHEDULED:
            # A tick that used up its attempts is not kept: the next tick runs the same task, and
            # one dead letter per tick of a failing schedule would pile up without bound. Its
            # error reaches the schedule (its DONE follows) as its last result.
            self.counters.tasks_dead_lettered += 1
            logger.warning("queue %s: a tick of schedule %d used up its attempts: %s", self.name, meta.seq, reason[:200])
            return
        # seq 0: if the dead letter is requeued, its result goes to the pool's driver as a new one.
        try:
            self._storage.put_dead([(ChunkMeta(meta.owner, 0, 1, priority=meta.priority), msg.chunk, reason)])
            self.counters.tasks_dead_lettered += 1
        except StorageError as e:
            logger.error("broker %s could not store a dead letter: %s", self.name, e)

    def _split(self, ident: bytes, msg: p.Split) -> None:
        held = self._leases.get(msg.chunk_id)
        if held is None or held.holder != ident or held.early or held.done or len(msg.parts) != held.meta.n_tasks:
            self._bad(ident, ProtocolError(f"SPLIT of chunk {msg.chunk_id} into {len(msg.parts)} parts"))
            return
        meta = held.meta
        try:
            parts = [(ChunkMeta(meta.owner, meta.seq, 1, priority=meta.priority), part) for part in msg.parts]
            self._leases.split(msg.chunk_id, parts)
        except StorageError as e:
            logger.error("broker %s could not split chunk %d: %s", self.name, msg.chunk_id, e)
            return
        self.counters.chunks_split += 1

    # -- cancellations --------------------------------------------------------------------------
    def _cancel(self, ident: bytes, msg: p.Cancel, now: float) -> None:
        """A driver cancels tasks of one of its chunks. Tasks of a ready chunk are marked (and
        skipped when it is delivered); a leased chunk's consumer is asked, for it alone knows
        which tasks have started. The driver is answered once every consumer asked has answered
        (or left, or let its heartbeat timeout pass)."""
        question = _Question(ident, msg.token)
        leases = self._leases
        for chunk_id, indexes in leases.locate(ident, msg.seq, msg.chunk_id, msg.indexes).items():
            held = leases.get(chunk_id)
            if held is None:
                if self._storage.is_ready(chunk_id):
                    try:
                        self._storage.cancel(chunk_id, indexes)
                    except StorageError as e:
                        logger.error("broker %s could not write a cancellation: %s", self.name, e)
                        continue
                    question.cancelled.update(indexes.values())
                    meta = self._storage.meta(chunk_id)
                    if meta is not None and len(self._storage.cancelled(chunk_id)) >= meta.n_tasks:
                        # Nothing of it would run, and its driver counts it done: it leaves now.
                        self._storage.ack_many([chunk_id])
            elif not held.done and held.holder is not None and held.holder in self._peers:
                token = next(self._tokens)
                self._asked[token] = (question, held.holder, chunk_id, indexes, now + self._settings.heartbeat_timeout)
                question.waiting += 1
                self._send(held.holder, p.Cancel(token, chunk_id, 0, tuple(indexes)))
        if not question.waiting:
            self._answer_question(question)

    def _on_cancelled(self, ident: bytes, msg: p.Cancelled) -> None:
        asked = self._asked.get(msg.token)
        if asked is None or asked[1] != ident:
            if asked is not None:
                self._bad(ident, ProtocolError(f"CANCELLED {msg.token} from a consumer that was not asked"))
            return  # late: its question was answered without it
        del self._asked[msg.token]
        question, _, chunk_id, indexes, _ = asked
        mine = [i for i in msg.indexes if i in indexes]
        if mine:
            held = self._leases.get(chunk_id)
            if held is not None and not held.done and not held.early:
                try:  # stored with the chunk: should it be delivered again, they are still skipped
                    self._storage.cancel(chunk_id, mine)
                except StorageError as e:
                    logger.error("broker %s could not write a cancellation: %s", self.name, e)
            question.cancelled.update(indexes[i] for i in mine)
        question.waiting -= 1
        if not question.waiting:
            self._answer_question(question)

    def _forget_questions(self, dropped: Callable[[bytes, float], bool]) -> None:
        """Stop waiting for consumers that will not answer (gone, or past their timeout): what
        they hold counts as started."""
        for token, (question, holder, _, _, deadline) in list(self._asked.items()):
            if dropped(holder, deadline):
                del self._asked[token]
                question.waiting -= 1
                if not question.waiting:
                    self._answer_question(question)

    def _answer_question(self, question: _Question) -> None:
        if question.token:
            self._send(question.driver, p.Cancelled(question.token, tuple(sorted(question.cancelled))))

    # -- results --------------------------------------------------------------------------------
    def _finish(self, dones: list[tuple[bytes, p.Done]], now: float) -> None:
        leases = self._leases
        for ident, done in dones:
            chunk_id = done.chunk_id
            current = leases.get(chunk_id)
            if (current is None or current.holder != ident) and leases.held_by(ident, chunk_id) is None:
                # Only the consumer that holds (or held, before its lease expired) a chunk may
                # report it: an authenticated peer still cannot forge another's results.
                held = leases.get(chunk_id)
                if (held is not None and held.done) or leases.meta(chunk_id) is None:
                    self.counters.duplicate_dones += 1
                else:
                    self._bad(ident, ProtocolError(f"DONE of chunk {chunk_id} that this peer never held"))
                continue
            producer = ident if len(ident) == p.ID_SIZE else ident[: p.ID_SIZE].ljust(p.ID_SIZE, b"\0")
            held = leases.finish(chunk_id, producer, done.results)
            if held is None:
                self.counters.duplicate_dones += 1
                continue
            counters = self.counters
            counters.chunks_acked += 1
            counters.tasks_acked += held.meta.n_tasks
            if held.leased_at:  # per chunk, not per task: a bisect of ten bounds
                took = now - held.leased_at
                counters.round_trips[bisect.bisect_left(ROUND_TRIP_BOUNDS, took)] += 1
                counters.round_trip_sum += took
            if held.meta.owner == SCHEDULED:  # a schedule's tick: its results are the schedule's
                self._schedules.done(held.meta.seq, done.results)
                leases.forget_now(chunk_id)
                # Written now, not within 50 ms: a broker killed meanwhile would run the tick
                # again. Ticks are rare; a round of ordinary chunks pays nothing for this.
                self._storage.commit(force=True)
                continue
            if not self._route(chunk_id, held, now):
                self._waiting[chunk_id] = None
                self._leases.keep(chunk_id, held)

    def _target(self, held: Held, now: float) -> tuple[bytes, int] | None:
        """Where the results of ``held`` go now: (driver, seq), or None to keep them waiting."""
        owner = held.meta.owner
        peer = self._peers.get(owner)
        if peer is not None and not peer.gone and now - peer.last_seen < self._orphaned_after:
            return owner, held.meta.seq  # its own driver (even a silent one: it may be paused)
        if owner == self._creator:
            return None  # the creator connects as soon as it can: its results wait for it
        creator = self._peers.get(self._creator)
        if creator is not None and not creator.gone:
            return self._creator, 0  # orphans are the creator's, marked foreign
        return None

    def _route(self, chunk_id: int, held: Held, now: float) -> bool:
        """Send a chunk's results to its driver; False if they must wait."""
        target = self._target(held, now)
        if target is None:
            return False
        driver, seq = target
        if not self._send(driver, p.Results(seq, chunk_id, held.consumer, held.results)):
            return False
        self._leases.sent(held, driver, now)
        peer = self._peers[driver]
        peer.routed += held.meta.n_tasks
        if seq:
            self._confirms.pop((driver, seq), None)  # these RESULTS confirm the chunk
        else:
            self.counters.orphan_results += 1
        return True

    def _route_waiting(self, heard: set[bytes]) -> None:
        now = time.monotonic()
        for chunk_id in list(self._waiting):
            held = self._leases.get(chunk_id)
            if held is None or not held.done or held.driver is not None:
                del self._waiting[chunk_id]
            elif self._route(chunk_id, held, now):
                del self._waiting[chunk_id]

    def _answer(self, ident: bytes, sync: p.Sync) -> None:
        c = self._leases.counts()
        missing: tuple[int, ...] = ()
        if sync.seqs:
            held = self._leases.seqs_of(ident)
            missing = tuple(seq for seq in sync.seqs if seq not in held)
        peer = self._peers.get(ident)
        self._send(
            ident,
            p.QueueStatus(
                sync.token,
                c.ready_tasks + c.delayed_tasks,  # a delayed task is queued: join() waits for it
                c.leased_tasks,
                c.dead_tasks,
                self._waiting_tasks(),
                peer.routed if peer is not None else 0,
                missing,
            ),
        )

    def _waiting_tasks(self) -> int:
        n = 0
        for chunk_id in self._waiting:
            held = self._leases.get(chunk_id)
            if held is not None and held.done and held.driver is None:
                n += held.meta.n_tasks
        return n

    # -- time -----------------------------------------------------------------------------------
    def _housekeeping(self, now: float) -> None:
        if self._asked:
            self._forget_questions(lambda holder, deadline: deadline <= now)
        deadline = now - self._settings.heartbeat_timeout
        for ident, peer in list(self._peers.items()):
            if peer.role is p.Role.CONSUMER and peer.last_seen < deadline:
                logger.warning(
                    "broker %s: consumer %s missed its heartbeats", self.name, peer.name or unnamed_peer(ident)
                )
                del self._peers[ident]
                self._expire(ident, peer)
        # Results sent to a driver that has been silent since: send them again when it (or, if it
        # is gone, the creator) speaks. They were not deleted; the driver records each task once.
        self._unsend(lambda held: held.driver is not None and held.sent_at < deadline and self._silent_since_sent(held))
        for ident, peer in self._peers.items():
            if not peer.gone:
                self._send(ident, p.Heartbeat())
        self._schedules.rewake()  # follows a jump of the wall clock
        self._dispatch(now)
        self._storage.commit()

    def _silent_since_sent(self, held: Held) -> bool:
        sent_to = self._peers.get(held.driver) if held.driver is not None else None
        return sent_to is None or sent_to.gone or sent_to.last_seen < held.sent_at

    def _unsend(self, again: Callable[[Held], bool]) -> None:
        """Results sent that match ``again`` are sent again when a driver that may take them
        speaks. They were not deleted."""
        for chunk_id, held in self._leases.done_entries():
            if held.driver is not None and again(held):
                held.driver = None
                self._waiting[chunk_id] = None
                self._leases.keep(chunk_id, held)

    def _farewell(self) -> None:
        self._send_confirms()
        for ident, peer in list(self._peers.items()):
            if peer.gone:
                continue
            try:
                self._send(ident, p.Bye())
            except zmq.ZMQError:
                break
