"""ipc:// between a driver and the brokers of its own host, on real clusters: the links go over
the brokers' Unix sockets (still CurveZMQ: other keys are refused), fall back to TCP when the
socket is not usable from the driver, the files go when the pool closes, files of killed brokers
are swept by the next broker start (and only those: not a busy socket, not another kernel's), a
relative directory binds nothing, a foreign listener at a broker's path is named when consumers
cannot reach it, and a durable broker SIGKILLed mid-task is recovered and reached over ipc again
with the task re-delivered (tests/unit/test_ipc_paths.py has the pure parts)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from distributed import Client

from zdq import ConsumerPool, QueuePool
from zdq.errors import BrokerUnreachable
from zdq.transport.ipc import ipc_dir, ipc_endpoint, ipc_path, serve_on_ipc, sweep
from zdq.transport.reach import Watch
from zdq._actor import scheduler_workers

from .conftest import pid_of, stop_process, wait_until
from .tasks import add, mark_and_sleep

pytestmark = pytest.mark.cluster

FAST = {"heartbeat_interval": "250ms", "heartbeat_timeout": "2s"}
ROOT = str(Path(__file__).resolve().parent.parent)


@pytest.fixture
def tmp_path(short_tmp_path: Path) -> Path:
    """Short paths here: a socket path in pytest's own directory can be too long for the kernel."""
    return short_tmp_path


def _addresses(qp: QueuePool) -> list[str]:
    """The addresses the pool's driver connected its links to (read from the test's thread)."""
    driver = qp._driver
    assert driver is not None and driver._loop._bl is not None
    return list(driver._loop._bl.addresses)


def test_a_driver_reaches_the_brokers_of_its_host_over_ipc_with_curve_and_the_files_go_with_the_pool(
    client: Client,
) -> None:
    with QueuePool(client, 2, **FAST) as qp:
        addresses = _addresses(qp)
        assert all(a.startswith("ipc://") for a in addresses), addresses
        paths = [a[len("ipc://") :] for a in addresses]
        directory = os.path.dirname(paths[0])
        assert os.stat(directory).st_mode & 0o777 == 0o700 and os.stat(directory).st_uid == os.getuid()
        with ConsumerPool(client, qp, n_consumers=2, max_concurrency=1) as consumers:
            consumers.start()
            assert [qp.submit(add, i, 1).result(timeout=30) for i in range(50)] == [i + 1 for i in range(50)]
        # CurveZMQ holds over ipc: a peer with another pool's keys is refused at the handshake.
        ctx = zmq.Context()
        try:
            intruder = ctx.socket(zmq.DEALER)
            keys = qp.client_keys
            assert keys is not None  # auth is on by default
            public, secret = zmq.curve_keypair()  # not the pool's client key
            intruder.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
            intruder.setsockopt(zmq.CURVE_PUBLICKEY, public)
            intruder.setsockopt(zmq.CURVE_SECRETKEY, secret)
            watch = Watch(intruder)
            intruder.connect(addresses[0])
            intruder.send(b"x")
            assert intruder.poll(1000) == 0, "a peer without the pool's keys got an answer over ipc"
            wait_until(lambda: "refused this peer's CurveZMQ keys" in watch.why(), timeout=10)
            watch.close()
            intruder.close(linger=0)
        finally:
            ctx.term()
    wait_until(lambda: not any(os.path.exists(p) for p in paths), timeout=15)


