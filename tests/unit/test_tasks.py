"""The task codec (zdq.codec.tasks) and the chunking decisions (zdq.codec.chunking): pure, no cluster."""

from __future__ import annotations

import pickle
import threading
from typing import Any

import pytest

from zdq.codec.chunking import Chunking, Packed
from zdq.codec.results import unseal
from zdq.codec.tasks import (
    CALLS,
    ITEMS,
    PICKLED,
    TASKS,
    TaskOptions,
    call_task,
    callers,
    cancel_in_chunk,
    cancelled_entry,
    check_calls,
    dumps_chunk,
    dumps_task,
    is_cancelled,
    item_task,
    loads_chunk,
    own_options,
    run_entries,
    split_chunk,
)
from zdq.consumer.base import ConsumerBaseClass
from zdq.errors import SerializationError, TaskCancelled

from ..tasks import add, fail

KEY = b"k" * 32


class Upper(ConsumerBaseClass):
    def process_item(self, item: Any) -> Any:
        return item.upper()


class Careful:
    """Records what a chunk loop hands to ``careful``; runs nothing itself."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, int, Any, BaseException | None]] = []

    def __call__(self, context: Any, i: int, entry: Any, failed: BaseException | None) -> None:
        self.calls.append((context, i, entry, failed))


def run(payload: bytes, key: bytes | None = None) -> tuple[int, int, list[Any], Careful]:
    """Decode a chunk and run it with the kind's loop, as a consumer does."""
    base, kind, entries, _ = loads_chunk(payload, key)
    values: list[Any] = [None] * len(entries)
    careful = Careful()
    run_entries(kind)(enumerate(entries), values, Upper().process_item, careful, "ctx")
    return base, kind, values, careful


# -- building --------------------------------------------------------------------------------------
def test_a_task_takes_its_shortest_layout() -> None:
    options = TaskOptions(retries=2)
    assert call_task(add, [1, 2]) == (add, (1, 2))
    assert call_task(add, (1,), {}) == (add, (1,))  # an empty dict per task nearly doubles the cost
    assert call_task(add, (1,), {"b": 2}) == (add, (1,), {"b": 2})
    assert call_task(add, (1,), {}, options) == (add, (1,), None, options)
    assert call_task(add, (1,), {"b": 2}, options) == (add, (1,), {"b": 2}, options)
    assert item_task("x") == (None, "x")


def test_a_batch_entry_must_be_a_tuple_that_starts_with_a_callable() -> None:
    check_calls([(add, 1, 2), (print,)])
    with pytest.raises(TypeError, match="item 12 must be a tuple"):
        check_calls([(add, 1), [add, 1]], first=11)
    with pytest.raises(TypeError, match="item 0"):
        check_calls([()])


class _EqualToAll:
    """Says it equals anything (a user's odd ``__eq__``), and is not callable."""

    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = None  # type: ignore[assignment]


class _RaisesOnEq:
    def __eq__(self, other: object) -> bool:
        raise ValueError("ambiguous")

    __hash__ = None  # type: ignore[assignment]


def test_the_batch_check_is_as_strict_on_its_fast_path() -> None:
    """One function for the whole batch (the fast path, in C), several, and entries whose
    ``__eq__`` says yes to anything or raises: the verdict and the wrong entry's position are
    those of the plain loop."""
    check_calls([(add, i) for i in range(1000)])
    check_calls([(add, 1), (print,), (add, 2)])
    check_calls([])
    with pytest.raises(TypeError, match="item 2 must be a tuple"):
        check_calls([(add,), (add,), (_EqualToAll(),)])
    with pytest.raises(TypeError, match="item 1 must be a tuple"):
        check_calls([(add,), (_RaisesOnEq(),)])
    with pytest.raises(TypeError, match="item 3 must be a tuple"):
        check_calls([(add,), (add,), (add,), (add, 1)[:0]])
    with pytest.raises(TypeError, match="item 1 must be a tuple"):
        check_calls([(add,), _EqualToAll()])


# -- each kind round-trips and runs ---------------------------------------------------------------
def test_tasks_with_args_kwargs_and_items_run_each_in_their_layout() -> None:
    entries = [call_task(add, (1, 2)), call_task(add, (1,), {"b": 5}), item_task("abc")]
    base, kind, values, careful = run(dumps_chunk(40, entries, KEY, TASKS), KEY)
    assert (base, kind, values, careful.calls) == (40, TASKS, [3, 6, "ABC"], [])


