"""Functions the tests submit: importable by worker processes, as user code would be."""

from __future__ import annotations

import os
import time


def process_item() -> int:
    return sum(i * i for i in range(10**2))


def noop(x: object = None) -> object:
    return x


def add(a: int, b: int = 0) -> int:
    return a + b


def fail(message: str) -> None:
    raise ValueError(message)


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def pid() -> int:
    return os.getpid()


def slow_add(a: int, b: int = 0) -> int:
    time.sleep(0.0005)
    return a + b
