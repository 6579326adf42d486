"""Running chunks: unpickle, call each task, and report the chunk as DONE (or SPLIT, DEAD, RETURN).

A chunk runs in one of two ways. With ``max_concurrency`` 1 :meth:`Runner.execute` is called on the
thread that owns the sockets (:mod:`zdq.consumer.link`), and :meth:`Runner._run_inline` runs the
tasks in one tight loop, the one :func:`zdq.tasks.run_entries` gives for the chunk's kind: for a
chunk of plain calls, nothing but the call per task; a chunk of one task (``submit(fn).result()``'s)
takes :meth:`Runner._run_lone`, the same loop without a :class:`~zdq.consumer.run.ChunkRun`
unless its task fails or carries options of its own. With ``max_concurrency`` > 1 the execution
thread (:meth:`Runner.exec_loop`) unpickles each chunk and fans its tasks out to
:class:`_TaskThreads`; the last task of a chunk to end reports it. The runner never looks inside a
task: what a task is and how it is called is :mod:`zdq.tasks`'s.

A task that is not plain (it failed on the fast path, it or its chunk carries options, its chunk
came back after its consumer died, or a rate limit spaces its chunk) takes the careful path:
:class:`~zdq.consumer.attempts.Attempts` (time limits, retries, dead letters, paced starts), which
decides with :mod:`zdq.consumer.policy`. Whatever thread finishes a chunk hands its messages to the
socket owner through ``post``.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

from zdq._actor import as_dask_task
from zdq.consumer.attempts import Attempts
from zdq.consumer.base import ConsumerBaseClass, GeneralConsumer, Message, save_hook
from zdq.consumer.hard import Children
from zdq.consumer.run import ChunkRun, Counters, Lone
from zdq.reporting import Throttle
from zdq.errors import SerializationError
from zdq.codec.results import (
    UNKNOWN_BASE,
    ErrorInfo,
    dumps_whole_results,
    too_large_alone,
    error_info,
    fit_results,
)
from zdq.codec.tasks import (
    CALLS,
    ITEMS,
    TASKS,
    CANCELLED,
    EXPIRED,
    TaskOptions,
    callers,
    cancelled_entry,
    careful_callers,
    is_cancelled,
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
        self._lone_careful = self._on_lone_careful  # the same, for the lone path (_run_lone)
        self._blocks: dict[int, int] = {}  # tasks in the next block of shared calls, by function (see _run_shared)
        self._post = post
        self._stop = stop
        self._fetching = fetching
        self._counters = counters
        self._max_concurrency = max_concurrency
        #: A task's attempts under its options: what a task that is not plain takes.
        self._attempts = Attempts(
            name, self._where, handler, self._careful_calls, self.children, post, stop, counters,
            defaults=defaults, crash_attempts=crash_attempts, payload_key=payload_key,
        )
        self._careful = self._attempts.run  # bound once: chunk loops call it on failures
        # A time limit for every task (the ConsumerPool's): no task may take the fast path.
        self._limited = self._attempts.limited
        # A chunk of one task may take the lone path (_run_lone): inline, and no time limit.
        self._lone_ok = max_concurrency <= 1 and not self._limited
        self._payload_key = payload_key
        self._max_bytes = max_bytes  # most bytes of results a DONE may carry (the sockets drop more)
        # Chunks acknowledged on receipt (at most once) never run again: their oversized results fail.
        self._early_ack = early_ack
        self._oversized_log = Throttle(60.0)  # under _cancel_lock
        self._bad_chunk_log = Throttle(60.0)  # the execution thread's only
        self._pool: _TaskThreads | None = None
        # Chunks received and not finished: the index of the broker they came from until started,
        # then their run (for cancellations).
        self._chunks: dict[int, ChunkRun | Lone | int] = {}
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
                if not isinstance(run, ChunkRun):
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
                self._mark_stale(state)
        return len(running)

    @staticmethod
    def _mark_stale(state: ChunkRun | Lone) -> None:
        """(The cancel lock held.) A running chunk starts no more tasks (nor retries) and sends no
        DONE; a lone task on the careful path has a run of its own, marked too."""
        state.stale = True
        if isinstance(state, ChunkRun):  # a Lone's only task has started
            for i in range(len(state.values)):
                state.cancel(i)
        elif state.run is not None:
            state.run.stale = True

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
                    self._mark_stale(state)

    def _forget(self, chunk_id: int) -> None:
        # Its cancellations are kept (a bounded number): the same chunk may come again (given
        # back, or delivered by its queue placed again while this consumer still held it).
        self._chunks.pop(chunk_id, None)

    def _register(self, run: ChunkRun, tasks: list[Any]) -> None:
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
            if type(run) is Lone:  # its DONE did not go (it leaves _chunks first)
                lone = run
                run = ChunkRun(lone.broker, deliver.chunk_id, lone.base, 1)
                run.stale = lone.stale
            if isinstance(run, ChunkRun) and run.remaining > 0:
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
            bad = ChunkRun(broker, deliver.chunk_id, UNKNOWN_BASE, deliver.n_tasks)
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
        run = ChunkRun(broker, deliver.chunk_id, base, n, deliver.attempt - 1, kind, options, deliver.spacing)
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
        """Run a chunk of one task, inline, without a :class:`ChunkRun` (the lone task's round
        trip: ``submit(fn).result()``); False if a cancellation or its broker's replacement came
        for it before it started (the general path then runs it, and says so).

        Only for a first delivery without options, spacing or a consumer's time limit: what the
        general path would do for it is run the kind's loop and report, which this does. A task
        that fails, or carries options of its own, takes the careful path (retries, dead letters,
        its time limit) from the loop, with a :class:`ChunkRun` made then
        (:meth:`_on_lone_careful`)."""
        lone = Lone(broker, base)
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
        self, context: tuple[Lone, int, int, list[Any], list[Any]], i: int, task: Any, failed: BaseException | None
    ) -> None:
        """The lone path's ``careful``, called where the kind's loop calls it (in its ``except``,
        as the general path's): the task goes the careful way (retries, dead letters, its own
        time limit) with a :class:`ChunkRun` made now."""
        lone, chunk_id, kind, tasks, values = context
        run = lone.run = ChunkRun(lone.broker, chunk_id, lone.base, 1, 0, kind)
        run.stale = lone.stale  # marked since it started (broker_replaced marks the run from now on)
        run.tasks, run.values = tasks, values
        self._careful(run, i, task, failed)

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

    def _run_inline(self, run: ChunkRun, tasks: list[Any]) -> None:
        # The loop's iterator tells a cancellation which tasks have started (ChunkRun.cancel).
        run.cursor = numbered = enumerate(tasks)
        if run.block_end is not None:  # by columns (see _start_chunk)
            self._run_shared(run, cast(SharedCalls, tasks))
        elif run.options is not None or run.crashes > 0 or self._limited or run.spacing:
            for i, task in numbered:
                self._careful(run, i, task)
        else:
            # The kind's own loop: for a chunk of plain calls, nothing but the call per task.
            run_entries(run.kind)(numbered, run.values, self._process_item, self._careful, run)
        self._finish(run)

    def _run_shared(self, run: ChunkRun, tasks: SharedCalls) -> None:
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

    def _run_one(self, run: ChunkRun, i: int) -> None:
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

    def _run_task(self, run: ChunkRun, i: int) -> None:
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
            self._careful(run, i, task)
        else:
            try:
                run.values[i] = self._calls[run.kind](task)
            except BaseException as e:  # noqa: BLE001 - a task's failure is its result, whatever it raised
                self._careful(run, i, task, failed=e)

    def _finish(self, run: ChunkRun, errors: dict[int, ErrorInfo] | None = None) -> None:
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
            if payload is None and self._max_bytes is not None:  # they do not fit together
                payload, errors = _without_too_large(run, errors, self._payload_key, self._max_bytes)
            if payload is None:  # the rest do not fit together either
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

    def _may_split(self, run: ChunkRun, n: int) -> bool:
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

    def _split_oversized(self, run: ChunkRun) -> None:
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


def _without_too_large(
    run: ChunkRun, errors: dict[int, ErrorInfo], key: bytes | None, max_bytes: int
) -> tuple[bytes | None, dict[int, ErrorInfo]]:
    """``run``'s results with the values too large even alone failed (they would fail alone after
    a split too): the results, or None if the rest still do not fit together."""
    alone = too_large_alone(run.base, run.values, errors, key, max_bytes)
    if not alone:
        return None, errors
    for i in alone:
        run.values[i] = None
    errors = {**errors, **alone}
    return dumps_whole_results(run.base, run.values, errors, key, max_bytes), errors


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
