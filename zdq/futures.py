"""Futures handed back by submissions.

Both kinds are :class:`concurrent.futures.Future` subclasses, so ``result(timeout)``,
``exception()``, ``done()``, ``add_done_callback()``, :func:`concurrent.futures.wait` and
:func:`concurrent.futures.as_completed` work as usual; both are also awaitable.

Done-callbacks never run on zdq's I/O thread: a future settled there hands its callbacks to its
driver's callback thread (:class:`CallbackRunner`), so a slow callback delays only other
callbacks, never results, and a callback may itself submit and wait on zdq. Futures without
callbacks (the common case) pay nothing for it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import operator
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator
from typing import Any

from zdq.config import timeout_or_none
from zdq.errors import BatchError, TaskCancelled, ZdqTimeoutError
from zdq.names import counted

__all__ = ["TaskFuture", "BatchFuture", "CallbackRunner", "OwnCallback", "own", "SayOnce", "SignalSafeCondition", "WaitHint", "wait", "as_completed"]

logger = logging.getLogger(__name__)


def wait(
    fs: Iterable[concurrent.futures.Future[Any]], timeout: float | None = None, return_when: str = concurrent.futures.ALL_COMPLETED
) -> concurrent.futures._base.DoneAndNotDoneFutures[Any]:
    """:func:`concurrent.futures.wait`, for any futures, zdq's or not; and, as a zdq future's
    ``result()`` does, it raises the error a zdq pool gives when some of the futures cannot be
    done as things stand (:class:`~zdq.errors.NoEligibleWorkers`: no consumer can be placed, or
    none serves their queue), instead of waiting for ever. The futures stay as they are.
    ``timeout`` is seconds or a Dask time string ("5s")."""
    fs = set(fs)
    timeout = wait_seconds(timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    step = _LOOK_EVERY
    say = _SayWhy("zdq.wait()") if deadline is None else None  # one with a timeout says nothing
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        got = concurrent.futures.wait(fs, step if left is None else min(step, left), return_when)
        if _met(got, return_when) or (left is not None and left <= step):
            return got
        error = _stuck_among(got.not_done)
        if error is not None:
            raise error
        if say is not None:
            say.look(got.not_done)
        step = min(2 * step, _LOOK_AT_MOST)  # each look costs a pass over the futures: fewer, later


def _met(got: concurrent.futures._base.DoneAndNotDoneFutures[Any], return_when: str) -> bool:
    """Whether :func:`concurrent.futures.wait` returned ``got`` because ``return_when`` was met."""
    if not got.not_done:
        return True
    if return_when == concurrent.futures.FIRST_COMPLETED:
        return bool(got.done)
    if return_when == concurrent.futures.FIRST_EXCEPTION:
        return any(not f.cancelled() and f.exception(0) is not None for f in got.done)
    return False


class SignalSafeCondition(threading.Condition):
    """A :class:`threading.Condition` whose ``with`` statement takes and gives back its lock
    directly, in C. ``Condition.__enter__`` is a Python frame: a signal's exception (a Ctrl-C on
    the main thread) raised as it returned, the lock just taken, left the lock held for good, and
    every thread that takes it after stopped there: the driver's I/O thread, and with it every
    task of the pool (reviewer 17). The methods are looked up in C too (a ``property`` whose
    getter is an ``attrgetter``): a lookup through a Python ``__get__`` let a signal's exception
    leave the ``with`` line before the lock was taken, and skip what had to follow it (reviewer
    19). The lock must be one of ``threading``'s, whose methods are compiled."""

    __enter__ = property(operator.attrgetter("_lock.__enter__"))
    __exit__ = property(operator.attrgetter("_lock.__exit__"))


def wait_seconds(timeout: Any) -> float | None:
    """A wait's ``timeout``: ``None``, a number (a negative one waits not at all, as the standard
    library's), or a Dask time string ("5s"); NaN and anything else raise ``ValueError`` naming it."""
    if timeout is None:
        return None
    if type(timeout) is int or (type(timeout) is float and timeout == timeout):
        return timeout
    return timeout_or_none(timeout)


#: Seconds a wait without a bound goes on before it says, once, why its futures are not done.
SAY_AFTER = 10.0


class SayOnce:
    """The moment a long wait speaks: :meth:`due` is true once, :data:`SAY_AFTER` seconds after the
    wait began (``waited``: seconds it had waited already when this was made), and never again.
    One for each thing that waits and may have to say why: :class:`_SayWhy`, the awaits of an
    event loop (:class:`_AwaitLooks`), the end of a ``zdq.local`` block."""

    __slots__ = ("started", "_said")

    def __init__(self, waited: float = 0.0) -> None:
        self.started = time.monotonic() - waited
        self._said = False

    @property
    def waited(self) -> float:
        return time.monotonic() - self.started

    def due(self) -> bool:
        if self._said or self.waited < SAY_AFTER:
            return False
        self._said = True
        return True


