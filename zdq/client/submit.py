"""Submission: task options merged once, single calls, batches, iterables, and their progress.

:class:`TaskDefaults` is the one place where a call's task options meet the pool's defaults
(before, the options dict was built in four places: ``_options``, ``submit``, ``batch_submit``
and ``submit_iter``). :class:`Submitter` turns calls into pickled tasks and chunks and hands
them to the pool's driver through its public methods.

Ownership
---------
======================  ===========================================================================
state                   owner
======================  ===========================================================================
``TaskDefaults``        immutable once made (the pool's constructor)
``Submitter``           no state of its own beyond what it is given: every call runs on the caller's
                        thread, and what is shared (ids, buffers, records) is the driver's
``_Reading.error``      the thread reading the caller's iterable
======================  ===========================================================================
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import functools
import itertools
import time
from collections.abc import Iterable, Sequence
from typing import Any, Callable, Protocol, cast

from zdq.codec.chunking import Chunking, Packed
from zdq.config import PoolSettings, seconds_or_none, timeout_or_none
from zdq.consumer import GeneralConsumer
from zdq.client.dependencies import _PLAIN as PLAIN, find_futures, hold, holds_futures, may_hold
from zdq.client.asynchronous import off_loop_when_async
from zdq.client.driver import Driver
from zdq.client.executor import PoolExecutor
from zdq.client.window import Columns, FutureSlice, MapBatch, MapChunk, Slice, cancel_slices
from zdq.errors import SerializationError, SubmitTimeout, WrongConsumerClass, ZdqTimeoutError
from zdq.futures import BatchFuture, TaskFuture, WaitHint
from zdq.names import agreeing, counted
from zdq.objects import as_calls
from zdq.codec.tasks import CALLS, ITEMS, TaskOptions, call_task, check_calls, check_task_name, dumps_task, item_task
from zdq.codec.rates import chunk_cap, rate_key_of, rate_of, share
from zdq.codec.timing import Timing, expiry_of, timing_of
from zdq.codec.unique import unique_timing

__all__ = [
    "TaskDefaults", "Submitter", "SubmitMethods", "SubmitTarget", "check_worker_class", "insert_bar", "with_expiry",
]

_NO_OPTIONS = TaskOptions()

#: ``client.map`` keywords that steer Dask's scheduler: refused by ``map`` (not passed to ``fn``).
_DASK_ONLY = frozenset(
    {"key", "workers", "resources", "allow_other_workers", "fifo_timeout", "actor", "actors", "annotations"}
)


def check_worker_class(worker_class: type | None) -> None:
    if worker_class is not None and not (isinstance(worker_class, type) and issubclass(worker_class, GeneralConsumer)):
        raise WrongConsumerClass(
            f"submitted functions run on GeneralConsumer and its subclasses only: worker_class="
            f"{worker_class!r:.80} cannot run them (put() items for a ConsumerBaseClass's process_item)"
        )


def with_expiry(options: TaskOptions | None, timing: Timing | None) -> TaskOptions | None:
    """The task options that carry a submission's expiry to its consumers (which check it before
    each task starts: a chunk may wait in a consumer's prefetch, where its broker cannot see it);
    ``options`` themselves when it has none."""
    if timing is None or not timing.expires:
        return options
    return dataclasses.replace(options or _NO_OPTIONS, expires=timing.expires)


def insert_bar(total: int | None) -> Any:
    from tqdm.auto import tqdm

    class Bar(tqdm):  # type: ignore[misc]
        monitor_interval = 0  # no monitor thread left behind (the bar is updated as chunks go)

    return Bar(total=total, unit="task", desc="zdq insert", dynamic_ncols=True)


class TaskDefaults:
    """The pool's default task options, and the one merge of a call's options over them."""

    __slots__ = ("options", "_plain")

    def __init__(self, options: TaskOptions) -> None:
        self.options = options
        #: What a call with no option of its own gets (``None``: nothing travels with its tasks).
        self._plain = None if options == _NO_OPTIONS else options

    def merge(
        self,
        retries: int | None = None,
        retry_backoff: float | None = None,
        retry_on: tuple[type[BaseException], ...] | type[BaseException] | None = None,
        time_limit: float | str | None = None,
        hard: bool | None = None,
    ) -> TaskOptions | None:
        """Task options from a call's keywords (``None``: not given) over the defaults; ``None``
        when they are all the default ones. Five identity tests on the plain path (and no
        ``**kwargs``: a dict per call would be made for nothing)."""
        if retries is None and retry_backoff is None and retry_on is None and time_limit is None and hard is None:
            return self._plain
        given = {
            "retries": retries,
            "retry_backoff": retry_backoff,
            "retry_on": retry_on,
            "time_limit": time_limit,
            "hard": hard,
        }
        return self.merge_all(**{k: v for k, v in given.items() if v is not None})

    def merge_all(self, **given: Any) -> TaskOptions | None:
        """:meth:`merge` for any :class:`TaskOptions` field given by name (``submit_call``'s
        ``**options``). ``None`` is "not given", except ``time_limit=None`` named explicitly,
        which lifts the pool's default time limit for these tasks (as it always did), and its
        ``hard`` with it. ``hard=True`` without a time limit here or in the defaults raises
        ``ValueError``."""
        lift_limit = "time_limit" in given and given["time_limit"] is None
        given = {k: v for k, v in given.items() if v is not None}
        if not given and not lift_limit:
            return self._plain
        unknown = set(given) - set(TaskOptions.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown task options {sorted(unknown)} (TaskOptions has {sorted(TaskOptions.__dataclass_fields__)})")
        retry_on = given.pop("retry_on", None)
        time_limit = given.pop("time_limit", None)
        d = self.options
        fields: dict[str, Any] = {
            "retries": d.retries,
            "retry_backoff": d.retry_backoff,
            "retry_on": d.retry_on if retry_on is None else retry_on,
            "time_limit": (
                None if lift_limit else d.time_limit if time_limit is None else seconds_or_none(time_limit, "time_limit")
            ),
            "hard": False if lift_limit else d.hard,
        }
        fields.update(given)
        if isinstance(fields["retry_on"], type):
            fields["retry_on"] = (fields["retry_on"],)
        options = TaskOptions(**fields)
        return None if options == _NO_OPTIONS else options


def rate_limited(fn: Any, rate_limit: Any, n_queues: int) -> tuple[tuple[bytes, float] | None, int]:
    """A per-call ``rate_limit=`` of ``fn``'s tasks: ``((key, each queue's share), most tasks per
    chunk)``, or ``(None, 0)`` for none. The key is ``fn``'s ``module:qualname`` (see
    :mod:`zdq.codec.rates`); raises ``TypeError``/``ValueError`` for a rate that is not one."""
    rate = share(rate_of(rate_limit), n_queues)
    if rate is None:
        return None, 0
    return (rate_key_of(fn), rate), chunk_cap(rate)


def with_limit(timing: Timing | None, limit: tuple[bytes, float] | None) -> Timing | None:
    """``timing`` with a per-call rate limit's tags (the broker's bucket key and rate)."""
    if limit is None:
        return timing
    return dataclasses.replace(timing or Timing(), rate_key=limit[0], rate=limit[1])


def _limited_batch(
    calls: Sequence[tuple[Any, ...]], rate_limit: Any, n_queues: int, timing: Timing | None, batch_size: int | None
) -> tuple[Timing | None, int | None]:
    """A batch's timing with its function's rate limit, and its chunk size capped for it."""
    fns = {call[0] for call in calls if isinstance(call, tuple) and call}
    if len(fns) > 1:
        raise ValueError(
            f"rate_limit= on batch_submit limits one function, and this batch calls {len(fns)}: submit each "
            "function's calls in a batch of their own"
        )
    if not fns:
        return timing, batch_size
    limit, cap = rate_limited(fns.pop(), rate_limit, n_queues)
    return with_limit(timing, limit), (min(batch_size, cap) if batch_size else cap) if limit else batch_size


class SubmitTarget(Protocol):
    """What a :class:`Submitter` needs of its pool."""

    settings: PoolSettings
    n_queues: int

    @property
    def driver(self) -> Driver: ...

    @property
    def consumer_batch_size(self) -> int | None: ...

    def consumer_count(self) -> int: ...

    def why_waiting(self) -> str: ...

    @property
    def wait_hint(self) -> WaitHint: ...


def _calls_hold_futures(calls: list[tuple[Any, ...]]) -> bool:
    """Whether the arguments of ``calls`` ``(fn, *args)`` (one ``fn``) hold futures: the types of
    all their items are gathered in C first, and plain ones alone (the usual case) end the look."""
    kinds = set(map(type, itertools.chain.from_iterable(calls)))
    kinds.discard(type(calls[0][0]))  # fn's own: a callable is neither a future nor a container
    if kinds <= PLAIN:
        return False
    return holds_futures(itertools.chain.from_iterable(call[1:] for call in calls))


def _items_hold_futures(items: Iterable[Any]) -> bool:
    """Whether the items of a sized iterable of ``map``'s hold futures: none in a range; the
    types of a list's or tuple's items are gathered in C first, and plain ones alone end the look."""
    if type(items) is range:
        return False
    if type(items) in (list, tuple) and set(map(type, items)) <= PLAIN:
        return False
    return holds_futures(items)


class _Reading:
    """An iterable of the caller's, read until it ends or raises: an error of its own stops the
    reading as its end would (so that the tasks read before it are queued), and is kept for the
    caller to raise once they are."""

    __slots__ = ("_it", "error")

    def __init__(self, items: Iterable[Any]) -> None:
        self._it = iter(items)
        self.error: Exception | None = None

    def __iter__(self) -> _Reading:
        return self

    def __next__(self) -> Any:
        if self.error is not None:
            raise StopIteration
        try:
            return next(self._it)
        except StopIteration:
            raise
        except Exception as e:
            self.error = e
            raise StopIteration from None


class Submitter:
    """Calls, batches and iterables of a pool, pickled and handed to its driver.

    The pool is passed to each call, never kept: a pool dropped without close() must be freed by
    reference counting alone (no cycle), so that its finalizer stops its driver at once.
    """

    __slots__ = ("defaults",)

    def __init__(self, defaults: TaskDefaults) -> None:
        self.defaults = defaults

    def call(
        self,
        driver: Driver,
        fn: Callable[..., Any] | str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        options: TaskOptions | None,
        timeout: float | None,
        delay: float | datetime.timedelta | None,
        eta: datetime.datetime | None,
        priority: int | None,
        unique: tuple[Any, Any] | None = None,
        expires: Any = None,
        limit: tuple[bytes, float] | None = None,
    ) -> TaskFuture:
        """One call; ``options`` already merged. Futures among the arguments (see
        :mod:`zdq.client.dependencies`) hold the call in this process until they are done (its
        ``delay`` and ``expires`` then count from when it is sent). ``unique``: the call's
        ``(unique_key, unique_for)``, if either was given; ``limit``: a per-call rate limit's
        ``(key, rate per queue)`` (see :func:`rate_limited`)."""
        if not callable(fn):
            if type(fn) is not str:
                raise TypeError(f"submit() needs a callable or a task name 'package.module:function', got {fn!r:.80}")
            check_task_name(fn)  # imported by the consumer that runs it
        if may_hold(args, kwargs):  # one isinstance per argument on the plain path
            inputs = find_futures(args, kwargs)
            if inputs:
                timeout_or_none(timeout)  # a bad one is refused now, not when the inputs are done
                if delay is not None or eta is not None or priority is not None or expires is not None:
                    timing_of(delay, eta, priority, expires)  # checked now too (a delay counts from the launch)
                if unique is not None:
                    unique_timing(None, *unique)

                def launch(a: tuple[Any, ...], k: dict[str, Any]) -> TaskFuture:
                    return self.call(driver, fn, a, k or None, options, timeout, delay, eta, priority, unique, expires, limit)

                return hold(inputs, launch, args, kwargs)
        timeout = timeout_or_none(timeout)
        # Six identity tests when unused: the plain path builds nothing more per task.
        if delay is None and eta is None and priority is None and expires is None and unique is None and limit is None:
            return driver.submit_task(dumps_task(call_task(fn, args, kwargs, options)), timeout=timeout)
        timing = with_limit(timing_of(delay, eta, priority, expires), limit)
        if unique is not None:  # a unique task: a chunk of its own, for the queue that owns its key
            timing = unique_timing(timing, *unique)
        task = dumps_task(call_task(fn, args, kwargs, with_expiry(options, timing)))
        if timing is None:  # priority=0 alone
            return driver.submit_task(task, timeout=timeout)
        return driver.submit_timed(task, timing, timeout=timeout)

    def item(self, driver: Driver, item: Any, expires: Any = None) -> TaskFuture:
        if expires is None:
            return driver.submit_task(dumps_task(item_task(item)))
        timing = Timing(expires=expiry_of(expires))
        # A raw item's entry with options of its own: (None, item, kwargs, options).
        return driver.submit_timed(dumps_task((None, item, None, with_expiry(None, timing))), timing)

    def _chunk_size(self, pool: SubmitTarget, chunking: Chunking, batch_size: int | None, n_tasks: int | None = None) -> int:
        """Tasks per chunk of a batch of ``n_tasks`` (see :meth:`Chunking.batch_size`)."""
        return chunking.batch_size(
            batch_size,
            n_tasks,
            consumer_batch_size=pool.consumer_batch_size,
            consumers=pool.consumer_count() if n_tasks is not None else 0,
            queues=pool.n_queues,
        )

    def calls(
        self,
        pool: SubmitTarget,
        list_calls: Sequence[tuple[Any, ...]],
        options: TaskOptions | None,
        batch_size: int | None,
        timeout: float | None,
        timing: Timing | None,
    ) -> BatchFuture:
        calls = list_calls if isinstance(list_calls, list) else list(list_calls)
        shared = check_calls(calls)
        return self.entries(pool, calls, CALLS, options, batch_size, timeout, timing, shared=shared)

    def items(
        self, pool: SubmitTarget, items: Sequence[Any], batch_size: int | None, timeout: float | None, expires: Any = None
    ) -> BatchFuture:
        timing = None if expires is None else Timing(expires=expiry_of(expires))
        options = with_expiry(self.defaults.merge(), timing)
        return self.entries(pool, list(items), ITEMS, options, batch_size, timeout, timing)

    def entries(
        self,
        pool: SubmitTarget,
        entries: list[Any],
        kind: int,
        options: TaskOptions | None,
        batch_size: int | None,
        timeout: float | None,
        timing: Timing | None = None,
        *,
        make: Callable[[int, int], BatchFuture] = BatchFuture,
        spread: bool = True,
        shared: Any = None,
    ) -> BatchFuture:
        """``entries`` queued as one batch; ``make(first_id, n)`` makes its future. ``spread``:
        smaller chunks for a small batch, so that every consumer gets some (a map's slice is not
        spread: the slices in flight are, together). ``shared``: the function every one of the
        CALLS ``entries`` shares (:func:`check_calls`), for chunks packed by columns."""
        driver = pool.driver
        timeout = timeout_or_none(timeout)
        chunking = Chunking.of(pool.settings)
        size = self._chunk_size(pool, chunking, batch_size, len(entries) if spread else None)
        base = driver.reserve(len(entries))
        # Pickle everything before sending anything: a task that cannot be pickled leaves nothing
        # queued (its reserved ids are simply never used).
        try:
            packed = chunking.pack_batch(base, entries, size, driver.payload_key, kind, options, shared)
        except SerializationError as e:
            if e.task_id is None:
                raise
            raise SerializationError(f"item {e.task_id - base} of the batch: {e}; nothing of the batch was queued") from e
        batch = make(base, len(entries))
        batch._hint = pool.wait_hint  # why_waiting, and whether the batch can run at all
        batch._driver = driver
        i = 0
        while i < len(packed):
            try:
                i = driver.submit_chunks(packed, i, batch, base, timeout=timeout, timing=timing)
            except SubmitTimeout as e:
                queued = packed[i].first - base
                if not queued:
                    if len(packed) == 1:
                        raise
                    # The wait was its first chunk's: the message counts the batch's tasks too.
                    raise SubmitTimeout(
                        f"{e} (the first chunk of a batch of {counted(len(entries), 'task')}: "
                        "nothing of the batch was queued)"
                    ) from None
                # Part of the batch is queued and will run: its future must still settle.
                error = SubmitTimeout(
                    f"{e} ({queued} of the batch's {counted(len(entries), 'task')} {agreeing(queued)} "
                    "queued before the timeout: "
                    "they run and report on this error's .future, where the others hold this error; "
                    "error.future.cancel() cancels those that have not started)"
                )
                error.future, error.queued = batch, queued
                batch._fail(queued, len(entries) - queued, error)
                raise error from None
        return batch

    def stream(
        self,
        pool: SubmitTarget,
        calls: Iterable[tuple[Any, ...]],
        options: TaskOptions | None,
        batch_size: int | None,
        timeout: float | None,
        total: int | None,
        progress: bool,
        timing: Timing | None,
        futures: list[TaskFuture] | None = None,
    ) -> int:
        """Calls from any iterable, lazily, in flat memory; return the count. With ``futures``,
        each task's future is appended to it as its chunk is queued (``map``); without, the
        results go to ``results()`` only."""
        driver = pool.driver
        timeout = timeout_or_none(timeout)
        chunking = Chunking.of(pool.settings)
        if total is not None and (not isinstance(total, int) or isinstance(total, bool) or total < 0):
            raise ValueError(f"total must be a non-negative integer, got {total!r}")
        if total is None and hasattr(calls, "__len__"):
            total = len(calls)  # type: ignore[arg-type]
        # A known total is spread over every consumer, as a batch is; an endless stream is not.
        size = self._chunk_size(pool, chunking, batch_size, total or None)
        count = 0
        bar = insert_bar(total) if progress else None
        reading = _Reading(calls)
        hint = None if futures is None else pool.wait_hint
        # A map cancels what it queued on any error, its iterables' too: read without the soft stop.
        source = reading if futures is None else calls
        try:
            for part in chunking.batches(source, size):
                check_calls(part, count)
                base = driver.reserve(len(part))
                try:
                    packed = chunking.pack(base, part, driver.payload_key, CALLS, options)
                except SerializationError as e:
                    raise _cut_off(e, count + e.task_id - base if e.task_id is not None else None, count, futures) from e
                _queue_packed(driver, packed, hint, timeout, timing, futures)
                count += len(part)
                if bar is not None:
                    bar.update(len(part))
        finally:
            if bar is not None:
                bar.close()
        if reading.error is not None:
            # The caller's iterable failed: what it gave before is queued (above), and said so.
            were = agreeing(count)
            reading.error.add_note(f"zdq: the {counted(count, 'task')} read from the iterable before this error {were} queued")
            raise reading.error
        return count

    def map_columns(
        self,
        pool: SubmitTarget,
        fn: Callable[..., Any],
        iterables: Sequence[Sequence[Any]],
        total: int,
        options: TaskOptions | None,
        batch_size: int | None,
        timeout: float | None,
        timing: Timing | None,
        futures: list[TaskFuture],
    ) -> None:
        """``queue_pool.map`` of the callable ``fn`` over lists, tuples and ranges (:data:`_SLICED`)
        that hold no futures: what :meth:`stream` does for it, without a ``(fn, *args)`` tuple per
        call. Each chunk's arguments are slices of the iterables themselves (its columns), packed
        by columns (:meth:`Chunking.pack_columns`) and queued as they are packed, chunk by chunk
        within the driver's window (a full one blocks; ``timeout`` bounds each wait); each task's
        future is appended to ``futures`` as its chunk is queued. A call that cannot be pickled
        raises :class:`SerializationError` naming its item; the chunks before it are queued (the
        map cancels them)."""
        driver = pool.driver
        timeout = timeout_or_none(timeout)
        chunking = Chunking.of(pool.settings)
        size = self._chunk_size(pool, chunking, batch_size, total or None)
        hint = pool.wait_hint
        for start in range(0, total, size):
            n = min(size, total - start)
            columns = [_column(items, start, n) for items in iterables]
            base = driver.reserve(n)
            try:
                packed = chunking.pack_columns(base, fn, n, columns, driver.payload_key, options)
            except SerializationError as e:
                raise _cut_off(e, start + e.task_id - base if e.task_id is not None else None, start, futures) from e
            _queue_packed(driver, packed, hint, timeout, timing, futures)


def _cut_off(e: SerializationError, item: int | None, queued: int, futures: list[TaskFuture] | None) -> SerializationError:
    """The error of calls read and queued chunk by chunk, cut off by one that cannot be pickled
    (``item``: its position, when known): what came before it was queued, and runs (``queued``),
    but for a map (``futures``), which cancels it."""
    at = f"item {item}: " if item is not None else ""
    if futures is None:
        error = SerializationError(f"{at}{e} ({counted(queued, 'task')} before this chunk {agreeing(queued)} queued, and run)")
        error.queued = queued
    else:
        error = SerializationError(
            f"{at}{e} (the {counted(queued, 'task')} map() queued before this chunk {agreeing(queued, 'is', 'are')} cancelled)"
        )
    return error


#: The iterables whose items ``queue_pool.map`` takes by slices (:meth:`Submitter.map_columns`).
_SLICED = frozenset({list, tuple, range})


def _column(items: Sequence[Any], start: int, n: int) -> list[Any]:
    """The ``n`` items of ``items`` (a list, tuple or range) from ``start``, as a list."""
    part = items[start : start + n]
    column = part if type(part) is list else list(part)
    if len(column) != n:
        raise RuntimeError(f"map(): an iterable of {type(items).__name__} changed size during the map")
    return column


def _queue_packed(
    driver: Driver,
    packed: list[Packed],
    hint: WaitHint | None,
    timeout: float | None,
    timing: Timing | None,
    futures: list[TaskFuture] | None,
) -> None:
    """Queue a streamed part's ``packed`` chunks one by one (each blocks while the window is full,
    at most ``timeout``); with ``futures`` (a map), each chunk's tasks' futures are appended to it
    once it is queued: they live in their chunk, which the driver settles as a batch."""
    for first, n, payload in packed:
        sink = None if futures is None else MapChunk(first, n, hint, driver)
        driver.submit_chunk(first, n, payload, sink, 0, timeout=timeout, timing=timing)
        if sink is not None:
            futures.extend(sink.futures())  # type: ignore[union-attr]  # queued: they will settle


#: How often a map's slice blocked on a full window looks whether it must stop (a shutdown).
_CHECK_EVERY = 0.2


def _send_slice(
    driver: Driver, packed: list[Packed], batch: MapBatch, base: int, timeout: float | None, check: Callable[[], None] | None
) -> None:
    """Queue a map slice's ``packed`` chunks as the window has room, within ``timeout``, calling
    ``check`` between waits; on any error, the chunks queued are cancelled without waiting (the
    slice is not handed to the map, which cannot cancel it) and the error raised."""
    deadline = None if timeout is None else time.monotonic() + timeout
    i = 0
    try:
        while i < len(packed):
            if check is not None:
                check()
            step = _CHECK_EVERY if deadline is None else min(_CHECK_EVERY, max(0.0, deadline - time.monotonic()))
            try:
                i = driver.submit_chunks(packed, i, batch, base, timeout=step)
            except SubmitTimeout:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
    except BaseException:
        if i:
            cancel_slices([batch], wait=False)
        raise


class SubmitMethods:
    """The submission API of :class:`~zdq.QueuePool` (daskqueue's, and zdq's additions): each a
    thin layer over the pool's :class:`Submitter`, with the options merged once."""

    _submitter: Submitter

    # What the submitter needs of the pool it is given (the pool's own attributes).
    settings: PoolSettings
    n_queues: int

    @property
    def driver(self) -> Driver:
        raise NotImplementedError

    @property
    def consumer_batch_size(self) -> int | None:
        raise NotImplementedError

    def consumer_count(self) -> int:
        raise NotImplementedError

    def why_waiting(self) -> str:
        raise NotImplementedError

    @property
    def wait_hint(self) -> WaitHint:
        raise NotImplementedError

    def submit(
        self,
        fn: Callable[..., Any] | str,
        *args: Any,
        retries: int | None = None,
        retry_backoff: float | None = None,
        retry_on: tuple[type[BaseException], ...] | type[BaseException] | None = None,
        time_limit: float | str | None = None,
        hard: bool | None = None,
        timeout: float | None = None,
        worker_class: type | None = None,
        delay: float | datetime.timedelta | None = None,
        eta: datetime.datetime | None = None,
        priority: int | None = None,
        unique_key: str | None = None,
        unique_for: float | datetime.timedelta | None = None,
        expires: float | datetime.timedelta | datetime.datetime | None = None,
        rate_limit: float | str | None = None,
        **kwargs: Any,
    ) -> TaskFuture:
        """Queue ``fn(*args, **kwargs)``; return a future of its result.

        Parameters
        ----------
        fn : callable or str
            The function, or its name ``"package.module:function"`` (or
            ``"package.module:Class.method"``; Celery's ``send_task``): this process then needs
            neither the code nor its module, the consumer imports it. A name of another form
            raises ``ValueError`` here; one the consumer cannot import fails the task's future with
            ``ImportError`` naming the module, the attribute and the worker.
        retries : int, optional
            Extra attempts after a failure (exponential backoff with jitter, starting at
            ``retry_backoff`` seconds); after the last one the task is dead-lettered.
        retry_on : exception type or tuple of them, optional
            Only these are retried (default: any ``Exception``).
        time_limit : float, optional
            Time limit of one attempt: an attempt running longer fails with ``TaskTimeout``. The
            attempt itself goes on, abandoned on its thread (Python cannot kill a thread), unless
            ``hard``.
        hard : bool, optional
            Run each attempt in a child process of the consumer, killed (SIGKILL) at
            ``time_limit``: the future fails with ``TaskTimeout`` saying so, the process's memory
            is freed, the consumer goes on. Needs a ``time_limit`` (or the pool's), else
            ``ValueError``. The function, arguments and value must pickle; a child process that
            dies on its own fails the task with ``TaskProcessDied``. It costs a round trip between
            processes per task (see the README).
        timeout : float, optional
            How long this call may block while the driver's buffers are full (a stalled or lost
            broker); past it, :class:`~zdq.errors.SubmitTimeout` and nothing is queued.
        worker_class : type, optional
            Accepted for daskqueue compatibility: submitted functions run on any consumer, so it
            must be a :class:`GeneralConsumer` subclass, as daskqueue required.
        delay : float or timedelta, optional
            Seconds from now before the task may start (the broker holds it until then; a
            durable queue keeps the time across restarts).
        eta : datetime, optional
            A timezone-aware time before which the task may not start (instead of ``delay``).
        priority : int, optional
            Within its queue, a higher priority is served first; equal priorities are first in,
            first out (default 0). Chunks already with a consumer (its prefetch) run first.
        unique_key : str, optional
            While a task submitted with this key is queued or running in the pool (by any
            producer), another submission with it queues nothing: its future settles with that
            task's outcome (its ``key`` is still its own task id). Its key is free again when the
            task ends. Keys go to one queue each; a durable queue keeps them across a restart.
            1 to 1024 bytes in UTF-8.
        unique_for : float or timedelta, optional
            Also hold the key this long after the broker stored the task, even once it ended: a
            submission with the key in that window after the task ended fails with
            :class:`~zdq.errors.DuplicateTask` (naming when the key is free again).
        expires : float, timedelta or datetime, optional
            Seconds from now (or a timezone-aware time) after which the task does not start: if
            it has not by then, it never runs and its future fails with
            :class:`~zdq.errors.TaskExpired` (Celery's ``expires``, RQ's ``ttl``). Its broker
            checks before it hands the task out, its consumer before it starts it; a durable
            queue keeps the time across restarts. It must come after a ``delay`` or ``eta``.
        rate_limit : str or float, optional
            At most this many of ``fn``'s tasks start per second in the pool, as Celery's task
            ``rate_limit``: ``"100/s"``, ``"6000/m"``, ``"10/h"`` or tasks per second. Counted per
            function (its ``module:qualname``) across every call that gives one, by the queues'
            brokers (each holds its share); the latest rate given for a function wins. Tasks of
            other functions do not wait behind them.

        These keywords are zdq's own: to pass keyword arguments of those names to ``fn``,
        use :meth:`submit_call`.

        Raises
        ------
        SerializationError
            ``fn`` or an argument cannot be pickled; nothing was queued.
        TypeError, ValueError
            A ``delay``, ``eta``, ``priority`` or ``expires`` that is not one (the message names
            it); nothing was queued.
        """
        if worker_class is not None:
            check_worker_class(worker_class)
        s = self._submitter
        options = s.defaults.merge(retries, retry_backoff, retry_on, time_limit, hard)
        unique = None if unique_key is None and unique_for is None else (unique_key, unique_for)
        limit = None if rate_limit is None else rate_limited(fn, rate_limit, self.n_queues)[0]
        return s.call(self.driver, fn, args, kwargs, options, timeout, delay, eta, priority, unique, expires, limit)

    def submit_call(
        self,
        fn: Callable[..., Any] | str,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        delay: float | datetime.timedelta | None = None,
        eta: datetime.datetime | None = None,
        priority: int | None = None,
        unique_key: str | None = None,
        unique_for: float | datetime.timedelta | None = None,
        expires: float | datetime.timedelta | datetime.datetime | None = None,
        **options: Any,
    ) -> TaskFuture:
        """Like :meth:`submit` with explicit ``args``/``kwargs``; ``options`` as in :class:`TaskOptions`."""
        s = self._submitter
        unique = None if unique_key is None and unique_for is None else (unique_key, unique_for)
        merged = s.defaults.merge_all(**options)
        return s.call(self.driver, fn, args, kwargs, merged, timeout, delay, eta, priority, unique, expires)

    async def asubmit(self, fn: Callable[..., Any] | str, *args: Any, **kwargs: Any) -> TaskFuture:
        """:meth:`submit` for coroutines: never blocks the event loop. A full submission window
        is awaited on a helper thread instead of waited for on the loop; the returned future can
        be awaited (``await (await queue_pool.asubmit(f, x))``)."""
        try:
            return self.submit(fn, *args, **{**kwargs, "timeout": 0})
        except SubmitTimeout:  # the window is full: wait for room off the loop
            timeout = kwargs.pop("timeout", None)
            return await asyncio.to_thread(functools.partial(self.submit, fn, *args, timeout=timeout, **kwargs))

    async def abatch_submit(self, list_calls: Sequence[tuple[Any, ...]], **kwargs: Any) -> BatchFuture:
        """:meth:`batch_submit` for coroutines: the batch is pickled and queued on a helper thread,
        so the event loop goes on meanwhile; the returned future can be awaited."""
        return await asyncio.to_thread(functools.partial(self.batch_submit, list_calls, **kwargs))

    @off_loop_when_async
    def put(self, item: Any, *, expires: float | datetime.timedelta | datetime.datetime | None = None) -> TaskFuture:
        """Queue a raw item for the consumers' ``process_item``; return a future of its result.
        ``expires`` is :meth:`submit`'s."""
        return self._submitter.item(self.driver, item, expires)

    @off_loop_when_async
    def batch_submit(
        self,
        list_calls: Sequence[tuple[Any, ...]],
        batch_size: int | None = None,
        timeout: float | None = None,
        *,
        retries: int | None = None,
        retry_backoff: float | None = None,
        retry_on: tuple[type[BaseException], ...] | type[BaseException] | None = None,
        time_limit: float | str | None = None,
        hard: bool | None = None,
        worker_class: type | None = None,
        sync_mode: bool = True,
        delay: float | datetime.timedelta | None = None,
        eta: datetime.datetime | None = None,
        priority: int | None = None,
        expires: float | datetime.timedelta | datetime.datetime | None = None,
        rate_limit: float | str | None = None,
    ) -> BatchFuture:
        """Queue many calls ``(fn, *args)`` at once; return one future of all their results.
        ``fn`` may be a task name, as in :meth:`submit`.

        The calls are pickled into chunks of at most ``batch_size`` (and ``chunk-size``) tasks
        before anything is sent: if one of them cannot be pickled, :class:`SerializationError`
        names it and nothing of the batch is queued. ``timeout`` bounds how long this call may
        block on a full submission window (``time_limit`` is the tasks' own time limit);
        ``retries``, ``retry_backoff``, ``retry_on`` and ``hard`` are as in :meth:`submit`. ``worker_class``
        and ``sync_mode`` are daskqueue's (the first is checked as in :meth:`submit`, the second
        has no effect: a batch is always sent from this process). ``delay``, ``eta`` and
        ``priority`` are as in :meth:`submit`, for every call of the batch (one release time);
        ``expires`` too (one expiry time: each task that has not started by then fails with
        :class:`~zdq.errors.TaskExpired`, the others run), and ``rate_limit``, for a batch of calls
        of one function (cut into chunks small enough that their starts are smooth: a twentieth of
        a second of the rate).
        """
        check_worker_class(worker_class)
        timing = timing_of(delay, eta, priority, expires)
        if rate_limit is not None:
            timing, batch_size = _limited_batch(list_calls, rate_limit, self.n_queues, timing, batch_size)
        s = self._submitter
        options = with_expiry(s.defaults.merge(retries, retry_backoff, retry_on, time_limit, hard), timing)
        return s.calls(self, list_calls, options, batch_size, timeout, timing)

    @off_loop_when_async
    def put_many(
        self,
        items: Sequence[Any],
        batch_size: int | None = None,
        timeout: float | None = None,
        *,
        expires: float | datetime.timedelta | datetime.datetime | None = None,
    ) -> BatchFuture:
        """Queue many raw items at once; same guarantees as :meth:`batch_submit` (``expires`` too)."""
        return self._submitter.items(self, items, batch_size, timeout, expires)

    @off_loop_when_async
    def submit_iter(
        self,
        calls: Iterable[tuple[Any, ...]],
        *,
        batch_size: int | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        retry_backoff: float | None = None,
        retry_on: tuple[type[BaseException], ...] | type[BaseException] | None = None,
        time_limit: float | str | None = None,
        hard: bool | None = None,
        total: int | None = None,
        progress: bool = False,
        delay: float | datetime.timedelta | None = None,
        eta: datetime.datetime | None = None,
        priority: int | None = None,
        expires: float | datetime.timedelta | datetime.datetime | None = None,
    ) -> int:
        """Queue calls ``(fn, *args)`` from any iterable, lazily, in flat memory; return the count.

        ``progress=True`` shows a bar of the tasks inserted (python-task-queue's
        ``insert(..., total=)``), against ``total`` when given (or ``len(calls)`` when it has one).

        Memory stays flat because at most ``window`` chunks per broker are waiting for
        confirmation. Unlike :meth:`batch_submit` this does not hold the whole submission: if
        item ``k`` cannot be pickled, the chunks before it are already queued and the
        :class:`SerializationError` says how many tasks were. ``timeout`` bounds each wait for
        room (:class:`~zdq.errors.SubmitTimeout`); the task options are as in :meth:`submit`.
        ``delay``/``eta`` and ``priority`` too: a ``delay`` is counted from this call, the same
        release time for every task of the iterable, however long it takes to read (and ``expires``,
        one expiry time).
        """
        self.driver  # a pool that is not started or is closed raises ClosedError here
        timing = timing_of(delay, eta, priority, expires)
        s = self._submitter
        options = with_expiry(s.defaults.merge(retries, retry_backoff, retry_on, time_limit, hard), timing)
        return s.stream(self, calls, options, batch_size, timeout, total, progress, timing)

    @off_loop_when_async
    def map(
        self,
        fn: Callable[..., Any] | str,
        *iterables: Iterable[Any],
        retries: int | None = None,
        retry_backoff: float | None = None,
        retry_on: tuple[type[BaseException], ...] | type[BaseException] | None = None,
        time_limit: float | str | None = None,
        hard: bool | None = None,
        timeout: float | None = None,
        batch_size: int | None = None,
        worker_class: type | None = None,
        delay: float | datetime.timedelta | None = None,
        eta: datetime.datetime | None = None,
        priority: int | None = None,
        expires: float | datetime.timedelta | datetime.datetime | None = None,
        rate_limit: float | str | None = None,
        **kwargs: Any,
    ) -> list[TaskFuture]:
        """``fn`` over the iterables' items (zipped, as Dask's ``client.map``); return a future
        per call, in order. ``kwargs`` go to every call of ``fn``. ``fn`` may be a task name, as
        in :meth:`submit` (then without ``kwargs``). At least one iterable is needed (a ``TypeError``
        otherwise, as Dask's): to run ``fn`` once, :meth:`submit` it.

        Futures among the items (of lists, tuples and other sized iterables) or in ``kwargs``
        are resolved as :meth:`submit` resolves them: each call is then submitted on its own once
        its inputs are done. An iterator's items are not scanned: a future there is refused.

        The calls are read and queued in chunks, as :meth:`submit_iter` does (bounded by the
        driver's window: a full one blocks, ``timeout`` bounds each wait), not one by one; the
        task options are :meth:`submit`'s, for every call (``rate_limit`` too, counted per task as
        :meth:`batch_submit` counts it; ``unique_key``/``unique_for`` are one task's and are
        refused). Dask's scheduling keywords (``key``, ``workers``, ``resources``, ``pure=True``
        ...) mean nothing to a queue, and are refused rather than passed to ``fn``.
        """
        if not iterables:
            raise TypeError(
                "map() needs at least one iterable of arguments for fn (as Dask's client.map); to run fn once, "
                "use submit(fn)"
            )
        if "unique_key" in kwargs or "unique_for" in kwargs:
            raise TypeError(
                "map(): unique_key and unique_for make one task unique, and a map makes many: submit() each "
                "task that must be unique (to pass keyword arguments of those names to fn, map a functools.partial of it)"
            )
        refused = sorted(_DASK_ONLY & set(kwargs))
        if kwargs.get("pure", False) is False:
            kwargs.pop("pure", None)  # every call runs anyway: Dask's pure=False
        else:
            refused.append("pure")
        if refused:
            raise TypeError(
                f"map(): {', '.join(refused)} are Dask scheduler options, which zdq's queues do not take "
                "(to pass keyword arguments of those names to fn, map a functools.partial of it)"
            )
        if worker_class is not None:
            check_worker_class(worker_class)
        if not callable(fn) and type(fn) is not str:
            raise TypeError(f"map() needs a callable or a task name 'package.module:function', got {fn!r:.80}")
        if type(fn) is str:
            check_task_name(fn)
            if kwargs:
                raise TypeError("map() of a task name takes no keyword arguments for it: use submit_call() per call")
        self.driver  # a pool that is not started or is closed raises ClosedError here
        timing = timing_of(delay, eta, priority, expires)
        limit, cap = (None, 0) if rate_limit is None else rate_limited(fn, rate_limit, self.n_queues)
        if limit is not None:  # the batch's way: every chunk tagged, and cut small enough to start smoothly
            timing = with_limit(timing, limit)
            batch_size = min(batch_size, cap) if batch_size else cap
        s = self._submitter
        options = s.defaults.merge(retries, retry_backoff, retry_on, time_limit, hard)
        call = functools.partial(fn, **kwargs) if kwargs and not isinstance(fn, str) else fn
        sized = all(hasattr(it, "__len__") for it in iterables)
        total = min((len(it) for it in iterables), default=0) if sized else None  # type: ignore[arg-type]
        calls = zip(itertools.repeat(call), *iterables)  # (call, *args), made in C
        futures: list[TaskFuture] = []
        # Futures among the items (sized iterables are scanned; an iterator is not read twice):
        # each call goes as submit() sends it, held until its inputs are done.
        held = holds_futures(kwargs.values()) or (
            sized and any(_items_hold_futures(it) for it in iterables)
        )
        try:
            if held:
                for args in zip(*iterables):
                    futures.append(
                        s.call(
                            self.driver, fn, args, kwargs or None, options, timeout, delay, eta, priority,
                            expires=expires, limit=limit,
                        )
                    )
            elif total and callable(call) and all(type(it) in _SLICED for it in iterables):
                # No tuple per call: the chunks' columns are slices of the iterables themselves.
                s.map_columns(
                    self, call, iterables, total, with_expiry(options, timing), batch_size, timeout, timing, futures  # type: ignore[arg-type]
                )
            else:
                s.stream(self, calls, with_expiry(options, timing), batch_size, timeout, total, False, timing, futures)
        except BaseException as e:
            # The caller gets no future: the tasks queued before the error are cancelled, not left
            # to run for nobody (those already started finish).
            from zdq.client.window import cancel_many

            # A timeout is raised at the timeout: the queues' answers to the cancellation (a
            # silent queue's within the driver's bound) are not waited for.
            cancel_many(futures, wait=not isinstance(e, ZdqTimeoutError))
            e.add_note(f"zdq: map() cancelled the {counted(len(futures), 'task')} it had queued before this error")
            raise
        return futures

    def map_chunk_size(self, n_tasks: int | None) -> int:
        """Tasks per chunk of a map with ``n_tasks`` in flight at most (``None``: unknown), spread
        over the consumers as a batch of that many is (see :meth:`map_slice`)."""
        return self._submitter._chunk_size(self, Chunking.of(self.settings), None, n_tasks)

    def map_slice(
        self,
        fn: Callable[..., Any] | str,
        calls: list[tuple[Any, ...]] | Columns,
        chunk: int,
        *,
        first: int = 0,
        timeout: float | None = None,
        check: Callable[[], None] | None = None,
        per_task: int = 1,
        plain: bool = False,
    ) -> Slice:
        """One slice of a map (``Executor.map``): the calls ``(fn, *args)`` (or the
        :class:`~zdq.client.window.Columns` of their arguments, packed as they are: no tuple per
        call) from the map's position ``first``, queued as one batch in chunks of ``chunk``
        tasks, whose outcomes the map takes by position (:class:`~zdq.client.window.MapBatch`: one future, one pickling per
        chunk). Calls whose arguments hold futures go one by one, as :meth:`submit` sends them
        (held until their inputs are done). The task options are the pool's defaults.
        ``per_task``: the map's items in each call (a chunked map's ``chunksize``), for messages.
        ``plain``: the caller knows that no argument holds a future (the map's iterables are
        ranges): the calls are not looked through for them.

        Blocks while the driver's window is full: at most ``timeout`` seconds, calling ``check``
        (which raises to stop: the executor was shut down) every :data:`_CHECK_EVERY` seconds
        meanwhile. When the wait ends so, what the slice had queued is cancelled (without waiting
        for the queues' answers) and the error raised.

        Raises
        ------
        TypeError
            ``fn`` is neither a callable nor a task name.
        SerializationError
            A call cannot be pickled (named by its position in the map); nothing of the slice
            was queued.
        SubmitTimeout
            No room in the window within ``timeout``.
        """
        s = self._submitter
        if not callable(fn):
            if type(fn) is not str:
                raise TypeError(f"map() needs a callable or a task name 'package.module:function', got {fn!r:.80}")
            check_task_name(fn)
        options = s.defaults.merge_all()
        # Executor.map's items may come by the columns of their arguments (no tuple per call).
        by_columns = calls if isinstance(calls, Columns) else None
        rows = cast("list[tuple[Any, ...]]", calls)  # read only when the calls are not by columns
        if not plain and (
            _calls_hold_futures(rows) if by_columns is None else any(map(_items_hold_futures, by_columns.columns))
        ):
            driver = self.driver
            one_by_one = rows if by_columns is None else by_columns.calls(fn)
            return FutureSlice([s.call(driver, fn, call[1:], None, options, timeout, None, None, None) for call in one_by_one])
        driver = self.driver
        base = driver.reserve(len(calls))
        try:
            chunking = Chunking.of(self.settings)
            if by_columns is not None:  # the map's items by columns: no tuple per call
                packed = chunking.pack_columns(base, fn, len(calls), by_columns.columns, driver.payload_key, options, chunk)
            else:  # the map's calls share its function: by columns (SHARED) where they have as many arguments
                packed = chunking.pack_batch(base, rows, chunk, driver.payload_key, CALLS, options, fn if callable(fn) else None)
        except SerializationError as e:
            if e.task_id is None:
                raise
            at = (first + e.task_id - base) * per_task
            which = f"item {at}" if per_task == 1 else f"the task of items {at}..{at + per_task - 1}"
            raise SerializationError(
                f"{which} of the map: {e}; nothing from item {first * per_task} on was queued"
            ) from e
        batch = MapBatch(base, len(calls))
        batch._hint = self.wait_hint
        batch._driver = driver
        _send_slice(driver, packed, batch, base, timeout, check)
        return batch

    @off_loop_when_async
    def gather(self, futures: Any, errors: str = "raise", *, timeout: float | None = None) -> Any:
        """:func:`zdq.gather`: the results of ``futures`` in the same structure, as Dask's
        ``client.gather``."""
        from zdq.client.gather import gather

        return gather(futures, errors, timeout=timeout)

    def executor(self) -> PoolExecutor:
        """A :class:`zdq.PoolExecutor` on this pool (its consumers run the tasks; its shutdown
        leaves the pool open)."""
        return PoolExecutor(self)  # type: ignore[arg-type]  # the mixin of QueuePool alone

    @off_loop_when_async
    def insert(self, tasks: Any, total: int | None = None, progress: bool | None = None, **kwargs: Any) -> int:
        """Queue :class:`~zdq.Task` objects (or callables of no argument), one or an iterable of
        them, lazily and in flat memory (python-task-queue's ``insert``); return the count.

        A thin layer over :meth:`submit_iter` (same bounds, keywords and errors), with a bar on
        by default against ``total`` (or the iterable's ``len``), but for one task given alone
        (python-task-queue's ``tq.insert(task)`` in a loop draws no bar per task). An item that is neither a Task
        nor a callable raises ``TypeError`` naming its position, after every item before it is
        queued; the iterable is not read past it.
        """
        calls, known = as_calls(tasks)
        if progress is None:
            progress = not calls.single
        count = self.submit_iter(calls, total=known if total is None else total, progress=progress, **kwargs)
        calls.check()
        return count