def test_a_task_with_its_own_options_is_left_to_careful_and_its_options_are_read() -> None:
    options = TaskOptions(retries=3, time_limit=5.0)
    task = call_task(add, (1, 2), None, options)
    _, _, values, careful = run(dumps_chunk(1, [task, call_task(add, (2, 2))], None, TASKS))
    assert values == [None, 4]
    assert careful.calls == [("ctx", 0, task, None)]
    assert own_options(TASKS, task) == options
    assert own_options(TASKS, (add, (1, 2))) is None
    assert own_options(CALLS, (add, 1, 2, options)) is None  # a call's arguments are never options


def test_calls_run_with_their_own_arguments() -> None:
    options = TaskOptions(retries=1)
    payload = dumps_chunk(10, [(divmod, 7, 2), (pow, 2, 10), (add, 1)], None, CALLS, options)
    assert loads_chunk(payload)[3] == options  # chunk options apply to every entry
    assert run(payload)[:3] == (10, CALLS, [(3, 1), 1024, 1])


def test_items_go_to_the_handlers_process_item() -> None:
    assert run(dumps_chunk(3, ["a", "bc"], None, ITEMS))[:3] == (3, ITEMS, ["A", "BC"])


def test_pickled_single_tasks_decode_into_a_tasks_chunk() -> None:
    entries = [dumps_task(call_task(add, (1, 2))), dumps_task(call_task(add, (1,), {"b": 1})), dumps_task(item_task("x"))]
    assert run(dumps_chunk(5, entries, KEY, PICKLED), KEY)[:3] == (5, TASKS, [3, 2, "X"])


def test_a_failing_entry_goes_to_careful_with_its_error_and_the_others_still_run() -> None:
    for kind, entries in [
        (CALLS, [(fail, "boom"), (add, 1, 1)]),
        (TASKS, [call_task(fail, ("boom",)), call_task(add, (1, 1))]),
        (ITEMS, [1, "b"]),  # int has no upper()
    ]:
        _, _, values, careful = run(dumps_chunk(0, entries, None, kind))
        assert values[1] in (2, "B")
        [(context, i, entry, failed)] = careful.calls
        assert (context, i, entry) == ("ctx", 0, entries[0])
        assert isinstance(failed, (ValueError, AttributeError))


def test_callers_call_one_entry_of_each_kind() -> None:
    call = callers(Upper().process_item)
    assert call[CALLS]((add, 1, 2)) == 3
    assert call[ITEMS]("a") == "A"
    assert call[TASKS]((add, (1,))) == 1
    assert call[TASKS]((add, (1,), {"b": 2})) == 3
    assert call[TASKS]((add, (1,), None, TaskOptions())) == 1
    assert call[TASKS]((None, "z")) == "Z"
    with pytest.raises(KeyError):
        run_entries(PICKLED)  # decoded chunks are never PICKLED


def test_a_chunk_splits_into_one_chunk_per_task_with_its_own_id() -> None:
    options = TaskOptions(retries=1)
    chunk = loads_chunk(dumps_chunk(100, [(add, 1), (add, 2), (add, 3)], KEY, CALLS, options), KEY)
    parts = [loads_chunk(part, KEY) for part in split_chunk(chunk, KEY)]
    assert parts == [(100, CALLS, [(add, 1)], options), (101, CALLS, [(add, 2)], options), (102, CALLS, [(add, 3)], options)]


def test_a_malformed_or_forged_chunk_is_refused() -> None:
    with pytest.raises(ValueError, match="must be"):
        loads_chunk(pickle.dumps((1, 9, [], None)))  # unknown kind
    with pytest.raises(ValueError, match="must be"):
        loads_chunk(pickle.dumps([1, CALLS, [], None]))
    with pytest.raises(ValueError, match="tag"):
        loads_chunk(dumps_chunk(1, [(add, 1)], KEY, CALLS), b"x" * 32)