class _SayWhy:
    """What a long wait says: once, :data:`SAY_AFTER` seconds after it began, a warning naming
    what it waits for and the pool's reason (its hint: no consumer running, queues down...), when
    the pool gives one. A wait that the pool can explain is otherwise indistinguishable from a
    hang; one with no reason (tasks that run long) says nothing."""

    __slots__ = ("_what", "_once")

    def __init__(self, what: str, waited: float = 0.0) -> None:
        self._what = what
        self._once = SayOnce(waited)  # ``waited``: seconds it has waited already

    def look(self, fs: Iterable[concurrent.futures.Future[Any]]) -> None:
        if not self._once.due():
            return
        for f in fs:
            hint = getattr(f, "_hint", None)
            why = hint() if hint is not None and not f.done() else ""
            if why:
                logger.warning(
                    "zdq: %s has waited %.0f s for %r: %s (it waits on: give it a timeout to bound it)",
                    self._what, self._once.waited, f, why,
                )
                return


def _stuck_among(fs: Iterable[concurrent.futures.Future[Any]]) -> BaseException | None:
    """The error the pool of a pending zdq future among ``fs`` gives when that future cannot be
    done as things stand (what its ``result()`` raises), or ``None``. A few pending futures per
    pool are asked: once the queues that are served drain, what is left waits where none is."""
    asked: dict[int, int] = {}
    for f in fs:
        if f.done():
            continue
        hint = getattr(f, "_hint", None)
        stuck = getattr(hint, "stuck", None)
        if stuck is None or asked.get(id(hint), 0) >= _ASK_PER_POOL:
            continue
        asked[id(hint)] = asked.get(id(hint), 0) + 1
        error = stuck(f)
        if error is not None:
            return error
    return None


