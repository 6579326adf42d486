"""Several chunks in one PUTS, and a broker SIGKILLed with them in flight (issue 26, point 2).

A regression guard of at-least-once delivery for the multi-chunk hand-off: the driver sends a
broker's chunks as one PUTS (a window's worth at once when a batch is queued); a broker whose
worker is stopped (SIGSTOP) and then killed (SIGKILL) with such a message in flight, received
by its socket or not, stored or not, confirmed or not, must lose none of its chunks: the driver
resends every chunk it holds unconfirmed to the broker placed again, and a durable queue serves
what it stored. Real LocalCluster workers, real signals, real LMDB directories.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from distributed import Client

from zdq import ConsumerPool, QueuePool

from .conftest import pid_of, wait_until
from .tasks import add
from .test_faults import FAST, Background, assert_settled, broker_pid

pytestmark = pytest.mark.faults


def test_a_durable_broker_killed_with_multi_chunk_puts_in_flight_loses_no_task(client3: Client, tmp_path: Path) -> None:
    n, per_chunk = 6000, 50  # 120 chunks: runs of a window's 16 chunks per PUTS
    with QueuePool(client3, 1, durability="durable", dirpath=tmp_path, workers=["a"], **FAST) as qp:
        with ConsumerPool(client3, qp, n_consumers=1, workers=["c"]) as consumers:
            victim = broker_pid(qp, 0)
            assert victim == pid_of(client3, "a")
            first = qp.batch_submit([(add, i) for i in range(1000)], batch_size=per_chunk)
            qp.flush(timeout=30)  # stored and confirmed: the durable queue must serve them after the kill
            os.kill(victim, signal.SIGSTOP)  # what the driver sends now is in flight, never confirmed
            try:
                # Blocks on the full window (16 chunks, one PUTS) until the broker is placed again.
                submitting = Background(
                    lambda: qp.batch_submit([(add, i, 1) for i in range(n)], batch_size=per_chunk, timeout=60), "submit"
                )
                time.sleep(0.5)  # the I/O thread sends the window's PUTS into the stopped broker's socket
            finally:
                os.kill(victim, signal.SIGKILL)
            consumers.start()
            second = submitting.result(90, "batch_submit() while its only broker was stopped, then killed")
            wait_until(lambda: qp.recoveries >= 1, timeout=60)
            assert_settled([first, second], 90, "batches of a durable broker killed with PUTS in flight")
            assert first.result(0) == list(range(1000))
            assert second.result(0) == [i + 1 for i in range(n)]


def test_a_durable_broker_killed_while_multi_chunk_puts_pour_in_loses_no_task(client3: Client, tmp_path: Path) -> None:
    n, per_chunk = 20_000, 20  # 1,000 small chunks: PUTS of up to 16 keep coming while it dies
    with QueuePool(client3, 1, durability="durable", dirpath=tmp_path, workers=["a"], **FAST) as qp:
        with ConsumerPool(client3, qp, n_consumers=1, workers=["c"]) as consumers:
            consumers.start()
            victim = broker_pid(qp, 0)
            batch = qp.batch_submit([(add, i, 2) for i in range(n)], batch_size=per_chunk, timeout=60)
            wait_until(lambda: batch.completed > 500, timeout=30)
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: qp.recoveries >= 1, timeout=60)
            assert_settled([batch], 90, "a batch whose durable broker was killed while its PUTS poured in")
            assert batch.result(0) == [i + 2 for i in range(n)]
