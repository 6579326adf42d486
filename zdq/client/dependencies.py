"""Futures as arguments: a call whose arguments hold futures waits in this process for them.

``queue_pool.submit(add, future, 1)`` runs ``add`` with the future's result, as Dask resolves the
futures given to ``client.submit``. The call is held here, never on a consumer: the returned
:class:`HeldFuture` stands for it at once; the inputs' done-callbacks (no thread per call, no
polling) count down, and the last one puts the results in place of the futures and submits the
call for real, whose outcome the held future then takes. An input that failed gives its error,
as it is, to the call (which never runs); one cancelled cancels it. Cancelling the held future
before the inputs are done just cancels it; after, it cancels the submitted task.

Futures are looked for in the positional and keyword arguments and, recursively, inside lists,
tuples, dicts (values), sets and frozensets of those exact types (a subclass, e.g. a namedtuple,
is passed as it is). Any :class:`concurrent.futures.Future` counts: a zdq future of any pool of
this process, or another executor's.

Who owns what
-------------
=============================  =================================================================
state                          owner
=============================  =================================================================
``HeldFuture._state``,         the held future's ``_lock``; the inputs' callbacks (any thread),
``_left``, ``_real``           the launch (the thread of the last input's callback) and
                               ``cancel()`` (the user's) meet there
the call's args               the held future until it is submitted (then dropped: the inputs'
                               results are the submitted task's, not kept here)
=============================  =================================================================

The submission happens on the thread of the last input's done-callback: for a zdq input, its
driver's callback thread (which then waits, like any submitter, while a bound such as
``max_pending`` or the window is reached); for an input done already, the caller's thread.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Iterable
from typing import Any

from zdq.futures import TaskFuture, notify_cancelled, own

__all__ = ["HeldFuture", "find_futures", "hold", "holds_futures", "may_hold", "substitute"]

Future = concurrent.futures.Future

#: The containers looked into (exact types: a subclass may not rebuild from its items).
_CONTAINERS = frozenset({list, tuple, dict, set, frozenset})

#: How long ``cancel()`` waits for a submission under way (blocked on a full window) to end.
_LAUNCH_WAIT = 30.0


#: Types passed over at once (a set lookup: cheaper than the isinstance tests).
_PLAIN = frozenset({int, float, str, bytes, bool, complex, type(None)})


def may_hold(args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> bool:
    """Whether the arguments may hold futures: a type test per top-level argument (the plain
    path's whole cost, about 100 ns for a few scalars)."""
    for arg in args:
        kind = type(arg)
        if kind not in _PLAIN and (kind in _CONTAINERS or isinstance(arg, Future)):
            return True
    if kwargs:
        for arg in kwargs.values():
            kind = type(arg)
            if kind not in _PLAIN and (kind in _CONTAINERS or isinstance(arg, Future)):
                return True
    return False


def holds_futures(items: Iterable[Any]) -> bool:
    """Whether any of ``items`` is or holds a future (``map``'s scan of its items: a set lookup
    per plain item)."""
    for item in items:
        kind = type(item)
        if kind in _PLAIN:
            continue
        if isinstance(item, Future) or (kind in _CONTAINERS and find_futures((item,), None)):
            return True
    return False


def find_futures(args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> list[Future[Any]]:
    """The futures in the arguments (each once, in order of appearance)."""
    found: dict[int, Future[Any]] = {}
    _collect(args, found)
    if kwargs:
        _collect(kwargs, found)
    return list(found.values())


def _collect(obj: Any, found: dict[int, Future[Any]]) -> None:
    if isinstance(obj, Future):
        found.setdefault(id(obj), obj)
        return
    kind = type(obj)
    if kind not in _CONTAINERS:
        return
    for item in obj.values() if kind is dict else obj:
        if isinstance(item, Future) or type(item) in _CONTAINERS:
            _collect(item, found)


def substitute(obj: Any) -> Any:
    """``obj`` with every future (found as :func:`find_futures` finds them) replaced by its
    result; the futures must be done without error. Containers without futures are kept as they are."""
    if isinstance(obj, Future):
        return obj.result(0)
    kind = type(obj)
    if kind not in _CONTAINERS or not _holds_future(obj):
        return obj
    if kind is dict:
        return {k: substitute(v) for k, v in obj.items()}
    return kind(substitute(item) for item in obj)


def _holds_future(obj: Any) -> bool:
    found: dict[int, Future[Any]] = {}
    _collect(obj, found)
    return bool(found)


_HELD, _LAUNCHING, _SUBMITTED, _OVER = "held", "launching", "submitted", "over"


class HeldFuture(TaskFuture):
    """The future of a call held until its input futures are done. ``key`` is None until the
    call is submitted, then the task's id."""

    def __init__(self, inputs: list[Future[Any]], launch: Callable[[tuple[Any, ...], dict[str, Any]], Future[Any]],
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__(None)  # type: ignore[arg-type]
        self._lock = threading.Lock()
        self._state = _HELD
        self._left = len(inputs)
        self._call: tuple[Callable[..., Future[Any]], tuple[Any, ...], dict[str, Any]] | None = (launch, args, kwargs)
        self._real: Future[Any] | None = None
        self._launched = threading.Event()
        self._n_inputs = len(inputs)

    # -- the inputs (their callbacks: any thread) ------------------------------------------------
    def _input_done(self, source: Future[Any]) -> None:
        if source.cancelled():
            self._drop(None)
            return
        exc = source.exception(0)
        if exc is not None:
            self._drop(exc)  # the upstream error, as it is (as Dask gives it)
            return
        with self._lock:
            if self._state != _HELD:
                return
            self._left -= 1
            if self._left:
                return
            self._state = _LAUNCHING
            call, self._call = self._call, None
        self._launch(call)

    def _drop(self, exc: BaseException | None) -> None:
        """An input failed (``exc``) or was cancelled (None): the call never runs."""
        with self._lock:
            if self._state != _HELD:
                return
            self._state, self._call = _OVER, None
        self._launched.set()
        if exc is None:
            self._cancel_here()
        else:
            self._settle(exc=exc)

    def _launch(self, call: Any) -> None:
        launch, args, kwargs = call
        try:
            real = launch(substitute(args), substitute(kwargs))
        except BaseException as e:  # noqa: BLE001 - cannot be pickled, pool closed, timed out: the call fails
            with self._lock:
                self._state = _OVER
            self._launched.set()
            self._settle(exc=e)
            return
        with self._lock:
            self._real = real
            self.key = getattr(real, "key", None)  # type: ignore[assignment]  # None until submitted
            self._state = _SUBMITTED
        self._launched.set()
        real.add_done_callback(own(self._follow))
        if self.cancelled():  # cancelled while it was being submitted
            real.cancel()

    def _follow(self, real: Future[Any]) -> None:
        """The submitted task's outcome becomes this future's."""
        with self._lock:
            self._state = _OVER
        if real.cancelled():
            self._cancel_here()
            return
        exc = real.exception(0)
        if exc is not None:
            self._settle(exc=exc)
        else:
            self._settle(value=real.result(0))

    def _settle(self, value: Any = None, exc: BaseException | None = None) -> None:
        try:
            if exc is None:
                self.set_result(value)
            else:
                self.set_exception(exc)
        except concurrent.futures.InvalidStateError:  # cancelled meanwhile
            pass

    def _cancel_here(self) -> bool:
        cancelled = Future.cancel(self)
        if cancelled:
            notify_cancelled(self)
        return cancelled

    # -- the user's ------------------------------------------------------------------------------
    def cancel(self) -> bool:
        """Cancel the call: before its inputs are done it is simply dropped (True); once it is
        submitted, the task is cancelled as any task (False if it has started)."""
        with self._lock:
            state = self._state
            if state == _HELD:
                self._state, self._call = _OVER, None
        if state == _HELD:
            self._launched.set()
            return self._cancel_here()
        if state == _LAUNCHING:
            self._launched.wait(_LAUNCH_WAIT)  # a submission blocked on a full window: bounded
        real = self._real
        if real is None:
            return self.cancelled() or (not self.done() and self._cancel_here())
        if real.cancel():
            self._cancel_here()
            return True
        return self.cancelled()

    def __repr__(self) -> str:
        if self._state in (_HELD, _LAUNCHING) and not self.done():
            return f"<TaskFuture held: waiting for {self._left} of {self._n_inputs} input futures>"
        return super().__repr__()


def hold(
    inputs: list[Future[Any]],
    launch: Callable[[tuple[Any, ...], dict[str, Any]], Future[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None,
) -> HeldFuture:
    """A future of the call ``launch(args, kwargs)``, made once every one of ``inputs`` is done,
    with their results in place of them (see the module's docstring)."""
    held = HeldFuture(inputs, launch, args, kwargs or {})
    for fut in inputs:
        fut.add_done_callback(own(held._input_done))  # runs now for an input done already
    return held