class as_completed:  # noqa: N801 - named as concurrent.futures.as_completed, which it extends
    """The futures ``fs`` as they complete, as :func:`concurrent.futures.as_completed` and Dask's
    ``as_completed``: ``for f in as_completed(fs)`` or, in a coroutine, ``async for f in
    as_completed(fs)`` (the event loop is never blocked).

    Futures may be added while it is iterated (:meth:`add`, :meth:`update`): iteration ends once
    every future added has been yielded. ``with_results=True`` yields ``(future, result)`` pairs
    (a failed future raises its error, or with ``raise_errors=False`` yields it as the result);
    :meth:`batches` yields lists of whatever is done at once. ``timeout`` counts from this call
    (as Dask's): past it, a :class:`~zdq.errors.ZdqTimeoutError` (a TimeoutError) says how many
    never completed. Any :class:`concurrent.futures.Future` is taken, zdq's or not.

    Who owns what: ``_pending`` (added, not done), ``_ready`` (done, not yielded) and ``_wakers``
    are this object's, under ``_cond``; the futures' done-callbacks (any thread) move a future
    from the first to the second. A future yielded is no longer referenced here.
    """

    def __init__(
        self,
        fs: Iterable[concurrent.futures.Future[Any]] | None = None,
        timeout: float | None = None,
        *,
        with_results: bool = False,
        raise_errors: bool = True,
    ) -> None:
        timeout = wait_seconds(timeout)
        self._timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._with_results = with_results
        self._raise_errors = raise_errors
        self._cond = SignalSafeCondition()
        self._pending: dict[int, concurrent.futures.Future[Any]] = {}
        self._ready: collections.deque[concurrent.futures.Future[Any]] = collections.deque()
        self._wakers: list[Callable[[], None]] = []
        self._total = 0
        self.update(dict.fromkeys(fs or ()))  # the initial futures once each, as concurrent.futures

    # -- adding ----------------------------------------------------------------------------------
    def add(self, future: concurrent.futures.Future[Any]) -> None:
        """Yield ``future`` too, once it is done (also while this is being iterated)."""
        if not isinstance(future, concurrent.futures.Future):
            raise TypeError(f"as_completed takes futures, got {future!r:.80}")
        with self._cond:
            self._pending[id(future)] = future
            self._total += 1
        future.add_done_callback(own(self._arrived))  # runs now if it is done already

    def update(self, futures: Iterable[concurrent.futures.Future[Any]]) -> None:
        """:meth:`add` each of ``futures``."""
        for future in futures:
            self.add(future)

    def _arrived(self, future: concurrent.futures.Future[Any]) -> None:
        with self._cond:
            if self._pending.pop(id(future), None) is None:
                return  # cleared meanwhile
            self._ready.append(future)
            self._cond.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    # -- what is left ----------------------------------------------------------------------------
    def count(self) -> int:
        """Futures added and not yielded yet (pending or done)."""
        with self._cond:
            return len(self._pending) + len(self._ready)

    def is_empty(self) -> bool:
        """Whether every future added has been yielded."""
        return self.count() == 0

    def has_ready(self) -> bool:
        """Whether a future is done and waiting to be yielded (the next ``next()`` does not wait)."""
        with self._cond:
            return bool(self._ready)

    def clear(self) -> None:
        """Forget every future not yielded yet (their tasks are left as they are)."""
        with self._cond:
            self._pending.clear()
            self._ready.clear()

    # -- taking ----------------------------------------------------------------------------------
    def _out(self, future: concurrent.futures.Future[Any]) -> Any:
        if not self._with_results:
            return future
        if not self._raise_errors:
            exc = future.exception(0) if not future.cancelled() else concurrent.futures.CancelledError()
            if exc is not None:
                return future, exc
        return future, future.result(0)

    def _timed_out(self) -> ZdqTimeoutError:
        left = len(self._pending)
        return ZdqTimeoutError(f"{left} of {self._total} futures did not complete within {self._timeout}s")

    def _take(self, block: bool, all_ready: bool) -> list[concurrent.futures.Future[Any]]:
        """Done futures (one, or every one ready), waiting for one if ``block`` and none is;
        raise StopIteration when nothing is left, the timeout error past the deadline."""
        step = _LOOK_EVERY
        say = None
        while True:
            with self._cond:
                if self._ready:
                    if not all_ready:
                        return [self._ready.popleft()]
                    taken, self._ready = list(self._ready), collections.deque()
                    return taken
                if not self._pending:
                    raise StopIteration
                if not block:
                    return []
                left = None if self._deadline is None else self._deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise self._timed_out()
                if self._cond.wait(step if left is None else min(step, left)) or self._ready:
                    continue
                pending = list(self._pending.values())
            # Nothing came within the step: whether some future cannot come at all, asked
            # without the lock (a pool's answer may take the driver's).
            error = _stuck_among(pending)
            if error is not None:
                raise error
            if self._deadline is None:  # a wait with a timeout is bounded already: it says nothing
                say = say or _SayWhy("zdq.as_completed()", _LOOK_EVERY)  # made past the first step, as result()'s
                say.look(pending)
            step = min(2 * step, _LOOK_AT_MOST)

    def __iter__(self) -> as_completed:
        return self

    def __next__(self) -> Any:
        return self._out(self._take(block=True, all_ready=False)[0])

    def next_batch(self, block: bool = True) -> list[Any]:
        """Every future done now (waiting for one if ``block`` and none is; ``[]`` if not)."""
        try:
            return [self._out(f) for f in self._take(block, all_ready=True)]
        except StopIteration:
            return []

    def batches(self) -> Iterator[list[Any]]:
        """Lists of the futures done at once (each with at least one), until none is left."""
        while True:
            try:
                taken = self._take(block=True, all_ready=True)
            except StopIteration:
                return
            yield [self._out(f) for f in taken]

    async def _completed(self) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        arrived = asyncio.Event()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(arrived.set)
            except RuntimeError:  # the loop is closed: nobody awaits any more
                pass

        with self._cond:
            self._wakers.append(wake)
        step = _LOOK_EVERY
        try:
            while True:
                arrived.clear()
                try:
                    taken = self._take(block=False, all_ready=False)
                except StopIteration:
                    return
                if taken:
                    yield self._out(taken[0])
                    continue
                left = None if self._deadline is None else self._deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise self._timed_out()
                try:
                    await asyncio.wait_for(arrived.wait(), step if left is None else min(step, left))
                    continue
                except asyncio.TimeoutError:
                    if left is not None and left <= step:
                        raise self._timed_out() from None
                # Nothing came within the step: whether some future cannot come at all, asked on
                # a thread of its own (a pool's answer takes its driver's lock: never on the loop;
                # and not behind the application's calls in the loop's executor).
                with self._cond:
                    pending = list(self._pending.values())
                error = await _on_own_thread(loop, _stuck_among, pending)
                if error is not None:
                    raise error
                step = min(2 * step, _LOOK_AT_MOST)
        finally:
            with self._cond:
                self._wakers.remove(wake)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._completed()

    def __repr__(self) -> str:
        with self._cond:
            return f"<as_completed: {len(self._pending)} pending, {len(self._ready)} ready>"


