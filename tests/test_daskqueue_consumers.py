"""Consumer classes written for daskqueue 0.2.0 run on zdq with only the import changed: its
attributes (``items``, ``_logger``, ``_worker``, ``_executor``), ``GeneralConsumer.save(msg,
result)`` as the hook for results (overridden, it is called with each function's result, on the
consumer) and a class's own ``get_results()``, which ``ConsumerPool.results()`` then returns per
consumer, as daskqueue's did."""

from __future__ import annotations

import time
from typing import Any

import pytest
from distributed import Client

from zdq import BatchError, ConsumerBaseClass, ConsumerPool, DummyConsumer, GeneralConsumer, QueuePool, ZdqTimeoutError

from .tasks import add


class Counting(ConsumerBaseClass):
    """daskqueue's attributes, used as its consumers used them."""

    def process_item(self, item: int) -> tuple[int, str, bool, bool]:
        self._logger.info("[%s] got %s", self.name, item)
        return len(self.items), type(self._worker).__name__, self._executor is not None, self.future is None


class Saver(GeneralConsumer):
    """daskqueue's hook: results kept on the consumer by an overridden save()."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.saved: dict[int, Any] = {}

    def save(self, msg: Any, result: Any) -> None:
        if result == 13:
            raise ValueError("13 is not saved")
        self.saved[msg.id] = result
        super().save(msg, result)

    def get_results(self) -> dict[int, Any]:
        return self.saved


class OwnResults(ConsumerBaseClass):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.mine: dict[int, int] = {}

    def process_item(self, item: int) -> None:
        self.mine[item] = item + 1

    def get_results(self) -> dict[int, int]:
        return self.mine


def test_a_daskqueue_consumer_finds_its_attributes_and_its_items_listed(client: Client) -> None:
    with QueuePool(client, 1) as queue_pool, ConsumerPool(client, queue_pool, Counting, 1) as consumers:
        batch = queue_pool.put_many([10, 20, 30])
        consumers.start()
        assert batch.result(timeout=60) == [(i, "Worker", True, True) for i in (1, 2, 3)]


def test_daskqueues_dummy_consumer_takes_raw_items(client: Client) -> None:
    with QueuePool(client, 2) as queue_pool, ConsumerPool(client, queue_pool, DummyConsumer, 2) as consumers:
        batch = queue_pool.put_many(["a", "b", "c", "d"])
        consumers.start()
        assert batch.result(timeout=60) == [None] * 4
        assert consumers.nb_consumed() == 4


def test_an_overridden_save_is_called_with_each_functions_result_and_its_error_fails_that_task(client: Client) -> None:
    with QueuePool(client, 1) as queue_pool, ConsumerPool(client, queue_pool, Saver, 1) as consumers:
        consumers.start()
        lone = queue_pool.submit(add, 1, 1)  # the lone task's path
        assert lone.result(timeout=60) == 2
        batch = queue_pool.batch_submit([(add, i) for i in range(20)], batch_size=10)
        with pytest.raises(BatchError, match="13 is not saved") as raised:
            batch.result(timeout=60)
        errors = raised.value.errors
        assert list(errors) == [13]  # that task only; the others' results are saved and returned
        results = consumers.results()  # the class's get_results(), asked of each consumer
        saved = results["Saver-0"]
        assert saved[lone.key] == 2
        assert {key - batch.keys.start: value for key, value in saved.items() if key in batch.keys} == {
            i: i for i in range(20) if i != 13
        }


def test_results_returns_each_consumers_own_get_results_as_daskqueue_did(client: Client) -> None:
    with QueuePool(client, 2, keep_results=False) as queue_pool:
        with ConsumerPool(client, queue_pool, OwnResults, 2) as consumers:
            batch = queue_pool.put_many(list(range(40)))
            consumers.start()
            batch.result(timeout=60)
            results = consumers.results()
            assert set(results) == {"OwnResults-0", "OwnResults-1"}
            merged = {k: v for mine in results.values() for k, v in mine.items()}
            assert merged == {i: i + 1 for i in range(40)}


class SkipsInit(GeneralConsumer):
    """A daskqueue subclass whose __init__ does not call the base class's."""

    def __init__(self, *args: Any) -> None:
        self.name = "skips"


class HangsThenAnswers(ConsumerBaseClass):
    def process_item(self, item: Any) -> Any:
        return item

    def get_results(self) -> dict[str, int]:
        import time

        time.sleep(8)
        return {"late": 1}


class Unpicklable(ConsumerBaseClass):
    def process_item(self, item: Any) -> Any:
        return item

    def get_results(self) -> Any:
        import threading

        return {"lock": threading.Lock()}


def test_a_general_consumer_subclass_that_skips_init_runs_its_tasks(client: Client) -> None:
    with QueuePool(client, 1) as queue_pool, ConsumerPool(client, queue_pool, SkipsInit, 1, start=True):
        assert queue_pool.submit(add, 2, 3).result(timeout=30) == 5
        assert queue_pool.put((add, 1, 1)).result(timeout=30) == 2


def test_a_get_results_that_hangs_or_cannot_travel_is_named_and_leaves_the_worker_answering(client: Client) -> None:
    with QueuePool(client, 1) as queue_pool:
        with ConsumerPool(client, queue_pool, HangsThenAnswers, 1, start=True) as consumers:
            with pytest.raises(ZdqTimeoutError, match=r"HangsThenAnswers-0 .*did not return within 1\.6 s"):
                consumers.results(timeout=2)
            # The worker's actor thread was not held by it: the consumer answers at once.
            started = time.monotonic()
            assert consumers.statistics(timeout=5)[0].worker
            assert time.monotonic() - started < 3
        with ConsumerPool(client, queue_pool, Unpicklable, 1, start=True) as consumers:
            with pytest.raises(ZdqTimeoutError, match="returned a dict that cannot be pickled"):
                consumers.results(timeout=10)
