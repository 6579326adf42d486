"""The order in which a queue serves its chunks: ready FIFOs by priority, and delayed chunks.

Both hold chunk ids only (the storage index keeps their metas) and belong to
:class:`~zdq.storage.base.Storage`, which one broker thread owns.

- :class:`ReadyQueue`: one FIFO per priority present, served highest first, first in first out
  within a priority. Priority 0's FIFO always exists and comes first in a one-element list, so the
  common queue (no priorities) costs a loop of one step over a ``deque.popleft``.
- :class:`Delayed`: chunks that may not be delivered before a wall-clock time, in a heap keyed by
  that time. Nothing scans them while they wait: the broker asks :attr:`Delayed.next_at` for its
  poll timeout and :meth:`Delayed.due` when it has passed. A chunk taken out early (cancelled)
  leaves a stale heap entry behind, skipped when it reaches the top: removal stays O(1).

>>> ready = ReadyQueue()
>>> ready.append(1); ready.append(2); ready.append(3, priority=5)
>>> [ready.popleft() for _ in range(len(ready))]
[3, 1, 2]
>>> later = Delayed()
>>> later.add(7, at=100.0, n_tasks=10)
>>> later.due(50.0), later.due(100.0), later.next_at
([], [7], inf)
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import deque

__all__ = ["Delayed", "ReadyQueue"]


class ReadyQueue:
    """Ready chunk ids: a FIFO per priority, the highest priority served first."""

    __slots__ = ("_fifos", "_order", "n", "plain")

    def __init__(self) -> None:
        #: Priority 0's FIFO (never dropped): the plain chunk's, appended to without a lookup.
        self.plain: deque[int] = deque()
        self._fifos: dict[int, deque[int]] = {0: self.plain}
        self._order: list[int] = [0]  # the priorities with a FIFO, highest first
        #: How many chunks are ready: read as an attribute on the broker's path (no ``len`` call).
        self.n = 0

    def _fifo(self, priority: int) -> deque[int]:
        fifo = self._fifos.get(priority)
        if fifo is None:
            fifo = self._fifos[priority] = deque()
            # Kept sorted highest first: insort on the negated values.
            at = bisect.bisect_left([-p for p in self._order], -priority)
            self._order.insert(at, priority)
        return fifo

    def append(self, chunk_id: int, priority: int = 0) -> None:
        """At the tail of its priority's FIFO (new, released, requeued)."""
        if priority:
            self._fifo(priority).append(chunk_id)
        else:
            self.plain.append(chunk_id)
        self.n += 1

    def appendleft(self, chunk_id: int, priority: int = 0) -> None:
        """At the head of its priority's FIFO (given back, split after a redelivery)."""
        self._fifo(priority).appendleft(chunk_id)
        self.n += 1

    def popleft(self) -> int:
        """The first chunk of the highest priority; ``IndexError`` when empty."""
        for priority in self._order:
            fifo = self._fifos[priority]
            if fifo:
                self.n -= 1
                chunk_id = fifo.popleft()
                if not fifo and priority:
                    self._drop(priority)  # so that the loop above stays as short as the priorities in use
                return chunk_id
        raise IndexError("no ready chunk")

    def peek(self) -> int | None:
        """The chunk :meth:`popleft` would take, or ``None`` when empty (the rate limits look first)."""
        for priority in self._order:
            fifo = self._fifos[priority]
            if fifo:
                return fifo[0]
        return None

    def remove(self, chunk_id: int, priority: int = 0) -> None:
        """Take a chunk out of the middle (a rare path: late results, cancellations);
        ``ValueError`` if it is not there."""
        fifo = self._fifos.get(priority)
        if fifo is None:
            raise ValueError(f"chunk {chunk_id} is not ready")
        fifo.remove(chunk_id)
        self.n -= 1
        if not fifo and priority:
            self._drop(priority)

    def _drop(self, priority: int) -> None:
        del self._fifos[priority]
        self._order.remove(priority)

    def __len__(self) -> int:
        return self.n

    def __bool__(self) -> bool:
        return self.n > 0


class Delayed:
    """Chunk ids held until a wall-clock time, with their task count."""

    __slots__ = ("_at", "_heap", "next_at", "tasks")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []
        self._at: dict[int, float] = {}  # the chunks still delayed: the truth; the heap may hold stale entries
        self.tasks = 0
        #: The earliest release time (``inf`` when nothing waits); may be early after a discard, never late.
        self.next_at = math.inf

    def add(self, chunk_id: int, at: float, n_tasks: int) -> None:
        self._at[chunk_id] = at
        heapq.heappush(self._heap, (at, chunk_id))
        self.tasks += n_tasks
        self.next_at = min(self.next_at, at)

    def discard(self, chunk_id: int, n_tasks: int) -> bool:
        """Take a chunk out before its time (cancelled, acknowledged); False if it is not delayed."""
        if self._at.pop(chunk_id, None) is None:
            return False
        self.tasks -= n_tasks
        if not self._at:
            self._heap.clear()
            self.next_at = math.inf
        return True

    def when(self, chunk_id: int) -> float | None:
        """The release time of a delayed chunk (``inf``: parked by a rate limit), else ``None``."""
        return self._at.get(chunk_id)

    def due(self, now: float) -> list[int]:
        """Take out, in release order, the chunks whose time is ``now`` or past (the caller
        subtracts their tasks with :meth:`released`)."""
        out: list[int] = []
        heap, at = self._heap, self._at
        while heap and heap[0][0] <= now:
            when, chunk_id = heapq.heappop(heap)
            if at.get(chunk_id) == when:
                del at[chunk_id]
                out.append(chunk_id)
        while heap and at.get(heap[0][1]) != heap[0][0]:  # stale tops: discarded chunks
            heapq.heappop(heap)
        self.next_at = heap[0][0] if heap else math.inf
        return out

    def released(self, n_tasks: int) -> None:
        self.tasks -= n_tasks

    def __contains__(self, chunk_id: int) -> bool:
        return chunk_id in self._at

    def __len__(self) -> int:
        return len(self._at)
