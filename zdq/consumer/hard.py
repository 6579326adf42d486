"""Hard time limits: tasks run in child processes of the consumer, killed at their limit.

Python cannot kill a thread, so a soft time limit (:meth:`zdq.consumer.runner.Runner._call_limited`)
fails the future and abandons the task to finish on its thread. A task with ``hard=True`` runs in a
child process instead (:mod:`zdq.consumer.child`), and at its limit the child is killed with
SIGKILL and reaped: its memory and CPU come back, the consumer goes on, and the future fails with
:class:`~zdq.errors.TaskTimeout` saying so. SIGKILL at once, with no SIGTERM grace: a task past a
hard limit is one its owner wants stopped, a grace period would only lengthen the limit, and a
Python task ends on SIGTERM without cleaning up anything more than on SIGKILL.

Children are warm: a child runs task after task, and is replaced only when it was killed or died
(the next hard task starts a new one, paying Python's start-up once). They are started with
``subprocess`` (fork and exec at once), never by forking the consumer's process: a Dask worker is
a daemonic process, which multiprocessing refuses to give children, and a fork would copy its
ZeroMQ and Dask threads' locks in whatever state they were.

A child leads a session and process group of its own (``start_new_session``), and is killed with
its whole group (``os.killpg``, as RQ does): the processes a task starts (``subprocess``,
``os.fork``) die with it, at its limit and when the consumer stops, instead of living on
re-parented to init. A process that leaves the group (``os.setsid``, a daemon's double fork) is
not tracked: it outlives the task.

Who owns what
-------------
:class:`Children` belongs to one :class:`~zdq.consumer.runner.Runner`. A child is either idle (in
``_idle``) or lent to the one thread that runs a task in it; every child is in ``_all`` until it is
killed and reaped. :meth:`Children.close` (the runner's shutdown) kills every child, idle or busy: a
task running then fails with :class:`TaskProcessDied` saying the consumer stopped.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import cloudpickle

from zdq.codec.results import PROTOCOL
from zdq.consumer.child import HEADER, SERIALIZATION_ERROR, STARTED
from zdq.errors import RemoteTaskError, SerializationError, TaskProcessDied, TaskTimeout, made_without_init

__all__ = ["Child", "Children"]

logger = logging.getLogger(__name__)

_CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")
#: How long a new child may take to start (Python and cloudpickle), on a loaded machine.
_START_TIMEOUT = 60.0
#: How long a call may take to reach a child and unpickle there (importing the task's modules),
#: before its time limit starts.
_LOAD_TIMEOUT = 60.0
#: How long a killed child may take to be reaped.
_REAP_TIMEOUT = 10.0


class Child:
    """One child process and its two pipes. Used by one thread at a time."""

    def __init__(self) -> None:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        try:
            # -I: the child's sys.path is the parent's (sent first), not child.py's directory.
            self.process = subprocess.Popen(
                [sys.executable, "-I", _CHILD_SCRIPT, str(to_child_r), str(from_child_w), str(os.getpid())],
                stdin=subprocess.DEVNULL,
                pass_fds=(to_child_r, from_child_w),
                close_fds=True,
                start_new_session=True,  # its group: killed whole (see kill)
            )
        except BaseException:
            os.close(self._to_child)
            os.close(self._from_child)
            raise
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.pid = self.process.pid
        self.killed = False
        os.set_blocking(self._to_child, False)  # writes wait in poll, bounded (see _send)

    def start(self) -> None:
        """Hand the child this process's ``sys.path`` and wait until it is ready."""
        deadline = time.monotonic() + _START_TIMEOUT
        if not self._send(pickle.dumps(list(sys.path), protocol=PROTOCOL), deadline):
            self.kill()
            raise TaskProcessDied(f"a child process for tasks with a hard time limit did not start within {_START_TIMEOUT:g}s")
        answer = self._receive(deadline)
        if answer != b"ready":
            why = self._death() if answer is None else f"it answered {answer[:40]!r}"
            raise TaskProcessDied(f"a child process for tasks with a hard time limit did not start: {why}")

    def call(
        self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None, limit: float, tid: int, where: str = ""
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` in the child; return its value or raise its error. ``fn``
        may be a task name, which the child imports under the limit (``where``, the consumer and
        its worker, goes in the ``ImportError`` of a name that does not import).

        Raises :class:`TaskTimeout` after killing the child at ``limit`` seconds (counted from the
        moment the call is unpickled there), :class:`TaskProcessDied` if it died before
        answering, and :class:`RemoteTaskError` if its answer does not unpickle here.
        """
        try:
            payload = cloudpickle.dumps((fn, args, kwargs, where), protocol=PROTOCOL)
        except Exception as e:
            raise SerializationError(
                f"task {tid} has a hard time limit, so it runs in a child process, and it cannot be pickled to go there: {e}"
            ) from e
        # The limit counts once the call is unpickled in the child: the first task of a new child
        # may import modules for seconds, which a task in the worker's own threads never pays.
        loaded_by = time.monotonic() + _LOAD_TIMEOUT
        answer = self._receive(loaded_by) if self._send(payload, loaded_by) else None
        if answer == STARTED:
            deadline = time.monotonic() + limit
            answer = self._receive(deadline)
            if answer is None and time.monotonic() >= deadline and self.process.poll() is None:
                self.kill()  # still running: past its limit
                raise TaskTimeout(
                    f"task {tid} was killed after {limit:g}s, its hard time limit, in process {self.pid} (SIGKILL)"
                )
        elif answer is None and time.monotonic() >= loaded_by and self.process.poll() is None:
            self.kill()
            raise TaskTimeout(
                f"task {tid} was killed in process {self.pid}: its function and arguments did not unpickle "
                f"there within {_LOAD_TIMEOUT:g}s (an import that hangs?)"
            )
        if answer is None:
            raise TaskProcessDied(f"task {tid} did not finish: {self._death()}")
        reply = self._loads(answer, tid)
        if reply[0] is True:
            return reply[1]
        if len(reply) == 3:
            error: BaseException = reply[1]
            if reply[2] and hasattr(error, "add_note"):
                error.add_note(f"raised in the task's child process {self.pid}:\n{reply[2].rstrip()}")
            raise error
        if len(reply) == 6:  # it loads only made without its __init__ (zdq.consumer.child._as_its_parts)
            try:
                made = made_without_init(*reply[5])
            except Exception:  # noqa: BLE001 - a __new__ or __setstate__ of its own refuses: its text goes
                made = None
            if made is not None:
                if reply[4] and hasattr(made, "add_note"):
                    made.add_note(f"raised in the task's child process {self.pid}:\n{reply[4].rstrip()}")
                raise made
        if reply[2] == SERIALIZATION_ERROR:  # the value did not pickle: zdq's error, as a worker's own task's
            raise SerializationError(reply[3])
        raise RemoteTaskError(reply[2], reply[3], reply[4])

    def _loads(self, answer: bytes, tid: int) -> tuple[Any, ...]:
        """The child's answer, unpickled; a value or an exception that pickles there but does not
        load here (an exception whose ``__init__`` takes other arguments than it passes on, a
        ``__reduce__`` that fails) fails the task with :class:`RemoteTaskError`, as it does when
        the driver cannot load a non-hard task's exception."""
        try:
            return pickle.loads(answer)
        except Exception as e:  # noqa: BLE001 - whatever a user's __reduce__ or __init__ raises
            kind = type(e)
            return (
                False,
                None,
                f"{kind.__module__}.{kind.__qualname__}",
                f"task {tid}: consumer could not unpickle the value or exception of its child process {self.pid}: {e}",
                "",
            )

    def kill(self) -> None:
        """SIGKILL the child's process group (the child and what its task started) and reap the
        child (no zombie). Idempotent."""
        self.killed = True
        try:
            # Its pid stays its group's id while a member lives, even once reaped: no other
            # process has it.
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the group is empty: the child was reaped, and left no process behind
        except PermissionError:  # a member that changed its user: the child at least
            if self.process.returncode is None:
                self.process.send_signal(signal.SIGKILL)
        try:
            self.process.wait(_REAP_TIMEOUT)
        except subprocess.TimeoutExpired:
            logger.error("child process %d did not end within %gs of SIGKILL", self.pid, _REAP_TIMEOUT)
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass  # closed already
        self._to_child = self._from_child = -1

    def _death(self) -> str:
        """Why the child is gone, once it is (reaped here)."""
        try:
            code = self.process.wait(_REAP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            return f"its child process {self.pid} closed its pipe and was killed"
        self.kill()
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"its child process {self.pid} was killed by {name}"
        return f"its child process {self.pid} exited with status {code}"

    def _send(self, data: bytes, deadline: float) -> bool:
        """Write one frame to the child; ``False`` at ``deadline`` (a child that does not read)."""
        view = memoryview(len(data).to_bytes(HEADER, "big") + data)
        poller = select.poll()
        poller.register(self._to_child, select.POLLOUT)
        try:
            while view:
                left = deadline - time.monotonic()
                if left <= 0 or not poller.poll(None if left == math.inf else left * 1000):
                    return False
                view = view[os.write(self._to_child, view) :]
        except OSError as e:  # BrokenPipeError: it died between two tasks
            raise TaskProcessDied(f"the task could not be sent: {self._death()} ({e})") from e
        return True

    def _receive(self, deadline: float) -> bytes | None:
        """One frame from the child, or ``None`` at ``deadline`` or when its pipe closes."""
        header = self._read(HEADER, deadline)
        return None if header is None else self._read(int.from_bytes(header, "big"), deadline)

    def _read(self, n: int, deadline: float) -> bytes | None:
        parts = []
        poller = select.poll()
        poller.register(self._from_child, select.POLLIN)
        while n:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(None if left == math.inf else left * 1000):
                return None
            part = os.read(self._from_child, min(n, 1 << 20))
            if not part:
                return None
            parts.append(part)
            n -= len(part)
        return b"".join(parts)


class Children:
    """The warm child processes of one consumer: as many as its threads run hard tasks at once."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._idle: list[Child] = []
        self._all: set[Child] = set()
        self._closed = False

    def call(
        self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None, limit: float, tid: int, where: str = ""
    ) -> Any:
        """Run a call in an idle child (a new one if none is), killed at ``limit`` seconds (see
        :meth:`Child.call`)."""
        child = self._take()
        try:
            return child.call(fn, args, kwargs, limit, tid, where)
        except TaskProcessDied as e:
            if self._closed:
                raise TaskProcessDied(f"task {tid}: consumer {self._name} stopped while it ran ({e})") from None
            raise
        finally:
            self._give_back(child)

    def close(self) -> None:
        """Kill and reap every child, idle or busy. Idempotent."""
        with self._lock:
            self._closed = True
            children, self._all, self._idle = list(self._all), set(), []
        for child in children:
            child.kill()

    def _take(self) -> Child:
        with self._lock:
            if self._closed:
                raise TaskProcessDied(f"consumer {self._name} is stopping: no child process runs tasks any more")
            while self._idle:
                child = self._idle.pop()
                if child.process.poll() is None:
                    return child
                self._all.discard(child)  # it died while idle (the OOM killer, a signal): not this task's fault
                child.kill()  # reaped already: closes its pipes
        child = Child()
        with self._lock:
            self._all.add(child)
            closed = self._closed
        if closed:
            child.kill()
            raise TaskProcessDied(f"consumer {self._name} is stopping: no child process runs tasks any more")
        try:
            child.start()
        except BaseException:
            self._drop(child)
            raise
        logger.debug("consumer %s started child process %d for hard time limits", self._name, child.pid)
        return child

    def _give_back(self, child: Child) -> None:
        if child.killed:
            self._drop(child)
            return
        with self._lock:
            if not self._closed:
                self._idle.append(child)
                return
        child.kill()

    def _drop(self, child: Child) -> None:
        child.kill()
        with self._lock:
            self._all.discard(child)
