"""Functions the tests submit: importable by worker processes, as user code would be."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from zdq import Task


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


def fails_then_kills(marker: str, kill_at: int) -> None:
    """Notes the attempt in ``marker``, takes 0.2 s, then raises OSError, except at attempt
    ``kill_at``, which kills the worker process that runs it."""
    import signal

    with open(marker, "a") as f:
        f.write("attempt\n")
    time.sleep(0.2)
    if open(marker).read().count("attempt") == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError("the card was declined")


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


# -- for tests/test_faults.py ------------------------------------------------------------------


class TwoArgError(Exception):
    """Pickles (as ``TwoArgError(message)``) but cannot be unpickled: ``__init__`` takes two arguments."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")


def raise_two_arg_error(code: int = 7, detail: str = "bad") -> None:
    raise TwoArgError(code, detail)


class LoadsBadlyError(Exception):
    """Pickles in a way of its own whose loading raises: it cannot travel back at all."""

    def __reduce__(self) -> tuple[object, ...]:
        return (_refuse_to_load, (str(self),))


def _refuse_to_load(text: str) -> None:
    raise ValueError(f"refusing to load {text!r}")


def raise_loads_badly(text: str) -> None:
    raise LoadsBadlyError(text)


def sleep_return(x: object, seconds: float) -> object:
    time.sleep(seconds)
    return x


def mark_and_sleep(marker: str, seconds: float) -> float:
    """Writes ``marker`` (so the test knows the task started), then sleeps."""
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return seconds


def counted_sleep(path: str, seconds: float) -> float:
    """Adds a line to the file ``path`` for each run (the test counts the runs), then sleeps."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return seconds


def hold_gil(seconds: float, report: str | None = None) -> float:
    """Hold the GIL for at least ``seconds`` in ONE C call that never releases it; return how long
    that call held it (also written to the file ``report``, if given, as soon as it is known).

    libc's ``nanosleep`` called through ``ctypes.PyDLL``, which (unlike ``CDLL``) keeps the GIL
    for the whole call: no other thread of the process runs Python code meanwhile, for as long as
    asked and no longer (a catastrophically backtracking ``re`` match, used before, can only
    double its time per character and held the GIL for up to twice, in all its attempts up to
    four times, what was asked). The time returned is measured, not assumed: a sleep a signal cut
    short shows as a shorter hold, and the tests assert on it.
    """
    import ctypes

    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    whole = int(seconds)
    asked = Timespec(whole, min(999_999_999, int(round((seconds - whole) * 1e9))))
    nanosleep = ctypes.PyDLL(None).nanosleep
    nanosleep.argtypes = [ctypes.POINTER(Timespec), ctypes.POINTER(Timespec)]
    start = time.perf_counter()
    nanosleep(ctypes.byref(asked), None)
    took = time.perf_counter() - start
    if report is not None:
        with open(report + ".tmp", "w") as f:
            f.write(repr(took))
        os.replace(report + ".tmp", report)
    return took


def dask_idioms(x: int) -> tuple[str, str, int, int]:
    """What Dask tasks do, from inside a zdq task: find their worker, reach the cluster, secede
    while waiting on other work, rejoin, and use a worker client."""
    import operator
    import threading

    from distributed import get_client, get_worker, rejoin, secede, worker_client

    worker = get_worker()
    client = get_client()
    future = client.submit(operator.add, x, 1, pure=False)
    secede()
    first = future.result(timeout=60)
    rejoin()
    with worker_client() as inner:
        second = inner.submit(operator.mul, x, 2, pure=False).result(timeout=60)
    return str(worker.address), threading.current_thread().name, first, second


def page(path: str, doc: int, number: int) -> int:
    """A page of a document: noted in ``path`` (one line), so that a test sees it ran."""
    with open(path, "a") as f:
        f.write(f"{doc}-{number}\n")
    return number


def document(path: str, doc: int, pages: int) -> int:
    """A document task that fans out into its pages, submitted to its own pool from inside the task."""
    import zdq

    zdq.current_pool().batch_submit([(page, path, doc, i) for i in range(pages)])
    return pages


def raise_large(n_bytes: int) -> None:
    raise ValueError("e" * n_bytes)


def blob(n_bytes: int) -> bytes:
    return b"x" * n_bytes


def marked_blob(directory: str, i: int, n_bytes: int, seconds: float) -> bytes:
    """``blob``, each run of task ``i`` marked with an ``x`` in ``directory/i``, after ``seconds``."""
    with open(os.path.join(directory, str(i)), "a") as f:
        f.write("x")
    time.sleep(seconds)
    return b"x" * n_bytes


def raise_timeout() -> None:
    raise TimeoutError("the task's own timeout")


def started_at(x: object = None) -> int:
    """When this task started (wall clock, nanoseconds): tests compare it with release times."""
    return time.time_ns()


def write_start(path: str) -> None:
    """Write when this task started into ``path`` (results of an earlier pool's tasks go elsewhere)."""
    with open(path, "w") as f:
        f.write(repr(time.time()))


# -- tasks as objects (zdq.Task) ------------------------------------------------------------------
@dataclass
class Square(Task):
    x: int

    def execute(self) -> int:
        return self.x * self.x


@dataclass
class FlakyTask(Task):
    counter: str
    failures: int

    def execute(self) -> int:
        return flaky(self.counter, self.failures)


@dataclass
class Stamp(Task):
    """Appends the time it ran to ``path`` (one line per execution); returns that time."""

    path: str

    def execute(self) -> float:
        now = time.time()
        with open(self.path, "a") as f:
            f.write(f"{now}\n")
        return now


def worker_only(folder: str, module: str, i: int) -> object:
    """Task ``i`` of a batch, using module ``module`` that it writes to ``folder`` and imports
    there: a module only the workers have (the driver never imports it). Task 5 raises its
    ``AppError``; task 7 returns one of its ``Thing`` objects inside a list; the others ``i``."""
    import importlib
    import sys

    path = os.path.join(folder, f"{module}.py")
    if not os.path.exists(path):
        with open(path + ".tmp", "w") as f:
            f.write("class AppError(Exception):\n    pass\n\n\nclass Thing:\n    pass\n")
        os.replace(path + ".tmp", path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    mod = importlib.import_module(module)
    if i == 5:
        raise mod.AppError("the real failure text")
    if i == 7:
        return [i, mod.Thing()]
    return i
