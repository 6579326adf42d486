"""Functions the Executor tests submit: importable by worker processes, as user code would be."""

from __future__ import annotations

import time
from typing import Any


class Box:
    """An object whose lifetime the tests follow with a weak reference."""

    def __init__(self, value: Any) -> None:
        self.value = value


def echo(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def unbox(box: Box) -> Box:
    """A new Box (the result's object) holding the argument's value."""
    return Box(box.value)


def square(x: int) -> int:
    return x * x


def square_unless(x: int, bad: int) -> int:
    if x == bad:
        raise KeyError(f"item {x}")
    return x * x


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def nap_marked(path: str, seconds: float) -> float:
    """Notes in the file ``path`` that it started, then sleeps."""
    with open(path, "w") as f:
        f.write("started")
    time.sleep(seconds)
    return seconds


def nap_noted(dirpath: str, i: int, seconds: float) -> int:
    """Notes that call ``i`` ran (a file named ``i`` in ``dirpath``), then sleeps."""
    with open(f"{dirpath}/{i}", "w") as f:
        f.write("ran")
    time.sleep(seconds)
    return i
