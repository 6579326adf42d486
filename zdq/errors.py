"""The one exception hierarchy of zdq.

Every error zdq raises derives from :class:`ZdqError`. The subtrees tell causes apart: something
*you* closed, a peer that broke (a broker that was lost), a message that broke the protocol, storage
that is full or corrupt, a wait that ran out of time, and a task that failed remotely. Where a builtin
fits, the error subclasses it too, so ``except TimeoutError`` keeps working.

How a failure travels from the process it happened in to the one that raises it is here too
(:class:`ErrorInfo`, :func:`error_info`, :func:`error_to_exception`): the codec packs it with a
chunk's results, and a :class:`ConsumerInitError` carries its cause that way.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import io
import os
import pickle
import traceback
import types
from dataclasses import dataclass
from typing import Any, Self

import cloudpickle

__all__ = [
    "ZdqError",
    "ClosedError",
    "SerializationError",
    "ProtocolError",
    "PlacementError",
    "ConsumerInitError",
    "AddressError",
    "BrokerLost",
    "BrokerUnreachable",
    "StorageError",
    "StorageFull",
    "StorageCorrupt",
    "QueueLocked",
    "QueueMissing",
    "ZdqTimeoutError",
    "SubmitTimeout",
    "PutTimeout",
    "TaskTimeout",
    "TaskProcessDied",
    "RemoteTaskError",
    "DeadLettered",
    "TaskLost",
    "DuplicateTask",
    "TaskCancelled",
    "TaskExpired",
    "BatchError",
    "NoConsumers",
    "NoEligibleWorkers",
    "WrongConsumerClass",
]


class ZdqError(Exception):
    """Root of every error raised by zdq."""


class ClosedError(ZdqError, RuntimeError):
    """The pool (or one of its parts) was closed by its owner and cannot be used any more."""


class SerializationError(ZdqError, TypeError):
    """A function, argument or result could not be pickled; the message names the culprit.

    ``task_id``: the id of the task at fault, when it is known (a batch names its position).
    ``queued``: how many tasks of the call were queued before it, and run: ``submit_iter`` and
    ``insert`` read their calls lazily and queue them chunk by chunk (a batch queues nothing of
    itself; ``map()`` cancels what it queued)."""

    task_id: int | None = None
    queued: int = 0


class ProtocolError(ZdqError, ValueError):
    """A message does not follow the zdq wire protocol (wrong version, command, size or shape)."""


class PlacementError(ZdqError):
    """Dask could not place or start a broker or consumer actor.

    ``silent``: the workers that did not answer (stopped, or too busy), when that is why."""

    silent: tuple[str, ...] = ()


class ConsumerInitError(PlacementError):
    """A ConsumerPool's consumer class cannot be made: its ``__init__`` raised on a worker, or it is
    abstract (it defines no ``process_item``). The message names the class, the consumer and its
    worker, and what was raised; ``__cause__`` is that exception, sent as a task's error is: as
    raised on the worker, or a :class:`RemoteTaskError` standing in for one that does not unpickle
    (its ``__init__`` wants other arguments than its ``args``), its remote traceback in a note
    either way.

    Raised by ``ConsumerPool(...)``, which makes the consumers (as daskqueue did); a replacement
    whose class raises is tried again by the pool's supervisor, and ``join()`` says so past
    ``zdq.no-consumer-timeout`` (see :class:`NoEligibleWorkers`)."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Sent from the worker that made the consumer: its cause goes with it (a pickled exception
        # drops __cause__) the way a task's error travels, as itself if it unpickles again, else as
        # a RemoteTaskError, its remote traceback in a note either way.
        # A travelling cause (the consumer actor's: see travelling()) goes as it is: it loads as
        # the exception it carries, with its notes once.
        cause: Any = self.__cause__
        if cause is not None and not isinstance(cause, _Travelling):
            cause = error_info(cause)
        return (_rebuild_caused, (type(self), self.args, cause), self.__dict__)


def _rebuild_caused(kind: type[BaseException], args: tuple[Any, ...], cause: Any) -> BaseException:
    # cause: an ErrorInfo, an exception already made again (a travelling one's), or None
    error = kind(*args)
    error.__cause__ = cause if cause is None or isinstance(cause, BaseException) else error_to_exception(cause)
    return error


