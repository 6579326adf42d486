"""A map future's ``result()`` answered in C (``zdq._untracked.slot_result``, issue 26 point 6):
a settled future of a chunk without errors gives its value from C; everything else (pending, a
timeout, an error anywhere in its chunk, a cancelled task, a future or chunk changed by hand,
wrong arguments) goes to the Python method and behaves exactly as it does. Nothing leaks, nothing
crashes whatever is written into the slots it reads."""

from __future__ import annotations

import concurrent.futures
import gc
import inspect
import sys
import time
from typing import Any

import pytest

from zdq.client import window
from zdq.client.window import MapChunk, MapFuture
from zdq.errors import TaskCancelled

needs_the_extension = pytest.mark.skipif(
    window._untracked is None, reason="zdq._untracked was not built at install: result() is the Python method"
)


def _chunk(n: int, *, fill: bool = True, errors: dict[int, BaseException] | None = None, value: Any = None) -> tuple[MapChunk, list[MapFuture]]:
    chunk = MapChunk(100, n, None, None)
    futures = chunk.futures()
    if fill:
        chunk._fill(0, [value if value is not None else i * 10 for i in range(n)], errors or {})
    return chunk, futures


@needs_the_extension
def test_the_method_is_the_compiled_one_and_wraps_the_python_one() -> None:
    method = vars(MapFuture)["result"]
    assert type(method).__module__ == "zdq._untracked"
    assert inspect.unwrap(method).__qualname__ == "MapFuture.result"
    assert str(inspect.signature(MapFuture.result)).startswith("(self, timeout")
    _, (f, *_) = _chunk(3)
    assert str(inspect.signature(f.result)).startswith("(timeout")
    assert f.result.__name__ == "result" and "result" in repr(f.result)
    assert MapFuture.result.__doc__ == inspect.unwrap(method).__doc__


@pytest.mark.parametrize("call", [
    lambda f: f.result(),
    lambda f: f.result(None),
    lambda f: f.result(timeout=None),
    lambda f: f.result(5),
    lambda f: f.result(timeout=0),
    lambda f: MapFuture.result(f),
    lambda f: (lambda bound: bound())(f.result),
])
def test_a_settled_future_gives_its_value_however_result_is_called(call: Any) -> None:
    _, futures = _chunk(50)
    assert [call(f) for f in futures] == [i * 10 for i in range(50)]


def test_a_chunk_with_an_error_gives_each_future_its_own_outcome() -> None:
    boom = ValueError("boom")
    _, futures = _chunk(4, errors={2: boom})
    assert [futures[i].result() for i in (0, 1, 3)] == [0, 10, 30]
    with pytest.raises(ValueError, match="boom"):
        futures[2].result()
    assert futures[2].exception() is boom


def test_a_cancelled_task_raises_cancelled() -> None:
    _, futures = _chunk(3, errors={1: TaskCancelled("cancelled")})
    with pytest.raises(concurrent.futures.CancelledError):
        futures[1].result()
    assert futures[0].result() == 0 and futures[1].cancelled()


def test_a_pending_future_times_out_as_before_and_reads_its_outcome_once_settled() -> None:
    chunk, futures = _chunk(2, fill=False)
    chunk._driver = None
    started = time.monotonic()
    with pytest.raises(concurrent.futures.TimeoutError):
        futures[0].result(timeout=0.05)
    assert time.monotonic() - started < 5
    assert not futures[1].done()
    chunk._fill(0, [7, 8], {})
    assert futures[1].result() == 8 and futures[0].result(timeout=0) == 7


def test_a_value_read_in_c_is_counted_once() -> None:
    value = object()
    _, futures = _chunk(10, value=value)
    before = sys.getrefcount(value)
    for _ in range(1000):
        for f in futures:
            f.result()
    assert sys.getrefcount(value) == before


@pytest.mark.parametrize("args", [(1, 2), (None, None)])
def test_wrong_arguments_are_refused_by_the_python_method(args: tuple[Any, ...]) -> None:
    _, (f, *_) = _chunk(2)
    with pytest.raises(TypeError):
        f.result(*args)
    with pytest.raises(TypeError):
        f.result(wait=1)  # type: ignore[call-arg]


def test_result_of_something_else_is_refused_not_read() -> None:
    with pytest.raises((TypeError, AttributeError)):
        MapFuture.result(object())  # type: ignore[arg-type]
    with pytest.raises((TypeError, AttributeError)):
        MapFuture.result()  # type: ignore[call-arg]
    chunk, _ = _chunk(2)
    with pytest.raises((TypeError, AttributeError)):
        MapFuture.result(chunk)  # type: ignore[arg-type]


@pytest.mark.parametrize("change", [
    ("future", "_i", -1),
    ("future", "_i", 10**30),
    ("future", "_i", 5),
    ("future", "_i", "0"),
    ("future", "_i", True),
    ("chunk", "_values", (0, 10, 20)),
    ("chunk", "_values", []),
    ("chunk", "_settled", b"\1\1\1"),
    ("chunk", "_settled", bytearray(1)),
    ("chunk", "_errors", {1: ValueError("x")}),
    ("chunk", "_errors", []),
])
def test_slots_changed_by_hand_go_to_the_python_method_which_answers_as_before(change: tuple[str, str, Any]) -> None:
    where, name, value = change
    chunk, futures = _chunk(3)
    f = futures[1]
    target = f if where == "future" else chunk
    object.__setattr__(target, name, value)
    try:
        expected: Any = window.MapFuture.result.__wrapped__(f)  # type: ignore[attr-defined]
    except BaseException as e:  # noqa: BLE001 - the Python method's answer, whatever it is
        with pytest.raises(type(e)):
            f.result()
    else:
        assert f.result() == expected


