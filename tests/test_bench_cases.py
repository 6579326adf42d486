"""The benchmark's floor (``zdq bench --suite latency``): three real processes over tcp loopback or ipc.

The cases that need a cluster are run through the CLI in ``tests/test_cli.py``.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile

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


def test_the_floor_over_ipc_echoes_and_removes_its_private_directory() -> None:
    before = set(os.listdir(tempfile.gettempdir()))
    with floor_round_trip(ipc=True) as call:
        for i in range(50):
            call(i)
        scratch = {p for p in set(os.listdir(tempfile.gettempdir())) - before if p.startswith("zdq-floor-")}
        assert scratch, "the ipc floor binds in a directory of its own"
    assert _floor_processes() == set()
    assert not set(scratch) & set(os.listdir(tempfile.gettempdir()))
