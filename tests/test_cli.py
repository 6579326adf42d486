"""The zdq command, run as a user runs it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from zdq.benchmark.plots import NO_PLOTS
from zdq.benchmark.scale import plot_scale


def _zdq(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zdq.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.cluster  # `zdq bench` starts an embedded LocalCluster
def test_bench_runs_zdq_and_dask_on_an_embedded_cluster_and_reports_both(tmp_path: Path) -> None:
    proc = _zdq(
        "bench", "--tasks", "5000", "--dask-tasks", "100", "--repeat", "1", "--durable", "--compare-auth", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    systems = [c["system"] for c in report["cases"]]
    assert systems[0].startswith("dask futures") and systems[1].startswith("zdq") and "pipeline" in systems[2]
    assert "durable" in systems[3] and "without authentication" in systems[4]
    assert systems[5].startswith("zdq Executor.map") and report["cases"][5]["tasks"] == 5 * 5000  # --map-tasks' default
    futures, dq_path = report["cases"][1], report["cases"][6]
    assert "futures path" in futures["system"] and "daskqueue path" in dq_path["system"] and dq_path["tasks"] == 5000
    phases = [dq_path["extra"][k] for k in ("submit_s", "join_s", "results_s")]
    # One run (--repeat 1): its phases are the whole of its timed span.
    assert all(s > 0 for s in phases) and 0.9 * dq_path["median_seconds"] <= sum(phases) <= dq_path["median_seconds"]
    assert all(c["tasks_per_second"] > 0 for c in report["cases"])
    assert set(report["ratios"]) == {
        "no-op: zdq / dask futures",
        "no-op: zdq / bare pipeline",
        "no-op: durable / transient",
        "no-op: with auth / without auth",
        "map: zdq Executor.map / dask futures",
        "map: zdq Executor.map / zdq futures path",
        "no-op: zdq daskqueue path / zdq futures path",
        "map: zdq queue_pool.map / zdq futures path",
    }
    pool_map = report["cases"][7]
    assert pool_map["system"].startswith("zdq queue_pool.map") and pool_map["tasks"] == 5000
    assert all(r > 0 for r in report["ratios"].values())
    path_ratio = dq_path["tasks_per_second"] / futures["tasks_per_second"]
    assert abs(report["ratios"]["no-op: zdq daskqueue path / zdq futures path"] - path_ratio) < 1e-9
    assert report["workers"] == 2


@pytest.mark.cluster  # `zdq bench` starts an embedded LocalCluster
def test_bench_latency_suite_reports_zdq_dask_and_the_floor_and_their_same_run_ratios() -> None:
    proc = _zdq("bench", "--suite", "latency", "--repeat", "2", "--compare-auth", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    zdq, dask, floor, plain, ipc_floor = report["cases"]
    assert "floor over Unix sockets" in ipc_floor["system"] and report["ratios"]["latency_p50_vs_ipc_floor"] > 0
    assert zdq["system"].startswith("zdq") and dask["system"].startswith("dask futures") and "floor" in floor["system"]
    assert "without authentication" in plain["system"] and len(plain["extra"]["p50_ms_per_run"]) == 2
    per_run = [z / n for z, n in zip(zdq["extra"]["p50_ms_per_run"], plain["extra"]["p50_ms_per_run"])]
    assert abs(report["ratios"]["round trip p50: with auth / without auth"] - sum(per_run) / 2) < 0.05 * max(per_run)
    for case in (zdq, floor):
        assert len(case["extra"]["p50_ms_per_run"]) == 2 and 0 < case["extra"]["p50_ms"] <= case["extra"]["p99_ms"]
    per_run = [d / z for z, d in zip(zdq["extra"]["p50_ms_per_run"], dask["extra"]["p50_ms_per_run"])]
    assert abs(report["ratios"]["round trip p50: dask / zdq"] - sum(per_run) / 2) < 0.05
    per_run = [z / f for z, f in zip(zdq["extra"]["p50_ms_per_run"], floor["extra"]["p50_ms_per_run"])]
    assert abs(report["ratios"]["latency_p50_vs_floor"] - sum(per_run) / 2) < 0.05 * max(per_run)
    assert report["ratios"]["latency_p99_vs_floor"] > 0


@pytest.mark.cluster  # `zdq bench --suite scale` starts embedded LocalClusters
def test_bench_scale_suite_places_pools_of_growing_clusters_and_draws_them(tmp_path: Path) -> None:
    proc = _zdq(
        "bench", "--suite", "scale", "--scale-workers", "2,4", "--tasks", "2000", "--idle-seconds", "1",
        "--plots", str(tmp_path), "--json",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [(r["workers"], r["queues"], r["consumers"]) for r in report["scales"]] == [(2, 1, 4), (4, 2, 8)]
    for r in report["scales"]:
        assert r["placement_seconds"] > 0 and r["tasks_per_second"] > 0 and r["fds_per_worker"] > 0
        assert 0 <= r["idle_cpu_per_consumer"] < 1
    if importlib.util.find_spec("matplotlib") is None:
        # A newcomer's `pip install -e ".[test]"` has no matplotlib: the figures come all the
        # same, and one warning says what to install for the picture (never a traceback).
        assert report["plot"] is None and not (tmp_path / "scale.png").exists()
        # No traceback of zdq's (Dask may log its own while a loaded machine tears the scale
        # suite's clusters down: a worker's heartbeat to a scheduler that already left).
        package = str(Path(importlib.util.find_spec("zdq").origin).parent)  # type: ignore[arg-type,union-attr]
        zdq_frames = [line for line in proc.stderr.splitlines() if line.strip().startswith("File ") and package in line]
        assert NO_PLOTS in proc.stderr and "No module named 'matplotlib'" not in proc.stderr, proc.stderr
        assert zdq_frames == [], proc.stderr
    else:
        assert (tmp_path / "scale.png").stat().st_size > 1000


def test_bench_rejects_nonsense_options() -> None:
    proc = _zdq("bench", "--tasks", "0")
    assert proc.returncode == 2 and "--tasks must be at least 1" in proc.stderr


def test_inspect_reports_a_directory_without_queues_as_an_error(tmp_path: Path) -> None:
    proc = _zdq("inspect", str(tmp_path))
    assert proc.returncode == 1 and "no zdq queue" in proc.stderr
    proc = _zdq("inspect", str(tmp_path / "missing"))
    assert proc.returncode == 2


def test_with_matplotlib_the_scale_figure_is_drawn_to_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib comes with zdq's bench extra")
    row = {"workers": 2, "per_actor_seconds": 0.05, "dask_per_actor_seconds": 0.02, "tasks_per_second": 1e5}
    report = {"scales": [row, {**row, "workers": 4, "per_actor_seconds": 0.06}]}
    path = plot_scale(report, str(tmp_path / "plots"))
    assert path == str(tmp_path / "plots" / "scale.png")
    assert Path(path).stat().st_size > 1000
