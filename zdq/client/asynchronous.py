"""Pools made with an asynchronous Dask client (``Client(asynchronous=True)``), used from its event loop.

>>> client = await Client(address, asynchronous=True)            # doctest: +SKIP
>>> queue_pool = await QueuePool(client, 2)                       # doctest: +SKIP
>>> consumers = await ConsumerPool(client, queue_pool, 2, start=True)  # doctest: +SKIP
>>> await queue_pool.submit(fib, 20)                              # doctest: +SKIP
6765
>>> await consumers.close(); await queue_pool.close()             # doctest: +SKIP

The approach chosen: a **synchronous twin client**
--------------------------------------------------
A pool's placement, supervision and recovery are synchronous code that runs on the user's thread
and on supervisor threads. With an asynchronous client, each of its calls on the event loop's
thread returns a coroutine (hence, before, "coroutine was never awaited" and a misleading
``PlacementError``); from another thread it calls into the user's loop and blocks until the loop
answers. Running that code on helper threads against the user's client would work while the
loop runs, but a supervisor thread or a finalizer calling in while the loop is blocked or after
``asyncio.run`` has closed it would wait on a loop that never answers.

So a pool made with an asynchronous client makes, on a helper thread, a synchronous
:class:`distributed.Client` of its own on the same scheduler, with the same security
(:func:`twin_client`), not set as the default client; every piece of the existing machinery
(placement, supervision, recovery, consumers) uses that twin, unchanged, on the twin's own event
loop thread. The user's client is only where the address and security come from. The cost is
one more connection to the scheduler per pool, opened at start and closed with the pool.

What runs on the user's event loop is never blocking:

- ``await QueuePool(...)``, ``await ConsumerPool(...)``, and the calls that wait on the cluster
  (``start``, ``close``, ``join``, ``flush``, ``wait_drained``...: :func:`off_loop_when_async`)
  run on a helper thread; called on the loop, they return an awaitable (an :class:`asyncio.Task`,
  so the work happens even if nobody awaits it);
- ``submit`` queues at once when the driver's window has room and returns the
  :class:`~zdq.futures.TaskFuture` (awaiting it gives the result); when the window is full, the
  submission waits on the pool's one submission thread, in submission order, and ``submit``
  returns a task whose result is the task's result (:class:`LoopSubmissions`).

Calls that cannot work on an asynchronous pool raise a :class:`TypeError` that says what to write
instead (:func:`not_started`, :func:`sync_with`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from typing import Any, TypeVar

from distributed import Client

from zdq.errors import SubmitTimeout

__all__ = [
    "LoopSubmissions",
    "is_asynchronous",
    "not_started",
    "off_loop_when_async",
    "on_event_loop",
    "sync_with",
    "twin_client",
    "with_twin",
]

T = TypeVar("T")

#: How long making the twin client may take to reach the scheduler.
TWIN_TIMEOUT = 30.0


def is_asynchronous(client: object) -> bool:
    """Whether ``client`` is an asynchronous Dask client used from its own event loop (the only
    case where its calls return coroutines)."""
    return isinstance(client, Client) and bool(client.asynchronous)


def on_event_loop() -> bool:
    """Whether the caller runs on a running asyncio event loop (a coroutine or a callback of it)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def twin_client(client: Client, timeout: float = TWIN_TIMEOUT) -> Client:
    """A synchronous client of the scheduler ``client`` uses, with its security. Blocks: call it
    off the event loop. Not the default client (``get_client()`` stays the user's)."""
    address = getattr(client.scheduler, "address", None)
    if not address:
        raise TypeError(
            f"the asynchronous client {client!r:.80} is not connected to a scheduler: await it first "
            "(client = await Client(address, asynchronous=True))"
        )
    return Client(address, security=client.security, asynchronous=False, set_as_default=False, timeout=timeout)


def with_twin(twin: Client | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` with ``twin`` as the current Dask client of this thread (and of the
    supervisor threads started meanwhile, which copy the context): a Dask ``Actor`` proxy binds to
    the current client when it is received, so the actors a pool places are the twin's, not
    those of the process's default client (the user's asynchronous one, or none)."""
    if twin is None:
        return fn(*args, **kwargs)
    with twin.as_current():
        return fn(*args, **kwargs)


def off_loop_when_async(method: Callable[..., T]) -> Callable[..., Any]:
    """``method`` of a pool (an object with ``_asynchronous`` and ``_own_client``): called on an
    event loop, for a pool made with an asynchronous client, it runs on a helper thread (with the
    pool's twin as the current client) and the call returns an :class:`asyncio.Task` of its
    result; called anywhere else, it runs as it is."""

    @functools.wraps(method)
    def call(self: Any, /, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "_asynchronous", False) and on_event_loop():
            run = functools.partial(with_twin, getattr(self, "_own_client"), method, self, *args, **kwargs)
            work = asyncio.to_thread(run)
            return asyncio.ensure_future(work)
        return method(self, *args, **kwargs)

    return call


def not_started(what: str, name: str) -> TypeError:
    """The error of an asynchronous pool used before it was awaited."""
    return TypeError(
        f"{what} {name} was made with an asynchronous Dask client and is not started yet: await it "
        f"(`pool = await {what}(client, ...)`, or `async with {what}(client, ...) as pool:`)"
    )


def sync_with(what: str) -> TypeError:
    """The error of ``with`` on an asynchronous pool."""
    return TypeError(f"this {what} was made with an asynchronous Dask client: use `async with`, not `with`")


class LoopSubmissions:
    """The submissions of one asynchronous pool made on its event loop, so that none blocks it.

    Owned by the event loop's thread (every method runs there); the one submission thread only
    runs the submissions handed to it, in order. ``_behind`` counts the submissions handed to it
    and not yet queued: while some are, later ones go behind them, so that tasks are queued in the
    order they were submitted.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._behind = 0
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None

    def submit(self, submit: Callable[..., Any], fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``submit(fn, *args, **kwargs)`` without blocking: the future when the window has room,
        else a task that waits for room off the loop and then for the result."""
        queued = self._queue(submit, fn, args, kwargs)
        if isinstance(queued, asyncio.Future):
            return asyncio.ensure_future(_result_of(queued))
        return queued

    async def future(self, submit: Callable[..., Any], fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``asubmit``: the task's future, once queued (room awaited off the loop, in order)."""
        queued = self._queue(submit, fn, args, kwargs)
        return await queued if isinstance(queued, asyncio.Future) else queued

    def _queue(self, submit: Callable[..., Any], fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The task's future if it is queued at once, else an asyncio future of it."""
        timeout = kwargs.pop("timeout", None)
        if not self._behind:
            try:
                return submit(fn, *args, timeout=0, **kwargs)
            except SubmitTimeout:
                pass  # the window is full: wait for room off the loop
        loop = asyncio.get_running_loop()
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"zdq-async-submit-{self._name}")
        self._behind += 1
        queued = loop.run_in_executor(self._thread, functools.partial(submit, fn, *args, timeout=timeout, **kwargs))
        queued.add_done_callback(self._queued)
        return queued

    def _queued(self, _: object) -> None:
        self._behind -= 1

    def close(self) -> None:
        """Let the submission thread go once it has run what it holds: those submissions fail
        with the pool's ClosedError (not a cancellation, which would read as the user's)."""
        if self._thread is not None:
            self._thread.shutdown(wait=False)
            self._thread = None


async def _result_of(queued: asyncio.Future[Any]) -> Any:
    future = await queued
    return await future
