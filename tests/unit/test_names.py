"""Names and reprs in pure code: the naming functions, statistics that read well, future reprs
(the broker's and the pools' names and reprs are in tests/test_names.py)."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest

import zdq
from zdq import QueuePool
from zdq.errors import BrokerLost
from zdq.futures import BatchFuture, TaskFuture
from zdq.names import (
    POOL_NAME_MAX,
    check_pool_name,
    consumer_names,
    driver_name,
    queue_name,
    queue_name_of,
    sorted_by_name,
)
from zdq.observe.report import MAX_STRING
from zdq.stats import BrokerStats, DriverStats, PoolStats, QueueState
from zdq.storage import LMDBStorage
from zdq.transport.protocol import MAX_PEER_NAME

from ..inprocess_cli import zdq_here


# -- the naming functions ------------------------------------------------------------------------
def test_a_queue_is_named_after_its_pool_and_index_and_its_directory_gives_the_name_back() -> None:
    assert queue_name("jobs", 3) == "jobs-queue-3"
    assert queue_name_of(os.path.join("/data", queue_name("jobs", 3)) + "/") == "jobs-queue-3"
    assert sorted_by_name(["jobs-queue-10", "jobs-queue-2", "jobs-queue-1"]) == [
        "jobs-queue-1", "jobs-queue-2", "jobs-queue-10",
    ]


def test_every_driver_of_a_pool_gets_a_name_of_its_own_that_says_where_it_runs() -> None:
    first, second = driver_name("names-unit"), driver_name("names-unit")
    assert first != second and first.startswith("names-unit-driver@") and f":{os.getpid()}" in first
    assert second.startswith(first) and second.endswith("#2")


# -- pool names, checked where they are given --------------------------------------------------
#: The longest name a pool may have: 128 bytes of UTF-8 in 64 characters.
LONGEST = "é" * (POOL_NAME_MAX // 2)
#: Names that pools of the tests, the docs and the defaults have.
GOOD_NAMES = ["default", "jobs", "zdq-c8467ea9", "cron-jobs", "names-two", "lone@x", "nightly report", "é-1", "42", LONGEST]
#: Names no pool may have, what each is refused with, and why.
BAD_NAMES = [
    (5, TypeError, "must be a str, got int 5"),
    ("", ValueError, "must not be empty"),
    ("../escaped", ValueError, "must not hold '/'"),  # its directory would leave dirpath
    ("a/b", ValueError, "must not hold '/'"),  # a subdirectory that zdq inspect does not list
    ("a\\b", ValueError, "must not hold '/' or"),
    ("..", ValueError, "must not start with '.'"),
    (".hidden", ValueError, "must not start with '.'"),
    ("a\nb", ValueError, "must be printable"),
    ("red\x1b[31m", ValueError, "must be printable"),  # a terminal escape, raw into zdq status
    (" jobs", ValueError, "without surrounding spaces"),
    ("--yes", ValueError, "must not start with '-'"),
    ("y" * 300, ValueError, f"at most {POOL_NAME_MAX} bytes in UTF-8, got 300"),  # zdq status dropped it
    (LONGEST + "x", ValueError, f"at most {POOL_NAME_MAX} bytes in UTF-8, got {POOL_NAME_MAX + 1}"),
]


@pytest.mark.parametrize("name", GOOD_NAMES, ids=lambda v: ascii(v)[:24])
def test_the_names_pools_have_in_the_tests_and_docs_are_accepted(name: str) -> None:
    assert check_pool_name(name) == name


@pytest.mark.parametrize(("name", "error", "match"), BAD_NAMES, ids=lambda v: ascii(v)[:24] if isinstance(v, (str, int)) else "")
def test_a_pool_name_is_refused_naming_the_argument_and_the_rule_it_breaks(name: object, error: type, match: str) -> None:
    with pytest.raises(error, match=r"^name: a pool's name .*" + re.escape(match)):
        check_pool_name(name)


@pytest.mark.parametrize(("name", "error", "match"), BAD_NAMES[1:6], ids=lambda v: ascii(v)[:24] if isinstance(v, str) else "")
def test_a_queue_pool_refuses_a_bad_name_before_it_places_or_makes_anything(
    tmp_path: Path, name: str, error: type, match: str
) -> None:
    inner = tmp_path / "inner"
    # client=None would start an embedded cluster: the name is refused before (this tier forbids it).
    with pytest.raises(error, match="name: a pool's name"):
        QueuePool(None, 1, name=name, durability="durable", dirpath=inner)
    with pytest.raises(error, match="name: a pool's name"):
        QueuePool.attach(None, name, dirpath=inner)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("name", "error", "match"), BAD_NAMES[1:6], ids=lambda v: ascii(v)[:24] if isinstance(v, str) else "")
def test_results_by_id_refuse_a_pool_name_no_pool_can_have_before_asking_the_cluster(name: str, error: type, match: str) -> None:
    with pytest.raises(error, match="pool_name: a pool's name"):
        zdq.state(name, 1)  # no client in this process: refused before one is looked up
    with pytest.raises(error, match="pool_name: a pool's name"):
        zdq.result(name, 1, timeout=1)


@pytest.mark.parametrize(
    "command",
    [("purge",), ("dead-letters", "list"), ("schedules", "list"), ("rate-limit",), ("result",)],
    ids=lambda c: c[0],
)
def test_the_zdq_command_refuses_a_pool_name_no_pool_can_have_in_one_line_before_connecting(command: tuple[str, ...]) -> None:
    after = {"rate-limit": ["5/s"], "result": ["12"]}.get(command[0], [])
    done = zdq_here(*command, "--scheduler", "tcp://127.0.0.1:1", "--timeout", "1", "a/b", *after)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"zdq {command[0]}: POOL: a pool's name must not hold '/' or '\\' (a durable queue's directory, "
        "<dirpath>/<name>-queue-<i>, would not be a directory of dirpath), got 'a/b'"
    ]


def test_the_names_made_of_the_longest_pool_name_stay_within_every_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = queue_name(LONGEST, 999_999)
    assert len(queue) <= MAX_STRING  # a monitoring report keeps it (zdq status shows the pool)
    assert len(queue.encode()) <= os.pathconf(tmp_path, "PC_NAME_MAX")  # a file name
    storage = LMDBStorage(str(tmp_path / queue))  # a durable queue's directory, made and opened
    storage.open()
    storage.close()
    assert os.listdir(tmp_path) == [queue]
    monkeypatch.setattr(socket, "gethostname", lambda: "h" * 64)  # Linux's HOST_NAME_MAX
    driver = driver_name(LONGEST) + "#99"
    assert len(driver.encode()) + len(str(2**22)) <= MAX_PEER_NAME  # announced whole, with any pid


def test_consumers_keep_daskqueues_names() -> None:
    assert consumer_names("GeneralConsumer", 2) == ["GeneralConsumer-0", "GeneralConsumer-1"]


# -- statistics that read well ----------------------------------------------------------------
def _broker_stats(**changes: object) -> BrokerStats:
    counts = dict.fromkeys(
        [f for f in BrokerStats.__dataclass_fields__ if f not in {"name", "endpoint", "durable", "routed_tasks", "consumer_names"}],
        0,
    )
    counts.update(changes)
    return BrokerStats(name="jobs-queue-0", endpoint="tcp://10.0.0.1:4000", durable=True, **counts)  # type: ignore[arg-type]


def test_statistics_reprs_leave_out_zero_counters_and_show_peers_by_name() -> None:
    stats = _broker_stats(
        ready_tasks=5, ready_chunks=1, consumers=1, consumer_names=("GeneralConsumer-0",),
        routed_tasks={"jobs-driver@host:1": 7},
    )
    text = repr(stats)
    assert text == (
        "BrokerStats(name='jobs-queue-0', endpoint='tcp://10.0.0.1:4000', durable=True, ready_chunks=1, "
        "ready_tasks=5, consumers=1, routed_tasks={'jobs-driver@host:1': 7}, consumer_names=('GeneralConsumer-0',))"
    )
    assert stats.leased_tasks == 0 and stats.pending_tasks == 5  # left out of the repr, still there
    driver = DriverStats(3, 2, 0, 0, 0, 0, 1, 0, name="jobs-driver@host:1")
    assert repr(driver) == "DriverStats(tasks_submitted=3, tasks_completed=2, chunks_outstanding=1, name='jobs-driver@host:1')"
    pool = repr(PoolStats(driver, [stats, _broker_stats()], "jobs"))
    assert pool.splitlines()[0] == "PoolStats(name='jobs',"
    assert len(pool.splitlines()) == 6 and max(len(line) for line in pool.splitlines()) < 240


def test_a_queue_state_says_what_is_known_and_how_old_the_count_is() -> None:
    assert QueueState("jobs-queue-0", "up", 0).describe() == "jobs-queue-0: up"
    assert (
        QueueState("jobs-queue-1", "down", 3, 5, 1.25).describe()
        == "jobs-queue-1: down (lost with its worker, being placed again), 3 awaiting results, 5 pending (counted 1.2 s ago)"
    )


def test_future_reprs_say_their_state_without_waiting() -> None:
    fut = TaskFuture(7)
    assert repr(fut) == "<TaskFuture key=7 pending>"
    fut.set_result(1)
    assert repr(fut) == "<TaskFuture key=7 finished>"
    failed = TaskFuture(8)
    failed.set_exception(BrokerLost("jobs-queue-0 was lost"))
    assert repr(failed) == "<TaskFuture key=8 failed: BrokerLost>"
    batch = BatchFuture(10, 3)
    batch._fill(0, [1], {})
    assert repr(batch) == "<BatchFuture keys=10..12 pending: 1 of 3 done, 0 failed>"
    batch._fail(1, 2, BrokerLost("gone"))
    assert repr(batch) == "<BatchFuture keys=10..12 failed: 2 of 3 tasks>"
    assert repr(BatchFuture(5, 0)) == "<BatchFuture no keys finished: 0 tasks>"
    lone = BatchFuture(20, 1)
    lone._fail(0, 1, BrokerLost("gone"))
    assert repr(lone) == "<BatchFuture keys=20..20 failed: 1 of 1 task>"
