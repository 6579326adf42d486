"""The map case's sizes in ``zdq bench``, and the joblib backend's refusals: pure arithmetic."""

from __future__ import annotations

import pytest

from zdq.benchmark.results import BenchConfig

pytestmark = pytest.mark.unit


def test_the_map_case_maps_a_million_items_by_default_and_scales_with_tasks() -> None:
    assert BenchConfig().n_map == 1_000_000
    assert BenchConfig(tasks=5000).n_map == 25_000
    assert BenchConfig(tasks=5000, map_tasks=7).n_map == 7
    assert BenchConfig(batch_size=100, consumers=3).map_buffersize == 3000


def test_a_map_case_of_no_item_is_refused() -> None:
    with pytest.raises(ValueError, match="--map-tasks must be at least 1"):
        BenchConfig(map_tasks=0)


def test_the_alternated_comparisons_take_seven_pairs_by_default_and_refuse_none() -> None:
    assert BenchConfig().pairs == 7 and BenchConfig(repeat=1).pairs == 7
    with pytest.raises(ValueError, match="--pairs must be at least 1"):
        BenchConfig(pairs=0)


def test_the_joblib_backend_refuses_pool_options_beside_a_pool_and_n_jobs_zero() -> None:
    pytest.importorskip("joblib", reason="the joblib backend needs joblib: pip install -e '.[test]'")
    from zdq.joblib import ZdqBackend

    with pytest.raises(ValueError, match="pass queue_pool alone"):
        ZdqBackend(queue_pool=object(), client=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_jobs == 0"):
        ZdqBackend().effective_n_jobs(0)
    assert ZdqBackend().effective_n_jobs(3) == 3  # k batches in flight, asked of no pool
