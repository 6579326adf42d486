"""Rate limits of one queue: token buckets the broker's dispatch draws from.

A queue may have its own limit (its share of the pool's, set by ``QueuePool(rate_limit=)``,
``set_rate_limit`` or ``zdq rate-limit``) and per-key limits (a per-call ``rate_limit=``: the key is
the function's name, the rate travels in each chunk's tags; the latest rate given for a key wins,
whether by a chunk that brings a new one or by ``set_rate_limit(key=)``). A key's limit set or
lifted by ``set_rate_limit`` wins over the rates of the chunks stored before it (they were given
earlier): only a chunk stored after it may bring a rate again. The broker enforces them
where it hands chunks out, so they hold for every consumer of the queue together.

Buckets
-------
A bucket fills at ``rate`` tokens per second up to ``capacity`` (the larger of one task and
:data:`BURST_SECONDS` of its rate: a minute's starts stay within a small fraction of the limit). A chunk of ``k`` tasks takes ``k`` tokens once the bucket holds ``min(k, capacity)``:
a chunk larger than the bucket still goes (the bucket goes into debt and pays it back before
the next), so no chunk starves and the rate holds on average.

Spacing
-------
A chunk a bucket let go is DELIVERed with a *spacing*, ``1 / rate`` of the slowest bucket it was
charged to (:attr:`RateLimits.spacing`). Its consumer starts at once as many of its tasks as the bucket
holds (:func:`~zdq.codec.rates.burst`: the tokens that let it go), the others at least that far
apart, and waits at least that long before a retry (:mod:`zdq.consumer.runner`). So a chunk cut
larger than its bucket, whatever cut it (a pool made without a limit, given one later by ``zdq
rate-limit`` or another process; a durable queue reopened with its stored limit), starts its tasks
at the limit's pace instead of all at once, while its debt holds the next chunk back until it is
paid: the starts stay smooth. Chunks of queues without limits carry no spacing.

Order
-----
A queue's own limit holds back the whole queue: its chunks keep their order. A chunk under a key
whose bucket is empty is *parked*: it leaves the ready order (storage keeps it as delayed, with no
release time, so counts, cancellations and purges see it) and waits in its key's FIFO, so that the
chunks behind it of other keys, or of none, go on. A key's parked chunks go first once its bucket
allows, ahead of the ready order. A chunk whose every task was cancelled (a purge) takes no token.
Nothing polls meanwhile: :attr:`RateLimits.wake_at` tells the
broker's loop when the next bucket that holds work back will allow it.

Who owns what
-------------
:class:`RateLimits` is the broker loop thread's (control-plane calls hold the broker's lock); the
dispatch (:mod:`zdq.broker.dispatch`) asks it which chunk may go. A durable queue's own limit is
written with the queue (:meth:`~zdq.storage.base.Storage.setting`), so a broker placed again finds
it; per-key limits live in memory (the chunks that need them bring them again).
"""

from __future__ import annotations

import math
import struct
import time
from collections import deque

from zdq.broker.leases import LeaseTable
from zdq.codec.rates import BURST_SECONDS, burst
from zdq.storage.base import Leased, Storage
from zdq.transport.protocol import MAX_SPACING

__all__ = ["BURST_SECONDS", "Bucket", "RateLimits"]

#: Where a durable queue keeps its own limit (tasks per second, a big-endian double; 0: none).
SETTING = b"rate-limit"
_RATE = struct.Struct(">d")


class Bucket:
    """A token bucket of ``rate`` tasks per second (times are ``time.monotonic()``)."""

    __slots__ = ("capacity", "given", "rate", "stamp", "tokens")

    def __init__(self, rate: float, now: float, given: float = 0.0) -> None:
        self.rate = rate
        self.capacity = burst(rate)
        self.tokens = self.capacity  # a new limit starts full
        self.stamp = now
        self.given = given  # the last rate a chunk brought (a key's), to tell a new one

    def set_rate(self, rate: float, now: float) -> None:
        self._fill(now)
        self.rate = rate
        self.capacity = burst(rate)
        self.tokens = min(self.tokens, self.capacity)

    def _fill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def allows(self, n: int, now: float) -> bool:
        self._fill(now)
        return self.tokens >= min(n, self.capacity) - 1e-9

    def take(self, n: int) -> None:
        self.tokens -= n

    def ready_at(self, n: int) -> float:
        """When :meth:`allows` ``n`` will hold (after the last :meth:`allows`)."""
        need = min(n, self.capacity) - self.tokens
        return self.stamp + max(0.0, need) / self.rate


