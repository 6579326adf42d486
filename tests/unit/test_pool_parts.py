"""The pools' pure parts: task options merged once, actor slots and their closed check, the
consumer registry."""

from __future__ import annotations

from typing import Any

import pytest

from zdq.client.consumer_registry import ConsumerRegistry
from zdq.client.slots import ActorSlots, SlotsClosed
from zdq.client.submit import TaskDefaults
from zdq.tasks import TaskOptions


class _Future:
    def __init__(self, key: str) -> None:
        self.key = key


def test_a_call_without_options_of_its_own_gets_nothing_to_carry_when_the_defaults_are_plain() -> None:
    assert TaskDefaults(TaskOptions()).merge() is None


def test_a_call_without_options_of_its_own_gets_the_pools_defaults() -> None:
    defaults = TaskOptions(retries=2, time_limit=5.0)
    assert TaskDefaults(defaults).merge() is defaults


def test_a_calls_options_override_the_defaults_one_by_one() -> None:
    merged = TaskDefaults(TaskOptions(retries=2, retry_backoff=0.5)).merge(retries=4, time_limit="2s")
    assert merged == TaskOptions(retries=4, retry_backoff=0.5, time_limit=2.0)


def test_a_single_exception_type_to_retry_on_becomes_a_tuple() -> None:
    merged = TaskDefaults(TaskOptions()).merge(retry_on=KeyError)
    assert merged is not None and merged.retry_on == (KeyError,)


def test_options_equal_to_the_plain_ones_carry_nothing() -> None:
    assert TaskDefaults(TaskOptions()).merge(retries=0) is None


def test_a_bad_time_limit_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="time_limit"):
        TaskDefaults(TaskOptions()).merge(time_limit=-1)


def test_adopting_an_actor_hands_back_the_future_it_replaces() -> None:
    slots: ActorSlots[str] = ActorSlots(2)
    first, second = _Future("a"), _Future("b")
    assert slots.adopt(0, first, "broker-a") is None
    assert slots.adopt(0, second, "broker-b") is first
    assert slots.actor(0) == "broker-b" and slots.future(0) is second
    assert slots.actors() == ["broker-b", None] and not slots.placed()


def test_closed_slots_refuse_a_late_actor_so_that_its_placer_releases_it() -> None:
    slots: ActorSlots[str] = ActorSlots(1)
    fut = _Future("a")
    slots.adopt(0, fut, "broker")
    assert slots.take_all() == [(fut, "broker")]
    assert slots.closed and slots.actors() == [None]
    with pytest.raises(SlotsClosed):
        slots.adopt(0, _Future("late"), "late broker")
    assert slots.actors() == [None]


def test_taking_the_slots_twice_hands_nothing_back_the_second_time() -> None:
    slots: ActorSlots[str] = ActorSlots(2)
    slots.adopt(1, _Future("b"), "broker")
    slots.take_all()
    assert slots.take_all() == [(None, None), (None, None)]


class _Consumers:
    def __init__(self, n: int, running: bool = False) -> None:
        self.n_consumers = n
        self._running = running
        self._closed = False
        self.moves: list[tuple[int, str]] = []

    @property
    def running(self) -> bool:
        return self._running

    @property
    def closed(self) -> bool:
        return self._closed

    def on_broker_moved(self, broker: int, endpoint: str) -> None:
        self.moves.append((broker, endpoint))


class _Broken(_Consumers):
    def on_broker_moved(self, broker: int, endpoint: str) -> None:
        raise RuntimeError("its worker is gone")


def test_the_registry_counts_the_consumers_of_its_live_pools_only() -> None:
    registry = ConsumerRegistry("jobs")
    first, second = _Consumers(2), _Consumers(3, running=True)
    registry.subscribe(first)
    registry.subscribe(second)
    assert registry.pools() == [first, second] and registry.n_consumers() == 5 and registry.any_running()
    second._closed = True
    assert registry.pools() == [first] and registry.n_consumers() == 2 and not registry.any_running()


def test_the_registry_forgets_a_consumer_pool_dropped_without_close() -> None:
    registry = ConsumerRegistry("jobs")
    registry.subscribe(_Consumers(2))  # no reference kept: collected at once
    assert registry.pools() == []


