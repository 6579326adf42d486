"""The driver's table of pending requests: questions sent to brokers, keyed by their token.

Every request another thread makes of the I/O thread arrives as a command with a
:class:`concurrent.futures.Future` (see :mod:`.loop`). Those a broker must answer (a count, a
cancellation) park their future here under the token of the question sent; the recovery and
reroute questions park what they will do with the answer. One table, one lookup by token: an
answer finds its question, a broker lost drops its questions (a cancel counts as "nothing
cancelled"), a count past its deadline settles with what came, and a loop that ends settles every
future still here.

Who owns what
-------------
=====================================  ==========================================================
state                                  owner
=====================================  ==========================================================
``pending``, ``heard_waits``, tokens   the I/O thread alone
``last_counts``                        written by the I/O thread (one slot replaced whole per
                                       answer); other threads copy the list
the futures parked here                settled by the I/O thread; waited on by their callers
=====================================  ==========================================================
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Union

from zdq.errors import ClosedError, ProtocolError, TaskLost
from zdq.transport import protocol as p
from zdq.transport.sockets import BrokerLinks, try_send

from .ledger import Ledger
from .links import Link, Links, LinkState
from .records import Record

__all__ = ["CancelAsk", "HeardWait", "Pending", "RecoverySync", "Requests", "RerouteSync", "StatusAsk"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class StatusAsk:
    """A count asked of every broker not down (one token for all); done when every broker up has
    answered (``only``: when that one has, or is not up), or at ``deadline``.

    ``replies`` has a slot per broker, each written once, whole, by the I/O thread: a caller that
    stops waiting at its deadline copies the list as it is (what came in time)."""

    replies: list[p.QueueStatus | None]
    only: int | None
    deadline: float
    future: Future[list[p.QueueStatus | None]] | None = None  # the request's, once the I/O thread has it
    broker: int = -1  # asks every broker: not dropped when one is lost
    consumers: bool = False  # each answer names the consumers its broker hears


@dataclass(eq=False)
class RecoverySync:
    """Which of these confirmed chunks does the broker placed again hold? (the rest is lost)."""

    broker: int


@dataclass(eq=False)
class RerouteSync:
    """Which of the chunks ``asked``, never confirmed over the old path, does the broker hold?"""

    broker: int
    asked: tuple[int, ...]


@dataclass(eq=False)
class CancelAsk:
    """Which of these tasks of ``rec`` have not started? (they never will)."""

    broker: int
    rec: Record
    indexes: tuple[int, ...]
    future: Future[list[int]]


@dataclass(eq=False)
class HeardWait:
    """Until every broker has answered since its link was made, or ``deadline``: why each silent
    one is, by index."""

    deadline: float
    future: Future[dict[int, str]]


Pending = Union[StatusAsk, RecoverySync, RerouteSync, CancelAsk]


class Requests:
    """The questions a driver's I/O thread has asked its brokers and not yet had answered."""

    def __init__(self, ledger: Ledger, links: Links, *, name: str, driver_name: str, queue_names: list[str]) -> None:
        self._ledger = ledger
        self._outcomes = ledger.outcomes
        self._links = links
        self.name = name
        self.driver_name = driver_name
        self._queue_names = queue_names
        self.pending: dict[int, Pending] = {}
        self.heard_waits: list[HeardWait] = []
        self.tokens = itertools.count(1)
        #: Each queue's last answer to a count (a STATUS), and when: reprs show it, never ask.
        self.last_counts: list[tuple[p.QueueStatus, float] | None] = [None] * len(links)

    def ask(self, ask: Pending) -> int:
        """Park a question; return the token to send it with."""
        token = next(self.tokens)
        self.pending[token] = ask
        return token

    # -- answers ---------------------------------------------------------------------------------
    def on_status(self, link: Link, msg: p.QueueStatus) -> None:
        """A broker's counts: the answer to a count, a recovery's or a reroute's question."""
        ask = self.pending.get(msg.token)
        if isinstance(ask, RerouteSync):
            del self.pending[msg.token]
            resolved, again = self._ledger.rerouted(ask.broker, ask.asked, set(msg.missing))
            self._links.resolved(ask.broker, resolved)
            if again:
                logger.info(
                    "%s: %d chunks never reached queue %s over the old path; sent again",
                    self.driver_name, again, self._queue_names[ask.broker],
                )
            return
        self.last_counts[link.index] = (msg, time.monotonic())
        if isinstance(ask, StatusAsk):
            ask.replies[link.index] = msg
            self.check_statuses(time.monotonic())
        elif isinstance(ask, RecoverySync):
            del self.pending[msg.token]
            if msg.missing:
                self._lost_in_recovery(ask.broker, set(msg.missing))
        # otherwise a count that came after its caller stopped waiting: kept in last_counts only

    def on_cancelled(self, link: Link, msg: p.Cancelled) -> None:
        """A broker's answer to a cancellation: the tasks of the chunk that never will run, those
        asked, and when the chunk leaves the queue with it, the others a purge cancelled (no DONE
        will come for them). Indexes outside the chunk are ignored."""
        ask = self.pending.get(msg.token)
        if not isinstance(ask, CancelAsk):
            raise ProtocolError(f"CANCELLED answers no question ({msg.token})")
        del self.pending[msg.token]
        n = ask.rec.n
        ids = self._outcomes.cancel_record(ask.rec, [i for i in msg.indexes if 0 <= i < n])
        ask.future.set_result(ids)

    def ask_status(self, socks: list[Any], ask: StatusAsk, fut: Future[list[p.QueueStatus | None]]) -> None:
        """Ask every broker not down for its counts (one SYNC, one token)."""
        ask.future = fut
        token = next(self.tokens)
        self.pending[token] = ask
        sync = p.encode(p.Sync(token, (), ask.consumers))
        for link in self._links.links:
            if link.state is not LinkState.DOWN:
                try_send(socks[link.index], sync)
        self.check_statuses(time.monotonic())

    def check_statuses(self, now: float) -> None:
        """Settle the counts asked whose every broker up has answered (or whose time is up)."""
        done = []
        links = self._links.links
        for token, ask in self.pending.items():
            if not isinstance(ask, StatusAsk):
                continue
            replies = ask.replies
            if ask.only is None:
                waiting = any(replies[k.index] is None and k.state is LinkState.UP for k in links)
            else:
                waiting = replies[ask.only] is None and links[ask.only].state is LinkState.UP
            if not waiting or now >= ask.deadline:
                done.append(token)
                if ask.future is not None:
                    ask.future.set_result(list(replies))
        for token in done:
            del self.pending[token]

    def ask_cancel(self, socks: list[Any], rec: Record, indexes: tuple[int, ...], fut: Future[list[int]]) -> None:
        """Ask ``rec``'s broker which of these tasks have not started (they never will)."""
        # rec.broker is written by this thread only (under the ledger's lock): read it here freely.
        if rec.broker < 0:  # sent back to the queue meanwhile (its broker was lost): not sent yet
            fut.set_result(self._outcomes.cancel_record(rec, indexes))
            return
        if self._links[rec.broker].state is not LinkState.UP:  # nobody can say what started
            fut.set_result([])
            return
        token = next(self.tokens)
        self.pending[token] = CancelAsk(rec.broker, rec, indexes, fut)
        try_send(socks[rec.broker], p.encode(p.Cancel(token, rec.chunk_id, rec.seq, indexes)))

    def wait_heard(self, bl: BrokerLinks, deadline: float, fut: Future[dict[int, str]]) -> None:
        """Until every broker has answered since its link was made, or ``deadline``."""
        self.heard_waits.append(HeardWait(deadline, fut))
        self.check_heard(bl, time.monotonic())

    def check_heard(self, bl: BrokerLinks, now: float) -> float:
        """Answer the waits for every broker to be heard that can be; return when to look again."""
        silent = self._links.silent()
        keep = []
        for wait in self.heard_waits:
            if not silent or now >= wait.deadline:
                wait.future.set_result({i: bl.why(i) for i in silent} if silent else {})
            else:
                keep.append(wait)
        self.heard_waits = keep
        return min((w.deadline for w in keep), default=math.inf)

    def drop(self, broker: int) -> None:
        """Broker ``broker`` is gone, or its path: questions asked of it will not be answered, and
        their callers need not wait (what it held counts as started)."""
        for token, ask in list(self.pending.items()):
            if ask.broker == broker:
                del self.pending[token]
                if isinstance(ask, CancelAsk):
                    ask.future.set_result([])

    def _lost_in_recovery(self, broker: int, missing: set[int]) -> None:
        """The recovered queue does not hold these chunks: acknowledged early (at most once), their
        results never came, and they are not stored any more."""
        name = self._queue_names[broker]
        followed = self._ledger.follow_again(broker, missing) if self._ledger.following else set()
        if followed:  # unique tasks that followed another chunk: they go to the queue again
            logger.info("%s: %d unique tasks follow their key's chunk in recovered queue %s again", self.driver_name, len(followed), name)
            missing = missing - followed
            if not missing:
                return
        exc = TaskLost(
            f"queue {name} was lost while this task ran; it had been acknowledged on "
            "receipt (early_ack, at most once), so it was not kept to run again"
        )
        n = self._outcomes.fail_confirmed(broker, exc, only=missing)
        if n:
            logger.warning("%s: %d tasks acknowledged early were lost with queue %s", self.driver_name, n, name)

    def end(self) -> None:
        """The thread ends: every request still pending is settled."""
        closed = ClosedError(f"the driver of pool {self.name} has stopped")
        for ask in self.pending.values():
            if isinstance(ask, StatusAsk) and ask.future is not None:
                ask.future.set_exception(closed)
            elif isinstance(ask, CancelAsk):
                ask.future.set_result([])  # nobody can say what started now
        self.pending.clear()
        for wait in self.heard_waits:
            wait.future.set_exception(closed)
        self.heard_waits.clear()
