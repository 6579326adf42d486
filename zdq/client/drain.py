"""Waiting for a pool's work: every queue drained, every result of this process's tasks in.

``ConsumerPool.join()`` used to build "drained" out of five driver calls; it is
:meth:`QueuePool.wait_drained <zdq.QueuePool.wait_drained>` now, which runs this function over
the pool's own driver and the other drivers of this process on the same live pool (a second
QueuePool on a durable directory: the tasks of the first are waited for too).

It holds no state: everything is local to the call, on the caller's thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from zdq.client.consumer_registry import ConsumerRegistry
from zdq.client.driver import Driver
from zdq.errors import BrokerLost, NoConsumers, NoEligibleWorkers, ZdqTimeoutError
from zdq.transport import protocol as p

__all__ = ["wait_drained"]


def wait_drained(
    own: Driver,
    registry: ConsumerRegistry,
    what: str,
    queue_names: Sequence[str],
    down_bound: float,
    timeout: float | None = None,
    *,
    timestep: float = 0.2,
    progress: Callable[[int, int], None] | None = None,
    check: Callable[[list[p.QueueStatus | None]], None] | None = None,
) -> list[p.QueueStatus | None]:
    """Block until every queue answers "nothing pending" and no driver of ``registry`` waits for a
    result; return the queues' last counts.

    ``progress(done, total)`` is called at each look, ``total`` counted against the tasks
    submitted (or, when this process submitted none, those found in the queues at the start);
    ``check(statuses)`` may raise. A queue that has not answered for ``down_bound`` seconds raises
    :class:`BrokerLost` naming it, and started consumers none of which could be placed for their
    bound raise :class:`NoEligibleWorkers` naming their constraint: no wait here is without a
    bound or an error that names it.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    down_since: dict[int, float] = {}
    total: int | None = None
    while True:
        drivers = [own] + [d for d in registry.drivers() if d is not own]
        # The queues' counts come over the data plane: no actor call, so a broker that is being
        # placed again (its worker died) only makes this wait, within a bound, never fail.
        for driver in drivers:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                driver.flush(timeout=left)
            except ZdqTimeoutError:
                pass  # the deadline is checked below
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        statuses = own.queue_status(timeout=10 if left is None else min(10.0, max(left, 0.1)))
        known = [s for s in statuses if s is not None]
        pending = sum(s.ready_tasks + s.leased_tasks + s.waiting_tasks for s in known)
        outstanding = sum(d.outstanding for d in drivers)
        if progress is not None:
            stats = [d.statistics() for d in drivers]
            done = sum(s.tasks_completed + s.foreign_tasks for s in stats)
            counted_tasks = sum(s.tasks_submitted + s.foreign_tasks for s in stats)
            if total is None:
                # Against the tasks this process submitted; when it submitted none (a durable
                # pool opened again after a restart), against what the queues hold at the start.
                # Not both: a result already here whose receipt is on its way is still counted
                # by its queue, and adding the two overshot (83,000/102,000 for 100,000 tasks).
                total = counted_tasks if counted_tasks else pending
            total = max(total, counted_tasks)
            progress(min(done, total), total)
        # A STATUS reply comes after every result its broker routed here before it (one socket
        # keeps order): when every queue answers "nothing pending", those are in.
        if len(known) == len(statuses) and pending == 0 and outstanding == 0:
            return statuses
        if (pending or outstanding) and not registry.any_running():
            raise NoConsumers(
                f"join: {max(pending, outstanding)} tasks are pending and no consumer is running: "
                "call consumer_pool.start() first"
            )
        if pending or outstanding:
            stranded = registry.stranded()
            if stranded:
                raise NoEligibleWorkers(f"join: {max(pending, outstanding)} tasks are pending and {stranded}")
        if check is not None:
            check(statuses)
        now = time.monotonic()
        for i, status in enumerate(statuses):
            if status is not None:
                down_since.pop(i, None)
            elif now - down_since.setdefault(i, now) > down_bound:
                raise BrokerLost(
                    f"join: queue {queue_names[i]} of {what} has not answered for "
                    f"{now - down_since[i]:.0f} s (lost and not placed again, or its owner's pool was "
                    "dropped): its tasks are not known to be done"
                )
        if deadline is not None and now > deadline:
            down = len(statuses) - len(known)
            raise ZdqTimeoutError(
                f"join: {max(pending, outstanding)} tasks were still pending at the timeout"
                + (f" ({down} queues were down, being placed again)" if down else "")
            )
        own.wait_results(timeout=timestep)
