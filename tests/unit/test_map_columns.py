"""``queue_pool.map`` over lists, tuples and ranges: its chunks packed from slices of the
iterables (``Chunking.pack_columns``), the futures' shared indexes, the scan for futures among
the items. Pure, no cluster."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

import pytest

from zdq.client.submit import _column, _items_hold_futures
from zdq.client.window import ColumnReader, Columns, MapChunk, _indexes
from zdq.codec.chunking import Chunking
from zdq.codec.tasks import CALLS, SHARED, TaskOptions, loads_chunk
from zdq.codec.results import unseal
from zdq.errors import SerializationError

from ..tasks import add

pytestmark = pytest.mark.unit

KEY = b"k" * 32
CHUNKING = Chunking(chunk_size=1000, chunk_bytes=4 << 20, max_bytes=256 << 20, prefetch=2)


def _kind(payload: bytes) -> int:
    import pickle

    return pickle.loads(unseal(KEY, payload))[1]  # type: ignore[no-any-return]


@pytest.mark.parametrize("n", [8, 100])
def test_enough_calls_go_by_columns_and_decode_to_the_calls_of_zip(n: int) -> None:
    xs, ys = list(range(n)), tuple(range(100, 100 + n))
    options = TaskOptions(retries=2)
    [packed] = CHUNKING.pack_columns(50, add, n, [_column(xs, 0, n), _column(ys, 0, n)], KEY, options)
    assert (packed.first, packed.n) == (50, n) and _kind(packed.payload) == SHARED
    base, kind, entries, got_options = loads_chunk(packed.payload, KEY)
    assert (base, kind, got_options) == (50, CALLS, options)
    assert list(entries) == list(zip([add] * n, xs, ys))


def test_few_calls_or_many_arguments_go_as_tuples() -> None:
    [few] = CHUNKING.pack_columns(0, add, 3, [[1, 2, 3], [4, 5, 6]], KEY, None)
    wide = CHUNKING.pack_columns(0, add, 10, [list(range(10))] * 9, KEY, None)[0]
    for packed, calls in ((few, [(add, 1, 4), (add, 2, 5), (add, 3, 6)]), (wide, [(add,) + (i,) * 9 for i in range(10)])):
        assert _kind(packed.payload) == CALLS
        assert loads_chunk(packed.payload, KEY)[2] == calls


def test_a_call_that_cannot_be_pickled_is_named_by_its_task_id() -> None:
    column: list[Any] = list(range(20))
    column[13] = threading.Lock()
    with pytest.raises(SerializationError) as raised:
        CHUNKING.pack_columns(100, add, 20, [column, list(range(20))], KEY, None)
    assert raised.value.task_id == 113


def test_a_column_is_a_list_of_the_slice_and_a_change_of_size_is_refused() -> None:
    assert _column(range(10), 3, 4) == [3, 4, 5, 6]
    assert _column((1, 2, 3), 1, 2) == [2, 3]
    items = [1, 2, 3]
    assert _column(items, 0, 3) == items and _column(items, 0, 3) is not items
    with pytest.raises(RuntimeError, match="changed size during the map"):
        _column(items, 2, 3)


def test_the_futures_indexes_are_shared_between_chunks_and_grow_for_larger_ones() -> None:
    first, second = MapChunk(0, 600, None, None).futures(), MapChunk(600, 600, None, None).futures()
    assert [f._i for f in first] == list(range(600)) and [f.key for f in second] == list(range(600, 1200))
    assert all(a._i is b._i for a, b in zip(first, second))
    assert list(_indexes(5000))[:5000] == list(range(5000))
    assert [f._i for f in MapChunk(0, 70_000, None, None).futures()[-2:]] == [69_998, 69_999]


def test_a_maps_items_are_looked_through_for_futures_unless_plain() -> None:
    fut: Future[int] = Future()
    assert not _items_hold_futures(range(10**9))
    assert not _items_hold_futures([1, "a", None, 2.0]) and not _items_hold_futures((1, 2))
    assert _items_hold_futures([1, fut]) and _items_hold_futures(([fut],)) and _items_hold_futures({1: 2, 3: fut}.values())
    assert not _items_hold_futures([[1], (2,)])


def test_a_column_reader_reads_the_calls_of_zip_and_nothing_past_the_shortest_iterable() -> None:
    reader = ColumnReader((range(10), [1, 2, 3, 4, 5, 6, 7], (9,) * 8))
    parts = [reader(3) for _ in range(4)]
    assert [p.columns for p in parts] == [
        [[0, 1, 2], [1, 2, 3], [9, 9, 9]], [[3, 4, 5], [4, 5, 6], [9, 9, 9]], [[6], [7], [9]], [[], [], []]
    ]
    assert [len(p) for p in parts] == [3, 3, 1, 0]
    assert parts[0].calls(add) == [(add, 0, 1, 9), (add, 1, 2, 9), (add, 2, 3, 9)]
    # One iterable of any kind is read as zip reads it: no further than asked.
    gen = iter(range(5))
    single = ColumnReader((gen,))
    assert single(2).columns == [[0, 1]] and next(gen) == 2
    # Only where the columns read what zip reads: one iterable, or lists, tuples and ranges.
    assert ColumnReader.fits((iter([]),)) and ColumnReader.fits(([1], (2,), range(3)))
    assert not ColumnReader.fits(()) and not ColumnReader.fits(([1], iter([2])))


def test_columns_are_packed_in_chunks_of_the_size_asked() -> None:
    column = list(range(25))
    packed = CHUNKING.pack_columns(100, add, 25, [column, column], KEY, None, size=10)
    assert [(p.first, p.n) for p in packed] == [(100, 10), (110, 10), (120, 5)]
    assert [_kind(p.payload) for p in packed] == [SHARED, SHARED, CALLS]  # 5 calls: as tuples
    entries = [e for p in packed for e in loads_chunk(p.payload, KEY)[2]]
    assert entries == list(zip([add] * 25, column, column))
    assert Columns([column], 25).calls(add)[3] == (add, 3)
