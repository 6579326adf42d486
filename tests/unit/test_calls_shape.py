"""A batch's shape in one pass of C (``zdq._calls.shape``, issue 26): ``check_calls`` and
``calls_width`` give the same answers with it as in Python, on every kind of batch, and it asks
nothing of a user's objects."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest

from zdq.codec import tasks
from zdq.codec.tasks import _SHARED_MAX_ARGS, _SHARED_MIN, calls_width, check_calls

needs_the_extension = pytest.mark.skipif(
    tasks._shape is None, reason="zdq._calls was not built at install (no C compiler or no Python headers)"
)


def add(*args: int) -> int:
    return sum(args)


class Asks:
    """A callable that fails the test if zdq asks it anything but to be called."""

    def __call__(self, *args: Any) -> None:
        return None

    def __eq__(self, other: object) -> bool:
        raise AssertionError("__eq__ was asked")

    def __hash__(self) -> int:
        raise AssertionError("__hash__ was asked")

    def __len__(self) -> int:
        raise AssertionError("__len__ was asked")


class Row(tuple):  # type: ignore[type-arg]
    """A tuple subclass: not a call (the loop names it)."""


class Calls(list):  # type: ignore[type-arg]
    """A list subclass: taken in Python, as it may read differently from its items."""


class _SaysItIsTuple(type):
    def __eq__(cls, other: object) -> bool:
        return other is tuple or type.__eq__(cls, other)

    __hash__ = type.__hash__


class FakeTuple(metaclass=_SaysItIsTuple):
    """Not a tuple, though its metaclass says it equals ``tuple``: no path may take it for one,
    nor ask it anything (reviewer 17: the Python path asked its ``__len__`` and ``__getitem__``)."""

    def __getitem__(self, i: int) -> Any:
        raise AssertionError("__getitem__ was asked")

    def __len__(self) -> int:
        raise AssertionError("__len__ was asked")

    def __repr__(self) -> str:
        return "FakeTuple()"


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("repr called")


def _answers(calls: Any) -> tuple[Any, Any]:
    """(check_calls' answer or the error it raised, calls_width's answer where it applies)."""
    try:
        shared = check_calls(calls)
    except (TypeError, ValueError) as e:
        return (type(e), str(e)), None
    return shared, calls_width(calls) if shared is not None else None


@pytest.fixture
def in_python(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(tasks, "_shape", None)
    yield


_fn = Asks()
_BATCHES: dict[str, Any] = {
    "empty": [],
    "one": [(add, 1)],
    "shared": [(add, i) for i in range(20)],
    "shared, no arguments": [(add,)] * 20,
    "shared, few": [(add, 1)] * (_SHARED_MIN - 1),
    "shared, widest": [(add, *range(_SHARED_MAX_ARGS))] * 10,
    "shared, too wide": [(add, *range(_SHARED_MAX_ARGS + 1))] * 10,
    "shared, two lengths": [(add, 1)] * 10 + [(add, 1, 2)],
    "shared, two lengths first": [(add, 1, 2)] + [(add, 1)] * 10,
    "two functions": [(add, 1), (divmod, 7, 2)] * 8,
    "a callable object": [(_fn, 1)] * 10 + [(add, 2)],
    "the same callable object": [(_fn, i) for i in range(10)],
    "by name": [("tests.tasks:add", 1)] * 3,
    "a name among callables": [(add, 1), ("tests.tasks:add", 1)],
    "a bad name": [(add, 1), ("not a name", 1)],
    "not callable first": [(3, 1), (add, 1)],
    "not callable later": [(add, 1)] * 5 + [(3, 1)],
    "an empty tuple": [(add, 1), ()],
    "an empty tuple first": [(), (add, 1)],
    "a list": [(add, 1), [add, 1]],
    "a tuple subclass": [(add, 1), Row((add, 1))],
    "a tuple subclass first": [Row((add, 1)), (add, 1)],
    "not a tuple": [(add, 1), 5],
    "none": [None],
    "a class whose metaclass says it is tuple": [(add, 1)] * 10 + [FakeTuple()],
    "a class whose metaclass says it is tuple, first": [FakeTuple()] + [(add, 1)] * 10,
    "an item whose repr raises": [(add, 1), BadRepr()],
}


@pytest.mark.parametrize("name", sorted(_BATCHES))
def test_the_shape_is_the_same_in_c_and_in_python(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _BATCHES[name]
    compiled = _answers(list(calls))
    monkeypatch.setattr(tasks, "_shape", None)
    assert _answers(list(calls)) == compiled


def test_random_batches_have_the_same_shape_in_c_and_in_python(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(26)
    parts: list[Any] = [
        (add, 1), (add, 1, 2), (add,), (divmod, 7, 2), (_fn, 1), ("tests.tasks:add", 1), (3,), (), Row((add, 1)), 5,
        FakeTuple(), BadRepr(),
    ]
    batches = []
    for _ in range(400):
        common = rng.choice(parts[:3])
        batch = [common] * rng.randrange(0, 30)
        for _ in range(rng.randrange(0, 3)):
            batch.insert(rng.randrange(0, len(batch) + 1), rng.choice(parts))
        batches.append(batch)
    compiled = [_answers(list(b)) for b in batches]
    monkeypatch.setattr(tasks, "_shape", None)
    assert [_answers(list(b)) for b in batches] == compiled


@needs_the_extension
def test_a_list_subclass_is_taken_in_python(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []

    def shape(calls: Any) -> Any:
        seen.append(calls)
        raise AssertionError("the compiled shape took a list subclass")

    monkeypatch.setattr(tasks, "_shape", shape)
    assert check_calls(Calls([(add, i) for i in range(10)])) is add
    assert calls_width(Calls([(add, i) for i in range(10)])) == 2
    assert seen == []


@needs_the_extension
def test_the_compiled_shape_asks_nothing_of_the_calls_objects() -> None:
    other = Asks()
    assert tasks._shape([(_fn, 1), (other, 2)] * 10) == (None, 2)
    assert tasks._shape([(_fn, 1)] * 10) == (_fn, 2)
    assert tasks._shape([(_fn, 1), (_fn, 1, 2)]) == (_fn, 0)


@needs_the_extension
def test_the_compiled_shape_refuses_what_is_not_a_plain_list_of_calls() -> None:
    shape = tasks._shape
    assert shape is not None
    for wrong in ([], (), Calls([(add, 1)]), [(add, 1), Row((add, 1))], [(add, 1), ()], [(3, 1)], [(add, 1), (3, 1)], "abc", None):
        assert shape(wrong) is False, wrong
    assert shape([(add, 1), (divmod, 1)]) == (None, 2)


def test_an_item_whose_repr_raises_is_named_by_its_type() -> None:
    with pytest.raises(TypeError, match=r"item 1 must be a tuple .*BadRepr object whose repr raises"):
        check_calls([(add, 1), BadRepr()])


@needs_the_extension
def test_the_function_is_held_while_the_answer_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reviewer 17: building the answer may start a garbage collection, which runs Python code
    (here a gc callback) that may empty the list and free the function the answer names: it
    crashed the interpreter. The function is held from the end of the loop on."""
    import gc
    import weakref

    class Fn:
        def __call__(self, *args: Any) -> None:
            return None

    calls = [(Fn(), 1)]
    alive = weakref.ref(calls[0][0])
    cleared: list[int] = []

    def clear(phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and calls:
            cleared.append(1)
            calls.clear()

    was = gc.isenabled()
    gc.disable()
    spare = [(i, -i) for i in range(5000)]  # the answer's tuple is then a fresh GC allocation
    old = gc.get_threshold()
    gc.callbacks.append(clear)
    try:
        gc.set_threshold(1)
        gc.enable()
        fn, width = tasks._shape(calls)  # type: ignore[misc]
    finally:
        gc.disable()
        gc.callbacks.remove(clear)
        gc.set_threshold(*old)
        if was:
            gc.enable()
    del spare
    assert cleared and isinstance(fn, Fn) and width == 2 and alive() is fn


def test_a_tuple_whose_first_item_is_not_callable_is_named_as_such() -> None:
    # Reviewer 27a: "(3, 4)" was said not to be a tuple.
    with pytest.raises(TypeError, match=r"item 1 must be a tuple \(fn, \*args\) whose fn is callable .*: 3 is not callable"):
        check_calls([(add, 1), (3, 4)])
    with pytest.raises(TypeError, match=r"item 1 must be a tuple \(fn, \*args\), got 'x'$"):
        check_calls([(add, 1), "x"])
