"""Chunks in: a round's PUTs stored in one transaction, unique keys admitted, CONFIRMs held back.

The broker's loop gathers a round's PUTs (:class:`~zdq.broker.core.BrokerCore`) and hands them
here once the socket is drained. :meth:`Intake.store` writes them in one storage transaction (a
group commit on a durable queue; when it does not fit, by halves, refusing only what cannot be
held), after :class:`~zdq.broker.unique.UniqueKeys` has answered those whose unique key is held.
A round's lone PUT on a transient queue may instead be stored and delivered in one pass
(:meth:`Intake.deliver_lone`). Each stored chunk's CONFIRM is held back (``CONFIRM_DELAY``, or
until ``CONFIRM_BATCH`` are held): RESULTS that reach the chunk's driver first confirm it, and the
CONFIRM never goes (:meth:`Intake.confirmed`); the loop sends the rest, one message per driver
(:meth:`Intake.send_confirms`).

Who owns what
-------------
:class:`Intake` owns the held-back CONFIRMs (``confirms``, ``confirm_due``: the loop reads both
to time its poll) and the unique keys (``unique``: made when the queue holds or receives a
unique chunk; the core tells it when a holder ends, is lost or expires). It is called only by the
broker's loop thread, under the broker's lock. It writes the counters ``chunks_stored``,
``tasks_stored`` (a schedule's ticks too, told by the core: :meth:`Intake.ticked`) and
``tasks_unique_duplicates``, and no other.
"""

from __future__ import annotations

import logging
import math
import time
from zdq.broker.counters import BrokerCounters
from zdq.broker.dispatch import Dispatch
from zdq.broker.expiry import ExpiryWatch
from zdq.broker.leases import LeaseTable
from zdq.broker.peers import Send
from zdq.broker.unique import UniqueKeys, stored_unique
from zdq.errors import StorageError, StorageFull
from zdq.storage.base import ChunkMeta, Storage
from zdq.transport import protocol as p

__all__ = ["Intake", "CONFIRM_DELAY", "CONFIRM_BATCH"]

logger = logging.getLogger(__name__)

#: A CONFIRM is held back this long (or until this many are held): if the chunk's results are sent
#: first, RESULTS confirms it and the CONFIRM is never sent. On a single-task round trip that saves
#: a message, two socket-thread wake-ups and a driver wake-up per task; when chunks pour in, the
#: batch limit releases confirms long before a driver's window (16 by default) fills.
CONFIRM_DELAY = 0.002
CONFIRM_BATCH = 8


