"""Chunks of calls that share one function, packed by columns (SHARED, zdq.codec.tasks) and run
with ``map`` by blocks (zdq.consumer.runner.Runner._run_shared): what they decode to, what a
forged one raises, and how a running one takes failures and cancellations. Pure, no cluster."""

from __future__ import annotations

import pickle
import threading
from typing import Any

import pytest

from zdq.codec.chunking import Chunking
from zdq.codec.results import loads_results, unseal
from zdq.codec.tasks import (
    CALLS,
    SHARED,
    TASKS,
    SharedCalls,
    TaskOptions,
    cancel_in_chunk,
    check_calls,
    dumps_chunk,
    dumps_shared,
    is_cancelled,
    loads_chunk,
    split_chunk,
)
from zdq.consumer.base import ConsumerBaseClass
from zdq.consumer.runner import Counters, Runner
from zdq.errors import ProtocolError, SerializationError
from zdq.transport import protocol as p

from ..tasks import add

KEY = b"k" * 32
CHUNKING = Chunking(chunk_size=1000, chunk_bytes=4 << 20, max_bytes=256 << 20, prefetch=2)


def _packed(base: int, calls: list[tuple[Any, ...]], key: bytes | None = KEY, size: int = 1000) -> list[bytes]:
    """``calls`` packed as batch_submit packs them."""
    return [payload for _, _, payload in CHUNKING.pack_batch(base, calls, size, key, CALLS, None, check_calls(calls))]


def _kind_on_the_wire(payload: bytes) -> int:
    return int(pickle.loads(unseal(KEY, payload))[1])


# -- the codec -------------------------------------------------------------------------------------
def test_calls_that_share_their_function_go_by_columns_and_decode_to_the_same_calls() -> None:
    calls = [(add, i, 2 * i) for i in range(20)]
    shared = check_calls(calls)
    assert shared is add
    [payload] = _packed(40, calls)
    assert _kind_on_the_wire(payload) == SHARED
    base, kind, entries, options = loads_chunk(payload, KEY)
    assert (base, kind, entries, options) == (40, CALLS, calls, None)
    assert type(entries) is SharedCalls and entries.fn is add and entries.columns == [list(range(20)), list(range(0, 40, 2))]


@pytest.mark.parametrize(
    "calls",
    [
        [(add, 1), (divmod, 7, 2)] * 8,  # two functions
        [(add, 1), (add, 1, 2)] * 8,  # two lengths
        [(add, 1)] * 7,  # too few to be worth it
        [(add, *range(9))] * 8,  # too many arguments
    ],
    ids=["functions", "lengths", "few", "wide"],
)
def test_other_calls_go_as_tuples(calls: list[tuple[Any, ...]]) -> None:
    [payload] = _packed(0, calls)
    assert _kind_on_the_wire(payload) == CALLS
    assert loads_chunk(payload, KEY) == (0, CALLS, calls, None)


def test_check_calls_names_the_shared_function_only_when_every_call_has_the_same_object() -> None:
    class LiesEqual:
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = object.__hash__

        def __call__(self, *args: Any) -> None:
            return None

    assert check_calls([(add, 1), (add, 2)]) is add
    assert check_calls([(add, 1), (LiesEqual(), 2)]) is None  # its __eq__ is never asked
    assert check_calls([("tests.tasks:add", 1)]) is None  # by name: the loop's verdict
    with pytest.raises(TypeError, match="item 1"):
        check_calls([(add, 1), (3, 2)])


def test_a_shared_chunk_splits_and_is_rewritten_as_any_chunk_of_calls() -> None:
    calls = [(add, i) for i in range(10)]
    chunk = loads_chunk(dumps_shared(5, add, 10, [list(range(10))]))
    parts = [loads_chunk(part) for part in split_chunk(chunk, None)]
    assert parts == [(5 + i, CALLS, [c], None) for i, c in enumerate(calls)]
    rewritten = loads_chunk(cancel_in_chunk(dumps_shared(5, add, 10, [list(range(10))], KEY), KEY, [3]), KEY)
    assert rewritten[1] == TASKS and [is_cancelled(e) for e in rewritten[2]] == [i == 3 for i in range(10)]
    assert [e for i, e in enumerate(rewritten[2]) if i != 3] == [(add, (i,)) for i in range(10) if i != 3]


@pytest.mark.parametrize(
    "entries",
    [
        [add, 2, [[1, 2]]],  # a list, not a tuple
        (add, 2),  # two fields
        (add, 3, [[1, 2]]),  # a column shorter than n
        (add, -1, []),  # a negative count
        (add, 2, [(1, 2)]),  # a column that is not a list
        (add, 2, [[1, 2]] * 9),  # more columns than calls may have arguments
    ],
)
def test_a_forged_shared_chunk_is_a_protocol_error(entries: Any) -> None:
    with pytest.raises(ProtocolError):
        loads_chunk(pickle.dumps((0, SHARED, entries, None)))


