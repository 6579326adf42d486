"""The unit tier: pure code only (no sockets, threads, subprocesses or clusters); `pytest -m unit`.

A guard holds every test here to that: for the test's duration, opening a socket, making a zmq
context or socket, starting a thread or a subprocess fails the test with what it tried. The tier
stays what a developer can run after every edit (seconds, nothing left behind, nothing that waits
on a scheduler), and a test that needs those belongs beside the others in tests/. LMDB files in
``tmp_path`` are allowed: they are files, and fast.
"""

from __future__ import annotations

import _thread
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from typing import Any, NoReturn

import pytest
import zmq

# croniter asks platform.architecture() when it is first imported, which runs `file` in a
# subprocess: imported here, before any guard is up, so that the code under test only computes.
import croniter  # noqa: F401,E402


def _refuse(what: str) -> Any:
    def refused(*args: Any, **kwargs: Any) -> NoReturn:
        # pytest.fail raises an outcome (a BaseException): the code under test cannot swallow it
        # with an `except Exception`.
        pytest.fail(
            f"a unit test may not {what}: tests/unit/ is pure code (no sockets, zmq, threads, "
            "subprocesses or clusters); move this test to tests/",
            pytrace=True,
        )

    return refused


@pytest.fixture(autouse=True)
def _pure_code_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Patched on the classes, not on module attributes: `from socket import socket` and contexts
    # made through a subclass (zmq.asyncio) are caught as well.
    monkeypatch.setattr(socket.socket, "__init__", _refuse("open a socket (socket.socket)"))
    monkeypatch.setattr(zmq.Context, "__init__", _refuse("make a zmq Context"))
    monkeypatch.setattr(zmq.Socket, "__init__", _refuse("make a zmq socket"))
    monkeypatch.setattr(threading.Thread, "start", _refuse("start a thread"))
    monkeypatch.setattr(_thread, "start_new_thread", _refuse("start a thread (_thread.start_new_thread)"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("start a subprocess"))
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, _refuse(f"start a process (os.{name})"))
    yield
