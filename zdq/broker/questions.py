"""A driver's CANCEL, answered: which of its tasks will never run (and ``zdq purge``).

Tasks of a chunk still in the queue are marked cancelled in storage (a consumer skips them when
the chunk is delivered). A leased chunk's consumer is asked, for it alone knows which tasks have
started; the broker answers the driver once every consumer asked has answered, or left, or let its
heartbeat timeout pass (what it holds then counts as started). A chunk whose consumer died or
reconnected holding it (or that a broker before this one had handed out) may have started, in
storage's words: none of its tasks is cancelled, whoever holds it now; they run again (at least
once).

Who owns what
-------------
:class:`CancelQuestions` owns the questions passed on to consumers (``asked``, by the token each
was given) and the token counter, and is called only by the broker's loop thread. It reads the
peers and the lease table, and writes cancellations (and the removal of a chunk cancelled whole)
to storage.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping

from zdq.broker.leases import LeaseTable
from zdq.broker.peers import Peer, Send
from zdq.broker.retained import CANCELLED_BY, CANCELLED_RESULTS
from zdq.errors import ProtocolError, StorageError
from zdq.transport import protocol as p

__all__ = ["CancelQuestions", "Question"]

logger = logging.getLogger(__name__)


class Question:
    """A driver's CANCEL being answered: the tasks found cancelled so far, and how many consumers
    holding some of them have still to answer."""

    __slots__ = ("cancelled", "driver", "token", "waiting")

    def __init__(self, driver: bytes, token: int) -> None:
        self.driver = driver
        self.token = token  # the driver's number for it; 0: no answer wanted
        self.cancelled: set[int] = set()
        self.waiting = 0


class CancelQuestions:
    """The CANCELs of drivers, and the questions they raise to consumers (see the module docstring).

    Parameters
    ----------
    name : str
        The queue's name, for the logs.
    leases : LeaseTable
        The broker's chunks (and, through it, its storage).
    peers : Mapping[bytes, Peer]
        The broker's peers: a consumer no longer among them is not asked.
    send : Send
        Sends a message to a peer.
    timeout : float
        How long a consumer asked has to answer (the heartbeat timeout).
    """

    def __init__(
        self, name: str, leases: LeaseTable, peers: Mapping[bytes, Peer], send: Send, *, timeout: float
    ) -> None:
        self._name = name
        self._leases = leases
        self._storage = leases.storage
        self._peers = peers
        self._send = send
        self._timeout = timeout
        #: Questions passed on to consumers, by token: (the driver's question, the consumer, chunk
        #: id, chunk index -> driver index, deadline).
        self.asked: dict[int, tuple[Question, bytes, int, dict[int, int], float]] = {}
        self._tokens = itertools.count(1)

    def ask(self, driver: bytes, msg: p.Cancel, now: float) -> None:
        """A driver cancels tasks of one of its chunks; it is answered once all is known."""
        question = Question(driver, msg.token)
        leases, storage = self._leases, self._storage
        for chunk_id, indexes in leases.locate(driver, msg.seq, msg.chunk_id, msg.indexes).items():
            if storage.may_have_started(chunk_id):
                # A consumer died (or a broker before this one) holding it: any of its tasks may
                # have started there, whoever holds it now. None counts as cancelled; it runs again.
                continue
            held = leases.get(chunk_id)
            if held is None:
                if storage.is_ready(chunk_id):
                    try:
                        storage.cancel(chunk_id, indexes)
                    except StorageError as e:
                        logger.error("broker %s could not write a cancellation: %s", self._name, e)
                        continue
                    question.cancelled.update(indexes.values())
                    meta = storage.meta(chunk_id)
                    cancelled = storage.cancelled(chunk_id)
                    if meta is not None and len(cancelled) >= meta.n_tasks:
                        # Nothing of it would run: it leaves now, and its driver is told every task
                        # of it, not only those it asked: a purge (``zdq purge``) marked the others,
                        # and no DONE will settle them once it has left (reviewer 13: their futures
                        # waited for ever). A split part is one task, the one asked.
                        question.cancelled.update(indexes.get(k, k) for k in cancelled)
                        storage.ack_many([chunk_id])
                        if leases.retained is not None:  # zdq.state: "cancelled" for result_ttl
                            leases.retained.keep(chunk_id, meta, CANCELLED_BY, CANCELLED_RESULTS)
            elif not held.done and held.holder is not None and held.holder in self._peers:
                token = next(self._tokens)
                self.asked[token] = (question, held.holder, chunk_id, indexes, now + self._timeout)
                question.waiting += 1
                self._send(held.holder, p.Cancel(token, chunk_id, 0, tuple(indexes)))
        if not question.waiting:
            self._answer(question)

    def purge_ready(self) -> int:
        """Cancel every task of every chunk not yet delivered, ready or delayed (``zdq purge``);
        return how many were cancelled.

        The chunks are not deleted: their drivers wait for their futures. Delayed ones are made
        ready at once. A consumer that gets one skips its cancelled tasks (as for
        ``future.cancel()``) and reports them ``TaskCancelled``, so every future settles and every
        count and receipt stays as for any task.
        """
        n = 0
        storage = self._storage
        for chunk_id in storage.waiting_ids():
            meta = storage.meta(chunk_id)
            if meta is None:
                continue
            before = len(storage.cancelled(chunk_id))
            if storage.cancel(chunk_id, range(meta.n_tasks)):
                n += meta.n_tasks - before
                # Nothing of it will run: its futures need not wait for its release time.
                storage.release_now(chunk_id)
        storage.commit(force=True)
        return n

    def answered(self, consumer: bytes, msg: p.Cancelled) -> None:
        """A consumer's CANCELLED.

        Raises
        ------
        ProtocolError
            If the question was asked of another consumer (a late answer is ignored).
        """
        asked = self.asked.get(msg.token)
        if asked is None:
            return  # late: its question was answered without it
        if asked[1] != consumer:
            raise ProtocolError(f"CANCELLED {msg.token} from a consumer that was not asked")
        del self.asked[msg.token]
        question, _, chunk_id, indexes, _ = asked
        mine = [i for i in msg.indexes if i in indexes]
        if mine:
            held = self._leases.get(chunk_id)
            if held is not None and not held.done and not held.early:
                try:  # stored with the chunk: should it be delivered again, they are still skipped
                    self._storage.cancel(chunk_id, mine)
                except StorageError as e:
                    logger.error("broker %s could not write a cancellation: %s", self._name, e)
            question.cancelled.update(indexes[i] for i in mine)
        self._one_less(question)

    def consumer_left(self, consumer: bytes) -> None:
        """``consumer`` is gone: it will not answer; what it holds counts as started."""
        if self.asked:
            self._drop(lambda holder, deadline: holder == consumer)

    def expire(self, now: float) -> None:
        """Stop waiting for consumers past their timeout."""
        if self.asked:
            self._drop(lambda holder, deadline: deadline <= now)

    def _drop(self, dropped: Callable[[bytes, float], bool]) -> None:
        for token, (question, holder, _, _, deadline) in list(self.asked.items()):
            if dropped(holder, deadline):
                del self.asked[token]
                self._one_less(question)

    def _one_less(self, question: Question) -> None:
        question.waiting -= 1
        if not question.waiting:
            self._answer(question)

    def _answer(self, question: Question) -> None:
        if question.token:
            self._send(question.driver, p.Cancelled(question.token, tuple(sorted(question.cancelled))))
