"""Settings: dask.config with zdq's shipped defaults underneath (no cluster)."""

from __future__ import annotations

import copy

import dask.config
import pytest

import zdq


def test_settings_fall_back_to_the_shipped_defaults_after_a_harness_resets_dask_config() -> None:
    # distributed.utils_test's fixtures snapshot dask.config before zdq is imported and restore
    # that snapshot afterwards, which drops the defaults zdq registered at import.
    snapshot = copy.deepcopy(dask.config.config)
    try:
        dask.config.config.pop("zdq", None)
        settings = zdq.settings()
        assert (settings.chunk_size, settings.window, settings.heartbeat_timeout) == (1000, 16, 15.0)
        assert settings.buffer_bytes == 256 * 2**20
        with dask.config.set({"zdq.chunk-size": 500}):
            assert zdq.settings().chunk_size == 500  # what the user sets still wins
    finally:
        dask.config.config.clear()
        dask.config.config.update(snapshot)


def test_keyword_overrides_take_dask_strings_and_bad_values_fail_at_the_call() -> None:
    settings = zdq.settings(heartbeat_timeout="30s", buffer_bytes="64MiB")
    assert settings.heartbeat_timeout == 30.0 and settings.buffer_bytes == 64 * 2**20
    with pytest.raises(ValueError, match="heartbeat-timeout"):
        zdq.settings(heartbeat_interval="5s", heartbeat_timeout="2s")
    with pytest.raises(ValueError, match="window"):
        zdq.settings(window=0)


def test_a_durable_pool_takes_its_own_window_unless_none_is_set() -> None:
    # zdq.durable.window (48 shipped) is a durable pool's window; window= on the pool wins (see
    # zdq.client.queue_pool); null falls back to zdq.window.
    settings = zdq.settings()
    assert (settings.window, settings.durable_window) == (16, 48)
    assert settings.for_durable().window == 48 and settings.for_durable().durable_window == 48
    with dask.config.set({"zdq.durable.window": None}):
        assert zdq.settings().for_durable().window == 16
    with dask.config.set({"zdq.durable.window": "null"}):
        assert zdq.settings().durable_window is None
    assert zdq.settings(durable_window=32).for_durable().window == 32
    with pytest.raises(ValueError, match="durable_window"):
        zdq.settings(durable_window=0)
    with pytest.raises(ValueError, match="zdq.durable.window"):
        with dask.config.set({"zdq.durable.window": "many"}):
            zdq.settings()


@pytest.mark.parametrize("bad", [-1, 0, float("nan"), float("inf"), "abc", None, True, "-1s"])
def test_a_wait_for_the_pools_answer_takes_positive_finite_seconds_and_refuses_the_rest_by_name(bad: object) -> None:
    from zdq.config import answer_timeout

    with pytest.raises(ValueError, match="^timeout must"):
        answer_timeout(bad)


def test_a_wait_for_the_pools_answer_takes_numbers_and_time_strings() -> None:
    from zdq.config import answer_timeout

    assert answer_timeout(2) == 2.0 and answer_timeout("500ms") == 0.5 and answer_timeout(0.25, "t") == 0.25


@pytest.mark.parametrize("bad", ["abc", True, "-1s", object()])
def test_a_futures_wait_refuses_what_is_no_duration_by_name_and_takes_a_time_string(bad: object) -> None:
    from zdq.errors import ZdqTimeoutError
    from zdq.futures import TaskFuture

    fut = TaskFuture(1)
    with pytest.raises(ValueError, match="^timeout must"):
        fut.result(timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^timeout must"):
        zdq.gather([fut], timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(ZdqTimeoutError):
        fut.result(timeout="10ms")  # type: ignore[arg-type]
    fut.set_result(3)
    assert fut.result(timeout=-1) == 3  # a number as the standard library takes it
