"""The broker: one queue, one ROUTER socket, one thread.

:class:`BrokerCore` is the loop and knows nothing of Dask (tests and fuzzers drive it directly);
:class:`Broker` is the Dask actor that places it on a worker, binds it on the worker's own address
and reports the endpoint. Actor methods are control plane only: start, stop, statistics, dead
letters. Tasks never pass through them.

One round of the loop drains the socket (up to ``_ROUND`` messages), writes every PUT of the round
in one storage transaction (group commit), confirms them, acknowledges every DONE of the round in one
transaction, routes the results to their drivers, then hands ready chunks to consumers with credit.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq

from zdq._actor import liveness_probe, worker_address
from zdq.config import PoolSettings
from zdq.errors import ClosedError, ProtocolError, StorageError, StorageFull, ZdqError
from zdq.stats import BrokerStats
from zdq.storage.base import ChunkMeta, DeadLetter, Storage
from zdq.storage.memory import MemoryStorage
from zdq.transport import protocol as p
from zdq.transport.security import Admission, ServerKeys
from zdq.transport.sockets import (
    bind_router,
    close_socket,
    is_local_peer,
    process_context,
    recv_ready,
    serve_locally,
    stop_serving_locally,
    try_send,
    worker_host,
)

__all__ = ["BrokerCore", "Broker"]

logger = logging.getLogger(__name__)

_ROUND = 1024  # messages drained per round: bounds a group commit and keeps timers responsive
#: A CONFIRM is held back this long (or until this many are held): if the chunk's results are sent
#: first, RESULTS confirms it and the CONFIRM is never sent. On a single-task round trip that saves
#: a message, two socket-thread wake-ups and a driver wake-up per task; when chunks pour in, the
#: batch limit releases confirms long before a driver's window (16 by default) fills.
_CONFIRM_DELAY = 0.002
_CONFIRM_BATCH = 8


@dataclass
class _Consumer:
    name: bytes = b""
    credit: int = 0
    local: bool = False  # in the broker's own process (connected over inproc): served first
    last_seen: float = 0.0
    leases: set[int] = field(default_factory=set)


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
    """

    def __init__(
        self,
        name: str,
        socket: zmq.Socket[Any],
        storage: Storage,
        settings: PoolSettings,
        alive: Callable[[], bool] = lambda: True,
    ) -> None:
        self.name = name
        self._alive = alive
        self._sock = socket
        self._storage = storage
        self._settings = settings
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumers: dict[bytes, _Consumer] = {}
        self._drivers: dict[bytes, float] = {}
        self._lease_owner: dict[int, bytes] = {}
        # Chunks acknowledged early (at most once): removed from storage, results still to come.
        self._early: dict[int, ChunkMeta] = {}
        # Chunks whose results were sent to a driver that has not yet said it holds them: they stay
        # stored (so a broker that dies now re-runs them) and are not redelivered meanwhile.
        self._awaiting: dict[int, tuple[bytes, float]] = {}
        # Who held a chunk whose lease expired: its late DONE is still accepted.
        self._previous_owner: dict[int, bytes] = {}
        self._with_credit: deque[bytes] = deque()
        self._error: BaseException | None = None
        self._counters = dict.fromkeys(
            (
                "chunks_stored",
                "tasks_stored",
                "chunks_acked",
                "tasks_acked",
                "chunks_redelivered",
                "duplicate_dones",
                "bad_messages",
                "orphan_results",
                "dropped_results",
                "chunks_split",
                "tasks_dead_lettered",
            ),
            0,
        )
        self._routed: dict[bytes, int] = {}
        # CONFIRMs held back, by (driver, seq): the chunk id to confirm.
        self._confirms: dict[tuple[bytes, int], int] = {}
        self._confirm_due = math.inf

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
            c = self._storage.counts()
            # Chunks whose results reached their driver, waiting only for its receipt, are done.
            metas = (self._storage.meta(chunk_id) for chunk_id in self._awaiting)
            awaiting = sum(m.n_tasks for m in metas if m is not None)
            return BrokerStats(
                name=self.name,
                endpoint=endpoint,
                durable=self._storage.durable,
                ready_chunks=c.ready_chunks,
                ready_tasks=c.ready_tasks,
                leased_chunks=c.leased_chunks - len(self._awaiting),
                leased_tasks=c.leased_tasks - awaiting,
                awaiting_tasks=awaiting,
                dead_chunks=c.dead_chunks,
                dead_tasks=c.dead_tasks,
                consumers=len(self._consumers),
                drivers=len(self._drivers),
                routed_tasks=dict(self._routed),
                **self._counters,
            )

    def dead_letters(self) -> list[DeadLetter]:
        with self._lock:
            return self._storage.dead_letters()

    def requeue_dead(self, chunk_ids: list[int] | None = None) -> int:
        with self._lock:
            return self._storage.requeue_dead(chunk_ids)

    def purge_dead(self, chunk_ids: list[int] | None = None) -> int:
        with self._lock:
            return self._storage.purge_dead(chunk_ids)

    # -- the loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        beat = self._settings.heartbeat_interval
        next_beat = time.monotonic() + beat
        try:
            while not self._stop.is_set():
                due = min(next_beat, self._confirm_due) if self._confirms else next_beat
                wait_ms = max(0, min(100, math.ceil((due - time.monotonic()) * 1000)))
                if poller.poll(wait_ms):
                    with self._lock:
                        self._round()
                now = time.monotonic()
                if self._confirms and (now >= self._confirm_due or len(self._confirms) >= _CONFIRM_BATCH):
                    with self._lock:
                        self._send_confirms()
                if now >= next_beat:
                    if not self._alive():
                        logger.info("broker %s: its actor was released; stopping", self.name)
                        break
                    with self._lock:
                        self._housekeeping(now)
                    next_beat = now + beat
        except BaseException as e:  # the loop must never die silently
            self._error = e
            logger.exception("broker %s loop failed", self.name)
        finally:
            with self._lock:
                self._farewell()
                close_socket(self._sock)
                self._storage.close()

    def _round(self) -> None:
        puts: list[tuple[bytes, p.Put]] = []
        dones: list[tuple[bytes, p.Done]] = []
        racks: list[int] = []
        now = time.monotonic()
        for frames in recv_ready(self._sock, _ROUND, router=True):
            ident = frames[0]
            try:
                msg = p.decode(frames[1:])
            except ProtocolError as e:
                self._bad(ident, e)
                continue
            if isinstance(msg, p.Put):
                puts.append((ident, msg))
                self._drivers[ident] = now
            elif isinstance(msg, p.Done):
                dones.append((ident, msg))
                if msg.credit:
                    self._credit(ident, msg.credit, now)
                else:
                    self._seen_consumer(ident, now)
            elif isinstance(msg, p.Fetch):
                self._credit(ident, msg.credit, now)
            elif isinstance(msg, p.Heartbeat):
                if ident in self._consumers:
                    self._consumers[ident].last_seen = now
                elif ident in self._drivers:
                    self._drivers[ident] = now
            elif isinstance(msg, p.Hello):
                if msg.role is p.Role.DRIVER:
                    self._drivers[ident] = now
                else:
                    consumer = self._seen_consumer(ident, now)
                    consumer.name = msg.name
                    consumer.local = is_local_peer(frames[1])
                self._send(ident, p.Heartbeat())
            elif isinstance(msg, p.Return):
                if self._lease_owner.get(msg.chunk_id) == ident:
                    self._unlease(msg.chunk_id)
                    self._storage.release(msg.chunk_id, count_attempt=False)
            elif isinstance(msg, p.Ack):
                self._early_ack(ident, msg.chunk_id)
            elif isinstance(msg, p.Dead):
                self._dead(ident, msg)
            elif isinstance(msg, p.Split):
                self._split(ident, msg)
            elif isinstance(msg, p.Rack):
                racks.extend(i for i in msg.chunk_ids if self._awaiting.get(i, (b"",))[0] == ident)
                self._drivers[ident] = now
            elif isinstance(msg, p.Bye):
                self._drivers.pop(ident, None)
                self._drop_consumer(ident)
            else:  # a broker-to-peer command sent to the broker
                self._bad(ident, ProtocolError(f"{type(msg).__name__} is not accepted by a broker"))
        if puts:
            self._store(puts)
        if dones:
            self._ack(dones, now)
        if racks:
            self._forget(racks)
        self._dispatch()
        self._storage.flush_marks()

    def _bad(self, ident: bytes, error: Exception) -> None:
        self._counters["bad_messages"] += 1
        logger.debug("broker %s dropped a message from %s: %s", self.name, ident.hex(), error)

    def _seen_consumer(self, ident: bytes, now: float) -> _Consumer:
        consumer = self._consumers.get(ident)
        if consumer is None:
            consumer = self._consumers[ident] = _Consumer()
        consumer.last_seen = now
        return consumer

    def _credit(self, ident: bytes, credit: int, now: float) -> None:
        consumer = self._seen_consumer(ident, now)
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

    def _send(self, ident: bytes, msg: p.Message) -> bool:
        try:
            # False: that peer cannot take more now; leases and resends recover.
            return try_send(self._sock, [ident, *p.encode(msg)])
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                return False
            raise

    def _store(self, puts: list[tuple[bytes, p.Put]]) -> None:
        entries = [(ChunkMeta(ident, put.seq, put.n_tasks), put.chunk) for ident, put in puts]
        status, detail = p.Status.STORED, b""
        try:
            ids = self._storage.put_many(entries)
        except StorageFull as e:
            status, detail = p.Status.FULL, str(e).encode()[:1024]
            logger.warning("broker %s storage is full: %s", self.name, e)
        except StorageError as e:
            status, detail = p.Status.ERROR, str(e).encode()[:1024]
            logger.error("broker %s could not store %d chunks: %s", self.name, len(puts), e)
        if status is p.Status.STORED:
            self._counters["chunks_stored"] += len(puts)
            self._counters["tasks_stored"] += sum(put.n_tasks for _, put in puts)
            if not self._confirms:
                self._confirm_due = time.monotonic() + _CONFIRM_DELAY
            for (ident, put), chunk_id in zip(puts, ids):
                self._confirms[(ident, put.seq)] = chunk_id
        else:
            for ident, put in puts:
                self._send(ident, p.Confirm(put.seq, 0, status, detail))

    def _send_confirms(self) -> None:
        for (ident, seq), chunk_id in self._confirms.items():
            self._send(ident, p.Confirm(seq, chunk_id, p.Status.STORED))
        self._confirms.clear()
        self._confirm_due = math.inf

    def _leased_meta(self, ident: bytes, chunk_id: int, what: str) -> ChunkMeta | None:
        meta = self._early.get(chunk_id) or self._storage.meta(chunk_id)
        if self._lease_owner.get(chunk_id) != ident or meta is None:
            self._bad(ident, ProtocolError(f"{what} of chunk {chunk_id} that is not leased to this peer"))
            return None
        return meta

    def _dead(self, ident: bytes, msg: p.Dead) -> None:
        meta = self._leased_meta(ident, msg.chunk_id, "DEAD")
        if meta is None:
            return
        # seq 0: if the dead letter is requeued, its result goes to the pool's driver as a new one.
        reason = msg.reason.decode(errors="replace")
        try:
            self._storage.put_dead([(ChunkMeta(meta.owner, 0, 1), msg.chunk, reason)])
            self._counters["tasks_dead_lettered"] += 1
        except StorageError as e:
            logger.error("broker %s could not store a dead letter: %s", self.name, e)

    def _split(self, ident: bytes, msg: p.Split) -> None:
        meta = self._leased_meta(ident, msg.chunk_id, "SPLIT")
        if meta is None or msg.chunk_id in self._early or len(msg.parts) != meta.n_tasks:
            if meta is not None:
                self._bad(ident, ProtocolError(f"SPLIT of chunk {msg.chunk_id} into {len(msg.parts)} parts"))
            return
        try:
            self._storage.split(msg.chunk_id, [(ChunkMeta(meta.owner, meta.seq, 1), part) for part in msg.parts])
        except StorageError as e:
            logger.error("broker %s could not split chunk %d: %s", self.name, msg.chunk_id, e)
            return
        self._unlease(msg.chunk_id)
        self._previous_owner.pop(msg.chunk_id, None)
        self._counters["chunks_split"] += 1

    def _early_ack(self, ident: bytes, chunk_id: int) -> None:
        if self._lease_owner.get(chunk_id) != ident:
            self._bad(ident, ProtocolError(f"ACK of chunk {chunk_id} that is not leased to this peer"))
            return
        (meta,) = self._storage.ack_many([chunk_id])
        if meta is not None:
            self._early[chunk_id] = meta

    def _ack(self, dones: list[tuple[bytes, p.Done]], now: float) -> None:
        forget: list[int] = []
        for ident, done in dones:
            chunk_id = done.chunk_id
            if self._lease_owner.get(chunk_id) != ident and self._previous_owner.get(chunk_id) != ident:
                # Only the consumer that holds (or held, before its lease expired) a chunk may
                # report it: an authenticated peer still cannot forge another's results.
                if chunk_id in self._awaiting or self._storage.meta(chunk_id) is None:
                    self._counters["duplicate_dones"] += 1
                else:
                    self._bad(ident, ProtocolError(f"DONE of chunk {chunk_id} that this peer never held"))
                continue
            self._previous_owner.pop(chunk_id, None)
            early = self._early.pop(chunk_id, None)
            self._unlease(chunk_id)
            meta = early or self._storage.meta(chunk_id)
            if meta is None or chunk_id in self._awaiting or self._storage.is_dead(chunk_id):
                self._counters["duplicate_dones"] += 1
                continue
            if not self._storage.is_leased(chunk_id) and early is None:
                self._storage.take_back(chunk_id)  # a late DONE of a chunk whose lease expired
            self._counters["chunks_acked"] += 1
            self._counters["tasks_acked"] += meta.n_tasks
            driver = self._route(meta, chunk_id, ident, done.results, done.n_tasks)
            if driver is None or early is not None:
                forget.append(chunk_id)
            else:
                self._awaiting[chunk_id] = (driver, now)
        if forget:
            self._forget(forget)

    def _forget(self, chunk_ids: list[int]) -> None:
        """The results of these chunks are safe with a driver: remove the chunks for good."""
        for chunk_id in chunk_ids:
            self._awaiting.pop(chunk_id, None)
            self._previous_owner.pop(chunk_id, None)
        self._storage.ack_many(chunk_ids)

    def _route(self, meta: ChunkMeta, chunk_id: int, consumer: bytes, results: object, n_tasks: int) -> bytes | None:
        """Send a chunk's results to its driver (or, if it is gone, the pool's newest one)."""
        consumer_id = consumer[: p.ID_SIZE].ljust(p.ID_SIZE, b"\0")
        if meta.owner in self._drivers and self._send(meta.owner, p.Results(meta.seq, chunk_id, consumer_id, results)):
            self._routed[meta.owner] = self._routed.get(meta.owner, 0) + n_tasks
            self._confirms.pop((meta.owner, meta.seq), None)  # these RESULTS confirm the chunk
            return meta.owner
        # The submitter is gone (a restarted driver, a recovered durable queue): hand the results
        # to the pool's most recently seen driver, marked foreign by seq 0.
        for driver in sorted(self._drivers, key=self._drivers.__getitem__, reverse=True):
            if driver != meta.owner and self._send(driver, p.Results(0, chunk_id, consumer_id, results)):
                self._counters["orphan_results"] += 1
                self._routed[driver] = self._routed.get(driver, 0) + n_tasks
                return driver
            self._drivers.pop(driver, None)
        self._counters["dropped_results"] += 1
        return None

    def _unlease(self, chunk_id: int) -> None:
        owner = self._lease_owner.pop(chunk_id, None)
        if owner is not None and owner in self._consumers:
            self._consumers[owner].leases.discard(chunk_id)

    def _dispatch(self) -> None:
        while self._with_credit:
            ident = self._with_credit[0]
            consumer = self._consumers.get(ident)
            if consumer is None or consumer.credit <= 0:
                self._with_credit.popleft()
                continue
            leased = self._storage.lease()
            if leased is None:
                return
            if not self._send(ident, p.Deliver(leased.chunk_id, leased.meta.n_tasks, leased.attempt, leased.payload)):
                self._storage.release(leased.chunk_id, count_attempt=False)
                self._drop_consumer(ident)
                continue
            if leased.attempt > 1:
                self._counters["chunks_redelivered"] += 1
            consumer.credit -= 1
            consumer.leases.add(leased.chunk_id)
            self._lease_owner[leased.chunk_id] = ident
            self._with_credit.popleft()
            if consumer.credit > 0:
                self._with_credit.append(ident)

    def _drop_consumer(self, ident: bytes) -> None:
        consumer = self._consumers.pop(ident, None)
        if consumer is None:
            return
        for chunk_id in sorted(consumer.leases, reverse=True):
            self._lease_owner.pop(chunk_id, None)
            meta = self._early.pop(chunk_id, None)
            if meta is not None:  # acknowledged early: at most once, so it is not run again
                self._send(meta.owner, p.Lost(meta.seq, chunk_id))
            else:
                self._storage.release(chunk_id)
                self._previous_owner[chunk_id] = ident
        if consumer.leases:
            logger.info(
                "broker %s: consumer %s left, %d leased chunks return to the queue",
                self.name,
                consumer.name.decode(errors="replace") or ident.hex(),
                len(consumer.leases),
            )

    def _housekeeping(self, now: float) -> None:
        deadline = now - self._settings.heartbeat_timeout
        for ident in [i for i, c in self._consumers.items() if c.last_seen < deadline]:
            logger.warning("broker %s: consumer %s missed its heartbeats", self.name, ident.hex())
            self._drop_consumer(ident)
        for ident in [i for i, seen in self._drivers.items() if seen < deadline]:
            del self._drivers[ident]
        # Results sent to a driver that has since vanished cannot be confirmed: forget those chunks
        # (their results are lost with that driver; the tasks did run).
        stale = [c for c, (d, sent) in self._awaiting.items() if d not in self._drivers and sent < deadline]
        if stale:
            self._forget(stale)
        for ident in list(self._consumers) + list(self._drivers):
            self._send(ident, p.Heartbeat())
        self._dispatch()
        self._storage.flush_marks()

    def _farewell(self) -> None:
        self._send_confirms()
        for ident in list(self._consumers) + list(self._drivers):
            try:
                self._send(ident, p.Bye())
            except zmq.ZMQError:
                break


