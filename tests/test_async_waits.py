"""Awaiting zdq futures learns, as ``result()`` does, that a pool cannot do them: ``await future``
and ``async for`` over ``zdq.as_completed`` raise the pool's error (``NoEligibleWorkers``...)
instead of waiting for ever, and leave the futures pending. An event loop needs a socket pair,
so these are not in the unit tier; no cluster: the pool's answer is a :class:`WaitHint`."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest

import zdq
from zdq import futures
from zdq.errors import NoEligibleWorkers, ZdqTimeoutError
from zdq.futures import TaskFuture, WaitHint


@pytest.fixture(autouse=True)
def _quick_looks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(futures, "_LOOK_EVERY", 0.02)
    monkeypatch.setattr(futures, "_LOOK_AT_MOST", 0.05)


def _stuck_future(asked: list[object] | None = None) -> TaskFuture:
    fut = TaskFuture(1)

    def stuck(f: object) -> NoEligibleWorkers:
        if asked is not None:
            asked.append(f)
        return NoEligibleWorkers("queue q-2 is served by no consumer")

    fut._hint = WaitHint(lambda: "", stuck)
    return fut


def _run(coro: object, bound: float = 20.0) -> object:
    async def bounded() -> object:
        return await asyncio.wait_for(coro, bound)  # type: ignore[arg-type]

    return asyncio.run(bounded())


def test_await_raises_the_pools_error_and_leaves_the_future_pending_for_a_later_await() -> None:
    asked: list[object] = []
    fut = _stuck_future(asked)
    with pytest.raises(NoEligibleWorkers, match="q-2"):
        _run(_awaiting(fut))
    assert asked and all(f is fut or f is None for f in asked), asked  # None: the pool's verdict, for all
    assert not fut.done() and not fut.cancelled()  # the await ended; the task was not cancelled

    async def later() -> int:
        asyncio.get_running_loop().call_later(0.01, fut.set_result, 7)
        return await fut

    fut._hint = WaitHint(lambda: "", lambda f: None)  # the pool can run it again
    assert _run(later()) == 7


async def _awaiting(fut: TaskFuture) -> object:
    return await fut


def test_an_await_whose_pool_can_do_it_waits_on_and_stops_asking_once_it_has_its_result() -> None:
    asked: list[float] = []
    fut = TaskFuture(1)
    fut._hint = WaitHint(lambda: "", lambda f: asked.append(time.monotonic()))  # type: ignore[func-returns-value]

    async def main() -> int:
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, fut.set_result, 5)
        value = await fut
        await asyncio.sleep(0.1)  # a look already on the executor when the result came ends
        seen = len(asked)
        await asyncio.sleep(0.15)  # its timer was cancelled with the await: no more looks
        assert len(asked) == seen, "the pool was still asked after the await had its result"
        return value

    assert _run(main()) == 5
    assert len(asked) >= 3, f"the pool was asked {len(asked)} times in 0.2 s at a 0.02 s step"


def test_cancelling_an_await_still_cancels_the_future() -> None:
    fut = TaskFuture(1)
    fut._hint = WaitHint(lambda: "", lambda f: None)
    cancelled = threading.Event()
    fut.cancel = cancelled.set  # type: ignore[method-assign]  # what a pool's future asks its driver

    async def main() -> None:
        waiting = asyncio.ensure_future(_awaiting(fut))
        await asyncio.sleep(0.05)  # past two looks
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    _run(main())
    assert cancelled.wait(10), "cancelling the coroutine that awaited the future did not cancel it"


def test_async_for_over_as_completed_raises_the_pools_error_after_the_futures_that_are_done() -> None:
    stuck = _stuck_future()
    done = TaskFuture(2)
    done.set_result(5)

    async def main() -> list[object]:
        seen = []
        async for f in zdq.as_completed([done, stuck]):
            seen.append(f)
        return seen

    with pytest.raises(NoEligibleWorkers, match="q-2"):
        _run(main())
    assert not stuck.done()


def test_async_for_over_as_completed_keeps_its_timeout_and_yields_what_completes_meanwhile() -> None:
    fut = TaskFuture(1)
    fut._hint = WaitHint(lambda: "", lambda f: None)
    late = TaskFuture(2)

    async def main() -> list[object]:
        asyncio.get_running_loop().call_later(0.1, fut.set_result, 1)
        seen = []
        async for f in zdq.as_completed([fut, late], timeout=0.4):
            seen.append(f)
        return seen

    started = time.monotonic()
    with pytest.raises(ZdqTimeoutError, match="1 of 2 futures did not complete within 0.4s"):
        _run(main())
    assert 0.35 < time.monotonic() - started < 10


def test_every_await_of_many_is_asked_about_in_turn_and_only_the_stuck_one_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """A look asks awaits one by one for at most _LOOK_BUDGET (here: one a look), the longest
    waiting first, each then to the back of the line: the one stuck await among many is reached,
    and the others wait on."""
    monkeypatch.setattr(futures, "_LOOK_BUDGET", 0.0)
    waiting = [TaskFuture(i) for i in range(60)]
    last = waiting[-1]
    for fut in waiting:
        fut._hint = WaitHint(lambda: "", lambda f: NoEligibleWorkers("queue q-9 is served by none") if f is last else None)

    async def main() -> list[object]:
        tasks = [asyncio.ensure_future(_awaiting(f)) for f in waiting]
        done, _ = await asyncio.wait(tasks, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        outcome = [t.exception() for t in done]
        for fut in waiting:
            if not fut.done():
                fut.set_result(0)  # the others get their results: their awaits end as usual
        await asyncio.wait(tasks, timeout=5)
        return outcome + [t.result() for t in tasks[:-1]]

    got = _run(main())
    assert isinstance(got[0], NoEligibleWorkers) and "q-9" in str(got[0]), got[0]
    assert got[1:] == [0] * 59


def test_a_pool_that_can_do_none_of_its_futures_ends_every_await_of_them_at_the_first_look() -> None:
    """Found by a review: 3,000 awaits on a pool left without consumers ended over 13 s (256 asked
    a second). The pool's own verdict (stuck(None)) ends them all at once."""
    asked: list[object] = []

    def stuck(f: object) -> NoEligibleWorkers | None:
        asked.append(f)
        return NoEligibleWorkers("no worker satisfies workers=['g']") if f is None else None

    hint = WaitHint(lambda: "", stuck)
    waiting = [TaskFuture(i) for i in range(3000)]
    for fut in waiting:
        fut._hint = hint

    async def main() -> list[BaseException | None]:
        tasks = [asyncio.ensure_future(_awaiting(f)) for f in waiting]
        done, _ = await asyncio.wait(tasks, timeout=5)
        assert len(done) == len(tasks), f"{len(done)} of {len(tasks)} awaits ended"
        return [t.exception() for t in tasks]

    errors = _run(main())
    assert all(isinstance(e, NoEligibleWorkers) for e in errors)
    assert asked.count(None) <= 2, "the pool's verdict is asked once a look, not once a future"
    assert not any(f.done() for f in waiting)


