"""Executor.map in slices (one chunked batch per slice) on a real cluster: Python 3.14's contract.

Results in order, a task's error at its position after the results before it in its slice, at
most ``buffersize`` tasks unfinished with the iterable read lazily, and what is left cancelled
(the tasks do not run: each notes in a file that it ran) when the iterator is closed or the
executor is shut down with ``cancel_futures``. One pool of 2 consumers for the module, chunks of
8 tasks (so that slices hold several tasks).
"""

from __future__ import annotations

import concurrent.futures
import gc
import itertools
import os
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client, LocalCluster

import zdq
from zdq import ConsumerPool, QueuePool

from .conftest import wait_until
from .executor_tasks import nap_noted, square, square_unless

pytestmark = pytest.mark.cluster

CHUNK = 8
#: The cancelled maps: long enough (5 s of work for the 2 consumers) that most of it is left when
#: it is cancelled; a consumer reports a chunk's results together, so the first result comes
#: once a chunk (and what the other consumer ran meanwhile) is done.
N_NAPS, NAP = 200, 0.05


@pytest.fixture(scope="module")
def pool(cluster: LocalCluster) -> Iterator[QueuePool]:
    with (
        Client(cluster) as client,
        QueuePool(client, 2, keep_results=False, chunk_size=CHUNK) as queue_pool,
        ConsumerPool(client, queue_pool, n_consumers=2, start=True),
    ):
        yield queue_pool


def _ran(dirpath: Path) -> set[int]:
    return {int(name) for name in os.listdir(dirpath)}


def test_results_come_in_order_and_an_error_is_raised_at_its_position_after_those_of_its_slice(pool: QueuePool) -> None:
    executor = pool.executor()
    assert list(executor.map(square, range(100), timeout=60)) == [i * i for i in range(100)]
    # Item 21 is in the middle of a slice of 8: the results before it are yielded first.
    results = executor.map(square_unless, range(50), itertools.repeat(21), timeout=60)
    assert [next(results) for _ in range(21)] == [i * i for i in range(21)]
    with pytest.raises(KeyError, match="item 21"):
        next(results)
    with pytest.raises(StopIteration):
        next(results)
    with pytest.raises(TypeError, match="needs a callable"):
        executor.map(5, range(3))  # type: ignore[arg-type]
    executor.shutdown(wait=True)


def test_with_buffersize_at_most_buffersize_tasks_are_unfinished_and_an_endless_iterable_is_read_lazily(
    pool: QueuePool,
) -> None:
    executor = pool.executor()
    driver = pool.driver
    read = [0]

    def endless() -> Iterator[int]:
        for i in itertools.count():
            read[0] += 1
            yield i

    buffersize = 4 * CHUNK
    results = executor.map(square, endless(), buffersize=buffersize, timeout=120)
    most = overs = 0
    for taken, value in enumerate(itertools.islice(results, 1000), 1):
        assert value == (taken - 1) ** 2
        outstanding = driver.outstanding
        most = max(most, outstanding)
        # The driver counts a chunk until just after its futures are settled: a result read in
        # that moment lets the next slice go while the chunk settled is still counted (a slice
        # goes in two chunks, one per consumer). Rarely, and by at most that chunk.
        assert outstanding <= buffersize + CHUNK // 2
        overs += outstanding > buffersize
        # Read ahead of the results taken by the buffer, and the slice whose results are in hand.
        assert read[0] <= taken + buffersize + CHUNK
    assert most > CHUNK  # several slices were in flight at once
    assert overs <= 20, f"{overs} of 1,000 reads found more than buffersize tasks unfinished"
    results.close()  # type: ignore[attr-defined]
    wait_until(lambda: driver.outstanding == 0, timeout=30)
    executor.shutdown(wait=True)


