"""Chunks on the wire and in storage (zdq.codec.tasks): round trips, splits on task boundaries,
cancelled tasks, task options. Pure, no cluster."""

from __future__ import annotations

import math
import pickle
from typing import Any

import pytest

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
    dumps_chunk,
    dumps_task,
    is_cancelled,
    item_task,
    loads_chunk,
    own_options,
    split_chunk,
)
from zdq.errors import ProtocolError

from ..tasks import add

KEY = b"k" * 32

ENTRIES: dict[int, list[Any]] = {
    TASKS: [call_task(add, (1, 2)), call_task(add, (1,), {"b": 5}), item_task("x"), call_task(add, (3,), None, TaskOptions(retries=1))],
    CALLS: [(add, 1, 2), (divmod, 7, 2), (pow, 2, 10)],
    ITEMS: ["a", 3, {"k": [1, 2]}, None],
}


# -- round trips -----------------------------------------------------------------------------------
@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "sealed"])
@pytest.mark.parametrize("kind", [TASKS, CALLS, ITEMS])
@pytest.mark.parametrize("options", [None, TaskOptions(retries=2, time_limit=1.5)], ids=["no-options", "options"])
def test_every_kind_of_chunk_decodes_to_what_was_encoded(key: bytes | None, kind: int, options: TaskOptions | None) -> None:
    assert loads_chunk(dumps_chunk(123, ENTRIES[kind], key, kind, options), key) == (123, kind, ENTRIES[kind], options)


def test_a_chunk_is_read_from_any_buffer_a_socket_or_a_store_hands_over() -> None:
    payload = dumps_chunk(1, ENTRIES[CALLS], KEY, CALLS)
    expected = (1, CALLS, ENTRIES[CALLS], None)
    assert loads_chunk(bytearray(payload), KEY) == expected
    assert loads_chunk(memoryview(payload), KEY) == expected


def test_the_same_chunk_encodes_to_the_same_bytes() -> None:
    # (a seal of 512 bytes or more has a nonce of its own: the sealed data is the same)
    a, b = dumps_chunk(5, ENTRIES[CALLS], KEY, CALLS), dumps_chunk(5, list(ENTRIES[CALLS]), KEY, CALLS)
    assert unseal(KEY, a) == unseal(KEY, b)
    assert dumps_chunk(5, ENTRIES[CALLS], None, CALLS) == dumps_chunk(5, list(ENTRIES[CALLS]), None, CALLS)


def test_pickled_single_tasks_decode_as_tasks_whatever_their_layout() -> None:
    tasks = [t for t in ENTRIES[TASKS] if len(t) < 4] + [call_task(add, (3,), None, TaskOptions(retries=1))]
    payload = dumps_chunk(9, [dumps_task(t) for t in tasks], KEY, PICKLED)
    assert loads_chunk(payload, KEY) == (9, TASKS, tasks, None)


def test_a_chunk_read_with_the_wrong_key_or_none_is_a_protocol_error() -> None:
    payload = dumps_chunk(1, ENTRIES[CALLS], KEY, CALLS)
    with pytest.raises(ProtocolError, match="tag does not match"):
        loads_chunk(payload, b"x" * 32)
    with pytest.raises(ProtocolError):
        loads_chunk(dumps_chunk(1, [(add, 1)], None, CALLS), KEY)  # unsealed where sealed chunks are due


@pytest.mark.parametrize(
    "obj",
    [
        (1, CALLS, []),  # three fields
        ("1", CALLS, [], None),  # a base that is not an int
        (1, CALLS, (), None),  # entries that are not a list
        (1, CALLS, [], {"retries": 1}),  # options that are not TaskOptions
        (1, -1, [], None),  # an unknown kind
    ],
)
def test_a_chunk_of_the_wrong_shape_is_a_protocol_error(obj: object) -> None:
    with pytest.raises(ProtocolError, match="a chunk must be"):
        loads_chunk(pickle.dumps(obj))


# -- splitting on task boundaries ------------------------------------------------------------------
@pytest.mark.parametrize("kind", [TASKS, CALLS, ITEMS])
def test_a_chunk_splits_into_one_chunk_per_task_that_join_back_to_it(kind: int) -> None:
    options = TaskOptions(retries=3)
    chunk = loads_chunk(dumps_chunk(50, ENTRIES[kind], KEY, kind, options), KEY)
    parts = [loads_chunk(part, KEY) for part in split_chunk(chunk, KEY)]
    assert [base for base, *_ in parts] == list(range(50, 50 + len(ENTRIES[kind])))
    assert all(k == kind and o == options and len(e) == 1 for _, k, e, o in parts)
    assert [e for _, _, es, _ in parts for e in es] == ENTRIES[kind]


