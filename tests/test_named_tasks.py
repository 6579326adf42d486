"""Tasks submitted by name (``"package.module:function"``, Celery's ``send_task``): the producer
never imports the code, the consumer does. Real worker processes (the session's LocalCluster),
whose sys.path is the tests' own, so ``tests.named_tasks`` is importable there; this module never
imports it, and checks that it stays so.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import pytest
from distributed import Client

from zdq import ConsumerPool, QueuePool, TaskTimeout
from zdq.errors import BatchError

from .tasks import add

MODULE = "tests.named_tasks"


@pytest.fixture
def queue_pool(client: Client) -> Iterator[QueuePool]:
    """One queue and one started consumer: every task below runs on the same consumer."""
    with QueuePool(client, 1) as queue_pool:
        with ConsumerPool(client, queue_pool, n_consumers=1, start=True):
            yield queue_pool


def test_a_task_by_name_runs_on_a_consumer_that_imports_it(queue_pool: QueuePool) -> None:
    assert queue_pool.submit(f"{MODULE}:double", 21).result(timeout=30) == 42
    assert queue_pool.submit(f"{MODULE}:Maths.square", 5).result(timeout=30) == 25
    assert queue_pool.submit(f"{MODULE}:double", 3, retries=1, time_limit=30).result(timeout=30) == 6  # careful path
    assert queue_pool.submit(f"{MODULE}:double", 5, time_limit=30, hard=True).result(timeout=30) == 10  # in a child
    assert queue_pool.batch_submit([(f"{MODULE}:double", 1), (add, 1, 1)]).result(timeout=30) == [2, 2]
    assert [f.result(timeout=30) for f in queue_pool.map(f"{MODULE}:double", [1, 2, 3])] == [2, 4, 6]
    assert MODULE not in sys.modules  # the producer never needed the code


def test_a_task_by_name_runs_on_the_task_threads_of_a_concurrent_consumer(client: Client) -> None:
    with QueuePool(client, 1) as queue_pool, ConsumerPool(client, queue_pool, n_consumers=1, max_concurrency=2, start=True):
        assert queue_pool.submit(f"{MODULE}:double", 21).result(timeout=30) == 42
        assert queue_pool.batch_submit([(f"{MODULE}:double", i) for i in range(4)]).result(timeout=30) == [0, 2, 4, 6]
        assert isinstance(queue_pool.submit(f"{MODULE}:nope", 1).exception(timeout=30), ImportError)


@pytest.mark.faults
@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("tests.no_such_module:double", "cannot import module 'tests.no_such_module'"),
        (f"{MODULE}:no_such_function", f"module '{MODULE}' has no attribute 'no_such_function'"),
        (f"{MODULE}:NOT_CALLABLE", "is not callable"),
    ],
)
def test_an_unknown_task_name_fails_its_future_with_an_import_error_and_the_consumer_goes_on(
    queue_pool: QueuePool, name: str, said: str
) -> None:
    error = queue_pool.submit(name, 1).exception(timeout=30)
    assert isinstance(error, ImportError), error
    assert said in str(error) and "on consumer GeneralConsumer-0 on worker tcp://" in str(error), error
    # Its remote traceback is the import's, not led by the fast path's first try of the name.
    remote = "\n".join(getattr(error, "__notes__", []))
    assert "remote traceback" in remote and "'str' object is not callable" not in remote, remote
    with pytest.raises(BatchError) as info:
        queue_pool.batch_submit([(name, 1), (add, 2, 2)]).result(timeout=30)
    assert isinstance(info.value.errors[0], ImportError) and info.value.values[1] == 4
    assert queue_pool.submit(f"{MODULE}:double", 4).result(timeout=30) == 8  # still serving


@pytest.mark.faults
@pytest.mark.parametrize("hard", [False, True])
def test_an_unknown_task_name_with_a_hard_limit_fails_as_it_does_without(queue_pool: QueuePool, hard: bool) -> None:
    options = {"time_limit": 30, "hard": True} if hard else {}
    error = queue_pool.submit("tests.no_such_module:double", 1, **options).exception(timeout=60)
    assert isinstance(error, ImportError), error
    assert "cannot import module 'tests.no_such_module'" in str(error), error
    assert "on consumer GeneralConsumer-0 on worker tcp://" in str(error), error


@pytest.mark.faults
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize(
    ("module", "said"),
    [
        ("tests.named_broken.raises", "RuntimeError: boom at import of tests.named_broken.raises"),
        ("tests.named_broken.exits", "SystemExit: exit at import of tests.named_broken.exits"),
    ],
)
def test_a_module_that_fails_at_import_fails_its_named_task_with_an_import_error(
    queue_pool: QueuePool, module: str, said: str, hard: bool
) -> None:
    options = {"time_limit": 30, "hard": True} if hard else {}
    error = queue_pool.submit(f"{module}:f", 1, **options).exception(timeout=60)
    assert isinstance(error, ImportError), error
    assert f"cannot import module '{module}': {said}" in str(error), error
    assert "on consumer GeneralConsumer-0 on worker tcp://" in str(error), error
    assert queue_pool.submit(f"{MODULE}:double", 4).result(timeout=30) == 8  # still serving


@pytest.mark.faults
def test_a_hard_named_task_is_imported_in_its_child_under_the_limit(queue_pool: QueuePool) -> None:
    """An import that hangs is the task's time: killed at the limit, never in the worker's process."""
    started = time.monotonic()
    error = queue_pool.submit("tests.named_broken.hangs:never", time_limit=1, hard=True).exception(timeout=30)
    assert isinstance(error, TaskTimeout) and "killed after 1s" in str(error), error
    assert time.monotonic() - started < 15
    assert queue_pool.submit(f"{MODULE}:double", 5).result(timeout=30) == 10  # still serving
    imported = queue_pool.client.run(lambda: "tests.named_broken.hangs" in sys.modules)
    assert not any(imported.values()), imported


def test_a_malformed_task_name_is_refused_at_the_call(queue_pool: QueuePool) -> None:
    with pytest.raises(ValueError, match="package.module:function"):
        queue_pool.submit("tests.named_tasks.double", 1)
    with pytest.raises(ValueError, match="batch_submit item 1"):
        queue_pool.batch_submit([(add, 1), ("not a name", 1)])
    with pytest.raises(TypeError, match="submit_call"):
        queue_pool.map(f"{MODULE}:double", [1], extra=2)
