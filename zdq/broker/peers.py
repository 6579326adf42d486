"""What a broker knows of each peer (driver or consumer) it has heard from, and which consumers
hold credit.

Who owns what
-------------
:class:`PeerTable` is the broker loop's (:class:`~zdq.broker.core.BrokerCore` calls it on its
thread; control-plane readers take the broker's lock). On the same thread,
:class:`~zdq.broker.dispatch.Dispatch` spends the credit (and removes a consumer it cannot reach),
and :class:`~zdq.broker.routing.ResultRouting` and :class:`~zdq.broker.questions.CancelQuestions`
read ``by_ident`` without writing it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from zdq.names import unnamed_peer
from zdq.transport import protocol as p

__all__ = ["MAX_CREDIT", "Peer", "PeerTable", "Send"]

#: How a broker sends a message to a peer: False if the peer cannot take it now (the protocol
#: recovers: unconfirmed chunks are resent, results are sent again, leases expire).
Send = Callable[[bytes, p.Message], bool]
#: Credit is capped: a consumer cannot make the broker lease the whole queue to it.
MAX_CREDIT = 1024
_DRIVER = p.Role.DRIVER
_CONSUMER = p.Role.CONSUMER


@dataclass(slots=True)
class Peer:
    role: p.Role
    name: str = ""  # announced in its HELLO: what statistics and logs show
    credit: int = 0
    local: bool = False  # in the broker's own process (connected over inproc): served first
    last_seen: float = 0.0
    notified: float = 0.0  # when it was last told READY
    gone: bool = False  # said BYE


class PeerTable:
    """The peers by routing identity, and the consumers with credit in the order they are served.

    Examples
    --------
    >>> peers = PeerTable()
    >>> peers.credit(b"c", 2, now=1.0)
    >>> list(peers.with_credit), peers.by_ident[b"c"].credit
    ([b'c'], 2)
    """

    __slots__ = ("by_ident", "with_credit")

    def __init__(self) -> None:
        self.by_ident: dict[bytes, Peer] = {}
        #: Consumers that may hold credit, served in turn (a local one first); an entry whose
        #: consumer has none left (or left) is skipped when it comes up.
        self.with_credit: deque[bytes] = deque()

    def name_of(self, ident: bytes) -> str:
        """A peer as people see it: the name it announced, never its identity bytes."""
        peer = self.by_ident.get(ident)
        return peer.name if peer is not None and peer.name else unnamed_peer(ident)

    def driver(self, ident: bytes, now: float) -> Peer:
        """A driver spoke (again: one that said BYE is back)."""
        peer = self.by_ident.get(ident)
        if peer is None or peer.role is not _DRIVER:
            peer = self.by_ident[ident] = Peer(_DRIVER)
        peer.last_seen = now
        peer.gone = False
        return peer

    def consumer(self, ident: bytes, now: float) -> Peer:
        """A consumer spoke."""
        peer = self.by_ident.get(ident)
        if peer is None or peer.role is not _CONSUMER:
            peer = self.by_ident[ident] = Peer(_CONSUMER)
        peer.last_seen = now
        return peer

    def credit(self, ident: bytes, credit: int, now: float, *, revoke: bool = False) -> None:
        """A consumer gives ``credit`` more (a FETCH, or one riding on a DONE); ``revoke``: it
        takes back all it gave (FETCH 0)."""
        consumer = self.by_ident.get(ident)
        if consumer is None or consumer.role is _DRIVER:
            consumer = self.consumer(ident, now)
        else:
            consumer.last_seen = now
        if revoke:
            consumer.credit = 0  # a DELIVER already sent may still reach it: it gives it back
            return
        had = consumer.credit
        consumer.credit = min(consumer.credit + credit, MAX_CREDIT)
        if had == 0 and consumer.credit > 0:
            # A consumer in this process is served first: its chunks and results cross no socket
            # thread and no network (see zdq.transport.sockets.process_context).
            if consumer.local:
                self.with_credit.appendleft(ident)
            else:
                self.with_credit.append(ident)

    def hear_all(self, now: float) -> None:
        """Count every peer as heard ``now``: the broker itself was deaf (its loop did not run), so
        their silence says nothing about them."""
        for peer in self.by_ident.values():
            peer.last_seen = max(peer.last_seen, now)

    def left(self, ident: bytes) -> bool:
        """Consumer ``ident``'s worker left the cluster (its pool saw Dask lose it): taken as silent
        by the next :meth:`silent_consumers` (``last_seen`` is then ``-inf``), unless it speaks
        first. False if it is no consumer here."""
        peer = self.by_ident.get(ident)
        if peer is None or peer.role is not _CONSUMER:
            return False
        peer.last_seen = float("-inf")
        return True

    def silent_consumers(self, deadline: float) -> list[tuple[bytes, Peer]]:
        """Remove and return the consumers not heard from since ``deadline``."""
        silent = [(i, peer) for i, peer in self.by_ident.items() if peer.role is _CONSUMER and peer.last_seen < deadline]
        for ident, _ in silent:
            del self.by_ident[ident]
        return silent

    def to_notify(self, now: float, every: float) -> Iterator[bytes]:
        """Consumers without credit here that were not told READY within ``every`` (marked told)."""
        for ident, peer in self.by_ident.items():
            if peer.role is _CONSUMER and peer.credit == 0 and now - peer.notified >= every:
                peer.notified = now
                yield ident

    def consumer_names(self) -> list[str]:
        return sorted(self.name_of(i) for i, peer in self.by_ident.items() if peer.role is _CONSUMER)

    def drivers_present(self) -> int:
        return sum(1 for peer in self.by_ident.values() if peer.role is _DRIVER and not peer.gone)
