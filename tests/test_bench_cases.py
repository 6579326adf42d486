"""The benchmark's floor (``zdq bench --suite latency``): three real processes over tcp loopback.

The cases that need a cluster are run through the CLI in ``tests/test_cli.py``.
"""

from __future__ import annotations

import multiprocessing

import pytest

from zdq.benchmark.floor import floor_round_trip

_FLOOR = {"zdq-floor-broker", "zdq-floor-consumer"}


def _floor_processes() -> set[str]:
    return {p.name for p in multiprocessing.active_children()} & _FLOOR


def test_the_floor_echoes_every_round_trip_and_stops_its_processes_even_when_the_block_raises() -> None:
    with pytest.raises(KeyError, match="the block failed"), floor_round_trip() as call:
        assert _floor_processes() == _FLOOR
        for i in range(50):
            call(i)  # raises if an echo is missing or is not its own
        raise KeyError("the block failed")
    assert _floor_processes() == set()
