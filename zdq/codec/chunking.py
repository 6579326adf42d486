"""Chunking: how many tasks go in a chunk, and where submissions are cut.

Every decision about chunk boundaries is here, in one small pure object (:class:`Chunking`) that
the pool and the driver ask; they keep their buffers, locks and futures.

- A batch (``batch_submit``, ``put_many``, ``submit_iter``) is cut into chunks of
  :meth:`Chunking.batch_size` tasks: the caller's ``batch_size`` capped by ``chunk-size`` and by the
  ConsumerPool's batch size, and, for a batch of known length, small enough that every consumer
  gets some (a thousand 5 ms tasks in one chunk ran on one consumer of two).
- Loose single tasks (``submit``) are coalesced by the driver's I/O thread: it takes
  :meth:`Chunking.loose_take` of them for the room it has, and :meth:`Chunking.loose_runs` cuts
  them into runs of consecutive task ids (a chunk's ids are consecutive, and batches may have taken
  ids in between), one run per broker when they are few.
- Whatever the count, a chunk that pickles to more than ``chunk-bytes`` is split in halves
  (:meth:`Chunking.pack`), and a single task whose chunk would be larger than
  ``max-message-size`` (what brokers accept, less :data:`WIRE_MARGIN`) is refused here rather
  than silently dropped on the wire: at the call for a task submitted alone
  (:meth:`Chunking.refuses_task`, before its chunk is made), as for a batch's.

>>> chunking = Chunking(chunk_size=1000, chunk_bytes=4 << 20, max_bytes=256 << 20, prefetch=2)
>>> chunking.batch_size(n_tasks=1000, consumers=2, queues=2)   # two chunks of prefetch each
250
>>> list(chunking.loose_runs([(7,), (8,), (10,), (11,)], n_brokers=1))   # ids 7-8, then 10-11
[(0, 2), (2, 4)]
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from zdq.config import PoolSettings
from zdq.errors import SerializationError
from zdq.codec.tasks import (
    _SHARED_MAX_ARGS, _SHARED_MIN, CALLS, PICKLED, TaskOptions, calls_columns, calls_width, dumps_chunk, dumps_shared,
)

__all__ = ["Chunking", "Packed"]

#: Bytes of ``max-message-size`` a chunk leaves to the transport. A broker's socket drops a frame
#: past the limit as it reads its size, before decrypting it, and CurveZMQ's box around a frame
#: adds 33 bytes: a chunk within them of the limit was dropped on the wire, and its future never
#: settled (reviewer 24).
WIRE_MARGIN = 128
#: The most a chunk of one task adds to the pickled task: its header and the seal (about 80 bytes).
_ONE_TASK_FRAME = 256

T = TypeVar("T")


class Packed(NamedTuple):
    """A chunk ready to send: its first task id, its number of tasks, its sealed payload."""

    first: int
    n: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Chunking:
    """Where chunks are cut, from a pool's settings (:meth:`of`).

    Attributes
    ----------
    chunk_size : int
        Most tasks in a chunk (``zdq.chunk-size``).
    chunk_bytes : int
        A chunk that pickles to more is split (``zdq.chunk-bytes``).
    max_bytes : int
        Most bytes a broker accepts in a message (``zdq.max-message-size``); a chunk may take all
        but :data:`WIRE_MARGIN` of them.
    prefetch : int
        Chunks a consumer holds at once (``zdq.prefetch``).
    """

    chunk_size: int
    chunk_bytes: int
    max_bytes: int
    prefetch: int

    @classmethod
    def of(cls, settings: PoolSettings) -> Chunking:
        return cls(settings.chunk_size, settings.chunk_bytes, settings.max_message_size, settings.prefetch)

    # -- batches -----------------------------------------------------------------------------------
    def batch_size(
        self,
        batch_size: int | None = None,
        n_tasks: int | None = None,
        *,
        consumer_batch_size: int | None = None,
        consumers: int = 0,
        queues: int = 1,
    ) -> int:
        """Tasks per chunk of a batch: ``batch_size`` capped by ``chunk-size`` and the
        ConsumerPool's batch size; and, for a batch of ``n_tasks`` that would make too few chunks
        for each of ``consumers`` (or, with none yet, each of ``queues``) to get some, smaller."""
        if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        size = min(batch_size or self.chunk_size, self.chunk_size)
        if consumer_batch_size is not None:
            size = min(size, consumer_batch_size)
        if n_tasks is not None:
            # Enough chunks that each consumer can hold its prefetch and each queue gets some.
            spread = max(queues, (consumers or queues) * self.prefetch)
            size = min(size, max(1, -(-n_tasks // spread)))
        return size

    @staticmethod
    def batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
        """``items`` in lists of ``size`` (the last one shorter), read lazily."""
        it = iter(items)
        while part := list(itertools.islice(it, size)):
            yield part

    def pack_batch(
        self,
        first: int,
        entries: list[Any],
        size: int,
        key: bytes | None,
        kind: int,
        options: TaskOptions | None,
        shared: Any = None,
    ) -> list[Packed]:
        """``entries`` (task ids from ``first``) as chunks of ``size`` tasks, each packed.

        ``shared``: the function every one of the CALLS ``entries`` shares (as
        :func:`~zdq.codec.tasks.check_calls` found it): calls of one length then go by columns
        (SHARED chunks), each chunk's taken from its own calls."""
        width = calls_width(entries) if shared is not None and kind == CALLS else 0
        if width:
            n = len(entries)
            return [
                packed
                for i in range(0, n, size)
                for packed in self.pack_shared(
                    first + i, shared, min(size, n - i), calls_columns(entries[i : i + size], width), key, options
                )
            ]
        return [
            packed
            for i in range(0, len(entries), size)
            for packed in self.pack(first + i, entries[i : i + size], key, kind, options)
        ]

    def pack_columns(
        self,
        first: int,
        fn: Any,
        n: int,
        columns: list[list[Any]],
        key: bytes | None,
        options: TaskOptions | None,
        size: int | None = None,
    ) -> list[Packed]:
        """``n`` calls of the callable ``fn`` given by the ``columns`` of their arguments (lists of
        ``n`` each: ``queue_pool.map``'s and ``Executor.map``'s slices of its iterables), packed as
        :meth:`pack_batch` packs calls that share their function: by columns (SHARED) when they
        are enough and have few enough arguments, else as ``(fn, *args)`` tuples; in chunks of
        ``size`` calls (``None``: one chunk, split by bytes only)."""
        if size is not None and n > size:
            return [
                packed
                for i in range(0, n, size)
                for packed in self.pack_columns(first + i, fn, min(size, n - i), [c[i : i + size] for c in columns], key, options)
            ]
        if n >= _SHARED_MIN and 1 <= len(columns) <= _SHARED_MAX_ARGS:
            return self.pack_shared(first, fn, n, columns, key, options)
        return self.pack(first, list(zip(itertools.repeat(fn, n), *columns)), key, CALLS, options)

    # -- loose single tasks ------------------------------------------------------------------------
    def loose_take(self, room: int) -> int:
        """How many loose tasks to coalesce when ``room`` more chunks fit: no more chunks than
        that; the rest waits, loose, for confirms."""
        return room * self.chunk_size

    def loose_runs(
        self, loose: Sequence[tuple[Any, ...]], n_brokers: int, consumers: int = 0
    ) -> Iterator[tuple[int, int]]:
        """The ``(start, end)`` slices of ``loose`` tasks (tuples whose first element is the task
        id, in order) that make one chunk each: at most ``chunk-size`` tasks of consecutive ids,
        and when they are few, enough slices for each broker and for each of ``consumers`` to
        hold its prefetch. Slices go to the brokers in turn: each round of ``n_brokers`` slices
        is even, so each broker gets an even share (10 tasks over 2 queues: 5 and 5, as in
        daskqueue), in as many pieces as the consumers need."""
        parts = max(n_brokers, consumers * self.prefetch)
        sizes: Iterator[int]
        if len(loose) < self.chunk_size * parts:
            rounds = -(-parts // n_brokers)  # pieces per broker
            shares = _even(len(loose), n_brokers)
            pieces = [_even(share, rounds) for share in shares]
            sizes = iter([p[r] for r in range(rounds) for p in pieces if p[r]])
        else:
            sizes = itertools.repeat(self.chunk_size)
        start = 0
        while start < len(loose):
            end = min(start + next(sizes, self.chunk_size), len(loose))
            first = loose[start][0]
            for j in range(start + 1, end):
                if loose[j][0] != first + (j - start):
                    end = j
                    break
            yield start, end
            start = end

    def pack_loose(
        self, first: int, tasks: list[bytes], key: bytes | None
    ) -> tuple[list[Packed], list[tuple[int, SerializationError]]]:
        """Pickled single tasks (ids from ``first``) as PICKLED chunks. A task refused (too large)
        is left out and returned with its error, by position, so that only it fails."""
        try:
            return self.pack(first, tasks, key, PICKLED, None), []
        except SerializationError:
            packed: list[Packed] = []
            refused: list[tuple[int, SerializationError]] = []
            for j, task in enumerate(tasks):
                try:
                    packed += self.pack(first + j, [task], key, PICKLED, None)
                except SerializationError as e:
                    refused.append((j, e))
            return packed, refused

    # -- by bytes ----------------------------------------------------------------------------------
    def pack(
        self, first: int, entries: list[Any], key: bytes | None, kind: int, options: TaskOptions | None
    ) -> list[Packed]:
        """Pickle ``entries`` as one chunk, or as several if it is larger than ``chunk-bytes``.

        Raises :class:`~zdq.errors.SerializationError` for an entry that cannot be pickled, and
        for a single task larger than ``max-message-size``.
        """
        payload = dumps_chunk(first, entries, key, kind, options)
        if self._fits(first, len(entries), payload):
            return [Packed(first, len(entries), payload)]
        half = len(entries) // 2
        return self.pack(first, entries[:half], key, kind, options) + self.pack(
            first + half, entries[half:], key, kind, options
        )

    def pack_shared(
        self, first: int, fn: Any, n: int, columns: list[list[Any]], key: bytes | None, options: TaskOptions | None
    ) -> list[Packed]:
        """:meth:`pack` for ``n`` calls of ``fn`` given by the ``columns`` of their arguments (a
        SHARED chunk, or several if it is larger than ``chunk-bytes``)."""
        payload = dumps_shared(first, fn, n, columns, key, options)
        if self._fits(first, n, payload):
            return [Packed(first, n, payload)]
        half = n // 2
        return self.pack_shared(first, fn, half, [c[:half] for c in columns], key, options) + self.pack_shared(
            first + half, fn, n - half, [c[half:] for c in columns], key, options
        )

    def _fits(self, first: int, n: int, payload: bytes) -> bool:
        """Whether a chunk of ``n`` tasks that pickled to ``payload`` goes whole (False: split it).

        Raises :class:`SerializationError` for a single task larger than ``max-message-size``."""
        size = len(payload)
        if n > 1:  # whole when within both bounds (max-message-size may be set below chunk-bytes)
            return size <= self.chunk_bytes and not self.too_large(size)
        if self.too_large(size):
            raise self.refusal(f"task {first}", size)
        return True

    def too_large(self, size: int) -> bool:
        """Whether a chunk pickled to ``size`` bytes is more than the sockets carry
        (``max-message-size``, less :data:`WIRE_MARGIN`): a chunk of one task is then refused,
        never sent."""
        return size > self.max_bytes - WIRE_MARGIN

    def refuses_task(self, size: int) -> bool:
        """Whether a task pickled to ``size`` bytes is refused before its chunk is made: its
        chunk could be too large (a chunk of one task adds at most ``_ONE_TASK_FRAME``)."""
        return self.too_large(size + _ONE_TASK_FRAME)

    def refusal(self, what: str, size: int) -> SerializationError:
        """The error of a task (``what``: "task 12") that pickles to ``size`` bytes, too many for
        ``max-message-size``."""
        return SerializationError(
            f"{what} pickles to {size} bytes, more than max-message-size ({self.max_bytes}) carries with its "
            "chunk: pass large data by reference (a path, a URL, a Dask future) instead"
        )


def _even(n: int, k: int) -> list[int]:
    """``n`` split into ``k`` sizes that differ by one at most, the larger first."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]
