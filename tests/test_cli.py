"""The zdq command, run as a user runs it."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.inprocess_cli import zdq_here
from zdq.benchmark.plots import NO_PLOTS
from zdq.benchmark.scale import plot_scale


def _zdq(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zdq.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.cluster  # `zdq bench` starts an embedded LocalCluster
def test_bench_runs_zdq_and_dask_on_an_embedded_cluster_and_reports_both(tmp_path: Path) -> None:
    proc = _zdq(
        "bench", "--tasks", "5000", "--dask-tasks", "100", "--repeat", "1", "--pairs", "2", "--durable", "--compare-auth",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    systems = [c["system"] for c in report["cases"]]
    assert systems[0].startswith("dask futures") and systems[1].startswith("zdq") and "pipeline" in systems[2]
    assert "durable" in systems[3] and "without authentication" in systems[4]
    assert systems[5].startswith("zdq Executor.map") and report["cases"][5]["tasks"] == 5 * 5000  # --map-tasks' default
    futures, dq_path = report["cases"][1], report["cases"][6]
    assert "futures path" in futures["system"] and "daskqueue path" in dq_path["system"] and dq_path["tasks"] == 5000
    phases = [dq_path["extra"][k] for k in ("submit_s", "join_s", "results_s")]
    # Medians of its two runs (--pairs 2), each phase's apart: about the median run's span.
    assert all(s > 0 for s in phases) and 0.5 * dq_path["median_seconds"] <= sum(phases) <= 1.5 * dq_path["median_seconds"]
    assert len(report["cases"][0]["seconds"]) == len(report["cases"][2]["seconds"]) == 1  # --repeat: Dask's, the pipeline's
    assert all(c["tasks_per_second"] > 0 for c in report["cases"])
    assert set(report["ratios"]) == {
        "no-op: zdq / dask futures",
        "no-op: zdq / bare pipeline",
        "no-op: durable / transient",
        "no-op: with auth / without auth",
        "map: zdq Executor.map / dask futures",
        "map: zdq Executor.map / zdq futures path",
        "no-op: zdq daskqueue path / zdq futures path",
        "map: zdq queue_pool.map / zdq futures path",
    }
    pool_map = report["cases"][7]
    assert pool_map["system"].startswith("zdq queue_pool.map") and pool_map["tasks"] == 5000
    assert all(r > 0 for r in report["ratios"].values())
    # The path against a batch of the futures path run beside it, moments apart (--pairs 2: the
    # median of two pairs' ratios is their mean).
    paired = dq_path["extra"]["paired_futures_s"]
    assert len(paired) == len(dq_path["seconds"]) == 2 and "futures path" in futures["system"]
    path_ratio = statistics.mean(f / d for f, d in zip(paired, dq_path["seconds"]))
    assert abs(report["ratios"]["no-op: zdq daskqueue path / zdq futures path"] - path_ratio) < 1e-9
    # The maps' too, each run beside a batch of the futures path on its own pool: rate over rate.
    for case, key in ((report["cases"][5], "map: zdq Executor.map / zdq futures path"), (pool_map, "map: zdq queue_pool.map / zdq futures path")):
        batches, runs = case["extra"]["paired_futures_s"], case["seconds"]
        assert len(batches) == len(runs) == 2
        ratio = statistics.mean((case["tasks"] / run) / (5000 / batch) for batch, run in zip(batches, runs))
        assert abs(report["ratios"][key] - ratio) < 1e-9
    # Durability's cost, taken the same way: each durable batch beside a transient one.
    durable = report["cases"][3]
    beside = durable["extra"]["paired_transient_s"]
    assert len(beside) == len(durable["seconds"]) == 2
    ratio = statistics.mean(t / d for t, d in zip(beside, durable["seconds"]))
    assert abs(report["ratios"]["no-op: durable / transient"] - ratio) < 1e-9
    assert report["workers"] == 2


@pytest.mark.cluster  # `zdq bench` starts an embedded LocalCluster
def test_bench_latency_suite_reports_zdq_dask_and_the_floor_and_their_same_run_ratios() -> None:
    proc = _zdq("bench", "--suite", "latency", "--repeat", "2", "--compare-auth", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    zdq, dask, floor, plain, ipc_floor = report["cases"]
    assert "floor over Unix sockets" in ipc_floor["system"] and report["ratios"]["latency_p50_vs_ipc_floor"] > 0
    assert zdq["system"].startswith("zdq") and dask["system"].startswith("dask futures") and "floor" in floor["system"]
    assert "without authentication" in plain["system"] and len(plain["extra"]["p50_ms_per_run"]) == 2
    per_run = [z / n for z, n in zip(zdq["extra"]["p50_ms_per_run"], plain["extra"]["p50_ms_per_run"])]
    assert abs(report["ratios"]["round trip p50: with auth / without auth"] - sum(per_run) / 2) < 0.05 * max(per_run)
    for case in (zdq, floor):
        assert len(case["extra"]["p50_ms_per_run"]) == 2 and 0 < case["extra"]["p50_ms"] <= case["extra"]["p99_ms"]
    per_run = [d / z for z, d in zip(zdq["extra"]["p50_ms_per_run"], dask["extra"]["p50_ms_per_run"])]
    assert abs(report["ratios"]["round trip p50: dask / zdq"] - sum(per_run) / 2) < 0.05
    per_run = [z / f for z, f in zip(zdq["extra"]["p50_ms_per_run"], floor["extra"]["p50_ms_per_run"])]
    assert abs(report["ratios"]["latency_p50_vs_floor"] - sum(per_run) / 2) < 0.05 * max(per_run)
    assert report["ratios"]["latency_p99_vs_floor"] > 0


@pytest.mark.cluster  # `zdq bench --suite scale` starts embedded LocalClusters
def test_bench_scale_suite_places_pools_of_growing_clusters_and_draws_them(tmp_path: Path) -> None:
    proc = _zdq(
        "bench", "--suite", "scale", "--scale-workers", "2,4", "--tasks", "2000", "--idle-seconds", "0.2",
        "--pairs", "2", "--plots", str(tmp_path), "--json",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [(r["workers"], r["queues"], r["consumers"]) for r in report["scales"]] == [(2, 1, 4), (4, 2, 8)]
    for r in report["scales"]:
        assert r["placement_seconds"] > 0 and r["tasks_per_second"] > 0 and r["fds_per_worker"] > 0
        # Two placements of each, alternated: the ratio is their pairs' median.
        pairs = r["placement_vs_dask_pairs"]
        assert len(pairs) == 2 and all(x > 0 for x in pairs)
        assert r["placement_vs_dask"] == pytest.approx(sum(pairs) / 2)
        assert report[f"placement zdq / bare Dask, {r['workers']} workers"] == r["placement_vs_dask"]
        assert 0 <= r["idle_cpu_per_consumer"] < 1
    if importlib.util.find_spec("matplotlib") is None:
        # A newcomer's `pip install -e ".[test]"` has no matplotlib: the figures come all the
        # same, and one warning says what to install for the picture (never a traceback).
        assert report["plot"] is None and not (tmp_path / "scale.png").exists()
        # No traceback of zdq's (Dask may log its own while a loaded machine tears the scale
        # suite's clusters down: a worker's heartbeat to a scheduler that already left).
        package = str(Path(importlib.util.find_spec("zdq").origin).parent)  # type: ignore[arg-type,union-attr]
        zdq_frames = [line for line in proc.stderr.splitlines() if line.strip().startswith("File ") and package in line]
        assert NO_PLOTS in proc.stderr and "No module named 'matplotlib'" not in proc.stderr, proc.stderr
        assert zdq_frames == [], proc.stderr
    else:
        assert (tmp_path / "scale.png").stat().st_size > 1000


def test_bench_rejects_nonsense_options() -> None:
    proc = _zdq("bench", "--tasks", "0")
    assert proc.returncode == 2 and "--tasks must be at least 1" in proc.stderr
    proc = _zdq("bench", "--suite", "scale", "--scale-workers", "2", "--pairs", "0")
    assert proc.returncode == 2 and "--pairs must be at least 1" in proc.stderr


def test_python_dash_m_zdq_is_the_zdq_command(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "zdq", "inspect", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no zdq queue" in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "zdq", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: zdq "), proc.stdout


def test_inspect_reports_a_directory_without_queues_as_an_error(tmp_path: Path) -> None:
    proc = _zdq("inspect", str(tmp_path))
    assert proc.returncode == 1 and "no zdq queue" in proc.stderr


def test_inspect_of_a_path_that_does_not_exist_or_is_a_file_fails_with_status_1_in_one_line(tmp_path: Path) -> None:
    # Status 1 as any failure of the command (a directory without queues above): 2 is argparse's.
    (tmp_path / "file").write_text("")
    for path, why in ((tmp_path / "missing", "does not exist"), (tmp_path / "file", "is not a directory")):
        run = zdq_here("inspect", str(path))
        assert run.returncode == 1 and run.stderr == f"zdq inspect: {path} {why}\n", run.stderr


def test_a_reader_that_leaves_the_pipe_early_ends_the_command_quietly(tmp_path: Path) -> None:
    """``zdq status | head -4``: the reader leaves, the next write fails with EPIPE. Before, the
    command said ``zdq status: [Errno 32] Broken pipe`` on stderr; now it ends as a command killed
    by SIGPIPE does, silently, status 141."""
    from zdq.storage.lmdb import LMDBStorage

    storage = LMDBStorage(str(tmp_path / "default-queue-0"))
    storage.open()
    storage.close()
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "zdq.cli", "inspect", str(tmp_path)],
            stdout=write, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
        )
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", (proc.returncode, proc.stderr)


def test_with_matplotlib_the_scale_figure_is_drawn_to_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib comes with zdq's bench extra")
    row = {"workers": 2, "per_actor_seconds": 0.05, "dask_per_actor_seconds": 0.02, "tasks_per_second": 1e5}
    report = {"scales": [row, {**row, "workers": 4, "per_actor_seconds": 0.06}]}
    path = plot_scale(report, str(tmp_path / "plots"))
    assert path == str(tmp_path / "plots" / "scale.png")
    assert Path(path).stat().st_size > 1000


# -- a port where something that is not a Dask scheduler answers ----------------------------------
class _FakeServer:
    """A TCP server on 127.0.0.1 that is not Dask: ``http`` answers anything with a 400 and hangs
    up (as nginx or a proxy does), ``ssh`` sends sshd's banner and keeps the connection, ``silent``
    accepts and says nothing. ``accepted`` is the time of its first connection."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.accepted: float | None = None
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.address = f"tcp://127.0.0.1:{self._sock.getsockname()[1]}"
        self._sock.settimeout(0.1)  # so that the thread sees close() within 0.1 s
        self._open: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"fake-{kind}-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            if self.accepted is None:
                self.accepted = time.monotonic()
            self._open.append(conn)
            conn.settimeout(2)
            try:
                if self.kind == "ssh":
                    conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
                elif self.kind == "http":
                    conn.recv(100)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
                    conn.close()
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in [self._sock, *self._open]:
            conn.close()


