"""joblib's ``Parallel`` and scikit-learn's ``n_jobs`` on zdq: ``parallel_config(backend="zdq")``.

Every wait is bounded: a Parallel on a pool with no consumer is refused at once, the grid search
runs a few dozen small fits, and the suite's pytest timeout is over all.
"""

from __future__ import annotations

import operator

import pytest
from distributed import Client

import zdq
from zdq.errors import NoConsumers

joblib = pytest.importorskip("joblib", reason="the joblib backend needs joblib: pip install -e '.[test]'")
pytest.importorskip("sklearn", reason="the grid search case needs scikit-learn: pip install -e '.[test]'")

import zdq.joblib  # registers the "zdq" backend

pytestmark = pytest.mark.cluster


def _grid_search(n_jobs: int | None):  # type: ignore[no-untyped-def]
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    X, y = load_iris(return_X_y=True)
    search = GridSearchCV(SVC(), {"C": [0.1, 1.0, 10.0], "gamma": [0.01, 0.1, 1.0]}, cv=3, n_jobs=n_jobs)
    return search.fit(X, y)


def test_a_grid_search_with_n_jobs_runs_on_the_pools_consumers_and_equals_a_plain_run(client: Client) -> None:
    plain = _grid_search(None)
    with zdq.QueuePool(client, 1) as queue_pool, zdq.ConsumerPool(client, queue_pool, n_consumers=2) as consumers:
        consumers.start()
        with joblib.parallel_config(backend="zdq", queue_pool=queue_pool):
            on_zdq = _grid_search(-1)
        assert consumers.nb_consumed() > 0  # the fits ran as zdq tasks
        assert not queue_pool.closed  # a pool given is left open
    assert on_zdq.best_params_ == plain.best_params_
    assert list(on_zdq.cv_results_["mean_test_score"]) == list(plain.cv_results_["mean_test_score"])
    assert list(on_zdq.cv_results_["params"]) == list(plain.cv_results_["params"])


def test_parallel_on_the_default_client_makes_a_pool_and_raises_a_calls_error(client: Client) -> None:
    with joblib.parallel_config(backend="zdq", max_workers=2):
        backend, _ = joblib.parallel.get_active_backend()
        assert isinstance(backend, zdq.joblib.ZdqBackend)
        assert backend.effective_n_jobs(-1) == 2  # every consumer of the pool it made
        pool = backend.queue_pool
        assert joblib.Parallel(n_jobs=2)(joblib.delayed(operator.mul)(i, i) for i in range(50)) == [i * i for i in range(50)]
        # The pool it made is closed with the call (joblib's terminate), not left to a collection.
        assert pool.closed and backend._executor is None
        with pytest.raises(ZeroDivisionError):
            joblib.Parallel(n_jobs=2)(joblib.delayed(operator.truediv)(1, i) for i in range(-3, 3))
        assert backend._executor is None


def test_a_pool_with_no_consumer_running_is_refused_at_once_naming_why(client: Client) -> None:
    with zdq.QueuePool(client, 1) as queue_pool:
        with joblib.parallel_config(backend="zdq", queue_pool=queue_pool):
            with pytest.raises(NoConsumers, match="no ConsumerPool consumes"):
                joblib.Parallel(n_jobs=2)(joblib.delayed(abs)(i) for i in range(4))


def test_a_parallel_timeout_bounds_the_wait_and_cancels_the_batches_not_started(client: Client) -> None:
    """joblib's own ``timeout=`` is the bound of a call whose tasks take too long (or that no
    consumer left running would ever finish): its TimeoutError, the rest cancelled."""
    import multiprocessing
    import time

    with zdq.QueuePool(client, 1) as queue_pool, zdq.ConsumerPool(client, queue_pool, n_consumers=1) as consumers:
        consumers.start()
        with joblib.parallel_config(backend="zdq", queue_pool=queue_pool):
            started = time.monotonic()
            with pytest.raises(multiprocessing.TimeoutError):  # joblib's own
                # Tasks of 2 s: none can end within the 1 s timeout; run in turn they take 16 s.
                joblib.Parallel(n_jobs=4, timeout=1.0, batch_size=1)(joblib.delayed(time.sleep)(2) for _ in range(8))
            assert time.monotonic() - started < 10
            backend, _ = joblib.parallel.get_active_backend()
            assert not backend._futures  # aborted: nothing left in flight for this backend
