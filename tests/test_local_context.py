"""``zdq.local()``'s ``with`` block is an executor's: leaving it waits for every task inserted or
submitted (python-task-queue's ``LocalTaskQueue``), its consumers stay up across ``join()``, and a
wait that nothing can end (no consumer running) ends with an error saying so.

Each test bounds its waits: ``join(timeout=...)``, ``result(timeout=...)``, and the suite's
pytest timeout over the block's exit.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from distributed import Client

import zdq
from zdq.errors import NoConsumers

from .local_tasks import Mark, marked

pytestmark = pytest.mark.cluster


def test_leaving_the_block_runs_every_inserted_task_on_an_embedded_cluster(tmp_path: Path) -> None:
    """The issue's case: 2,000 tasks inserted, none joined; half ran before, the rest dropped."""
    from distributed import default_client

    with pytest.raises(ValueError):
        default_client()  # embedded: the pool makes (and closes) its own cluster
    with zdq.local(parallel=2) as tq:
        assert tq.insert((Mark(str(tmp_path), i, 0.002) for i in range(2000)), progress=False) == 2000
    assert tq.closed
    assert marked(str(tmp_path)) == set(range(2000))


def test_consumers_stay_up_across_join_and_the_block_waits_for_what_came_after(client: Client, tmp_path: Path) -> None:
    with zdq.local(parallel=2) as tq:
        tq.insert((Mark(str(tmp_path), i) for i in range(100)), progress=False)
        tq.local_consumers.join(timeout=60)
        assert tq.local_consumers.running  # a join waits; it does not stop them
        assert marked(str(tmp_path)) == set(range(100))
        later = tq.submit(Mark(str(tmp_path), 100))  # served without a start()
        assert later.result(timeout=60) == 100
        tq.insert((Mark(str(tmp_path), i, 0.002) for i in range(101, 400)), progress=False)
    assert marked(str(tmp_path)) == set(range(400))


def test_leaving_on_an_exception_waits_for_the_work_then_raises_the_blocks_error(client: Client, tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="the block's own"):
        with zdq.local(parallel=2, chunk_size=20) as tq:  # a consumer finishes the chunks it holds, only
            tq.insert((Mark(str(tmp_path), i, 0.01) for i in range(300)), progress=False)
            raise KeyError("the block's own")
    assert tq.closed
    assert marked(str(tmp_path)) == set(range(300))


def test_leaving_with_no_consumer_running_raises_no_consumers_at_once_and_closes(client: Client, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(NoConsumers, match="no consumer is running"):
        with zdq.local(parallel=2) as tq:
            tq.local_consumers.cancel()
            tq.insert((Mark(str(tmp_path), i) for i in range(50)), progress=False)
    assert time.monotonic() - started < 60
    assert tq.closed


def test_join_with_stop_stops_the_local_consumers_as_a_consumer_pools_join_does(client: Client, tmp_path: Path) -> None:
    with zdq.local(parallel=1) as tq:
        tq.insert(Mark(str(tmp_path), 0), progress=False)
        tq.local_consumers.join(timeout=60, stop=True)
        assert not tq.local_consumers.running
        tq.local_consumers.start()  # resumed: the block's end has consumers to wait on
        tq.insert(Mark(str(tmp_path), 1), progress=False)
    assert marked(str(tmp_path)) == {0, 1}


def test_leaving_the_block_says_once_what_it_waits_for_when_that_takes_a_while(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A task delayed past the block's last line made its end wait in silence."""
    import zdq.futures

    monkeypatch.setattr(zdq.futures, "SAY_AFTER", 0.3)  # zdq.local's block end says it as waits do
    with caplog.at_level(logging.WARNING, logger="zdq.client.local"):
        with zdq.local(parallel=1) as tq:
            late = tq.submit(Mark(str(tmp_path), 1), delay=2)
            soon = tq.submit(Mark(str(tmp_path), 0))
            assert soon.result(timeout=60) == 0
    assert late.result(timeout=0) == 1  # the block waited for it
    said = [r.getMessage() for r in caplog.records if "the end of the block waits for" in r.getMessage()]
    assert len(said) == 1, said
    assert "1 task of pool" in said[0] and "delayed" in said[0] and "close()" in said[0], said
