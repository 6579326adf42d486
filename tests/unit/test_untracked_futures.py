"""``queue_pool.map``'s futures out of the garbage collector's sight while no reference cycle can
pass through them (``zdq._untracked``, issue 26 point 6; the rule is ``MapChunk``'s): a chunk
whose outcomes are errors or anything but plain scalars hands all its futures back to the
collector before they can be read, one whose outcomes are all scalars lets go of what could lead
back to them, and a future that comes to hold more is tracked. Every cycle a user's code can make
through them is collected, as without the extension; nothing leaks."""

from __future__ import annotations

import concurrent.futures
import gc
import logging
import shutil
import sys
import sysconfig
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import zdq
from zdq.client import window
from zdq.client.window import MapChunk, MapFuture
from zdq.errors import TaskCancelled

_COMPILER = (sysconfig.get_config_var("CC") or "cc").split()[0]
_HEADERS = Path(sysconfig.get_paths()["include"]) / "Python.h"
needs_the_extension = pytest.mark.skipif(
    window._slotted is None,
    reason="zdq._untracked was not built at install (no C compiler or no Python headers): map futures are made tracked",
)


@pytest.fixture(autouse=True)
def _collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def _settled(
    n: int, errors: dict[int, BaseException] | None = None, value: Callable[[int], Any] = int
) -> tuple[MapChunk, list[MapFuture]]:
    chunk = MapChunk(0, n, None, None)
    futures = chunk.futures()
    chunk._fill(0, [value(i) for i in range(n)], errors or {})
    return chunk, futures


def _collected(ref: weakref.ref[Any]) -> bool:
    gc.collect()
    return ref() is None


@pytest.mark.skipif(
    shutil.which(_COMPILER) is None or not _HEADERS.exists(),
    reason=f"no C compiler ({_COMPILER}) or no Python headers ({_HEADERS}) to build zdq._untracked with",
)
def test_the_extension_is_built_where_it_can_be() -> None:
    # setup.py builds it with `pip install -e .`: both at hand and no module is a build that failed
    assert window._slotted is not None, (
        f"zdq._untracked was not built, although {_COMPILER} and {_HEADERS} are here: reinstall with "
        "pip install -v -e . and read the build's output"
    )


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
    assert not any(gc.is_tracked(f) for f in futures)  # scalars: nothing can lead back to them
    # all in: the chunk holds nothing of anyone's, not its futures, driver or hint
    assert chunk._untracked is None and chunk._driver is None and chunk._hint is None


def test_without_the_extension_the_same_futures_are_made_tracked() -> None:
    chunk = MapChunk(0, 3, None, None)
    futures = window._tracked_futures(chunk, 3)
    assert all(gc.is_tracked(f) for f in futures) and [f._i for f in futures] == [0, 1, 2]
    chunk._fill(0, ["a", "b", "c"], {})
    assert [f.result() for f in futures] == ["a", "b", "c"]


@needs_the_extension
def test_futures_are_freed_by_refcount_without_the_collector() -> None:
    # (while pending, a chunk and its futures hold each other: its driver holds it until it settles)
    chunk, futures = _settled(1000)
    ref, first = weakref.ref(chunk), weakref.ref(futures[0])
    gc.disable()
    try:
        del chunk, futures
        assert ref() is None and first() is None
    finally:
        gc.enable()


@needs_the_extension
@pytest.mark.parametrize(
    "hold",
    [
        pytest.param(lambda f: f.add_done_callback(lambda _: f), id="a callback that holds it"),
        pytest.param(lambda f: f._waiters.append(_waiter_holding(f)), id="a standard-library waiter"),
        pytest.param(lambda f: setattr(f, "me", f), id="an attribute that holds it"),
    ],
)
def test_a_pending_future_that_comes_to_hold_more_is_tracked_and_its_cycle_collected(hold: Any) -> None:
    # (the outcomes are scalars: nothing else hands the futures back)
    chunk = MapChunk(0, 4, None, None)
    futures = chunk.futures()
    hold(futures[2])
    assert gc.is_tracked(futures[2]) and not gc.is_tracked(futures[1])
    chunk._fill(0, [0, 1, 2, 3], {})
    ref = weakref.ref(chunk)
    del chunk, futures
    assert _collected(ref), "a cycle through a map future kept its chunk alive"


