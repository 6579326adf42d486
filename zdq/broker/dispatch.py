"""Chunks out: ready chunks to the consumers that gave credit, and READY to those that did not.

A consumer gets at most the credit it gave (:class:`~zdq.broker.peers.PeerTable` counts it), one
chunk per credit, in the order consumers gave it (a consumer in the broker's own process first). A
chunk's tasks cancelled while it waited are announced just before it (one pipe keeps the order),
so the consumer skips them. A chunk whose expiry passed is not sent: ``expired`` takes it (see
:mod:`zdq.broker.expiry`), and the credit goes to the next. When work waits and no consumer has credit here, those without are
told READY, at most every ``READY_EVERY``: a consumer spreads a bounded prefetch over several
queues, and may have parked it elsewhere. A chunk a rate limit let go carries its spacing (see
:mod:`zdq.broker.rates`): its consumer starts its tasks that far apart.

Who owns what
-------------
:class:`Dispatch` owns when consumers were last told READY (``ready_scan``) and is called only by
the broker's loop thread. It spends the credit in the peer table and leases through the lease
table; it counts ``chunks_redelivered`` and no other counter.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from zdq.broker.counters import BrokerCounters
from zdq.broker.leases import LeaseTable
from zdq.broker.peers import Peer, PeerTable, Send
from zdq.broker.rates import RateLimits
from zdq.storage.base import ChunkMeta
from zdq.transport import protocol as p


__all__ = ["READY_EVERY", "Dispatch"]

#: A consumer without credit is told READY at most this often while chunks wait for it.
READY_EVERY = 0.1


class Dispatch:
    """Leases ready chunks to consumers with credit (see the module docstring).

    Parameters
    ----------
    leases : LeaseTable
        The queue's chunks.
    peers : PeerTable
        The consumers and their credit.
    send : Send
        Sends a message to a peer; False if it cannot take it (the consumer is then taken for
        gone: its chunk goes back at once, without using an attempt).
    counters : BrokerCounters
        Where redeliveries are counted.
    gone : Callable[[bytes, Peer], None]
        Called with a consumer removed from the peers because it could not be reached: its
        leases expire.
    rates : RateLimits, optional
        The queue's rate limits (default: none yet): when any is active, they choose the chunk
        that goes (and may park chunks of a key that must wait, see :mod:`zdq.broker.rates`).
    expired : Callable[[int, float], None], optional
        Called with a chunk just leased (not sent) whose expiry passed, and the loop's time.
    """

    def __init__(
        self,
        leases: LeaseTable,
        peers: PeerTable,
        send: Send,
        counters: BrokerCounters,
        gone: Callable[[bytes, Peer], None],
        rates: RateLimits | None = None,
        *,
        expired: Callable[[int, float], None] | None = None,
    ) -> None:
        self._leases = leases
        self._storage = leases.storage
        self._ready = leases.storage.ready_order  # its count (n), read as an attribute each run
        self._peers = peers
        self._send = send
        self._counters = counters
        self._gone = gone
        self._rates = RateLimits(leases.storage) if rates is None else rates
        self._expired = expired
        self.ready_scan = 0.0  # when consumers without credit were last looked at

    def rescan(self) -> None:
        """Work arrived outside the rounds (released, purged): tell consumers READY at once."""
        self.ready_scan = 0.0

    def release_due(self, now: float) -> None:
        """Delayed chunks whose time has come join the ready FIFO of their priority, and go at
        once to consumers with credit (those without are told READY now, not at the next scan)."""
        if self._storage.release_due(time.time()):
            self.ready_scan = 0.0
            self.run(now)

    def put_and_deliver(self, owner: bytes, put: p.Put, now: float) -> int | None:
        """A new chunk (``owner``'s ``put``) stored and handed out in one pass, when it would be
        the next chunk out: :meth:`run` finds no chunk ready, no rate limit active, a consumer with
        credit first in turn, and the chunk plain (not delayed, no expiry, no per-call limit).
        It is then stored and leased as :meth:`LeaseTable.put` and :meth:`LeaseTable.lease` would
        (its first attempt; no task of it can be cancelled yet) without passing through the ready
        queue, and DELIVERed. Return its id once stored, or None if it does not qualify (nothing
        stored: the caller stores it the usual way). Raises as :meth:`LeaseTable.put` (nothing
        stored). A lone task's PUT takes this path (issue 26, point 4)."""
        if self._rates.active or self._ready.n or put.not_before or put.expires or put.rate_key:
            return None
        with_credit = self._peers.with_credit
        if not with_credit:
            return None
        ident = with_credit[0]
        consumer = self._peers.by_ident.get(ident)
        if consumer is None or consumer.credit <= 0:
            return None  # run skips it; the usual path does
        # A Put's fields after its chunk are a ChunkMeta's after owner, seq and n_tasks, in order.
        meta = ChunkMeta(owner, put.seq, put.n_tasks, *put[3:])
        chunk_id, payload = self._leases.put_leased(meta, put.chunk, ident, now, consumer.local)
        if not self._send(ident, p.Deliver(chunk_id, meta.n_tasks, 1, payload)):
            # Stored: it waits at the head of the queue, and this consumer is gone (as in run).
            self._leases.give_back(chunk_id, count_attempt=False)
            del self._peers.by_ident[ident]
            self._gone(ident, consumer)
            return chunk_id
        consumer.credit -= 1
        with_credit.popleft()
        if consumer.credit > 0:
            with_credit.append(ident)
        return chunk_id

    def run(self, now: float) -> None:
        """Hand out every chunk that credit (and the rate limits) allow; tell READY to consumers
        without credit."""
        leases, storage, send, rates = self._leases, self._storage, self._send, self._rates
        by_ident, with_credit = self._peers.by_ident, self._peers.with_credit
        limited = rates.active  # the one test a queue without limits pays, per round
        if limited:
            rates.wake_at = math.inf  # set again by a bucket that holds work back
        elif not self._ready.n:
            # Nothing to hand out and none to tell READY (the round of a lone task's DONE, whose
            # credit finds the queue empty): no lease is tried.
            return
        while with_credit:
            ident = with_credit[0]
            consumer = by_ident.get(ident)
            if consumer is None or consumer.credit <= 0:
                with_credit.popleft()
                continue
            local = consumer.local  # it dies with this broker: a durable queue counts its lease then
            leased = rates.lease(leases, ident, now, local) if limited else leases.lease(ident, now, None, local)
            if leased is None:
                return
            meta, chunk_id = leased.meta, leased.chunk_id
            if meta.expires and meta.expires <= time.time() and self._expired is not None:
                self._expired(chunk_id, now)  # never delivered; this credit goes to the next
                continue
            spacing = rates.spacing if limited else 0.0  # a limited chunk's tasks start spaced
            if meta.rate_key and not limited:  # the first chunk under a per-call limit
                rates.first_keyed(meta.rate_key, meta.rate, chunk_id, meta.n_tasks, now)
                limited, spacing = rates.active, rates.spacing
            cancelled = storage.cancelled(chunk_id)
            if cancelled:  # told first (one pipe keeps order): the consumer skips these tasks
                send(ident, p.Cancel(0, chunk_id, 0, tuple(sorted(cancelled))))
            if leases.failed and chunk_id in leases.failed:  # so is what its tasks' retries used
                send(ident, p.Retried(chunk_id, tuple(leases.failed[chunk_id].items())))
            if not send(ident, p.Deliver(chunk_id, meta.n_tasks, leased.attempt, leased.payload, spacing)):
                leases.give_back(chunk_id, count_attempt=False)
                del by_ident[ident]
                self._gone(ident, consumer)
                continue
            if leased.attempt > 1:
                self._counters.chunks_redelivered += 1
            consumer.credit -= 1
            with_credit.popleft()
            if consumer.credit > 0:
                with_credit.append(ident)
        if now - self.ready_scan >= READY_EVERY and self._ready.n:
            # Work waits and no consumer has credit here: tell those that could ask.
            self.ready_scan = now
            for ident in self._peers.to_notify(now, READY_EVERY):
                send(ident, p.Ready())