def test_a_decoded_chunk_of_pickled_tasks_splits_into_tasks_chunks() -> None:
    chunk = loads_chunk(dumps_chunk(3, [dumps_task((add, (1,))), dumps_task((None, "i"))], None, PICKLED))
    assert [loads_chunk(p) for p in split_chunk(chunk, None)] == [(3, TASKS, [(add, (1,))], None), (4, TASKS, [(None, "i")], None)]


def test_a_one_task_chunk_splits_into_itself() -> None:
    payload = dumps_chunk(8, [(add, 1)], KEY, CALLS)
    (alone,) = split_chunk(loads_chunk(payload, KEY), KEY)
    assert unseal(KEY, alone) == unseal(KEY, payload)


# -- cancelled tasks -------------------------------------------------------------------------------
def test_a_rewritten_chunk_of_calls_or_items_becomes_tasks_of_the_same_meaning() -> None:
    as_tasks = {
        TASKS: ENTRIES[TASKS],
        CALLS: [(add, (1, 2)), (divmod, (7, 2)), (pow, (2, 10))],
        ITEMS: [(None, "a"), (None, 3), (None, {"k": [1, 2]}), (None, None)],
    }
    for kind, expected in as_tasks.items():
        options = TaskOptions(retries=1)
        payload = cancel_in_chunk(dumps_chunk(6, ENTRIES[kind], None, kind, options), None, [])
        assert loads_chunk(payload) == (6, TASKS, expected, options)


def test_indexes_past_the_end_of_a_chunk_cancel_nothing_and_the_chunk_keeps_its_sealing() -> None:
    payload = cancel_in_chunk(dumps_chunk(0, ENTRIES[CALLS], KEY, CALLS), KEY, [1, 99])
    _, _, entries, _ = loads_chunk(payload, KEY)
    assert [is_cancelled(e) for e in entries] == [False, True, False]
    with pytest.raises(ProtocolError):
        cancel_in_chunk(payload, b"x" * 32, [0])  # a forged chunk is not rewritten


def test_a_cancelled_chunk_of_pickled_tasks_stays_pickled_and_keeps_the_others_bytes() -> None:
    tasks = [dumps_task((add, (1,))), dumps_task((add, (2,)))]
    payload = cancel_in_chunk(dumps_chunk(4, tasks, None, PICKLED), None, [0])
    raw = pickle.loads(payload)
    assert raw[1] == PICKLED and raw[2][1] == tasks[1]
    assert is_cancelled(loads_chunk(payload)[2][0])


def test_only_placeholders_count_as_cancelled() -> None:
    assert is_cancelled(cancelled_entry(CALLS)) and is_cancelled(cancelled_entry(TASKS)) and is_cancelled(cancelled_entry(ITEMS))
    for entry in [(add, 1), (None, "x"), (), "text", None, [cancelled_entry(CALLS)[0]]]:
        assert not is_cancelled(entry)


# -- options ---------------------------------------------------------------------------------------
def test_an_entry_carries_its_own_options_only_in_a_tasks_chunk() -> None:
    options = TaskOptions(retries=1)
    assert own_options(TASKS, (add, (1,), None, options)) is options
    assert own_options(TASKS, (add, (1,), None, "not options")) is None
    assert own_options(ITEMS, (add, (1,), None, options)) is None


@pytest.mark.parametrize(
    ("kwargs", "error", "named"),
    [
        ({"retries": -1}, ValueError, "retries"),
        ({"retries": 1.5}, ValueError, "retries"),
        ({"retries": True}, ValueError, "retries"),
        ({"retry_backoff": -0.1}, ValueError, "retry_backoff"),
        ({"retry_backoff": math.inf}, ValueError, "retry_backoff"),
        ({"retry_backoff_max": math.nan}, ValueError, "retry_backoff_max"),
        ({"retry_backoff": "1s"}, ValueError, "retry_backoff"),
        ({"time_limit": 0}, ValueError, "time limit"),
        ({"time_limit": math.inf}, ValueError, "time limit"),
        ({"retry_on": ()}, TypeError, "retry_on"),
        ({"retry_on": [ValueError]}, TypeError, "retry_on"),
        ({"retry_on": (int,)}, TypeError, "retry_on"),
    ],
)
def test_bad_task_options_are_refused_naming_the_option(kwargs: dict[str, Any], error: type[Exception], named: str) -> None:
    with pytest.raises(error, match=named):
        TaskOptions(**kwargs)


def test_task_options_are_frozen_and_compare_by_value() -> None:
    options = TaskOptions(retries=2, retry_on=(KeyError, ValueError))
    assert options == TaskOptions(retries=2, retry_on=(KeyError, ValueError)) and hash(options) == hash(TaskOptions(retries=2, retry_on=(KeyError, ValueError)))
    with pytest.raises(AttributeError):
        options.retries = 3  # type: ignore[misc]
