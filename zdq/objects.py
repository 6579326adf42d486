"""Tasks as objects: a :class:`Task` carries its arguments as attributes and runs by ``execute()``.

A Task is a callable of no arguments (``task()`` is ``task.execute()``), so it goes wherever a
function does: ``submit(task)``, ``batch_submit([(task,), ...])``, ``submit_iter``; and the task
codec (:mod:`zdq.tasks`) needs no kind of its own for it. :func:`as_calls` turns what
:meth:`QueuePool.insert <zdq.QueuePool.insert>` is given (a task, or an iterable of
them, lazily) into the ``(fn,)`` calls that ``submit_iter`` streams.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from zdq.names import agreeing, counted

__all__ = ["Task", "as_calls"]


class Task:
    """Base of tasks as objects: subclass it and implement :meth:`execute`.

    Works with ``@dataclass``. The instance is pickled (cloudpickle: a class of ``__main__`` or of
    a test module travels by value) and ``execute()`` runs on a consumer; its return value is the
    task's result, and what it raises is the task's error (retries, dead letters, the error on the
    future), as for any submitted function.

    Examples
    --------
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Square(Task):
    ...     x: int
    ...     def execute(self) -> int:
    ...         return self.x * self.x
    >>> Square(7)()
    49
    >>> queue_pool.insert(Square(i) for i in range(100_000))      # doctest: +SKIP
    100000
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # python-task-queue's tasks call super().__init__(*their arguments) (its RegisteredTask
        # kept them to rebuild the task); a zdq Task travels pickled, attributes and all, so they
        # are not needed. A class that defines no __init__ of its own takes none: Square(7) of
        # a Task without one is a mistake, said at once.
        if (args or kwargs) and type(self).__init__ is Task.__init__:
            raise TypeError(
                f"{type(self).__qualname__}() takes no arguments: make it a @dataclass, or give it an "
                "__init__ that stores them as attributes (they travel with the pickled task)"
            )

    def execute(self) -> Any:
        """Run the task; the value returned is its result."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement execute()")

    def __call__(self) -> Any:
        return self.execute()


class _Calls:
    """The calls ``(task,)`` of an iterable of tasks, pulled lazily. At the first item that is
    neither a Task nor a callable it stops (everything before it is still queued: nothing is
    lost) and keeps the error for :meth:`check` to raise once those are queued."""

    def __init__(self, tasks: Iterable[Any]) -> None:
        self._tasks = tasks
        self.error: TypeError | None = None
        self.single = False  # one task given alone, not an iterable of them

    def __iter__(self) -> Iterator[tuple[Any]]:
        for i, task in enumerate(self._tasks):
            if not callable(task):
                self.error = TypeError(
                    f"insert(tasks=...): item {i} is neither a zdq.Task nor a callable: {task!r:.80} "
                    f"({counted(i, 'item')} before it {agreeing(i)} queued; the iterable was not read "
                    "past it)"
                )
                return
            yield (task,)

    def check(self) -> None:
        if self.error is not None:
            raise self.error


def as_calls(tasks: Any) -> tuple[_Calls, int | None]:
    """``tasks`` (one Task or callable, or an iterable of them) as lazy calls, and their number
    when it is known without reading them (a sequence's ``len``). One task alone is a call of
    its own (``calls.single``).

    Raises
    ------
    TypeError
        ``tasks`` is neither a Task, a callable, nor an iterable.
    """
    single = isinstance(tasks, Task) or (callable(tasks) and not isinstance(tasks, Iterable))
    if single:
        tasks = (tasks,)
    elif not isinstance(tasks, Iterable) or isinstance(tasks, (str, bytes)):
        raise TypeError(f"insert(tasks=...) needs a zdq.Task, a callable, or an iterable of them, got {tasks!r:.80}")
    total = len(tasks) if hasattr(tasks, "__len__") else None
    calls = _Calls(tasks)
    calls.single = single
    return calls, total
