"""Pickling of chunks and results: the only place where zdq turns user objects into bytes.

A chunk is ``(base_task_id, kind, entries, options)`` pickled in one go (protocol 5), so a function
shared by a thousand tasks is written once and the per-task cost is a few microseconds. Batches
ship the caller's own ``(fn, *args)`` tuples untouched (kind CALLS); single submissions are
``(fn, args)``, ``(fn, args, kwargs)`` or ``(fn, args, kwargs, options)`` (kind TASKS): empty kwargs
are left out because an empty dict per task nearly doubles the cost.
Options (:class:`TaskOptions`) make a task ``(fn, args, kwargs, options)``. cloudpickle is used because it pickles by reference whatever plain pickle can, and by value what
workers cannot import (functions and classes of ``__main__``, lambdas, closures).

When the pool is authenticated, every payload is sealed with a keyed BLAKE2b tag of the pool's
payload key, set by its author (driver or consumer) and checked by its reader *before* unpickling:
the broker in between cannot forge a payload, and bytes from any other peer (or a fuzzer) are
rejected without being unpickled (random bytes can be a pickle that allocates gigabytes).

Results travel as ``(base_task_id, values, errors)`` where ``errors`` maps an index in ``values`` to
an :class:`ErrorInfo`.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
import sys
import types
from dataclasses import dataclass
from typing import Any

import cloudpickle

from zdq.errors import RemoteTaskError, SerializationError

__all__ = [
    "Task",
    "TaskOptions",
    "TASKS",
    "CALLS",
    "ITEMS",
    "ErrorInfo",
    "dumps_chunk",
    "loads_chunk",
    "dumps_results",
    "loads_results",
    "check_picklable",
    "dumps_task",
    "PICKLED",
    "seal",
    "unseal",
    "error_to_exception",
]

Task = tuple[Any, ...]
PROTOCOL = 5

#: Chunk kinds. TASKS entries are ``(fn, args[, kwargs[, options]])`` or ``(None, item)``;
#: CALLS entries are the caller's own ``(fn, *args)`` tuples (nothing is rebuilt per task);
#: ITEMS entries are raw items for ``process_item``; PICKLED entries are TASKS entries pickled one
#: by one (single submissions: the caller pickles its task once, to check it, and that pickle is
#: what travels, instead of pickling it again into its chunk).
TASKS, CALLS, ITEMS, PICKLED = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """Per-task execution options, carried as the fourth element of a task.

    Attributes
    ----------
    retries : int
        Extra attempts after a failure (``0``: one attempt).
    retry_backoff : float
        First delay before a retry, in seconds; doubled at each retry, with jitter.
    retry_backoff_max : float
        Largest delay between two attempts.
    retry_on : tuple of exception types
        Only these exceptions are retried.
    time_limit : float or None
        Seconds an attempt may run before it fails with :class:`~zdq.errors.TaskTimeout`.
    """

    retries: int = 0
    retry_backoff: float = 0.1
    retry_backoff_max: float = 30.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    time_limit: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be a non-negative integer, got {self.retries!r}")
        if self.retry_backoff < 0 or self.retry_backoff_max < 0:
            raise ValueError("retry_backoff and retry_backoff_max must not be negative")
        if self.time_limit is not None and self.time_limit <= 0:
            raise ValueError(f"a time limit must be positive, got {self.time_limit!r}")
        if not self.retry_on or not all(isinstance(t, type) and issubclass(t, BaseException) for t in self.retry_on):
            raise TypeError(f"retry_on must be exception types, got {self.retry_on!r}")


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """A task's failure as sent back: the exception itself when it pickles, and always its text."""

    exception: BaseException | None
    type_name: str
    message: str
    traceback: str


def _describe(obj: object) -> str:
    text = repr(obj)
    return text if len(text) <= 80 else text[:77] + "..."


