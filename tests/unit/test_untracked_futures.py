"""``queue_pool.map``'s futures out of the garbage collector's sight while they hold only their
chunk and index (``zdq._untracked``, issue 26 point 6), and handed back to it as soon as they may
be part of a reference cycle: a cycle through a future is still collected, and nothing leaks."""

from __future__ import annotations

import concurrent.futures
import gc
import shutil
import sysconfig
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from zdq.client import window
from zdq.client.window import MapChunk, MapFuture
from zdq.errors import TaskCancelled

_COMPILER = (sysconfig.get_config_var("CC") or "cc").split()[0]
needs_the_extension = pytest.mark.skipif(
    window._slotted is None and shutil.which(_COMPILER) is None,
    reason=f"no C compiler ({_COMPILER}) was found to build zdq._untracked at install: map futures are made tracked",
)


@pytest.fixture(autouse=True)
def _collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def _settled(n: int, errors: dict[int, BaseException] | None = None) -> tuple[MapChunk, list[MapFuture]]:
    chunk = MapChunk(0, n, None, None)
    futures = chunk.futures()
    chunk._fill(0, list(range(n)), errors or {})
    return chunk, futures


def _collected(ref: weakref.ref[Any]) -> bool:
    gc.collect()
    return ref() is None


@needs_the_extension
def test_the_extension_is_built_where_a_compiler_is() -> None:
    # setup.py builds it with `pip install -e .`; a compiler at hand and no module is a broken install
    assert window._slotted is not None, "zdq._untracked is not importable: reinstall (pip install -e .)"


@needs_the_extension
@pytest.mark.parametrize("n", [1, 5, 1_500, 70_000])
def test_a_chunk_makes_its_futures_untracked_with_their_chunk_and_index(n: int) -> None:
    chunk = MapChunk(10, n, None, None)
    futures = chunk.futures()
    assert len(futures) == n and all(type(f) is MapFuture for f in futures)
    assert not any(gc.is_tracked(f) for f in futures)
    assert all(f._chunk is chunk for f in futures) and [f._i for f in futures] == list(range(n))
    assert [f.key for f in futures[-2:]] == [10 + n - 2, 10 + n - 1][-min(n, 2) :]
    chunk._fill(0, [i * 2 for i in range(n)], {})
    assert [f.result() for f in futures] == [i * 2 for i in range(n)]
    assert not any(gc.is_tracked(f) for f in futures)  # a result taken hands out nothing that leads back


def test_without_the_extension_the_same_futures_are_made_tracked() -> None:
    chunk = MapChunk(0, 3, None, None)
    futures = window._tracked_futures(chunk, 3)
    assert all(gc.is_tracked(f) for f in futures) and [f._i for f in futures] == [0, 1, 2]
    chunk._fill(0, ["a", "b", "c"], {})
    assert [f.result() for f in futures] == ["a", "b", "c"]


@needs_the_extension
def test_futures_are_freed_by_refcount_without_the_collector() -> None:
    chunk = MapChunk(0, 1000, None, None)
    futures = chunk.futures()
    ref, first = weakref.ref(chunk), weakref.ref(futures[0])
    gc.disable()
    try:
        del chunk, futures
        assert ref() is None and first() is None
    finally:
        gc.enable()


def _raise_from(future: MapFuture) -> None:
    try:
        future.result()
    except ValueError:
        pass


@needs_the_extension
@pytest.mark.parametrize(
    "hold",
    [
        pytest.param(lambda f: f.add_done_callback(lambda _: f), id="a callback that holds it"),
        pytest.param(lambda f: f._waiters.append(f), id="a standard-library waiter"),
        pytest.param(lambda f: setattr(f, "me", f), id="an attribute that holds it"),
    ],
)
def test_a_pending_future_that_comes_to_hold_more_is_tracked_and_its_cycle_collected(hold: Any) -> None:
    chunk = MapChunk(0, 4, None, None)
    futures = chunk.futures()
    hold(futures[2])
    assert gc.is_tracked(futures[2]) and not gc.is_tracked(futures[1])
    ref = weakref.ref(chunk)
    del chunk, futures
    assert _collected(ref), "a cycle through a map future kept its chunk alive"


