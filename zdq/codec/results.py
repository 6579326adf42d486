"""Bytes: pickling results, sealing payloads, and naming what cannot be pickled.

What a task and a chunk are, and how they are pickled, is :mod:`zdq.codec.tasks`'s; this module
is beneath it and knows nothing of their shape.

When the pool is authenticated, every payload is sealed with a tag of the pool's payload key
(:mod:`zdq.codec.seal`, re-exported here), set by its author (driver or consumer) and checked by
its reader *before* unpickling: the broker in between cannot forge a payload, and bytes from any
other peer (or a fuzzer) are rejected without being unpickled (random bytes can be a pickle that
allocates gigabytes).

Results travel as ``(base_task_id, values, errors)`` where ``errors`` maps an index in ``values`` to
an :class:`ErrorInfo`. Everything is pickled with protocol 5 (:data:`PROTOCOL`).

Pickles name classes and functions by their module, and stored payloads (durable queues, dead
letters, a schedule's last results) outlive a rename: :func:`loads_earlier` reads them under the
names they had when they were written (``zdq.serialization``, ``zdq.tasks``), and is tried only
when a plain ``pickle.loads`` fails to find a name, so the common path pays nothing for it.

Nothing here holds state: every function is pure (apart from the pickles it writes).
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import cloudpickle

from zdq.codec.seal import seal, unseal
# A failure as it travels is the error tree's own (a ConsumerInitError travels with its cause):
# named here too, where results are packed and read.
from zdq.errors import (
    ErrorInfo,
    LenientLoader,
    ProtocolError,
    SerializationError,
    error_info,
    error_to_exception,
    without_stand_ins,
)

__all__ = [  # noqa: RUF022 - grouped by role
    "PROTOCOL",
    "UNKNOWN_BASE",
    # results
    "ErrorInfo",
    "dumps_results",
    "dumps_whole_results",
    "fit_results",
    "loads_results",
    "error_info",
    "error_to_exception",
    # sealing
    "seal",
    "unseal",
    # what cannot be pickled
    "check_picklable",
    "all_scalars",
    # what earlier versions wrote
    "loads_earlier",
]

PROTOCOL = 5
#: The first task id of results for a chunk that did not decode (its ids were inside it): they
#: are the results of every task of the chunk they answer.
UNKNOWN_BASE = -1


def _describe(obj: object) -> str:
    """A short repr of ``obj`` for a message; its type's name if its ``repr`` raises (a message
    about an object must not fail because of it)."""
    try:
        text = repr(obj)
    except Exception as e:
        text = f"<{type(obj).__module__}.{type(obj).__qualname__} object, whose repr raised {type(e).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def check_picklable(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> None:
    """Raise :class:`SerializationError` naming the part of a call that cannot be pickled."""
    try:
        cloudpickle.dumps((fn, args, kwargs), protocol=PROTOCOL)  # one pass when all is well
        return
    except Exception as e:
        whole = e
    if fn is None:  # a raw item, for process_item
        raise SerializationError(f"cannot put the item {_describe(args[0] if args else None)}: it cannot be pickled: {whole}") from whole
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


def all_scalars(values: Any) -> bool:
    """Whether every one of ``values`` is of a builtin scalar type (plain pickle writes those)."""
    return _PLAIN_ARGS.issuperset(map(type, values))  # no generator frame: a lone result's path


def dumps_results(
    base_task_id: int,
    values: list[Any],
    errors: dict[int, ErrorInfo],
    key: bytes | None = None,
    max_bytes: int | None = None,
) -> bytes:
    """Pickle (and seal) a chunk's results; a value that cannot be pickled becomes that task's error.

    Results larger than ``max_bytes`` (what the sockets accept) would be dropped on the wire, and
    their futures would never settle: the largest values become errors (:class:`SerializationError`)
    until the rest fits (:func:`fit_results`, which also says which).
    """
    payload = _dumps_results(base_task_id, values, errors, key)
    if max_bytes is None or len(payload) <= max_bytes:
        return payload
    return fit_results(base_task_id, values, errors, key, max_bytes, payload)[0]


def fit_results(
    base_task_id: int,
    values: list[Any],
    errors: dict[int, ErrorInfo],
    key: bytes | None,
    max_bytes: int | None,
    payload: bytes | None = None,
) -> tuple[bytes, dict[int, ErrorInfo]]:
    """:func:`dumps_results` under ``max_bytes`` (``None``: no limit), and the errors it carries:
    ``errors`` and those of the values that did not fit (``payload``: the results pickled whole,
    if already done)."""
    if payload is None:
        payload = _dumps_results(base_task_id, values, errors, key)
    if max_bytes is None or len(payload) <= max_bytes:
        return payload, errors
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
        errors[i] = _too_large(base_task_id + i, size, max_bytes, alone=size > max_bytes or len(values) == 1)
        total -= size
    payload = _dumps_results(base_task_id, values, errors, key)
    if len(payload) > max_bytes:  # the errors themselves are too large (huge tracebacks)
        why = (
            f"the results of these {len(values)} tasks pickle to more than the {max_bytes} bytes a consumer's report may "
            "carry (max-message-size, less room for its frames)"
        )
        errors = dict.fromkeys(range(len(values)), _error(why))
        payload = _dumps_results(base_task_id, [None] * len(values), errors, key)
    return payload, errors


def too_large_alone(
    base_task_id: int, values: list[Any], errors: dict[int, ErrorInfo], key: bytes | None, max_bytes: int
) -> dict[int, ErrorInfo]:
    """The errors of the outcomes in a chunk's results that are too large for a report even alone:
    a value's is a :class:`SerializationError` naming its task and size; an exception's is its
    type and the head of its text and traceback (raised as a :class:`RemoteTaskError`), if that
    fits. Running their chunk's tasks again one by one would not help them (reviewer 28a: one
    such value had a chunk of 200 run twice, itself among them)."""
    found: dict[int, ErrorInfo] = {}
    for i, value in enumerate(values):
        outcome: tuple[list[Any], dict[int, ErrorInfo]] = ([None], {0: errors[i]}) if i in errors else ([value], {})
        try:
            size = len(_dumps_results(base_task_id + i, *outcome, key))
        except Exception:  # noqa: BLE001 - pickling it failed: it is a SerializationError of its own later
            continue
        if size <= max_bytes:
            continue
        if i in errors:  # an exception too large (reviewer 28e): its type and the head of its text go
            info = errors[i]
            text = f"{str(info.message)[:4000]} (cut: the error pickled to {size} bytes)"
            cut = ErrorInfo(None, info.type_name, text, str(info.traceback)[-4000:])
            if len(_dumps_results(base_task_id + i, [None], {0: cut}, key)) <= max_bytes:
                found[i] = cut
                continue
        found[i] = _too_large(base_task_id + i, size, max_bytes, alone=True)
    return found


def _too_large(task_id: int, size: int, max_bytes: int, *, alone: bool) -> ErrorInfo:
    beside = "," if alone else ": with the rest of its chunk's results,"
    return _error(
        f"the result of task {task_id} pickles to {size} bytes{beside} more than the {max_bytes} "
        "bytes a consumer's report may carry (max-message-size, less room for its frames): return large "
        "data by reference (a path, a URL, a Dask future)"
    )


def dumps_whole_results(
    base_task_id: int,
    values: list[Any],
    errors: dict[int, ErrorInfo],
    key: bytes | None = None,
    max_bytes: int | None = None,
) -> bytes | None:
    """A chunk's results pickled (and sealed) as :func:`dumps_results` does, or ``None`` if
    together they are larger than ``max_bytes``: the consumer then has the chunk's tasks run again
    one by one rather than fail those that do not fit beside the others."""
    payload = _dumps_results(base_task_id, values, errors, key)
    return payload if max_bytes is None or len(payload) <= max_bytes else None


def _error(message: str) -> ErrorInfo:
    return ErrorInfo(SerializationError(message), "zdq.errors.SerializationError", message, "")


def _dumps_results(base_task_id: int, values: list[Any], errors: dict[int, ErrorInfo], key: bytes | None) -> bytes:
    try:
        if len(values) <= _PLAIN_RESULTS and not errors and all_scalars(values):
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
            values[i] = None  # zdq's error, not the task's: a SerializationError, as a value too large is
            errors[i] = _error(f"the result {_describe(value)} cannot be pickled: {e}")
    for i, info in list(errors.items()):
        try:
            cloudpickle.dumps(info, protocol=PROTOCOL)
        except Exception:
            errors[i] = ErrorInfo(None, info.type_name, info.message, info.traceback)
    try:
        return seal(key, cloudpickle.dumps((base_task_id, values, errors), protocol=PROTOCOL))
    except Exception as e:  # each pickles alone, not together: every task's outcome is this error
        # (the consumer reports whatever this returns: raising here would leave the chunk unreported)
        info = _error(f"the results of this chunk cannot be pickled together: {e!r:.300}")
        return seal(key, pickle.dumps((base_task_id, [None] * len(values), dict.fromkeys(range(len(values)), info)), protocol=PROTOCOL))


def loads_results(payload: Any, key: bytes | None = None, *, lenient: bool = False) -> tuple[int, list[Any], dict[int, ErrorInfo]]:
    """Check and unpickle results.

    ``lenient``: a name this process cannot import (a module only the workers have) costs only
    the tasks whose value or exception holds it (:func:`~zdq.errors.without_stand_ins`), not the
    chunk's other results (reviewer 27c: one exception of such a class failed its nine
    neighbours); the driver and :mod:`zdq.client.by_id` read results so. Without it, it raises as
    ``pickle.loads`` does.

    Raises
    ------
    ProtocolError
        (a ``ValueError``) They are forged (see :func:`unseal`) or not ``(int, list, dict)``.
    """
    data = unseal(key, payload)
    loader: LenientLoader | None = None
    try:
        obj = pickle.loads(data)
    except (AttributeError, ImportError):  # a name that moved since they were written (or a user's missing one)
        try:
            obj = loads_earlier(data)
        except (AttributeError, ImportError):
            if not lenient:
                raise
            loader = LenientLoader(data)
            obj = loader.load()  # what fails even with stand-ins fails the chunk, as without them
    if (
        not isinstance(obj, tuple)
        or len(obj) != 3
        or not isinstance(obj[0], int)
        or not isinstance(obj[1], list)
        or not isinstance(obj[2], dict)
    ):
        raise ProtocolError(f"results must be (int, list, dict), got {type(obj).__name__}")
    if loader is not None:
        return without_stand_ins(obj, ", ".join(dict.fromkeys(loader.missing)))
    return obj


#: The modules whose names stored pickles may carry, and where those names live now.
_MOVED = {"zdq.serialization": "zdq.codec.results", "zdq.tasks": "zdq.codec.tasks"}


class _EarlierNames(pickle.Unpickler):
    """An unpickler that finds names where they went (see :data:`_MOVED`). :class:`TaskOptions
    <zdq.codec.tasks.TaskOptions>` was first ``zdq.serialization.TaskOptions``, then
    ``zdq.tasks.TaskOptions``."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "zdq.serialization" and name == "TaskOptions":
            module = "zdq.tasks"
        return super().find_class(_MOVED.get(module, module), name)


def loads_earlier(data: Any) -> Any:
    """Unpickle ``data`` written by an earlier zdq, whose names may have moved since.

    A name that is missing for another reason (a user's module that a worker cannot import)
    raises as it would from ``pickle.loads``.

    >>> import pickle
    >>> from zdq.codec.tasks import TaskOptions
    >>> old = pickle.dumps(TaskOptions(retries=1), protocol=2).replace(b"zdq.codec.tasks", b"zdq.serialization")
    >>> loads_earlier(old) == TaskOptions(retries=1)
    True
    """
    return _EarlierNames(io.BytesIO(data)).load()
