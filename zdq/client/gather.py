"""``zdq.gather``: Dask's ``client.gather`` for any futures (zdq's, or the standard library's).

A future, or lists, tuples and dicts of them nested as deep as they go, give back the same
structure with each future replaced by its result; anything else in it is left as it is. The
walk over the structure is pure (:func:`futures_in`, :func:`replace`): the tests drive it with
futures they settle themselves.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from typing import Any

from zdq.config import timeout_or_none
from zdq.errors import ZdqTimeoutError
from zdq.futures import wait

__all__ = ["ERRORS", "futures_in", "gather", "replace"]

#: What ``errors=`` may be: raise the first error, or leave the failed futures out.
ERRORS = ("raise", "skip")

_SKIP = object()


def futures_in(data: Any) -> Iterator[concurrent.futures.Future[Any]]:
    """The futures of ``data``, depth first, in order."""
    if isinstance(data, concurrent.futures.Future):
        yield data
    elif isinstance(data, (list, tuple)):
        for item in data:
            yield from futures_in(item)
    elif isinstance(data, dict):
        for item in data.values():
            yield from futures_in(item)


def _failed(fut: concurrent.futures.Future[Any]) -> bool:
    return fut.cancelled() or fut.exception(0) is not None


def replace(data: Any, skip: bool) -> Any:
    """``data`` with each (done) future replaced by its result: the first failure raised, or, with
    ``skip``, failed futures left out of their lists and tuples and their entries out of dicts.
    A failed future on its own, with ``skip``, gives ``None`` (there is no container to leave it
    out of)."""
    out = _replace(data, skip)
    return None if out is _SKIP else out


def _replace(data: Any, skip: bool) -> Any:
    if isinstance(data, concurrent.futures.Future):
        if skip and _failed(data):
            return _SKIP
        return data.result(0)  # done: raises its error (or CancelledError) at once
    if isinstance(data, (list, tuple)):
        items = [value for value in (_replace(item, skip) for item in data) if value is not _SKIP]
        if isinstance(data, tuple):
            return type(data)(*items) if hasattr(data, "_fields") else type(data)(items)
        return type(data)(items) if type(data) is not list else items
    if isinstance(data, dict):
        pairs = ((key, _replace(value, skip)) for key, value in data.items())
        return type(data)((key, value) for key, value in pairs if value is not _SKIP)
    return data


def gather(futures: Any, errors: str = "raise", *, timeout: float | None = None) -> Any:
    """The results of ``futures`` (a future, or lists, tuples and dicts of them, nested), in the
    same structure, as Dask's ``client.gather``.

    Parameters
    ----------
    errors : {"raise", "skip"}
        ``"raise"``: the first task to fail raises its error, as soon as it fails. ``"skip"``:
        failed (and cancelled) futures are left out of their lists, tuples and dicts.
    timeout : float or str, optional
        Seconds (or a Dask time string, ``"5s"``) to wait for every result; past it, :class:`~zdq.errors.ZdqTimeoutError` says
        how many are missing.

    >>> zdq.gather({"a": pool.submit(inc, 1), "b": [pool.submit(inc, 2)]})   # doctest: +SKIP
    {'a': 2, 'b': [3]}
    """
    if errors not in ERRORS:
        raise ValueError(f"errors must be one of {', '.join(repr(e) for e in ERRORS)}, got {errors!r:.80}")
    timeout = timeout_or_none(timeout)
    fs = list(dict.fromkeys(futures_in(futures)))
    when = concurrent.futures.FIRST_EXCEPTION if errors == "raise" else concurrent.futures.ALL_COMPLETED
    # A future cancelled by cancel() alone (not by an executor that then notified its waiters) is
    # never seen as done by concurrent.futures.wait: it has its outcome already, and is not waited for.
    # zdq's wait: a pool that says some of them cannot be done as things stand raises (as result()).
    done, pending = wait([f for f in fs if not f.cancelled()], timeout, return_when=when)
    if errors == "raise":
        for fut in fs:  # the first failure in the structure's order (of those already failed)
            if fut in done and _failed(fut):
                fut.result(0)
    if pending:
        raise ZdqTimeoutError(f"{len(pending)} of {len(fs)} futures had no result within {timeout}s")
    return replace(futures, errors == "skip")
