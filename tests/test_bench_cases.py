"""The benchmark's floor (``zdq bench --suite latency``): three real processes over tcp loopback or ipc.

The cases that need a cluster are run through the CLI in ``tests/test_cli.py``.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from pathlib import Path

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


_HOLDS_A_FLOOR = """
import os, sys, time
from zdq.benchmark.floor import floor_round_trip
import multiprocessing
if __name__ == "__main__":
    with floor_round_trip() as call:
        call(1)
        print(" ".join(str(p.pid) for p in multiprocessing.active_children() if p.name.startswith("zdq-floor-")), flush=True)
        time.sleep(120)
"""


def test_the_floors_processes_end_when_the_process_that_started_them_is_killed(tmp_path: Path) -> None:
    # SIGKILL runs no cleanup: the broker and the consumer see their parent gone, and end.
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "holds_a_floor.py"
    script.write_text(_HOLDS_A_FLOOR)
    holder = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        pids = [int(pid) for pid in holder.stdout.readline().split()]
        assert len(pids) == 2, pids
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)

        def alive(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            with open(f"/proc/{pid}/stat") as stat:  # a zombie waits for its new parent to reap it
                return stat.read().split(") ", 1)[1][0] != "Z"

        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [pid for pid in pids if alive(pid)]
        for pid in left:  # the test stops what it started, whatever it finds
            os.kill(pid, signal.SIGKILL)
        assert not left, f"the floor's processes {left} outlived the process that started them"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=10)
