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
