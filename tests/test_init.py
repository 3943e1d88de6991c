"""The pieces of the ``'kmeans'`` initializer, in NumPy alone.

Greedy k-means++, the in-memory k-means restarts on the weighted k-means‖ candidates
and EM on the uniform sample cost no pass over the data. The coroutine is served here
by a NumPy pass over row chunks (`dask_em.passes.serve_alone`), as `dask_em.reduce`
serves it over a Dask array.
"""

from __future__ import annotations

from functools import reduce

import numpy as np
import pytest

from dask_em import init, init_kernels, kernels
from dask_em.em import EMResult, run_em
from dask_em.errors import IllDefinedCovarianceError
from dask_em.passes import Pass, serve_alone
from dask_em.stats import m_step

CENTERS = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0], [5.0, 20.0]])


def blobs(n_per: int, seed: int, spread: float = 0.5) -> np.ndarray:
    """Rows around each of `CENTERS`, in order."""
    rng = np.random.default_rng(seed)
    return np.concatenate([c + spread * rng.normal(size=(n_per, 2)) for c in CENTERS])


def numpy_pass(X: np.ndarray, chunk_rows: int, counter: list[int]):
    """``run_pass`` over row chunks of ``X`` summed in chunk order; counts the passes."""

    def run(request: Pass):
        counter[0] += 1
        starts = range(0, X.shape[0], chunk_rows)
        parts = [
            request.fn(X[s : s + chunk_rows], None, i, s, *request.args)
            for i, s in enumerate(starts)
        ]
        return reduce(lambda a, b: a + b, parts)

    return run


def test_greedy_kmeans_plusplus_is_deterministic_for_a_seed():
    points = blobs(20, 0)
    weights = np.random.default_rng(1).uniform(0.5, 2.0, size=points.shape[0])
    first = init.greedy_kmeans_plusplus(points, weights, 5, np.random.default_rng(7))
    again = init.greedy_kmeans_plusplus(points, weights, 5, np.random.default_rng(7))
    other = init.greedy_kmeans_plusplus(points, weights, 5, np.random.default_rng(8))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("seed", range(10))
def test_greedy_kmeans_plusplus_keeps_the_local_trial_of_least_inertia(seed):
    """Replaying the same draws: the second seed is the trial whose inertia is least."""
    points = blobs(10, seed, spread=2.0)
    weights = np.ones(points.shape[0])
    n_trials = 4
    seeds = init.greedy_kmeans_plusplus(points, weights, 2, np.random.default_rng(seed), n_trials)
    rng = np.random.default_rng(seed)
    first = points[rng.choice(points.shape[0], p=weights / weights.sum())]
    d2 = ((points - first) ** 2).sum(axis=1)
    trials = rng.choice(points.shape[0], size=n_trials, p=d2 / d2.sum())
    inertia = [np.minimum(d2, ((points - points[t]) ** 2).sum(axis=1)).sum() for t in trials]
    np.testing.assert_array_equal(seeds[0], first)
    np.testing.assert_array_equal(seeds[1], points[trials[int(np.argmin(inertia))]])
    assert len(set(inertia)) > 1  # the trials differ: a real choice was made


@pytest.mark.parametrize("seed", range(20))
def test_kmeans_restarts_on_candidates_find_every_separated_cluster_first(seed):
    points = blobs(8, seed)
    weights = np.random.default_rng(seed).uniform(1.0, 3.0, size=points.shape[0])
    centers = init.kmeans_restarts(points, weights, 5, np.random.default_rng(seed))[0]
    closest = np.argmin(((centers[:, None] - CENTERS[None]) ** 2).sum(axis=2), axis=1)
    assert sorted(closest) == list(range(5))


def test_kmeans_restarts_are_distinct_and_sorted_by_inertia():
    points = blobs(6, 4, spread=3.0)
    weights = np.ones(points.shape[0])
    starts = init.kmeans_restarts(points, weights, 4, np.random.default_rng(0))
    assert 1 < len(starts) <= init.CANDIDATE_RESTARTS
    inertia = [weights @ ((points[:, None] - c[None]) ** 2).sum(axis=2).min(axis=1) for c in starts]
    assert inertia == sorted(inertia)
    canonical = {c[np.lexsort(c.T[::-1])].tobytes() for c in starts}
    assert len(canonical) == len(starts)


def test_weighted_lloyd_returns_weighted_means_and_their_inertia():
    points = np.array([[0.0], [2.0], [10.0], [14.0]])
    weights = np.array([1.0, 3.0, 1.0, 1.0])
    centers, inertia = init.weighted_lloyd(points, weights, np.array([[0.0], [10.0]]))
    np.testing.assert_allclose(centers, [[1.5], [12.0]])
    assert inertia == pytest.approx(1.5**2 + 3 * 0.5**2 + 2**2 + 2**2)


