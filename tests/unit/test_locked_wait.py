"""QueuePool.start's wait for locked durable directories (issue 23, point 3): the bookkeeping of
:class:`zdq.client.brokers.LockedWait` over a made-up clock, and :func:`probe_locks` on real
LMDB queue directories."""

from __future__ import annotations

from pathlib import Path

import pytest

from zdq.client.brokers import LockedWait, probe_locks
from zdq.errors import QueueLocked
from zdq.storage.lmdb import LMDBStorage

LOCKED = QueueLocked("queue /data/q/default-queue-0 is owned by another live broker")
HELD = {"/data/q/default-queue-0": "a broker of pool default on worker tcp://10.0.0.1:1234 whose actor was released"}


def test_the_first_placement_is_at_once_and_a_locked_one_is_told_once_naming_the_directory_and_its_holder() -> None:
    wait = LockedWait("default", ["default-queue-0"], bound=30, now=100.0)
    assert wait.may_place(100.0) and not wait.waiting and not wait.may_probe(100.0)
    told = wait.locked(LOCKED, HELD, 100.2)
    assert told is not None
    assert "queue default-queue-0's directory /data/q/default-queue-0 is locked by a broker of pool default" in told
    assert "on worker tcp://10.0.0.1:1234" in told and "waiting up to 30 s" in told and "register" in told
    assert wait.locked(LOCKED, HELD, 102.3) is None  # said once


def test_while_locked_it_asks_the_workers_often_and_places_again_at_once_when_every_lock_is_free() -> None:
    wait = LockedWait("default", ["default-queue-0"], bound=30, now=0.0)
    wait.locked(LOCKED, HELD, 0.0)
    assert not wait.may_place(0.4) and not wait.may_probe(0.4)
    assert wait.may_probe(0.6) and not wait.may_place(0.6)
    wait.probed(HELD, 0.6)  # still held
    assert not wait.may_place(0.7)
    wait.probed(None, 1.1)  # the workers could not be asked: placing keeps its own schedule
    assert not wait.may_place(1.2)
    wait.probed({}, 1.6)  # free: placed again at once, not at the next 2 s tick
    assert wait.may_place(1.6)


def test_a_holder_the_workers_cannot_see_is_still_placed_again_every_two_seconds() -> None:
    wait = LockedWait("default", ["default-queue-0"], bound=30, now=0.0)
    told = wait.locked(LOCKED, None, 0.0)
    assert told is not None and "workers do not see" in told and "default-queue-0" in told
    assert not wait.may_place(1.9) and wait.may_place(2.0)


def test_past_the_bound_it_raises_queue_locked_naming_the_directory_its_holder_and_what_it_waited_for() -> None:
    wait = LockedWait("default", ["default-queue-0"], bound=30, now=0.0)
    wait.locked(LOCKED, HELD, 0.0)
    with pytest.raises(QueueLocked) as raised:
        wait.locked(LOCKED, HELD, 30.5)
    message = str(raised.value)
    assert "pool default could not be opened within 30 s" in message
    assert "/data/q/default-queue-0 is locked by a broker of pool default on worker tcp://10.0.0.1:1234" in message
    assert "released" in message and "register" in message and "another dirpath" in message
    assert raised.value.__cause__ is LOCKED


def test_probe_locks_names_a_held_directory_leaves_free_and_absent_ones_out_and_keeps_the_holders_lock(
    tmp_path: Path,
) -> None:
    held, free, absent = (str(tmp_path / f"default-queue-{i}") for i in range(3))
    holder = LMDBStorage(held)
    holder.open()
    other = LMDBStorage(free)
    other.open()
    other.close()
    try:
        found = probe_locks([held, free, absent])
        assert list(found) == [held]
        assert "not one of its brokers" in found[held]  # a storage of this process, not a broker's
        with pytest.raises(QueueLocked):  # probing did not drop the holder's lock
            LMDBStorage(held).open()
    finally:
        holder.close()
    assert probe_locks([held, free, absent]) == {}
