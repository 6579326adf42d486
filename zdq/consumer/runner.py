"""Running chunks: unpickle, call each task, and report the chunk as DONE (or SPLIT, DEAD, RETURN).

A chunk runs in one of two ways. With ``max_concurrency`` 1 :meth:`Runner.execute` is called on the
thread that owns the sockets (:mod:`zdq.consumer.link`), and :meth:`Runner._run_inline` runs the
tasks in one tight loop, the one :func:`zdq.tasks.run_entries` gives for the chunk's kind: for a
chunk of plain calls, nothing but the call per task; a chunk of one task (``submit(fn).result()``'s)
takes :meth:`Runner._run_lone`, the same loop without a :class:`_ChunkRun` unless its task fails or
carries options of its own. With ``max_concurrency`` > 1 the execution
thread (:meth:`Runner.exec_loop`) unpickles each chunk and fans its tasks out to
:class:`_TaskThreads`; the last task of a chunk to end reports it. The runner never looks inside a
task: what a task is and how it is called is :mod:`zdq.tasks`'s.

Whatever thread finishes a chunk hands its messages to the socket owner through ``post``. What to
do after a failure (retry after which delay, fail, dead-letter) is decided by
:mod:`zdq.consumer.policy`.

A chunk a rate limit let go comes with a *spacing* (see :mod:`zdq.broker.rates`): its tasks take
the careful path. As many first attempts as its bucket held (:func:`~zdq.codec.rates.burst`)
start at once; every other start (a first attempt beyond those, or any retry) takes the next slot
of the chunk's clock, at least ``spacing`` seconds after the one before (:meth:`Runner._pace`). A
retry thus waits for its backoff and for its slot. A consumer that is stopping waits for no slot.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from zdq._actor import as_dask_task
from zdq.consumer.base import ConsumerBaseClass, GeneralConsumer, Message, save_hook
from zdq.consumer.hard import Children
from zdq.consumer.policy import DeadLetter, Retry, after_failure, on_redelivery
from zdq.reporting import Throttle
from zdq.errors import DeadLettered, SerializationError, TaskCancelled, TaskExpired, TaskTimeout
from zdq.codec.rates import burst
from zdq.codec.results import (
    UNKNOWN_BASE,
    ErrorInfo,
    dumps_whole_results,
    error_info,
    error_to_exception,
    fit_results,
)
from zdq.codec.tasks import (
    CALLS,
    ITEMS,
    TASKS,
    CANCELLED,
    EXPIRED,
    TaskOptions,
    call_parts,
    callers,
    cancelled_entry,
    careful_callers,
    is_named,
    is_cancelled,
    dumps_chunk,
    loads_chunk,
    own_options,
    run_entries,
    split_chunk,
    SharedCalls,
)
from zdq.transport import protocol as p

__all__ = ["Counters", "Runner"]

logger = logging.getLogger(__name__)

#: Cancellations held for chunks not (yet) delivered here, at most.
_MAX_CANCELS_HELD = 10_000


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


@functools.lru_cache(maxsize=256)
def _with_limit(options: TaskOptions, defaults: TaskOptions) -> TaskOptions:
    """``options`` with the consumer's time limit and ``hard`` (``defaults``), which they lack:
    cached, since a chunk's tasks share their options (and ``expires=`` makes one per call)."""
    return dataclasses.replace(options, time_limit=defaults.time_limit, hard=defaults.hard)


#: A block of shared calls (:meth:`Runner._run_shared`) doubles while it runs in less than this,
#: up to ``_BLOCK_MOST`` tasks; one slower falls back to a block of one task.
_BLOCK_SECONDS, _BLOCK_MOST, _BLOCKS_KEPT = 0.001, 1 << 16, 256


def _calls(fn: Callable[..., Any], columns: list[list[Any]], count: int) -> Iterator[Any]:
    """The ``count`` calls of one block, lazily, for ``list.extend``: a generator, not ``map``,
    because a ``StopIteration`` that ``fn`` raises would end a ``map`` as if the block were over
    (its task counted done, the results after it shifted); out of a generator it comes as a
    ``RuntimeError`` caused by it (PEP 479), which :func:`_raised` unwraps. Calls without
    arguments (daskqueue's ``(fn,)``) have no columns: ``count`` says how many."""
    if len(columns) == 1:
        return (fn(a) for a in columns[0])
    if not columns:
        return (fn() for _ in itertools.repeat(None, count))
    return (fn(*a) for a in zip(*columns))


def _raised(e: BaseException) -> BaseException:
    """What a task of :func:`_calls` raised: the ``StopIteration`` itself where the generator
    turned it into a ``RuntimeError``."""
    cause = e.__cause__
    if type(e) is RuntimeError and isinstance(cause, StopIteration) and e.args == ("generator raised StopIteration",):
        return cause
    return e


class _ChunkRun:
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


