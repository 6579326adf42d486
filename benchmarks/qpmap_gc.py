"""Issue 26, point 6: ``queue_pool.map``'s futures and the garbage collector, per future.

Two measures, each printed as one line, no cluster (the futures are made by their chunks as
``queue_pool.map`` makes them, 1,000 chunks of 1,000): the CPU a full collection takes with a
million futures alive (median of 5 ``gc.collect()``, the collector off meanwhile), and the CPU of
making them with the collector off (best of 5). Run it in alternated pairs (ABBA) against the tree
before a change, each tree by its PYTHONPATH:

    PYTHONPATH=<tree> python3 benchmarks/qpmap_gc.py
"""

from __future__ import annotations

import gc
import statistics
import time

from zdq.client.window import MapChunk, MapFuture

N_CHUNKS, CHUNK = 1000, 1000


def futures() -> list[MapFuture]:
    made: list[MapFuture] = []
    for k in range(N_CHUNKS):
        made.extend(MapChunk(k * CHUNK, CHUNK, None, None).futures())
    return made


def main() -> None:
    gc.disable()
    try:
        made = []
        for _ in range(5):
            start = time.process_time()
            fs = futures()
            made.append(time.process_time() - start)
            del fs
        fs = futures()
        gc.collect()
        tracked = len(gc.get_objects())
        full = []
        for _ in range(5):
            start = time.process_time()
            gc.collect()
            full.append(time.process_time() - start)
    finally:
        gc.enable()
    n = N_CHUNKS * CHUNK
    print(
        f"futures made, gc off: {min(made) * 1e9 / n:.0f} ns each; a full collection with {tracked} tracked "
        f"objects ({n} futures): {statistics.median(full) * 1e3:.0f} ms, {statistics.median(full) * 1e9 / tracked:.0f} ns each"
    )


if __name__ == "__main__":
    main()
