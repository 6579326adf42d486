"""A durable queue confirms a chunk only once its commit is on disk (issue 26, point 5).

A regression guard for any change to the durable commit and confirm path (design 2 of point 5,
one flush a commit with the CONFIRMs held until a later flush covers the commit, was built against
it and reverted for want of a gain: benchmarks/RESULTS.md). A broker SIGKILLed right after its
driver saw the last CONFIRM must have lost none of the confirmed chunks: the queue's directory,
read after the kill without its broker, holds every one of them, and the broker placed again
serves them. Real LocalCluster workers, real signals, real LMDB directories.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from distributed import Client

from zdq import ConsumerPool, QueuePool
from zdq.storage.lmdb import inspect_queue, is_queue_dir

from .conftest import wait_until
from .tasks import add
from .test_faults import FAST, assert_settled, broker_pid

pytestmark = pytest.mark.faults


def _queue_dir(root: Path) -> Path:
    found = [d for d in root.rglob("*") if d.is_dir() and is_queue_dir(str(d))]
    assert len(found) == 1, f"expected one queue directory under {root}, found {found}"
    return found[0]


def test_a_durable_broker_killed_right_after_confirming_has_lost_no_confirmed_chunk(client3: Client, tmp_path: Path) -> None:
    rounds, per_round, per_chunk = 5, 400, 20  # 5 rounds of 20 chunks, each confirmed, the kill just after the last
    with QueuePool(client3, 1, durability="durable", dirpath=tmp_path, workers=["a"], **FAST) as qp:
        with ConsumerPool(client3, qp, n_consumers=1, workers=["c"]) as consumers:  # not started: nothing is taken
            victim = broker_pid(qp, 0)
            batches = []
            for r in range(rounds):
                batches.append(qp.batch_submit([(add, i, r) for i in range(per_round)], batch_size=per_chunk))
                qp.flush(timeout=30)  # every chunk confirmed
            os.kill(victim, signal.SIGKILL)  # at once: the last CONFIRMs left a moment ago
            counts = inspect_queue(str(_queue_dir(tmp_path)))  # the directory, as the killed broker left it
            assert counts["ready_chunks"] == rounds * per_round // per_chunk, counts
            assert counts["ready_tasks"] == rounds * per_round, counts
            consumers.start()
            wait_until(lambda: qp.recoveries >= 1, timeout=60)
            assert_settled(batches, 90, "batches confirmed by a durable broker killed just after")
            for r, batch in enumerate(batches):
                assert batch.result(0) == [i + r for i in range(per_round)]


def test_a_durable_broker_killed_with_its_whole_window_in_flight_loses_no_task(client3: Client, tmp_path: Path) -> None:
    # A durable pool's window is zdq.durable.window (48 chunks a broker, 16 before): the driver
    # holds all 48 unconfirmed when the broker's worker is killed (stopped first, so none is
    # stored or confirmed); it sends every one of them again to the broker placed again, and each
    # task's result comes once, right.
    window, per_chunk = 48, 5
    with QueuePool(client3, 1, durability="durable", dirpath=tmp_path, workers=["a"], **FAST) as qp:
        with ConsumerPool(client3, qp, n_consumers=1, workers=["c"]) as consumers:
            victim = broker_pid(qp, 0)
            os.kill(victim, signal.SIGSTOP)
            try:
                batch = qp.batch_submit([(add, i, 1) for i in range(window * per_chunk)], batch_size=per_chunk, timeout=30)
                wait_until(lambda: qp._driver._links.views[0].unconfirmed == window, timeout=10)  # type: ignore[union-attr]
            finally:
                os.kill(victim, signal.SIGKILL)
            consumers.start()
            wait_until(lambda: qp.recoveries >= 1, timeout=60)
            assert_settled([batch], 90, "a batch of a full durable window whose broker was killed")
            assert batch.result(0) == [i + 1 for i in range(window * per_chunk)]
            wait_until(lambda: qp.get_queue_size() == {qp.queue_names[0]: 0}, timeout=30)
