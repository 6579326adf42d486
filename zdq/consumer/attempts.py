"""A task's attempts under its options: the careful path of :mod:`zdq.consumer.runner`.

A task takes it when it failed on the fast path, carries options of its own (or its chunk does,
or the consumer has a time limit for every task), its chunk came back after its consumer died, or
a rate limit spaces its chunk's starts. :meth:`Attempts.run` runs it: skipped if it was cancelled
or expired while it waited here, dead-lettered without running if earlier deliveries used its
attempts (:func:`~zdq.consumer.policy.on_redelivery`), else called under its time limit (a thread
it abandons, or a child process it kills: :mod:`zdq.consumer.hard`), again after each failure the
policy retries (:func:`~zdq.consumer.policy.after_failure`; the broker is told each time, so that
a consumer's death between retries does not give the task its retries anew), and at last failed
or dead-lettered. Its outcome goes into the task's :class:`~zdq.consumer.run.ChunkRun`.

A chunk a rate limit let go comes with a *spacing* (see :mod:`zdq.broker.rates`). As many first
attempts as its bucket held (:func:`~zdq.codec.rates.burst`) start at once; every other start (a
first attempt beyond those, or any retry) takes the next slot of the chunk's clock, at least
``spacing`` seconds after the one before (:meth:`Attempts._pace`). A retry thus waits for its
backoff and for its slot. A consumer that is stopping waits for no slot.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from zdq._actor import as_dask_task
from zdq.codec.results import ErrorInfo, error_info, error_to_exception
from zdq.codec.tasks import (
    CANCELLED,
    EXPIRED,
    TaskOptions,
    call_parts,
    dumps_chunk,
    is_cancelled,
    is_named,
    own_options,
)
from zdq.consumer.base import ConsumerBaseClass
from zdq.consumer.hard import Children
from zdq.consumer.policy import DeadLetter, Fail, Retry, after_failure, on_redelivery
from zdq.consumer.run import ChunkRun, Counters
from zdq.errors import DeadLettered, TaskCancelled, TaskExpired, TaskTimeout
from zdq.transport import protocol as p

__all__ = ["Attempts"]

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=256)
def _with_limit(options: TaskOptions, defaults: TaskOptions) -> TaskOptions:
    """``options`` with the consumer's time limit and ``hard`` (``defaults``), which they lack:
    cached, since a chunk's tasks share their options (and ``expires=`` makes one per call)."""
    return dataclasses.replace(options, time_limit=defaults.time_limit, hard=defaults.hard)


class Attempts:
    """Runs a task's attempts for one consumer (see the module docstring); from any thread that
    runs tasks. ``post(broker, message)`` hands the broker's messages to the socket owner."""

    def __init__(
        self,
        name: str,
        where: str,
        handler: ConsumerBaseClass,
        careful_calls: dict[int, Callable[[Any], Any]],
        children: Children,
        post: Callable[[int, p.Message], None],
        stop: threading.Event,
        counters: Counters,
        *,
        defaults: TaskOptions,
        crash_attempts: int,
        payload_key: bytes | None,
    ) -> None:
        self.name = name
        self._where = where
        self._handler = handler
        self._careful_calls = careful_calls
        self.children = children
        self._post = post
        self._stop = stop
        self._counters = counters
        self._defaults = defaults
        # A time limit for every task (the ConsumerPool's): no task may take the fast path.
        self.limited = defaults.time_limit is not None
        self._crash_attempts = crash_attempts
        self._payload_key = payload_key

    def options(self, run: ChunkRun, task: Any) -> TaskOptions:
        """The options a task runs with: its own, else its chunk's, else the consumer's. The
        consumer's time limit is a safety net: options with no time limit of their own (a task
        given only ``expires=`` or ``retries=``) take the consumer's ``time_limit`` and ``hard``."""
        options = own_options(run.kind, task)
        if options is None:
            options = run.options
            if options is None:
                return self._defaults
        if options.time_limit is None and self.limited:
            return _with_limit(options, self._defaults)
        return options

    def run(
        self, run: ChunkRun, i: int, task: tuple[Any, ...], failed: BaseException | None = None
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
        options = self.options(run, task)
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
            if isinstance(decision, Retry) and run.stale:
                # Its broker was placed again (or its consumer is leaving): the chunk runs again
                # from the queue, and no attempt starts here (no DONE goes for it either).
                decision = Fail()
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

    def _pace(self, run: ChunkRun, retry: bool) -> None:
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

    def _dead_letter(self, run: ChunkRun, i: int, task: tuple[Any, ...], info: ErrorInfo, verdict: DeadLetter) -> None:
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

    def _call_in_child(self, run: ChunkRun, task: Any, limit: float | None, tid: int) -> Any:
        """A hard time limit: the task runs in a child process, killed at ``limit`` (see
        :mod:`zdq.consumer.hard`)."""
        # A name is imported in the child; the handler's own process_item goes (what it pickles).
        fn, args, kwargs = call_parts(run.kind, task, self._handler.process_item)
        return self.children.call(fn, args, kwargs, limit if limit is not None else math.inf, tid, self._where)

    def _call_limited(self, run: ChunkRun, task: Any, limit: float | None, tid: int) -> Any:
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
