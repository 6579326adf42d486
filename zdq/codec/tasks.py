"""The task codec: the one module that knows what a task and a chunk are, and how each task runs.

A chunk is ``(base_task_id, kind, entries, options)`` pickled in one go (protocol 5), so a function
shared by a thousand tasks is written once and the per-task cost is a few microseconds. The task
ids of a chunk are consecutive from ``base_task_id``; ``options`` (a :class:`TaskOptions` or
``None``) apply to every entry. The kind says what an entry is:

=========  ==========================================  ===========================================
kind       an entry                                    how it runs
=========  ==========================================  ===========================================
TASKS      ``(fn, args)``, ``(fn, args, kwargs)``,     ``fn(*args, **kwargs)``, with the task's
           ``(fn, args, kwargs, options)``             own options (retries, time limit)
           ``(None, item)``                            ``process_item(item)``
CALLS      the caller's own ``(fn, *args)`` tuple      ``fn(*args)``
ITEMS      a raw item                                  ``process_item(item)``
PICKLED    a TASKS entry pickled alone (bytes)         decoded into a TASKS chunk before it runs
SHARED     on the wire only: CALLS that share one      decoded into a CALLS chunk (its entries a
           function and length, ``(fn, n, columns)``   :class:`SharedCalls`) before it runs
=========  ==========================================  ===========================================

Single submissions build TASKS entries (:func:`call_task`, :func:`item_task`); empty kwargs are
left out because an empty dict per task nearly doubles the cost. The caller pickles each one
(:func:`dumps_task`, to check it at once), and that pickle is what travels, in a PICKLED chunk,
instead of being pickled again. Batches ship the caller's tuples untouched (CALLS): nothing is
rebuilt per task. cloudpickle pickles by reference whatever plain pickle can, and by value what
workers cannot import (functions and classes of ``__main__``, lambdas, closures).

Running is chosen once per chunk, never per task: :func:`run_entries` gives the loop of a kind
(for a chunk of calls, nothing but the call per task), :func:`callers` the call of one entry (for
task threads and retries), :func:`own_options` the options a TASKS entry carries.

How many tasks go in a chunk, and how submissions are cut, is :mod:`zdq.codec.chunking`'s. Sealing
and results are :mod:`zdq.codec.results`'s. Nothing here holds state: the constants are fixed at
import, and every function is pure (running a chunk only writes the ``values`` it is handed).

>>> from zdq.codec.tasks import CALLS, dumps_chunk, loads_chunk, run_entries
>>> base, kind, entries, options = loads_chunk(dumps_chunk(7, [(divmod, 7, 2), (pow, 2, 10)], kind=CALLS))
>>> values = [None] * len(entries)
>>> run_entries(kind)(enumerate(entries), values, print, print, None)
>>> base, values
(7, [(3, 1), 1024])
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import itertools
import math
import operator
import pickle
import sys
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import cloudpickle

from zdq.compiled import compiled
from zdq.errors import ProtocolError, SerializationError, TaskCancelled
from zdq.codec.results import PROTOCOL, all_scalars, check_picklable, loads_earlier, seal, unseal

__all__ = [  # noqa: RUF022 - grouped by role
    # kinds and shapes
    "TASKS",
    "CALLS",
    "ITEMS",
    "PICKLED",
    "Task",
    "TaskOptions",
    "Chunk",
    "split_chunk",
    # building
    "call_task",
    "item_task",
    "check_calls",
    # encoding and decoding
    "dumps_task",
    "dumps_chunk",
    "loads_chunk",
    # cancelled tasks
    "CANCELLED",
    "cancelled_entry",
    "is_cancelled",
    "cancel_in_chunk",
    # running
    "Call",
    "Careful",
    "Loop",
    "callers",
    "run_entries",
    "own_options",
]
# Tasks by name and hard time limits (check_task_name, resolve_task_name, is_named, call_parts,
# careful_callers) are imported by the submitter and the runner from here: they are not in
# ``__all__``, which zdq.tasks, the old path, must repeat whole.

Task = tuple[Any, ...]

#: Chunk kinds (see the table above); their numbers are on the wire and in durable queues.
TASKS, CALLS, ITEMS, PICKLED = 0, 1, 2, 3
#: A CALLS chunk whose calls all share one function (the same object) and one length, pickled by
#: columns: ``(fn, n, [first arguments], [second arguments], ...)`` as ``(fn, n, columns)``. A list
#: of a thousand ints pickles and unpickles in a fifth of the time of a thousand ``(fn, i)`` tuples,
#: and the consumer runs it by blocks of calls, without a tuple per call (:class:`SharedCalls`).
#: Never seen decoded.
SHARED = 4
#: Fewest calls a chunk packs by columns, and most arguments per call.
_SHARED_MIN, _SHARED_MAX_ARGS = 8, 8
#: ``zdq._calls.shape``: a batch's shape in one pass of C (see :func:`_all_calls`), or None where
#: it was not built (the same shape is then taken in Python).
_shape: Callable[[object], Any] | None = getattr(compiled("_calls"), "shape", None)


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """Per-task execution options, carried by a TASKS entry or by a whole chunk.

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
    hard : bool
        Run each attempt in a child process of the consumer, killed at ``time_limit`` (which it
        needs); without it, a task past its limit is abandoned to finish on its thread.
    expires : float
        Wall-clock time (``time.time()``) after which the task does not start: it fails with
        :class:`~zdq.errors.TaskExpired` (the consumer's check; its broker checks too, before it
        delivers the chunk); ``0.0``: never. Set from ``submit(..., expires=)``.

    >>> TaskOptions(retries=2, time_limit=30.0).retries
    2
    """

    retries: int = 0
    retry_backoff: float = 0.1
    retry_backoff_max: float = 30.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    time_limit: float | None = None
    # Added later, last, with defaults: options pickled before they existed (in durable queues) still load.
    hard: bool = False
    expires: float = 0.0

    def __setstate__(self, state: Sequence[Any]) -> None:
        # A frozen dataclass with slots pickles its fields as a list, in order: options pickled by
        # an earlier version (a durable queue's chunks, dead letters) hold fewer, and the fields
        # added since take their defaults.
        fields = dataclasses.fields(self)
        values = (*state, *(f.default for f in fields[len(state) :]))
        for f, value in zip(fields, values):
            object.__setattr__(self, f.name, value)

    def __post_init__(self) -> None:
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or self.retries < 0:
            raise ValueError(f"retries must be a non-negative integer, got {self.retries!r}")
        for name in ("retry_backoff", "retry_backoff_max"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a non-negative, finite number of seconds, got {value!r}")
        if not isinstance(self.expires, (int, float)) or not 0 <= self.expires < math.inf:
            raise ValueError(f"expires must be a wall-clock time in seconds (0: never), got {self.expires!r}")
        if self.time_limit is not None and not 0 < self.time_limit < math.inf:
            raise ValueError(f"a time limit must be positive, got {self.time_limit!r}")
        if (
            not isinstance(self.retry_on, tuple)
            or not self.retry_on
            or not all(isinstance(t, type) and issubclass(t, BaseException) for t in self.retry_on)
        ):
            raise TypeError(f"retry_on must be exception types, got {self.retry_on!r}")
        if not isinstance(self.hard, bool):
            raise TypeError(f"hard must be True or False, got {self.hard!r}")
        if self.hard and self.time_limit is None:
            raise ValueError("hard=True kills a task at its time limit: give a time_limit too (or a pool's default one)")


# -- building ------------------------------------------------------------------------------------
def call_task(
    fn: Callable[..., Any] | str,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    options: TaskOptions | None = None,
) -> Task:
    """The TASKS entry of ``fn(*args, **kwargs)``: its shortest layout (no empty kwargs). ``fn``
    may be a task name (:func:`check_task_name`)."""
    if options is not None:
        return (fn, tuple(args), kwargs or None, options)
    return (fn, tuple(args), kwargs) if kwargs else (fn, tuple(args))


def item_task(item: Any) -> Task:
    """The TASKS entry of a raw item, for the consumer's ``process_item``."""
    return (None, item)