def _on_loop(
    fut: concurrent.futures.Future[Any],
    loop: asyncio.AbstractEventLoop,
    *,
    cancel_source: bool,
    stuck: Callable[[Any], BaseException | None] | None = None,
) -> asyncio.Future[Any]:
    """An asyncio future of ``loop`` that follows ``fut``. With ``cancel_source``, cancelling it
    (a cancelled coroutine awaiting it) cancels ``fut``'s task too, on a helper thread: the
    cancellation asks the task's queue, and the event loop never waits for that. With ``stuck``
    (its pool's), it ends with the pool's error if ``fut`` cannot be done (:class:`_AwaitLooks`)."""
    waiter: asyncio.Future[Any] = loop.create_future()
    looks = None if stuck is None or fut.done() else _AwaitLooks.of(loop)
    # What ``fut``'s done-callback reaches the waiter (and its loop) through: emptied once the
    # waiter has ended otherwise (the pool's error), so that a future left pending after its
    # await does not keep that await's loop.
    cell = [waiter]

    def copy(source: concurrent.futures.Future[Any]) -> None:
        if not cell or cell[0].done():
            return
        if source.cancelled():
            cell[0].cancel()
        elif source.exception() is not None:
            cell[0].set_exception(source.exception())  # type: ignore[arg-type]
        else:
            cell[0].set_result(source.result())

    def done(source: concurrent.futures.Future[Any]) -> None:
        try:
            if cell:
                cell[0].get_loop().call_soon_threadsafe(copy, source)
        except (RuntimeError, IndexError):  # the loop is closed, or the await ended: nobody awaits
            pass

    if cancel_source or looks is not None:
        def ended(w: asyncio.Future[Any]) -> None:
            if looks is not None:
                looks.ended(w)
                cell.clear()
            if cancel_source and w.cancelled() and not fut.done():
                # A daemon thread, not the loop's executor: asyncio.run() would wait for it on exit.
                threading.Thread(target=fut.cancel, name="zdq-cancel", daemon=True).start()

        waiter.add_done_callback(ended)
    if looks is not None and stuck is not None:
        looks.add(waiter, fut, stuck)
    fut.add_done_callback(own(done))
    return waiter


class _AwaitLooks:
    """The awaits of zdq futures pending on one event loop, and the one timer that asks their
    pools, every :data:`_LOOK_EVERY` seconds while some are pending, whether those results can
    come at all, as ``result()`` does: the pool's error ends that await; the future stays pending,
    and a later await may get its result.

    A look runs on a short-lived thread of its own (never on the loop, and never waiting behind
    the application's calls in the loop's executor). It asks each pool once whether none of its
    futures can be done (``stuck(None)``: no consumer can be placed), which ends every await of
    that pool at once; then asks awaits one by one (a queue that no consumer serves holds only
    some futures), the longest waiting first, each then going to the back of the line, for at
    most :data:`_LOOK_BUDGET` seconds a look.

    An await costs a weak dict entry (put by :meth:`add`, taken out by the waiter's done-callback
    that :func:`_on_loop` has anyway), not a timer of its own: one timer a loop. Nothing here
    holds the loop: a closed loop and its entry go with it. All but the look runs on the loop's
    thread."""

    _of_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _AwaitLooks] = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        # Weakly: an entry must not keep its loop (a future's) alive; the zdq future holds its
        # waiter (its done-callback) while both are pending.
        self._awaits: weakref.WeakKeyDictionary[
            asyncio.Future[Any], tuple[concurrent.futures.Future[Any], Callable[[Any], Any]]
        ] = weakref.WeakKeyDictionary()
        self._timer_set = False  # the handle is the loop's: not kept here, nor the loop with it
        self._asking = False
        # Since when some await has been pending without a break, and whether a look said why
        # (once, past SAY_AFTER, as a long result() does); None while none is pending.
        self._once: SayOnce | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _AwaitLooks:
        looks = cls._of_loop.get(loop)
        if looks is None:
            looks = cls._of_loop[loop] = cls()
        return looks

    def add(self, waiter: asyncio.Future[Any], fut: concurrent.futures.Future[Any], stuck: Callable[[Any], Any]) -> None:
        """Look after ``waiter`` (an await of ``fut``) until it ends (:meth:`ended`)."""
        if self._once is None:
            self._once = SayOnce()
        self._awaits[waiter] = (fut, stuck)
        if not self._timer_set and not self._asking:
            self._timer_set = True
            waiter.get_loop().call_later(_LOOK_EVERY, self._look)

    def ended(self, waiter: asyncio.Future[Any]) -> None:
        self._awaits.pop(waiter, None)
        if not self._awaits:
            self._once = None

    def _look(self) -> None:
        self._timer_set = False
        if not self._awaits:
            self._once = None
            return
        self._asking = True
        say = None
        if self._once is not None and self._once.due():
            say = _SayWhy("await", self._once.waited)
        looking = _on_own_thread(asyncio.get_running_loop(), _ask_pools, list(self._awaits.items()), say)
        looking.add_done_callback(self._answered)

    def _answered(
        self, looking: asyncio.Future[tuple[list[tuple[asyncio.Future[Any], BaseException]], list[asyncio.Future[Any]]]]
    ) -> None:
        self._asking = False
        errors, asked = looking.result() if not looking.cancelled() and looking.exception() is None else ([], [])
        for waiter, error in errors:
            self._awaits.pop(waiter, None)
            if not waiter.done():
                waiter.set_exception(error)
        for waiter in asked:  # to the back of the line
            entry = self._awaits.pop(waiter, None)
            if entry is not None:
                self._awaits[waiter] = entry
        if self._awaits and not self._timer_set:
            self._timer_set = True
            asyncio.get_running_loop().call_later(_LOOK_EVERY, self._look)


