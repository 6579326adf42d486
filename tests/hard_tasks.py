"""Tasks for the hard time limit tests: each one runs in a child process of its consumer."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


# Twins of tests/tasks.py's add, sleep and blob. A hard task's child imports its function's module
# before the task starts, and tests/tasks.py imports zdq (Dask with it): a second of CPU in every
# new child, several per test on a loaded machine, that these (importing nothing of zdq) save.
def add_here(a: int, b: int) -> int:
    return a + b


def sleep_here(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def blob_here(n_bytes: int) -> bytes:
    return b"x" * n_bytes


def pid_and_parent() -> tuple[int, int]:
    return os.getpid(), os.getppid()


def write_pid_and_sleep(path: str, seconds: float) -> float:
    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)
    return seconds


def allocate_and_sleep(path: str, n_bytes: int, seconds: float) -> int:
    """Hold ``n_bytes`` of touched memory, say so in ``path`` (pid and bytes), then sleep."""
    block = bytearray(n_bytes)
    block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page: resident, not just reserved
    Path(path).write_text(f"{os.getpid()} {n_bytes}")
    time.sleep(seconds)
    return len(block)


def exit_now(code: int) -> None:
    os._exit(code)


def start_sleep_and_sleep(path: str, seconds: float) -> None:
    """Start ``sleep 300`` (a grandchild of the consumer), write its pid to ``path``, then sleep."""
    sleeper = subprocess.Popen(["sleep", "300"])
    Path(path).write_text(str(sleeper.pid))
    time.sleep(seconds)


def fork_and_sleep(path: str, seconds: float) -> None:
    """Fork a process that sleeps 300 s, write its pid to ``path``, then sleep."""
    pid = os.fork()
    if pid == 0:
        time.sleep(300)
        os._exit(0)
    Path(path).write_text(str(pid))
    time.sleep(seconds)


class TwoArgError(Exception):
    """Pickles (its args hold one message) but does not load: its __init__ wants two."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}-{b}")


def raise_two_arg_error() -> None:
    raise TwoArgError(1, 2)


class NewWantsTwo(Exception):
    """Its own ``__new__`` wants two arguments too: it cannot be made again even without its
    ``__init__``."""

    def __new__(cls, a: int, b: int) -> NewWantsTwo:
        return super().__new__(cls, a)

    def __init__(self, a: int, b: int) -> None:
        super().__init__(a)


class MuteTwoArgError(TwoArgError):
    """Its ``__str__`` raises."""

    def __str__(self) -> str:
        raise RuntimeError("no str")


def raise_new_wants_two() -> None:
    raise NewWantsTwo(1, 2)


def raise_mute_two_arg_error() -> None:
    raise MuteTwoArgError(1, 2)


def _refuse(text: str) -> None:
    raise ValueError(f"refusing to load {text!r}")


class LoadsBadly:
    """Pickles, and raises ValueError when loaded."""

    def __reduce__(self) -> tuple[object, ...]:
        return (_refuse, ("a LoadsBadly",))


def return_loads_badly() -> LoadsBadly:
    return LoadsBadly()


def return_a_lock() -> object:
    import threading

    return threading.Lock()
