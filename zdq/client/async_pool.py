"""A :class:`~zdq.QueuePool` made with an asynchronous Dask client: awaited, and used from its
event loop (see :mod:`zdq.client.asynchronous`).

``queue_pool = await QueuePool(client, n)`` places the pool on a helper thread, through a
synchronous twin of the client that places and supervises everything from then on;
``submit`` on the loop never blocks it (its futures are queued in the order of the loop's
submissions); ``async with`` and ``await close()`` end it.

Ownership
---------
==========================  =======================================================================
state                       owner
==========================  =======================================================================
``_twin``                   made once, off the event loop (:meth:`_take_twin`); replaces ``client``
                            and the allowed workers from then on; closed with the pool
``_loop_submissions``       made on the loop's first submission; closed with the pool
==========================  =======================================================================
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Callable, Generator, Sequence
from typing import Any, Self

from distributed import Client

from zdq._actor import allowed_workers
from zdq.client import asynchronous
from zdq.client.submit import SubmitMethods
from zdq.futures import TaskFuture

__all__ = ["AsyncPoolMethods"]


class AsyncPoolMethods(SubmitMethods):
    """What a :class:`~zdq.QueuePool` does for an asynchronous client: ``await``, ``async
    with``, the twin client, and submissions from the event loop (``submit`` and ``asubmit``
    over :class:`~zdq.client.submit.SubmitMethods`' own)."""

    name: str
    client: Client
    _closed: bool
    _asynchronous: bool
    _start_on_await: bool
    _twin: Client | None
    _workers_asked: Sequence[str] | None
    _allowed_workers: list[str] | None
    _loop_submissions: asynchronous.LoopSubmissions | None

    def start(self) -> Any:
        raise NotImplementedError

    def close(self) -> Any:
        raise NotImplementedError

    def __await__(self) -> Generator[Any, None, Self]:
        """``queue_pool = await QueuePool(client, n)`` with an asynchronous client: placed on a
        helper thread, the event loop going on meanwhile (``start=False``: not placed yet)."""
        if not self._asynchronous:
            raise TypeError("await QueuePool(...) is for asynchronous Dask clients: this one is synchronous, drop the await")
        return self._started_off_loop().__await__()

    async def _started_off_loop(self) -> Self:
        try:
            if self._start_on_await:
                await self.start()
            else:
                await asyncio.to_thread(self._take_twin)
        except BaseException:
            # Nobody holds a pool whose await failed: its twin client is let go now, not at collection.
            await asyncio.shield(asyncio.to_thread(self._close_twin))
            raise
        return self

    async def __aenter__(self) -> Self:
        return await self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def _own_client(self) -> Client | None:
        """The synchronous twin of an asynchronous client (``None`` until made, or without one)."""
        return self._twin

    def _take_twin(self) -> None:
        """Off the event loop: make this pool's synchronous twin client (once), which places and
        supervises everything from then on."""
        if self._twin is not None or self._closed:
            return
        self._twin = asynchronous.twin_client(self.client)
        weakref.finalize(self, self._twin.close)  # run last: after the driver's and watch's finalizers
        self.client = self._twin
        self._allowed_workers = asynchronous.with_twin(self._twin, allowed_workers, self._twin, self._workers_asked)

    def _close_twin(self) -> None:
        if self._loop_submissions is not None:
            self._loop_submissions.close()
        if self._twin is not None:
            self._twin.close()

    def _on_loop_submissions(self) -> asynchronous.LoopSubmissions | None:
        """The loop's submissions, for an asynchronous pool called on its event loop (else ``None``)."""
        if not (self._asynchronous and asynchronous.on_event_loop()):
            return None
        if self._loop_submissions is None:
            self._loop_submissions = asynchronous.LoopSubmissions(self.name)
        return self._loop_submissions

    def submit(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        loop_submissions = self._on_loop_submissions()
        if loop_submissions is not None:
            return loop_submissions.submit(functools.partial(SubmitMethods.submit, self), fn, args, kwargs)  # type: ignore[arg-type]
        return SubmitMethods.submit(self, fn, *args, **kwargs)

    async def asubmit(self, fn: Callable[..., Any] | str, *args: Any, **kwargs: Any) -> TaskFuture:
        loop_submissions = self._on_loop_submissions()
        if loop_submissions is not None:  # the future, queued in the order of the loop's submissions
            future: TaskFuture = await loop_submissions.future(functools.partial(SubmitMethods.submit, self), fn, args, kwargs)  # type: ignore[arg-type]
            return future
        return await SubmitMethods.asubmit(self, fn, *args, **kwargs)

    asubmit.__doc__ = SubmitMethods.asubmit.__doc__

    submit.__doc__ = (SubmitMethods.submit.__doc__ or "") + """
        For a pool made with an asynchronous client, called on its event loop, it never blocks the
        loop: ``await queue_pool.submit(fn, x)`` is the result (see :mod:`zdq.client.asynchronous`).
        """
