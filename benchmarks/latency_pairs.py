"""Alternated pairs of ``zdq bench --suite latency --repeat 3 --json``: two trees, in turn (ABBA).

    python3 benchmarks/latency_pairs.py OLD_TREE NEW_TREE [PAIRS]

Each side is the CLI run in a fresh process with ``PYTHONPATH`` on its tree (a side may be
``TREE@NAME=VALUE`` to set an environment variable for it). Prints each run's zdq p50 and p99, its
TCP floor's p50 and the ratio, with the load at its end, then the medians of the per-pair ratios.
Used for issue 26 point 4 (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys


def _run(side: str) -> dict[str, float]:
    tree, _, setting = side.partition("@")
    env = {**os.environ, "PYTHONPATH": tree}
    if setting:
        name, _, value = setting.partition("=")
        env[name] = value
    code = "import sys; from zdq.cli import main; sys.exit(main())"
    args = [sys.executable, "-c", code, "bench", "--suite", "latency", "--repeat", "3", "--json"]
    out = subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True, timeout=600, check=True)
    report = json.loads(out.stdout[out.stdout.index("{") :])
    cases = {c["system"]: c for c in report["cases"]}
    zdq = cases["zdq submit().result()"]["extra"]
    floor = cases["bare ZeroMQ via a broker (floor)"]["extra"]
    return {
        "p50": zdq["p50_ms"],
        "p99": zdq["p99_ms"],
        "floor": floor["p50_ms"],
        "ratio": report["ratios"]["latency_p50_vs_floor"],
    }


def main() -> None:
    old, new = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    pairs = []
    for k in range(n):
        got = {}
        for side in (old, new) if k % 2 == 0 else (new, old):
            got[side] = r = _run(side)
            print(
                f"{'new' if side == new else 'old'} load {os.getloadavg()[0]:.1f}: zdq p50 {r['p50']:.3f} p99 "
                f"{r['p99']:.3f} ms, floor {r['floor']:.3f} ms, p50/floor {r['ratio']:.2f}",
                flush=True,
            )
        pairs.append((got[old], got[new]))
    for key in ("p50", "p99", "ratio"):
        ratios = [b[key] / a[key] for a, b in pairs]
        print(f"{key} new/old: median {statistics.median(ratios):.3f} ({', '.join(f'{x:.2f}' for x in ratios)})")
    for label, i in (("old", 0), ("new", 1)):
        print(
            f"{label}: p50 {statistics.median(p[i]['p50'] for p in pairs):.3f} ms, p99 "
            f"{statistics.median(p[i]['p99'] for p in pairs):.3f} ms, p50/floor "
            f"{statistics.median(p[i]['ratio'] for p in pairs):.2f}"
        )


if __name__ == "__main__":
    main()
