"""Results to drivers: which driver gets which RESULTS, when they are sent again, receipts, and
the SYNC answers that tell a driver what it still awaits.

Results go to the driver that submitted the chunk. If that driver cannot take them now (it is not
connected, or not yet: a consumer may reach a queue placed again before its driver does), they
wait, and are sent when it speaks. Results whose driver left (BYE) or has been silent for
``orphaned_after``, or that a previous incarnation of a durable queue stored for a driver this one
never met, go to the driver that placed this broker (its *creator*), marked foreign (seq 0).
Results sent to a driver that then fell silent, or that said HELLO again (a new connection drops
what was queued on the old one), are sent again; the driver records each task once. Nothing is
dropped: a chunk leaves the queue only when the driver it was sent to acknowledges its results
(RACK, :meth:`ResultRouting.receipt`). A chunk that expired before it was delivered is done the
same way, and its driver is sent EXPIRED instead of RESULTS (see :mod:`zdq.broker.expiry`).

Who owns what
-------------
:class:`ResultRouting` owns ``waiting`` (done chunks whose results are with no driver) and
``routed`` (tasks whose results went to each driver), and is called only by the broker's loop
thread; control-plane readers take the broker's lock. It reads the peers (the loop's) and the
lease table, whose ``Held.driver`` it sets through ``LeaseTable.sent``. It increments
``counters.orphan_results`` and no other counter.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Mapping

from zdq.broker.counters import BrokerCounters
from zdq.broker.expiry import EXPIRED_RESULTS
from zdq.broker.leases import Held, LeaseTable
from zdq.broker.peers import Peer, Send
from zdq.transport import protocol as p


__all__ = ["ResultRouting"]

logger = logging.getLogger(__name__)


class ResultRouting:
    """Where each done chunk's results go (see the module docstring).

    Parameters
    ----------
    leases : LeaseTable
        The broker's chunks; done ones hold their results.
    peers : Mapping[bytes, Peer]
        The broker's peers, read here: a driver's liveness decides where its results go.
    send : Send
        Sends a message to a peer; False if it cannot take it now.
    creator : bytes
        The driver whose pool placed this broker: it takes the results no other driver will.
    orphaned_after : float
        A driver silent this long is taken for gone: its results go to the creator.
    counters : BrokerCounters
        Where foreign results sent to the creator are counted.
    confirmed : Callable[[bytes, int], None]
        Told ``(driver, seq)`` when RESULTS went to a chunk's own driver: they confirm the chunk,
        so a CONFIRM still held back for it need not be sent.
    """

    def __init__(
        self,
        leases: LeaseTable,
        peers: Mapping[bytes, Peer],
        send: Send,
        *,
        creator: bytes,
        orphaned_after: float,
        counters: BrokerCounters,
        confirmed: Callable[[bytes, int], None],
    ) -> None:
        self._leases = leases
        self._peers = peers
        self._send = send
        self._creator = creator
        self._orphaned_after = orphaned_after
        self._counters = counters
        self._confirmed = confirmed
        # Done chunks whose results are not with a driver (some may have been kept by the queue
        # before it last stopped). A dict: ordered, and a chunk is in it once.
        self.waiting: dict[int, None] = {i: None for i, _ in leases.done_entries()}
        #: Tasks whose results were sent to each driver, ever (its SYNC answers say so).
        self.routed: dict[bytes, int] = {}

    # -- a chunk is done ------------------------------------------------------------------------
    def finished(self, chunk_id: int, held: Held, now: float) -> None:
        """``held`` is done: its results go to their driver now, or wait (kept)."""
        if not self.route(chunk_id, held, now):
            self.waiting[chunk_id] = None
            self._leases.keep(chunk_id, held)

    def _orphan_target(self, owner: bytes) -> tuple[bytes, int] | None:
        """Where results go whose driver ``owner`` is gone (or silent for ``orphaned_after``):
        (the creator, seq 0), or None to keep them waiting."""
        if owner == self._creator:
            return None  # the creator connects as soon as it can: its results wait for it
        creator = self._peers.get(self._creator)
        if creator is not None and not creator.gone:
            return self._creator, 0  # orphans are the creator's, marked foreign
        return None

    def route(self, chunk_id: int, held: Held, now: float) -> bool:
        """Send a chunk's results to its driver; False if they must wait."""
        meta = held.meta
        peer = self._peers.get(meta.owner)
        if peer is not None and not peer.gone and now - peer.last_seen < self._orphaned_after:
            driver, seq = meta.owner, meta.seq  # its own driver (even a silent one: it may be paused)
        else:
            target = self._orphan_target(meta.owner)
            if target is None:
                return False
            driver, seq = target
        results = held.results
        if results is EXPIRED_RESULTS:
            message: p.Message = p.Expired(seq, chunk_id, meta.base, meta.n_tasks)
        else:
            message = p.Results(seq, chunk_id, held.consumer, results)
        if not self._send(driver, message):
            return False
        held.driver = driver  # LeaseTable.sent's two fields: it alone may acknowledge them
        held.sent_at = now
        routed = self.routed
        routed[driver] = routed.get(driver, 0) + meta.n_tasks
        if seq:
            self._confirmed(driver, seq)
        else:
            self._counters.orphan_results += 1
        return True

    def route_waiting(self, now: float) -> None:
        """Send the waiting results that a driver may now take (one was heard, or one left)."""
        for chunk_id in list(self.waiting):
            held = self._leases.get(chunk_id)
            # Gone, or sent meanwhile (a HELLO's resend), or sent now: no longer waiting.
            if held is None or not held.done or held.driver is not None or self.route(chunk_id, held, now):
                del self.waiting[chunk_id]

    # -- drivers --------------------------------------------------------------------------------
    def receipt(self, driver: bytes, chunk_ids: Iterable[int]) -> None:
        """``driver`` holds the results of these chunks (RACK): they leave the queue for good."""
        self._leases.forget(chunk_ids, driver)

    def resend_to(self, driver: bytes) -> None:
        """``driver`` said HELLO on a new connection: results sent on its previous one may have
        been lost with it (ZeroMQ drops what was queued on a pipe that a new connection of the
        same identity takes over). They go again."""
        self._unsend(lambda held: held.driver == driver)

    def driver_left(self, driver: bytes, now: float) -> None:
        """``driver`` said BYE (its peer is kept, gone): what it was sent and did not acknowledge
        goes to another driver (the creator) now."""
        for chunk_id, held in self._leases.done_entries():
            if held.driver == driver:
                held.driver = None
                self.waiting[chunk_id] = None
                self._leases.keep(chunk_id, held)
        if self.waiting:
            self.route_waiting(now)

    def resend_unheard(self, deadline: float) -> None:
        """Results sent before ``deadline`` to a driver silent since go again when it (or, if it
        is gone, the creator) speaks."""
        self._unsend(lambda held: held.driver is not None and held.sent_at < deadline and self._silent_since_sent(held))

    def status(self, driver: bytes, sync: p.Sync) -> p.QueueStatus:
        """The answer to a driver's SYNC: the queue's counts, the results waiting for a driver and
        those routed to this one, which of the chunks it awaits this broker does not hold, and
        (asked) the consumers it hears."""
        c = self._leases.counts()
        missing: tuple[int, ...] = ()
        if sync.seqs:
            held = self._leases.seqs_of(driver)
            missing = tuple(seq for seq in sync.seqs if seq not in held)
        return p.QueueStatus(
            sync.token,
            c.ready_tasks + c.delayed_tasks,  # a delayed task is queued: join() waits for it
            c.leased_tasks,
            c.dead_tasks,
            self.waiting_tasks(),
            self.routed.get(driver, 0),
            missing,
            self.consumers_heard() if sync.consumers else None,
        )

    def consumers_heard(self) -> tuple[bytes, ...]:
        """The digests of the routing identities of the consumers that said HELLO here and not
        BYE since, at most :data:`~zdq.transport.protocol.MAX_CONSUMERS_TOLD` (a SYNC's answer,
        when asked: a pool's placement learns so that its consumers reach this broker without
        asking each of them; the identities themselves are never told)."""
        heard = (ident for ident, peer in self._peers.items() if peer.role is p.Role.CONSUMER and not peer.gone)
        return tuple(p.consumer_digest(ident) for ident in itertools.islice(heard, p.MAX_CONSUMERS_TOLD))

    def waiting_tasks(self) -> int:
        """Tasks done whose results are with no driver (a SYNC's answer)."""
        n = 0
        for chunk_id in self.waiting:
            held = self._leases.get(chunk_id)
            if held is not None and held.done and held.driver is None:
                n += held.meta.n_tasks
        return n

    def _silent_since_sent(self, held: Held) -> bool:
        sent_to = self._peers.get(held.driver) if held.driver is not None else None
        return sent_to is None or sent_to.gone or sent_to.last_seen < held.sent_at

    def _unsend(self, again: Callable[[Held], bool]) -> None:
        """Results sent that match ``again`` are sent again when a driver that may take them
        speaks. They were not deleted."""
        for chunk_id, held in self._leases.done_entries():
            if held.driver is not None and again(held):
                held.driver = None
                self.waiting[chunk_id] = None
                self._leases.keep(chunk_id, held)