@pytest.mark.parametrize("name", ["_chunk", "_i"])
def test_a_future_whose_slot_is_deleted_raises_attribute_error(name: str) -> None:
    _, futures = _chunk(2)
    object.__delattr__(futures[0], name)
    with pytest.raises(AttributeError):
        futures[0].result()


@pytest.mark.parametrize("name", ["_values", "_errors", "_settled"])
def test_a_chunk_whose_slot_is_deleted_raises_attribute_error(name: str) -> None:
    chunk, futures = _chunk(2)
    object.__delattr__(chunk, name)
    with pytest.raises(AttributeError):
        futures[0].result()


def test_a_subclass_of_the_future_reads_the_same_slots() -> None:
    class Mine(MapFuture):
        __slots__ = ("extra",)

    chunk, _ = _chunk(3)
    f = object.__new__(Mine)
    object.__setattr__(f, "_chunk", chunk)
    object.__setattr__(f, "_i", 2)
    assert f.result() == 20


@needs_the_extension
def test_the_compiled_method_refuses_what_is_no_object_slot() -> None:
    slot_result = type(vars(MapFuture)["result"])
    good = (MapFuture, vars(MapFuture)["_chunk"], vars(MapFuture)["_i"], MapChunk, vars(MapChunk)["_settled"],
            vars(MapChunk)["_errors"], vars(MapChunk)["_values"], lambda *a: None)
    slot_result(*good)
    for k, bad in ((1, "nope"), (2, vars(MapChunk)["_values"]), (4, vars(MapFuture)["_i"]), (3, int), (7, 5)):
        args = list(good)
        args[k] = bad
        with pytest.raises(TypeError):
            slot_result(*args)
    with pytest.raises(TypeError):
        slot_result(*good, extra=1)
    with pytest.raises(TypeError):
        slot_result(*good[:-1])


@needs_the_extension
def test_the_compiled_method_is_collected_with_what_it_holds() -> None:
    slot_result = type(vars(MapFuture)["result"])

    class Holder:
        pass

    holder = Holder()
    method = slot_result(MapFuture, vars(MapFuture)["_chunk"], vars(MapFuture)["_i"], MapChunk,
                         vars(MapChunk)["_settled"], vars(MapChunk)["_errors"], vars(MapChunk)["_values"],
                         lambda *a, _h=holder: _h)
    holder.method = method  # type: ignore[attr-defined]  # a cycle through the method's `slow`
    import weakref

    ref = weakref.ref(holder)
    del holder, method
    gc.collect()
    assert ref() is None


def _same_as_python(future: MapFuture) -> None:
    try:
        expected = MapFuture.result.__wrapped__(future)  # type: ignore[attr-defined]
    except BaseException as e:  # noqa: BLE001 - the Python method's answer, whatever it is
        with pytest.raises(type(e)):
            future.result()
    else:
        assert future.result() == expected


def test_a_subclass_that_gives_a_slots_name_another_meaning_is_answered_by_the_python_method() -> None:
    """Reviewer 18: the slots were read where the base classes keep them, whatever a subclass
    made of the names (a property, a slot of its own): its objects go to the Python method."""
    chunk, _ = _chunk(4)

    class OwnIndex(MapFuture):
        __slots__ = ()

        @property
        def _i(self) -> int:  # type: ignore[override]
            return 0

    f = object.__new__(OwnIndex)
    vars(MapFuture)["_chunk"].__set__(f, chunk)
    vars(MapFuture)["_i"].__set__(f, 3)
    assert f.result() == 0
    _same_as_python(f)

    class ErrorsOfItsOwn(MapChunk):
        @property
        def _errors(self) -> dict[int, BaseException]:
            return {1: ValueError("position 1 failed, says the subclass")}

        @_errors.setter
        def _errors(self, value: dict[int, BaseException]) -> None:
            vars(MapChunk)["_errors"].__set__(self, value)

    told = ErrorsOfItsOwn(0, 3, None, None)
    of_told = told.futures()
    told._fill(0, [1, 2, 3], {})
    with pytest.raises(ValueError, match="says the subclass"):
        of_told[1].result()
    for future in of_told:
        _same_as_python(future)

    class ValuesSlotted(MapChunk):
        __slots__ = ("_values",)  # a slot of its own hides the base's

    hidden = ValuesSlotted(0, 3, None, None)
    of_hidden = hidden.futures()
    hidden._fill(0, [1, 2, 3], {})
    vars(MapChunk)["_values"].__set__(hidden, ["X", "Y", "Z"])
    assert of_hidden[1].result() == 2
    for future in of_hidden:
        _same_as_python(future)


@needs_the_extension
def test_the_compiled_method_reads_as_the_python_one_to_inspect_typing_pydoc_and_pickle() -> None:
    import pickle
    import pydoc
    import typing

    method = MapFuture.result
    python = method.__wrapped__  # type: ignore[attr-defined]
    for name in ("__name__", "__qualname__", "__module__", "__doc__", "__annotations__"):
        assert getattr(method, name) == getattr(python, name)
    assert method.__objclass__ is MapFuture  # type: ignore[attr-defined]
    assert typing.get_type_hints(method) == typing.get_type_hints(python)
    assert pickle.loads(pickle.dumps(method)) is method
    _, (f, *_) = _chunk(2)
    assert repr(f.result).startswith("<bound method MapFuture.result of ")
    assert "timeout" in pydoc.render_doc(method)
