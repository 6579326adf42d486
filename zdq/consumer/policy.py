"""What happens to a task after it failed or killed its consumer: a pure policy.

No threads, no sockets, no clock: the runner asks, sleeps the delay it is told, and reports what it
is told. The rules (README, "Retries", "Dead letters", "Poison tasks"):

- A task may run ``retries + 1`` times. A task that killed its consumer (its chunk came back with
  ``crashes`` > 0) may run ``max(retries + 1, crash_attempts)`` times in all, crashes included: a
  poison task must not loop forever, and one crash must not dead-letter a task whose worker merely
  died. The attempts that failed on a consumer that died later count too (its broker kept them).
- A failure is retried only if its exception is one of ``retry_on`` and attempts remain; the delay
  doubles from ``retry_backoff`` at each attempt, with jitter (x0.5 to x1.5, so that retries do not
  stampede), and is never longer than ``retry_backoff_max``.
- A task that fails for good is *dead-lettered* (kept, with its traceback, for requeueing) if it
  had retries or had killed a consumer; otherwise its error is simply its result.

>>> from zdq.codec.tasks import TaskOptions
>>> after_failure(TaskOptions(retries=2, retry_backoff=1.0), 0, 2, 1, OSError(), jitter=lambda: 0.5)
Retry(delay=1.0)
>>> after_failure(TaskOptions(), 0, 2, 1, OSError())
Fail()
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from zdq.codec.results import ErrorInfo
from zdq.codec.tasks import TaskOptions

__all__ = [
    "DeadLetter",
    "Decision",
    "Fail",
    "Retry",
    "after_failure",
    "attempts_allowed",
    "backoff",
    "on_redelivery",
]

#: Exponents beyond this would only be capped anyway (2**64 times any backoff is past any cap);
#: bounding it keeps a task with a huge ``retries`` from overflowing a float.
_MAX_DOUBLINGS = 64


@dataclass(frozen=True, slots=True)
class Retry:
    """Run the task again after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True, slots=True)
class Fail:
    """The task failed for good: its error is its result."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """The task failed for good and goes to the dead-letter queue.

    ``attempts`` is how many times it ran (crashes of its consumer included); ``killed`` says it
    was not run this time because it had already killed its consumer that many times.
    """

    attempts: int
    killed: bool = False
    crashes: int = 0  # ``killed`` after attempts that failed too: those that killed it (0: all did)

    def message(self, task_id: int) -> str:
        """The error of a task dead-lettered without running (``killed``)."""
        if self.crashes and self.crashes != self.attempts:
            return (
                f"task {task_id} used its {self.attempts} attempts ({self.crashes} killed its consumer, the others "
                "failed); it was dead-lettered"
            )
        return f"task {task_id} killed its consumer {self.attempts} times; it was dead-lettered"

    def note(self, task_id: int) -> str:
        """Added to the task's own exception, which its future raises."""
        return f"zdq: task {task_id} failed {self.attempts} attempts and was dead-lettered"

    def reason(self, task_id: int, info: ErrorInfo) -> str:
        """What the dead-letter queue keeps with the task."""
        return f"task {task_id} ({self.attempts} attempts): {info.type_name}: {info.message}\n{info.traceback}"


Decision: TypeAlias = Retry | Fail | DeadLetter


def attempts_allowed(options: TaskOptions, crashes: int, crash_attempts: int) -> int:
    """How many times a task may run in all, counting the runs that killed its consumer."""
    allowed = options.retries + 1
    return max(allowed, crash_attempts) if crashes else allowed


def on_redelivery(options: TaskOptions, crashes: int, crash_attempts: int, failed: int = 0) -> DeadLetter | None:
    """Before running a task whose chunk killed its consumer ``crashes`` times (after ``failed``
    attempts of it had failed, on consumers that died later): a dead letter if it has used up its
    attempts, else ``None`` (run it).

    >>> from zdq.codec.tasks import TaskOptions
    >>> on_redelivery(TaskOptions(retries=2), 1, 3, failed=2)   # failed, failed, killed: 3 of 3
    DeadLetter(attempts=3, killed=True, crashes=1)
    >>> on_redelivery(TaskOptions(retries=2), 1, 3, failed=1) is None
    True
    """
    used = crashes + failed
    if crashes and used >= attempts_allowed(options, crashes, crash_attempts):
        return DeadLetter(used, killed=True, crashes=crashes if failed else 0)
    return None


def backoff(options: TaskOptions, attempt: int, jitter: Callable[[], float] = random.random) -> float:
    """The delay before the attempt after ``attempt`` (1 for the first): ``retry_backoff`` doubled
    ``attempt - 1`` times, times 0.5 + ``jitter()`` (``jitter`` in [0, 1)), capped by
    ``retry_backoff_max``."""
    doublings = min(max(attempt - 1, 0), _MAX_DOUBLINGS)
    return min(options.retry_backoff * 2.0**doublings * (0.5 + jitter()), options.retry_backoff_max)


def after_failure(
    options: TaskOptions,
    crashes: int,
    crash_attempts: int,
    attempt: int,
    error: BaseException,
    *,
    stopping: bool = False,
    jitter: Callable[[], float] = random.random,
) -> Decision:
    """Decide what follows the failure of attempt number ``attempt`` (1 for a task's first run;
    a redelivered task's attempts count on from its ``crashes``).

    A consumer that is ``stopping`` retries nothing: the task fails now (dead-lettered if it had
    retries, so that it can be requeued).
    """
    allowed = attempts_allowed(options, crashes, crash_attempts)
    if attempt < allowed and not stopping and isinstance(error, options.retry_on):
        return Retry(backoff(options, attempt, jitter))
    if options.retries > 0 or crashes:
        return DeadLetter(attempt)
    return Fail()
