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


def tiny_sleep(x: int) -> int:
    time.sleep(0.0001)
    return x


def poison(marker: str) -> None:
    """Kills the worker process that runs it, after noting the attempt in ``marker``."""
    import signal

    with open(marker, "a") as f:
        f.write("attempt\n")
    os.kill(os.getpid(), signal.SIGKILL)


def flaky(counter: str, failures: int) -> int:
    """Fails ``failures`` times (counted in the file ``counter``), then returns the attempt number."""
    attempts = int(open(counter).read() or 0) + 1 if os.path.exists(counter) else 1
    with open(counter, "w") as f:
        f.write(str(attempts))
    if attempts <= failures:
        raise ValueError(f"attempt {attempts} fails")
    return attempts


def raise_key_error() -> None:
    raise KeyError("no retry for me")


def span(seconds: float) -> tuple[float, float, str]:
    """Sleeps; returns when it ran (wall clock, comparable across processes) and on which thread."""
    import threading

    start = time.time()
    time.sleep(seconds)
    return start, time.time(), threading.current_thread().name