def test_with_buffersize_a_slice_is_a_fourth_of_the_buffer_in_chunks_spread_over_the_consumers(
    pool: QueuePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slice of one chunk cost a submission, a PUT and a wake of the broker and of a consumer for
    # each chunk (the no-op map ran at 0.84 of the rate): a slice holds a fourth of the buffer.
    executor = pool.executor()
    slices: list[tuple[int, int]] = []
    map_slice = pool.map_slice

    def counted(fn: Any, calls: Any, chunk: int, **kwargs: Any) -> Any:
        slices.append((len(calls), chunk))
        return map_slice(fn, calls, chunk, **kwargs)

    monkeypatch.setattr(pool, "map_slice", counted)
    buffersize = 20 * CHUNK
    n = 1000
    assert list(executor.map(square, range(n), buffersize=buffersize, timeout=120)) == [i * i for i in range(n)]
    sizes = [size for size, _ in slices]
    assert sum(sizes) == n
    assert set(sizes[:-1]) == {buffersize // 4}
    assert {chunk for _, chunk in slices} == {pool.map_chunk_size(buffersize // 4)}
    assert pool.map_chunk_size(buffersize // 4) < buffersize // 4  # several chunks a slice, for the consumers to share
    executor.shutdown(wait=True)


def test_a_temporary_executors_map_maps_every_item_and_lets_the_executor_go_at_its_end(pool: QueuePool) -> None:
    # Held weakly, the executor of `pool.executor().map(...)` was collected at a refill that
    # found no task in flight: the map stopped there with RuntimeError (reviewer 20).
    executor = pool.executor()
    gone = weakref.ref(executor)
    results = executor.map(square, range(300), buffersize=8, timeout=120)
    del executor
    got = []
    for value in results:
        got.append(value)
        if len(got) % 25 == 0 and len(got) < 300 - 8 - 2:
            gc.collect()
            assert gone() is not None  # the map still reads its items: it holds its executor
    assert got == [i * i for i in range(300)]
    # Read to its end, the map holds it no longer: it goes once its last slice's done-callback
    # (on the pool's callback thread) says no work is in flight.
    wait_until(lambda: gc.collect() >= 0 and gone() is None, timeout=30)
    assert [v for v in pool.executor().map(square, range(100), buffersize=3, timeout=120)] == [i * i for i in range(100)]


def test_closing_the_iterator_cancels_the_tasks_left_and_they_do_not_run(pool: QueuePool, tmp_path: Path) -> None:
    executor = pool.executor()
    results = executor.map(nap_noted, itertools.repeat(str(tmp_path)), range(N_NAPS), itertools.repeat(NAP), timeout=60)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    results.close()  # type: ignore[attr-defined]
    wait_until(lambda: pool.driver.outstanding == 0, timeout=30)
    ran = _ran(tmp_path)
    time.sleep(0.5)  # nothing cancelled runs later
    assert _ran(tmp_path) == ran
    assert len(ran) < N_NAPS // 2, f"{len(ran)} of {N_NAPS} tasks ran although the map was closed after 3 results"
    executor.shutdown(wait=True)


def test_shutdown_cancel_futures_during_a_map_cancels_what_has_not_started(pool: QueuePool, tmp_path: Path) -> None:
    executor = pool.executor()
    results = executor.map(nap_noted, itertools.repeat(str(tmp_path)), range(N_NAPS), itertools.repeat(NAP), timeout=60)
    assert next(results) == 0
    start = time.monotonic()
    executor.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - start < 20
    taken = [0]
    with pytest.raises(concurrent.futures.CancelledError):
        taken.extend(results)
    assert taken == list(range(len(taken)))  # those done before the shutdown, in order
    ran = _ran(tmp_path)
    time.sleep(0.5)  # nothing cancelled runs later
    assert _ran(tmp_path) == ran
    assert len(ran) < N_NAPS // 2, f"{len(ran)} of {N_NAPS} tasks ran although the executor was shut down with cancel_futures"
    assert not pool.closed
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.map(square, range(3))


def test_a_map_holding_futures_among_its_items_runs_each_call_once_its_inputs_are_done(pool: QueuePool) -> None:
    firsts = [pool.submit(square, i) for i in range(3)]
    with pool.executor() as executor:
        assert list(executor.map(pow, firsts, range(3), timeout=60)) == [1, 1, 16]


def test_a_map_read_by_columns_gives_the_calls_of_zip_with_and_without_buffersize(pool: QueuePool) -> None:
    # Its items go by the columns of their arguments (no tuple per call): as many calls as the
    # shortest iterable has items, each with its own arguments, in order; a generator is read
    # no further than zip() reads it.
    read = [0]

    def counted(n: int) -> Iterator[int]:
        for i in range(n):
            read[0] += 1
            yield i

    with pool.executor() as executor:
        for buffersize in (None, 16):
            expected = [i**2 % 1000 for i in range(30)]
            assert list(executor.map(pow, range(40), [2] * 30, tuple([1000] * 35), buffersize=buffersize, timeout=60)) == expected
            assert list(executor.map(pow, list(range(5)), (3, 3, 3), buffersize=buffersize, timeout=60)) == [0, 1, 8]
            read[0] = 0
            assert list(executor.map(square, counted(21), buffersize=buffersize, timeout=60)) == [i * i for i in range(21)]
            assert read[0] == 21
            # Futures among a list's items: those calls wait for their inputs, as submit's do.
            firsts: list[Any] = [pool.submit(square, i) for i in range(3)] + [5] * 9
            assert list(executor.map(pow, firsts, [2] * 12, buffersize=buffersize, timeout=60)) == [0, 1, 16] + [25] * 9


def test_a_maps_future_waits_through_its_chunk_siblings_results_for_its_own() -> None:
    from zdq.client.window import map_futures

    first, second = map_futures(0, 2, None, None)
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(first.result(timeout=30)))
    waiter.start()
    time.sleep(0.2)
    second.set_result("not mine")  # wakes the shared condition: the waiter must not return
    time.sleep(0.2)
    assert not got and waiter.is_alive()
    first.set_result("mine")
    waiter.join(timeout=30)
    assert got == ["mine"]


def test_threads_waiting_on_futures_of_the_same_two_chunks_in_crossed_orders_do_not_hang() -> None:
    """``concurrent.futures.wait`` takes each future's ``_condition`` in ``id()`` order: with a
    chunk's shared lock as every future's, two threads took two chunks' locks crosswise and hung,
    and the driver's I/O thread behind them (reviewer 15). A map future's ``_condition`` takes nothing."""
    import sys

    from zdq.client.window import MapChunk

    a, b = MapChunk(0, 500, None, None).futures(), MapChunk(500, 500, None, None).futures()
    crossed = ([min(a, key=id), max(b, key=id)], [min(b, key=id), max(a, key=id)])
    rounds, stop = [0, 0], threading.Event()

    def waits(n: int) -> None:
        while not stop.is_set():
            concurrent.futures.wait(crossed[n], timeout=0)
            rounds[n] += 1

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    threads = [threading.Thread(target=waits, args=(n,), daemon=True) for n in (0, 1)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.5)
    finally:
        stop.set()
        sys.setswitchinterval(switch)
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads), f"the waits hung (rounds {rounds})"
    assert min(rounds) > 100
    a[0]._chunk._fill(0, list(range(500)), {})  # the chunks' own lock is free: the I/O thread's fill goes on
    assert concurrent.futures.wait(a, timeout=5).not_done == set()


def test_a_thread_holding_a_map_futures_condition_does_not_stop_its_chunks_outcomes() -> None:
    """A ``KeyboardInterrupt`` inside ``wait``'s taking of the conditions left them held, and the
    driver's I/O thread waited for ever on the next outcome of the chunk (reviewer 15)."""
    from zdq.client.window import MapChunk

    chunk = MapChunk(0, 3, None, None)
    futures = chunk.futures()
    futures[0]._condition.acquire()  # and never released
    filled = threading.Thread(target=chunk._fill, args=(0, [1, 2, 3], {}))
    filled.start()
    filled.join(timeout=10)
    assert not filled.is_alive() and [f.result(timeout=5) for f in futures] == [1, 2, 3]


def test_queue_pool_map_gives_a_future_per_call_in_order_and_cancels_by_them(pool: QueuePool, tmp_path: Path) -> None:
    futures = pool.map(square, range(50))
    assert len(futures) == 50 and zdq.gather(futures, timeout=60) == [i * i for i in range(50)]
    failed = pool.map(square_unless, range(20), [7] * 20)
    with pytest.raises(KeyError, match="item 7"):
        failed[7].result(timeout=60)
    assert failed[8].result(timeout=60) == 64
    naps = pool.map(nap_noted, [str(tmp_path)] * N_NAPS, range(N_NAPS), [NAP] * N_NAPS)
    naps[0].result(timeout=60)
    assert naps[-1].cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        naps[-1].result(timeout=5)
    from zdq.client.window import cancel_many

    cancel_many(naps)
    wait_until(lambda: pool.driver.outstanding == 0, timeout=30)
    assert len(_ran(tmp_path)) < N_NAPS // 2


def test_queue_pool_maps_futures_keep_the_futures_contract_on_a_real_pool(pool: QueuePool, tmp_path: Path) -> None:
    futures = pool.map(square, range(20))
    seen: list[Any] = []
    futures[3].add_done_callback(seen.append)  # most likely before its result: run on the callback thread
    done, not_done = concurrent.futures.wait(futures, timeout=60)
    assert not not_done and len(done) == 20
    assert sorted(f.result() for f in concurrent.futures.as_completed(futures, timeout=60)) == [i * i for i in range(20)]
    assert sorted(f.result() for f in zdq.as_completed(futures, timeout=60)) == [i * i for i in range(20)]
    wait_until(lambda: seen == [futures[3]], timeout=30)
    # As arguments of another submission (held until they are done), and of another map.
    assert pool.submit(pow, futures[2], 2).result(timeout=60) == 16
    assert zdq.gather(pool.map(pow, futures[:4], [2] * 4), timeout=60) == [i**4 for i in range(4)]
    naps = pool.map(nap_noted, [str(tmp_path)] * N_NAPS, range(N_NAPS), [NAP] * N_NAPS)
    waiting = naps[-20:]
    first = concurrent.futures.wait(waiting, timeout=0.01, return_when=concurrent.futures.FIRST_COMPLETED)
    assert not first.done  # nothing done yet: their waiters were installed, then removed
    assert naps[-1].cancel() and naps[-1].cancelled() and naps[-1].done()
    done, _ = concurrent.futures.wait(waiting, timeout=60, return_when=concurrent.futures.FIRST_COMPLETED)
    assert naps[-1] in done
    with pytest.raises(concurrent.futures.CancelledError):
        naps[-1].exception(timeout=1)
    from zdq.client.window import cancel_many

    cancel_many(naps)
    wait_until(lambda: pool.driver.outstanding == 0, timeout=30)


def test_a_map_of_no_iterable_or_an_empty_one_gives_nothing(pool: QueuePool) -> None:
    with pool.executor() as executor:
        assert list(executor.map(square)) == []
        assert list(executor.map(square, [], buffersize=3)) == []
        assert list(executor.map(square, range(5), chunksize=2, buffersize=1)) == [i * i for i in range(5)]


def test_queue_pool_map_refuses_no_iterable_and_one_tasks_options_at_the_call(pool: QueuePool) -> None:
    """Dask's client.map needs an iterable: without one, zdq's read ``zip(repeat(fn))`` for ever
    (memory growing, the call never returning). ``unique_key``/``unique_for`` are one task's."""
    started = time.monotonic()
    with pytest.raises(TypeError, match="at least one iterable"):
        pool.map(square)
    for option in ("unique_key", "unique_for"):
        with pytest.raises(TypeError, match="unique_key and unique_for make one task unique"):
            pool.map(square, range(3), **{option: "k" if option == "unique_key" else 5})
    with pytest.raises(TypeError, match=r"map\(\) needs a callable or a task name"):
        pool.map(5, [1])  # type: ignore[arg-type]  # was: "batch_submit item 0 must be a tuple"
    assert time.monotonic() - started < 5
    assert [f.result(timeout=30) for f in pool.map(square, range(3))] == [0, 1, 4]


def test_queue_pool_map_over_lists_tuples_and_ranges_gives_each_result_in_order(pool: QueuePool) -> None:
    # Taken by slices of the iterables (no tuple per call), in chunks of 8 and a last shorter one.
    assert zdq.gather(pool.map(square, range(3, 53)), timeout=60) == [i * i for i in range(3, 53)]
    assert zdq.gather(pool.map(square, list(range(21))), timeout=60) == [i * i for i in range(21)]
    assert zdq.gather(pool.map(square, tuple(range(19)), delay=0.05, priority=2), timeout=60) == [i * i for i in range(19)]
    # Several iterables of unequal lengths: as many calls as the shortest has items, as zip().
    futures = pool.map(pow, range(40), [2] * 30, tuple([1000] * 35))
    assert zdq.gather(futures, timeout=60) == [i * i % 1000 for i in range(30)]
    assert zdq.gather(pool.map(pow, range(5), (3, 3, 3)), timeout=60) == [0, 1, 8]  # fewer than 8: as tuples
    # kwargs go to every call (a partial of fn); a task's error stays at its position.
    assert zdq.gather(pool.map(pow, list(range(20)), [3] * 20, mod=7), timeout=60) == [i**3 % 7 for i in range(20)]
    failed = pool.map(square_unless, range(20), [11] * 20)
    with pytest.raises(KeyError, match="item 11"):
        failed[11].result(timeout=60)
    assert [f.result(timeout=60) for f in failed[:11]] == [i * i for i in range(11)]
    assert pool.map(square, []) == [] and pool.map(square, range(0), [1]) == []


def test_queue_pool_map_of_an_unpicklable_item_names_it_and_cancels_what_it_queued(
    pool: QueuePool, tmp_path: Path
) -> None:
    dirs: list[Any] = [str(tmp_path)] * N_NAPS
    dirs[150] = threading.Lock()
    with pytest.raises(zdq.SerializationError, match=r"^item 150\b") as raised:
        pool.map(nap_noted, dirs, range(N_NAPS), [NAP] * N_NAPS)
    assert "(the 144 tasks map() queued before this chunk are cancelled)" in str(raised.value)  # chunks of 8
    assert raised.value.queued == 0
    assert any("map() cancelled the 144 tasks" in note for note in raised.value.__notes__)
    wait_until(lambda: pool.driver.outstanding == 0, timeout=30)
    ran = _ran(tmp_path)
    assert len(ran) < 100 and not ran & set(range(144, N_NAPS)), sorted(ran)


def _read_catching(futures: list[Any]) -> list[Any]:
    out = []
    for f in futures:
        try:
            out.append(f.result(timeout=60))
        except KeyError as e:  # the error's traceback holds this frame, which holds every future
            out.append(e)
    return out


def test_a_maps_chunks_are_freed_once_read_whatever_their_outcomes(pool: QueuePool) -> None:
    # The futures are untracked by the collector where zdq._untracked was built: a chunk with an
    # error or other than scalars hands them back, one of scalars holds nothing of anyone's.
    import gc
    import weakref

    def mapped(fn: Any, *its: Any) -> list[weakref.ref[Any]]:
        futures = pool.map(fn, *its)
        chunks = {id(f._chunk): weakref.ref(f._chunk) for f in futures}
        values = _read_catching(futures)
        assert len(values) == len(futures) and all(f.done() for f in futures)
        return list(chunks.values())

    refs = mapped(square_unless, range(40), [11] * 40) + mapped(square, range(40)) + mapped(repr, range(40))
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert not alive, f"{len(alive)} of {len(refs)} chunks outlived their futures: {alive[:3]}"

