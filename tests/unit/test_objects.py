"""Tasks as objects (zdq.Task) and what QueuePool.insert is given, without a cluster."""

from __future__ import annotations

import pytest

from zdq import Task
from zdq.objects import as_calls

from ..tasks import Square


class _NoExecute(Task):
    pass


def test_a_task_is_a_callable_that_runs_its_execute_method() -> None:
    assert Square(7)() == 49
    with pytest.raises(NotImplementedError, match="_NoExecute must implement execute"):
        _NoExecute()()


def test_insert_input_that_is_neither_task_callable_nor_iterable_is_refused_naming_the_argument() -> None:
    for bad in (42, "abc", None):
        with pytest.raises(TypeError, match=r"insert\(tasks=\.\.\.\)"):
            as_calls(bad)


def test_insert_calls_of_an_iterable_stop_at_the_first_bad_item_and_keep_its_error() -> None:
    pulled = []

    def gen():  # type: ignore[no-untyped-def]
        for i in range(10):
            pulled.append(i)
            yield Square(i) if i != 3 else object()

    calls, total = as_calls(gen())
    assert total is None
    assert [c[0].x for c in calls] == [0, 1, 2]  # everything before the bad item goes through
    assert pulled == [0, 1, 2, 3]  # and the generator is not read past it
    with pytest.raises(TypeError, match="item 3 is neither a zdq.Task nor a callable"):
        calls.check()
    one, n = as_calls(Square(2))
    assert n == 1 and [c[0].x for c in one] == [2]


def test_the_error_of_a_bad_item_counts_the_items_queued_before_it_in_singular_or_plural() -> None:
    for good, said in ((1, "(1 item before it was queued;"), (2, "(2 items before it were queued;")):
        calls, _ = as_calls([*(Square(i) for i in range(good)), object()])
        assert len(list(calls)) == good
        with pytest.raises(TypeError) as raised:
            calls.check()
        assert said in str(raised.value), raised.value


def test_one_task_given_alone_is_marked_single_and_an_iterable_of_one_is_not() -> None:
    one, _ = as_calls(Square(2))
    assert one.single  # insert() draws no bar for it (a python-task-queue loop of inserts)
    listed, _ = as_calls([Square(2)])
    assert not listed.single
    func, _ = as_calls(lambda: 1)
    assert func.single


class _PtqStyle(Task):
    """python-task-queue's way: arguments kept as attributes, then passed up to the base."""

    def __init__(self, txt: str = "") -> None:
        super().__init__(txt)
        self.txt = txt

    def execute(self) -> str:
        return self.txt.upper()


class _NoInit(Task):
    def execute(self) -> int:
        return 1


def test_a_task_may_pass_its_arguments_up_as_python_task_queues_do_but_one_without_init_takes_none() -> None:
    assert _PtqStyle("hi")() == "HI"
    assert _NoInit()() == 1
    with pytest.raises(TypeError, match=r"_NoInit\(\) takes no arguments: make it a @dataclass"):
        _NoInit(7)