def test_one_consumer_pool_failing_to_hear_of_a_move_does_not_keep_the_others_uninformed() -> None:
    registry = ConsumerRegistry("jobs")
    broken, fine = _Broken(1), _Consumers(1)
    registry.subscribe(broken)
    registry.subscribe(fine)
    registry.broker_moved(0, "tcp://10.0.0.2:5000", "jobs-queue-0")
    assert fine.moves == [(0, "tcp://10.0.0.2:5000")]


def test_the_registry_keeps_every_consumer_identity_it_was_told_of() -> None:
    registry = ConsumerRegistry("jobs")
    for identity in (b"a", b"b", b"a"):
        registry.add_identity(identity)
    assert registry.identities() == frozenset({b"a", b"b"})


def test_a_registry_without_drivers_has_no_results_and_no_earlier_producers() -> None:
    registry = ConsumerRegistry("jobs")
    feeders: list[Any] = []
    assert registry.drivers() == feeders
    assert registry.results_for([b"a"]) == {} and registry.done_count([b"a"]) == 0
    assert registry.earlier_producers() == set()


def test_options_given_by_name_merge_over_the_defaults_and_unknown_ones_are_refused() -> None:
    defaults = TaskDefaults(TaskOptions(retries=1))
    assert defaults.merge_all(retry_backoff_max=5.0, retries=None) == TaskOptions(retries=1, retry_backoff_max=5.0)
    assert defaults.merge_all() is defaults.options
    with pytest.raises(TypeError, match="retires"):
        defaults.merge_all(retires=3)


def test_submit_call_naming_time_limit_none_lifts_the_pools_default_and_other_calls_keep_it() -> None:
    defaults = TaskDefaults(TaskOptions(retries=1, time_limit=5.0))
    assert defaults.merge_all(time_limit=None) == TaskOptions(retries=1)
    assert defaults.merge_all(retries=3, time_limit=None) == TaskOptions(retries=3)
    # submit()'s keywords: None is "not given", the default limit stays.
    assert defaults.merge(retries=3) == TaskOptions(retries=3, time_limit=5.0)
    assert defaults.merge_all(retries=None) is defaults.options


def test_a_consumer_that_reaches_no_queue_is_replaced_less_and_less_often_while_its_replacements_do_not_either(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A network cut between the consumers' workers and the brokers' made every consumer be
    replaced every ten seconds or so, for ever, each with a warning (reviewer 6: 24 workers)."""
    import logging
    import types

    from zdq.client.consumers import _UNREACHED_WAITS, ConsumerSlots

    first, last = _UNREACHED_WAITS
    slots: Any = types.SimpleNamespace(_unreached={}, names=["GeneralConsumer-0"])
    replace = ConsumerSlots._replace_unreached
    why = "consumer GeneralConsumer-0 on w reaches none of its queues (q at e: cut)"
    with caplog.at_level(logging.DEBUG, logger="zdq.client.consumers"):
        at = 100.0
        assert replace(slots, 0, why, at)  # the first one at once: elsewhere it may reach them
        assert not replace(slots, 0, why, at + first - 0.1)
        waits = []
        for _ in range(8):
            _, not_before = slots._unreached[0]
            waits.append(not_before - at)
            at = not_before
            assert replace(slots, 0, why, at)
    assert waits == [min(last, first * 2**k) for k in range(8)] and waits[-1] == last
    levels = [r.levelno for r in caplog.records]
    assert levels[:2] == [logging.WARNING, logging.WARNING] and set(levels[2:]) == {logging.DEBUG}
    assert "less and less often" in caplog.records[1].getMessage()


def test_a_consumer_that_reached_its_queues_for_a_while_starts_its_waits_over_at_the_next_cut() -> None:
    import types

    from zdq.client.consumers import _UNREACHED_WAITS, ConsumerSlots

    first, last = _UNREACHED_WAITS
    slots: Any = types.SimpleNamespace(_unreached={}, names=["GeneralConsumer-0"])
    why = "consumer GeneralConsumer-0 on w reaches none of its queues (q at e: cut)"
    for at in (0.0, first, 3 * first):
        assert ConsumerSlots._replace_unreached(slots, 0, why, at)
    assert slots._unreached[0] == (3, 3 * first + 4 * first)
    later = 3 * first + 4 * first + last + 1  # it lived well past its wait: a new cut
    assert ConsumerSlots._replace_unreached(slots, 0, why, later)
    assert slots._unreached[0] == (1, later + first)
