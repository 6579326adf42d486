"""``zdq bench``'s pictures without matplotlib: skipped with a word (drawing them is tested in
tests/test_cli.py: matplotlib's first import builds its font cache on a thread)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from zdq.benchmark.plots import NO_PLOTS
from zdq.benchmark.scale import plot_scale

ROW: dict[str, Any] = {"workers": 2, "per_actor_seconds": 0.05, "dask_per_actor_seconds": 0.02, "tasks_per_second": 1e5}
REPORT: dict[str, Any] = {"scales": [ROW, {**ROW, "workers": 4, "per_actor_seconds": 0.06}]}


def test_without_matplotlib_the_scale_figure_is_skipped_with_a_warning_that_names_the_bench_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with caplog.at_level(logging.WARNING, logger="zdq.benchmark.plots"):
        assert plot_scale(REPORT, str(tmp_path)) is None
    assert [r.getMessage() for r in caplog.records] == [f"{NO_PLOTS}; the figures are reported without pictures"]
    assert "zdq[bench]" in NO_PLOTS
    assert list(tmp_path.iterdir()) == []

