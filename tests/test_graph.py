"""The shape of the Dask work: one compute per EM iteration, a bounded tree reduction,
parameters as one shared key, and no whole-dataset responsibilities.

Schedulers are observed through `dask.callbacks.Callback` hooks on the local (threaded
and synchronous) schedulers: ``start`` sees every graph handed to a scheduler (one per
``compute``/``persist``), ``posttask`` every task result.
"""

from __future__ import annotations

import math
import pickle
import tracemalloc
import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from dask._task_spec import _execute_subgraph
from dask.callbacks import Callback
from dask.core import get_dependencies
from sklearn.exceptions import ConvergenceWarning

import dask_em
from dask_em import kernels
from dask_em.init import KMEANS_ROUNDS
from dask_em.params import GMMParams
from dask_em.reduce import RowData


class GraphRecorder(Callback):
    """Records each graph a local scheduler is started with and the size of every result.

    Attributes
    ----------
    graphs : list of dict
        One low-level graph per scheduler invocation, in order.
    result_bytes : list of (int, key)
        Pickled size of every task result.
    """

    def __init__(self, measure_results: bool = False) -> None:
        super().__init__()
        self.graphs: list[dict] = []
        self.result_bytes: list[tuple[int, object]] = []
        self._measure = measure_results

    def _start(self, dsk) -> None:
        self.graphs.append(dict(dsk))

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        if self._measure:
            self.result_bytes.append((len(pickle.dumps(result, protocol=5)), key))


def task_func(node) -> object:
    """The function a graph node calls (None for data nodes and aliases).

    For tasks fused by Dask (a subgraph run as one task), the function of the subgraph's
    output task.
    """
    if isinstance(node, tuple) and node and callable(node[0]):
        return node[0]
    func = getattr(node, "func", None)
    if func is _execute_subgraph:
        subgraph, outkey = node.args[:2]
        return task_func(subgraph[outkey])
    return func


def keys_calling(dsk: dict, fn) -> list:
    return [k for k, v in dsk.items() if task_func(v) is fn]


def params_nodes(dsk: dict) -> list:
    """Keys of graph nodes whose value is a `GMMParams` (data nodes holding the parameters)."""
    return [k for k, v in dsk.items() if isinstance(getattr(v, "value", v), GMMParams)]


def graph_keys(dsk: dict) -> list:
    """Keys of a graph, with those of the subgraphs run inside fused tasks."""
    keys = []
    for key, node in dsk.items():
        keys.append(key)
        if getattr(node, "func", None) is _execute_subgraph:
            keys.extend(graph_keys(node.args[0]))
    return keys


def chunk_keys(dsk: dict, array: da.Array) -> list:
    """Keys of the blocks of ``array`` present in a graph (inside fused tasks too)."""
    return [k for k in graph_keys(dsk) if isinstance(k, tuple) and k[0] == array.name]


def fit_quietly(gm: dask_em.GaussianMixture, X, **kw) -> dask_em.GaussianMixture:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return gm.fit(X, **kw)


# ------------------------------------------------------- one compute per iteration
@pytest.mark.parametrize("scheduler", ["threads", "sync"])
@pytest.mark.parametrize("covariance_type", ["full", "spherical"])
def test_one_scheduler_call_per_em_iteration_with_all_inits_given(
    scheduler, covariance_type, mixture_zarr, given_inits
):
    X = mixture_zarr.dask()
    gm = dask_em.GaussianMixture(
        4,
        covariance_type=covariance_type,
        tol=1e-4,
        cache=False,
        **given_inits(mixture_zarr.X, 4, covariance_type),
    )
    recorder = GraphRecorder()
    with dask.config.set(scheduler=scheduler), recorder:
        gm.fit(X)

    assert gm.converged_ and gm.n_iter_ >= 10
    assert len(recorder.graphs) == gm.n_iter_ == gm.n_passes_
    for dsk in recorder.graphs:
        assert len(keys_calling(dsk, kernels.em_chunk)) == mixture_zarr.n_chunks
        assert len(chunk_keys(dsk, X)) == mixture_zarr.n_chunks


