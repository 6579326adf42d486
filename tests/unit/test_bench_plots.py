"""``zdq bench``'s pictures: drawn with matplotlib (the ``bench`` extra), skipped with a word without it."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from zdq.benchmark.plots import NO_PLOTS
from zdq.benchmark.scale import plot_scale

ROW = {"workers": 2, "per_actor_seconds": 0.05, "dask_per_actor_seconds": 0.02, "tasks_per_second": 1e5}
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


def test_with_matplotlib_the_scale_figure_is_drawn_to_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib comes with zdq's bench extra")
    path = plot_scale(REPORT, str(tmp_path / "plots"))
    assert path == str(tmp_path / "plots" / "scale.png")
    assert Path(path).stat().st_size > 1000