class RateLimits:
    """A queue's limits and its parked chunks (see the module docstring)."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self.queue: Bucket | None = None
        self.keys: dict[bytes, Bucket] = {}
        self._parked: dict[bytes, deque[int]] = {}
        #: The storage's next chunk id when ``set_key`` last set each key's limit: chunks with a
        #: smaller id were stored before, and their rate no longer counts.
        self._set_before: dict[bytes, int] = {}
        #: Whether any limit applies: the dispatch's one test per round (off: the plain path).
        self.active = False
        #: When the loop must run the dispatch again (``time.monotonic()``): a bucket that holds
        #: work back allows it then; ``inf`` when none does. Read every round (an attribute).
        self.wake_at = math.inf
        self.tasks_throttled = 0  # tasks that waited for a token (counted once per wait)
        self.throttled_seconds = 0.0  # the waits limits imposed on this queue's ready work, summed
        self._held_until = 0.0
        #: The spacing of the chunk :meth:`lease` (or :meth:`first_keyed`) let go last: seconds
        #: between its tasks' starts, ``1 / rate`` of its slowest bucket; 0.0 when none charged it.
        self.spacing = 0.0
        raw = storage.setting(SETTING, None)
        if raw is not None and len(raw) == _RATE.size:
            self.set_queue(_RATE.unpack(raw)[0] or None, store=False)

    # -- control plane (under the broker's lock) ------------------------------------------------
    def set_queue(self, rate: float | None, *, store: bool = True, now: float | None = None) -> None:
        """The queue's own limit (``None``: none); written with a durable queue."""
        now = time.monotonic() if now is None else now
        if rate is None:
            self.queue = None
        elif self.queue is None:
            self.queue = Bucket(rate, now)
        else:
            self.queue.set_rate(rate, now)
        if store:
            self._storage.write_setting(SETTING, _RATE.pack(rate or 0.0))
        self._changed()

    def set_key(self, key: bytes, rate: float | None, now: float | None = None) -> None:
        """A key's limit (``None``: none; its parked chunks go back to the ready order)."""
        now = time.monotonic() if now is None else now
        bucket = self.keys.get(key)
        self._set_before[key] = self._storage.next_id  # it wins over the rates queued before it
        if bucket is not None:
            bucket.given = 0.0  # the next chunk stored that brings a rate sets it again
        if rate is None:
            self.keys.pop(key, None)
            for chunk_id in self._parked.pop(key, ()):
                self._storage.unpark(chunk_id)
        elif bucket is None:
            self.keys[key] = Bucket(rate, now)
        else:
            bucket.set_rate(rate, now)
        self._changed()

    def _changed(self) -> None:
        self._changed_quietly()
        self.wake_at = time.monotonic()  # the loop looks again at once

    def _changed_quietly(self) -> None:
        self.active = self.queue is not None or bool(self.keys) or bool(self._parked)

    def describe(self) -> tuple[float, dict[str, float], int]:
        """``(queue's rate or 0, {key: rate}, tasks parked now)`` for the statistics."""
        metas = (self._storage.meta(i) for fifo in self._parked.values() for i in fifo if self._storage.is_parked(i))
        parked = sum(m.n_tasks for m in metas if m is not None)
        keys = {k.decode(errors="replace"): b.rate for k, b in self.keys.items()}
        return (self.queue.rate if self.queue else 0.0), keys, parked

    # -- the dispatch ---------------------------------------------------------------------------
    def first_keyed(self, key: bytes, rate: float, chunk_id: int, n: int, now: float) -> None:
        """A chunk under ``key`` went out on the plain path (no limit was active): its tokens are
        taken, and the limits are active from now on."""
        bucket = self._bucket(key, rate, chunk_id, now)
        self.spacing = 0.0
        if bucket is not None:
            bucket.allows(n, now)
            bucket.take(n)
            self.spacing = _spacing(bucket, None)

    def _bucket(self, key: bytes, rate: float, chunk_id: int, now: float) -> Bucket | None:
        """``key``'s bucket, set to the rate its chunk ``chunk_id`` brings if that is given anew
        (and the chunk was stored after the key's last ``set_key``)."""
        bucket = self.keys.get(key)
        if rate and (bucket is None or bucket.given != rate) and chunk_id >= self._set_before.get(key, 0):
            if bucket is None:
                bucket = self.keys[key] = Bucket(rate, now, given=rate)
                self.active = True
            else:
                bucket.set_rate(rate, now)
                bucket.given = rate
        return bucket

    def lease(self, leases: LeaseTable, ident: bytes, now: float, with_broker: bool = False) -> Leased | None:
        """The next chunk the limits allow, leased to ``ident`` (``with_broker``: as
        :meth:`LeaseTable.lease`); ``None`` when none may go now (:attr:`wake_at` then says when
        one will)."""
        self.wake_at = math.inf
        self.spacing = 0.0
        for key in list(self._parked):  # a key's parked chunks first, once it allows
            chunk_id = self._parked_head(key)
            if chunk_id is None:
                continue
            refused = self._charge(self.keys[key], chunk_id, now)
            if refused is None:
                self._unpark_head(key)
                return leases.lease(ident, now, chunk_id, with_broker)
            if refused is self.queue:  # the queue's own bucket holds everything back
                return None
        storage = self._storage
        while (chunk_id := storage.peek()) is not None:
            meta = storage.meta(chunk_id)
            assert meta is not None
            if len(storage.cancelled(chunk_id)) >= meta.n_tasks:  # purged: none of it starts
                return leases.lease(ident, now, None, with_broker)
            bucket = self._bucket(meta.rate_key, meta.rate, chunk_id, now) if meta.rate_key else None
            if bucket is not None and (meta.rate_key in self._parked or not bucket.allows(meta.n_tasks, now)):
                self._park(meta.rate_key, bucket, chunk_id, meta.n_tasks, now)
                continue
            if self._charge(bucket, chunk_id, now) is not None:
                return None
            return leases.lease(ident, now, None, with_broker)
        return None

    def _parked_head(self, key: bytes) -> int | None:
        """The first of ``key``'s parked chunks still parked (those cancelled or purged since
        are dropped); ``None`` (and the key's FIFO gone) when none is."""
        fifo = self._parked[key]
        while fifo and not self._storage.is_parked(fifo[0]):
            fifo.popleft()
        if fifo:
            return fifo[0]
        del self._parked[key]
        self._changed_quietly()
        return None

    def _unpark_head(self, key: bytes) -> None:
        fifo = self._parked[key]
        fifo.popleft()
        if not fifo:
            del self._parked[key]
            self._changed_quietly()

    def _park(self, key: bytes, bucket: Bucket, chunk_id: int, n: int, now: float) -> None:
        self._storage.park(chunk_id)
        fifo = self._parked.setdefault(key, deque())
        fifo.append(chunk_id)
        self.tasks_throttled += n
        if len(fifo) == 1:
            self._hold(bucket.ready_at(n), now)

    def _charge(self, bucket: Bucket | None, chunk_id: int, now: float) -> Bucket | None:
        """Take a chunk's tokens from ``bucket`` (its key's, if any) and the queue's if both
        allow it (``None``); else return the bucket that refused (the loop wakes when it will
        allow)."""
        meta = self._storage.meta(chunk_id)
        assert meta is not None
        n, queue = meta.n_tasks, self.queue
        if bucket is not None and not bucket.allows(n, now):
            self._hold(bucket.ready_at(n), now)
            return bucket
        if queue is not None and not queue.allows(n, now):
            if self._held_until <= now:  # a new wait: its tasks are counted once
                self.tasks_throttled += n
            self._hold(queue.ready_at(n), now)
            return queue
        if bucket is not None:
            bucket.take(n)
        if queue is not None:
            queue.take(n)
        self.spacing = _spacing(bucket, queue)
        return None

    def _hold(self, until: float, now: float) -> None:
        """Work waits for a bucket until ``until``: the loop wakes then; the wait is counted."""
        if until < self.wake_at:
            self.wake_at = until
        if until > self._held_until:
            self.throttled_seconds += until - max(now, self._held_until)
            self._held_until = until


def _spacing(bucket: Bucket | None, queue: Bucket | None) -> float:
    """Seconds between the starts of a chunk's tasks: ``1 / rate`` of the slower bucket charged."""
    rate = min(b.rate for b in (bucket, queue) if b is not None) if bucket or queue else 0.0
    return min(MAX_SPACING, 1.0 / rate) if rate else 0.0