def test_persisting_the_data_is_one_more_scheduler_call_but_not_a_pass(mixture_zarr, given_inits):
    X = mixture_zarr.dask()
    gm = dask_em.GaussianMixture(4, tol=1e-6, cache=True, **given_inits(mixture_zarr.X, 4, "full"))
    recorder = GraphRecorder()
    with dask.config.set(scheduler="threads"), recorder:
        gm.fit(X)

    assert len(recorder.graphs) == gm.n_iter_ + 1
    persist, *iterations = recorder.graphs
    assert not keys_calling(persist, kernels.em_chunk)
    assert len(chunk_keys(persist, X)) == mixture_zarr.n_chunks
    # after the persist, the EM passes use the held blocks: no task reads the store
    for dsk in iterations:
        assert len(chunk_keys(dsk, X)) == mixture_zarr.n_chunks
        assert all(task_func(dsk[k]) is None for k in chunk_keys(dsk, X))
        assert not any(isinstance(getattr(v, "value", None), zarr.Array) for v in dsk.values())
    assert gm.n_passes_ == gm.n_iter_


@pytest.mark.parametrize(
    ("init_params", "extra_passes"),
    [("kmeans", KMEANS_ROUNDS + 1), ("k-means++", 4), ("random", 1), ("random_from_data", 0)],
)
def test_initialization_passes_are_counted_and_em_is_one_call_per_iteration(
    init_params, extra_passes, mixture_zarr
):
    X = mixture_zarr.dask()
    gm = dask_em.GaussianMixture(4, init_params=init_params, tol=1e-4, random_state=0, cache=False)
    recorder = GraphRecorder()
    with dask.config.set(scheduler="threads"), recorder:
        fit_quietly(gm, X)

    em_calls = [g for g in recorder.graphs if keys_calling(g, kernels.em_chunk)]
    full_passes = [g for g in recorder.graphs if len(chunk_keys(g, X)) == mixture_zarr.n_chunks]
    row_reads = [g for g in recorder.graphs if len(chunk_keys(g, X)) < mixture_zarr.n_chunks]
    assert len(em_calls) == gm.n_iter_ >= 2
    assert len(full_passes) == gm.n_passes_
    assert len(full_passes) + len(row_reads) == len(recorder.graphs)
    # the other scheduler calls read a few rows for seeds: at most K chunks each
    assert all(len(chunk_keys(g, X)) <= 4 for g in row_reads)
    assert gm.n_passes_ - gm.n_iter_ == extra_passes


def test_restarts_share_each_pass_reading_every_chunk_once(mixture_zarr):
    """``n_init=3``: every pass is one compute in which each chunk is read once and one
    task per chunk evaluates all three candidates; the passes equal the slowest run's."""
    X = mixture_zarr.dask()
    gm = dask_em.GaussianMixture(
        4, n_init=3, init_params="random", tol=1e-4, random_state=0, cache=False
    )
    recorder = GraphRecorder()
    with dask.config.set(scheduler="threads"), recorder:
        fit_quietly(gm, X)

    full_passes = [g for g in recorder.graphs if len(chunk_keys(g, X)) == mixture_zarr.n_chunks]
    assert len(full_passes) == gm.n_passes_
    shared = [g for g in full_passes if any("em_chunk+em_chunk+em_chunk-" in str(k) for k in g)]
    assert shared, "no pass served the three candidates together"
    for dsk in full_passes:
        map_tasks = [k for k, v in dsk.items() if task_func(v) is not None and "chunk" in str(k)]
        assert len(map_tasks) == mixture_zarr.n_chunks  # one task per chunk, all candidates
    # one initialization pass (random responsibilities) shared by the three candidates
    assert any(
        "random_resp_chunk+random_resp_chunk+random_resp_chunk-" in str(k)
        for g in full_passes
        for k in g
    )


