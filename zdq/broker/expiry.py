"""Expiry: a chunk whose ``expires=`` time passed before it was delivered is never delivered.

A submission's ``expires=`` reaches the broker as :attr:`~zdq.storage.base.ChunkMeta.expires`
(wall clock, stored with the chunk on a durable queue). The broker looks at it twice: when the
time comes (:class:`ExpiryWatch`, a heap of the chunks that carry one, so the futures fail then,
even if no consumer asks for work) and when it leases a chunk to a consumer (one attribute test
per chunk in :class:`~zdq.broker.dispatch.Dispatch`). An expired chunk becomes *done* with no
results of its own: :data:`EXPIRED_RESULTS`, produced by :data:`EXPIRED_BY`. From there it is a
done chunk like any other: its driver is sent EXPIRED instead of RESULTS, held and sent again
until the driver's RACK, written down by a durable queue when no driver takes it (so it is
neither run nor forgotten after a restart). A chunk already delivered is the consumer's to
check (each task's options carry the time: see :mod:`zdq.consumer.runner`).

Who owns what
-------------
:class:`ExpiryWatch` owns the heap of expiry times and the bounded record of the chunks that
expired here (for :meth:`~zdq.broker.control.BrokerControl.expired_state`), and is called only by the
broker's loop thread (control-plane readers take the broker's lock).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Iterable

from zdq.storage.base import ChunkMeta

__all__ = ["EXPIRED_BY", "EXPIRED_RESULTS", "ExpiryWatch"]

#: The producer of an expired chunk's outcome (a consumer identity no consumer has: 16 bytes).
EXPIRED_BY = b"zdq:expired\0\0\0\0\0"
#: The results of an expired chunk: tested by identity on the routing path (a durable queue's
#: recovered ones are made this object again).
EXPIRED_RESULTS = b"zdq:expired-chunk"
#: Chunks remembered as expired, at most (the oldest are forgotten first).
MAX_REMEMBERED = 10_000


class ExpiryWatch:
    """When chunks expire, and which ones did.

    >>> watch = ExpiryWatch()
    >>> watch.add(7, 100.0); watch.add(8, 50.0)
    >>> watch.next_at, watch.due(60.0), watch.next_at
    (50.0, [8], 100.0)
    """

    def __init__(self, metas: Iterable[tuple[int, ChunkMeta]] = ()) -> None:
        self._heap: list[tuple[float, int]] = [(m.expires, i) for i, m in metas if m.expires]
        heapq.heapify(self._heap)
        #: Wall-clock time of the next expiry to look at (``inf``: none); early, never late. An
        #: attribute kept by :meth:`add` and :meth:`due`: the broker's loop reads it every turn.
        self.next_at = self._heap[0][0] if self._heap else math.inf
        #: Chunks that expired here, by id: (owner, first task id, number of tasks).
        self.expired: OrderedDict[int, tuple[bytes, int, int]] = OrderedDict()

    def add(self, chunk_id: int, expires: float) -> None:
        heapq.heappush(self._heap, (expires, chunk_id))
        self.next_at = min(self.next_at, expires)

    def due(self, now: float) -> list[int]:
        """The chunks whose expiry is ``now`` or past (each once; whatever state they are in)."""
        heap, out = self._heap, []
        while heap and heap[0][0] <= now:
            out.append(heapq.heappop(heap)[1])
        self.next_at = heap[0][0] if heap else math.inf
        return out

    def note(self, chunk_id: int, meta: ChunkMeta) -> None:
        """``chunk_id`` expired: remember it (the oldest of :data:`MAX_REMEMBERED` goes)."""
        self.expired[chunk_id] = (meta.owner, meta.base, meta.n_tasks)
        if len(self.expired) > MAX_REMEMBERED:
            self.expired.popitem(last=False)

    def has_expired(self, task_id: int, owner: bytes | None = None) -> bool:
        """Whether task ``task_id`` (of driver ``owner``, if given) was in a chunk that expired
        here, among the last :data:`MAX_REMEMBERED`. A scan: for rare questions only."""
        return any(
            base <= task_id < base + n and (owner is None or owner == who)
            for who, base, n in self.expired.values()
            if base
        )
