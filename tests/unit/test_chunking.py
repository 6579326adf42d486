"""Where chunks are cut (zdq.codec.chunking): by count, by consecutive ids, by bytes. Pure, no cluster."""

from __future__ import annotations

import pytest

from zdq.codec.chunking import WIRE_MARGIN, Chunking, Packed
from zdq.codec.tasks import CALLS, PICKLED, TASKS, TaskOptions, call_task, dumps_task, loads_chunk
from zdq.config import settings
from zdq.errors import SerializationError

from ..tasks import add

KEY = b"k" * 32


def loose(*ids: int) -> list[tuple[int, bytes]]:
    return [(i, b"task") for i in ids]


def sizes(runs: list[tuple[int, int]]) -> list[int]:
    return [end - start for start, end in runs]


def test_a_pools_chunking_is_read_from_its_settings() -> None:
    chunking = Chunking.of(settings(chunk_size=77, chunk_bytes="1MiB", prefetch=3, max_message_size="8MiB"))
    assert chunking == Chunking(chunk_size=77, chunk_bytes=1 << 20, max_bytes=8 << 20, prefetch=3)


# -- batches ---------------------------------------------------------------------------------------
def test_more_queues_than_consumers_can_hold_still_each_get_a_chunk() -> None:
    chunking = Chunking(chunk_size=1000, chunk_bytes=1 << 20, max_bytes=1 << 20, prefetch=1)
    assert chunking.batch_size(None, 100, consumers=2, queues=10) == 10  # ten chunks: one per queue
    assert chunking.batch_size(None, 100, consumers=20, queues=2) == 5  # twenty consumers hold one each


def test_a_batch_size_smaller_than_the_spread_is_kept() -> None:
    chunking = Chunking(chunk_size=1000, chunk_bytes=1 << 20, max_bytes=1 << 20, prefetch=2)
    assert chunking.batch_size(3, 1000, consumers=2, queues=2) == 3


def test_batches_of_nothing_are_none_and_the_last_batch_is_the_rest() -> None:
    assert list(Chunking.batches([], 3)) == []
    assert list(Chunking.batches(range(7), 7)) == [list(range(7))]
    assert list(Chunking.batches(range(5), 1)) == [[0], [1], [2], [3], [4]]


def test_a_packed_batch_decodes_to_its_entries_in_order_with_the_chunk_options_and_sealing() -> None:
    chunking = Chunking(chunk_size=1000, chunk_bytes=1 << 20, max_bytes=1 << 20, prefetch=2)
    options = TaskOptions(retries=4)
    entries = [(add, i) for i in range(10)]
    packed = chunking.pack_batch(0, entries, 4, KEY, CALLS, options)
    decoded = [loads_chunk(p.payload, KEY) for p in packed]
    assert [(base, len(e), o) for base, _, e, o in decoded] == [(0, 4, options), (4, 4, options), (8, 2, options)]
    assert [e for _, _, es, _ in decoded for e in es] == entries


# -- loose single tasks ----------------------------------------------------------------------------
def test_many_loose_tasks_are_cut_at_chunk_size() -> None:
    chunking = Chunking(chunk_size=4, chunk_bytes=1 << 20, max_bytes=1 << 20, prefetch=1)
    runs = list(chunking.loose_runs(loose(*range(20)), n_brokers=2))
    assert sizes(runs) == [4] * 5 and runs[0] == (0, 4) and runs[-1] == (16, 20)


def test_few_loose_tasks_are_cut_so_that_each_consumer_holds_its_prefetch() -> None:
    chunking = Chunking(chunk_size=1000, chunk_bytes=1 << 20, max_bytes=1 << 20, prefetch=2)
    runs = list(chunking.loose_runs(loose(*range(12)), n_brokers=2, consumers=2))
    assert len(runs) == 4 and sum(sizes(runs)) == 12
    # Each round of two slices (one per broker) is even: 3 and 3, then 3 and 3.
    assert sizes(runs) == [3, 3, 3, 3]


def test_uneven_loose_tasks_give_each_broker_a_share_that_differs_by_one_at_most() -> None:
    chunking = Chunking(chunk_size=1000, chunk_bytes=1 << 20, max_bytes=1 << 20, prefetch=2)
    assert sizes(list(chunking.loose_runs(loose(*range(7)), n_brokers=3))) == [3, 2, 2]