# ------------------------------------------------------------- tree reduction
def reduction_shape(dsk: dict, split_every: int) -> tuple[int, int]:
    """Check the reduction tasks of a one-pass graph; return (map tasks, tree depth).

    Reduction tasks are the tasks that consume map (``em_chunk``) results or other
    reduction tasks. Every one must have at most ``split_every`` inputs, every map result
    must be consumed exactly once, and there must be one final key.
    """
    maps = set(keys_calling(dsk, kernels.em_chunk))
    deps = {k: set(get_dependencies(dsk, k)) for k in dsk}
    reducers = set()
    frontier = set(maps)
    while frontier:
        consumers = {k for k, d in deps.items() if d & frontier} - reducers
        reducers |= consumers
        frontier = consumers
    consumed: dict = {}
    for r in reducers:
        inputs = deps[r]
        assert inputs <= maps | reducers, "a reduction task reads something else"
        assert 1 <= len(inputs) <= split_every, (r, len(inputs))
        for i in inputs:
            consumed[i] = consumed.get(i, 0) + 1
    sinks = [k for k in maps | reducers if consumed.get(k, 0) == 0]
    assert len(sinks) == 1
    assert all(consumed.get(k) == 1 for k in maps | reducers if k not in sinks)

    def depth(k) -> int:
        below = deps[k] & (maps | reducers)
        return 0 if not below else 1 + max(depth(b) for b in below)

    return len(maps), depth(sinks[0])


@pytest.mark.parametrize("split_every", [2, 3, 8])
@pytest.mark.parametrize("n_chunks", [1, 2, 9, 50])
def test_reduction_fan_in_is_at_most_split_every(split_every, n_chunks):
    rows = 7 * n_chunks - 3  # uneven last chunk
    X = da.from_array(np.random.default_rng(0).normal(size=(rows, 2)), chunks=(7, 2))
    params = GMMParams.from_covariances(
        np.array([0.5, 0.5]), np.zeros((2, 2)), np.ones((2, 2)), "diag"
    )
    data = RowData(X, split_every=split_every)
    dsk = dict(data.build(kernels.em_chunk, params).__dask_graph__())
    n_maps, tree_depth = reduction_shape(dsk, split_every)
    assert n_maps == n_chunks
    expected_depth = 0 if n_chunks == 1 else math.ceil(math.log(n_chunks) / math.log(split_every))
    assert tree_depth == expected_depth


def test_graphs_run_by_a_fit_respect_split_every(mixture_zarr, given_inits):
    gm = dask_em.GaussianMixture(
        4,
        covariance_type="tied",
        tol=1e-4,
        cache=False,
        split_every=3,
        **given_inits(mixture_zarr.X, 4, "tied"),
    )
    recorder = GraphRecorder()
    with dask.config.set(scheduler="sync"), recorder:
        gm.fit(mixture_zarr.dask())
    assert len(recorder.graphs) == gm.n_iter_
    for dsk in recorder.graphs:
        # 16 chunks, fan-in 3: 16 -> 6 -> 2 -> 1
        assert reduction_shape(dsk, 3) == (mixture_zarr.n_chunks, 3)


def test_a_streamed_pass_reads_each_chunk_inside_its_chunk_task(mixture_zarr):
    """No chunk read from Zarr is a task result of its own, stored (and maybe moved to
    another worker) before its chunk task runs."""
    X = mixture_zarr.dask()
    params = GMMParams.from_covariances(
        np.array([0.5, 0.5]), np.zeros((2, 3)), np.ones((2, 3)), "diag"
    )
    dsk = dict(RowData(X).build(kernels.em_chunk, params).__dask_graph__())
    assert len(chunk_keys(dsk, X)) == mixture_zarr.n_chunks
    assert not any(isinstance(k, tuple) and k[0] == X.name for k in dsk)
    maps = keys_calling(dsk, kernels.em_chunk)
    assert len(maps) == mixture_zarr.n_chunks
    (params_key,) = params_nodes(dsk)
    for key in maps:
        assert params_key in get_dependencies(dsk, key)