class AddressError(PlacementError):
    """A broker cannot bind where it should: its worker's address has a scheme zdq cannot serve
    (``ucx://``...), ``zdq.bind-host`` is no address of the worker's host, or ``zdq.ports`` has no
    free port left. The message names the setting to change."""


class BrokerLost(ZdqError, ConnectionError):
    """The broker that held a task is gone, and the task was held only in its memory."""


class BrokerUnreachable(ZdqError, ConnectionError):
    """A broker did not answer a driver's or a consumer's first message within
    ``zdq.connect-timeout``: the network between them does not carry zdq's TCP connections (a
    firewall, a route, a client outside the workers' network). The message names each broker's
    queue, endpoint and worker, why the connection failed, and what to do."""


class StorageError(ZdqError, OSError):
    """The storage backend of a queue failed."""


class StorageFull(StorageError):
    """The queue's storage (LMDB map or disk) is full: the chunk was *not* stored."""


class StorageCorrupt(StorageError):
    """A directory is not a zdq queue, or its data cannot be read; it is left untouched."""


class QueueLocked(StorageError):
    """Another live broker owns this queue directory."""


class QueueMissing(StorageError):
    """A durable queue that was to be opened again is not where its broker was placed (another
    host, or the directory was removed): zdq never creates it anew, empty, during recovery."""


class ZdqTimeoutError(ZdqError, TimeoutError):
    """A wait ran out of time."""


class SubmitTimeout(ZdqTimeoutError):
    """Submitting blocked on a full window for longer than the timeout allowed.

    Attributes
    ----------
    future : BatchFuture or None
        For a batch cut off part-way: the batch's future. The tasks queued before the timeout
        run and report there; the others hold this error.
    queued : int
        How many tasks of that batch were queued (0 for a single submission).
    """

    future: object = None
    queued: int = 0


#: daskqueue's name for it (``QueuePool.put_many`` raised ``PutTimeout`` when its queues stayed
#: full): the same class, so that ``except PutTimeout`` catches what zdq raises.
PutTimeout = SubmitTimeout


class TaskTimeout(ZdqTimeoutError):
    """A task ran longer than its time limit."""


class TaskProcessDied(ZdqError):
    """The child process that ran a task under a hard time limit (``hard=True``) died before it
    answered: on its own (a crash, ``os._exit``, the kernel's OOM killer), or because its consumer
    stopped. The message names the process and how it ended."""