@contextlib.contextmanager
def _fake_servers(*kinds: str) -> Iterator[list[_FakeServer]]:
    servers: list[_FakeServer] = []
    try:
        servers.extend(_FakeServer(kind) for kind in kinds)
        yield servers
    finally:
        for server in servers:
            server.close()


def _started(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "zdq.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


#: Runs ``zdq.cli`` with SIGINT as a terminal gives it to a foreground command. A suite started in
#: the background of a non-interactive shell (``cmd &``, as a CI script may) ignores SIGINT, and
#: its children inherit that: the command under test would never see the Ctrl-C.
#: ``program`` is what runs: ``zdq.cli`` by default, or the installed ``zdq`` command.
_AS_IN_A_TERMINAL = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "program = [p for p in sys.argv[1:2] if p] or [sys.executable, '-m', 'zdq.cli']; "
    "os.execv(program[0], [*program, *sys.argv[2:]])"
)


def _started_as_in_a_terminal(*args: str, program: str = "") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _AS_IN_A_TERMINAL, program, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _ctrl_c_when(run: subprocess.Popen[str], ready: Callable[[], bool], sig: int = signal.SIGINT) -> str:
    """Ctrl-C (or ``sig``) to ``run`` as soon as ``ready()`` (or it ended); its stderr once it has ended."""
    try:
        wait_until(lambda: run.poll() is not None or ready(), timeout=60, interval=0.005)
        assert run.poll() is None, run.communicate()
        run.send_signal(sig)
        return run.communicate(timeout=20)[1]
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(timeout=10)