def _waiter_holding(future: MapFuture) -> Any:
    waiter = concurrent.futures._base._FirstCompletedWaiter()  # what wait() gives a future
    waiter.held = future  # type: ignore[attr-defined]
    return waiter


def _loop_catching(futures: list[MapFuture]) -> None:
    for f in futures:
        try:
            f.result()
        except ValueError:
            logging.getLogger("zdq.tests").debug("task failed", exc_info=True)


def _comprehension(futures: list[MapFuture]) -> None:
    try:
        [f.result() for f in futures]
    except ValueError:
        pass


def _gather(futures: list[MapFuture]) -> None:
    with pytest.raises(ValueError):
        zdq.gather(futures)


def _reraised_from_exception(futures: list[MapFuture]) -> None:
    errors = [f.exception() for f in futures]
    try:
        raise RuntimeError("the map failed") from next(e for e in errors if e)
    except RuntimeError:
        pass


def _in_a_dict(futures: list[MapFuture]) -> None:
    by_item = dict(enumerate(futures))
    try:
        by_item[1].result()
    except ValueError:
        pass


@needs_the_extension
@pytest.mark.parametrize("read", [_loop_catching, _comprehension, _gather, _reraised_from_exception, _in_a_dict])
def test_a_chunk_with_an_error_hands_every_future_back_so_the_readers_cycles_are_collected(read: Any) -> None:
    # error -> traceback -> the reader's frame -> the futures list -> any future -> its chunk -> error
    chunk, futures = _settled(5, {1: ValueError("boom")})
    assert all(gc.is_tracked(f) for f in futures)  # before anyone could read the error
    read(futures)
    ref = weakref.ref(chunk)
    del chunk, futures
    assert _collected(ref), "a raised error's traceback kept the chunk alive through an untracked future"


@needs_the_extension
@pytest.mark.parametrize(
    "value",
    [
        pytest.param(lambda i: {"i": i}, id="dicts"),
        pytest.param(lambda i: [i], id="lists"),
        pytest.param(lambda i: (i,), id="tuples"),
        pytest.param(lambda i: bytearray(3), id="bytearrays"),
    ],
)
def test_a_chunk_whose_outcomes_are_not_plain_scalars_hands_its_futures_back(value: Any) -> None:
    chunk, futures = _settled(4, value=value)
    assert all(gc.is_tracked(f) for f in futures)
    if isinstance(futures[2].result(), dict):
        futures[2].result()["future"] = futures  # the user's own result, made to lead back
    ref = weakref.ref(chunk)
    del chunk, futures
    assert _collected(ref)


@needs_the_extension
def test_a_later_run_of_outcomes_that_holds_more_hands_the_earlier_futures_back_too() -> None:
    chunk = MapChunk(0, 4, None, None)
    futures = chunk.futures()
    chunk._fill(0, [1, 2], {})
    assert not any(gc.is_tracked(f) for f in futures) and chunk._untracked is futures
    chunk._fill(2, [{"x": 1}, 4], {})
    assert all(gc.is_tracked(f) for f in futures) and chunk._untracked is None
    assert chunk._driver is None and chunk._hint is None  # (made without them here)


@needs_the_extension
def test_cancelled_tasks_and_outcomes_set_by_hand_hand_the_futures_back() -> None:
    chunk, futures = _settled(3, {2: TaskCancelled("gone")})
    assert all(gc.is_tracked(f) for f in futures)
    with pytest.raises(concurrent.futures.CancelledError):
        futures[2].result()

    chunk = MapChunk(0, 2, None, None)
    futures = chunk.futures()
    futures[0].set_result(futures)  # a value that leads back to every future of the chunk
    assert all(gc.is_tracked(f) for f in futures)
    futures[1].set_result(7)
    ref = weakref.ref(chunk)
    del chunk, futures
    assert _collected(ref)