def _on_own_thread(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """``fn(*args)`` on a short-lived daemon thread of its own; its outcome in a future of
    ``loop``. Not the loop's executor: a look must not wait behind the application's blocking
    calls there (``asyncio.to_thread``), nor keep ``asyncio.run()`` waiting at its exit."""
    outcome: asyncio.Future[Any] = loop.create_future()

    def settle(error: BaseException | None, value: Any) -> None:
        if not outcome.done():
            if error is not None:
                outcome.set_exception(error)
            else:
                outcome.set_result(value)

    def run() -> None:
        try:
            value, error = fn(*args), None
        except Exception as e:  # noqa: BLE001 - handed to the loop
            value, error = None, e
        try:
            loop.call_soon_threadsafe(settle, error, value)
        except RuntimeError:  # the loop closed meanwhile: nobody awaits any more
            pass

    threading.Thread(target=run, name="zdq-await-look", daemon=True).start()
    return outcome


def _ask_pools(
    awaits: list[tuple[asyncio.Future[Any], tuple[concurrent.futures.Future[Any], Callable[[Any], Any]]]],
    say: _SayWhy | None = None,
) -> tuple[list[tuple[asyncio.Future[Any], BaseException]], list[asyncio.Future[Any]]]:
    """Off the loop (:class:`_AwaitLooks`): the awaits whose future's pool says it cannot be done,
    with the error, and the awaits asked one by one. A pool that fails to answer is passed over
    (logged), as a look that found nothing: a look never ends an await by its own failure.
    ``say``: the awaits have waited long, and the first pool with a reason says it."""

    def ask(stuck: Callable[[Any], Any], fut: Any) -> BaseException | None:
        try:
            error: BaseException | None = stuck(fut)
            return error
        except Exception:  # noqa: BLE001 - see above
            logger.debug("asking %r's pool whether it can be done failed", fut, exc_info=True)
            return None

    pending = [(waiter, fut, stuck) for waiter, (fut, stuck) in awaits if not waiter.done() and not fut.done()]
    errors: list[tuple[asyncio.Future[Any], BaseException]] = []
    whole: dict[int, BaseException | None] = {}
    for _, _, stuck in pending:
        if id(stuck) not in whole:
            whole[id(stuck)] = ask(stuck, None)  # the pool's own verdict: for every future of it
    one_by_one = []
    for waiter, fut, stuck in pending:
        error = whole[id(stuck)]
        if error is not None:
            errors.append((waiter, error))
        else:
            one_by_one.append((waiter, fut, stuck))
    asked: list[asyncio.Future[Any]] = []
    deadline = time.monotonic() + _LOOK_BUDGET
    for waiter, fut, stuck in one_by_one:
        if asked and time.monotonic() > deadline:
            break
        asked.append(waiter)
        error = ask(stuck, fut)
        if error is not None:
            errors.append((waiter, error))
    if say is not None:
        try:
            say.look(fut for _, fut, _ in one_by_one)
        except Exception:  # noqa: BLE001 - as a pool's failing answer above
            logger.debug("saying why awaits wait failed", exc_info=True)
    return errors, asked


def notify_cancelled(fut: concurrent.futures.Future[Any]) -> None:
    """Tell the waiters of a cancelled future, as an executor does when it drops cancelled work:
    ``concurrent.futures.wait`` and ``as_completed`` count a future done only once notified."""
    try:
        if fut._state == "CANCELLED":
            fut.set_running_or_notify_cancel()
    except RuntimeError:  # notified by another thread meanwhile
        pass


#: Seconds between two looks, while a result is awaited, at whether its pool can run it at all.
_LOOK_EVERY = 1.0
#: Waits on many futures (``wait``, ``gather``, ``as_completed``) look less and less often, up to
#: this: each look passes over the futures.
_LOOK_AT_MOST = 16.0
#: Pending futures of one pool asked per look whether they can be done (see ``_stuck_among``).
_ASK_PER_POOL = 8
#: Seconds a look at the awaits of one event loop may ask their futures one by one (see
#: :class:`_AwaitLooks`); the others are asked at the next looks.
_LOOK_BUDGET = 0.02


class WaitHint:
    """What a pool tells its futures: why a result may be slow to come (``hint()``, a sentence
    for a timeout's message), and whether it cannot come as things stand (``stuck(future)``: the
    error that future's wait raises, e.g. :class:`~zdq.errors.NoEligibleWorkers`, or ``None``;
    ``stuck(None)``: the error every future of the pool would get, asking no future's tasks).
    The pool owns both callables; they are called from the thread that waits on a future, or
    from an await's look (:class:`_AwaitLooks`, a thread of its own), never on an event loop."""

    def __init__(self, why: Callable[[], str], stuck: Callable[[Any], BaseException | None]) -> None:
        self._why = why
        self.stuck = stuck

    def __call__(self) -> str:
        return self._why()


# Set on a driver's I/O thread: the runner its futures' callbacks go to.
_io_thread = threading.local()


def run_inline(callbacks: list[Callable[[Any], object]], future: Any) -> None:
    """Run ``future``'s callbacks on this thread, in order; one that raises (even ``SystemExit``)
    is logged and the next runs: one of zdq's own after it must run, or a future that waits on it
    (a held call, an ``await``) would never settle."""
    for fn in callbacks:
        try:
            fn(future)
        except BaseException:  # noqa: BLE001 - logged, as concurrent.futures does; the next one runs
            logger.exception("exception calling callback for %r", future)


class OwnCallback:
    """A done-callback of zdq's own (an ``await``'s hand-over to its loop, ``as_completed``'s
    arrival, a held call's inputs, an executor's count of its work): it runs on the callback
    runner's own lane, so that no callback of the user's (slow, blocking, or waiting on another
    future of the pool) holds it back. Made by :func:`own`."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Any], object]) -> None:
        self.fn = fn

    def __call__(self, future: Any) -> object:
        return self.fn(future)


def own(fn: Callable[[Any], object]) -> OwnCallback:
    """``fn`` marked as a done-callback of zdq's own (see :class:`OwnCallback`)."""
    return OwnCallback(fn)


class CallbackRunner:
    """The threads that run the done-callbacks of futures settled on a driver's I/O thread (or on
    these threads: a held call settles on zdq's): one for the user's callbacks, in the order they
    were added and their futures settled, and one for zdq's own (:class:`OwnCallback`), so that a
    user's callback that is slow or waits on another future of the pool (whose result may need
    zdq's callbacks: a held call's launch, an ``await``) never holds those back. So an ``await`` or
    ``zdq.as_completed`` may see a future done before its user callbacks have run, as
    ``result()``, ``concurrent.futures.wait`` and ``as_completed`` do in the standard library
    (they are told before its callbacks run). A callback that raises, even ``SystemExit`` or
    ``KeyboardInterrupt``, is logged and costs only its own call.

    Started with its driver, stopped after it (running every callback queued before).
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Callable[[Any], object], Any] | None] = queue.SimpleQueue()
        self._own: queue.SimpleQueue[tuple[Callable[[Any], object], Any] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        if not self._threads:
            self._threads = [
                threading.Thread(target=self._run, args=(lane,), name=f"zdq-callbacks-{self._name}{suffix}", daemon=True)
                for lane, suffix in ((self._queue, ""), (self._own, "-own"))
            ]
            for thread in self._threads:
                thread.start()

    def adopt_current_thread(self) -> None:
        """Mark the calling thread (a driver's I/O thread) as one whose callbacks go here."""
        _io_thread.runner = self

    @contextlib.contextmanager
    def adopted(self) -> Iterator[None]:
        """The calling thread's futures hand their callbacks here while this lasts (a driver's
        close(), settling every pending future on the user's thread: inline, a callback waiting
        on another of them would wait for ever, the one settling it being stuck in that callback)."""
        before = getattr(_io_thread, "runner", None)
        _io_thread.runner = self
        try:
            yield
        finally:
            _io_thread.runner = before

    def submit(self, callbacks: list[Callable[[Any], object]], future: Any) -> None:
        """Run ``future``'s ``callbacks`` on the lanes (each lane in the order they were added)."""
        own, user = self._own, self._queue
        for fn in callbacks:
            (own if type(fn) is OwnCallback else user).put((fn, future))

    def _run(self, lane: queue.SimpleQueue[tuple[Callable[[Any], object], Any] | None]) -> None:
        # A future settled here (a held call's, by its input's callback) hands its callbacks on too.
        _io_thread.runner = self
        while True:
            item = lane.get()
            if item is None:
                return
            fn, future = item
            # SystemExit or KeyboardInterrupt too are logged (a callback re-raising a task's): on
            # this thread they would end every later callback of the pool, and the waits on them.
            run_inline([fn], future)
            # Not held while waiting for the next one: the last future (and its result) is the user's.
            del item, fn, future

    def stop(self, timeout: float = 10.0) -> None:
        threads, self._threads = self._threads, []
        if threads:
            self._queue.put(None)
            self._own.put(None)
            give_up = time.monotonic() + timeout
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join(max(0.0, give_up - time.monotonic()))


class _Awaitable(concurrent.futures.Future):  # type: ignore[type-arg]
    #: Says why a result may be slow to come (no consumer running, a queue being placed again);
    #: set by the pool that made the future.
    _hint: Callable[[], str] | None = None
    #: The driver that can cancel the future's tasks (set by the driver or pool that made it).
    _driver: Any = None

    def _cancel_tasks(self, first: int, n: int) -> bool:
        if self.done():
            return self.cancelled()
        driver = self._driver  # read once: a map's chunk lets go of it when its last outcome comes
        if driver is not None:
            driver.cancel(first, n)
        return self.cancelled()

    def __reduce__(self) -> Any:
        raise TypeError(
            f"{self!r} cannot be sent to a consumer: give it to submit() as an argument (the task then "
            "runs with its result, once it is there), or pass its result()"
        )

    def __await__(self) -> Generator[Any, None, Any]:
        stuck = getattr(self._hint, "stuck", None)
        return _on_loop(self, asyncio.get_running_loop(), cancel_source=True, stuck=stuck).__await__()

    def _timed_out(self, timeout: float | None, what: str) -> ZdqTimeoutError:
        say = self._hint  # read once: a map's chunk lets go of it when its last outcome comes
        hint = say() if say is not None else ""
        return ZdqTimeoutError(f"{what} had no result within {timeout}s" + (f": {hint}" if hint else ""))

    def _looking(self, wait: Callable[[float | None], Any], timeout: float | None) -> Any:
        """``wait(timeout)``, in steps of :data:`_LOOK_EVERY` between which the pool is asked
        whether the result can come at all (its ``stuck(self)`` error is raised if not; the future
        stays pending, and a later wait may succeed).

        ``timeout`` is seconds, a number as the standard library takes it, or a Dask time string
        (``"5s"``), as zdq's other calls take it; anything else raises ``ValueError`` naming it."""
        stuck = getattr(self._hint, "stuck", None)
        if stuck is None or (timeout is not None and timeout <= _LOOK_EVERY):
            return wait(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        step = _LOOK_EVERY  # the first step is whole: the timeout, if any, is longer
        say = None
        while True:
            try:
                return wait(step)
            except concurrent.futures.TimeoutError:
                if self.done() or (deadline is not None and time.monotonic() >= deadline):
                    raise
            error = stuck(self)
            if error is not None:
                raise error
            if deadline is None:  # a wait with a timeout is bounded already: it says nothing
                # Made past the first step only (most results are there before it): it has waited that long.
                say = say or _SayWhy(f"{wait.__name__}()", _LOOK_EVERY)
                say.look((self,))
            step = _LOOK_EVERY if deadline is None else min(_LOOK_EVERY, max(0.0, deadline - time.monotonic()))

    def result(self, timeout: float | None = None) -> Any:
        timeout = wait_seconds(timeout)
        try:
            return self._looking(super().result, timeout)
        except concurrent.futures.TimeoutError:
            if self.done():
                raise  # the task's own error (a TaskTimeout, a TimeoutError it raised), as it is
            raise self._timed_out(timeout, repr(self)) from None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        timeout = wait_seconds(timeout)
        try:
            return self._looking(super().exception, timeout)
        except concurrent.futures.TimeoutError:
            raise self._timed_out(timeout, repr(self)) from None

    def _state_text(self) -> str:
        """``pending``, ``finished``, ``cancelled`` or ``failed: <error type>``: local, never waits."""
        if not self.done():
            return "pending"
        if self.cancelled():
            return "cancelled"
        exc = concurrent.futures.Future.exception(self, 0)  # done: it does not wait (nor hint)
        return "finished" if exc is None else f"failed: {type(exc).__name__}"

    _done_callbacks: list[Callable[[Any], object]]

    def _invoke_callbacks(self) -> None:
        callbacks = self._done_callbacks
        if not callbacks:  # most futures: nothing to hand over, nothing to look up
            return
        runner: CallbackRunner | None = getattr(_io_thread, "runner", None)
        self._done_callbacks = []
        if runner is None:  # settled on a thread of the user's (a cancel()): run here, as the standard library does
            run_inline(callbacks, self)
            return
        runner.submit(callbacks, self)


class TaskFuture(_Awaitable):
    """The result of one submitted task.

    Attributes
    ----------
    key : int
        The task id; the key of its result in ``ConsumerPool.results()``.
    """

    def __init__(self, key: int) -> None:
        super().__init__()
        self.key = key

    def cancel(self) -> bool:
        """Cancel the task if it has not started: it never runs, and this returns True (also
        when it was cancelled before). False if it is running or finished, as for
        :meth:`concurrent.futures.Future.cancel`. Blocks until the task's queue answers (a
        round trip; at most the heartbeat timeout and a few seconds, after which the task
        counts as started)."""
        return self._cancel_tasks(self.key, 1)

    def __repr__(self) -> str:
        return f"<TaskFuture key={self.key} {self._state_text()}>"


class BatchFuture(_Awaitable):
    """The results of a batch, in submission order; resolves when every task has finished.

    ``result()`` returns the list of values, or raises :class:`~zdq.errors.BatchError` (which holds
    every error and every value) if any task failed. ``completed`` counts finished tasks as they
    arrive.

    Attributes
    ----------
    keys : range
        The task ids of the batch, in order.
    """

    def __init__(self, first_key: int, n: int) -> None:
        super().__init__()
        self.keys = range(first_key, first_key + n)
        self._values: list[Any] = [None] * n
        self._errors: dict[int, BaseException] = {}
        # Which tasks have an outcome: a task is counted once, and a value once set is never
        # overwritten (a chunk reported in part, then failed, fails only the tasks without one).
        self._settled = bytearray(n)
        self._remaining = n
        self._fill_lock = threading.Lock()
        if n == 0:
            self.set_result([])

    @property
    def completed(self) -> int:
        return len(self._values) - self._remaining

    def _fill(self, offset: int, values: list[Any], errors: dict[int, BaseException]) -> None:
        """Record results of tasks ``offset .. offset+len(values)``; resolve when all are in."""
        n = len(values)
        with self._fill_lock:
            if self.done():
                return
            settled = self._settled
            if settled.find(1, offset, offset + n) < 0:  # the usual case: a whole fresh slice (memchr, no copy)
                self._values[offset : offset + n] = values
                for i, exc in errors.items():
                    self._errors[offset + i] = exc
                settled[offset : offset + n] = b"\1" * n
                self._remaining -= n
            else:
                for i, value in enumerate(values):
                    if not settled[offset + i]:
                        settled[offset + i] = 1
                        self._remaining -= 1
                        if i in errors:
                            self._errors[offset + i] = errors[i]
                        else:
                            self._values[offset + i] = value
            finished = self._remaining <= 0
        if finished:
            if len(self._errors) == len(self._values) and all(type(e) is TaskCancelled for e in self._errors.values()):
                concurrent.futures.Future.cancel(self)  # every task was cancelled: so is the batch
                notify_cancelled(self)
            elif self._errors:
                self.set_exception(BatchError(self._errors, self._values))
            else:
                self.set_result(self._values)

    def _fail(self, offset: int, n: int, exc: BaseException) -> None:
        """Fail tasks ``offset .. offset+n`` that have no outcome yet."""
        self._fill(offset, [None] * n, dict.fromkeys(range(n), exc))

    def cancel(self) -> bool:
        """Cancel every task of the batch that has not started. True if none had (the batch is
        cancelled); otherwise False, and the batch ends with a :class:`~zdq.errors.BatchError`
        whose cancelled tasks hold :class:`~zdq.errors.TaskCancelled`."""
        return self._cancel_tasks(self.keys.start, len(self.keys))

    def __repr__(self) -> str:
        n, failed = len(self.keys), len(self._errors)
        span = f"keys={self.keys.start}..{self.keys.stop - 1}" if n else "no keys"
        if not self.done():
            return f"<BatchFuture {span} pending: {self.completed} of {n} done, {failed} failed>"
        if failed and not self.cancelled():
            return f"<BatchFuture {span} failed: {failed} of {counted(n, 'task')}>"
        return f"<BatchFuture {span} {self._state_text()}: {counted(n, 'task')}>"