# ------------------------------------------------------------ shared parameters
def big_params(n_components: int = 8, n_features: int = 30) -> GMMParams:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(n_components, n_features, n_features))
    cov = a @ np.swapaxes(a, 1, 2) / n_features + np.eye(n_features)
    return GMMParams.from_covariances(
        np.full(n_components, 1.0 / n_components),
        rng.normal(size=(n_components, n_features)),
        cov,
        "full",
    )


def test_parameters_are_one_key_shared_by_every_map_task():
    params = big_params()
    params_bytes = len(pickle.dumps(params))
    assert params_bytes > 100_000
    X = da.from_array(np.zeros((1000, 30)), chunks=(37, 30))
    dsk = dict(RowData(X).build(kernels.em_chunk, params).__dask_graph__())

    (params_key,) = params_nodes(dsk)
    maps = keys_calling(dsk, kernels.em_chunk)
    assert len(maps) == len(X.chunks[0]) == 28
    for key in maps:
        assert params_key in get_dependencies(dsk, key)
        # the task refers to the parameters, it does not carry a copy of them
        assert len(pickle.dumps(dsk[key])) < params_bytes / 50


def test_each_em_iteration_ships_the_parameters_once(mixture_zarr, given_inits):
    gm = dask_em.GaussianMixture(4, tol=1e-4, cache=False, **given_inits(mixture_zarr.X, 4, "full"))
    recorder = GraphRecorder()
    with dask.config.set(scheduler="threads"), recorder:
        gm.fit(mixture_zarr.dask())
    for dsk in recorder.graphs:
        (params_key,) = params_nodes(dsk)
        for key in keys_calling(dsk, kernels.em_chunk):
            assert params_key in get_dependencies(dsk, key)


# ------------------------------------------------------------------- memory
def test_whole_dataset_responsibilities_never_materialise(write_zarr):
    """Task results stay about one data chunk; the driver's peak memory stays far below
    the responsibilities of the dataset (n * K * 8 bytes)."""
    n, d, k, chunk_rows = 150_001, 2, 16, 2000
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, d)) + rng.integers(0, 6, size=(n, 1))
    data = write_zarr(X, chunk_rows)
    resp_bytes = n * k * 8  # 19.2 MB
    chunk_bytes = chunk_rows * d * 8  # 32 kB
    inits = dict(
        weights_init=np.full(k, 1.0 / k),
        means_init=X[rng.choice(n, k, replace=False)],
        precisions_init=np.ones((k, d)),
    )

    def fit(source):
        gm = dask_em.GaussianMixture(k, covariance_type="diag", max_iter=2, cache=False, **inits)
        return fit_quietly(gm, source)

    fit(data.dask()[:5000])  # warm-up: first-use imports are not the fit's memory
    recorder = GraphRecorder(measure_results=True)
    with dask.config.set(scheduler="threads"), recorder:
        fit(data.dask())
    largest, key = max(recorder.result_bytes, key=lambda t: t[0])
    assert largest <= chunk_bytes + 4096, key  # the largest result is a data chunk

    tracemalloc.start()
    try:
        with dask.config.set(scheduler="threads", num_workers=2):
            fit(data.dask())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Each of the 2 threads holds a chunk and a few (K, chunk_rows) float64 temporaries
    # of 256 kB; the graph of 76 chunks adds some more. Whole-data responsibilities
    # (or whole-data anything of K columns) would exceed the bound on their own.
    print(f"peak traced memory {peak} B; responsibilities {resp_bytes} B")
    assert peak < resp_bytes / 4, (peak, resp_bytes)
