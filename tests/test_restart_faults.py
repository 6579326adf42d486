"""Issue 23, points 3 and 7: a program started again after its driver was killed, and an embedded
pool dropped without close().

3. A durable pool's driver is SIGKILLed while its brokers live on: they are on the worker
   processes of a cluster that outlives the driver. Dask releases their actors once the scheduler
   sees the driver's client gone, and each broker lets go of its directory at its next heartbeat.
   The program started again at once (as a supervisor restarts it) must reopen the pool as soon
   as the locks are free, say meanwhile what it waits for, and run the tasks the dead driver stored.
7. ``QueuePool(None, 1, parallel=2)`` starts a local cluster of two worker processes: the pool
   dropped without close(), or alive when its script ends, must leave none of them running.

Real processes, real signals, real LMDB directories; every wait is bounded.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from distributed import Client

from zdq import QueuePool

from .conftest import wait_until

pytest_plugins = ["tests.harness"]

pytestmark = [pytest.mark.faults, pytest.mark.cluster]

ROOT = str(Path(__file__).resolve().parent.parent)
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
N_TASKS = 40
#: The crashed pool's heartbeat interval (s): its brokers let go at their next beat after Dask
#: releases them, and the test kills the driver just after a beat, so they hold on ~HEARTBEAT s.
HEARTBEAT = 4

# One program, run twice: "first" stores N_TASKS tasks in a durable pool and waits to be killed;
# "again" (the program started again) connects, waits for the go file, opens the same pool, and
# runs what the first stored. Each step is written to the status file; logs go to stderr.
_PROGRAM = """
import logging, os, sys, time
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
from distributed import Client
from zdq import ConsumerPool, QueuePool
from tests.tasks import write_start

address, dirpath, marks, mode, status, go = sys.argv[1:7]

def say(what):
    with open(status + ".tmp", "w") as f:
        f.write(what)
    os.replace(status + ".tmp", status)

client = Client(address, timeout=60)
if mode == "heavy":
    # Resident memory that the kernel frees before it closes the killed process's sockets: the
    # scheduler sees its client leave ~0.1 s after the SIGKILL, when a restart may already look.
    ballast = bytearray(b"x") * (BALLAST_MB << 20)
if mode in ("first", "heavy"):
    # Its brokers beat every HEARTBEAT s from (at the latest) when QueuePool returns: a released
    # broker lets go of its directory at its next beat.
    pool = QueuePool(client, 2, durability="durable", dirpath=dirpath, workers=["a", "b"],
                     heartbeat_interval="HEARTBEATs", heartbeat_timeout="30s")
    beating = time.time()
    for i in range(N_TASKS):
        pool.submit(write_start, os.path.join(marks, str(i)))
    pool.flush(timeout=60)
    say("stored %r" % beating)
    time.sleep(600)  # killed here
else:
    say("connected")
    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    pool = QueuePool(client, 2, durability="durable", dirpath=dirpath, workers=["a", "b"])
    say("opened %.2f" % (time.monotonic() - started))
    consumers = ConsumerPool(client, pool, n_consumers=1, workers=["c"])
    consumers.start()
    consumers.join(timeout=60)
    consumers.close()
    pool.close()
    client.close()
    say("done")