def test_loose_runs_cover_every_task_once_and_never_span_a_gap_in_ids() -> None:
    chunking = Chunking(chunk_size=3, chunk_bytes=1 << 20, max_bytes=1 << 20, prefetch=2)
    ids = [1, 2, 3, 4, 5, 9, 10, 11, 12, 40, 41, 100]
    tasks = loose(*ids)
    runs = list(chunking.loose_runs(tasks, n_brokers=2, consumers=3))
    assert [i for start, end in runs for i in range(start, end)] == list(range(len(ids)))
    for start, end in runs:
        run_ids = [tasks[i][0] for i in range(start, end)]
        assert run_ids == list(range(run_ids[0], run_ids[0] + len(run_ids))) and len(run_ids) <= 3


def test_loose_tasks_taken_grow_with_the_room_for_chunks() -> None:
    chunking = Chunking(chunk_size=50, chunk_bytes=1 << 20, max_bytes=1 << 20, prefetch=2)
    assert [chunking.loose_take(room) for room in (0, 1, 4)] == [0, 50, 200]


def test_loose_tasks_that_all_fit_are_one_pickled_chunk() -> None:
    chunking = Chunking(chunk_size=1000, chunk_bytes=1 << 20, max_bytes=1 << 20, prefetch=2)
    tasks = [dumps_task(call_task(add, (i,))) for i in range(3)]
    packed, refused = chunking.pack_loose(30, tasks, KEY)
    assert refused == [] and [(p.first, p.n) for p in packed] == [(30, 3)]
    assert loads_chunk(packed[0].payload, KEY) == (30, TASKS, [(add, (0,)), (add, (1,)), (add, (2,))], None)


# -- by bytes --------------------------------------------------------------------------------------
def test_a_chunk_of_exactly_chunk_bytes_is_not_split() -> None:
    entries = [(add, "x" * 100) for _ in range(3)]
    size = len(Chunking(1000, 1 << 20, 1 << 20, 2).pack(0, entries, None, CALLS, None)[0].payload)
    assert [p.n for p in Chunking(1000, size, 1 << 20, 2).pack(0, entries, None, CALLS, None)] == [3]
    assert [p.n for p in Chunking(1000, size - 1, 1 << 20, 2).pack(0, entries, None, CALLS, None)] == [1, 2]


def test_split_chunks_keep_consecutive_ids_and_decode_to_the_entries_in_order() -> None:
    chunking = Chunking(chunk_size=1000, chunk_bytes=2500, max_bytes=1 << 20, prefetch=2)
    entries = [(add, f"{i:03d}" * 200) for i in range(9)]
    packed = chunking.pack(70, entries, KEY, CALLS, None)
    assert len(packed) > 1 and all(len(p.payload) <= 2500 for p in packed)
    assert [p.first for p in packed] == [70 + sum(q.n for q in packed[:i]) for i in range(len(packed))]
    assert [e for p in packed for e in loads_chunk(p.payload, KEY)[2]] == entries


def test_a_single_task_up_to_max_bytes_goes_alone_and_past_it_is_refused_naming_the_task() -> None:
    chunking = Chunking(chunk_size=1000, chunk_bytes=100, max_bytes=5000, prefetch=2)
    [alone] = chunking.pack(3, [(add, "y" * 1000)], None, CALLS, None)
    assert alone == Packed(3, 1, alone.payload) and len(alone.payload) > 100
    with pytest.raises(SerializationError, match=r"task 4 pickles to \d+ bytes, more than max-message-size \(5000\)"):
        chunking.pack(4, [dumps_task((add, ("z" * 6000,)))], None, PICKLED, None)


def test_max_message_size_below_chunk_bytes_bounds_every_chunk_and_refuses_a_larger_task() -> None:
    """``max-message-size`` set below ``chunk-bytes``: a chunk within chunk-bytes but above the
    sockets' limit would be dropped on the wire (its tasks never settled): it is split, and a single
    task above the limit is refused at the driver (its message names the setting)."""
    chunking = Chunking(chunk_size=1000, chunk_bytes=1 << 20, max_bytes=3000, prefetch=2)
    packed = chunking.pack(0, [(add, f"{i}" * 1000) for i in range(9)], None, CALLS, None)
    # What a chunk may take: the limit less what the transport adds to a frame (CurveZMQ's box).
    room = 3000 - WIRE_MARGIN
    assert len(packed) > 1 and all(len(p.payload) <= room for p in packed)
    assert chunking.too_large(room + 1) and not chunking.too_large(room)
    with pytest.raises(SerializationError, match=r"task 5 pickles to \d+ bytes, more than max-message-size \(3000\)"):
        chunking.pack(5, [dumps_task((add, ("v" * 4000,)))], None, PICKLED, None)