class Broker:
    """Dask actor that runs one queue on the worker it is placed on.

    Parameters
    ----------
    name : str
        Queue name, shown in reprs and statistics.
    settings : PoolSettings
        The pool's resolved settings.
    dirpath : str, optional
        Queue directory of a durable queue; ``None`` for a transient (in-memory) queue.
    keys : ServerKeys, optional
        The pool's CURVE server keys; ``None`` runs the socket unauthenticated.
    """

    def __init__(
        self, name: str, settings: PoolSettings, dirpath: str | None = None, keys: ServerKeys | None = None
    ) -> None:
        self.name = name
        self._settings = settings
        self._dirpath = dirpath
        self._keys = keys
        self._auth: Admission | None = None
        self._core: BrokerCore | None = None
        self.endpoint = ""

    def start(self) -> str:
        """Open storage, bind on this worker's host and start the loop; return the endpoint."""
        if self._core is not None:
            return self.endpoint
        host = worker_host(worker_address(), self._settings.default_host)
        storage = self._open_storage()
        ctx = process_context()
        try:
            sock, self.endpoint, self._auth = bind_router(
                ctx, host, max_message_size=self._settings.max_message_size, keys=self._keys
            )
        except Exception:
            storage.close()
            raise
        try:
            serve_locally(sock, self.endpoint)
        except Exception:
            close_socket(sock)
            if self._auth is not None:
                self._auth.stop()
            storage.close()
            raise
        self._core = BrokerCore(self.name, sock, storage, self._settings, liveness_probe(self))
        self._core.start()
        logger.info("broker %s serving on %s (pid %d)", self.name, self.endpoint, os.getpid())
        return self.endpoint

    def _open_storage(self) -> Storage:
        if self._dirpath is None:
            storage: Storage = MemoryStorage()
        else:
            from zdq.storage.lmdb import LMDBStorage

            storage = LMDBStorage(self._dirpath, map_size=self._settings.map_size, sync=self._settings.durable_sync)
        storage.open()
        return storage

    def stop(self) -> None:
        """Stop serving and release the socket and the storage. Idempotent."""
        if self.endpoint:
            stop_serving_locally(self.endpoint)
        if self._core is not None:
            self._core.stop()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def pid(self) -> int:
        return os.getpid()

    def payload_key(self, proposed: bytes | None) -> bytes | None:
        """The queue's payload key: the one it stored (durable), else ``proposed`` (kept if durable)."""
        core = self._running_core()
        with core._lock:
            return core._storage.setting(b"payload-key", proposed)

    def _running_core(self) -> BrokerCore:
        if self._core is None:
            raise ClosedError(f"broker {self.name} is not started")
        if self._core._error is not None:
            raise ZdqError(f"broker {self.name} loop failed: {self._core._error!r}") from self._core._error
        return self._core

    def statistics(self) -> BrokerStats:
        return self._running_core().statistics(self.endpoint)

    def dead_letters(self) -> list[DeadLetter]:
        return self._running_core().dead_letters()

    def requeue_dead(self, chunk_ids: list[int] | None = None) -> int:
        return self._running_core().requeue_dead(chunk_ids)

    def purge_dead(self, chunk_ids: list[int] | None = None) -> int:
        return self._running_core().purge_dead(chunk_ids)
