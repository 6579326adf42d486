"""Every error zdq raises at its users is offered where its README names it: ``zdq.<Error>``, as
``zdq.TaskExpired`` is (a user catches ``zdq.TaskCancelled`` and ``zdq.NoConsumers`` without
learning the module layout)."""

from __future__ import annotations

import inspect

import zdq
import zdq.errors
from zdq.client.by_id import PoolNotFound


def test_every_error_of_zdq_errors_is_a_public_name_of_the_package_and_the_same_class() -> None:
    errors = {
        name: cls
        for name, cls in vars(zdq.errors).items()
        if inspect.isclass(cls) and issubclass(cls, zdq.errors.ZdqError) and cls.__module__ == "zdq.errors"
    }
    assert {"TaskCancelled", "NoConsumers", "NoEligibleWorkers", "TaskProcessDied"} <= errors.keys()
    missing = sorted(name for name in errors if name not in zdq.__all__)
    assert missing == [], f"not in zdq.__all__: {missing}"
    for name, cls in errors.items():
        assert getattr(zdq, name) is cls, name
    assert zdq.PoolNotFound is PoolNotFound and "PoolNotFound" in zdq.__all__


def test_a_batch_error_says_its_cancelled_tasks_apart_from_its_failed_ones() -> None:
    # Reviewer 13: a batch partly purged said "11 of 20 tasks failed", none of which had.
    from zdq.errors import BatchError, TaskCancelled

    assert str(BatchError({4: TaskCancelled("c"), 9: TaskCancelled("c")}, [None] * 20)).startswith(
        "2 of 20 tasks were cancelled; first, task 4: TaskCancelled"
    )
    assert str(BatchError({4: TaskCancelled("c"), 7: ValueError("x")}, [None] * 20)).startswith(
        "1 of 20 tasks failed, 1 was cancelled; first, task 7: ValueError"
    )
    assert str(BatchError({3: ValueError("x")}, [None] * 5)) == "1 of 5 tasks failed; first, task 3: ValueError('x')"
