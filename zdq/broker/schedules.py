"""The schedules of one queue: the broker's loop puts each tick's chunk in its queue.

Owned by the broker's loop thread (control-plane calls hold the broker's lock, as for the rest of
its state). The records are the one source of a schedule's state; storage keeps them with the
queue, so they outlive the broker on a durable queue (a transient queue's schedules live as long
as its broker). When a tick is due (:func:`zdq.schedules.plan`), its chunk (the one-task payload
the driver pickled when it made the schedule, never unpickled here) and the schedule's next time
are stored together (:meth:`Storage.put_tick`): a crash before or after keeps both or neither.

Names: the table owns the name -> schedule mapping of its queue (``_named``, rebuilt from the
records when the queue opens). A named record added while one of that name is kept replaces it
(:meth:`~zdq.codec.schedules.ScheduleRecord.replacing`) under the broker's lock, so two drivers
naming the same schedule at once end with one; on a durable queue the old record's removal and
the new one's write are one transaction.

A tick's chunk is owned by :data:`~zdq.schedules.SCHEDULED` with the schedule id as its seq. Its
results go to the schedule, never to a driver: the broker keeps the last ones with the record
(bounded: one per schedule) and forgets the chunk.
"""

from __future__ import annotations

import functools
import logging
import math
import time

from zdq.errors import StorageError
from zdq.codec.schedules import SCHEDULED, ScheduleRecord, plan
from zdq.storage.base import ChunkMeta, Storage

__all__ = ["ScheduleTable"]

logger = logging.getLogger(__name__)

#: A tick that could not be stored (a full disk) is tried again this much later.
_RETRY_AFTER = 1.0


def _ticked(record: ScheduleRecord, now: float, next_due: float, chunk_id: int) -> bytes:
    return record.after_tick(now, next_due, chunk_id).pack()


