"""The pure parts of issue 23 point 4: a wait that learns its pool cannot run it, and the registry's
verdict that nothing consumes although ConsumerPools were started."""

from __future__ import annotations

import pytest

from zdq import futures
from zdq.client.consumer_registry import ConsumerRegistry
from zdq.config import settings
from zdq.errors import NoConsumers, NoEligibleWorkers, ZdqTimeoutError
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


def test_the_registry_never_says_stranded_without_running_pools_or_for_a_listener_that_cannot_tell() -> None:
    registry = ConsumerRegistry("jobs")
    assert registry.stranded() == ""
    registry.subscribe(old := _OldListener())
    assert registry.stranded() == "" and old.running


def test_a_result_wait_raises_the_pools_stuck_error_and_leaves_the_future_pending(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(futures, "_LOOK_EVERY", 0.01)
    fut = TaskFuture(1)
    fut._hint = WaitHint(lambda: "", lambda: NoEligibleWorkers("no worker declares GPU"))
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

    def stuck() -> None:
        asked.append(1)

    fut = TaskFuture(1)
    fut._hint = WaitHint(lambda: "queue q-0 is down", stuck)
    with pytest.raises(ZdqTimeoutError, match="queue q-0 is down"):
        fut.result(timeout=0.05)
    assert asked, "the pool was never asked whether the result can come"


def test_the_bound_is_a_setting_that_must_be_positive() -> None:
    assert settings().no_consumer_timeout == 30.0
    assert settings(no_consumer_timeout="3s").no_consumer_timeout == 3.0
    with pytest.raises(ValueError, match="no_consumer_timeout"):
        settings(no_consumer_timeout=0)
