"""zdq.gather's walk over nested structures (zdq.client.gather), with futures the tests settle."""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Any

import pytest

from zdq import ZdqTimeoutError, gather

Future = concurrent.futures.Future


def done(value: Any) -> Future[Any]:
    fut: Future[Any] = Future()
    fut.set_result(value)
    return fut


def failed(exc: BaseException) -> Future[Any]:
    fut: Future[Any] = Future()
    fut.set_exception(exc)
    return fut


def test_a_future_a_list_and_nested_lists_tuples_and_dicts_come_back_with_results() -> None:
    assert gather(done(1)) == 1
    assert gather([done(1), done(2)]) == [1, 2]
    data = {"a": done(1), "b": [done(2), (done(3), "plain", 4)], "c": {"d": done(5)}}
    assert gather(data) == {"a": 1, "b": [2, (3, "plain", 4)], "c": {"d": 5}}
    assert gather([]) == []


def test_the_same_future_twice_gives_its_result_twice() -> None:
    fut = done(7)
    assert gather([fut, fut]) == [7, 7]


def test_named_tuples_and_ordered_dicts_keep_their_type() -> None:
    Point = collections.namedtuple("Point", "x y")
    assert gather(Point(done(1), done(2))) == Point(1, 2)
    ordered = gather(collections.OrderedDict(a=done(1)))
    assert type(ordered) is collections.OrderedDict and ordered == {"a": 1}


def test_errors_raise_raises_the_first_failure() -> None:
    with pytest.raises(KeyError, match="bad"):
        gather([done(1), failed(KeyError("bad")), done(3)])


def test_errors_skip_leaves_failed_futures_out_of_lists_tuples_and_dicts() -> None:
    cancelled: Future[Any] = Future()
    cancelled.cancel()
    data = [done(1), failed(ValueError()), [cancelled, done(2)], (failed(KeyError()), done(3)), {"x": failed(ValueError()), "y": done(4)}]
    assert gather(data, errors="skip") == [1, [2], (3,), {"y": 4}]
    assert gather(failed(ValueError()), errors="skip") is None


def test_an_unknown_errors_value_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="'raise', 'skip'.*'ignore'"):
        gather([done(1)], errors="ignore")


def test_a_timeout_says_how_many_futures_had_no_result() -> None:
    with pytest.raises(ZdqTimeoutError, match="1 of 2 futures"):
        gather([done(1), Future()], timeout=0)