def hard_start(X: np.ndarray, centers: np.ndarray, reg_covar: float = 1e-6):
    """Parameters of the hard assignment of ``X`` to its closest ``centers`` (full)."""
    stats = init_kernels.hard_assign_chunk(X, None, 0, 0, centers, "full")
    return m_step(stats, centers, reg_covar, "full")


def test_sample_em_is_plain_em_on_the_rows():
    X = blobs(50, 1, spread=2.0)
    start = hard_start(X, X[:5])
    params, lower_bound = init.sample_em(X, start, 1e-6, 100)
    alone = run_em(
        lambda p: kernels.em_chunk(X, None, 0, 0, p),
        EMResult(start),
        tol=init.SAMPLE_EM_TOL,
        max_iter=100,
        reg_covar=1e-6,
    )
    assert alone.converged and alone.n_iter < 100
    assert lower_bound == alone.lower_bound
    np.testing.assert_array_equal(params.means, alone.params.means)
    np.testing.assert_array_equal(params.covariances, alone.params.covariances)


def test_best_on_sample_keeps_the_start_of_highest_likelihood():
    X = blobs(60, 2)
    merged = CENTERS.copy()
    merged[0], merged[1] = [5.0, 0.0], [5.0, 0.5]  # between two clusters, none on either
    best = init.best_on_sample(X, [merged, CENTERS.copy()], "full", 1e-6)
    alone = [
        init.sample_em(X, hard_start(X, c), 1e-6, init.SAMPLE_EM_MAX_ITER)
        for c in (merged, CENTERS)
    ]
    assert alone[1][1] > alone[0][1]
    np.testing.assert_array_equal(best.means, alone[1][0].means)


def test_best_on_sample_drops_starts_with_ill_defined_covariances():
    X = blobs(30, 5)
    lonely = CENTERS.copy()
    lonely[4] = X[-1] + 100.0  # no row is closest: a zero covariance without reg_covar
    with pytest.raises(IllDefinedCovarianceError):
        hard_start(X, lonely, reg_covar=0.0)
    assert init.best_on_sample(X, [lonely], "full", 0.0) is None


def test_joint_pass_answers_each_chunk_function_as_alone():
    X = blobs(40, 6)
    centers = X[:7]
    calls = (
        (init_kernels.closest_count_chunk, (centers,)),
        (init_kernels.sample_by_distance_chunk, (np.empty((0, 2)), 30, 3, 98)),
    )
    passes = [0]
    run = numpy_pass(X, 33, passes)
    joint = run(Pass(init_kernels.joint_chunk, (calls,)))
    counts, sample = joint.parts
    np.testing.assert_array_equal(counts, run(Pass(calls[0][0], calls[0][1])))
    alone = run(Pass(calls[1][0], calls[1][1]))
    np.testing.assert_array_equal(sample.index, alone.index)
    np.testing.assert_array_equal(sample.rows, alone.rows)


def test_kmeans_init_makes_the_sampling_passes_and_one_more():
    X = blobs(400, 3)
    passes = [0]
    params = serve_alone(
        init.init_kmeans(init.Problem(X.shape, 5, "full", 1e-6, seed=11)),
        numpy_pass(X, 500, passes),
        lambda index: X[index],
    )
    assert passes[0] == init.KMEANS_ROUNDS + 1
    order = np.argmin(((params.means[:, None] - CENTERS[None]) ** 2).sum(axis=2), axis=1)
    assert sorted(order) == list(range(5))
    np.testing.assert_allclose(params.means, CENTERS[order], atol=0.1)


def test_kmeans_init_falls_back_to_a_hard_assignment_pass_when_the_sample_is_too_small(
    monkeypatch,
):
    """One sample row per component and no ``reg_covar``: every start is ill-defined on
    the sample, so the best k-means start is assigned over the whole data instead."""
    monkeypatch.setattr(init, "SAMPLE_ROWS_PER_COMPONENT", 1)
    X = blobs(400, 3)
    passes = [0]
    params = serve_alone(
        init.init_kmeans(init.Problem(X.shape, 5, "full", 0.0, seed=11)),
        numpy_pass(X, 500, passes),
        lambda index: X[index],
    )
    assert passes[0] == init.KMEANS_ROUNDS + 2
    order = np.argmin(((params.means[:, None] - CENTERS[None]) ** 2).sum(axis=2), axis=1)
    assert sorted(order) == list(range(5))
