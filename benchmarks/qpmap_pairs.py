"""Issue 26, point 6: ``queue_pool.map(noop, range(N))`` + ``[f.result() for f in futures]``
against the futures path (one ``batch_submit`` of as many no-ops), in one cluster (2 workers x 1
thread, ``QueuePool(client, 2, keep_results=False, chunk_size=1000)``, 2 consumers), R rounds:
the map with the collector on and with it off (``gc.disable()`` around it, to see what the
collector costs: zdq itself never changes it), the wall clock before ``map()`` returns and in
all, the calling thread's CPU in ``map()`` (``time.thread_time``), the driver process's CPU
(``time.process_time``), the full collections (``gc.callbacks``). One JSON line of medians.
Run it in alternated pairs (ABBA) against the tree before a change:

    PYTHONPATH=<tree> python3 benchmarks/qpmap_pairs.py <tree> [N] [R]
"""
import gc, sys, time, statistics, json
sys.path.insert(0, sys.argv[1])
from dask.distributed import LocalCluster, Client
import zdq
from zdq import QueuePool, ConsumerPool
from zdq.benchmark.tasks import noop
GCS = {}
T0 = [0.0]
def _cb(phase, info):
    if phase == "start": T0[0] = time.perf_counter()
    else:
        st = GCS.setdefault(info["generation"], [0, 0.0]); st[0] += 1; st[1] += time.perf_counter() - T0[0]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
R = int(sys.argv[3]) if len(sys.argv) > 3 else 3
assert zdq.__file__.startswith(sys.argv[1]), zdq.__file__
if __name__ == "__main__":
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl, Client(cl) as c:
        with QueuePool(c, 2, keep_results=False, chunk_size=1000) as qp, ConsumerPool(c, qp, n_consumers=2) as cp:
            cp.start()
            qp.batch_submit([(noop, i) for i in range(1000)]).result(timeout=120)
            res = {}
            for r in range(R):
                calls = [(noop, i) for i in range(N)]
                p0 = time.process_time(); t = time.perf_counter(); qp.batch_submit(calls).result()
                res.setdefault("futures", []).append(time.perf_counter() - t); res.setdefault("futures_proc_cpu", []).append(time.process_time() - p0)
                del calls
                for mode in ("gc", "nogc"):
                    if mode == "nogc": gc.disable()
                    else: GCS.clear(); gc.callbacks.append(_cb)
                    p0 = time.process_time(); t = time.perf_counter(); c0 = time.thread_time(); fs = qp.map(noop, range(N)); t1 = time.perf_counter(); c1 = time.thread_time()
                    n = len([f.result() for f in fs]); t2 = time.perf_counter(); p2 = time.process_time()
                    gc.enable()
                    if mode == "gc":
                        gc.callbacks.remove(_cb)
                        res.setdefault("full_n", []).append(GCS.get(2, [0, 0])[0]); res.setdefault("full_s", []).append(GCS.get(2, [0, 0])[1])
                        res.setdefault("young_s", []).append(GCS.get(0, [0, 0])[1] + GCS.get(1, [0, 0])[1])
                    assert n == N
                    res.setdefault(mode, []).append(t2 - t); res.setdefault(mode + "_inmap", []).append(t1 - t)
                    res.setdefault(mode + "_inmap_cpu", []).append(c1 - c0); res.setdefault(mode + "_proc_cpu", []).append(p2 - p0)
                    del fs
            out = {k: round(statistics.median(v), 3) for k, v in res.items()}
            out["ratio"] = round(out["futures"] / out["gc"], 3)
            out["ratio_nogc"] = round(out["futures"] / out["nogc"], 3)
            print(json.dumps({"tree": sys.argv[1], **out, "raw": {k: [round(x, 3) for x in v] for k, v in res.items()}}))
