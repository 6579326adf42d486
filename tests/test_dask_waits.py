"""zdq's bounded waits on Dask futures leave the client's other waits alone.

Dask's client shares one gather among the calls that wait at once, from any thread (the user's
too). zdq's placement and recovery waited with ``future.result(timeout=...)`` (and a gather
bounded by ``Client.sync``'s ``callback_timeout``): one that timed out cancelled that shared
gather, so another thread's ``result()`` failed with ``UnboundLocalError``; and one cancelled
while it queued behind Dask's five gathers in flight stayed in the client, failing every later
``result()`` of every future of it (distributed 2026.8). A reviewer saw durable queues given up
as unplaceable under kills on 32 workers, and the user's own client broken. Real LocalCluster.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import distributed
import pytest
from distributed import Client

from zdq.client.slots import NoAnswer, dask_result, gather_actors, result_in_steps

_MB = 1 << 20


def _blob(i: int, n: int) -> bytes:
    return bytes([i]) * n


def _sleep_then(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x


def _gathers_in_flight(futures: list[Any], errors: list[BaseException]) -> list[threading.Thread]:
    """One thread per future, each a patient ``result()``: Dask runs five gathers at once."""

    def patient(fut: Any) -> None:
        try:
            fut.result(timeout=120)
        except BaseException as e:  # noqa: BLE001 - the test says what each got
            errors.append(e)

    threads = [threading.Thread(target=patient, args=(f,), daemon=True) for f in futures]
    for t in threads:
        t.start()
        time.sleep(0.02)
    return threads


def test_a_bounded_gather_that_times_out_in_line_leaves_the_client_and_the_other_gathers_working(
    client: Client,
) -> None:
    address, pid = next(iter(client.run(os.getpid).items()))
    futures = [client.submit(_blob, i, _MB, workers=[address], pure=False) for i in range(7)]
    try:
        distributed.wait(futures, timeout=60)
        errors: list[BaseException] = []
        os.kill(pid, signal.SIGSTOP)  # its data is asked for and does not come: gathers in flight
        try:
            threads = _gathers_in_flight(futures[:5], errors)
            time.sleep(0.3)
            for late in futures[5:]:  # queued behind the five: each bound passes first
                with pytest.raises(TimeoutError):
                    gather_actors(client, [late], 0.05)
                with pytest.raises(TimeoutError):
                    dask_result(late, 0.05)
        finally:
            os.kill(pid, signal.SIGCONT)
        for t in threads:
            t.join(timeout=120)
        assert not [t for t in threads if t.is_alive()]
        assert errors == []
        # The client still gathers (before: UnboundLocalError, for every future, for ever).
        assert client.submit(abs, -3, pure=False).result(timeout=30) == 3
        assert dask_result(futures[6], 60) == bytes([6]) * _MB
    finally:
        client.cancel(futures)


def test_waiting_in_steps_on_a_dask_future_answers_with_its_value_its_error_or_no_answer(client: Client) -> None:
    steps: list[float] = []
    fut = client.submit(_sleep_then, 7, 0.3, pure=False)
    assert result_in_steps(fut, 30, lambda: steps.append(time.monotonic()), step=0.05) == 7
    assert steps  # the waits between steps ran meanwhile
    with pytest.raises(ZeroDivisionError):
        result_in_steps(client.submit(divmod, 1, 0, pure=False), 30, lambda: None)
    slow = client.submit(_sleep_then, 1, 5.0, pure=False)
    started = time.monotonic()
    with pytest.raises(NoAnswer):
        result_in_steps(slow, 0.3, lambda: None, step=0.1)
    assert time.monotonic() - started < 2
    assert slow.result(timeout=30) == 1  # nothing of it was cancelled
