"""The program of a consumer's child process, which runs tasks under a hard time limit.

Started by :class:`zdq.consumer.hard.Child` as ``python child.py READ_FD WRITE_FD PARENT_PID``
(a fresh interpreter, never a fork of the consumer's process, whose ZeroMQ and Dask threads a fork
would copy in whatever state they were). It imports nothing of zdq, so that it is ready in the
time Python and cloudpickle take to start; a task's own modules are imported when its function is
unpickled, and stay imported for the tasks after it.

The pipes carry frames: an 8-byte big-endian length, then a pickle. The first frame from the
parent is its ``sys.path`` (so that the child imports what the worker imports); the child answers
``b"ready"``. Then each frame is a call ``(fn, args, kwargs)`` or ``(fn, args, kwargs, where)``.
Once it is unpickled (which imports the task's modules: seconds, for some) the child says
:data:`STARTED` (an empty frame), the moment from which the parent counts the task's time limit,
and then answers one of

- ``(True, value)``;
- ``(False, exception, traceback_text)``;
- ``(False, None, type_name, message, traceback_text)`` when the exception or the value does not
  pickle, or when the call does not unpickle (then without :data:`STARTED` before it).

A ``fn`` that is a string is a task name (``"package.module:function"``): the child imports it
after :data:`STARTED`, under the time limit (an import that hangs is killed with the task, and its
modules never enter the worker's process); a name that does not import fails with an
``ImportError`` naming the module and ``where`` (the consumer and its worker), as
:func:`zdq.codec.tasks.resolve_task_name` does in the worker (this module imports nothing of zdq).

The child owns nothing but itself and its process group (it leads a session of its own, which the
parent kills whole): it ends when its parent closes the pipe, and a watchdog thread kills its group
when its parent process is gone (a worker killed with SIGKILL never closes anything).
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from typing import Any

#: Bytes of a frame's length (big-endian), before its pickle (the parent's HEADER too).
HEADER = 8
#: The frame that says a call was unpickled and starts now.
STARTED = b""
#: How often the watchdog looks for the parent process.
_WATCH_INTERVAL = 0.5


def _read_exact(fd: int, n: int) -> bytes | None:
    parts = []
    while n:
        part = os.read(fd, min(n, 1 << 20))
        if not part:
            return None  # the parent closed the pipe: time to go
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def _read_frame(fd: int) -> bytes | None:
    header = _read_exact(fd, HEADER)
    return None if header is None else _read_exact(fd, int.from_bytes(header, "big"))


def write_frame(fd: int, data: bytes) -> None:
    view = memoryview(len(data).to_bytes(HEADER, "big") + data)
    while view:
        view = view[os.write(fd, view) :]


def _watch_parent(parent: int) -> None:
    # Reparented (to init or a subreaper) means the parent died: nobody waits for this task.
    while os.getppid() == parent:
        time.sleep(_WATCH_INTERVAL)
    os.killpg(0, signal.SIGKILL)  # this process's group: the task's own children, and this process
    os._exit(1)


def _resolve(name: str, where: str) -> Any:
    """The function a task name stands for, imported here; ``ImportError`` naming the module
    and ``where`` otherwise (the message of :func:`zdq.codec.tasks.resolve_task_name`)."""
    module_name, _, attribute = name.partition(":")
    suffix = f" (on {where})" if where else ""
    try:
        target: Any = importlib.import_module(module_name)
    except (Exception, SystemExit) as e:  # a module that raises, or exits, at import is no task
        why = str(e) if isinstance(e, ImportError) else f"{type(e).__name__}: {e}"
        message = f"task {name!r}: cannot import module {module_name!r}: {why}{suffix}"
        raise ImportError(message, name=module_name) from e
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as e:
            raise ImportError(
                f"task {name!r}: module {module_name!r} has no attribute {attribute!r}{suffix}", name=module_name
            ) from e
    if not callable(target):
        raise ImportError(  # noqa: TRY004 - as zdq.codec.tasks.resolve_task_name: the name is wrong, not a type
            f"task {name!r}: {attribute!r} of module {module_name!r} is not callable{suffix}", name=module_name
        )
    return target


def _answer(dumps: Any, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None, where: str) -> bytes:
    try:
        if type(fn) is str:
            fn = _resolve(fn, where)
        reply: tuple[Any, ...] = (True, fn(*args, **(kwargs or {})))
    except BaseException as e:  # noqa: BLE001 - a task's failure is its answer, whatever it raised
        reply = (False, e, "".join(traceback.format_exception(type(e), e, e.__traceback__)))
        e.__traceback__ = None
    try:
        data = dumps(reply, protocol=5)
        if reply[0] is False:
            # Failures only: an exception that pickles but does not load (an __init__ that wants
            # other arguments than its args) travels as its type name and message, as the
            # worker's own tasks' do (zdq.codec.results.error_info). The parent guards values.
            try:
                pickle.loads(data)
            except Exception:  # noqa: BLE001 - a user's __init__ or __reduce__ raises anything
                return _as_its_parts(dumps, reply[1], reply[2])
        return data
    except Exception as e:  # noqa: BLE001 - the value or the exception does not pickle
        if reply[0] is True:  # zdq's error, not the task's: the parent raises it as itself
            return dumps((False, None, SERIALIZATION_ERROR, f"the task's value cannot be pickled to leave its process: {e}", ""))
        kind = type(reply[1])
        return dumps((False, None, f"{kind.__module__}.{kind.__qualname__}", f"{reply[1]} (exception not picklable)", reply[2]))


#: The type name of the child's answer for a value that does not pickle (no zdq import here).
SERIALIZATION_ERROR = "zdq.errors.SerializationError"


def _as_its_parts(dumps: Any, error: BaseException, text: str) -> bytes:
    """The answer of an exception that pickles but does not load (its ``__init__`` wants other
    arguments than its ``args``): its class, ``args`` and attributes too, if they load, for the
    parent to make it again without its ``__init__`` (zdq.errors.made_without_init), unless its
    class pickles in a way of its own; always its type name, message and traceback."""
    kind = type(error)
    try:
        message = str(error)
    except Exception as e:  # noqa: BLE001 - the user's __str__: its failure must not end the child
        message = f"<the exception's str() raised {type(e).__name__}>"
    parts: tuple[Any, ...] = (False, None, f"{kind.__module__}.{kind.__qualname__}", message, text)
    if kind.__reduce__ is BaseException.__reduce__ and kind.__reduce_ex__ is BaseException.__reduce_ex__:
        try:
            whole = dumps((*parts, (kind, error.args, getattr(error, "__dict__", None) or None)), protocol=5)
            pickle.loads(whole)
            return whole
        except Exception:  # noqa: BLE001 - an attribute that does not pickle or load: the text goes alone
            pass
    return dumps(parts, protocol=5)


def main(argv: list[str]) -> int:
    read_fd, write_fd, parent = int(argv[1]), int(argv[2]), int(argv[3])
    threading.Thread(target=_watch_parent, args=(parent,), name="zdq-child-watchdog", daemon=True).start()
    path = _read_frame(read_fd)
    if path is None:
        return 0
    sys.path[:] = pickle.loads(path)
    import cloudpickle  # after sys.path: the worker's own copy

    write_frame(write_fd, b"ready")
    while True:
        frame = _read_frame(read_fd)
        if frame is None:
            return 0
        try:
            fn, args, kwargs, *where = pickle.loads(frame)
        except BaseException as e:  # noqa: BLE001 - e.g. a module the task needs is not importable here
            text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
            kind = type(e)
            answer = cloudpickle.dumps(
                (False, None, f"{kind.__module__}.{kind.__qualname__}", f"the task does not unpickle in its process: {e}", text)
            )
        else:
            write_frame(write_fd, STARTED)  # the task's time limit counts from here
            answer = _answer(cloudpickle.dumps, fn, args, kwargs, where[0] if where else "")
        write_frame(write_fd, answer)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
