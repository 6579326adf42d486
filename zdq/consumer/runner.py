"""Running chunks: unpickle, call each task, and report the chunk as DONE (or SPLIT, DEAD, RETURN).

A chunk runs in one of two ways. With ``max_concurrency`` 1 :meth:`Runner.execute` is called on the
thread that owns the sockets (:mod:`zdq.consumer.link`), and :meth:`Runner._run_inline` runs the
tasks in one tight loop: for a chunk of plain calls, nothing but the call per task. With
``max_concurrency`` > 1 the execution thread (:meth:`Runner.exec_loop`) unpickles each chunk and
fans its tasks out to :class:`_TaskThreads`; the last task of a chunk to end reports it.

Whatever thread finishes a chunk hands its messages to the socket owner through ``post``. What to
do after a failure (retry after which delay, fail, dead-letter) is decided by
:mod:`zdq.consumer.policy`.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import threading
import time
import traceback
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from zdq._actor import as_dask_task
from zdq.consumer.base import ConsumerBaseClass
from zdq.consumer.policy import DeadLetter, Retry, after_failure, on_redelivery
from zdq.errors import DeadLettered, TaskTimeout
from zdq.serialization import (
    CALLS,
    ITEMS,
    ErrorInfo,
    TaskOptions,
    dumps_chunk,
    dumps_results,
    loads_chunk,
)
from zdq.transport import protocol as p

__all__ = ["Counters", "Runner"]

logger = logging.getLogger(__name__)

_PROTOCOL = 5


@dataclass(slots=True)
class Counters:
    """A consumer's counts. ``chunks_received`` is written by the socket owner alone; the others
    change under ``lock`` (the task threads of several chunks finish them concurrently)."""

    chunks_received: int = 0
    tasks_done: int = 0
    tasks_failed: int = 0
    bad_chunks: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def bad_chunk(self) -> None:
        with self.lock:
            self.bad_chunks += 1


_ZDQ_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _user_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """The traceback from the first frame outside zdq: a task's traceback starts at the user's
    code, not at the runner that called it."""
    first = tb
    while first is not None and os.path.abspath(first.tb_frame.f_code.co_filename).startswith(_ZDQ_DIR):
        first = first.tb_next
    return first if first is not None else tb


def _error_info(exc: BaseException) -> ErrorInfo:
    """A task's failure as it travels. The exception itself goes only if the driver can rebuild
    it: one whose ``__init__`` wants other arguments than its ``args`` pickles, but unpickling it
    raises, which would fail the whole chunk's results on the driver. Such an exception travels as
    its type name, message and traceback, and the driver raises a RemoteTaskError of them. Only
    failed tasks pay for the check."""
    tb = "".join(traceback.format_exception(type(exc), exc, _user_frames(exc.__traceback__)))
    exc.__traceback__ = None  # frames do not pickle; the text above keeps them
    kind = type(exc)
    try:
        pickle.loads(cloudpickle.dumps(exc, protocol=_PROTOCOL))
        sent: BaseException | None = exc
    except Exception:  # noqa: BLE001 - pickling and unpickling raise anything, from the user's own code too
        sent = None
    return ErrorInfo(sent, f"{kind.__module__}.{kind.__qualname__}", str(exc), tb)


class _ChunkRun:
    """One delivered chunk being executed; thread-safe completion for the fan-out path."""

    __slots__ = (
        "base",
        "broker",
        "chunk_id",
        "crashes",
        "dead",
        "errors",
        "kind",
        "lock",
        "options",
        "remaining",
        "values"
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
    ) -> None:
        self.broker = broker
        self.kind = kind
        self.options = options
        self.crashes = crashes  # deliveries of this chunk that ended with their consumer's death
        self.dead: list[p.Dead] = []
        self.chunk_id = chunk_id
        self.base = base
        self.values: list[Any] = [None] * n
        self.errors: dict[int, ErrorInfo] = {}
        self.remaining = n
        self.lock = threading.Lock()


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
    ) -> None:
        self.name = name
        self._queues = queues  # the brokers' queue names, for the logs
        self._handler = handler
        self._post = post
        self._stop = stop
        self._fetching = fetching
        self._counters = counters
        self._max_concurrency = max_concurrency
        self._defaults = defaults
        self._crash_attempts = crash_attempts
        self._payload_key = payload_key
        self._max_bytes = max_bytes  # most bytes of results a DONE may carry (the sockets drop more)
        self._pool: _TaskThreads | None = None
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
        except Exception:  # a task's own failure is caught inside; this would be zdq's
            logger.exception("consumer %s failed to run chunk %d", self.name, deliver.chunk_id)

    def _start_chunk(self, broker: int, deliver: p.Deliver) -> None:
        """Unpickle a chunk and run it (inline), or hand its tasks to the task threads."""
        if self._stop.is_set() or not self._fetching.is_set():
            # Not started: give it back so another consumer runs it, without using an attempt.
            self._post(broker, p.Return(deliver.chunk_id))
            return
        try:
            base, kind, tasks, options = loads_chunk(deliver.chunk, self._payload_key)
            if len(tasks) != deliver.n_tasks:
                raise ValueError(f"chunk holds {len(tasks)} tasks, its header says {deliver.n_tasks}")
        except Exception as e:  # noqa: BLE001 - whatever a forged or broken chunk raises, it fails only its tasks
            self._counters.bad_chunk()
            logger.error(
                "consumer %s cannot decode chunk %d of queue %s: %s", self.name, deliver.chunk_id, self._queues[broker], e
            )
            info = ErrorInfo(None, "zdq.errors.ProtocolError", f"chunk {deliver.chunk_id} does not decode: {e}", "")
            bad = _ChunkRun(broker, deliver.chunk_id, 0, deliver.n_tasks)
            self._finish(bad, dict.fromkeys(range(deliver.n_tasks), info))
            return
        if deliver.attempt > 1 and len(tasks) > 1:
            # A consumer died holding this chunk. Split it so that a task that kills its
            # consumer is tried alone, and the others are not dragged down with it.
            key = self._payload_key
            parts = [dumps_chunk(base + i, [task], key, kind, options) for i, task in enumerate(tasks)]
            self._post(broker, p.Split(deliver.chunk_id, parts))
            return
        run = _ChunkRun(broker, deliver.chunk_id, base, len(tasks), deliver.attempt - 1, kind, options)
        pool = self._pool
        if pool is None:
            self._run_inline(run, tasks)
        else:
            for i, task in enumerate(tasks):
                pool.submit(self._run_one, run, i, task)

    def _call(self, run: _ChunkRun, entry: Any) -> Any:
        if run.kind == CALLS:
            return entry[0](*entry[1:])
        if run.kind == ITEMS or entry[0] is None:
            return self._handler.process_item(entry if run.kind == ITEMS else entry[1])
        if len(entry) == 2:
            return entry[0](*entry[1])
        return entry[0](*entry[1], **(entry[2] or {}))

    def _run_inline(self, run: _ChunkRun, tasks: list[Any]) -> None:
        values = run.values
        careful = run.options is not None or run.crashes > 0
        if run.kind == CALLS and not careful:
            # The hot loop of no-op benchmarks: nothing but the call, per task.
            for i, c in enumerate(tasks):
                try:
                    values[i] = c[0](*c[1:])
                except BaseException as e:  # noqa: BLE001 - a task's failure is its result, whatever it raised
                    self._run_careful(run, i, c, failed=e)
        else:
            call = self._call
            for i, task in enumerate(tasks):
                if careful or (run.kind == 0 and len(task) > 3):
                    self._run_careful(run, i, task)
                    continue
                try:
                    values[i] = call(run, task)
                except BaseException as e:  # noqa: BLE001 - the same
                    self._run_careful(run, i, task, failed=e)
        self._finish(run)

    def _run_one(self, run: _ChunkRun, i: int, task: tuple[Any, ...]) -> None:
        if run.options is not None or run.crashes or (run.kind == 0 and len(task) > 3):
            self._run_careful(run, i, task)
        else:
            try:
                run.values[i] = self._call(run, task)
            except BaseException as e:  # noqa: BLE001 - the same
                self._run_careful(run, i, task, failed=e)
        with run.lock:
            run.remaining -= 1
            last = run.remaining == 0
        if last:
            self._finish(run)

    def _options(self, run: _ChunkRun, task: Any) -> TaskOptions:
        if run.kind == 0 and len(task) > 3 and isinstance(task[3], TaskOptions):
            return task[3]
        return run.options or self._defaults

    def _run_careful(
        self, run: _ChunkRun, i: int, task: tuple[Any, ...], failed: BaseException | None = None
    ) -> None:
        """Run a task with its options: time limit, retries, and the count of earlier crashes.

        ``failed`` is the error of a first attempt already made on the fast path.
        """
        options = self._options(run, task)
        tid = run.base + i
        if run.crashes:
            killed = on_redelivery(options, run.crashes, self._crash_attempts)
            if killed is not None:
                self._dead_letter(run, i, task, _error_info(DeadLettered(killed.message(tid))), killed)
                return
        attempt = run.crashes
        error = failed
        while True:
            attempt += 1
            if error is None:
                try:
                    run.values[i] = self._call_limited(run, task, options.time_limit, tid)
                    return
                except BaseException as e:  # noqa: BLE001 - the same
                    error = e
            decision = after_failure(
                options, run.crashes, self._crash_attempts, attempt, error, stopping=self._stop.is_set()
            )
            if isinstance(decision, Retry):
                time.sleep(decision.delay)
                error = None
                continue
            info = _error_info(error)
            if isinstance(decision, DeadLetter):
                self._dead_letter(run, i, task, info, decision)
            else:
                with run.lock:
                    run.errors[i] = info
            return

    def _dead_letter(self, run: _ChunkRun, i: int, task: tuple[Any, ...], info: ErrorInfo, verdict: DeadLetter) -> None:
        tid = run.base + i
        if not verdict.killed and info.exception is not None and hasattr(info.exception, "add_note"):
            info.exception.add_note(verdict.note(tid))
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

    def _call_limited(self, run: _ChunkRun, task: Any, limit: float | None, tid: int) -> Any:
        if limit is None:
            return self._call(run, task)
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = self._call(run, task)
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
        counters = self._counters
        with counters.lock:
            counters.tasks_failed += len(errors)
            counters.tasks_done += n - len(errors)
        for dead in run.dead:  # before DONE, so the broker still knows the chunk they come from
            self._post(run.broker, dead)
        payload = dumps_results(run.base, run.values, errors, self._payload_key, self._max_bytes)
        self._post(run.broker, p.Done(run.chunk_id, n, payload))