def test_a_batch_is_cut_into_shared_chunks_from_its_columns_and_a_large_one_in_halves() -> None:
    calls = [(add, i, -i) for i in range(25)]
    chunks = [loads_chunk(payload, KEY) for payload in _packed(100, calls, size=10)]
    assert [(base, len(entries)) for base, _, entries, _ in chunks] == [(100, 10), (110, 10), (120, 5)]
    assert [e for _, _, entries, _ in chunks for e in entries] == calls
    small = Chunking(chunk_size=1000, chunk_bytes=200, max_bytes=256 << 20, prefetch=2)
    packed = small.pack_batch(0, calls, 25, KEY, CALLS, None, add)
    assert len(packed) > 1 and [e for *_, payload in packed for e in loads_chunk(payload, KEY)[2]] == calls


def test_a_shared_batch_that_cannot_be_pickled_names_the_task() -> None:
    calls = [(add, i) for i in range(20)]
    calls[13] = (add, threading.Lock())
    with pytest.raises(SerializationError, match="argument 0") as raised:
        _packed(7, calls, size=5)
    assert raised.value.task_id == 20


# -- the runner ------------------------------------------------------------------------------------
class Calls(ConsumerBaseClass):
    """Runs calls only."""

    def process_item(self, item: object) -> object:
        raise AssertionError("no items here")


def _runner(sent: list[tuple[int, p.Message]]) -> Runner:
    fetching = threading.Event()
    fetching.set()
    return Runner(
        "c", Calls(name="c"), lambda broker, msg: sent.append((broker, msg)), threading.Event(), fetching,
        Counters(), max_concurrency=1, defaults=TaskOptions(), crash_attempts=3, payload_key=None, queues=["q0"],
    )


def _run(runner: Runner, sent: list[tuple[int, p.Message]], chunk_id: int, calls: list[tuple[Any, ...]]) -> tuple[list[Any], dict[int, Any]]:
    runner.received(chunk_id, 0)
    [payload] = _packed(0, calls, None)
    runner.execute(0, p.Deliver(chunk_id, len(calls), 1, payload))
    broker, done = sent.pop()
    assert isinstance(done, p.Done) and done.chunk_id == chunk_id
    _, values, errors = loads_results(done.results)
    return values, errors


def _fails_at(x: int) -> int:
    if x in (0, 5, 6, 99):
        raise ValueError(f"no {x}")
    return x * 10


def test_a_shared_chunk_runs_every_call_and_a_failing_one_fails_alone() -> None:
    sent: list[tuple[int, p.Message]] = []
    runner = _runner(sent)
    for chunk_id in (1, 2):  # the first runs by growing blocks; the second in one
        values, errors = _run(runner, sent, chunk_id, [(_fails_at, x) for x in range(100)])
        assert sorted(errors) == [0, 5, 6, 99] and "no 5" in errors[5].message
        assert [v for i, v in enumerate(values) if i not in errors] == [x * 10 for x in range(100) if x not in (0, 5, 6, 99)]


#: What the calls below reach while they run: the runner, what they ran, what cancel answered.
#: (Module-level: a chunk's function is pickled by reference.)
_NOW: dict[str, Any] = {}


def _cancelling_early(x: int) -> int:
    _NOW["ran"].append(x)
    if x == 0:  # the first block is one task: every other task is after it
        _NOW["answers"][0] = _NOW["runner"].cancel(7, (0, 3, 20))
    if x == 1:  # runs task by task from there on
        _NOW["answers"][1] = _NOW["runner"].cancel(7, (2, 4))
    return x


def test_a_cancellation_reaches_the_tasks_after_the_running_block_and_none_in_it() -> None:
    sent: list[tuple[int, p.Message]] = []
    _NOW.update(runner=_runner(sent), ran=[], answers={})
    values, errors = _run(_NOW["runner"], sent, 7, [(_cancelling_early, x) for x in range(30)])
    assert _NOW["answers"] == {0: [3, 20], 1: [2, 4]}
    assert _NOW["ran"] == [x for x in range(30) if x not in (2, 3, 4, 20)]
    assert sorted(errors) == [2, 3, 4, 20] and all(e.type_name == "zdq.errors.TaskCancelled" for e in errors.values())


def _cancelling_in_block(x: int) -> int:
    if x == 10:
        _NOW["answers"].append(_NOW["runner"].cancel(8, (11, 40)))
    return x