def check_calls(calls: Sequence[Any], first: int = 0) -> Any:
    """Raise ``TypeError`` unless every one of ``calls`` is a CALLS entry ``(fn, *args)``, where
    ``fn`` is a callable or a task name (:func:`check_task_name`, which raises ``ValueError``);
    ``first`` is the position of ``calls[0]`` in what the user submitted.

    Returns the function every call shares (the same object, checked by identity), which
    :meth:`~zdq.codec.chunking.Chunking.pack_batch` may then pack by columns (SHARED); ``None`` when they do not share one."""
    shared = _all_calls(calls)
    if shared is not False:
        return shared
    for i, call in enumerate(calls):
        if type(call) is not tuple or not call or not callable(call[0]):
            if type(call) is tuple and call and type(call[0]) is str:  # only names pay for this
                check_task_name(call[0], f"batch_submit item {first + i}: ")
                continue
            if type(call) is tuple and call:  # a tuple whose first item is no function
                raise TypeError(
                    f"batch_submit item {first + i} must be a tuple (fn, *args) whose fn is callable or a task "
                    f"name, got {_shown(call)}: {_shown(call[0])} is not callable"
                )
            raise TypeError(f"batch_submit item {first + i} must be a tuple (fn, *args), got {_shown(call)}")
    return None