class Intake:
    """A broker's chunks in (see the module docstring).

    Parameters
    ----------
    name : str
        The queue's name, for the log.
    storage : Storage
        The broker's backend (unique keys are rebuilt from its chunks).
    leases : LeaseTable
        Stores the chunks (:meth:`~zdq.broker.leases.LeaseTable.put`).
    dispatch : Dispatch
        Stores and delivers a lone chunk in one pass.
    send : Send
        Sends a message to a peer (CONFIRMs, a unique key's answers).
    expiry : ExpiryWatch
        Told each stored chunk that carries an expiry.
    counters : BrokerCounters
        Where stored chunks and tasks, and unique duplicates, are counted.
    heartbeat_timeout : float
        The pool's: a unique key's followers wait as long as results wait for a silent driver.
    """

    def __init__(
        self,
        name: str,
        storage: Storage,
        leases: LeaseTable,
        dispatch: Dispatch,
        send: Send,
        expiry: ExpiryWatch,
        counters: BrokerCounters,
        heartbeat_timeout: float,
    ) -> None:
        self.name = name
        self._storage = storage
        self._leases = leases
        self._dispatch = dispatch
        self._send = send
        self._expiry = expiry
        self._counters = counters
        self._heartbeat_timeout = heartbeat_timeout
        #: CONFIRMs held back, by (driver, seq): the chunk id to confirm.
        self.confirms: dict[tuple[bytes, int], int] = {}
        #: When the first of them was held plus CONFIRM_DELAY (inf when none is).
        self.confirm_due = math.inf
        #: Unique keys (see zdq.broker.unique): made when a queue holds or receives a unique chunk.
        self.unique: UniqueKeys | None = None
        if any(True for _ in stored_unique(storage)):
            self.unique = self._unique_keys()

    def store(self, puts: list[tuple[bytes, p.Put]], unique: bool = False) -> None:
        """The round's PUTs (``unique``: some carry a unique key) stored in one transaction, their
        CONFIRMs held back; those that cannot be stored are refused (FULL or ERROR), each driver
        told why."""
        same_round: list[tuple[bytes, p.Put, int]] = []
        if unique:  # some carry a unique key: those whose key is held are answered, not stored
            keys = self.unique = self.unique or self._unique_keys()
            n = len(puts)
            puts, same_round = keys.admit(puts, time.time())
            self._counters.tasks_unique_duplicates += n - len(puts) - len(same_round)
            if not puts:
                return
        # A Put's fields after its chunk are a ChunkMeta's after owner, seq and n_tasks, in order.
        if len(puts) == 1:  # a lone chunk (the single task's round trip): no comprehension
            ident, put = puts[0]
            entries = [(ChunkMeta(ident, put.seq, put.n_tasks, *put[3:]), put.chunk)]
        else:
            entries = [(ChunkMeta(ident, put.seq, put.n_tasks, *put[3:]), put.chunk) for ident, put in puts]
        try:
            self._stored(puts, self._leases.put(entries), same_round, unique)
            return
        except StorageFull as e:
            logger.warning("broker %s storage is full: %s", self.name, e)
            if len(puts) > 1 and not same_round:
                # One transaction for the round did not fit: store what fits, chunk runs by halves
                # (each failed put stores nothing), and refuse only the rest. A durable driver's
                # window sends rounds of dozens of chunks; a full disk fails those it cannot hold.
                for part, outcome in self._put_halves(puts, entries):
                    if isinstance(outcome, list):
                        self._stored(part, outcome, [], unique)
                    else:
                        status = p.Status.FULL if isinstance(outcome, StorageFull) else p.Status.ERROR
                        self._refused(part, [], status, str(outcome).encode()[:1024])
                return
            self._refused(puts, same_round, p.Status.FULL, str(e).encode()[:1024])
        except StorageError as e:
            logger.error("broker %s could not store %d chunks: %s", self.name, len(puts), e)
            self._refused(puts, same_round, p.Status.ERROR, str(e).encode()[:1024])

    def deliver_lone(self, puts: list[tuple[bytes, p.Put]], now: float) -> bool:
        """The round's one PUT stored and handed to the consumer whose turn it is, in one pass,
        if it would be the next chunk out (see :meth:`~zdq.broker.dispatch.Dispatch.put_and_deliver`);
        its CONFIRM is held back as any other's (the chunk is stored). False: it was not stored
        (the usual path stores it, or refuses it and says why)."""
        ident, put = puts[0]
        try:
            chunk_id = self._dispatch.put_and_deliver(ident, put, now)
        except StorageError:
            return False
        if chunk_id is None:
            return False
        self._stored(puts, [chunk_id], [], False)  # the bookkeeping after the DELIVER
        return True

    def _put_halves(
        self, puts: list[tuple[bytes, p.Put]], entries: list[tuple[ChunkMeta, object]]
    ) -> list[tuple[list[tuple[bytes, p.Put]], list[int] | StorageError]]:
        """``entries`` (``puts``', more than one), whose one transaction was refused as full,
        stored by halves, in order, each half whole or by halves again: each run stored with its
        ids, or with the error that refused it (a single chunk that does not fit, or any other
        storage error)."""
        half = len(puts) // 2
        out: list[tuple[list[tuple[bytes, p.Put]], list[int] | StorageError]] = []
        for part, part_entries in ((puts[:half], entries[:half]), (puts[half:], entries[half:])):
            try:
                out.append((part, self._leases.put(part_entries)))
            except StorageFull as e:
                out += self._put_halves(part, part_entries) if len(part) > 1 else [(part, e)]
            except StorageError as e:
                out.append((part, e))
        return out

    def _stored(
        self, puts: list[tuple[bytes, p.Put]], ids: list[int], same_round: list[tuple[bytes, p.Put, int]], unique: bool
    ) -> None:
        """``puts`` stored as chunks ``ids``: confirmed with the round's commit."""
        counters, confirms = self._counters, self.confirms
        counters.chunks_stored += len(puts)
        if not confirms:
            self.confirm_due = time.monotonic() + CONFIRM_DELAY
        n_tasks = 0
        for (ident, put), chunk_id in zip(puts, ids):
            confirms[(ident, put.seq)] = chunk_id
            n_tasks += put.n_tasks
            if put.expires:
                self._expiry.add(chunk_id, put.expires)
        counters.tasks_stored += n_tasks
        if unique:
            self.unique.stored(puts, ids, same_round, time.time())  # type: ignore[union-attr]
            self._counters.tasks_unique_duplicates += len(same_round)

    def ticked(self, n: int) -> None:
        """``n`` schedule ticks were put in the queue (one task each, by its schedule table): they
        count as stored, as what drivers put does, so that submitted and completed agree (each
        tick's completion is counted)."""
        self._counters.chunks_stored += n
        self._counters.tasks_stored += n

    def _refused(
        self, puts: list[tuple[bytes, p.Put]], same_round: list[tuple[bytes, p.Put, int]], status: p.Status, detail: bytes
    ) -> None:
        """``puts`` not stored: each driver is told why (``status``: FULL or ERROR)."""
        if same_round:
            self.unique.refused(same_round, status, detail)  # type: ignore[union-attr]
        for ident, put in puts:
            self._send(ident, p.Confirm(put.seq, 0, status, detail))

    def send_confirms(self) -> None:
        # The chunks were committed in their round (group commit): confirming them now is safe.
        # One message per driver: a CONFIRMS for several (one send here, one receive, decode and
        # wake of its submitter there, instead of one per chunk), a plain CONFIRM for one.
        by_driver: dict[bytes, tuple[list[int], list[int]]] = {}
        for (ident, seq), chunk_id in self.confirms.items():
            seqs, ids = by_driver.setdefault(ident, ([], []))
            seqs.append(seq)
            ids.append(chunk_id)
        for ident, (seqs, ids) in by_driver.items():
            if len(seqs) == 1:
                self._send(ident, p.Confirm(seqs[0], ids[0], p.Status.STORED))
                continue
            for i in range(0, len(seqs), p.MAX_SPLIT):  # a driver's window may exceed what one decodes
                self._send(ident, p.Confirms(tuple(seqs[i : i + p.MAX_SPLIT]), tuple(ids[i : i + p.MAX_SPLIT])))
        self.confirms.clear()
        self.confirm_due = math.inf

    def _unique_keys(self) -> UniqueKeys:
        keep_for = max(60.0, 4 * self._heartbeat_timeout)  # as long as results wait for a silent driver
        keys = UniqueKeys(stored_unique(self._storage), self._send, keep_for)
        if self._leases.retained is not None:  # a follower's id finds its holder's kept results
            keys.on_release = self._leases.retained.alias
        return keys

    def confirmed(self, driver: bytes, seq: int) -> None:
        """RESULTS went to the chunk's driver: they confirm it, its CONFIRM need not go."""
        if self.confirms:
            self.confirms.pop((driver, seq), None)