""".replace("N_TASKS", str(N_TASKS)).replace("HEARTBEAT", str(HEARTBEAT)).replace("BALLAST_MB", "1500")


def _program(client: Client, tmp_path: Path, mode: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    status, log = tmp_path / f"{mode}.status", tmp_path / f"{mode}.log"
    args = [sys.executable, "-c", _PROGRAM, client.scheduler.address, str(tmp_path / "queues"), str(tmp_path / "marks")]
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            args + [mode, str(status), str(tmp_path / "go")], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=err
        )
    return proc, status, log


def _status(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _step(proc: subprocess.Popen[bytes], status: Path, log: Path, prefix: str, timeout: float) -> str:
    """Wait (bounded) until the program's status starts with ``prefix``; fail naming its log if it
    died or did not get there."""

    def reached() -> bool:
        return _status(status).startswith(prefix) or proc.poll() is not None

    try:
        wait_until(reached, timeout=timeout, interval=0.02)
    except pytest.fail.Exception:
        pytest.fail(f"the program did not reach {prefix!r} within {timeout} s: {log.read_text()[-3000:]}")
    if not _status(status).startswith(prefix):
        pytest.fail(f"the program ended (rc {proc.returncode}) before {prefix!r}: {log.read_text()[-3000:]}")
    return _status(status)


def test_a_program_started_again_after_its_driver_was_killed_reopens_its_durable_pool_once_the_locks_are_free(
    client_abc: Client, tmp_path: Path
) -> None:
    client3 = client_abc  # a driver process is killed, no worker: the shared cluster serves
    (tmp_path / "marks").mkdir()
    first, first_status, first_log = _program(client3, tmp_path, "first")
    again: subprocess.Popen[bytes] | None = None
    try:
        beating = float(_step(first, first_status, first_log, "stored", 90).split()[1])
        again, status, log = _program(client3, tmp_path, "again")
        _step(again, status, log, "connected", 60)  # started and connected: it opens the pool on "go"
        # Killed just after its brokers' beat: they hold the directories ~HEARTBEAT s more, and the
        # program started again at once finds them locked (as a supervisor's restart would).
        kill_at = beating + HEARTBEAT * math.ceil((time.time() + 0.5 - beating) / HEARTBEAT) + 0.3
        time.sleep(max(0.0, kill_at - time.time()))
        os.kill(first.pid, signal.SIGKILL)
        killed = time.monotonic()
        first.wait(timeout=10)
        (tmp_path / "go").touch()
        opened = _step(again, status, log, "opened", 40)
        took = float(opened.split()[1])
        text = log.read_text()
        assert took < 15 and time.monotonic() - killed < 20, (
            f"the pool was reopened {took:.1f} s after the program started again (the dead driver's brokers "
            f"let go within {HEARTBEAT} s of the kill): {text[-3000:]}"
        )
        # It said what it waited for: the directory, and that a broker of the dead pool holds it.
        assert "default-queue-" in text and "is locked by" in text and "waiting up to" in text, (
            f"the program did not say what it waited for: {text[-3000:]}"
        )
        assert "broker of pool default" in text, f"the lock's holder was not named: {text[-3000:]}"
        _step(again, status, log, "done", 90)
        again.wait(timeout=30)
        assert again.returncode == 0, text[-3000:]
        assert len(os.listdir(tmp_path / "marks")) == N_TASKS, "the tasks the dead driver stored did not all run"
    finally:
        _kill(first)
        if again is not None:
            _kill(again)


def test_a_program_started_again_before_the_scheduler_sees_its_killed_driver_gone_does_not_attach_to_the_dying_pool(
    client_abc: Client, tmp_path: Path
) -> None:
    """The restart looks for the pool within milliseconds of the SIGKILL, while the dead driver's
    client still looks connected (the kernel closes a killed process's sockets only after freeing
    its memory): it must not attach to the pool its owner's death is about to close, but wait for
    the dead brokers' locks, place the queues itself, and run what the dead driver stored."""
    client3 = client_abc  # a driver process is killed, no worker: the shared cluster serves
    (tmp_path / "marks").mkdir()
    first, first_status, first_log = _program(client3, tmp_path, "heavy")
    again: subprocess.Popen[bytes] | None = None
    try:
        _step(first, first_status, first_log, "stored", 120)
        again, status, log = _program(client3, tmp_path, "again")
        _step(again, status, log, "connected", 60)
        os.kill(first.pid, signal.SIGKILL)
        (tmp_path / "go").touch()  # at once: the restart looks while the dead client is still listed
        killed = time.monotonic()
        first.wait(timeout=10)
        opened = _step(again, status, log, "opened", 45)
        _step(again, status, log, "done", 90)
        again.wait(timeout=30)
        text = log.read_text()
        assert "closed by its owner" not in text and "Attached to" not in text, (
            f"the restarted program attached to the pool of its killed driver: {text[-3000:]}"
        )
        assert again.returncode == 0, text[-3000:]
        assert "is locked by" in text and "waiting up to" in text, f"it did not say what it waited for: {text[-3000:]}"
        assert float(opened.split()[1]) < 20 and time.monotonic() - killed < 60, text[-3000:]
        assert len(os.listdir(tmp_path / "marks")) == N_TASKS, "the tasks the dead driver stored did not all run"
    finally:
        _kill(first)
        if again is not None:
            _kill(again)