def _all_calls(calls: Sequence[Any]) -> Any:
    """Whether ``calls`` are all non-empty tuples whose first item is callable, checked without a
    Python loop. False leaves the verdict, and the position of a wrong entry, to the loop of
    :func:`check_calls`; otherwise the function every call shares, or ``None`` when they do not
    share one. Calls that share one (``operator.is_``: no ``__eq__`` is asked) need ``callable``
    asked once.

    Where ``zdq._calls`` is built, one pass of C over a list (:data:`_shape`: a tenth of the time,
    and it asks nothing of the user's objects). Otherwise loops that run in C (``map``, ``count``,
    ``all``): about half the time of the loop in :func:`check_calls` for a million calls.
    Types are compared by identity (``operator.is_``): a class whose metaclass says it equals
    ``tuple`` is no tuple here, as in C. ``callable`` is asked of every entry: no ``__eq__`` of a
    user's object is trusted. Anything that raises leaves it to the loop."""
    if _shape is not None and type(calls) is list:
        found = _shape(calls)
        return found if found is False else found[0]
    n = len(calls)
    head = calls[0] if n else None
    if type(head) is not tuple or not head or not callable(head[0]):  # a batch by name, or none: the loop
        return False
    try:
        if not all(map(operator.is_, map(type, calls), itertools.repeat(tuple))):
            return False
        fn = head[0]
        # An empty tuple has no first item: IndexError, and the loop names it.
        if all(map(operator.is_, map(_first, calls), itertools.repeat(fn))):
            return fn
        return None if all(map(callable, map(_first, calls))) else False
    except Exception:
        return False


_first = operator.itemgetter(0)


def _shown(obj: Any) -> str:
    """``repr(obj)`` cut to 80 characters for an error message; a ``__repr__`` that raises gives
    way to the type's name (the error said is zdq's, not the repr's)."""
    try:
        return f"{obj!r:.80}"
    except Exception:  # noqa: BLE001 - any error of a user's __repr__
        return f"<{type(obj).__qualname__} object whose repr raises>"


def _dotted(path: str) -> bool:
    """Whether ``path`` is Python identifiers joined by dots (any script: ``"é.x"`` is one)."""
    return all(part.isidentifier() for part in path.split("."))


def check_task_name(name: str, where: str = "") -> None:
    """Raise ``ValueError`` unless ``name`` has the form of a task name the consumers can import,
    ``"package.module:function"`` (or ``"package.module:Class.method"``): two dotted paths of
    identifiers (``str.isidentifier``: non-ASCII letters too), no path, space or second colon.
    ``where`` prefixes the message (which item of a batch)."""
    module, colon, attribute = name.partition(":")
    if not colon or not _dotted(module) or not _dotted(attribute):
        raise ValueError(
            f"{where}a task given by name must be 'package.module:function' (or 'package.module:Class.method'), "
            f"got {name!r:.80}"
        )


# -- encoding ------------------------------------------------------------------------------------
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
    if len(task) > 3 or not all_scalars(task[1]):
        return False
    if len(task) == 3 and task[2] and not all_scalars(task[2].values()):
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


#: The parts of an entry that a user may get wrong, by kind: ``(fn, args, kwargs)``.
_PARTS: dict[int, Callable[[Any], tuple[Any, tuple[Any, ...], dict[str, Any] | None]]] = {
    TASKS: lambda e: (None, (e[1],), None) if e[0] is None else (e[0], e[1], e[2] if len(e) > 2 else None),
    CALLS: lambda e: (e[0], e[1:], None),
    ITEMS: lambda e: (None, (e,), None),
}


