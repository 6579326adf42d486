"""Real components for the tests: a LocalCluster of worker processes, sockets on 127.0.0.1.

Every test that uses ``client`` is checked for leaks afterwards: no zdq actor may remain on the
scheduler and no zdq thread in the driver or in any worker.

The tiers (``-m unit``, ``-m "not cluster"``) are decided here, not remembered by each test: a
test is marked ``cluster`` when it, or a fixture it uses, starts a Dask cluster (by fixture name
or by what its source calls), and a test that starts one all the same without the marker fails,
saying so, instead of slowing the quick run down unnoticed.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from distributed import Client, LocalCluster
from distributed.deploy.spec import SpecCluster

from zdq._actor import scheduler_workers


_CLUSTER_FIXTURES = {"cluster", "client", "cluster3", "client3"}

# What starts a cluster when a test or a fixture calls it itself: a LocalCluster (or any
# SpecCluster), `dask scheduler` / `dask worker` processes (tests/hosts.py's Hosts, a worker run
# with `python -m distributed.cli.dask_worker`). A `zdq bench` run in a subprocess embeds its own
# LocalClusters where neither check sees them (unless its options are refused first): such tests
# carry the marker themselves (tests/test_cli.py).
_STARTS_A_CLUSTER = re.compile(r"\b(?:LocalCluster|SpecCluster|Hosts)\(|distributed\.cli\.dask_")

_UNIT_DIR = Path(__file__).parent / "unit"

#: Test modules whose tests share a module-scoped LocalCluster (one xdist group each, below).
_ONE_CLUSTER_MODULES = {"test_observe.py", "test_expiry.py"}

#: The modules that take longest (their tests wait on kills, recoveries, embedded benchmarks):
#: handed out first, so that the run does not end on one xdist worker still busy with one of them
#: while the others are idle. The rest keep their order (the unit tier last).
_LONG_MODULES_FIRST = (
    "test_cli.py", "test_scaledown_faults.py", "test_restart_faults.py", "test_faults.py", "test_rate_limits_durable.py",
    "test_schedules.py", "test_relay.py", "test_failures.py", "test_rate_limits.py",
)


def _source(fn: Callable[..., Any]) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


def _starts_a_cluster(item: pytest.Item) -> bool:
    if _CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    functions = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info is not None else ()):
        functions.extend(fixturedef.func for fixturedef in defs)
    return any(fn is not None and _STARTS_A_CLUSTER.search(_source(fn)) for fn in functions)


def _long_first(item: pytest.Item) -> int:
    name = item.fspath.basename
    return _LONG_MODULES_FIRST.index(name) if name in _LONG_MODULES_FIRST else len(_LONG_MODULES_FIRST)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A test that starts a cluster is marked `cluster`, so that `pytest -m "not cluster"` is the
    # quick run without anyone having to remember the marker. Everything under tests/unit/ is the
    # unit tier (`pytest -m unit`): it runs in seconds after every edit.
    items.sort(key=_long_first)  # stable: each module's tests keep their order
    for item in items:
        if _UNIT_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.unit)
        elif _starts_a_cluster(item):
            item.add_marker(pytest.mark.cluster)
        # The suite runs on several xdist workers (`-n`, `--dist loadgroup`): the multi-host tests
        # share /etc/netns and the machine's routes, so they run one after another on one worker.
        if item.fspath.basename == "test_hosts.py":
            item.add_marker(pytest.mark.xdist_group("hosts"))
        # A module whose tests share a module-scoped cluster runs on one worker: spread over three,
        # each would start (and close) that cluster. xdist hands the largest groups out first.
        elif item.fspath.basename in _ONE_CLUSTER_MODULES:
            item.add_marker(pytest.mark.xdist_group(item.fspath.purebasename))


# -- a cluster started by a test not marked `cluster` fails that test ----------------------------
# The item whose setup, call or teardown runs now (set by the hook below, read by the checks).
_running: list[pytest.Item] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    # What is alive before a test (the session's cluster and scheduler, Dask, the modules) is
    # moved out of the collector's sight: the leak check's gc.collect() then walks what this test
    # made, not the whole process (70 ms a test of 100,000 objects, quiet, one in eight of the
    # xdist workers' CPU samples in a suite run; 1 ms now), and so do the collections Python
    # starts by itself. The garbage of the test before (a pool dropped without closing, in a
    # test without the leak check) is collected first, never frozen: walking only what that
    # test made, this collection is as cheap.
    gc.collect()
    gc.freeze()
    _running.append(item)
    try:
        yield
    finally:
        _running.pop()


def _refuse_an_unmarked_cluster(what: str) -> None:
    item = _running[-1] if _running else None
    if item is not None and item.get_closest_marker("cluster") is None:
        pytest.fail(
            f"{item.nodeid} starts {what} but is not marked `cluster`: `pytest -m 'not cluster'` would "
            "run it; mark it @pytest.mark.cluster (or use the cluster/client fixtures)",
            pytrace=False,
        )


_spec_cluster_init = SpecCluster.__init__


def _checked_spec_cluster_init(self: SpecCluster, *args: Any, **kwargs: Any) -> None:
    _refuse_an_unmarked_cluster(f"a Dask cluster ({type(self).__name__})")
    _spec_cluster_init(self, *args, **kwargs)


_popen_init = subprocess.Popen.__init__


def _cluster_command(args: Any) -> bool:
    words = [str(a) for a in args] if isinstance(args, (list, tuple)) else str(args).split()
    text = " ".join(words)
    dask_process = any(w.endswith("dask") for w in words) and any(w in ("scheduler", "worker") for w in words)
    return dask_process or "distributed.cli.dask_" in text


def _checked_popen_init(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
    if _cluster_command(args):
        _refuse_an_unmarked_cluster(f"Dask processes ({args!r})")
    _popen_init(self, args, *rest, **kwargs)


def pytest_configure(config: pytest.Config) -> None:
    # Dask's statistical profiler samples every worker's threads every 10 ms, and the scheduler's
    # loop ticks every 20 ms: idle, a LocalCluster's worker process used 0.045 of a core (0.025
    # without the profiler), its scheduler 0.055 (0.02 ticking every 100 ms). A suite run holds a
    # dozen such processes on two cores at once; no test reads the profiles or the ticks. The
    # nannies pass this configuration on to the worker processes they start.
    import dask

    dask.config.set({"distributed.worker.profile.enabled": False, "distributed.admin.tick.interval": "100ms"})
    # Installed for the whole session (not per test): the session's `cluster` fixture is made in
    # some test's setup, and worker processes outlive single tests.
    SpecCluster.__init__ = _checked_spec_cluster_init  # type: ignore[method-assign]
    subprocess.Popen.__init__ = _checked_popen_init  # type: ignore[method-assign]


def pytest_collection_finish(session: pytest.Session) -> None:
    if any(item.get_closest_marker("cluster") for item in session.items) and not session.config.option.collectonly:
        _fork_workers_from_a_preloaded_server()


def _fork_workers_from_a_preloaded_server() -> None:
    """Start the worker processes of this session's LocalClusters by forking a server that
    imported Dask, distributed and zdq once (distributed's own suite does the same).

    Spawned, each worker process (and each one a nanny starts again after a kill) imports them
    anew: a second or more of CPU per process, some 150 processes a run, on two cores. The server
    is started here, before any test, so that it is no child process a test sees appear. Only this
    process is set so: the programs and ``zdq`` commands the tests run as subprocesses spawn theirs,
    as a user's do.
    """
    import multiprocessing.forkserver

    import dask
    from distributed.utils import get_mp_context

    dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
    context = get_mp_context()  # sets distributed's preload (distributed and its dependencies)
    preload = ["distributed", "zdq", "zdq.consumer", "zdq.broker", "tests.worker_stacks"]
    context.set_forkserver_preload(preload)  # type: ignore[attr-defined]
    multiprocessing.forkserver.ensure_running()
    global _fork_server_started
    _fork_server_started = True


#: Whether this process's LocalCluster workers are forked by the preloaded server (which makes
#: SIGUSR1 dump their stacks: anywhere else it would end them).
_fork_server_started = False


def pytest_unconfigure(config: pytest.Config) -> None:
    SpecCluster.__init__ = _spec_cluster_init  # type: ignore[method-assign]
    subprocess.Popen.__init__ = _popen_init  # type: ignore[method-assign]


def _zdq_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("zdq-")]


def _zdq_actor_keys(dask_scheduler) -> list[str]:  # type: ignore[no-untyped-def]
    return [str(k) for k in dask_scheduler.tasks if str(k).startswith("zdq-")]


#: Sockets bound and never listening, held while the tests run: see :func:`refused_endpoint`.
_REFUSING: list[socket.socket] = []


def refused_endpoint() -> str:
    """A TCP endpoint on 127.0.0.1 that refuses connections for as long as the tests run: its
    port stays bound (never listening), so no broker or server of a test running beside can be
    given it. A port only probed and let go was taken again under load (a consumer then met a
    listener there, and its reach check said "handshake failed" instead of "refused")."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    _REFUSING.append(held)
    return f"tcp://127.0.0.1:{held.getsockname()[1]}"


def knock_with_wrong_keys(endpoint: str, server_public: bytes, times: int, refused: Callable[[], int]) -> None:
    """``times`` connections to the broker at ``endpoint``, each with a new CURVE key pair of no
    pool (what anyone who reaches the port can do in a loop), 50 at a time, each batch closed once
    ``refused()`` (the broker's count) says it was refused: one closed earlier may never have
    reached its handshake."""
    from zdq.transport.security import ClientKeys
    from zdq.transport.sockets import connect_dealer

    ctx = zmq.Context()
    socks: list[zmq.Socket] = []
    try:
        for start in range(0, times, 50):
            for _ in range(min(50, times - start)):
                public, secret = zmq.curve_keypair()
                socks.append(connect_dealer(ctx, endpoint, os.urandom(16), keys=ClientKeys(public, secret, server_public)))
            wait_until(lambda: refused() >= start + len(socks), timeout=30)
            for sock in socks:
                sock.close(linger=0)
            socks.clear()
    finally:
        for sock in socks:  # a failed wait: term() would wait for them for ever
            sock.close(linger=0)
        ctx.term()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns a truthy value; fail the test at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s: {predicate} (last value {value!r})")
        time.sleep(interval)


def _threads_stopped(pid: int) -> bool:
    """Whether every thread of process ``pid`` is stopped (state T or t in /proc)."""
    tasks = Path(f"/proc/{pid}/task")
    states = []
    for task in tasks.iterdir():
        try:
            states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
    return bool(states) and all(state in ("T", "t") for state in states)


def stop_process(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP ``pid`` and return once every one of its threads has stopped.

    kill() returns before the process stops: the kernel wakes one of its threads to begin the
    group stop, and on a loaded machine that thread waits for a CPU while the others (a broker's
    loop among them) go on answering for a while. A test that wants a peer that cannot answer
    waits for that state.
    """
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while not _threads_stopped(pid):
        if time.monotonic() > deadline:
            pytest.fail(f"process {pid} was sent SIGSTOP but not all its threads stopped within {timeout}s")
        time.sleep(0.001)


def _assert_eventually_empty(probe, what: str, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    thawed = False
    while True:
        found = probe()
        if not found:
            return
        if not thawed:
            # What was frozen at a test's start (pytest_runtest_protocol) and has become garbage
            # since (a pool an earlier test kept, dropped by this one) is collected too, once:
            # charged to no test, its threads would fail every later check of this process.
            thawed = True
            gc.unfreeze()
            gc.collect()
            continue
        if time.monotonic() > deadline:
            pytest.fail(f"leak: {what} still present after {timeout}s: {found!r}")
        time.sleep(0.1)


@pytest.fixture
def short_tmp_path() -> Iterator[Path]:
    """A fresh directory with a short path, removed after the test. pytest's own ``tmp_path``
    (``/tmp/pytest-of-root/pytest-N/popen-gw0/test_<name>0``) can make a Unix socket's path in it
    longer than the 107 bytes the kernel allows, and ipc then falls back to TCP."""
    import shutil
    import tempfile

    made = tempfile.mkdtemp(prefix="zdq-t-", dir="/tmp")
    try:
        yield Path(made)
    finally:
        shutil.rmtree(made, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, worker_dashboard_address=None
    ) as c:
        yield c


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[Client]:
    with Client(cluster) as c:
        yield c
        assert_no_zdq_leaks(c)


#: How long the leak check waits for one answer of the scheduler or of a worker.
LEAK_CHECK_ANSWER_TIMEOUT = 30.0


def assert_no_zdq_leaks(c: Client, answer_timeout: float = LEAK_CHECK_ANSWER_TIMEOUT) -> None:
    """Actors released, threads stopped, in the driver and in every worker.

    Each question to the scheduler or a worker is bounded by ``answer_timeout``: a hung or
    stopped worker fails the teardown, naming it, instead of hanging it (``client.run`` has no
    timeout of its own).
    """
    gc.collect()  # pools a test dropped without closing (as daskqueue programs do) are collected
    _assert_eventually_empty(
        lambda: call_bounded(
            lambda: c.run_on_scheduler(_zdq_actor_keys), answer_timeout, "leak check: the scheduler's answer (hung?)"
        ),
        "zdq actors on the scheduler",
    )
    _assert_eventually_empty(_zdq_threads, "zdq threads in the driver")
    _assert_eventually_empty(
        lambda: {w: t for w, t in run_on_each_worker(c, _zdq_threads, answer_timeout).items() if t},
        "zdq threads in workers",
    )


def call_bounded(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """``fn()`` on a daemon thread; fail the test if it has not returned within ``timeout``
    seconds (naming ``what``), else return its value or raise its error."""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - raised in the test's thread below
            box["error"] = e

    thread = threading.Thread(target=call, name="test-bounded", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"{what} did not return within {timeout:g}s", pytrace=False)
    if "error" in box:
        raise box["error"]
    return box.get("value")


def run_on_each_worker(c: Client, fn: Callable[[], Any], timeout: float) -> dict[str, Any]:
    """``fn()`` on every worker of ``c``'s cluster at once, each call bounded by ``timeout``:
    the test fails naming each worker (name and address) that did not answer in time. A worker
    that left the cluster meanwhile is left out, as ``client.run`` leaves it out."""
    workers = {a: w.get("name") for a, w in scheduler_workers(c).items()}
    answers: dict[str, Any] = {}
    errors: dict[str, BaseException] = {}

    def ask(address: str) -> None:
        try:
            answers.update(c.run(fn, workers=[address]))
        except BaseException as e:  # noqa: BLE001 - judged in the test's thread below
            errors[address] = e

    threads = {a: threading.Thread(target=ask, args=(a,), name="test-run-on-worker", daemon=True) for a in workers}
    for thread in threads.values():
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads.values():
        thread.join(max(0.0, deadline - time.monotonic()))
    silent = [a for a, thread in threads.items() if thread.is_alive()]
    if silent:
        dumped = " (its threads' stacks are in the log: SIGUSR1)" if _dump_stacks(c, silent) else ""
        named = ", ".join(f"worker {workers[a]} ({a})" for a in silent)
        pytest.fail(f"leak check: {named} did not answer client.run within {timeout:g}s (hung or stopped?){dumped}", pytrace=False)
    if errors:
        live = set(scheduler_workers(c))
        for address, error in errors.items():
            if address in live:
                raise error
    return answers


def _dump_stacks(c: Client, addresses: list[str]) -> bool:
    """Have the worker processes at ``addresses`` write their threads' stacks to the log
    (SIGUSR1: tests/worker_stacks.py), when they belong to a LocalCluster of this process, whose
    workers the preloaded server forked; whether any was asked. A stopped one writes them when
    it is resumed."""
    nannies = getattr(getattr(c, "cluster", None), "workers", {})
    asked = False
    for nanny in list(nannies.values()):
        pid = getattr(getattr(nanny, "process", None), "pid", None)
        if pid and getattr(nanny, "worker_address", None) in addresses and _fork_server_started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
                asked = True
    if asked:
        time.sleep(1.0)  # written from a signal handler: a moment, before the test's output is taken
    return asked


@contextlib.contextmanager
def abc_cluster() -> Iterator[LocalCluster]:
    """A LocalCluster of three worker processes named a, b and c (one thread each)."""
    with LocalCluster(
        n_workers=0, threads_per_worker=1, processes=True, dashboard_address=None, worker_dashboard_address=None
    ) as cluster:
        (template,) = cluster.new_worker_spec().values()
        for name in "abc":
            cluster.worker_spec[name] = {"cls": template["cls"], "options": {**template["options"], "name": name}}
        cluster.sync(cluster._correct_state)
        yield cluster


@pytest.fixture
def cluster3() -> Iterator[LocalCluster]:
    # One cluster per test: these tests kill workers, and a nanny's restart must not decide
    # whether the next test starts with three workers.
    with abc_cluster() as cluster:
        yield cluster


@pytest.fixture
def client3(cluster3: LocalCluster) -> Iterator[Client]:
    with Client(cluster3) as client:
        client.wait_for_workers(3, timeout=60)
        yield client


def pid_of(client: Client, name: str, timeout: float = 30.0) -> int:
    """The pid of the worker process named ``name``, waiting (bounded) until the scheduler knows
    it: a worker its nanny is restarting, or one that just joined, is briefly absent."""

    def lookup() -> int | None:
        addresses = [a for a, w in scheduler_workers(client).items() if w["name"] == name]
        if len(addresses) != 1:
            return None
        pid = client.run(os.getpid, workers=addresses).get(addresses[0])
        return None if pid is None else int(pid)

    return int(wait_until(lookup, timeout=timeout))


@pytest.fixture
def zmq_ctx() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB filesystem (tmpfs) that fills up; unmounted by the test. Needs root."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
