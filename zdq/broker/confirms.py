"""CONFIRMs that wait for their chunks' commit to reach the disk (a durable queue's broker).

A durable queue's storage commits a round's chunks with one flush (:mod:`zdq.storage.lmdb`,
"Durability"): the commit's meta page reaches the disk with the next commit's flush, or with an
explicit :meth:`~zdq.storage.base.Storage.flush`. Until then an OS crash may undo that commit, so
its chunks are not confirmed: their CONFIRMs wait here, owned by the broker loop
(:class:`zdq.broker.core.BrokerCore`), which

- holds a round's CONFIRMs here when its commit is not on disk yet (:meth:`Unflushed.hold`);
- moves them to the CONFIRMs ready to send once a later flush covers that commit
  (``storage.flushed >= commit``: the next round's commit, most often), or once :attr:`due` has
  come, after flushing the storage itself: a lone chunk on an idle broker is confirmed within
  ``delay`` (2 ms) and one flush, as before;
- drops one when its RESULTS reach its driver first (they confirm it: the chunk ran).

A SIGKILL of the broker's process loses no committed chunk (the page cache survives it), so what
was confirmed survives it; an OS crash undoes at most the last commit, whose chunks were not
confirmed yet. Pure bookkeeping: no sockets, no storage.
"""

from __future__ import annotations

import math

__all__ = ["Unflushed"]

#: (driver identity, chunk seq) -> chunk id, as :class:`zdq.broker.core.BrokerCore` keeps CONFIRMs.
Confirms = dict[tuple[bytes, int], int]


class Unflushed:
    """The CONFIRMs of chunks whose commit may not be on disk yet, all of one commit (the latest:
    a commit's flush covers every earlier one, so older ones have moved on before a new one comes)."""

    __slots__ = ("commit", "delay", "due", "held", "since")

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.held: Confirms = {}
        self.commit = 0  # the commit that stored them (storage numbering)
        self.since = math.inf  # when the first of them was held (monotonic)
        self.due = math.inf  # when the loop flushes the storage itself rather than wait for a commit

    def covered(self, flushed: int) -> bool:
        """Whether a flush up to commit ``flushed`` put their commit on disk."""
        return flushed >= self.commit

    def hold(self, commit: int, now: float) -> Confirms:
        """Where the CONFIRMs of chunks stored in ``commit`` go (the caller fills it). The ones
        held before must have moved on (:meth:`take`) if ``commit`` covers theirs."""
        if not self.held:
            self.since = now
            self.due = now + self.delay
        self.commit = commit
        return self.held

    def take(self) -> tuple[Confirms, float]:
        """The CONFIRMs held, now on disk, and when the first was held; none is held after."""
        held, since = self.held, self.since
        self.held = {}
        self.since = self.due = math.inf
        return held, since