def test_a_look_does_not_wait_behind_the_applications_calls_in_the_loops_executor() -> None:
    """Found by a review: with the loop's default executor busy with the application's blocking
    calls, the stuck error came only when one of them ended (20 s)."""
    fut = _stuck_future()

    async def main() -> float:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(1))
        blocking = loop.run_in_executor(None, time.sleep, 2)  # the executor's only thread, busy
        started = time.monotonic()
        with pytest.raises(NoEligibleWorkers):
            await fut
        took = time.monotonic() - started
        await blocking
        return took

    assert _run(main()) < 1.0  # a look every 0.02 s here; behind the blocking call: 2 s


def test_a_closed_loop_is_not_kept_by_the_awaits_it_looked_after() -> None:
    """Found by a review: every asyncio.run() that awaited a pending zdq future kept its closed
    loop (the entry's value held its key), also while the future stays pending after."""
    import gc
    import weakref

    loops = []
    pending = []

    async def awaiting(fut: TaskFuture) -> object:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        return await fut

    for _ in range(5):
        fut = _stuck_future()
        pending.append(fut)  # still pending after its await ended
        with pytest.raises(NoEligibleWorkers):
            _run(awaiting(fut))
    deadline = time.monotonic() + 10
    while any(t.name == "zdq-await-look" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)  # a look that posted its answer ends
    gc.collect()
    kept = [ref() for ref in loops if ref() is not None]
    assert not kept, f"{len(kept)} of 5 closed loops are still kept"
    assert not any(f.done() for f in pending)