def test_a_task_in_a_running_block_counts_as_started() -> None:
    sent: list[tuple[int, p.Message]] = []
    _NOW.update(runner=_runner(sent), answers=[])
    _NOW["runner"]._blocks[id(_cancelling_in_block)] = 32  # as after its fast chunks: tasks 0-31 in the first block
    values, errors = _run(_NOW["runner"], sent, 8, [(_cancelling_in_block, x) for x in range(50)])
    assert _NOW["answers"] == [[40]]
    assert values[11] == 11 and list(errors) == [40]


def test_cancellations_held_before_a_shared_chunk_starts_take_effect_when_it_does() -> None:
    sent: list[tuple[int, p.Message]] = []
    _NOW.update(runner=_runner(sent), ran=[], answers={})
    runner = _NOW["runner"]
    runner.received(9, 0)
    assert runner.cancel(9, (1, 4)) == [1, 4]  # delivered, not started: held
    [payload] = _packed(0, [(add, x) for x in range(12)], None)
    runner.execute(0, p.Deliver(9, 12, 1, payload))
    _, done = sent.pop()
    _, values, errors = loads_results(done.results)
    assert sorted(errors) == [1, 4] and values == [None if x in (1, 4) else x for x in range(12)]


def test_a_lazily_decoded_shared_chunk_is_empty_until_filled() -> None:
    [payload] = _packed(0, [(add, x) for x in range(10)])
    _, _, entries, _ = loads_chunk(payload, KEY, lazy=True)
    assert type(entries) is SharedCalls and not entries.filled and len(entries) == 0 and entries.n == 10
    entries.fill()
    entries[3] = ("placeholder",)
    entries.fill()  # once only: what was written stays
    assert entries.filled and entries[3] == ("placeholder",) and entries[4] == (add, 4)


def _stops_at(x: int) -> int:
    if x in (2, 40):
        next(iter(()))  # a StopIteration, as a task's own bug raises it
    return x


def test_a_task_raising_stop_iteration_fails_alone_and_the_results_after_it_keep_their_places() -> None:
    """``map`` would take a task's StopIteration for the end of its block (review: task 2 counted
    done with None, the results after it shifted, the chunk's DONE short and its batch hung)."""
    sent: list[tuple[int, p.Message]] = []
    runner = _runner(sent)
    for chunk_id, block in ((11, 1), (12, 64)):  # growing blocks from one; the chunk in one block
        runner._blocks[id(_stops_at)] = block
        values, errors = _run(runner, sent, chunk_id, [(_stops_at, x) for x in range(50)])
        assert sorted(errors) == [2, 40], errors
        assert all(e.type_name == "builtins.StopIteration" for e in errors.values()), errors
        assert "_stops_at" in errors[2].traceback  # the task's own traceback, not the generator's
        assert len(values) == 50 and [v for i, v in enumerate(values) if i not in (2, 40)] == [x for x in range(50) if x not in (2, 40)]


def _slow_after_fast(x: int) -> int:
    if x == 0:
        _NOW["answers"].append(_NOW["runner"].cancel(13, (5, 29)))
    return x


def test_the_block_size_learned_from_one_function_is_not_used_for_another() -> None:
    """Blocks of 32 learned from fast no-ops must not make the first block of another
    function's chunk (review: a cancel then found a whole chunk of slow tasks "started")."""
    sent: list[tuple[int, p.Message]] = []
    _NOW.update(runner=_runner(sent), answers=[])
    _NOW["runner"]._blocks[id(add)] = 1 << 16
    values, errors = _run(_NOW["runner"], sent, 13, [(_slow_after_fast, x) for x in range(30)])
    assert _NOW["answers"] == [[5, 29]]  # task 0 ran alone: the rest had not started
    assert sorted(errors) == [5, 29]


_COUNTER: list[int] = []


def _counted() -> int:
    _COUNTER.append(len(_COUNTER))
    n = _COUNTER[-1]
    if n == 7:
        raise ValueError("the eighth call fails")
    if n == 11:
        next(iter(()))
    return n


def test_calls_without_arguments_run_by_blocks_and_a_failing_one_fails_alone() -> None:
    """daskqueue's ``(fn,)`` calls come by columns with no column: they run by blocks too."""
    sent: list[tuple[int, p.Message]] = []
    runner = _runner(sent)
    _COUNTER.clear()
    values, errors = _run(runner, sent, 14, [(_counted,) for _ in range(40)])
    assert sorted(errors) == [7, 11] and errors[7].message == "the eighth call fails"
    assert errors[11].type_name == "builtins.StopIteration"
    assert len(_COUNTER) == 40 and [v for i, v in enumerate(values) if i not in (7, 11)] == [i for i in range(40) if i not in (7, 11)]
    assert id(_counted) in runner._blocks  # it ran by blocks
