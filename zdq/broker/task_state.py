"""Where one task stands in a queue, by its id: the broker's half of :func:`zdq.state` and
:func:`zdq.result` (the asking process unseals the results and reads its task's outcome).

The answer is ``(state, sealed results or None, detail)``, ``state`` one of:

=============  =====================================================================================
``pending``    its chunk is stored and not yet delivered (ready, or delayed until its time)
``started``    its chunk is with a consumer (the task may still wait behind earlier ones of its chunk)
``finished``   its chunk's results are here (waiting for their driver, or kept after its receipt for
               ``result_ttl``): the asker reads from them whether the task succeeded, failed or was
               cancelled
``cancelled``  its chunk is stored, and the task was cancelled before it started; or its chunk,
               cancelled whole before delivery, left the queue and its record is kept
               (``result_ttl``: :data:`~zdq.broker.retained.CANCELLED_RESULTS`)
``failed``     the task is a dead letter (``detail``: why); its results, if still here, say more
``expired``    its ``expires=`` time passed before it started (the chunk's tag; or, its chunk gone,
               the broker's record of the last chunks that expired: ``ExpiryWatch.has_expired``,
               passed in as ``expired``)
``unknown``    none of the above: never submitted here, or its results were taken by their driver and
               not kept (``result_ttl`` unset), or kept and expired or evicted
=============  =====================================================================================

Cost: one bisection in the kept results, then a scan of the chunks out of the ready queue (leased
or done) and of every stored chunk's head (a few tens of nanoseconds per chunk, under the broker's
lock): for rare requests. Askers poll with a backoff up to half a second (:mod:`zdq.client.by_id`).

Nothing here holds state; it reads the lease table under the broker's lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from zdq.broker.expiry import EXPIRED_RESULTS
from zdq.broker.leases import LeaseTable
from zdq.broker.retained import CANCELLED_RESULTS

__all__ = ["STATES", "task_state"]

#: The states a broker answers (the asker turns ``finished`` into done, failed or cancelled).
STATES = ("pending", "started", "finished", "cancelled", "failed", "expired", "unknown")

Answer = tuple[str, "bytes | None", str]


def task_state(
    leases: LeaseTable,
    task_id: int,
    expired: Callable[[int], object] | None = None,
    followed: Callable[[int], int | None] | None = None,
) -> Answer:
    """Where task ``task_id`` stands in the queue of ``leases`` (see the module docstring).

    ``followed`` names the task a unique task's follower follows (None: not a follower): a
    follower, never stored, stands where its holder does; "finished" then carries the holder's
    task id as its detail (the results are the holder's: the asker reads its task's outcome)."""
    answer = _own_state(leases, task_id, expired)
    if answer[0] == "unknown" and followed is not None:
        holder = followed(task_id)
        if holder is not None:
            answer = _own_state(leases, holder, expired)
            if answer[0] == "finished":
                return "finished", answer[1], str(holder)
    return answer


def _own_state(leases: LeaseTable, task_id: int, expired: Callable[[int], object] | None) -> Answer:
    retained = leases.retained
    if retained is not None:
        kept = retained.find(task_id)
        if kept is not None:
            return _finished(kept.payload())
    found = leases.holding(task_id)
    if found is not None:
        _, held = found
        if held.results is not None:
            results = held.results
            return _finished(bytes(getattr(results, "bytes", results)))  # type: ignore[call-overload]
        return "started", None, ""
    stored = _stored_state(leases, task_id)
    if stored is not None:
        return stored
    if expired is not None:
        detail = expired(task_id)
        if detail:
            return "expired", None, detail if isinstance(detail, str) else ""
    return "unknown", None, ""


def _finished(payload: bytes) -> Answer:
    """A done chunk's answer: its sealed results, or "expired" for the outcome the broker wrote
    itself for a chunk that expired before it was delivered (no results to unseal)."""
    if payload == EXPIRED_RESULTS:
        return "expired", None, ""
    if payload == CANCELLED_RESULTS:  # cancelled whole before delivery (CancelQuestions)
        return "cancelled", None, ""
    return "finished", payload, ""


def _stored_state(leases: LeaseTable, task_id: int) -> Answer | None:
    """The state of a task whose chunk is in storage and with no consumer: pending, cancelled,
    expired, or a dead letter; None if no stored chunk holds it."""
    storage = leases.storage
    chunk_id = storage.chunk_of(task_id)
    if chunk_id is None:
        return None
    meta = storage.meta(chunk_id)
    assert meta is not None
    if storage.is_dead(chunk_id):
        reason = next((d.reason for d in storage.dead_letters() if d.chunk_id == chunk_id), "")
        return "failed", None, reason
    if task_id - meta.base in storage.cancelled(chunk_id):
        return "cancelled", None, ""
    if storage.is_leased(chunk_id):
        return "started", None, ""
    if meta.expires and meta.expires <= time.time():
        return "expired", None, f"its expires= time passed {time.time() - meta.expires:.1f} s ago"
    return "pending", None, ""
