"""Tasks for the hard time limit tests: each one runs in a child process of its consumer."""

from __future__ import annotations

import os
import time
from pathlib import Path


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
