"""Fits on a real multi-process ``distributed`` cluster reading a Zarr store on disk.

The worker processes read the store themselves; the reduction order is fixed by chunk
index and every random draw is seeded by ``(random_state, chunk index)``, so the result
is the same on the cluster, on the local threaded scheduler and whatever the number of
workers: asserted to 1e-12 relative, measured bit for bit (the differences are recorded
with `parity_log`).
"""

from __future__ import annotations

from collections import Counter

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from distributed import Client, LocalCluster, futures_of, get_task_stream, wait

import dask_em
from dask_em.errors import DataError
from dask_em.reduce import RowData

FITTED = ("weights_", "means_", "covariances_", "precisions_cholesky_")


def max_rel_diff(a, b) -> float:
    """Largest relative difference between the fitted parameters and lower bounds."""
    pairs = [(getattr(a, n), getattr(b, n)) for n in FITTED]
    pairs.append((np.asarray(a.lower_bounds_), np.asarray(b.lower_bounds_)))
    return max(
        float(np.max(np.abs(x - y) / np.maximum(np.abs(y), np.finfo(float).tiny))) for x, y in pairs
    )


def assert_identical(a, b, parity_log=None, scenario: str = "") -> None:
    """Same iteration and pass counts; parameters and lower-bound history equal to 1e-12
    relative (in practice bit for bit: the reduction order is fixed by chunk index)."""
    assert a.n_iter_ == b.n_iter_
    assert a.n_passes_ == b.n_passes_
    diff = max_rel_diff(a, b)
    if parity_log is not None:
        parity_log.record(scenario, a.covariance_type, max_rel_diff=diff)
    assert diff <= 1e-12, diff


def threaded_fit(path: str, **params) -> dask_em.GaussianMixture:
    with dask.config.set(scheduler="threads"):
        return dask_em.GaussianMixture(**params).fit(path)


def test_streaming_fit_on_worker_processes_equals_the_threaded_fit(
    dask_client, mixture_zarr, given_inits, parity_log
):
    params = dict(
        n_components=4,
        covariance_type="full",
        tol=1e-3,
        cache=False,
        chunk_rows=mixture_zarr.chunk_rows,  # one task per store chunk, spread over workers
        **given_inits(mixture_zarr.X, 4, "full"),
    )
    with get_task_stream(dask_client) as stream:
        on_cluster = dask_em.GaussianMixture(**params).fit(mixture_zarr.path)
    with get_task_stream(dask_client) as local_stream:
        local = threaded_fit(mixture_zarr.path, **params)
    assert not local_stream.data  # the reference fit ran on local threads, not the cluster

    assert on_cluster.converged_ and on_cluster.n_iter_ >= 5
    assert_identical(on_cluster, local, parity_log, "2 workers vs threads (stream)")
    em_tasks = [t for t in stream.data if "em_chunk" in str(t["key"])]
    assert len(em_tasks) == on_cluster.n_iter_ * mixture_zarr.n_chunks
    workers = set(dask_client.scheduler_info()["workers"])
    assert {t["worker"] for t in em_tasks} == workers  # both worker processes did EM work


@pytest.mark.parametrize("covariance_type", ["tied", "diag"])
def test_kmeans_fit_on_the_cluster_equals_local_threaded_and_sync_fits(
    covariance_type, dask_client, mixture_zarr, parity_log
):
    params = dict(n_components=4, covariance_type=covariance_type, random_state=0, tol=1e-4)
    on_cluster = dask_em.GaussianMixture(**params).fit(mixture_zarr.path)  # cache: persisted
    local = threaded_fit(mixture_zarr.path, **params)
    with dask.config.set(scheduler="sync"):
        single_thread = dask_em.GaussianMixture(**params).fit(mixture_zarr.path)
    assert_identical(on_cluster, local, parity_log, "2 workers vs threads (kmeans)")
    assert_identical(single_thread, local, parity_log, "sync vs threads (kmeans)")


def test_cached_chunks_are_spread_evenly_over_the_workers(dask_client, mixture_zarr):
    """Persisted row chunks are placed round-robin, not wherever the reads happened to
    run, so every pass over cached data keeps both workers equally busy."""
    X = da.from_zarr(mixture_zarr.path, chunks=(mixture_zarr.chunk_rows, -1))
    data = RowData(X).persisted(True)
    futures = futures_of(data.X)
    assert len(futures) == mixture_zarr.n_chunks
    wait(futures)
    holders = Counter(w for ws in dask_client.who_has(futures).values() for w in ws)
    assert set(holders) == set(dask_client.scheduler_info()["workers"])
    assert max(holders.values()) - min(holders.values()) <= 1
    np.testing.assert_array_equal(data.X.compute(), mixture_zarr.X)


def test_lazy_predictions_compute_on_the_cluster(dask_client, mixture_zarr):
    gm = threaded_fit(mixture_zarr.path, n_components=3, random_state=0)
    labels = gm.predict(mixture_zarr.path)
    proba = gm.predict_proba(da.from_zarr(mixture_zarr.path))
    assert isinstance(labels, da.Array) and isinstance(proba, da.Array)
    with get_task_stream(dask_client) as stream:
        labels_cluster, proba_cluster = dask.compute(labels, proba)
    assert stream.data, "the client did not run the predictions"
    np.testing.assert_array_equal(labels_cluster, gm.predict(mixture_zarr.X))
    np.testing.assert_allclose(proba_cluster, gm.predict_proba(mixture_zarr.X), rtol=1e-12)


def test_data_error_raised_on_a_worker_reaches_the_caller(dask_client, mixture_zarr):
    z = zarr.open_array(mixture_zarr.path, mode="r+")
    z[9 * 130 + 3, 0] = np.inf  # in store chunk 9, merged into the one automatic task
    with pytest.raises(DataError, match=r"first at row 1173\b"):
        dask_em.GaussianMixture(4, random_state=0, cache=False).fit(mixture_zarr.path)


@pytest.mark.slow
def test_kmeans_fit_does_not_depend_on_the_number_of_workers(
    dask_cluster, mixture_zarr, parity_log
):
    params = dict(n_components=4, covariance_type="full", random_state=5, tol=1e-4, cache=False)
    with Client(dask_cluster):
        two_workers = dask_em.GaussianMixture(**params).fit(mixture_zarr.path)
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as one,
        Client(one),
    ):
        one_worker = dask_em.GaussianMixture(**params).fit(mixture_zarr.path)
    assert two_workers.n_passes_ > two_workers.n_iter_  # k-means|| initialization ran
    assert_identical(one_worker, two_workers, parity_log, "1 worker vs 2 workers")
