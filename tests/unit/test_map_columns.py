"""``queue_pool.map`` over lists, tuples and ranges: its chunks packed from slices of the
iterables (``Chunking.pack_columns``), the futures' shared indexes, the scan for futures among
the items. Pure, no cluster."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

import pytest

from zdq.client.submit import _column, _items_hold_futures
from zdq.client.window import MapChunk, _indexes
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
