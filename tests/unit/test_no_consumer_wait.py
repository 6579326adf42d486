"""The pure parts of issue 23 point 4: a wait that learns its pool cannot run it, and the registry's
verdict that nothing consumes although ConsumerPools were started."""

from __future__ import annotations

import pytest

from zdq import futures
from zdq.client.consumer_registry import ConsumerRegistry
from zdq.config import settings
from zdq.errors import BrokerUnreachable, NoConsumers, NoEligibleWorkers, ZdqTimeoutError
from zdq.futures import TaskFuture, WaitHint


class _Pool:
    def __init__(self, running: bool, stranded: str = "") -> None:
        self.n_consumers = 1
        self.running = running
        self.closed = False
        self._stranded = stranded

    def stranded(self) -> str:
        return self._stranded

    def on_broker_moved(self, broker: int, endpoint: str) -> None:
        pass


class _Serving(_Pool):
    """A running pool that says which queues it does not serve now (ConsumerPool.held_up)."""

    def __init__(self, held_up: dict[int, tuple[type[Exception], str]]) -> None:
        super().__init__(running=True)
        self._held_up = held_up

    def held_up(self) -> dict[int, tuple[type[Exception], str]]:
        return self._held_up


class _OldListener:
    """A listener subscribed through QueuePool.subscribe that knows nothing of stranding."""

    n_consumers = 1
    running = True
    closed = False

    def on_broker_moved(self, broker: int, endpoint: str) -> None:
        pass


def test_no_eligible_workers_is_caught_as_no_consumers() -> None:
    assert issubclass(NoEligibleWorkers, NoConsumers)


def test_the_registry_says_nothing_consumes_only_when_every_running_pool_is_stranded() -> None:
    registry = ConsumerRegistry("jobs")
    gpu = _Pool(running=True, stranded="no live worker satisfies resources={'GPU': 1.0}")
    idle = _Pool(running=False)
    registry.subscribe(gpu)
    registry.subscribe(idle)
    assert "GPU" in registry.stranded()  # the idle pool does not consume: it changes nothing
    fine = _Pool(running=True)
    registry.subscribe(fine)
    assert registry.stranded() == ""  # another running pool still consumes


def test_a_queue_is_held_up_only_when_every_running_pool_says_it_does_not_serve_it() -> None:
    registry = ConsumerRegistry("jobs")
    assert registry.held_up() == {}
    broken = _Serving({2: (NoEligibleWorkers, "its class raises"), 3: (NoEligibleWorkers, "its class raises")})
    registry.subscribe(broken)
    assert registry.held_up() == {2: (NoEligibleWorkers, "its class raises"), 3: (NoEligibleWorkers, "its class raises")}
    moved = _Serving({3: (BrokerUnreachable, "placed where none reaches it"), 1: (BrokerUnreachable, "moved")})
    registry.subscribe(moved)
    assert registry.held_up() == {3: (NoEligibleWorkers, "its class raises")}  # 2 is served by the second pool
    idle, old = _Pool(running=False), _OldListener()  # held: the registry holds its pools weakly
    registry.subscribe(idle)  # not running: changes nothing
    assert list(registry.held_up()) == [3]
    registry.subscribe(old)  # cannot tell: serves every queue
    assert registry.held_up() == {}


def test_unreachable_queues_come_first_among_those_held_up() -> None:
    registry = ConsumerRegistry("jobs")
    pool = _Serving({0: (NoEligibleWorkers, "class"), 1: (BrokerUnreachable, "moved")})
    registry.subscribe(pool)
    assert list(registry.held_up()) == [1, 0]


def test_the_registry_never_says_stranded_without_running_pools_or_for_a_listener_that_cannot_tell() -> None:
    registry = ConsumerRegistry("jobs")
    assert registry.stranded() == ""
    registry.subscribe(old := _OldListener())
    assert registry.stranded() == "" and old.running


def test_a_result_wait_raises_the_pools_stuck_error_and_leaves_the_future_pending(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(futures, "_LOOK_EVERY", 0.01)
    fut = TaskFuture(1)
    fut._hint = WaitHint(lambda: "", lambda _future: NoEligibleWorkers("no worker declares GPU"))
    with pytest.raises(NoEligibleWorkers, match="GPU"):
        fut.result(timeout=5)
    with pytest.raises(NoEligibleWorkers):
        fut.result()  # no timeout: the same, instead of waiting for ever
    assert not fut.done()
    fut.set_result(7)
    assert fut.result() == 7


def test_a_result_wait_whose_pool_is_not_stuck_times_out_with_the_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(futures, "_LOOK_EVERY", 0.01)
    asked = []

    def stuck(future: object) -> None:
        asked.append(future)

    fut = TaskFuture(1)
    fut._hint = WaitHint(lambda: "queue q-0 is down", stuck)
    with pytest.raises(ZdqTimeoutError, match="queue q-0 is down"):
        fut.result(timeout=0.05)
    assert asked, "the pool was never asked whether the result can come"
    assert all(future is fut for future in asked), "the pool is asked about the waiting future itself"


def test_the_bound_is_a_setting_that_must_be_positive() -> None:
    assert settings().no_consumer_timeout == 30.0
    assert settings(no_consumer_timeout="3s").no_consumer_timeout == 3.0
    with pytest.raises(ValueError, match="no_consumer_timeout"):
        settings(no_consumer_timeout=0)


def test_waits_on_many_futures_raise_the_error_of_a_pool_that_cannot_do_one_as_result_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """zdq.wait, zdq.gather and zdq.as_completed without a timeout waited for ever where the
    future's own result() raised NoEligibleWorkers."""
    import concurrent.futures

    import zdq

    monkeypatch.setattr(futures, "_LOOK_EVERY", 0.01)
    monkeypatch.setattr(futures, "_LOOK_AT_MOST", 0.02)
    stuck_one = TaskFuture(1)
    stuck_one._hint = WaitHint(lambda: "", lambda f: NoEligibleWorkers("queue q-2 is served by none") if f is stuck_one else None)
    done = TaskFuture(2)
    done.set_result(5)
    plain: concurrent.futures.Future[int] = concurrent.futures.Future()  # no pool: not asked
    with pytest.raises(NoEligibleWorkers, match="q-2"):
        zdq.wait([done, stuck_one, plain])
    with pytest.raises(NoEligibleWorkers, match="q-2"):
        zdq.gather([done, stuck_one])
    completed = zdq.as_completed([done, stuck_one])
    assert next(completed) is done
    with pytest.raises(NoEligibleWorkers, match="q-2"):
        next(completed)
    assert not stuck_one.done()  # it stays pending: a later wait may succeed
    got = zdq.wait([done, stuck_one], return_when=concurrent.futures.FIRST_COMPLETED)
    assert got.done == {done}  # met: nothing is asked
    stuck_one.set_result(7)
    assert zdq.gather([done, stuck_one]) == [5, 7]


def test_a_waits_timeout_takes_time_strings_and_refuses_nan_and_what_is_no_duration() -> None:
    import zdq

    fut = TaskFuture(1)
    with pytest.raises(ZdqTimeoutError, match=r"within 0\.05s"):  # seconds in the message, not "50mss"
        fut.result(timeout="50ms")  # type: ignore[arg-type]
    for bad in (float("nan"), "abc"):
        with pytest.raises(ValueError, match="^timeout must"):
            fut.result(timeout=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="^timeout must"):
            zdq.wait([fut], timeout=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="^timeout must"):
            zdq.as_completed([fut], timeout=bad)  # type: ignore[arg-type]
    assert zdq.wait([fut], timeout="10ms").not_done == {fut}  # type: ignore[arg-type]