def check_picklable(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> None:
    """Raise :class:`SerializationError` naming the part of a call that cannot be pickled."""
    try:
        cloudpickle.dumps((fn, args, kwargs), protocol=PROTOCOL)  # one pass when all is well
        return
    except Exception as e:
        whole = e
    fname = getattr(fn, "__qualname__", None) or _describe(fn)
    parts: list[tuple[str, Any]] = [("function", fn)]
    parts += [(f"argument {i}", a) for i, a in enumerate(args)]
    parts += [(f"keyword argument {k!r}", v) for k, v in (kwargs or {}).items()]
    for label, obj in parts:
        try:
            cloudpickle.dumps(obj, protocol=PROTOCOL)
        except Exception as e:  # pickling raises many types: TypeError, PicklingError, AttributeError...
            raise SerializationError(
                f"cannot submit {fname}: its {label} ({_describe(obj)}) cannot be pickled: {e}"
            ) from e
    raise SerializationError(f"cannot submit {fname}: the call cannot be pickled: {whole}") from whole


_PLAIN_ARGS = frozenset({int, float, complex, str, bytes, bool, type(None)})
#: Results lists up to this long are checked for plain scalars (longer ones: checking costs more).
_PLAIN_RESULTS = 16


def _scalars(values: Any) -> bool:
    return all(type(v) in _PLAIN_ARGS for v in values)


def _plainly_picklable(task: Task) -> bool:
    """Whether plain pickle writes ``task`` byte for byte as cloudpickle would, five times faster:
    a top-level function of an importable module (not ``__main__``, not registered to be pickled
    by value) called with arguments of builtin scalar types, and no options."""
    fn = task[0]
    if type(fn) is not types.FunctionType and type(fn) is not types.BuiltinFunctionType:
        return False
    module = fn.__module__
    if module is None or module == "__main__" or getattr(sys.modules.get(module), fn.__qualname__, None) is not fn:
        return False
    if len(task) > 3 or not _scalars(task[1]):
        return False
    if len(task) == 3 and task[2] and not _scalars(task[2].values()):
        return False
    return not cloudpickle.list_registry_pickle_by_value()


def dumps_task(task: Task) -> bytes:
    """Pickle one TASKS entry for a PICKLED chunk; on failure, name the part that cannot be pickled."""
    try:
        if _plainly_picklable(task):
            return pickle.dumps(task, protocol=PROTOCOL)
        return cloudpickle.dumps(task, protocol=PROTOCOL)
    except Exception as e:
        _culprit([task], TASKS)
        raise SerializationError(f"the task cannot be pickled: {e}") from e


_TAG = 16


def seal(key: bytes | None, data: bytes) -> bytes:
    """``data`` prefixed with its keyed tag (``data`` itself without a key)."""
    if key is None:
        return data
    return hashlib.blake2b(data, key=key, digest_size=_TAG).digest() + data


def unseal(key: bytes | None, payload: Any) -> memoryview:
    """The data of a sealed payload; ``ValueError`` if its tag does not match."""
    view = memoryview(payload)
    if key is None:
        return view
    if len(view) < _TAG:
        raise ValueError("payload too short to carry its tag")
    data = view[_TAG:]
    if not hmac.compare_digest(hashlib.blake2b(data, key=key, digest_size=_TAG).digest(), view[:_TAG]):
        raise ValueError("payload tag does not match: not written by a member of this pool")
    return data


def _culprit(entries: list[Any], kind: int) -> None:
    """Raise :class:`SerializationError` naming the first entry part that cannot be pickled."""
    for entry in entries:
        if kind == ITEMS:
            check_picklable(None, (entry,), None)
        elif kind == CALLS:
            check_picklable(entry[0], entry[1:], None)
        elif entry[0] is None:
            check_picklable(None, (entry[1],), None)
        else:
            check_picklable(entry[0], entry[1], entry[2] if len(entry) > 2 else None)


def dumps_chunk(
    base_task_id: int,
    entries: list[Any],
    key: bytes | None = None,
    kind: int = TASKS,
    options: TaskOptions | None = None,
) -> bytes:
    """Pickle (and seal) a chunk; on failure, name the first part that cannot be pickled."""
    try:
        # Entries already pickled are bytes: the standard pickler (much cheaper to start) suffices.
        dumps = pickle.dumps if kind == PICKLED else cloudpickle.dumps
        return seal(key, dumps((base_task_id, kind, entries, options), protocol=PROTOCOL))
    except Exception as e:
        _culprit(entries, kind)
        raise SerializationError(f"a chunk of {len(entries)} tasks cannot be pickled: {e}") from e


def loads_chunk(payload: Any, key: bytes | None = None) -> tuple[int, int, list[Any], TaskOptions | None]:
    """Check and unpickle a chunk: ``(base task id, kind, entries, options)``.

    Raises ``ValueError`` if it is forged or malformed.
    """
    obj = pickle.loads(unseal(key, payload))
    if (
        not isinstance(obj, tuple)
        or len(obj) != 4
        or not isinstance(obj[0], int)
        or obj[1] not in (TASKS, CALLS, ITEMS, PICKLED)
        or not isinstance(obj[2], list)
        or not (obj[3] is None or isinstance(obj[3], TaskOptions))
    ):
        raise ValueError(f"a chunk must be (int, kind, list, options), got {type(obj).__name__}")
    base, kind, entries, options = obj
    if kind == PICKLED:
        if not all(isinstance(e, bytes) for e in entries):
            raise ValueError("a chunk of pickled tasks holds something other than bytes")
        entries = [pickle.loads(e) for e in entries]
        if not all(isinstance(e, tuple) and len(e) >= 2 for e in entries):
            raise ValueError("a pickled task is not a task tuple")
        return base, TASKS, entries, options
    return obj


def dumps_results(
    base_task_id: int,
    values: list[Any],
    errors: dict[int, ErrorInfo],
    key: bytes | None = None,
    max_bytes: int | None = None,
) -> bytes:
    """Pickle (and seal) a chunk's results; a value that cannot be pickled becomes that task's error.

    Results larger than ``max_bytes`` (what the sockets accept) would be dropped on the wire, and
    their futures would never settle: the largest values become :class:`SerializationError`\ s
    until the rest fits.
    """
    payload = _dumps_results(base_task_id, values, errors, key)
    if max_bytes is None or len(payload) <= max_bytes:
        return payload
    values, errors = list(values), dict(errors)
    sizes = sorted(
        ((len(cloudpickle.dumps(v, protocol=PROTOCOL)), i) for i, v in enumerate(values) if i not in errors),
        reverse=True,
    )
    total = len(payload)
    for size, i in sizes:
        if total <= max_bytes:
            break
        values[i] = None
        errors[i] = _error(
            f"the result of task {base_task_id + i} pickles to {size} bytes, more than max-message-size "
            f"({max_bytes}): return large data by reference (a path, a URL, a Dask future)"
        )
        total -= size
    payload = _dumps_results(base_task_id, values, errors, key)
    if len(payload) > max_bytes:  # the errors themselves are too large (huge tracebacks)
        why = f"the results of these {len(values)} tasks pickle to more than max-message-size ({max_bytes})"
        payload = _dumps_results(base_task_id, [None] * len(values), dict.fromkeys(range(len(values)), _error(why)), key)
    return payload


def _error(message: str) -> ErrorInfo:
    from zdq.errors import SerializationError

    return ErrorInfo(SerializationError(message), "zdq.errors.SerializationError", message, "")


def _dumps_results(base_task_id: int, values: list[Any], errors: dict[int, ErrorInfo], key: bytes | None) -> bytes:
    try:
        if len(values) <= _PLAIN_RESULTS and not errors and _scalars(values):
            # A few scalars (a single task's result): the standard pickler is much cheaper to start.
            return seal(key, pickle.dumps((base_task_id, values, errors), protocol=PROTOCOL))
        return seal(key, cloudpickle.dumps((base_task_id, values, errors), protocol=PROTOCOL))
    except Exception:
        pass
    values = list(values)
    errors = dict(errors)
    for i, value in enumerate(values):
        try:
            cloudpickle.dumps(value, protocol=PROTOCOL)
        except Exception as e:
            values[i] = None
            errors[i] = ErrorInfo(
                None, "zdq.errors.SerializationError", f"the result {_describe(value)} cannot be pickled: {e}", ""
            )
    for i, info in list(errors.items()):
        try:
            cloudpickle.dumps(info, protocol=PROTOCOL)
        except Exception:
            errors[i] = ErrorInfo(None, info.type_name, info.message, info.traceback)
    return seal(key, cloudpickle.dumps((base_task_id, values, errors), protocol=PROTOCOL))


def loads_results(payload: Any, key: bytes | None = None) -> tuple[int, list[Any], dict[int, ErrorInfo]]:
    """Check and unpickle results; raise ValueError if they are forged or malformed."""
    obj = pickle.loads(unseal(key, payload))
    if (
        not isinstance(obj, tuple)
        or len(obj) != 3
        or not isinstance(obj[0], int)
        or not isinstance(obj[1], list)
        or not isinstance(obj[2], dict)
    ):
        raise ValueError(f"results must be (int, list, dict), got {type(obj).__name__}")
    return obj


def error_to_exception(info: ErrorInfo) -> BaseException:
    """The exception to raise on the driver for a failed task, with its remote traceback."""
    exc = info.exception
    if exc is None:
        exc = RemoteTaskError(info.type_name, info.message, info.traceback)
    if info.traceback and hasattr(exc, "add_note"):
        note = "remote traceback (zdq consumer):\n" + info.traceback.rstrip()
        if note not in getattr(exc, "__notes__", ()):
            exc.add_note(note)
    return exc