def test_every_live_command_names_a_port_that_answers_but_not_as_dask_in_one_line_within_its_timeout() -> None:
    # Before: the peer's first bytes were read as a Dask frame's length ("Unable to allocate 3.07
    # EiB"), and the half-made client held the process 10 s at its exit, with a traceback.
    commands = (
        ["status"], ["result", "mails", "5"], ["rate-limit", "jobs", "1/s"], ["schedules", "list", "jobs"],
        ["dead-letters", "list", "jobs"], ["purge", "jobs", "--yes"],
    )
    timeout = 2.0
    with _fake_servers(*(("http", "ssh") * 3)) as servers:
        runs = [_started(*command, "--scheduler", server.address, "--timeout", f"{timeout:g}")
                for command, server in zip(commands, servers)]
        try:
            # Each run is timed from its connection on (a Python start with Dask's import, six
            # side by side on two cores, is not what --timeout bounds) to its exit.
            ended: dict[int, float] = {}
            wait_until(lambda: ended.update({i: time.monotonic() for i, run in enumerate(runs)
                                              if i not in ended and run.poll() is not None}) or len(ended) == len(runs),
                       timeout=120, interval=0.05)
            done = [(run.communicate(timeout=10)[1], ended[i]) for i, run in enumerate(runs)]
        finally:
            for run in runs:
                if run.poll() is None:
                    run.kill()
                    run.wait(timeout=10)
    for command, server, run, (stderr, ended) in zip(commands, servers, runs, done):
        assert server.accepted is not None, (command, stderr)
        assert ended - server.accepted < timeout + 1.5, (command, ended - server.accepted, stderr)
        assert run.returncode == 1 and len(stderr.strip().splitlines()) == 1, (command, stderr)
        assert stderr.startswith(f"zdq {command[0]}: something at {server.address} answered, but not as a Dask scheduler")
        assert "not Dask's protocol" in stderr or "closed the connection" in stderr, stderr


