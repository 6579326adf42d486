"""Sweeps of the no-op case, drawn with matplotlib (the ``bench`` extra).

matplotlib is optional: without it the figures are measured and reported all the same, and one
warning says what to install for the pictures (a newcomer's ``pip install -e ".[test]"`` has no
matplotlib, and ``zdq bench --plots`` must not end in a traceback there).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

from zdq.benchmark.cases import _client, zdq_noop
from zdq.benchmark.results import BenchConfig

__all__ = ["NO_PLOTS", "pyplot_or_none", "sweep_and_plot"]

logger = logging.getLogger(__name__)

#: What a run without matplotlib says instead of drawing.
NO_PLOTS = "plots need matplotlib, which zdq's bench extra installs: pip install 'zdq[bench]'"


def pyplot_or_none() -> Any:
    """``matplotlib.pyplot`` on its file-only backend, or None (with a warning) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("%s; the figures are reported without pictures", NO_PLOTS)
        return None
    # Agg draws to files only: a benchmark on a machine without a display must not open windows.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

BATCH_SIZES = (10, 100, 500, 1000, 2000, 5000)
CONSUMERS = (1, 2, 4, 8)


def sweep_and_plot(config: BenchConfig, directory: str) -> dict[str, Any]:
    """Tasks/s against batch (chunk) size and against consumers; PNGs written to ``directory``
    (only the figures, and a warning, without matplotlib)."""
    os.makedirs(directory, exist_ok=True)
    small = replace(config, repeat=max(1, min(config.repeat, 3)))
    sweeps: dict[str, Any] = {"batch_size": {}, "consumers": {}}
    with _client(config) as client:
        for size in BATCH_SIZES:
            sweeps["batch_size"][size] = zdq_noop(client, replace(small, batch_size=size)).rate
        for n in CONSUMERS:
            sweeps["consumers"][n] = zdq_noop(client, replace(small, consumers=n)).rate
    plt = pyplot_or_none()
    if plt is None:
        return sweeps
    for key, label, name in (
        ("batch_size", "tasks per chunk (batch size)", "tasks_per_s_vs_batch_size.png"),
        ("consumers", "consumers", "tasks_per_s_vs_consumers.png"),
    ):
        xs = list(sweeps[key])
        ys = [sweeps[key][x] for x in xs]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, ys, marker="o")
        if key == "batch_size":
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("no-op tasks/s, end to end")
        ax.set_title(f"zdq, {config.workers} workers, {config.tasks:,} tasks")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(directory, name), dpi=100)
        plt.close(fig)
    return sweeps
