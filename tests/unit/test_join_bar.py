"""``join(progress=True)``'s bar: its rate counts what was done while it showed, not before."""

from __future__ import annotations

import io

import pytest

from zdq.client.consumer_pool import _JoinBar


@pytest.fixture
def bar(monkeypatch: pytest.MonkeyPatch) -> _JoinBar:
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)  # tqdm writes its bar there
    return _JoinBar()


def test_a_join_called_once_the_work_is_done_shows_no_rate_rather_than_billions_a_second(bar: _JoinBar) -> None:
    # Before: "1000000/1000000 [00:00<00:00, 16070130268.20task/s]" (reviewer 12).
    bar(1_000_000, 1_000_000)
    meter = str(bar.bar)
    bar.close()
    assert "1000000/1000000" in meter and "?task/s" in meter, meter


def test_the_rate_counts_the_tasks_done_since_the_bar_showed(bar: _JoinBar) -> None:
    bar(400, 1000)
    bar.bar.start_t -= 2.0  # two seconds since it showed
    bar(1000, 1000)
    rate = bar.bar.format_dict["rate"] or (bar.bar.n - bar.bar.initial) / bar.bar.format_dict["elapsed"]
    bar.close()
    assert 250 <= rate <= 300, rate  # 600 tasks in about two seconds, not 1,000
