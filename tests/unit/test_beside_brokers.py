"""Where a pool's consumers go when placed at once (pure): as many on each worker as spreading by
slot puts there, but beside a broker of a queue they serve where they can (issue 26, point 7: a
consumer reaches a broker of its own process over inproc, with no CurveZMQ handshake)."""

from __future__ import annotations

import pytest

from collections import Counter

from zdq._actor import beside_brokers
from zdq.fanout import served_queues


def _by_slot(workers: list[str], n: int) -> list[str]:
    return [workers[i % len(workers)] for i in range(n)]


def test_the_scale_suites_pools_get_every_consumer_a_broker_can_host_beside_it() -> None:
    for n_workers in (8, 16, 32):
        workers = [f"w{i:02d}" for i in range(n_workers)]
        q, n = n_workers // 2, 2 * n_workers
        serves = [served_queues(i, n, q, fan_out=2) for i in range(n)]
        brokers = workers[:q]  # the queue pool's own spread: queue i on worker i
        placed = beside_brokers(workers, serves, brokers)
        assert Counter(placed) == Counter(_by_slot(workers, n))  # the same number on each worker
        beside = sum(1 for slot, w in enumerate(placed) if any(brokers[j] == w for j in serves[slot]))
        before = sum(1 for slot, w in enumerate(_by_slot(workers, n)) if any(brokers[j] == w for j in serves[slot]))
        assert beside == 2 * q > before  # each broker's worker holds 2 consumers: both serve it


def test_without_a_broker_on_the_candidates_it_is_the_spread_by_slot() -> None:
    workers = ["a", "b", "c"]
    serves = [[0, 1]] * 7
    assert beside_brokers(workers, serves, ["x", ""]) == _by_slot(workers, 7)
    assert beside_brokers(workers, serves, []) == _by_slot(workers, 7)  # queues not known yet


def test_more_consumers_of_a_queue_than_room_beside_its_broker_spill_over_evenly() -> None:
    workers = ["a", "b"]
    placed = beside_brokers(workers, [[0]] * 5, ["a"])
    assert Counter(placed) == Counter({"a": 3, "b": 2})


def test_a_worker_that_did_not_answer_a_placement_is_passed_over_while_another_remains(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lost durable queue was placed again on a stopped worker of its host (the first in turn),
    which let the try wait out the whole recovery bound, and the queue was given up with its tasks
    on disk; a replacement consumer went back to a stopped worker every minute."""
    from zdq import _actor

    monkeypatch.setattr(_actor, "_unanswered", {})
    known = {"tcp://h:1": {"name": "a"}, "tcp://h:2": {"name": "b"}, "tcp://h:3": {"name": "c"}}
    placed: dict[int, str] = {}
    assert _actor.pick_worker(None, None, 0, placed, known=known) == "tcp://h:1"
    _actor.note_unanswered("tcp://h:1")
    assert _actor.pick_worker(None, None, 0, {}, known=known) == "tcp://h:2"
    assert _actor.pick_worker(None, None, 0, {}, known=known, prefer="tcp://h:1") == "tcp://h:2"  # not even beside brokers
    _actor.note_unanswered("tcp://h:2")
    _actor.note_unanswered("tcp://h:3")
    assert _actor.pick_worker(None, None, 0, {}, known=known) == "tcp://h:1"  # none answered: all are tried again
    _actor.note_unanswered("tcp://h:1", seconds=-1)  # its time is up
    _actor.note_unanswered("tcp://h:2", seconds=-1)
    assert _actor.pick_worker(None, None, 0, {}, known=known) == "tcp://h:1"
    assert "tcp://h:1" not in _actor._unanswered and "tcp://h:3" in _actor._unanswered