class RemoteTaskError(ZdqError):
    """A task failed remotely with an exception that could not be sent back as itself.

    Attributes
    ----------
    type_name : str
        Qualified name of the original exception type.
    remote_traceback : str
        The traceback formatted on the consumer.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[Any, ...]:
        # Its __init__ takes three arguments, its args hold one: pickled by default, it would not
        # load (a hard task's RemoteTaskError travels from the consumer to the driver).
        message = str(self.args[0])[len(self.type_name) + 2 :] if self.args else ""
        return (type(self), (self.type_name, message, self.remote_traceback), self.__dict__)


class DeadLettered(ZdqError):
    """A task failed all of its attempts and was moved to the dead-letter queue."""


class TaskLost(ZdqError):
    """A task acknowledged early (at most once) whose consumer died before reporting its result."""


class DuplicateTask(ZdqError):
    """A unique task (``submit(..., unique_key=)``) whose key is still held by its ``unique_for=``
    window after a task with it ended: nothing was queued. The message names the key and when it
    is free again (``free_at``, wall-clock seconds)."""

    def __init__(self, message: str, key: str = "", free_at: float = 0.0) -> None:
        super().__init__(message)
        self.key = key
        self.free_at = free_at


class TaskCancelled(ZdqError, concurrent.futures.CancelledError):
    """A task that ``future.cancel()`` removed before it started: it never ran. In a batch's
    :class:`BatchError` and in ``ConsumerPool.results()`` this is the value of each cancelled task."""


class TaskExpired(ZdqError):
    """A task given ``expires=`` that had not started by then: it never ran, and is not retried.

    Neither a :class:`TaskCancelled` (nobody cancelled it) nor a ``TimeoutError`` (an ``except
    TimeoutError`` around ``future.result(timeout=...)`` means "no result yet", not this). In a
    batch's :class:`BatchError` and in ``ConsumerPool.results()`` this is the value of each
    expired task."""


class NoConsumers(ZdqError, RuntimeError):
    """Tasks are pending and no consumer of the pool is running: nothing would ever run them."""


class NoEligibleWorkers(NoConsumers):
    """Tasks are pending, the consumers were started, and none has been placed for
    ``zdq.no-consumer-timeout``: no live worker satisfies the ConsumerPool's placement constraint
    (``workers=``, ``resources=``), which the message names, or none can make its consumer class
    (its ``__init__`` raises on every try: the message names the class and what it raised; while
    other consumers live, ``join()`` raises it for the queues holding tasks that only such
    consumers serve, naming them, and ``result()`` for a future whose tasks wait on one). The
    pool keeps trying: once a consumer is placed, ``join()`` and
    ``result()`` wait again as usual.
    A :class:`NoConsumers`, so code that catches that one for an unstarted pool catches this too."""


class WrongConsumerClass(ZdqError, TypeError, RuntimeError):
    """``submit(..., worker_class=...)`` names a class that does not run submitted functions (a
    RuntimeError too, as daskqueue raised)."""


class BatchError(ZdqError):
    """Some tasks of a batch failed.

    Attributes
    ----------
    errors : dict[int, BaseException]
        The exception of each failed task, by its position in the batch.
    values : list
        Every result, ``None`` where the task failed.
    """

    def __init__(self, errors: dict[int, BaseException], values: list[object]) -> None:
        # Cancelled tasks never ran: said apart from the failed ones (a purge leaves some).
        failed = sorted(i for i, e in errors.items() if not isinstance(e, TaskCancelled))
        cancelled = len(errors) - len(failed)
        said = [f"{len(failed)} of {len(values)} tasks failed"] if failed else []
        if cancelled:
            verb = "was" if cancelled == 1 else "were"
            said.append(f"{cancelled} {verb} cancelled" if failed else f"{cancelled} of {len(values)} tasks {verb} cancelled")
        first = failed[0] if failed else min(errors)
        super().__init__(f"{', '.join(said)}; first, task {first}: {errors[first]!r}")
        self.errors = errors
        self.values = values


# -- a failure as it travels ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """A task's failure as sent back: the exception itself when it pickles, and always its text.

    ``without_init``: the exception does not load as pickle makes it (its ``__init__`` wants other
    arguments than its ``args``), so it travels as its class, ``args`` and attributes, and is made
    again without its ``__init__``, as it was raised: ``except`` of its class still catches it.
    """

    exception: BaseException | None
    type_name: str
    message: str
    traceback: str
    without_init: bool = False

    def __reduce__(self) -> tuple[Any, ...]:
        exc = self.exception
        if exc is not None and self.without_init:
            state = getattr(exc, "__dict__", None) or None
            return (_rebuilt_info, (type(exc), exc.args, state, self.type_name, self.message, self.traceback))
        return (ErrorInfo, (exc, self.type_name, self.message, self.traceback))


def _rebuilt_info(
    kind: type[BaseException], args: tuple[Any, ...], state: dict[str, Any] | None, type_name: str, message: str, tb: str
) -> ErrorInfo:
    return ErrorInfo(made_without_init(kind, args, state), type_name, message, tb, without_init=True)


def made_without_init(kind: type[BaseException], args: tuple[Any, ...], state: dict[str, Any] | None) -> BaseException:
    """An exception of ``kind`` with these ``args`` and attributes, as it was raised, without
    running its ``__init__`` (which wants other arguments than its ``args``)."""
    exc = kind.__new__(kind, *args)  # BaseException.__new__ sets args
    if state:
        exc.__setstate__(state)
    return exc


def _pickled_by_default(kind: type[BaseException]) -> bool:
    """Whether ``kind`` pickles as every exception does (its class, ``args`` and attributes), not
    in a way of its own, which zdq then leaves alone."""
    return kind.__reduce__ is BaseException.__reduce__ and kind.__reduce_ex__ is BaseException.__reduce_ex__



_ZDQ_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _user_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """The traceback from the first frame outside zdq: a task's traceback starts at the user's
    code, not at the runner that called it."""
    first = tb
    while first is not None and os.path.abspath(first.tb_frame.f_code.co_filename).startswith(_ZDQ_DIR):
        first = first.tb_next
    return first if first is not None else tb


def error_info(exc: BaseException) -> ErrorInfo:
    """A task's failure (or a consumer class's ``__init__``'s, for a
    :class:`ConsumerInitError`) as it travels. The exception itself goes only if it loads again
    (here: the driver imports what the consumer does), as pickle makes it or, when its
    ``__init__`` wants other arguments than its ``args`` (it pickles, but loading it raises, which
    would fail the whole chunk's results on the driver), made again without its ``__init__``. One
    that loads neither way (an attribute that does not pickle, a ``__new__`` of its own) travels
    as its type name, message and traceback, and the driver raises a RemoteTaskError of them. Only
    failed tasks pay for the check."""
    tb = "".join(traceback.format_exception(type(exc), exc, _user_frames(exc.__traceback__)))
    exc.__traceback__ = None  # frames do not pickle; the text above keeps them
    kind = type(exc)
    try:
        message = str(exc)
    except Exception as e:  # noqa: BLE001 - the user's __str__: its failure must not be the task's end
        message = f"<the exception's str() raised {type(e).__name__}>"
    type_name = f"{kind.__module__}.{kind.__qualname__}"
    ways = [ErrorInfo(exc, type_name, message, tb)]
    if _pickled_by_default(kind):
        ways.append(ErrorInfo(exc, type_name, message, tb, without_init=True))
    for info in ways:
        try:
            pickle.loads(cloudpickle.dumps(info))  # cloudpickle's highest protocol: the codec's
        except Exception:  # noqa: BLE001 - pickling and unpickling raise anything, from the user's own code too
            continue
        return info
    return ErrorInfo(None, type_name, message, tb)


def loads_error_info(data: bytes) -> ErrorInfo:
    """An :class:`ErrorInfo` pickled alone: where its exception's class cannot be imported here,
    a RemoteTaskError stands for it, noting what is missing (as :func:`loads_results` does)."""
    try:
        info = pickle.loads(data)
    except (AttributeError, ImportError) as e:
        loader = LenientLoader(data)
        try:
            info = loader.load()
        except Exception:  # noqa: BLE001 - not even with stand-ins: said, rather than failing the error it causes
            message = f"an exception that cannot be read in this process ({type(e).__name__}: {e})"
            return ErrorInfo(None, "an exception", message, "")
        _, _, errors = without_stand_ins((0, [], {0: info}), ", ".join(dict.fromkeys(loader.missing)))
        info = errors[0]
    if not isinstance(info, ErrorInfo):
        raise ProtocolError(f"an error must be an ErrorInfo, got {type(info).__name__}")
    return info


class Unimportable(Exception):  # noqa: N818 - it stands for any object, an exception among them
    """Stands for an object whose class (or function) this process cannot import. Whatever
    unpickling asks of it, it takes: it may stand where an exception must (a ``__cause__`` or
    ``__context__``, an item of an ExceptionGroup) and for a dict, list or set subclass (items
    set on it); :func:`without_stand_ins` then fails the task that holds it."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        return Exception.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def add(self, item: Any) -> None:
        pass


class LenientLoader(pickle.Unpickler):
    """Unpickles results whatever names are missing here (each becomes an :class:`Unimportable`),
    and remembers them: enough to tell which tasks succeeded and which failed."""

    def __init__(self, data: Any) -> None:
        super().__init__(io.BytesIO(data))
        self.missing: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        if name == "subimport" and module == "cloudpickle.cloudpickle":
            return self._subimport  # a module given as a value (reviewer 28e: it sank the whole chunk)
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            self.missing.append(f"{module}.{name}")
            return type(name, (Unimportable,), {"__module__": module, "__qualname__": name})

    def _subimport(self, name: str) -> Any:
        """cloudpickle's ``subimport``: the module, or a stand-in for one this process lacks."""
        try:
            return importlib.import_module(name)
        except Exception:  # noqa: BLE001 - not only ImportError: a missing native library (reviewer 28f)
            self.missing.append(name)
            return type(name, (Unimportable,), {"__module__": name, "__qualname__": _MODULE})


class _StandInFound(Exception):
    pass


class _StandInFinder(cloudpickle.Pickler):  # type: ignore[misc]
    """Walks an object as pickling it would, and stops at the first :class:`Unimportable`."""

    def persistent_id(self, obj: Any) -> None:
        if _is_stand_in(obj):
            raise _StandInFound(_name_of(obj))
        return None


def _is_stand_in(obj: Any) -> bool:
    """A stand-in, or the class of one (a missing class or function given as a value)."""
    return isinstance(obj, Unimportable) or (isinstance(obj, type) and issubclass(obj, Unimportable))


def _name_of(stand_in: Any) -> str:
    kind = stand_in if isinstance(stand_in, type) else type(stand_in)
    return f"module {kind.__module__}" if kind.__qualname__ == _MODULE else f"{kind.__module__}.{kind.__qualname__}"


#: The qualified name of a stand-in for a whole module (see :meth:`LenientLoader._subimport`).
_MODULE = "<module>"


def _stand_in_held(obj: Any) -> str | None:
    """The name the first stand-in ``obj`` holds stands for, or None if it holds none."""
    if _is_stand_in(obj):
        return _name_of(obj)
    try:
        _StandInFinder(io.BytesIO(), protocol=5).dump(obj)
    except _StandInFound as found:
        return str(found)
    except Exception:  # noqa: BLE001 - it does not pickle again for another reason: it loaded, keep it
        return None
    return None


def without_stand_ins(obj: tuple[int, list[Any], dict[int, Any]], missing: str) -> tuple[int, list[Any], dict[int, ErrorInfo]]:
    """Results loaded by a :class:`LenientLoader`: each value and exception that holds a stand-in
    is replaced by an error naming what cannot be imported here (the name it holds; ``missing``,
    every name missing in them, if that cannot be told); the others are kept."""
    base, values, errors = obj

    def here(name: str | None) -> str:
        return f"{name or missing or 'a name'} cannot be imported in this process"

    for i, info in list(errors.items()):
        name = None if not isinstance(info, ErrorInfo) or info.exception is None else _stand_in_held(info.exception)
        if name is not None:
            stand_in = RemoteTaskError(info.type_name, info.message, info.traceback)
            stand_in.add_note(f"zdq: the task raised {info.type_name}, which cannot be rebuilt here: {here(name)}")
            errors[i] = ErrorInfo(stand_in, info.type_name, info.message, info.traceback)
    for i, value in enumerate(values):
        name = None if i in errors else _stand_in_held(value)
        if name is not None:
            values[i] = None
            message = f"the result of task {base + i} cannot be unpickled here: {here(name)}"
            errors[i] = ErrorInfo(UnreadableResult(message), "zdq.errors.SerializationError", message, "")
    return base, values, errors


class UnreadableResult(SerializationError):
    """A task succeeded, but its value holds a class or function this process cannot import (a
    module only the workers have): its future, ``zdq.result`` and ``ConsumerPool.results()`` give
    this (the message names the task and the missing name) where the value would be, and only
    that task's outcome is lost here (see :func:`without_stand_ins`); ``zdq.state`` says "done"."""


class _Travelling(Exception):
    """An exception on its way to a process that may not import its class (see :func:`travelling`).
    Not a ZdqError: it is never raised to a user (loaded, it is the exception it carries; in the
    same process, :func:`arrived` unwraps it)."""

    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(info.message)
        self.info = info

    def __reduce__(self) -> tuple[Any, ...]:
        return (_arrived, (cloudpickle.dumps(self.info),))


def _arrived(data: bytes) -> BaseException:
    return error_to_exception(loads_error_info(data))


def travelling(exc: BaseException) -> BaseException:
    """``exc`` as it may travel where its class cannot be imported (a cause that Dask pickles on
    its own, with tblib, past its error's ``__reduce__``): loaded, it is ``exc`` again (as a
    task's error travels), or a :class:`RemoteTaskError` naming it and what is missing there,
    never an error that fails the whole unpickling (reviewer 27c: a ConsumerInitError whose
    cause's module only the workers had came as raw pickle bytes)."""
    return _Travelling(error_info(exc))


def arrived(cause: BaseException | None) -> BaseException | None:
    """A cause as its receiver gives it on: the exception a :func:`travelling` one carries (it
    came without being pickled: the same process), else ``cause`` itself."""
    return error_to_exception(cause.info) if isinstance(cause, _Travelling) else cause


def error_to_exception(info: ErrorInfo) -> BaseException:
    """The exception to raise on the driver for a failed task, with its remote traceback."""
    exc = info.exception
    if exc is None:
        exc = RemoteTaskError(info.type_name, info.message, info.traceback)
        exc.add_note(
            f"zdq: the task raised {info.type_name}, which could not travel back as itself (it or one of "
            "its attributes does not pickle, or does not load again): raised as this RemoteTaskError"
        )
    if info.traceback and hasattr(exc, "add_note"):
        note = "remote traceback (zdq consumer):\n" + info.traceback.rstrip()
        if note not in getattr(exc, "__notes__", ()):
            exc.add_note(note)
    return exc