def _culprit(entries: list[Any], kind: int, base_task_id: int | None = None) -> None:
    """Raise :class:`SerializationError` naming the first entry part that cannot be pickled (and
    setting its ``task_id``, when the chunk's ``base_task_id`` is known)."""
    parts = _PARTS.get(kind)  # PICKLED entries are bytes: they always pickle
    if parts is not None:
        for i, entry in enumerate(entries):
            try:
                check_picklable(*parts(entry))
            except SerializationError as e:
                if base_task_id is not None:
                    e.task_id = base_task_id + i
                raise


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
        _culprit(entries, kind, base_task_id)
        raise SerializationError(f"a chunk of {len(entries)} tasks cannot be pickled: {e}") from e


def calls_width(calls: list[tuple[Any, ...]]) -> int:
    """The length of every one of ``calls`` (the function and its arguments) when they all have
    as many, few enough arguments, and are enough to go by columns (SHARED); else 0. ``calls``
    are tuples that share their function (:func:`check_calls` said so). One pass in C over the
    whole batch (:data:`_shape` where it is built): a pass over a million calls costs less than a
    thousand passes over a thousand."""
    n = len(calls)
    width = len(calls[0]) if n >= _SHARED_MIN else 0
    if not 1 <= width <= _SHARED_MAX_ARGS + 1:
        return 0
    if _shape is not None and type(calls) is list:
        found = _shape(calls)
        return width if found is not False and found[1] == width else 0
    return width if list(map(len, calls)).count(width) == n else 0