@needs_the_extension
def test_an_error_raised_by_result_tracks_its_future_so_the_traceback_cycle_is_collected() -> None:
    # error -> traceback -> result()'s frame -> the future -> its chunk -> error: a cycle
    chunk, futures = _settled(3, {1: ValueError("boom")})
    _raise_from(futures[1])
    assert gc.is_tracked(futures[1]) and not gc.is_tracked(futures[0])
    assert chunk._errors[1].__traceback__ is not None
    ref = weakref.ref(chunk)
    del chunk, futures
    assert _collected(ref), "the raised error's traceback kept the chunk alive through an untracked future"


@needs_the_extension
def test_an_error_returned_by_exception_tracks_its_future() -> None:
    chunk, futures = _settled(3, {0: ValueError("boom"), 2: TaskCancelled("gone")})
    assert isinstance(futures[0].exception(), ValueError)
    with pytest.raises(concurrent.futures.CancelledError):
        futures[2].exception()
    assert futures[1].exception() is None
    assert [gc.is_tracked(f) for f in futures] == [True, False, True]

    def reraise() -> None:
        future = futures[0]
        error = future.exception()
        assert error is not None
        try:
            raise error
        except ValueError:
            pass

    reraise()
    ref = weakref.ref(chunk)
    del chunk, futures
    assert _collected(ref)


@needs_the_extension
def test_an_outcome_set_by_hand_tracks_its_future() -> None:
    chunk = MapChunk(0, 2, None, None)
    futures = chunk.futures()
    held = {"me": futures[0]}
    futures[0].set_result(held)  # a value that leads back to the future
    assert gc.is_tracked(futures[0]) and not gc.is_tracked(futures[1])
    assert futures[0].result() is held
    del held
    ref = weakref.ref(chunk)
    del chunk, futures
    assert _collected(ref)


@needs_the_extension
def test_standard_library_waits_work_on_untracked_futures() -> None:
    chunk = MapChunk(0, 3, None, None)
    futures = chunk.futures()
    chunk._fill(0, [1, 2, 3], {})
    done, pending = concurrent.futures.wait(futures, timeout=5)
    assert done == set(futures) and not pending
    assert sorted(f.result() for f in concurrent.futures.as_completed(futures, timeout=5)) == [1, 2, 3]


@needs_the_extension
def test_slotted_refuses_what_would_write_outside_an_object() -> None:
    slotted = window._slotted
    assert slotted is not None
    chunk = MapChunk(0, 1, None, None)

    class Other:
        __slots__ = ("a", "b")

    class Made:
        __slots__ = ("a", "b")

        def __new__(cls) -> Made:
            return object.__new__(cls)

    with pytest.raises(TypeError, match="slot's descriptor"):
        slotted(MapFuture, 1, "_chunk", chunk, MapFuture._i, (0,))
    with pytest.raises(TypeError, match="is not a slot of"):
        slotted(MapFuture, 1, Other.a, chunk, MapFuture._i, (0,))
    with pytest.raises(TypeError, match="object.__new__"):
        slotted(Made, 1, Made.a, 1, Made.b, (0,))
    with pytest.raises(ValueError, match="1 values for 2 objects"):
        slotted(MapFuture, 2, MapFuture._chunk, chunk, MapFuture._i, (0,))
    with pytest.raises(ValueError, match="two different slots"):
        slotted(MapFuture, 1, MapFuture._i, chunk, MapFuture._i, (0,))
    with pytest.raises(ValueError, match=">= 0"):
        slotted(MapFuture, -1, MapFuture._chunk, chunk, MapFuture._i, (0,))
    assert slotted(MapFuture, 0, MapFuture._chunk, chunk, MapFuture._i, ()) == []