# -- naming what cannot be pickled ----------------------------------------------------------------
def test_the_part_that_cannot_be_pickled_is_named_for_every_kind() -> None:
    lock = threading.Lock()
    with pytest.raises(SerializationError, match="add: its argument 1"):
        dumps_chunk(0, [(add, 1, 2), (add, 1, lock)], None, CALLS)
    with pytest.raises(SerializationError, match="keyword argument 'b'"):
        dumps_chunk(0, [call_task(add, (1,), {"b": lock})], None, TASKS)
    with pytest.raises(SerializationError, match="cannot put the item") as info:
        dumps_chunk(7, ["fine", lock], None, ITEMS)
    assert info.value.task_id == 8
    with pytest.raises(SerializationError, match="add: its argument 0"):
        dumps_task(call_task(add, (lock,)))
    with pytest.raises(SerializationError, match="cannot put the item"):
        dumps_task(item_task(lock))


# -- chunk sizes ----------------------------------------------------------------------------------
CHUNKING = Chunking(chunk_size=1000, chunk_bytes=4 << 20, max_bytes=256 << 20, prefetch=2)


def test_a_batch_is_cut_so_that_every_consumer_gets_chunks() -> None:
    size = CHUNKING.batch_size(None, 1000, consumers=2, queues=2)
    chunks = -(-1000 // size)
    assert chunks >= 2 * CHUNKING.prefetch  # both consumers can hold their prefetch
    assert size == 250
    # Before any consumer is placed, each queue gets some.
    assert CHUNKING.batch_size(None, 1000, queues=4) == 125
    # Tiny batches: a task per chunk, never zero.
    assert CHUNKING.batch_size(None, 3, consumers=8, queues=2) == 1
    # A batch of unknown length (a generator) is cut by the caps alone.
    assert CHUNKING.batch_size(None, None, consumers=2, queues=2) == 1000


def test_batch_size_chunk_size_and_the_consumers_batch_size_cap_a_chunk() -> None:
    assert CHUNKING.batch_size(100, 100_000, consumers=2, queues=2) == 100
    assert CHUNKING.batch_size(5000, 100_000, consumers=2, queues=2) == 1000  # chunk-size caps batch_size
    assert CHUNKING.batch_size(500, 100_000, consumer_batch_size=20, consumers=2, queues=2) == 20
    assert CHUNKING.batch_size(None, None, consumer_batch_size=7) == 7
    for bad in (0, -1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="batch_size"):
            CHUNKING.batch_size(bad)  # type: ignore[arg-type]


def test_batches_are_read_lazily_from_any_iterable() -> None:
    seen: list[int] = []

    def calls() -> Any:
        for i in range(7):
            seen.append(i)
            yield (add, i)

    parts = CHUNKING.batches(calls(), 3)
    assert next(parts) == [(add, 0), (add, 1), (add, 2)] and seen == [0, 1, 2]
    assert [len(p) for p in parts] == [3, 1]


def test_a_batch_is_packed_in_chunks_of_consecutive_ids() -> None:
    packed = CHUNKING.pack_batch(50, [(add, i) for i in range(7)], 3, None, CALLS, None)
    assert [(p.first, p.n) for p in packed] == [(50, 3), (53, 3), (56, 1)]
    assert loads_chunk(packed[1].payload) == (53, CALLS, [(add, 3), (add, 4), (add, 5)], None)


# -- coalescing loose single tasks ----------------------------------------------------------------
def loose(*ids: int) -> list[tuple[int, bytes]]:
    return [(i, b"task") for i in ids]


def test_loose_tasks_coalesce_into_runs_of_consecutive_ids() -> None:
    chunking = Chunking(chunk_size=4, chunk_bytes=1 << 20, max_bytes=1 << 20, prefetch=2)
    # Batches took ids 13-19 and 22: chunks never span those gaps.
    runs = list(chunking.loose_runs(loose(10, 11, 12, 20, 21, 23, 24, 25, 26, 27, 28), 1))
    assert runs == [(0, 3), (3, 5), (5, 9), (9, 11)]  # at most chunk-size each


def test_few_loose_tasks_are_spread_over_the_brokers() -> None:
    chunking = Chunking(chunk_size=1000, chunk_bytes=1 << 20, max_bytes=1 << 20, prefetch=2)
    assert list(chunking.loose_runs(loose(*range(10)), 2)) == [(0, 5), (5, 10)]
    assert list(chunking.loose_runs(loose(*range(5)), 3)) == [(0, 2), (2, 4), (4, 5)]
    assert list(chunking.loose_runs(loose(7), 4)) == [(0, 1)]
    assert list(chunking.loose_runs([], 2)) == []
    assert chunking.loose_take(3) == 3000  # no more chunks than there is room for


# -- splitting by bytes ---------------------------------------------------------------------------
def test_a_chunk_larger_than_chunk_bytes_is_split_and_a_task_larger_than_max_bytes_is_refused() -> None:
    chunking = Chunking(chunk_size=1000, chunk_bytes=3000, max_bytes=20_000, prefetch=2)
    entries = [(add, f"{i:04d}" * 250) for i in range(8)]  # distinct: pickle writes a repeated object once
    packed = chunking.pack(0, entries, None, CALLS, None)
    assert [(p.first, p.n) for p in packed] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    assert all(len(p.payload) <= 3000 for p in packed)
    # A single task between chunk-bytes and max-message-size goes alone.
    assert [p.n for p in chunking.pack(9, [(add, "x" * 10_000)], None, CALLS, None)] == [1]
    with pytest.raises(SerializationError, match="task 9 pickles to .* more than max-message-size"):
        chunking.pack(9, [(add, "x" * 30_000)], None, CALLS, None)


def test_a_loose_task_too_large_fails_alone() -> None:
    chunking = Chunking(chunk_size=1000, chunk_bytes=10_000, max_bytes=20_000, prefetch=2)
    small = dumps_task(call_task(add, (1,)))
    tasks = [small, dumps_task(call_task(add, ("x" * 30_000,))), small]
    packed, refused = chunking.pack_loose(70, tasks, None)
    assert [(j, type(e)) for j, e in refused] == [(1, SerializationError)]
    assert [(p.first, p.n) for p in packed] == [(70, 1), (72, 1)]
    assert chunking.pack_loose(70, [small, small], None)[0] == [
        Packed(70, 2, dumps_chunk(70, [small, small], None, PICKLED))
    ]


# -- what earlier versions wrote ------------------------------------------------------------------
#: Payloads written by ``zdq.serialization.dumps_chunk`` before the codec had its own module
#: (commit 651a03e), as durable queues keep them.
EARLIER = {
    "tasks": b'\x80\x05\x95P\x00\x00\x00\x00\x00\x00\x00(K\x07K\x00]\x94(\x8c\x08builtins\x94\x8c\x06divmod\x94\x93\x94K\x07K\x02\x86\x94\x86\x94h\x01\x8c\x03pow\x94\x93\x94K\x02\x85\x94}\x94\x8c\x03exp\x94K\x03s\x87\x94N\x8c\x04item\x94\x86\x94eNt\x94.',
    "tasks_options": b'\x80\x05\x95\x8e\x00\x00\x00\x00\x00\x00\x00(K\x08K\x00]\x94(\x8c\x08builtins\x94\x8c\x03pow\x94\x93\x94K\x02K\x05\x86\x94N\x8c\x11zdq.serialization\x94\x8c\x0bTaskOptions\x94\x93\x94)\x81\x94]\x94(K\x02G?\xb9\x99\x99\x99\x99\x99\x9aG@>\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\nValueError\x94\x93\x94\x85\x94G@\x08\x00\x00\x00\x00\x00\x00ebt\x94aNt\x94.',
    "calls": b'\x80\x05\x95\x94\x00\x00\x00\x00\x00\x00\x00(K\nK\x01]\x94(\x8c\x08builtins\x94\x8c\x06divmod\x94\x93\x94K\x07K\x02\x87\x94h\x01\x8c\x03pow\x94\x93\x94K\x02K\n\x87\x94e\x8c\x11zdq.serialization\x94\x8c\x0bTaskOptions\x94\x93\x94)\x81\x94]\x94(K\x01G?\xb9\x99\x99\x99\x99\x99\x9aG@>\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\tException\x94\x93\x94\x85\x94Nebt\x94.',
    "items": b'\x80\x05\x95/\x00\x00\x00\x00\x00\x00\x00(K\x0cK\x02]\x94(\x8c\x01a\x94K\x03\x8c\x08builtins\x94\x8c\x06divmod\x94\x93\x94K\tK\x04\x87\x94eNt\x94.',
    "pickled": b'\x80\x05\x95P\x00\x00\x00\x00\x00\x00\x00(K\x0fK\x03]\x94(C*\x80\x05\x95\x1f\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\x06divmod\x94\x93\x94K\x07K\x02\x86\x94\x86\x94.\x94C\x13\x80\x05\x95\x08\x00\x00\x00\x00\x00\x00\x00N\x8c\x01x\x94\x86\x94.\x94eNt\x94.',
    "sealed_calls": b'F+\xfe\x18\xe4#\x97C\x8c\x96\x9d\xe3\xb3^\xd7\x0f\x80\x05\x95(\x00\x00\x00\x00\x00\x00\x00(K\x14K\x01]\x94\x8c\x08builtins\x94\x8c\x06divmod\x94\x93\x94K\x07K\x02\x87\x94aNt\x94.',
}


def test_chunks_written_by_the_earlier_codec_still_decode_and_run() -> None:
    old_options = TaskOptions(retries=2, retry_on=(ValueError,), time_limit=3.0)
    assert loads_chunk(EARLIER["tasks"]) == (7, TASKS, [(divmod, (7, 2)), (pow, (2,), {"exp": 3}), (None, "item")], None)
    assert run(EARLIER["tasks"])[2] == [(3, 1), 8, "ITEM"]
    # TaskOptions was zdq.serialization's: its old name still reads as the class of zdq.tasks.
    assert loads_chunk(EARLIER["tasks_options"]) == (8, TASKS, [(pow, (2, 5), None, old_options)], None)
    assert loads_chunk(EARLIER["calls"]) == (10, CALLS, [(divmod, 7, 2), (pow, 2, 10)], TaskOptions(retries=1))
    assert run(EARLIER["items"])[:2] == (12, ITEMS)
    assert loads_chunk(EARLIER["items"])[2] == ["a", 3, (divmod, 9, 4)]
    assert loads_chunk(EARLIER["pickled"]) == (15, TASKS, [(divmod, (7, 2)), (None, "x")], None)
    assert loads_chunk(EARLIER["sealed_calls"], KEY) == (20, CALLS, [(divmod, 7, 2)], None)


def test_chunks_without_options_are_written_byte_for_byte_as_before() -> None:
    assert dumps_chunk(7, [(divmod, (7, 2)), (pow, (2,), {"exp": 3}), (None, "item")], None, TASKS) == EARLIER["tasks"]
    assert dumps_chunk(12, ["a", 3, (divmod, 9, 4)], None, ITEMS) == EARLIER["items"]
    pickled = [dumps_task((divmod, (7, 2))), dumps_task((None, "x"))]
    assert dumps_chunk(15, pickled, None, PICKLED) == EARLIER["pickled"]
    # (sealed since protocol 7 with a nonce of its own: the data under the seal is as before)
    assert unseal(KEY, dumps_chunk(20, [(divmod, 7, 2)], KEY, CALLS)) == EARLIER["sealed_calls"][16:]


@pytest.mark.parametrize(
    ("kind", "entries", "kept"),
    [
        (CALLS, [(add, 1, 2), (add, 3, 4), (add, 5, 6)], [3, None, 11]),
        (ITEMS, ["a", "b", "c"], ["A", None, "C"]),
        (TASKS, [call_task(add, (1, 2)), call_task(add, (3, 4), {}), item_task("c")], [3, None, "C"]),
        (PICKLED, [dumps_task(call_task(add, (1, 2))), dumps_task(call_task(add, (3, 4))), dumps_task(item_task("c"))], [3, None, "C"]),
    ],
)
def test_a_chunk_rewritten_with_a_cancelled_task_runs_the_others_and_reports_the_cancellation(
    kind: int, entries: list[Any], kept: list[Any]
) -> None:
    payload = cancel_in_chunk(dumps_chunk(40, entries, KEY, kind), KEY, [1])
    base, _, values, careful = run(payload, KEY)
    assert base == 40 and values == kept
    ((_, i, entry, failed),) = careful.calls
    assert i == 1 and is_cancelled(entry) and isinstance(failed, TaskCancelled)


@pytest.mark.parametrize("kind", [CALLS, ITEMS, TASKS])
def test_a_placeholder_put_in_a_running_chunk_goes_to_careful_in_every_kind(kind: int) -> None:
    entries: list[Any] = {CALLS: [(add, 1, 2)] * 3, ITEMS: ["a"] * 3, TASKS: [call_task(add, (1, 2))] * 3}[kind]
    entries[2] = cancelled_entry(kind)
    values: list[Any] = [None] * 3
    careful = Careful()
    run_entries(kind)(enumerate(entries), values, Upper().process_item, careful, None)
    assert values[2] is None and [c[1] for c in careful.calls] == [2] and is_cancelled(careful.calls[0][2])
