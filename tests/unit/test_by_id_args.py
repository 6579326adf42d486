"""What zdq.result, zdq.state and ``zdq result`` accept as a key and a timeout: refused before
any cluster is asked."""

from __future__ import annotations

import math

import numpy as np
import pytest

import zdq
from zdq.client.by_id import task_key


@pytest.mark.parametrize("timeout", [math.nan, math.inf, -1, -0.5, "5", True])
def test_a_timeout_is_none_or_a_finite_number_of_seconds(timeout: object) -> None:
    with pytest.raises(ValueError, match="timeout must be None or a finite number"):
        zdq.result("mails", 1, timeout=timeout)  # type: ignore[arg-type]


def test_a_key_is_an_int_a_numpy_int_or_a_string_of_digits() -> None:
    big = 1_900_000_000_000_000_123  # past 2**53: JSON numbers would round it
    assert task_key(big) == big and task_key(str(big)) == big and task_key(f" {big}\n") == big
    assert task_key(np.uint64(big)) == big and type(task_key(np.int64(7))) is int
    for bad in ("12ab", "-3", "1e18", "", "١٢"):
        with pytest.raises(ValueError, match="string of its digits"):
            task_key(bad)
    for bad in (True, 1.0, None, float(big)):
        with pytest.raises(TypeError, match="a task's key is an int"):
            task_key(bad)


@pytest.mark.parametrize("key", [-1, -5, np.int64(-7)])
def test_a_negative_key_is_refused_at_the_call_as_the_cli_refuses_it(key: int) -> None:
    # Refused before any client is looked up: none is made in this test.
    with pytest.raises(ValueError, match=f"a task's key is never negative .*, got key {int(key)}$"):
        zdq.state("mails", key)
    with pytest.raises(ValueError, match=f"got key {int(key)}$"):
        zdq.result("mails", key, timeout=1)


def test_results_naming_a_missing_module_give_the_errors_the_drivers_future_gives() -> None:
    import sys
    import types

    from zdq.client.by_id import _read
    from zdq.codec.results import ErrorInfo, dumps_results
    from zdq.errors import RemoteTaskError, SerializationError

    app = types.ModuleType("zdq_test_gone_app")
    app.Report = type("Report", (), {"__module__": app.__name__})  # type: ignore[attr-defined]
    app.AppError = type("AppError", (Exception,), {"__module__": app.__name__})  # type: ignore[attr-defined]
    sys.modules[app.__name__] = app
    try:
        error = ErrorInfo(app.AppError("out of paper"), "zdq_test_gone_app.AppError", "out of paper", "")
        lost = ErrorInfo(ValueError("bad input"), "ValueError", "bad input", "")
        payload = dumps_results(100, [app.Report(), None, 7, None], {1: error, 3: lost}, key=b"k" * 32)
    finally:
        del sys.modules[app.__name__]
    record = types.SimpleNamespace(name="mails", payload_key=b"k" * 32)
    state, value, exc = _read(record, 100, payload, 100)  # type: ignore[arg-type]
    assert state == "done" and value is None and isinstance(exc, SerializationError)  # it succeeded
    assert "task 100 " in str(exc) and "zdq_test_gone_app.Report cannot be imported" in str(exc)
    state, _, exc = _read(record, 101, payload, 101)  # type: ignore[arg-type]
    assert state == "failed" and isinstance(exc, RemoteTaskError) and exc.type_name == "zdq_test_gone_app.AppError"
    assert str(exc) == "zdq_test_gone_app.AppError: out of paper"
    assert any("zdq_test_gone_app.AppError cannot be imported in this process" in n for n in exc.__notes__)
    assert _read(record, 102, payload, 102) == ("done", 7, None)  # type: ignore[arg-type]  # its own value reads well
    state, _, exc = _read(record, 103, payload, 103)  # type: ignore[arg-type]
    assert state == "failed" and isinstance(exc, ValueError) and str(exc) == "bad input"
    assert _read(record, 105, payload, 105)[0] == "unknown"  # type: ignore[arg-type]


def test_results_that_do_not_load_even_with_stand_ins_say_so_naming_the_task() -> None:
    import types

    from zdq.client.by_id import _read
    from zdq.codec.results import dumps_results
    from zdq.errors import ZdqError

    class Refuses:
        def __reduce__(self) -> tuple[object, ...]:
            return (_refuse, ())

    payload = dumps_results(100, [Refuses()], {}, key=b"k" * 32)
    record = types.SimpleNamespace(name="mails", payload_key=b"k" * 32)
    with pytest.raises(ZdqError, match="task 100 of pool mails: its results cannot be read in this process"):
        _read(record, 100, payload, 100)  # type: ignore[arg-type]


def _refuse() -> None:
    raise RuntimeError("not here")


@pytest.mark.parametrize("key", [1 << 64, str(1 << 64), "99999999999999999999999999"])
def test_a_key_of_more_than_64_bits_is_refused_at_the_call(key: object) -> None:
    with pytest.raises(ValueError, match=r"fits in 64 bits .*, got key \d+$"):
        zdq.state("mails", key)