def test_a_durable_pool_whose_directory_stays_locked_raises_queue_locked_at_the_bound_naming_the_holder(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Held by a process that is no broker of the cluster (this one) and registered by no pool:
    nothing to attach to and nothing that lets go. The pool says what it waits for, then gives up."""
    from zdq.client import brokers
    from zdq.errors import QueueLocked
    from zdq.storage.lmdb import LMDBStorage

    # 2 s: placing is tried again every 2 s and the holders asked every 0.5 s, so the pool has
    # placed twice and asked three times when it gives up (4 s waited out one more placement).
    monkeypatch.setattr(brokers, "LOCKED_WAIT", 2.0)
    queue_dir = str(tmp_path / "default-queue-0")
    holder = LMDBStorage(queue_dir)
    holder.open()
    try:
        started = time.monotonic()
        with caplog.at_level("WARNING", logger="zdq"), pytest.raises(QueueLocked) as raised:
            QueuePool(client, 1, durability="durable", dirpath=tmp_path)
        took = time.monotonic() - started
    finally:
        holder.close()
    assert took < 20, f"QueueLocked came {took:.1f} s after the call, for a 2 s bound"
    message = str(raised.value)
    assert "could not be opened within 2 s" in message and queue_dir in message, message
    assert "not one of its brokers" in message and "released" in message and "register" in message, message
    told = [r.getMessage() for r in caplog.records if "waiting up to" in r.getMessage()]
    assert len(told) == 1 and queue_dir in told[0], told  # said once, naming the directory


# -- 7. an embedded pool dropped without close() -----------------------------------------------------


def _children() -> set[int]:
    """This process's live child processes, but multiprocessing's resource tracker."""
    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(child.cmdline()):
                found.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def _alive(pids: set[int]) -> set[int]:
    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return {pid for pid in pids if running(pid)}


def _no_default_client() -> None:
    from distributed import default_client

    with pytest.raises(ValueError):
        default_client()


def test_an_embedded_pool_dropped_without_close_stops_its_worker_processes() -> None:
    _no_default_client()
    before = _children()
    pool: QueuePool | None = QueuePool(None, 1, parallel=2)
    assert pool is not None
    workers = set(pool.client.run(os.getpid).values())
    assert len(workers) == 2 and workers <= _children()
    del pool
    gc.collect()
    try:
        wait_until(lambda: not _alive(workers), timeout=20, interval=0.2)
    except pytest.fail.Exception:
        left = _alive(workers)
        for pid in left:  # not left running for the next tests
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the worker processes {sorted(left)} of the dropped pool's local cluster were still running after 20 s")
    wait_until(lambda: _children() <= before, timeout=20)
    _no_default_client()


_ENDS_WITHOUT_CLOSE = """
import os, sys
from zdq import QueuePool
if __name__ == "__main__":
    pool = QueuePool(None, 1, parallel=2)
    with open(sys.argv[1], "w") as f:
        f.write(" ".join(str(pid) for pid in pool.client.run(os.getpid).values()))
    # ends here, without close()
"""


def test_a_script_that_ends_without_closing_its_embedded_pool_leaves_no_process_and_no_traceback(tmp_path: Path) -> None:
    script, pids_file = tmp_path / "ends.py", tmp_path / "pids"
    script.write_text(_ENDS_WITHOUT_CLOSE)
    proc = subprocess.run(
        [sys.executable, str(script), str(pids_file)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Exception" not in proc.stderr, proc.stderr[-3000:]
    workers = {int(pid) for pid in pids_file.read_text().split()}
    assert len(workers) == 2
    check: Callable[[], bool] = lambda: not _alive(workers)
    try:
        wait_until(check, timeout=20, interval=0.2)
    except pytest.fail.Exception:
        left = _alive(workers)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the worker processes {sorted(left)} outlived the script that ended without close()")
