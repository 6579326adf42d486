"""The tiers hold: the unit tier refuses what is not pure code, and Dask processes are known as a cluster."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest
import zmq

from tests.conftest import _cluster_command

REFUSED = pytest.fail.Exception  # what the unit tier's guard raises: an outcome, not an Exception


def test_a_unit_test_that_opens_a_socket_fails_with_what_it_tried() -> None:
    with pytest.raises(REFUSED, match=r"may not open a socket \(socket.socket\).*move this test to tests/"):
        socket.socket()
    with pytest.raises(REFUSED, match="may not open a socket"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)


def test_a_unit_test_that_makes_a_zmq_context_or_socket_fails() -> None:
    with pytest.raises(REFUSED, match="may not make a zmq Context"):
        zmq.Context()
    with pytest.raises(REFUSED, match="may not make a zmq Context"):
        zmq.Context.instance()


def test_a_unit_test_that_starts_a_thread_fails_even_when_the_code_catches_exceptions() -> None:
    started = []
    with pytest.raises(REFUSED, match="may not start a thread"):
        try:
            threading.Thread(target=started.append, args=(1,)).start()
        except Exception:  # the code under test swallowing errors does not hide the refusal
            pass
    assert started == []


def test_a_unit_test_that_starts_a_subprocess_fails() -> None:
    with pytest.raises(REFUSED, match="may not start a subprocess"):
        subprocess.run([sys.executable, "-c", "pass"], check=False)
    with pytest.raises(REFUSED, match=r"may not start a process \(os.system\)"):
        os.system("true")


def test_dask_scheduler_and_worker_commands_count_as_starting_a_cluster() -> None:
    assert _cluster_command(["ip", "netns", "exec", "p-sched", "/venv/bin/dask", "scheduler", "--port", "8786"])
    assert _cluster_command(["dask", "worker", "tcp://10.0.0.1:8786"])
    assert _cluster_command([sys.executable, "-m", "distributed.cli.dask_worker", "tcp://127.0.0.1:1"])
    assert _cluster_command("dask scheduler --no-dashboard")
    assert not _cluster_command([sys.executable, "-m", "zdq.cli", "inspect", "/tmp/q"])
    assert not _cluster_command(["mount", "-t", "tmpfs", "tmpfs", "/mnt/worker"])
