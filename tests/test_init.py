"""The pieces of the ``'kmeans'`` initializer, in NumPy alone.

Greedy k-means++ and the in-memory k-means on the weighted k-means‖ candidates cost no
pass over the data; the Lloyd passes stop once the inertia settles. The coroutine is
served here by a NumPy pass over row chunks (`dask_em.passes.serve_alone`), as
`dask_em.reduce` serves it over a Dask array.
"""

from __future__ import annotations

from functools import reduce

import numpy as np
import pytest

from dask_em import init
from dask_em.passes import Pass, serve_alone

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
def test_kmeans_on_candidates_finds_every_separated_cluster(seed):
    points = blobs(8, seed)
    weights = np.random.default_rng(seed).uniform(1.0, 3.0, size=points.shape[0])
    centers = init._weighted_kmeans(points, weights, 5, np.random.default_rng(seed))
    closest = np.argmin(((centers[:, None] - CENTERS[None]) ** 2).sum(axis=2), axis=1)
    assert sorted(closest) == list(range(5))


def test_weighted_lloyd_returns_weighted_means_and_their_inertia():
    points = np.array([[0.0], [2.0], [10.0], [14.0]])
    weights = np.array([1.0, 3.0, 1.0, 1.0])
    centers, inertia = init.weighted_lloyd(points, weights, np.array([[0.0], [10.0]]))
    np.testing.assert_allclose(centers, [[1.5], [12.0]])
    assert inertia == pytest.approx(1.5**2 + 3 * 0.5**2 + 2**2 + 2**2)


def test_kmeans_init_stops_lloyd_passes_once_the_inertia_settles():
    X = blobs(400, 3)
    passes = [0]
    params = serve_alone(
        init.init_kmeans(X.shape, 5, "full", 1e-6, seed=11),
        numpy_pass(X, 500, passes),
        lambda index: X[index],
    )
    lloyd = passes[0] - init.KMEANS_ROUNDS - 1
    assert 1 <= lloyd < init.LLOYD_MAX_PASSES
    order = np.argmin(((params.means[:, None] - CENTERS[None]) ** 2).sum(axis=2), axis=1)
    assert sorted(order) == list(range(5))
    np.testing.assert_allclose(params.means, CENTERS[order], atol=0.1)