@needs_the_extension
def test_futures_made_after_their_outcomes_came_follow_the_same_rule() -> None:
    # the driver may settle a chunk before the map's thread asks it for its futures
    chunk = MapChunk(0, 3, object(), object())
    chunk._fill(0, [1, 2, 3], {})
    futures = chunk.futures()
    assert not any(gc.is_tracked(f) for f in futures) and [f.result() for f in futures] == [1, 2, 3]
    assert chunk._untracked is None and chunk._driver is None and chunk._hint is None

    chunk = MapChunk(0, 3, None, None)
    chunk._fill(0, [1, 2, 3], {0: ValueError("boom")})
    futures = chunk.futures()
    assert all(gc.is_tracked(f) for f in futures)


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


class _Slotted:
    __slots__ = ("a", "b", "__weakref__")


@needs_the_extension
def test_slotted_reads_values_a_finalizer_empties_while_it_runs_from_its_own_copy() -> None:
    values: list[object] = [object() for _ in range(20_000)]
    originals = list(values)

    class Emptier:
        def __del__(self) -> None:
            values.clear()

    def garbage() -> None:
        emptier = Emptier()
        emptier.me = emptier  # type: ignore[attr-defined]  # only a collection frees it

    threshold, switch = gc.get_threshold(), sys.getswitchinterval()
    # Off until the call: another thread's allocations (a test's leftover thread, in a worker of
    # the parallel suite) could otherwise run the collection, and the finalizer, before it. They
    # count towards the threshold even while collections are off, so from the collection below to
    # the call no other thread may take the interpreter (one did once, in CI beside a busy
    # process: "slotted(): 0 values for 20000 objects"): this thread keeps it.
    gc.disable()
    sys.setswitchinterval(60.0)
    try:
        gc.collect()
        garbage()
        gc.set_threshold(100)  # a collection (and the finalizer) inside slotted's loop
        gc.enable()
        assert window._slotted is not None
        made = window._slotted(_Slotted, 20_000, _Slotted.a, 1, _Slotted.b, values)
    finally:
        sys.setswitchinterval(switch)
        gc.set_threshold(*threshold)
        gc.enable()
    assert not values, "the finalizer did not run during the call: the test proves nothing"
    assert [o.b for o in made] == originals


@needs_the_extension
@pytest.mark.parametrize("obj", [int, object, MapFuture, 5, "text", None])
def test_track_leaves_alone_what_the_collector_does_not_handle(obj: object) -> None:
    from zdq import _untracked

    _untracked.track(obj)
    _untracked.track_all([obj, obj])
    gc.collect()
    with pytest.raises(TypeError, match="needs a list"):
        _untracked.track_all((obj,))  # type: ignore[arg-type]


@needs_the_extension
def test_scalars_are_the_builtin_types_that_hold_no_reference() -> None:
    from zdq import _untracked

    assert _untracked.scalars([1, 2.5, 3j, "s", b"b", True, None]) and _untracked.scalars(())
    for other in ((1,), [1], {}, bytearray(1), frozenset(), object(), type("Int", (int,), {})(1)):
        assert not _untracked.scalars([1, other]), other


def _install(futures: list[MapFuture]) -> Any:
    """What concurrent.futures.wait does under its _AcquireFutures, in its order: take every
    future's condition, read every state, install a waiter on each (then release)."""
    for f in futures:
        f._condition.acquire()
    states = [f._state for f in futures]
    waiter = concurrent.futures._base._AllCompletedWaiter(len(futures), stop_on_exception=False)
    return states, waiter


