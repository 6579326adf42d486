"""The state of one chunk while a consumer runs it: :class:`ChunkRun` (its tasks' values and
errors, which have started, what it still owes), and :class:`Lone`, the little a chunk of one
task run on the lone path needs (:meth:`~zdq.consumer.runner.Runner._run_lone`); and the
consumer's :class:`Counters`, which the threads that finish runs write.

A run is written by the threads that run its tasks (under its ``lock``) and read by the thread
that owns the sockets for cancellations (under the runner's cancel lock, then the run's):
:meth:`ChunkRun.cancel` is where the two meet.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from zdq.codec.rates import burst
from zdq.codec.results import ErrorInfo
from zdq.codec.tasks import SharedCalls, TaskOptions, cancelled_entry, is_cancelled
from zdq.transport import protocol as p

__all__ = ["ChunkRun", "Counters", "Lone"]


@dataclass(slots=True)
class Counters:
    """A consumer's counts. ``chunks_received`` is written by the socket owner alone; the others
    change under ``lock`` (the task threads of several chunks finish them concurrently), except on
    the lone path (``Runner._run_lone``), taken only with ``max_concurrency`` 1, where chunks run one
    at a time (``Handover.busy``): no other thread writes a task count meanwhile."""

    chunks_received: int = 0
    tasks_done: int = 0
    tasks_failed: int = 0
    tasks_cancelled: int = 0
    tasks_expired: int = 0  # their ``expires=`` passed before they started here: never run
    tasks_retried: int = 0  # failed attempts that were retried (counted off the success path)
    bad_chunks: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def bad_chunk(self) -> None:
        with self.lock:
            self.bad_chunks += 1


class ChunkRun:
    """One delivered chunk being executed; thread-safe completion for the fan-out path."""

    __slots__ = (
        "base",
        "block_end",
        "broker",
        "chunk_id",
        "crashes",
        "cursor",
        "dead",
        "errors",
        "failed",
        "free",
        "kind",
        "lock",
        "marked",
        "next_start",
        "options",
        "remaining",
        "spacing",
        "stale",
        "started",
        "tasks",
        "values",
    )

    def __init__(
        self,
        broker: int,
        chunk_id: int,
        base: int,
        n: int,
        crashes: int = 0,
        kind: int = 0,
        options: TaskOptions | None = None,
        spacing: float = 0.0,
    ) -> None:
        self.broker = broker
        self.spacing = spacing  # seconds between its tasks' starts (a rate-limited chunk's), else 0
        # Spaced: the first attempts that start at once (its bucket's tokens), and when the last
        # paced start was (time.monotonic()).
        self.free = int(burst(1.0 / spacing)) if spacing else 0
        self.next_start = time.monotonic() if spacing else 0.0
        self.kind = kind
        self.options = options
        self.crashes = crashes  # deliveries of this chunk that ended with their consumer's death
        #: Attempts of its tasks that failed on its earlier consumers (index -> count), as the
        #: broker told with its delivery (RETRIED); None: none.
        self.failed: dict[int, int] | None = None
        self.dead: list[p.Dead] = []
        self.chunk_id = chunk_id
        self.base = base
        self.values: list[Any] = [None] * n
        self.errors: dict[int, ErrorInfo] = {}
        self.remaining = n
        self.lock = threading.Lock()
        # Which tasks have started, for cancellations: run inline, those the loop's iterator has
        # handed out (``cursor``); on task threads, ``started`` (0 waiting, 1 started, 2 cancelled).
        self.tasks: list[Any] = []
        self.cursor: enumerate[Any] | None = None
        self.started: bytearray | None = None
        # Run by blocks (Runner._run_shared): the tasks before ``block_end`` have started (None:
        # not run so); ``marked``: a task not started yet was cancelled, or is (its placeholder is
        # in ``tasks``), and the rest of the chunk runs task by task.
        self.block_end: int | None = None
        self.marked = False
        # Its broker was placed again while it ran: the rest never starts, and no DONE goes (the
        # new broker serves the chunk again from its storage; see Runner.broker_replaced).
        self.stale = False

    def cancel(self, i: int) -> bool:
        """Cancel task ``i`` unless it has started (the runner's cancel lock held)."""
        started = self.started
        if started is not None:
            with self.lock:
                if started[i]:
                    return started[i] == 2
                started[i] = 2
                return True
        if self.block_end is not None:  # run by blocks: a block's tasks have started with it
            with self.lock:
                if self.block_end is not None:
                    if i < self.block_end:
                        return False
                    tasks = self.tasks
                    if type(tasks) is SharedCalls:
                        tasks.fill()  # the cancel lock is held (see SharedCalls.fill)
                    tasks[i] = cancelled_entry(self.kind)
                    self.marked = True  # the runner goes task by task from its next block on
                    return True
        tasks = self.tasks
        if type(tasks) is SharedCalls:
            tasks.fill()  # filled already, unless run by blocks (above): the cancel lock is held
        if is_cancelled(tasks[i]):
            return True
        # The placeholder goes in first, then the loop's position is read: if the loop had not
        # reached the task, it will take the placeholder (taking an item and moving on is one
        # step under the GIL); if it had, the task is put back and counts as started.
        original, tasks[i] = tasks[i], cancelled_entry(self.kind)
        cursor = self.cursor
        if cursor is not None and _position(cursor) > i:
            tasks[i] = original
            return False
        return True


def _position(cursor: enumerate[Any]) -> int:
    """How many items an ``enumerate`` has handed out (its pickled state: no other way to read it)."""
    state: Any = cursor.__reduce__()
    return int(state[1][1])


class Lone:
    """A chunk of one task run on the lone path (:meth:`Runner._run_lone`), in ``Runner._chunks``
    while it runs: its task has started, so a cancellation finds nothing to cancel; its broker
    placed again marks it ``stale`` (no DONE goes). ``run``: the :class:`ChunkRun` made only if
    its task takes the careful path (it failed, or carries options of its own)."""

    __slots__ = ("base", "broker", "run", "stale")

    def __init__(self, broker: int, base: int) -> None:
        self.broker = broker
        self.base = base
        self.stale = False
        self.run: ChunkRun | None = None