@pytest.mark.parametrize("command", [["status"], ["result", "mails", "5"]])
def test_ctrl_c_while_connecting_exits_with_130_and_no_traceback(command: list[str]) -> None:
    with _fake_servers("silent") as (server,):
        run = _started_as_in_a_terminal(*command, "--scheduler", server.address, "--timeout", "60")
        # 0.2 s after the connection: into the handshake's wait.
        stderr = _ctrl_c_when(run, lambda: server.accepted is not None and time.monotonic() > server.accepted + 0.2)
    assert run.returncode == 130 and "Traceback" not in stderr, stderr


def test_sigterm_stops_a_command_as_ctrl_c_does_with_status_143() -> None:
    # By default a SIGTERM ended the process where it stood, and what it had started (a bench's
    # cluster and floor processes) ran on; it now unwinds as Ctrl-C does (tests/test_bench_cases.py
    # has the floor's processes end even when their parent is killed outright).
    with _fake_servers("silent") as (server,):
        run = _started_as_in_a_terminal("status", "--scheduler", server.address, "--timeout", "60")
        stderr = _ctrl_c_when(
            run, lambda: server.accepted is not None and time.monotonic() > server.accepted + 0.2, signal.SIGTERM
        )
    assert run.returncode == 143 and "Traceback" not in stderr, (run.returncode, stderr)


def test_ctrl_c_while_the_installed_command_imports_zdq_exits_with_130_and_no_traceback() -> None:
    # Before: the script imported zdq.cli, so zdq with Dask (about a second), before any of zdq's
    # code ran, and a Ctrl-C then ended it with a KeyboardInterrupt's traceback.
    script = Path(sys.executable).with_name("zdq")
    assert script.exists(), f"the zdq command is not installed beside {sys.executable}: pip install -e ."
    with _fake_servers("silent") as (server,):
        run = _started_as_in_a_terminal("status", "--scheduler", server.address, "--timeout", "60", program=str(script))
        # psutil's extension is loaded a third of the way into zdq's import: the Ctrl-C lands in
        # the import, long before the command connects.
        maps = Path(f"/proc/{run.pid}/maps")
        stderr = _ctrl_c_when(run, lambda: "_psutil_linux" in maps.read_text())
    assert server.accepted is None, "the Ctrl-C came after the connection: it did not test the import"
    assert run.returncode == 130 and "Traceback" not in stderr, (run.returncode, stderr)