def test_a_future_settled_between_its_states_read_and_its_waiters_install_tells_that_waiter() -> None:
    chunk = MapChunk(0, 3, None, None)
    futures = chunk.futures()
    states, waiter = _install(futures)
    assert states == ["PENDING"] * 3
    chunk._fill(0, [1, 2], {})  # the I/O thread, between the read and the install: it takes no lock of wait's
    for f in futures:
        f._waiters.append(waiter)
    assert [f.key for f in waiter.finished_futures] == [0, 1]  # told at their install, as read pending
    chunk._fill(2, [3], {})
    assert [f.key for f in waiter.finished_futures] == [0, 1, 2] and waiter.event.is_set()
    for f in futures:
        with f._condition:
            f._waiters.remove(waiter)


def test_a_future_read_done_is_not_told_again_at_its_waiters_install() -> None:
    # as_completed yields what it read done, then what its waiter is told: each once
    chunk = MapChunk(0, 3, None, None)
    futures = chunk.futures()
    chunk._fill(0, [1], {})
    states, waiter = _install(futures)
    assert states == ["FINISHED", "PENDING", "PENDING"]
    for f in futures:
        f._waiters.append(waiter)
    assert waiter.finished_futures == []
    chunk._fill(1, [2, 3], {1: ValueError("boom")})
    assert [f.key for f in waiter.finished_futures] == [1, 2]
    # a later wait of the same thread reads afresh: what it reads done is not told either
    states, again = _install(futures)
    assert states == ["FINISHED"] * 3
    for f in futures:
        f._waiters.append(again)
    assert again.finished_futures == []


def test_taking_a_map_futures_condition_holds_no_lock_of_its_chunk() -> None:
    chunk = MapChunk(0, 2, None, None)
    futures = chunk.futures()
    assert futures[0]._condition.acquire()  # and never released (a KeyboardInterrupt in wait)
    assert chunk._condition.acquire(blocking=False)  # the chunk's own lock is free
    chunk._condition.release()
    chunk._fill(0, [1, 2], {})
    assert [f.result() for f in futures] == [1, 2]


@needs_the_extension
def test_a_collection_during_slotted_never_sees_a_list_with_missing_items() -> None:
    # each allocation may run a collection, and gc.callbacks or finalizers may look at every list:
    # the list is made once its items exist (a list of missing items crashed the interpreter here)
    n, seen = 5_000, []

    def look(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            for o in gc.get_objects(generation=0):
                if type(o) is list and len(o) == n and o and type(o[0]) is MapFuture:
                    seen.append(all(type(x) is MapFuture for x in o))  # a NULL item crashes here

    threshold = gc.get_threshold()
    gc.set_threshold(50)
    gc.callbacks.append(look)
    try:
        futures = MapChunk(0, n, None, None).futures()
    finally:
        gc.callbacks.remove(look)
        gc.set_threshold(*threshold)
    assert len(futures) == n and all(seen)


def test_a_waits_second_read_of_the_states_gives_its_first_so_its_waiter_counts_right() -> None:
    # wait() reads every state for its done set, then again to count its waiter's calls; with no
    # lock taken, a future settling between the two reads must not be counted neither way
    chunk = MapChunk(0, 3, None, None)
    futures = chunk.futures()
    for f in futures:
        f._condition.acquire()
    first = [f._state for f in futures]
    chunk._fill(0, [1], {})
    second = [f._state for f in futures]
    assert first == second == ["PENDING"] * 3
    waiter = concurrent.futures._base._AllCompletedWaiter(second.count("PENDING"), stop_on_exception=False)
    for f in futures:
        f._waiters.append(waiter)
    assert [f.key for f in waiter.finished_futures] == [0] and not waiter.event.is_set()
    chunk._fill(1, [2, 3], {})
    assert waiter.event.is_set() and sorted(f.key for f in waiter.finished_futures) == [0, 1, 2]
    for f in futures:
        f._condition.release()
    assert [f._state for f in futures] == ["FINISHED"] * 3  # read afresh once the wait let go