class ScheduleTable:
    """The schedules of a queue over its (opened) storage."""

    def __init__(self, name: str, storage: Storage) -> None:
        self.name = name
        self._storage = storage
        self._records: dict[int, ScheduleRecord] = {}
        self._retry_at: dict[int, float] = {}  # wall-clock times of ticks that failed to store
        self._named: dict[str, int] = {}  # schedule name -> id, for the named ones
        for raw in storage.stored_schedules():
            try:
                record = ScheduleRecord.unpack(raw)
            except ValueError as e:
                logger.error("queue %s: a stored schedule is unreadable and ignored: %s", name, e)
                continue
            self._keep(record)
        #: When the loop must wake next (``time.monotonic()``): inf without schedules. The loop
        #: reads it every round (an attribute, not a call: the loop's hot path pays nothing more).
        self.wake_at = math.inf
        self.rewake()

    def __len__(self) -> int:
        return len(self._records)

    def rewake(self) -> None:
        """Recompute :attr:`wake_at` (after a change, and on every heartbeat tick, so that a jump
        of the wall clock is followed)."""
        if not self._records:
            self.wake_at = math.inf
            return
        due = min(self._retry_at.get(i, r.due) for i, r in self._records.items())
        self.wake_at = time.monotonic() + max(0.0, due - time.time())

    # -- control plane (under the broker's lock) ------------------------------------------------
    def add(self, raw: bytes) -> bytes:
        """Keep a schedule made by a driver (written before this returns); a named one replaces
        the schedule of its name. Return the record kept (packed): the old one's next tick and
        history if the timing is unchanged."""
        record = ScheduleRecord.unpack(raw)
        old = self._records.get(self._named.get(record.schedule_name, 0)) if record.schedule_name else None
        if old is None:
            self._storage.write_schedule(record.schedule_id, record.pack(), now=True)
        else:
            record = record.replacing(old)
            kept = record.schedule_id == old.schedule_id
            # One transaction: the old record dropped and the new one kept, or neither.
            self._storage.write_schedules(([] if kept else [(old.schedule_id, None)]) + [(record.schedule_id, record.pack())])
            if not kept:
                self._forget(old.schedule_id)
            logger.info("queue %s: schedule %r replaced (%s)", self.name, record.schedule_name,
                        "next tick and history kept" if kept else "new timing, from now")
        self._keep(record)
        self.rewake()
        return record.pack()

    def cancel(self, schedule: int | str) -> bool:
        """End the schedule of this id, or of this name; False if this queue has none."""
        schedule_id = self._named.get(schedule, 0) if isinstance(schedule, str) else schedule
        if schedule_id not in self._records:
            return False
        self._storage.write_schedule(schedule_id, None, now=True)
        self._forget(schedule_id)
        self.rewake()
        return True

    def _keep(self, record: ScheduleRecord) -> None:
        if record.schedule_name:
            if self._named.get(record.schedule_name, record.schedule_id) != record.schedule_id:
                # Never written so by add(); a directory put together by hand could hold it.
                logger.error("queue %s: two stored schedules are named %r; cancel one by its id", self.name, record.schedule_name)
            self._named[record.schedule_name] = record.schedule_id
        self._records[record.schedule_id] = record

    def _forget(self, schedule_id: int) -> None:
        record = self._records.pop(schedule_id)
        self._retry_at.pop(schedule_id, None)
        if record.schedule_name and self._named.get(record.schedule_name) == schedule_id:
            del self._named[record.schedule_name]

    def records(self) -> list[bytes]:
        return [r.pack() for r in self._records.values()]

    # -- the loop -------------------------------------------------------------------------------
    def fire(self, now: float) -> int:
        """Put the chunk of every tick due at wall-clock ``now`` in the queue; return how many."""
        fired = 0
        for schedule_id, record in list(self._records.items()):
            if self._retry_at.get(schedule_id, record.due) > now:
                continue
            try:
                run, next_due = plan(record.spec, record.due, now, record.missed)
            except (ValueError, OverflowError, OSError) as e:  # croniter's CroniterBadDateError is a ValueError
                # No next tick (a record written before the call refused such timings, or a
                # date past what datetime holds): the schedule ends; the loop and its queue go on.
                logger.error("queue %s: schedule %s has no next tick and ends: %s", self.name, record.name, e)
                self._end(schedule_id)
                continue
            if run and self._pending(record.chunk):
                run = False  # the previous tick has not finished: at most one tick is queued
            try:
                if run:
                    meta = ChunkMeta(SCHEDULED, schedule_id, 1, priority=record.priority)
                    chunk = self._storage.put_tick(
                        meta, record.payload, schedule_id, functools.partial(_ticked, record, now, next_due)
                    )
                    updated = record.after_tick(now, next_due, chunk)
                    fired += 1
                else:
                    updated = record.after_skip(next_due)
                    self._storage.write_schedule(schedule_id, updated.pack())
                    logger.info("queue %s: schedule %s skipped a tick (missed, or the last one not done)", self.name, record.name)
            except StorageError as e:
                logger.error("queue %s: tick of schedule %s not stored, tried again in %.0fs: %s", self.name, record.name, _RETRY_AFTER, e)
                self._retry_at[schedule_id] = now + _RETRY_AFTER
                continue
            self._retry_at.pop(schedule_id, None)
            self._records[schedule_id] = updated
        self.rewake()
        return fired

    def _end(self, schedule_id: int) -> None:
        try:
            self._storage.write_schedule(schedule_id, None, now=True)
        except StorageError as e:  # forgotten here all the same: a reopened queue logs it again
            logger.error("queue %s: schedule %d could not be removed from storage: %s", self.name, schedule_id, e)
        self._forget(schedule_id)

    def _pending(self, chunk_id: int) -> bool:
        return bool(chunk_id) and self._storage.meta(chunk_id) is not None and not self._storage.is_dead(chunk_id)

    def done(self, schedule_id: int, results: object) -> None:
        """A tick's results came back: they are the schedule's last (its chunk is forgotten)."""
        record = self._records.get(schedule_id)
        if record is None:  # cancelled since, or a requeued dead letter (seq 0)
            return
        data = getattr(results, "bytes", results)
        updated = record.after_done(time.time(), bytes(data) if isinstance(data, (bytes, memoryview)) else b"")
        self._storage.write_schedule(schedule_id, updated.pack())
        self._records[schedule_id] = updated