def test_a_ctrl_c_that_lands_as_the_connection_is_made_is_not_lost() -> None:
    """Ctrl-C reaches the command's connecting coroutine as a cancellation (asyncio.run's), and
    Python 3.11's wait_for swallowed one that landed as the connection completed: the command
    then waited for the silent peer's handshake its whole --timeout (seen once under load, the
    test above timing out). The race, made to happen: the awaited completes, and the task is
    cancelled, in one turn of the loop."""
    import asyncio

    from zdq.observe.remote import _within

    class Comm:
        aborted = False

        def abort(self) -> None:
            self.aborted = True

    async def race() -> Comm:
        connected: asyncio.Future[Comm] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(_within(connected, 60))
        await asyncio.sleep(0)  # the task waits on the connection
        comm = Comm()
        connected.set_result(comm)
        task.cancel()  # Ctrl-C, in the same turn
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        return comm

    assert asyncio.run(race()).aborted


@pytest.mark.parametrize("key", ["-5", str(1 << 64)])
def test_zdq_result_refuses_a_key_no_task_has_before_connecting(key: str) -> None:
    with _fake_servers("silent") as (server,):  # a scheduler that would hold a connection for --timeout
        run = _zdq("result", "mails", key, "--scheduler", server.address, "--timeout", "60", timeout=30)
        assert server.accepted is None, "it connected before looking at the key"
    assert run.returncode == 1 and "key" in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


# -- command lines: usage errors, durations --------------------------------------------------------
def test_zdq_result_exits_1_for_a_usage_error_or_no_scheduler_keeping_2_for_not_finished(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 2 means pending, started or unknown: a script looping while it is 2 must not loop on a
    # mistake in its own command line.
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    for args, error in (
        (["mails", "5", "--wait", "abc"], "argument --wait: invalid float value: 'abc'"),
        (["mails"], "the following arguments are required: key"),
        (["mails", "5", "--bogus"], "unrecognized arguments: --bogus"),
    ):
        run = zdq_here("result", *args)
        assert run.returncode == 1, (args, run.stderr)
        assert run.stderr.startswith("usage: zdq result ") and run.stderr.endswith(f"zdq result: error: {error}\n")
    missing = zdq_here("result", "mails", "5")
    assert missing.returncode == 1 and missing.stderr == (
        "zdq result: no scheduler given: pass --scheduler ADDRESS or set DASK_SCHEDULER_ADDRESS\n"
    )
    as_a_user = _zdq("result", "mails", "5", "--wait", "abc", timeout=60)  # the same, as its own process
    assert as_a_user.returncode == 1 and as_a_user.stderr.startswith("usage: zdq result "), as_a_user.stderr


def test_a_subcommands_usage_error_shows_that_subcommands_usage() -> None:
    for args, error in (
        (["bench", "--tasks", "-5"], "--tasks must be at least 1"),
        (["bench", "--tasks", "x"], "argument --tasks: invalid int value: 'x'"),
        (["status", "--bogus"], "unrecognized arguments: --bogus"),
        (["inspect"], "the following arguments are required: dirpath"),
    ):
        run = zdq_here(*args)
        assert run.returncode == 2, (args, run.stderr)
        assert run.stderr.startswith(f"usage: zdq {args[0]} ") and run.stderr.endswith(f"zdq {args[0]}: error: {error}\n")


def test_an_infinite_or_overflowing_duration_is_refused_in_one_line_before_connecting() -> None:
    # Nothing listens at port 9: a duration taken would try it, a refused one never does.
    for args, option in (
        (["status", "--timeout", "1e999"], "--timeout"),
        (["status", "--timeout", "1e308"], "--timeout"),
        (["status", "--watch", "1e999"], "--watch"),
        (["result", "mails", "5", "--wait", "1e999"], "--wait"),
        (["result", "mails", "5", "--wait", "1e308"], "--wait"),
        (["purge", "jobs", "--timeout", "nan"], "--timeout"),
    ):
        run = zdq_here(*args, "--scheduler", "tcp://127.0.0.1:9")
        assert run.returncode == 1 and len(run.stderr.splitlines()) == 1, (args, run.stderr)
        assert run.stderr.startswith(f"zdq {args[0]}: {option} must be ") and "at most 604800 (a week)" in run.stderr
