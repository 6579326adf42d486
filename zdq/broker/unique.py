"""Unique tasks on the broker: which chunk holds each unique key, and who else waits for it.

``submit(fn, unique_key="user-42-report")`` sends a one-task chunk tagged with its key to the
queue the key hashes to (every producer of a pool picks the same queue: see
:func:`zdq.client.driver.ledger.queue_of_key`), so one broker owns each key. Before a round's PUTs
are stored, :meth:`UniqueKeys.admit` looks at the unique ones:

* key free: the chunk is stored as any other, and holds the key from then on (its *holder*);
* key held by a chunk queued or running here: the PUT is not stored. Its driver is a *follower* of
  that chunk: it gets a CONFIRM with status DUPLICATE and the holder's chunk id, then the holder's
  RESULTS (or LOST) under its own seq, so its future settles with the same result. Its own task
  id (the PUT's base) is kept too (:attr:`UniqueKeys.following`): :func:`zdq.state` answers for it
  as for its holder, and, when the holder ends, ``on_release`` hands the pair to the kept results
  (:meth:`~zdq.broker.retained.Retained.alias`, with ``result_ttl``);
* key held by the ``unique_for`` window of a chunk that ended: not stored; CONFIRM UNIQUE_HELD
  says until when (its future fails with :class:`~zdq.errors.DuplicateTask`).

The key is free again when its chunk ends: its DONE (a result, an error, a dead letter, a
cancellation, an expiry all end in one) or the LOST of an early-acknowledged chunk, unless its
``unique_for`` window (counted from when this broker stored it) has not passed yet. A durable queue
rebuilds the holders from its stored chunks when it opens; the followers and the windows of ended
chunks live in memory only (a follower's driver sends its chunk again after the recovery, as it
does for any chunk the queue does not hold, and follows again; a window is forgotten).

Who owns what
-------------
:class:`UniqueKeys` is the broker loop's: only :class:`~zdq.broker.core.BrokerCore` calls it, on
its thread, under its lock. It sends through the core's ``send``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from zdq.codec.unique import held_detail
from zdq.storage.base import ChunkMeta
from zdq.transport import protocol as p

__all__ = ["UniqueKeys"]

logger = logging.getLogger(__name__)

Puts = list[tuple[bytes, p.Put]]
#: PUTs of a round whose key a chunk of the same round takes: (driver, put, index of the holder's PUT).
SameRound = list[tuple[bytes, p.Put, int]]


class UniqueKeys:
    """The unique keys held in one queue, their followers, and the windows of ended chunks.

    Parameters
    ----------
    stored : iterable of (chunk id, ChunkMeta)
        The chunks the queue holds queued or leased when it opens (a durable queue's): those with
        a key hold it again.
    send : callable
        Sends a message to a peer; False if it cannot take it now.
    keep_for : float
        How long a message to a follower that cannot be sent is tried again (seconds).
    """

    def __init__(self, stored: Iterable[tuple[int, ChunkMeta]], send: Callable[[bytes, p.Message], bool], keep_for: float) -> None:
        self._send = send
        self._keep_for = keep_for
        self.holders: dict[bytes, int] = {}  # key -> id of the chunk holding it (queued or running)
        self._keys: dict[int, tuple[bytes, float]] = {}  # holder id -> (key, end of its unique_for window)
        self.followers: dict[int, list[tuple[bytes, int]]] = {}  # holder id -> (driver, seq) of each follower
        self._bases: dict[int, int] = {}  # holder id -> its task's id (0: not known)
        self._tasks: dict[int, list[int]] = {}  # holder id -> the task id of each follower
        #: A follower's task id -> the task id of the holder it follows (zdq.state asks it).
        self.following: dict[int, int] = {}
        #: Called with (follower's task id, holder's task id) when a holder ends: the broker keeps
        #: the pair with the holder's results (``result_ttl``); None: not kept.
        self.on_release: Callable[[int, int], None] | None = None
        self.windows: dict[bytes, float] = {}  # key of an ended chunk -> wall-clock time it is free again
        self._unsent: list[tuple[bytes, p.Message, float]] = []  # to followers: (driver, message, give up at)
        now = time.time()
        for chunk_id, meta in stored:
            if meta.unique_key:
                # The store time is not kept: the window counts from this opening (a little longer).
                self._hold(meta.unique_key, chunk_id, now + meta.unique_for if meta.unique_for else 0.0, meta.base)

    # -- PUTs -----------------------------------------------------------------------------------
    def admit(self, puts: Puts, now: float) -> tuple[Puts, SameRound]:
        """The PUTs of a round to store, and those that follow a chunk stored with them.

        A PUT whose key is held is answered here (DUPLICATE or UNIQUE_HELD) and not returned."""
        keep: Puts = []
        same_round: SameRound = []
        fresh: dict[bytes, int] = {}
        for ident, put in puts:
            key = put.unique_key
            if not key:
                keep.append((ident, put))
                continue
            holder = self.holders.get(key)
            if holder is not None:
                self._follow(holder, ident, put)
                continue
            if key in fresh:
                same_round.append((ident, put, fresh[key]))
                continue
            free_at = self.windows.get(key)
            if free_at is not None:
                if free_at > now:
                    self._send(ident, p.Confirm(put.seq, 0, p.Status.UNIQUE_HELD, held_detail(key, free_at)))
                    continue
                del self.windows[key]
            fresh[key] = len(keep)
            keep.append((ident, put))
        return keep, same_round

    def stored(self, puts: Puts, ids: list[int], same_round: SameRound, now: float) -> None:
        """The PUTs :meth:`admit` kept are stored as ``ids``: their keys are held; the PUTs of the
        same round with those keys follow them."""
        for (_, put), chunk_id in zip(puts, ids):
            if put.unique_key:
                self._hold(put.unique_key, chunk_id, now + put.unique_for if put.unique_for else 0.0, put.base)
        for ident, put, index in same_round:
            self._follow(ids[index], ident, put)

    def refused(self, same_round: SameRound, status: p.Status, detail: bytes) -> None:
        """The round's PUTs were not stored: those that would have followed one are refused too."""
        for ident, put, _ in same_round:
            self._send(ident, p.Confirm(put.seq, 0, status, detail))

    # -- a holder ends --------------------------------------------------------------------------
    def ended(self, chunk_id: int, consumer: bytes, results: object) -> None:
        """A holder's results came (DONE): its followers get them; its key is free (or held by
        its window)."""
        for driver, seq in self._release(chunk_id):
            self._deliver(driver, p.Results(seq, chunk_id, consumer, results))

    def lost(self, chunk_id: int) -> None:
        """A holder acknowledged early was lost with its consumer: its followers' tasks are too."""
        for driver, seq in self._release(chunk_id):
            self._deliver(driver, p.Lost(seq, chunk_id))

    def expired(self, chunk_id: int) -> None:
        """A holder expired before it was delivered: its followers' tasks did too (base 0: the
        whole of each follower's one-task chunk)."""
        for driver, seq in self._release(chunk_id):
            self._deliver(driver, p.Expired(seq, chunk_id, 0, 1))

    def housekeeping(self) -> None:
        """Send again what followers could not take; forget the windows that passed."""
        if self._unsent:
            now = time.monotonic()
            unsent, self._unsent = self._unsent, []
            for driver, msg, give_up in unsent:
                if not self._send(driver, msg):
                    if now < give_up:
                        self._unsent.append((driver, msg, give_up))
                    else:
                        logger.warning("a follower of a unique task could not be told its outcome for %.0f s: dropped", self._keep_for)
        if self.windows:
            now = time.time()
            for key in [k for k, free_at in self.windows.items() if free_at <= now]:
                del self.windows[key]

    def counts(self) -> dict[str, int]:
        """Keys held by queued or running chunks, their followers, keys held by a window."""
        return {
            "unique_keys": len(self.holders),
            "unique_followers": sum(len(f) for f in self.followers.values()),
            "unique_windows": len(self.windows),
        }

    # -- internals ------------------------------------------------------------------------------
    def _hold(self, key: bytes, chunk_id: int, until: float, base: int) -> None:
        self.holders[key] = chunk_id
        self._keys[chunk_id] = (key, until)
        if base:
            self._bases[chunk_id] = base

    def _follow(self, holder: int, driver: bytes, put: p.Put) -> None:
        self.followers.setdefault(holder, []).append((driver, put.seq))
        base = self._bases.get(holder)
        if put.base and base:  # zdq.state(follower's id) answers as for its holder's
            self._tasks.setdefault(holder, []).append(put.base)
            self.following[put.base] = base
        # Sent now, not held back: RESULTS to a follower never confirm its chunk.
        self._send(driver, p.Confirm(put.seq, holder, p.Status.DUPLICATE))

    def _release(self, chunk_id: int) -> list[tuple[bytes, int]]:
        """Free the key ``chunk_id`` held (or start its window); return its followers."""
        entry = self._keys.pop(chunk_id, None)
        if entry is None:
            return []
        key, until = entry
        if self.holders.get(key) == chunk_id:
            del self.holders[key]
        if until > time.time():
            self.windows[key] = until
        base = self._bases.pop(chunk_id, 0)
        for task in self._tasks.pop(chunk_id, ()):
            self.following.pop(task, None)
            if self.on_release is not None:
                self.on_release(task, base)
        return self.followers.pop(chunk_id, [])

    def _deliver(self, driver: bytes, msg: p.Message) -> None:
        if not self._send(driver, msg):
            self._unsent.append((driver, msg, time.monotonic() + self._keep_for))


def stored_unique(storage: Any) -> Iterable[tuple[int, ChunkMeta]]:
    """The chunks of ``storage`` queued or leased that carry a unique key and have no results yet."""
    done = storage.recovered_results
    for chunk_id, meta in storage.stored_metas():
        if meta.unique_key and chunk_id not in done and not storage.is_dead(chunk_id):
            yield chunk_id, meta