def calls_columns(calls: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """The arguments of ``calls`` (all of length ``width``, :func:`calls_width`) by position:
    ``[first arguments, second arguments, ...]``. Taken chunk by chunk: a column of a whole
    batch (a million ints) would be young while the batch is packed, and the collector's young
    collections, which a batch's packing sets off, would walk every item of it (10-30 ms a
    collection for a million calls)."""
    return [list(map(operator.itemgetter(j), calls)) for j in range(1, width)]


def dumps_shared(
    base_task_id: int, fn: Any, n: int, columns: list[list[Any]], key: bytes | None = None, options: TaskOptions | None = None
) -> bytes:
    """Pickle (and seal) ``n`` calls of ``fn`` whose arguments are ``columns`` as a SHARED chunk;
    on failure, name the first part that cannot be pickled, as :func:`dumps_chunk` does."""
    try:
        return seal(key, cloudpickle.dumps((base_task_id, SHARED, (fn, n, columns), options), protocol=PROTOCOL))
    except Exception as e:
        _culprit(list(zip(itertools.repeat(fn, n), *columns)), CALLS, base_task_id)
        raise SerializationError(f"a chunk of {n} tasks cannot be pickled: {e}") from e


class SharedCalls(list):  # type: ignore[type-arg]
    """The entries of a chunk that came by columns (SHARED): a list of ``(fn, *args)`` tuples as
    any CALLS chunk's, which also keeps ``fn``, the count ``n`` and the ``columns`` of arguments
    it was built from, so that the consumer can run them from the columns (by blocks). The list is
    what counts: cancelled tasks' placeholders go into it; ``columns`` is never written.

    Built empty with ``fill=False`` (:func:`loads_chunk`'s ``lazy``, for the consumer, which needs
    the tuples only when a task fails or is cancelled): :meth:`fill` builds them."""

    __slots__ = ("columns", "fn", "n")

    def __init__(self, fn: Any, n: int, columns: list[list[Any]], *, fill: bool = True) -> None:
        super().__init__()
        self.fn = fn
        self.n = n
        self.columns = columns
        if fill:
            self.fill()

    @property
    def filled(self) -> bool:
        return len(self) == self.n

    def fill(self) -> None:
        """Build the tuples, once (a no-op after). Whoever may race it holds one lock: the
        consumer's runner fills a chunk's list under its cancel lock once others can see it."""
        if len(self) != self.n:
            self[:] = zip(itertools.repeat(self.fn, self.n), *self.columns)


def _shared_entries(entries: Any, lazy: bool = False) -> SharedCalls:
    """The CALLS entries of a SHARED chunk's ``(fn, n, columns)``, checked.

    Raises :class:`~zdq.errors.ProtocolError` unless the columns are lists of ``n`` each."""
    if not isinstance(entries, tuple) or len(entries) != 3:
        raise ProtocolError("a chunk of shared calls must hold (fn, n, columns)")
    fn, n, columns = entries
    if (
        type(n) is not int
        or n < 0
        or not isinstance(columns, list)
        or len(columns) > _SHARED_MAX_ARGS
        or not all(type(c) is list and len(c) == n for c in columns)
    ):
        raise ProtocolError("a chunk of shared calls must hold n arguments in each of its columns")
    return SharedCalls(fn, n, columns, fill=not lazy)


# -- decoding ------------------------------------------------------------------------------------
#: A decoded chunk: ``(base task id, kind, entries, options)``, never of kind PICKLED (those decode
#: into TASKS). A plain tuple: a named one costs more to build than a one-task chunk takes to run.
Chunk = tuple[int, int, list[Any], TaskOptions | None]


def split_chunk(chunk: Chunk, key: bytes | None) -> list[bytes]:
    """Each task of a decoded chunk alone, as a chunk of its own (so that a task that kills its
    consumer is tried alone)."""
    base, kind, entries, options = chunk
    return [dumps_chunk(base + i, [e], key, kind, options) for i, e in enumerate(entries)]


def loads_chunk(payload: Any, key: bytes | None = None, lazy: bool = False) -> Chunk:
    """Check and unpickle a chunk. ``lazy``: a SHARED chunk's :class:`SharedCalls` comes empty,
    to be filled (:meth:`SharedCalls.fill`) before it is used as a list (its length too).

    Raises :class:`~zdq.errors.ProtocolError` (a ``ValueError``) if it is forged or malformed.
    """
    data = unseal(key, payload)
    try:
        obj = pickle.loads(data)
    except (AttributeError, ImportError):  # a name that moved since the chunk was written (or a user's missing one)
        obj = loads_earlier(data)
    if (
        not isinstance(obj, tuple)
        or len(obj) != 4
        or not isinstance(obj[0], int)
        or obj[1] not in (TASKS, CALLS, ITEMS, PICKLED, SHARED)
        or not isinstance(obj[2], list if obj[1] != SHARED else tuple)
        or not (obj[3] is None or isinstance(obj[3], TaskOptions))
    ):
        raise ProtocolError(f"a chunk must be (int, kind, list, options), got {type(obj).__name__}")
    base, kind, entries, options = obj
    if kind == SHARED:
        return base, CALLS, _shared_entries(entries, lazy), options
    if kind == PICKLED:
        # By map, not generators: a lone task's chunk (submit) comes this way, and each
        # generator is a Python frame (three of them were a fifth of this function's cost).
        if not all(map(isinstance, entries, itertools.repeat(bytes))):
            raise ProtocolError("a chunk of pickled tasks holds something other than bytes")
        try:
            entries = list(map(pickle.loads, entries))
        except (AttributeError, ImportError):
            entries = [loads_earlier(e) for e in entries]
        if not all(map(isinstance, entries, itertools.repeat(tuple))) or min(map(len, entries), default=2) < 2:
            raise ProtocolError("a pickled task is not a task tuple")
        return base, TASKS, entries, options
    return obj


# -- cancelled tasks -----------------------------------------------------------------------------
def _cancelled(*_: Any, **__: Any) -> Any:
    """What a cancelled task calls instead of its function: it never runs."""
    raise TaskCancelled("this task was cancelled before it started")


#: The type name a cancelled task's ErrorInfo carries.
CANCELLED = "zdq.errors.TaskCancelled"
#: The type name an expired task's ErrorInfo carries (not in ``__all__``: the old path
#: ``zdq.tasks`` re-exports that list as it was).
EXPIRED = "zdq.errors.TaskExpired"
_CANCELLED_CALL = (_cancelled,)
#: Also the placeholder of a cancelled raw item while its chunk runs (never pickled as such: an
#: items chunk rewritten by a driver becomes a TASKS chunk).
_CANCELLED_TASK = (_cancelled, ())


def cancelled_entry(kind: int) -> Task:
    """The entry that takes a cancelled task's place in a running chunk of ``kind``."""
    return _CANCELLED_CALL if kind == CALLS else _CANCELLED_TASK


def is_cancelled(entry: Any) -> bool:
    """Whether ``entry`` is a cancelled task's placeholder (of any kind)."""
    return type(entry) is tuple and bool(entry) and entry[0] is _cancelled


def cancel_in_chunk(payload: Any, key: bytes | None, indexes: Iterable[int]) -> bytes:
    """A chunk's payload with the tasks ``indexes`` replaced by placeholders that only report
    :class:`TaskCancelled` (a driver rewrites a chunk it has not sent yet). CALLS and ITEMS chunks
    become TASKS chunks (their entries keep their meaning as TASKS entries); PICKLED stays PICKLED."""
    data = unseal(key, payload)
    try:
        base, kind, entries, options = pickle.loads(data)
    except (AttributeError, ImportError):
        base, kind, entries, options = loads_earlier(data)
    if kind == SHARED:
        entries, kind = list(_shared_entries(entries)), CALLS
    cancelled = set(indexes)
    if kind == PICKLED:
        placeholder = pickle.dumps(_CANCELLED_TASK, protocol=PROTOCOL)
        entries = [placeholder if i in cancelled else e for i, e in enumerate(entries)]
        return dumps_chunk(base, entries, key, PICKLED, options)
    if kind == CALLS:
        entries = [(e[0], tuple(e[1:])) for e in entries]
    elif kind == ITEMS:
        entries = [item_task(e) for e in entries]
    entries = [_CANCELLED_TASK if i in cancelled else e for i, e in enumerate(entries)]
    return dumps_chunk(base, entries, key, TASKS, options)


# -- running -------------------------------------------------------------------------------------
#: Calls one entry; returns its value or raises its error.
Call = Callable[[Any], Any]
#: ``careful(context, i, entry, failed)``: run entry ``i`` with its options (retries, time
#: limit), or, with ``failed``, carry on after that first attempt's error. Never raises.
Careful = Callable[[Any, int, Any, BaseException | None], None]
#: ``loop(numbered, values, process_item, careful, context)``: runs a chunk's entries, given as
#: ``enumerate(entries)``, into ``values``. The caller keeps the ``enumerate``: how far it got says
#: which tasks have started (a cancellation reads it). ``context`` is handed to ``careful`` as it
#: is (the caller's state of the chunk: passing it costs less per chunk than binding it).
Numbered = Iterable[tuple[int, Any]]
Loop = Callable[[Numbered, list[Any], Call, Careful, Any], None]


def _run_calls(numbered: Numbered, values: list[Any], process_item: Call, careful: Careful, context: Any) -> None:
    # The hot loop of no-op benchmarks: nothing but the call, per task.
    for i, c in numbered:
        try:
            values[i] = c[0](*c[1:])
        except BaseException as e:  # noqa: BLE001 - a task's failure is its result, whatever it raised
            careful(context, i, c, e)


def _run_items(numbered: Numbered, values: list[Any], process_item: Call, careful: Careful, context: Any) -> None:
    for i, item in numbered:
        if item is _CANCELLED_TASK:  # a raw item cannot call its placeholder itself
            careful(context, i, item, None)
            continue
        try:
            values[i] = process_item(item)
        except BaseException as e:  # noqa: BLE001 - the same
            careful(context, i, item, e)


def _run_tasks(numbered: Numbered, values: list[Any], process_item: Call, careful: Careful, context: Any) -> None:
    # The layouts of _call_task, inlined: a call per task would cost as much as the dispatch.
    for i, t in numbered:
        n = len(t)
        if n > 3:  # its own options: retries, time limit
            careful(context, i, t, None)
            continue
        try:
            if t[0] is None:
                values[i] = process_item(t[1])
            elif n == 2:
                values[i] = t[0](*t[1])
            else:
                values[i] = t[0](*t[1], **(t[2] or {}))
        except BaseException as e:  # noqa: BLE001 - the same
            careful(context, i, t, e)


@functools.lru_cache(maxsize=1024)
def resolve_task_name(name: str) -> Callable[..., Any]:
    """The function a task name (``"package.module:function"``) stands for, imported in this
    process; cached per process (a failure is not: a module installed later is then found).

    Raises ``ImportError`` naming the module, or the attribute missing from it.
    """
    module_name, _, attribute = name.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except (Exception, SystemExit) as e:  # a module that raises, or exits, at import is no task
        why = f"{type(e).__name__}: {e}" if not isinstance(e, ImportError) else str(e)
        raise ImportError(f"task {name!r}: cannot import module {module_name!r}: {why}", name=module_name) from e
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as e:
            raise ImportError(
                f"task {name!r}: module {module_name!r} has no attribute {attribute!r}", name=module_name
            ) from e
    if not callable(target):
        raise ImportError(f"task {name!r}: {attribute!r} of module {module_name!r} is not callable", name=module_name)
    return target


def _resolve(name: str, where: str) -> Callable[..., Any]:
    try:
        return resolve_task_name(name)
    except ImportError as e:
        cause = e.__cause__
        if cause is not None:
            # Resolved on the careful path, while the fast path's call of the name ("'str' object
            # is not callable") is being handled: that is how a name is found, not part of why it
            # failed, and the task's traceback would begin with it.
            cause.__context__ = None
        raise ImportError(f"{e} (on {where})", name=e.name) from cause  # chained from the module's own error


def is_named(kind: int, entry: Any) -> bool:
    """Whether ``entry`` calls a task by name (a string in place of its function). Asked only
    after its first attempt failed: on the fast path a name is called as it is, and fails."""
    return kind != ITEMS and type(entry) is tuple and bool(entry) and type(entry[0]) is str


def call_parts(kind: int, entry: Any, process_item: Call) -> tuple[Any, tuple[Any, ...], dict[str, Any] | None]:
    """``(fn, args, kwargs)`` of an entry: what a child process calls. A task name stays a name:
    the child imports it, under the task's hard time limit (an import may hang, or leave modules
    in the consumer's process)."""
    if kind == ITEMS:
        return process_item, (entry,), None
    if kind == CALLS:
        fn, args, kwargs = entry[0], entry[1:], None
    elif entry[0] is None:
        return process_item, (entry[1],), None
    else:
        fn, args, kwargs = entry[0], entry[1], entry[2] if len(entry) > 2 else None
    return fn, tuple(args), kwargs or None


def _call_task(process_item: Call, t: Task) -> Any:
    if t[0] is None:
        return process_item(t[1])
    if len(t) == 2:
        return t[0](*t[1])
    return t[0](*t[1], **(t[2] or {}))


def _call_call(c: Task) -> Any:
    return c[0](*c[1:])


_LOOPS: dict[int, Loop] = {TASKS: _run_tasks, CALLS: _run_calls, ITEMS: _run_items}


def run_entries(kind: int) -> Loop:
    """The loop that runs the entries of a chunk of ``kind`` (TASKS, CALLS or ITEMS).

    Each value lands in ``values[i]``; an entry that fails, or that carries options of its own,
    goes to ``careful`` (which the caller provides: it knows retries and dead letters).
    """
    return _LOOPS[kind]


def callers(process_item: Call) -> dict[int, Call]:
    """How one entry is called, by kind (TASKS, CALLS, ITEMS): for task threads and retries."""
    return {TASKS: functools.partial(_call_task, process_item), CALLS: _call_call, ITEMS: process_item}


def careful_callers(process_item: Call, where: str) -> dict[int, Call]:
    """:func:`callers` that also call tasks by name (resolved with :func:`resolve_task_name`;
    ``where`` names the consumer and worker in its ``ImportError``): for the careful path, which
    every named task takes after its first call, as a string, failed."""

    def call_task(t: Task) -> Any:
        fn = t[0]
        if fn is None:
            return process_item(t[1])
        if type(fn) is str:
            fn = _resolve(fn, where)
        return fn(*t[1], **(t[2] or {})) if len(t) > 2 else fn(*t[1])

    def call_call(c: Task) -> Any:
        fn = c[0]
        return (_resolve(fn, where) if type(fn) is str else fn)(*c[1:])

    return {TASKS: call_task, CALLS: call_call, ITEMS: process_item}


def own_options(kind: int, entry: Any) -> TaskOptions | None:
    """The options an entry carries itself (only TASKS entries may), or ``None``."""
    if kind == TASKS and len(entry) > 3 and isinstance(entry[3], TaskOptions):
        return entry[3]
    return None