class _Lone:
    """A chunk of one task run on the lone path (:meth:`Runner._run_lone`), in ``Runner._chunks``
    while it runs: its task has started, so a cancellation finds nothing to cancel; its broker
    placed again marks it ``stale`` (no DONE goes). ``run``: the :class:`_ChunkRun` made only if
    its task takes the careful path (it failed, or carries options of its own)."""

    __slots__ = ("base", "broker", "run", "stale")

    def __init__(self, broker: int, base: int) -> None:
        self.broker = broker
        self.base = base
        self.stale = False
        self.run: _ChunkRun | None = None


class _TaskThreads:
    """``n`` threads running the tasks of chunks, for ``max_concurrency`` > 1.

    Lighter than a ``ThreadPoolExecutor``, whose future, work item and locks per task were most of
    a consumer's CPU on short I/O-bound tasks (three times this for 5 ms sleeps). Tasks report
    through their chunk, so nothing per task is returned.
    """

    def __init__(self, n: int, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=as_dask_task(self._work), name=f"{name}-{i}", daemon=True) for i in range(n)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self._queue.put((fn, args))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception:  # a task's own failure is caught inside; this would be zdq's
                logger.exception("a task thread of a consumer failed")

    def shutdown(self) -> None:
        """Drop the tasks not started (their chunks are leased, so they run again elsewhere) and
        let every thread end after its current task."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            self._queue.put(None)


class Runner:
    """Executes the chunks of one consumer and reports them through ``post``.

    Parameters
    ----------
    name : str
        The consumer's name (in thread names and logs).
    handler : ConsumerBaseClass
        Receives raw items (``process_item``).
    post : callable
        ``post(broker, message)`` hands a message to the thread that owns the sockets, from any
        thread.
    stop, fetching : threading.Event
        The consumer's: a chunk that arrives while it stops, or no longer fetches, is given back.
    max_concurrency : int
        Above 1, tasks run on that many task threads fed by the execution thread.
    queues : sequence of str
        The name of each broker's queue, by index (for the logs).
    max_bytes : int, optional
        The most bytes of results a DONE may carry (what the sockets accept, less its frames).
    early_ack : bool
        The consumer acknowledges chunks on receipt (at most once): none of its chunks runs again,
        so results too large together fail their largest tasks rather than split the chunk.
    """

    def __init__(
        self,
        name: str,
        handler: ConsumerBaseClass,
        post: Callable[[int, p.Message], None],
        stop: threading.Event,
        fetching: threading.Event,
        counters: Counters,
        *,
        max_concurrency: int,
        defaults: TaskOptions,
        crash_attempts: int,
        payload_key: bytes | None,
        queues: Sequence[str],
        max_bytes: int | None = None,
        early_ack: bool = False,
        worker: str = "",
    ) -> None:
        self.name = name
        self._where = f"consumer {name} on worker {worker or 'this process'}"
        self._queues = queues  # the brokers' queue names, for the logs
        self._handler = handler
        self._process_item = process_item = _listing(handler)
        self._calls = callers(process_item)  # how an entry of each kind is called
        # The same, calling tasks given by name too: for the careful path, which they all take.
        self._careful_calls = careful_callers(process_item, self._where)
        # daskqueue's GeneralConsumer.save(msg, result), when overridden: called per chunk, after it ran.
        self._save = save_hook(handler)
        # The child processes of tasks with a hard time limit (none until the first such task).
        self.children = Children(name)
        self._careful = self._run_careful  # bound once: chunk loops call it on failures
        self._lone_careful = self._on_lone_careful  # the same, for the lone path (_run_lone)
        self._blocks: dict[int, int] = {}  # tasks in the next block of shared calls, by function (see _run_shared)
        self._post = post
        self._stop = stop
        self._fetching = fetching
        self._counters = counters
        self._max_concurrency = max_concurrency
        self._defaults = defaults
        # A time limit for every task (the ConsumerPool's): no task may take the fast path.
        self._limited = defaults.time_limit is not None
        # A chunk of one task may take the lone path (_run_lone): inline, and no time limit.
        self._lone_ok = max_concurrency <= 1 and not self._limited
        self._crash_attempts = crash_attempts
        self._payload_key = payload_key
        self._max_bytes = max_bytes  # most bytes of results a DONE may carry (the sockets drop more)
        # Chunks acknowledged on receipt (at most once) never run again: their oversized results fail.
        self._early_ack = early_ack
        self._oversized_log = Throttle(60.0)  # under _cancel_lock
        self._bad_chunk_log = Throttle(60.0)  # the execution thread's only
        self._pool: _TaskThreads | None = None
        # Chunks received and not finished: the index of the broker they came from until started,
        # then their run (for cancellations).
        self._chunks: dict[int, _ChunkRun | _Lone | int] = {}
        # Tasks cancelled of chunks not started yet: chunk id -> indexes.
        self._cancels: dict[int, set[int]] = {}
        # Attempts that failed on earlier consumers, of chunks not started yet (the broker's
        # RETRIED before their DELIVER): chunk id -> (task id, attempts failed) pairs.
        self._failed: dict[int, tuple[tuple[int, int], ...]] = {}
        # Chunks received from a broker since placed again, not started: they never start here.
        self._stale: set[int] = set()
        self._cancel_lock = threading.Lock()
        #: ``received(chunk_id, broker)``: a chunk was delivered by ``broker``; it waits to be
        #: started (the socket owner's call per DELIVER: the dict's own method, no Python frame).
        self.received: Callable[[int, int], None] = self._chunks.__setitem__
        #: The loop of each kind (:func:`~zdq.codec.tasks.run_entries`), looked up once.
        self._loops = {kind: run_entries(kind) for kind in (TASKS, CALLS, ITEMS)}
        #: Chunks for the execution thread (``max_concurrency`` > 1); ``None`` ends it.
        self.chunks: queue.SimpleQueue[tuple[int, p.Deliver] | None] = queue.SimpleQueue()

    @property
    def inline(self) -> bool:
        """Whether chunks run on the thread that owns the sockets."""
        return self._max_concurrency <= 1

    def start_threads(self) -> None:
        if not self.inline and self._pool is None:
            self._pool = _TaskThreads(self._max_concurrency, f"zdq-task-{self.name}")

    def shutdown(self) -> None:
        """End the execution thread and the task threads (from any thread). Idempotent."""
        self.chunks.put(None)
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()
        self.children.close()

    # -- cancellations (called by the thread that owns the sockets) -------------------------------
    def retried(self, chunk_id: int, failed: tuple[tuple[int, int], ...]) -> None:
        """The broker says these tasks of the chunk it DELIVERs next failed so many attempts on
        the consumers that held it before (one died between retries): their retries count on."""
        with self._cancel_lock:
            if chunk_id not in self._failed and len(self._failed) >= _MAX_CANCELS_HELD:
                del self._failed[next(iter(self._failed))]
            self._failed[chunk_id] = failed

    def cancel(self, chunk_id: int, indexes: tuple[int, ...], *, announced: bool = False) -> list[int]:
        """Cancel tasks of a chunk that have not started; return those cancelled. ``announced``:
        the broker says these were cancelled before the chunk, delivered next, was leased."""
        with self._cancel_lock:
            run = self._chunks.get(chunk_id)
            if announced or isinstance(run, int):  # a broker's index: waiting to start
                cancelled = list(indexes)
            else:
                if not isinstance(run, _ChunkRun):
                    return []  # finished (its DONE is on its way), or never here
                cancelled = [i for i in indexes if 0 <= i < len(run.values) and run.cancel(i)]
            if cancelled:
                if chunk_id not in self._cancels and len(self._cancels) >= _MAX_CANCELS_HELD:
                    del self._cancels[next(iter(self._cancels))]
                self._cancels.setdefault(chunk_id, set()).update(cancelled)
            return cancelled

    def running(self) -> bool:
        """Whether a chunk has started and not finished (any thread may ask)."""
        # A copy (atomic under the interpreter lock): chunks end on other threads without a lock.
        return any(not isinstance(state, int) for state in list(self._chunks.values()))

    def abandon(self) -> int:
        """The consumer stops with chunks still running: they send no DONE when they end and
        start no more of their tasks (they go back to their queues with the consumer's BYE, and
        run again elsewhere); their tasks running now run on to their end. Returns how many
        chunks were running."""
        with self._cancel_lock:
            running = [state for state in list(self._chunks.values()) if not isinstance(state, int) and not state.stale]
            for state in running:
                state.stale = True
                if type(state) is _ChunkRun:  # a _Lone's only task has started
                    for i in range(len(state.values)):
                        state.cancel(i)
        return len(running)

    def broker_replaced(self, broker: int) -> None:
        """Broker ``broker`` was placed again (the socket thread, once it connects to the new one).

        What this consumer received from the broker before and has not started never starts
        here: the new broker serves those chunks again from its storage (and takes no DONE for
        them from here), and it may have answered a cancellation of their tasks "never started",
        knowing nothing of this copy. Chunks running stop starting tasks and send no DONE.
        """
        with self._cancel_lock:
            # A copy: a chunk ending on another thread (a task thread, or the one running a chunk
            # while the standby holds the sockets) leaves the table without this lock.
            for chunk_id, state in list(self._chunks.items()):
                if isinstance(state, int):  # a broker's index: waiting to start
                    if state == broker:
                        self._stale.add(chunk_id)
                elif state.broker == broker and not state.stale:
                    state.stale = True
                    if type(state) is _ChunkRun:  # a _Lone's only task has started
                        for i in range(len(state.values)):
                            state.cancel(i)

    def _forget(self, chunk_id: int) -> None:
        # Its cancellations are kept (a bounded number): the same chunk may come again (given
        # back, or delivered by its queue placed again while this consumer still held it).
        self._chunks.pop(chunk_id, None)

    def _register(self, run: _ChunkRun, tasks: list[Any]) -> None:
        """A chunk starts: the cancellations that came before it take effect now."""
        run.tasks = tasks
        if self._pool is not None:
            run.started = bytearray(len(tasks))
        with self._cancel_lock:
            cancels = self._cancels.get(run.chunk_id) if self._cancels else None
            self._chunks[run.chunk_id] = run
            if self._stale and run.chunk_id in self._stale:  # its broker was placed again just now
                self._stale.discard(run.chunk_id)
                run.stale = True
                cancels = set(range(len(run.values)))
            if cancels and type(tasks) is SharedCalls:
                tasks.fill()
        if cancels:
            run.marked = True  # not run by blocks: the loop must see the placeholders
            placeholder = cancelled_entry(run.kind)
            for i in cancels:
                if 0 <= i < len(tasks):
                    tasks[i] = placeholder

    def exec_loop(self) -> None:
        """The execution thread of ``max_concurrency`` > 1: unpickle chunks, fan their tasks out."""
        while True:
            item = self.chunks.get()
            if item is None:
                return
            self.execute(*item)

    def execute(self, broker: int, deliver: p.Deliver) -> None:
        try:
            self._start_chunk(broker, deliver)
        except Exception as e:  # a task's own failure is caught inside; this would be zdq's
            logger.exception("consumer %s failed to run chunk %d", self.name, deliver.chunk_id)
            run = self._chunks.get(deliver.chunk_id)
            if type(run) is _Lone:  # its DONE did not go (it leaves _chunks first)
                lone = run
                run = _ChunkRun(lone.broker, deliver.chunk_id, lone.base, 1)
                run.stale = lone.stale
            if isinstance(run, _ChunkRun) and run.remaining > 0:
                # Every future settles: the tasks of the chunk without an error report this one.
                why = f"consumer {self.name} failed to run this task's chunk: {e!r}"
                info = ErrorInfo(None, "zdq.errors.ZdqError", why, "")
                for i in range(len(run.values)):
                    run.errors.setdefault(i, info)
                run.remaining = 0
                self._finish(run)

    def _start_chunk(self, broker: int, deliver: p.Deliver) -> None:
        """Unpickle a chunk and run it (inline), or hand its tasks to the task threads."""
        if self._stale and self._drop_stale(deliver.chunk_id):
            return
        if self._stop.is_set() or not self._fetching.is_set():
            # Not started: give it back so another consumer runs it, without using an attempt.
            self._forget(deliver.chunk_id)
            self._post(broker, p.Return(deliver.chunk_id))
            return
        try:
            chunk = loads_chunk(deliver.chunk, self._payload_key, lazy=True)
            base, kind, tasks, options = chunk
            n = tasks.n if type(tasks) is SharedCalls else len(tasks)
            if n != deliver.n_tasks:
                raise ValueError(f"chunk holds {n} tasks, its header says {deliver.n_tasks}")
        except Exception as e:  # noqa: BLE001 - whatever a forged or broken chunk raises, it fails only its tasks
            self._counters.bad_chunk()
            # Forged chunks (a peer with the pool's transport key but not its payload key) come as
            # fast as it sends them: a line per queue a minute, the rest counted (bad_chunks).
            if self._bad_chunk_log.due(self._queues[broker], time.monotonic()):
                logger.error(
                    "consumer %s cannot decode chunk %d of queue %s: %s (more from this queue within %.0f s "
                    "are counted in its statistics' bad_chunks, not logged)",
                    self.name, deliver.chunk_id, self._queues[broker], e, self._bad_chunk_log.every,
                )
            why = f"chunk {deliver.chunk_id} does not decode on consumer {self.name}: {type(e).__name__}: {e}"
            if isinstance(e, (ImportError, AttributeError)):
                why += (
                    " (a function or class pickled by reference must be importable on the workers: install "
                    "its module there, or define it in __main__ so that it is pickled by value)"
                )
            info = ErrorInfo(SerializationError(why), "zdq.errors.SerializationError", why, "")
            # Its task ids are in what did not decode: ``UNKNOWN_BASE`` says "every task of the chunk".
            bad = _ChunkRun(broker, deliver.chunk_id, UNKNOWN_BASE, deliver.n_tasks)
            self._forget(deliver.chunk_id)
            self._finish(bad, dict.fromkeys(range(deliver.n_tasks), info))
            return
        failed = self._failed.pop(deliver.chunk_id, None) if self._failed else None
        if (
            n == 1
            and type(tasks) is list
            and options is None
            and deliver.attempt == 1
            and failed is None
            and not deliver.spacing
            and self._lone_ok
            and self._run_lone(broker, deliver.chunk_id, base, kind, tasks)
        ):
            return
        if type(tasks) is SharedCalls and not (
            self._pool is None
            and deliver.attempt == 1
            and options is None
            and not self._limited
            and not deliver.spacing
        ):
            tasks.fill()  # not run by columns (_run_shared): its tuples, before anyone sees the run
        if deliver.attempt > 1 and n > 1:
            # A consumer died holding this chunk. Split it so that a task that kills its
            # consumer is tried alone, and the others are not dragged down with it. (The broker
            # carries the chunk's cancellations over to its parts.)
            self._forget(deliver.chunk_id)
            self._post(broker, p.Split(deliver.chunk_id, split_chunk(chunk, self._payload_key)))
            return
        run = _ChunkRun(broker, deliver.chunk_id, base, n, deliver.attempt - 1, kind, options, deliver.spacing)
        if failed:
            run.failed = {task - base: k for task, k in failed if 0 <= task - base < n}
        if type(tasks) is SharedCalls and not tasks.filled:
            run.block_end = 0  # by columns: cancellations take the blocks' way from the start
        self._register(run, tasks)
        pool = self._pool
        if pool is None:
            self._run_inline(run, tasks)
        else:
            for i in range(n):
                pool.submit(self._run_one, run, i)

    def _run_lone(self, broker: int, chunk_id: int, base: int, kind: int, tasks: list[Any]) -> bool:
        """Run a chunk of one task, inline, without a :class:`_ChunkRun` (the lone task's round
        trip: ``submit(fn).result()``); False if a cancellation or its broker's replacement came
        for it before it started (the general path then runs it, and says so).

        Only for a first delivery without options, spacing or a consumer's time limit: what the
        general path would do for it is run the kind's loop and report, which this does. A task
        that fails, or carries options of its own, takes the careful path (retries, dead letters,
        its time limit) from the loop, with a :class:`_ChunkRun` made then
        (:meth:`_on_lone_careful`)."""
        lone = _Lone(broker, base)
        chunks = self._chunks
        with self._cancel_lock:  # as _register: a cancellation held for it takes effect now
            if chunk_id in self._cancels or chunk_id in self._stale:
                return False
            chunks[chunk_id] = lone  # started: a cancellation from now on finds it so
        values: list[Any] = [None]
        context = (lone, chunk_id, kind, tasks, values)
        self._loops[kind](enumerate(tasks), values, self._process_item, self._lone_careful, context)
        run = lone.run
        if run is not None:  # it took the careful path: reported as the general path does
            run.stale = lone.stale
            self._finish(run)
            return True
        chunks.pop(chunk_id, None)
        errors = {} if self._save is None else self._saved(kind, tasks, base, values, {})
        if not lone.stale:  # its broker was placed again: the new one runs the chunk from its storage
            # Too large, it fails (SerializationError), and is counted so.
            payload, errors = fit_results(base, values, errors, self._payload_key, self._max_bytes)
            self._post(broker, p.Done(chunk_id, 1, payload))
        # Without the lock: inline, chunks run one at a time (see Counters).
        if errors:
            self._counters.tasks_failed += 1
        else:
            self._counters.tasks_done += 1
        return True

    def _saved(self, kind: int, tasks: Any, base: int, values: list[Any], errors: dict[int, ErrorInfo]) -> dict[int, ErrorInfo]:
        """Hand each function's result of a chunk that ran to the consumer's ``save(msg, result)``
        (daskqueue's hook: :func:`~zdq.consumer.base.save_hook`); return the chunk's errors with
        those ``save`` raised (that task fails with it). Raw items are not handed over: the
        ``process_item`` that handles them saves what it wants."""
        save = self._save
        if save is None or kind == ITEMS:
            return errors
        failed = dict(errors)
        for i, value in enumerate(values):
            if i in errors or (kind == TASKS and tasks[i][0] is None):
                continue
            try:
                save(Message(base + i), value)
            except Exception as e:  # noqa: BLE001 - the task's failure, as if it had raised it
                failed[i] = error_info(e)
                values[i] = None
        return failed

    def _on_lone_careful(
        self, context: tuple[_Lone, int, int, list[Any], list[Any]], i: int, task: Any, failed: BaseException | None
    ) -> None:
        """The lone path's ``careful``, called where the kind's loop calls it (in its ``except``,
        as the general path's): the task goes the careful way (retries, dead letters, its own
        time limit) with a :class:`_ChunkRun` made now."""
        lone, chunk_id, kind, tasks, values = context
        run = lone.run = _ChunkRun(lone.broker, chunk_id, lone.base, 1, 0, kind)
        run.tasks, run.values = tasks, values
        self._run_careful(run, i, task, failed)

    def _drop_stale(self, chunk_id: int) -> bool:
        """Whether this delivery came from a broker placed again since (see
        :meth:`broker_replaced`): it is dropped, unstarted and unreported. A copy the new broker
        delivered since comes after it, and runs."""
        with self._cancel_lock:
            if chunk_id not in self._stale:
                return False
            self._stale.discard(chunk_id)
            self._chunks.pop(chunk_id, None)
        logger.info(
            "consumer %s: chunk %d came from a queue placed again since; its new broker serves it", self.name, chunk_id
        )
        return True

    def _run_inline(self, run: _ChunkRun, tasks: list[Any]) -> None:
        # The loop's iterator tells a cancellation which tasks have started (_ChunkRun.cancel).
        run.cursor = numbered = enumerate(tasks)
        if run.block_end is not None:  # by columns (see _start_chunk)
            self._run_shared(run, cast(SharedCalls, tasks))
        elif run.options is not None or run.crashes > 0 or self._limited or run.spacing:
            for i, task in numbered:
                self._run_careful(run, i, task)
        else:
            # The kind's own loop: for a chunk of plain calls, nothing but the call per task.
            run_entries(run.kind)(numbered, run.values, self._process_item, self._careful, run)
        self._finish(run)

    def _run_shared(self, run: _ChunkRun, tasks: SharedCalls) -> None:
        """Run a chunk of calls that share their function (it came by columns) straight from its
        columns (:func:`_calls`), about half the CPU of the per-task loop, in blocks of tasks.

        A block's tasks count as started when it starts (``run.block_end``, under ``run.lock``):
        a cancellation of one of them finds it started; one of a later task puts its placeholder
        in ``tasks`` and the rest of the chunk runs task by task, the usual way. A block is as
        many tasks of the same function as ran in under ``_BLOCK_SECONDS`` last time (one for a
        function not seen yet, and after a slower block), so a cancellation finds started only
        tasks that would have started that soon anyway; the size is kept per function, so fast
        chunks of one function do not make one block of a slow one's chunk. A task that raises
        takes the careful path (retries, dead letters), alone."""
        fn, columns, values, lock = tasks.fn, tasks.columns, run.values, run.lock
        n = tasks.n
        blocks, key = self._blocks, id(fn)
        block = blocks.get(key, 1)
        start = 0
        while start < n:
            with lock:
                if run.marked:
                    run.block_end = None
                    rest: Any = iter(tasks)
                    rest.__setstate__(start)  # a list's iterator, from the first task not run
                    run.cursor = numbered = enumerate(rest, start)
                    break
                end = run.block_end = min(n, start + block)
            began = time.perf_counter()
            while start < end:
                done: list[Any] = []
                try:
                    done.extend(_calls(fn, [column[start:end] for column in columns], end - start))
                except BaseException as e:  # noqa: BLE001 - a task's failure is its result, whatever it raised
                    failed = start + len(done)  # extend kept the values before it
                    values[start:failed] = done
                    self._careful(run, failed, (fn, *[column[failed] for column in columns]), _raised(e))
                    start = failed + 1
                else:
                    values[start:end] = done
                    start = end
            block = min(block * 2, _BLOCK_MOST) if time.perf_counter() - began < _BLOCK_SECONDS else 1
        else:
            self._keep_block(key, block)
            return
        self._keep_block(key, block)
        run_entries(run.kind)(numbered, values, self._process_item, self._careful, run)

    def _keep_block(self, key: int, block: int) -> None:
        """Remember the next block's size for the function ``key`` (its ``id``: a hint only, so a
        reused id costs at most one block's guess), among at most ``_BLOCKS_KEPT`` functions."""
        blocks = self._blocks
        if key not in blocks and len(blocks) >= _BLOCKS_KEPT:
            blocks.clear()
        blocks[key] = block

    def _run_one(self, run: _ChunkRun, i: int) -> None:
        """Run task ``i`` of ``run`` on a task thread; the last task of the chunk to end reports it.
        A failure of zdq's own around the task (the task's are caught inside) fails that task, and
        the chunk still ends: its futures never wait for a report that cannot come."""
        try:
            self._run_task(run, i)
        except Exception as e:  # noqa: BLE001 - see above
            logger.exception("consumer %s failed to run task %d", self.name, run.base + i)
            why = f"consumer {self.name} failed to run this task: {type(e).__name__}"
            with run.lock:
                run.errors.setdefault(i, ErrorInfo(None, "zdq.errors.ZdqError", why, ""))
        with run.lock:
            run.remaining -= 1
            last = run.remaining == 0
        if last:
            self._finish(run)

    def _run_task(self, run: _ChunkRun, i: int) -> None:
        task = run.tasks[i]
        started = run.started
        if started is not None:
            with run.lock:
                if started[i] == 2:
                    task = cancelled_entry(run.kind)
                started[i] = 1
        if (
            run.options is not None
            or run.crashes
            or self._limited
            or run.spacing  # a rate-limited chunk's starts are paced
            or is_cancelled(task)  # a raw item's placeholder must never reach process_item
            or own_options(run.kind, task) is not None
        ):
            self._run_careful(run, i, task)
        else:
            try:
                run.values[i] = self._calls[run.kind](task)
            except BaseException as e:  # noqa: BLE001 - a task's failure is its result, whatever it raised
                self._run_careful(run, i, task, failed=e)

    def _options(self, run: _ChunkRun, task: Any) -> TaskOptions:
        """The options a task runs with: its own, else its chunk's, else the consumer's. The
        consumer's time limit is a safety net: options with no time limit of their own (a task
        given only ``expires=`` or ``retries=``) take the consumer's ``time_limit`` and ``hard``."""
        options = own_options(run.kind, task)
        if options is None:
            options = run.options
            if options is None:
                return self._defaults
        if options.time_limit is None and self._limited:
            return _with_limit(options, self._defaults)
        return options

    def _run_careful(
        self, run: _ChunkRun, i: int, task: tuple[Any, ...], failed: BaseException | None = None
    ) -> None:
        """Run a task with its options: time limit, retries, and the count of earlier crashes.

        ``failed`` is the error of a first attempt already made on the fast path.
        """
        tid = run.base + i
        if is_cancelled(task):  # never run, never retried: it reports its cancellation
            message = f"task {tid} was cancelled before it started"
            with run.lock:
                run.errors[i] = ErrorInfo(TaskCancelled(message), CANCELLED, message, "")
            return
        options = self._options(run, task)
        if options.expires and time.time() >= options.expires:
            # Its expiry passed while its chunk waited here (prefetched, or behind a long task):
            # it never starts, and is not retried. The broker could not see this.
            message = f"task {tid} expired before it started (expires=); it never ran"
            with run.lock:
                run.errors[i] = ErrorInfo(TaskExpired(message), EXPIRED, message, "")
            return
        # Attempts that failed on the consumers that held the chunk before count too.
        prior = run.failed.get(i, 0) if run.failed else 0
        if run.crashes:
            killed = on_redelivery(options, run.crashes, self._crash_attempts, prior)
            if killed is not None:
                self._dead_letter(run, i, task, error_info(DeadLettered(killed.message(tid))), killed)
                return
        attempt = run.crashes + prior
        # A task given by name fails on the fast path, where its name is called as it is: that
        # was no attempt, it runs now, its name resolved.
        error = None if failed is not None and is_named(run.kind, task) else failed
        while True:
            attempt += 1
            if error is None:
                if run.spacing:
                    self._pace(run, retry=attempt > run.crashes + 1)
                try:
                    if options.hard:
                        run.values[i] = self._call_in_child(run, task, options.time_limit, tid)
                    else:
                        run.values[i] = self._call_limited(run, task, options.time_limit, tid)
                    return
                except BaseException as e:  # noqa: BLE001 - the same
                    error = e
            decision = after_failure(
                options, run.crashes, self._crash_attempts, attempt, error, stopping=self._stop.is_set()
            )
            if isinstance(decision, Retry):
                delay = decision.delay if 0 <= decision.delay < math.inf else 0.0
                if not options.expires or time.time() + delay < options.expires:
                    with self._counters.lock:
                        self._counters.tasks_retried += 1
                    # Its broker keeps the count: if this consumer dies before the task is done,
                    # the next one goes on from here instead of giving it its retries anew.
                    self._post(run.broker, p.Retried(run.chunk_id, ((tid, attempt - run.crashes),)))
                    time.sleep(delay)
                    error = None
                    continue
                # A retry is a start: none begins after the task's expiry. It fails with its error.
                if hasattr(error, "add_note"):
                    error.add_note(f"task {tid} was not retried: its expiry (expires=) comes before the next attempt")
            info = error_info(error)
            if isinstance(decision, DeadLetter):
                self._dead_letter(run, i, task, info, decision)
            else:
                with run.lock:
                    run.errors[i] = info
            return

    def _pace(self, run: _ChunkRun, retry: bool) -> None:
        """Wait for the next start slot of a rate-limited chunk (see the module docstring): its
        first ``run.free`` first attempts go at once; other starts take slots in turn under the
        chunk's lock, ``run.spacing`` apart; a consumer stopping waits no more (the rest of its
        chunk starts at once)."""
        with run.lock:
            now = time.monotonic()
            if run.free > 0 and not retry:
                run.free -= 1
                return
            start = run.next_start = max(now, run.next_start + run.spacing)
        if start > now:
            self._stop.wait(start - now)

    def _dead_letter(self, run: _ChunkRun, i: int, task: tuple[Any, ...], info: ErrorInfo, verdict: DeadLetter) -> None:
        tid = run.base + i
        if not verdict.killed:
            sent = info.exception
            if sent is None:
                # It does not travel as itself: its stand-in travels, carrying the note (which
                # the driver's stand-in, made from the text alone, would not).
                sent = error_to_exception(info)
                info = dataclasses.replace(info, exception=sent)
            if hasattr(sent, "add_note"):
                sent.add_note(verdict.note(tid))
        reason = verdict.reason(tid, info)
        try:
            payload = dumps_chunk(tid, [task], self._payload_key, run.kind, run.options)
        except Exception as e:  # noqa: BLE001 - it was unpickled from a chunk, so this is unexpected: keep the error
            logger.error("consumer %s cannot dead-letter task %d: %s", self.name, tid, e)
        else:
            with run.lock:
                run.dead.append(p.Dead(run.chunk_id, tid, payload, reason.encode()))
        with run.lock:
            run.errors[i] = info

    def _call_in_child(self, run: _ChunkRun, task: Any, limit: float | None, tid: int) -> Any:
        """A hard time limit: the task runs in a child process, killed at ``limit`` (see
        :mod:`zdq.consumer.hard`)."""
        # A name is imported in the child; the handler's own process_item goes (what it pickles).
        fn, args, kwargs = call_parts(run.kind, task, self._handler.process_item)
        return self.children.call(fn, args, kwargs, limit if limit is not None else math.inf, tid, self._where)

    def _call_limited(self, run: _ChunkRun, task: Any, limit: float | None, tid: int) -> Any:
        call = self._careful_calls[run.kind]
        if limit is None:
            return call(task)
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = call(task)
            except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
                box["error"] = e

        # Python cannot kill a thread: a task past its limit is abandoned to finish on its own
        # (a daemon thread), and the consumer moves on.
        thread = threading.Thread(target=as_dask_task(target), name=f"zdq-timed-{self.name}-{tid}", daemon=True)
        thread.start()
        thread.join(limit)
        if thread.is_alive():
            raise TaskTimeout(f"task {tid} ran longer than its time limit of {limit}s")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _finish(self, run: _ChunkRun, errors: dict[int, ErrorInfo] | None = None) -> None:
        errors = run.errors if errors is None else errors
        n = len(run.values)
        self._chunks.pop(run.chunk_id, None)
        counters = self._counters
        cancelled = expired = 0
        payload: bytes | None = None
        if not run.stale:
            if self._save is not None:
                errors = self._saved(run.kind, run.tasks, run.base, run.values, errors)
            payload = dumps_whole_results(run.base, run.values, errors, self._payload_key, self._max_bytes)
            if payload is None:  # the results do not fit together
                if self._may_split(run, n):
                    self._split_oversized(run)
                    return
                # The largest fail (SerializationError), and are counted so.
                payload, errors = fit_results(run.base, run.values, errors, self._payload_key, self._max_bytes)
        if errors:
            cancelled = sum(1 for info in errors.values() if info.type_name == CANCELLED)
            expired = sum(1 for info in errors.values() if info.type_name == EXPIRED)
        with counters.lock:
            counters.tasks_failed += len(errors) - cancelled - expired
            counters.tasks_cancelled += cancelled
            counters.tasks_expired += expired
            counters.tasks_done += n - len(errors)
        if run.stale:  # its broker was placed again: the new one runs the chunk from its storage
            return
        for dead in run.dead:  # before DONE, so the broker still knows the chunk they come from
            self._post(run.broker, dead)
        assert payload is not None
        self._post(run.broker, p.Done(run.chunk_id, n, payload))

    def _may_split(self, run: _ChunkRun, n: int) -> bool:
        """Whether ``run``'s chunk, whose results do not fit together, may go back split so that
        its tasks run again, each alone (zdq chose the chunk, not the user; at least once, as after
        a crash). Not when running again would do what the first run did not undo, or say what
        is not so: a chunk acknowledged early (at most once), one with a dead-lettered task, one
        whose results a ``save`` hook was handed, or one with an expiry (a part run again after
        it would read "expired, never ran")."""
        if n < 2 or run.dead or self._early_ack or self._save is not None:
            return False
        if run.options is not None and run.options.expires:
            return False
        if run.kind == TASKS:
            for entry in run.tasks:
                own = own_options(TASKS, entry)
                if own is not None and own.expires:
                    return False
        return True

    def _split_oversized(self, run: _ChunkRun) -> None:
        """``run``'s results are larger together than a report may carry: its chunk goes back
        split in one-task chunks (SPLIT, as a redelivered chunk's), which run again, each
        reporting alone; a result too large alone then fails its task. Counted when they run."""
        tasks = run.tasks
        with self._cancel_lock:  # as _register: cancellations fill a shared chunk's list under it
            if type(tasks) is SharedCalls:
                tasks.fill()
            # Under the lock: task threads may finish chunks at once, and a throttle has one caller.
            log = self._oversized_log.due(self._queues[run.broker], time.monotonic())
        if log:
            logger.warning(
                "%s: the results of chunk %d's %d tasks are larger together than a report may carry "
                "(max-message-size): its tasks run again, each alone; return large data by reference "
                "(a path, a URL) to run them once",
                self._where, run.chunk_id, len(tasks),
            )
        self._post(run.broker, p.Split(run.chunk_id, split_chunk((run.base, run.kind, tasks, run.options), self._payload_key)))


def _listing(handler: Any) -> Callable[[Any], Any]:
    """``handler.process_item``, listing each raw item it is handed in ``handler.items`` first, as
    daskqueue's consumers kept them: for a user's :class:`ConsumerBaseClass` subclass (written for
    daskqueue, it may read them). zdq's own :class:`GeneralConsumer` lists nothing: whoever
    put()s items to the default consumer would see its worker's memory grow with them."""
    process_item: Callable[[Any], Any] = handler.process_item
    if not isinstance(handler, ConsumerBaseClass) or type(handler) is GeneralConsumer:
        return process_item

    def listed(item: Any) -> Any:
        items = getattr(handler, "items", None)  # a subclass's __init__ may not have called ours
        if type(items) is list:
            items.append(item)
        return process_item(item)

    return listed