def test_a_driver_that_finds_no_usable_ipc_socket_connects_over_tcp(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The workers keep their own directory; this process looks in another one, as a driver on
    # another host (or in another user's session) finds no socket for the brokers' endpoints.
    monkeypatch.setenv("ZDQ_IPC_DIR", str(tmp_path))
    with QueuePool(client, 1, **FAST) as qp:
        assert all(a.startswith("tcp://") for a in _addresses(qp)), _addresses(qp)
        with ConsumerPool(client, qp, n_consumers=1, max_concurrency=1) as consumers:
            consumers.start()
            assert qp.submit(add, 2, 3).result(timeout=30) == 5


def _private_path(base: Path, monkeypatch: pytest.MonkeyPatch, endpoint: str) -> tuple[str, str]:
    """This process's private directory under ``base``, and the ipc path of ``endpoint`` in it."""
    monkeypatch.setenv("ZDQ_IPC_DIR", str(base))
    directory = ipc_dir(create=True)
    assert directory is not None
    path = ipc_path(directory, endpoint)
    assert path is not None
    return directory, path


def test_a_socket_file_nothing_listens_on_falls_back_to_tcp_and_is_swept_once_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = "tcp://127.0.0.1:40001"
    directory, path = _private_path(tmp_path, monkeypatch, endpoint)
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    assert ipc_endpoint(endpoint) == f"ipc://{path}"
    live.close()  # a killed broker's file: still there, nothing listens
    assert os.path.exists(path) and ipc_endpoint(endpoint) is None
    assert sweep(directory) == 0  # too young: a broker may have bound it and not listen yet
    assert sweep(directory, now=time.time() + 120, limit=0) == 0  # probes are bounded
    assert sweep(directory, now=time.time() + 120) == 1 and not os.path.exists(path)


def _refusing(path: str, age: float) -> None:
    """A socket file nothing listens on (a killed broker's), ``age`` seconds old."""
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()
    then = time.time() - age
    os.utime(path, (then, then))


@pytest.mark.faults
def test_a_broker_start_sweeps_the_file_of_a_killed_broker(tmp_path: Path) -> None:
    # A fresh process: its first broker start is the one that sweeps (serve_on_ipc, as the actor calls it).
    script = f"""
import os, socket, time, zmq
os.environ["ZDQ_IPC_DIR"] = {str(tmp_path)!r}
from zdq.transport.ipc import ipc_dir, ipc_path, serve_on_ipc
stale = ipc_path(ipc_dir(create=True), "tcp://127.0.0.1:40013")
dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
dead.bind(stale)
dead.close()
os.utime(stale, (time.time() - 600, time.time() - 600))
sock = zmq.Context.instance().socket(zmq.ROUTER)
binding = serve_on_ipc(sock, "tcp://127.0.0.1:40014")
print(binding is not None, os.path.exists(stale), flush=True)
binding.remove()
sock.close(linger=0)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )
    assert out.stdout.split() == ["True", "False"], (out.stdout, out.stderr)


@pytest.mark.faults
def test_the_sweep_keeps_a_busy_socket_and_the_sockets_of_another_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, path = _private_path(tmp_path, monkeypatch, "tcp://127.0.0.1:40021")
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.bind(path)
    busy.listen(0)
    waiting = []  # fill its accept queue: a new connection fails at once with EAGAIN
    for _ in range(3):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(path)
        except BlockingIOError:
            pass
        waiting.append(c)
    then = time.time() - 120
    os.utime(path, (then, then))
    # A socket bound by another host's kernel in a shared directory refuses this kernel's connections.
    foreign = os.path.join(directory, "b-" + "0" * 24)
    _refusing(foreign, 120)
    try:
        assert sweep(directory) == 0
        assert os.path.exists(path), "a live broker's socket was swept because its accept queue was full"
        assert os.path.exists(foreign), "another kernel's socket was swept"
    finally:
        for c in waiting:
            c.close()
        busy.close()


def test_a_relative_directory_binds_no_ipc_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # libzmq reads ipc://@... as a Linux abstract socket (no file, so no permission guards it).
    (tmp_path / "@zdq").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ZDQ_IPC_DIR", "@zdq")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        assert serve_on_ipc(sock, "tcp://127.0.0.1:40031") is None
        assert sock.getsockopt(zmq.LAST_ENDPOINT) == b"", "the broker's socket is left bound although ipc is refused"
    finally:
        sock.close(linger=0)
        ctx.term()


@pytest.mark.faults
def test_a_foreign_listener_at_a_brokers_ipc_path_is_named_when_consumers_cannot_reach_it(client: Client) -> None:
    workers = sorted(scheduler_workers(client))
    with QueuePool(client, 1, workers=[workers[0]], connect_timeout="2s", **FAST) as qp:
        address = _addresses(qp)[0]
        assert address.startswith("ipc://"), address
        path = address[len("ipc://") :]
        os.unlink(path)
        squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # accepts (its queue does), never speaks
        squatter.bind(path)
        squatter.listen(64)
        try:
            with (
                ConsumerPool(client, qp, n_consumers=1, max_concurrency=1, workers=[workers[1]]) as consumers,
                pytest.raises(BrokerUnreachable) as caught,
            ):
                consumers.start()
        finally:
            squatter.close()
            os.unlink(path)
    message = str(caught.value)
    assert f"Unix socket {address}" in message and "another process" in message, message
    assert "open the brokers' ports" not in message, message


@pytest.mark.faults
def test_a_stopped_broker_that_consumers_cannot_reach_is_said_to_be_stopped_not_its_sockets_path(client3: Client) -> None:
    """A broker whose worker was SIGSTOPped accepts Unix-socket connections (the kernel does) and
    never shakes hands: start()'s error advised removing the socket's file. The pool's driver
    hears nothing from that broker either, so the error now says the broker is stopped."""
    # Heartbeats 4 a second, so that the driver tells a silent broker within a second; and a
    # timeout long enough that the driver does not take it as lost meanwhile.
    beats = {"heartbeat_interval": "250ms", "heartbeat_timeout": "30s", "connect_timeout": "2s"}
    with QueuePool(client3, 1, workers=["a"], **beats) as qp:
        assert _addresses(qp)[0].startswith("ipc://"), _addresses(qp)
        with ConsumerPool(client3, qp, n_consumers=1, workers=["b"]) as consumers:
            victim = pid_of(client3, "a")
            stop_process(victim)
            try:
                wait_until(lambda: qp.driver.broker_silence(0) >= 1.5, timeout=30)  # silent to the driver too
                with pytest.raises(BrokerUnreachable) as caught:
                    consumers.start()
                # join() says so too, at once, for tasks that wait there (the broker, stopped, cannot
                # tell what it holds: this process's own tasks awaiting it count)...
                futures = [qp.submit(add, i, 1) for i in range(20)]
                started = time.monotonic()
                with pytest.raises(BrokerUnreachable):  # not the timeout's ZdqTimeoutError
                    consumers.join(timeout=30)  # the stopped broker's status is waited for 10 s
                assert time.monotonic() - started < 20
            finally:
                os.kill(victim, signal.SIGCONT)
            message = str(caught.value)
            assert "has not heard that broker either" in message and "SIGCONT" in message, message
            assert "ss -xlp" not in message and "open the brokers' ports" not in message, message
            # ... and, resumed, the broker answers the moment its consumer reaches it again: join()
            # raised BrokerUnreachable then, its verdict from before not yet judged again.
            consumers.join(timeout=60)
            assert [f.result(timeout=30) for f in futures] == [i + 1 for i in range(20)]
            # Reached again, the queue is held up no more, whatever join() read a moment before.
            assert not consumers.still_held_up(0)


@pytest.mark.faults
def test_a_durable_broker_killed_mid_task_is_reached_over_ipc_again_and_the_task_is_redelivered(
    client3: Client, tmp_path: Path
) -> None:
    marker = str(tmp_path / "started")
    with QueuePool(client3, 1, durability="durable", dirpath=tmp_path / "q", workers=["a"], **FAST) as qp:
        assert _addresses(qp)[0].startswith("ipc://"), _addresses(qp)
        first = _addresses(qp)[0]
        with ConsumerPool(client3, qp, n_consumers=1, max_concurrency=1, workers=["b"]) as consumers:
            consumers.start()
            fut = qp.submit(mark_and_sleep, marker, 1.0)
            wait_until(lambda: os.path.exists(marker), timeout=30)
            os.kill(pid_of(client3, "a"), signal.SIGKILL)
            assert fut.result(timeout=60) == 1.0  # re-delivered or its DONE reached the new broker
            wait_until(lambda: qp.recoveries >= 1, timeout=60)
            wait_until(lambda: _addresses(qp)[0] != first, timeout=30)
            assert _addresses(qp)[0].startswith("ipc://"), _addresses(qp)
            assert qp.submit(add, 1, 2).result(timeout=30) == 3


def test_a_process_that_exits_with_a_broker_still_serving_removes_its_file_and_a_forked_child_does_not(
    tmp_path: Path,
) -> None:
    script = f"""
import os, sys, zmq
os.environ["ZDQ_IPC_DIR"] = {str(tmp_path)!r}
from zdq.transport.ipc import serve_on_ipc
sock = zmq.Context.instance().socket(zmq.ROUTER)
binding = serve_on_ipc(sock, "tcp://127.0.0.1:40009")
print(binding.path, flush=True)
pid = os.fork()
if pid == 0:
    sys.exit(0)  # a child's exit (atexit runs) must not remove its parent's file
os.waitpid(pid, 0)
print(os.path.exists(binding.path), flush=True)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    path, alive_after_child = out.stdout.split()[:2]
    assert alive_after_child == "True", out.stderr
    assert not os.path.exists(path), "the file outlived its process's normal exit"
