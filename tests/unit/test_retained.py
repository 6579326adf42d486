"""Results kept after their receipt (``result_ttl``) and a task's state by id, without a broker
loop: :class:`~zdq.broker.retained.Retained` and :func:`~zdq.broker.task_state.task_state` over a
:class:`~zdq.broker.leases.LeaseTable` on memory and LMDB storage."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from zdq.broker.leases import LeaseTable
from zdq.broker.retained import Retained
from zdq.broker.task_state import task_state
from zdq.config import settings
from zdq.storage.base import ChunkMeta
from zdq.storage.lmdb import LMDBStorage
from zdq.storage.memory import MemoryStorage

pytestmark = pytest.mark.unit

DRIVER, CONSUMER = b"d" * 16, b"w" * 16
NOW = 1_000_000.0


def _meta(base: int, n: int = 10, **tags: object) -> ChunkMeta:
    return ChunkMeta(DRIVER, 1, n, base=base, **tags)  # type: ignore[arg-type]


def test_result_ttl_is_off_by_default_and_takes_seconds_strings_and_timedeltas() -> None:
    assert settings().result_ttl is None
    assert settings(result_ttl=timedelta(minutes=2)).result_ttl == 120.0
    assert settings(result_ttl="5s", result_bytes="1KiB").result_bytes == 1024
    with pytest.raises(ValueError, match="result_ttl"):
        settings(result_ttl=-1)


def test_kept_results_are_found_by_any_task_id_of_their_chunk_until_their_time_passes() -> None:
    kept = Retained(MemoryStorage(), ttl=10.0, max_bytes=1 << 20)
    kept.keep(7, _meta(100, 10), CONSUMER, b"r1", now=NOW)
    kept.keep(8, _meta(500, 5), CONSUMER, b"r2", now=NOW + 1)
    assert kept.find(100, NOW).results == b"r1" and kept.find(109, NOW).results == b"r1"  # type: ignore[union-attr]
    assert kept.find(504, NOW).results == b"r2"  # type: ignore[union-attr]
    assert kept.find(110, NOW) is None and kept.find(99, NOW) is None and kept.find(505, NOW) is None
    assert kept.find(100, NOW + 10) is None  # expired, even before the housekeeping drops it
    assert kept.expire(NOW + 10) == 1 and len(kept) == 1
    assert kept.expire(NOW + 11) == 1 and len(kept) == 0 and kept.nbytes == 0


def test_past_the_byte_bound_the_oldest_results_go_first_and_one_larger_than_it_is_not_kept() -> None:
    kept = Retained(MemoryStorage(), ttl=60.0, max_bytes=250)
    for i in range(3):
        kept.keep(i, _meta(1000 + 10 * i), CONSUMER, bytes(100), now=NOW + i)
    assert kept.find(1000, NOW) is None and kept.find(1010, NOW) is not None and kept.find(1020, NOW) is not None
    assert kept.nbytes == 200
    kept.keep(9, _meta(2000), CONSUMER, bytes(251), now=NOW + 5)
    assert kept.find(2000, NOW) is None and kept.nbytes == 200


def test_chunks_without_a_known_first_task_id_are_not_kept() -> None:
    kept = Retained(MemoryStorage(), ttl=60.0, max_bytes=1 << 20)
    kept.keep(1, _meta(0), CONSUMER, b"tick", now=NOW)
    assert len(kept) == 0


def test_a_durable_queue_finds_its_kept_results_after_a_reopen_and_drops_those_expired(tmp_path: Path) -> None:
    path = str(tmp_path / "q")
    storage = LMDBStorage(path, map_size=1 << 20)
    storage.open()
    kept = Retained(storage, ttl=100.0, max_bytes=1 << 20, now=NOW)
    kept.keep(1, _meta(100), CONSUMER, b"old", now=NOW - 200)  # expired by the time it reopens
    kept.keep(2, _meta(200), CONSUMER, b"new", now=NOW)
    storage.close()  # commits what was held

    storage = LMDBStorage(path, map_size=1 << 20)
    storage.open()
    again = Retained(storage, ttl=100.0, max_bytes=1 << 20, now=NOW + 1)
    assert again.find(100, NOW + 1) is None
    found = again.find(205, NOW + 1)
    assert found is not None and found.payload() == b"new" and found.consumer == CONSUMER
    storage.close()

    storage = LMDBStorage(path, map_size=1 << 20)
    storage.open()
    assert [chunk_id for chunk_id, _ in storage.retained()] == [2]  # the expired one left the disk
    storage.close()


def test_a_tasks_state_follows_its_chunk_from_pending_to_started_to_finished() -> None:
    leases = LeaseTable(MemoryStorage())
    (chunk_id,) = leases.put([(_meta(100, 3), b"chunk")])
    assert task_state(leases, 101)[0] == "pending"
    assert task_state(leases, 103)[0] == "unknown"
    leases.lease(CONSUMER)
    assert task_state(leases, 101)[0] == "started"
    held = leases.finish(chunk_id, CONSUMER, b"sealed results")
    assert held is not None
    assert task_state(leases, 102) == ("finished", b"sealed results", "")
    leases.sent(held, DRIVER, 0.0)
    leases.forget([chunk_id], DRIVER)
    assert task_state(leases, 102)[0] == "unknown"  # taken by its driver, not kept: no result_ttl


def test_with_result_ttl_the_results_a_driver_took_stay_readable() -> None:
    leases = LeaseTable(MemoryStorage())
    leases.retained = Retained(leases.storage, ttl=60.0, max_bytes=1 << 20)
    (chunk_id,) = leases.put([(_meta(100, 3), b"chunk")])
    leases.lease(CONSUMER)
    held = leases.finish(chunk_id, CONSUMER, b"sealed results")
    assert held is not None
    leases.sent(held, DRIVER, 0.0)
    leases.forget([chunk_id], DRIVER)
    assert task_state(leases, 100) == ("finished", b"sealed results", "")


def test_cancelled_expired_and_dead_lettered_tasks_are_named_so() -> None:
    leases = LeaseTable(MemoryStorage())
    (chunk_id,) = leases.put([(_meta(100, 3), b"chunk")])
    leases.storage.cancel(chunk_id, [1])
    assert task_state(leases, 101)[0] == "cancelled" and task_state(leases, 100)[0] == "pending"
    leases.put([(_meta(200, 1, expires=1.0), b"late")])
    assert task_state(leases, 200)[0] == "expired"
    assert task_state(leases, 300, lambda task_id: "dropped at dispatch" if task_id == 300 else None)[0] == "expired"
    leases.lease(CONSUMER)
    leases.dead_letter(CONSUMER, chunk_id, b"task", "it failed 3 times", task_id=102)
    assert task_state(leases, 102)[0] == "started"  # its chunk is still with the consumer: its results say more
    leases.finish(chunk_id, CONSUMER, b"results")
    leases.forget_now(chunk_id)
    assert task_state(leases, 102) == ("failed", None, "it failed 3 times")


def test_a_durable_queue_opened_again_without_result_ttl_drops_what_it_kept(tmp_path: Path) -> None:
    from zdq.broker.core import BrokerCore

    path = str(tmp_path / "q")
    storage = LMDBStorage(path, map_size=1 << 20)
    storage.open()
    Retained(storage, ttl=100.0, max_bytes=1 << 20).keep(1, _meta(100), CONSUMER, b"kept")
    storage.close()
    storage = LMDBStorage(path, map_size=1 << 20)
    storage.open()
    assert len(storage.retained()) == 1
    BrokerCore("q", None, storage, settings())  # type: ignore[arg-type]  # never started: no socket
    storage.close()
    storage = LMDBStorage(path, map_size=1 << 20)
    storage.open()
    assert storage.retained() == []
    storage.close()


def test_a_chunk_cancelled_whole_reads_as_cancelled_from_its_kept_record() -> None:
    from zdq.broker.retained import CANCELLED_BY, CANCELLED_RESULTS

    leases = LeaseTable(MemoryStorage())
    leases.retained = Retained(leases.storage, ttl=60.0, max_bytes=1 << 20)
    (chunk_id,) = leases.put([(_meta(100, 2), b"chunk")])
    leases.storage.ack_many([chunk_id])  # as CancelQuestions does, once every task is cancelled
    assert task_state(leases, 101)[0] == "unknown"
    leases.retained.keep(chunk_id, _meta(100, 2), CANCELLED_BY, CANCELLED_RESULTS)
    assert task_state(leases, 101) == ("cancelled", None, "")


def test_a_unique_followers_id_answers_as_its_holder_and_finished_names_the_holder() -> None:
    leases = LeaseTable(MemoryStorage())
    leases.retained = Retained(leases.storage, ttl=60.0, max_bytes=1 << 20)
    (chunk_id,) = leases.put([(_meta(100, 1), b"chunk")])
    followed = {900: 100}.get
    assert task_state(leases, 900, None, followed)[0] == "pending"
    assert task_state(leases, 901, None, followed)[0] == "unknown"
    leases.lease(CONSUMER)
    assert task_state(leases, 900, None, followed)[0] == "started"
    held = leases.finish(chunk_id, CONSUMER, b"sealed")
    assert held is not None
    assert task_state(leases, 900, None, followed) == ("finished", b"sealed", "100")
    assert task_state(leases, 100, None, followed) == ("finished", b"sealed", "")  # the holder: its own


def test_aliases_are_bounded_the_oldest_forgotten_first(monkeypatch: pytest.MonkeyPatch) -> None:
    from zdq.broker import retained

    monkeypatch.setattr(retained, "MAX_ALIASES", 2)
    kept = Retained(MemoryStorage(), ttl=10.0, max_bytes=1 << 20)
    for follower in (1, 2, 3):
        kept.alias(follower, 100)
    assert dict(kept.aliases) == {2: 100, 3: 100}
