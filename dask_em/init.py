"""Initial parameters of a mixture: a registry of initializers.

Each initializer is a coroutine (`dask_em.passes`): it yields the passes over the data
and the row reads it needs, so ``n_init`` initializations can share every pass.

========================  =======================================================  ==========
``init_params``           what it does                                             passes
========================  =======================================================  ==========
``'kmeans'``              k-means‖ seeding (``KMEANS_ROUNDS`` rounds of            3 + ≤ 10
                          ``OVERSAMPLING * K`` rows sampled by squared distance,
                          then the candidates' weights), the best of
                          ``CANDIDATE_RESTARTS`` greedy k-means++ + Lloyd runs on
                          the weighted candidates in memory, then Lloyd passes
                          over the data until the inertia falls by less than
                          ``LLOYD_TOL`` (at most ``LLOYD_MAX_PASSES``);
                          parameters from the final hard assignment (as
                          scikit-learn's ``'kmeans'``)
``'k-means++'``           k-means++ seeds (one pass per seed); means at the        K
                          seeds, covariances ``reg_covar * I``
``'random'``              uniformly random responsibilities per row                1
``'random_from_data'``    means at ``K`` distinct random rows, covariances         0
                          ``reg_covar * I``
========================  =======================================================  ==========

Every random draw comes from generators seeded by ``(seed, purpose, chunk index)``, so
the result does not depend on the number of workers or on timing. Weights are always
normalized to sum to one (scikit-learn leaves them at ``1/n`` each for
``'k-means++'``/``'random_from_data'``, which only shifts the first lower bound).
User-given ``weights_init``, ``means_init`` and ``precisions_init`` replace what the
method found, as in scikit-learn; when all three are given no pass is made.

With ``complete_rows=True`` (``GaussianMixture(missing='em')``) a start is made from the
rows without NaN only: every pass runs through `dask_em.init_kernels.on_complete_rows`
(rows with NaN weigh 0, and so are never sampled as seeds), and a row read by index
(the first k-means‖ center, the shift of ``'random'``, the rows of
``'random_from_data'``) that holds NaN is replaced by rows sampled uniformly among the
complete ones, at the cost of one more pass (`_complete`). On data without NaN this is
exactly the plain start. With no complete row at all, `DataError` asks for the three
``*_init`` arrays.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dask_em import init_kernels, kernels
from dask_em.errors import DataError, invalid_parameter
from dask_em.params import GMMParams, covariance_kind, covariance_shape
from dask_em.passes import Pass, Rows, Steps
from dask_em.stats import SuffStats, m_step

KMEANS_ROUNDS = 2
"""k-means‖ sampling rounds (one pass each)."""

OVERSAMPLING = 16
"""Rows sampled per k-means‖ round, per component."""

CANDIDATE_RESTARTS = 10
"""In-memory k-means restarts (greedy k-means++ then Lloyd) on the weighted k-means‖
candidates; the one of least weighted inertia is kept. They cost no pass."""

LLOYD_MAX_PASSES = 10
"""Most Lloyd passes over the data."""

LLOYD_TOL = 1e-3
"""Lloyd passes stop once the inertia falls by less than this fraction in one pass."""

_LOCAL_LLOYD_ITER = 100


def _scaled_identity(
    covariance_type: str, n_components: int, n_features: int, value: float
) -> np.ndarray:
    """Covariances equal to ``value * I`` for every component."""
    shape = covariance_shape(covariance_type, n_components, n_features)
    if covariance_kind(covariance_type).matrix:
        return np.broadcast_to(np.eye(n_features) * value, shape).copy()
    return np.full(shape, value, dtype=np.float64)


def _at_points(points: np.ndarray, covariance_type: str, reg_covar: float) -> GMMParams:
    """Equal weights, means at ``points`` (K, D), covariances ``reg_covar * I``."""
    n_components, n_features = points.shape
    return GMMParams.from_covariances(
        np.full(n_components, 1.0 / n_components),
        points,
        _scaled_identity(covariance_type, n_components, n_features, reg_covar),
        covariance_type,
    )


def _sq_distances(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Squared distances of every point to every center: shape (len(centers), len(points))."""
    return np.sum((centers[:, None, :] - points[None, :, :]) ** 2, axis=2)


def _pass(complete_rows: bool, chunk_fn: Callable[..., object], *args: object) -> Pass:
    """The pass of ``chunk_fn``, on the complete rows only when ``complete_rows``."""
    if complete_rows:
        return Pass(init_kernels.on_complete_rows, (chunk_fn, *args))
    return Pass(chunk_fn, args)


def _no_complete_row() -> DataError:
    return DataError(
        "no row of the data is complete (every row holds NaN), so no start can be drawn "
        "from the data: give weights_init, means_init and precisions_init."
    )


def _complete(
    index: np.ndarray, n_features: int, seed: int, complete_rows: bool
) -> Steps[np.ndarray]:
    """The rows at ``index``; with ``complete_rows``, if one of them holds NaN, as many
    rows drawn uniformly (without replacement, by ``seed``) among the complete rows, the
    last repeated when there are fewer (one more pass)."""
    rows = yield Rows(index)
    if not complete_rows or not np.isnan(rows).any():
        return rows
    empty = np.empty((0, n_features))
    sample = yield _pass(True, init_kernels.sample_by_distance_chunk, empty, len(index), seed, 99)
    if sample.rows.shape[0] == 0:
        raise _no_complete_row()
    order = np.argsort(sample.index, kind="stable")
    picked = sample.rows[order]
    return np.vstack([picked, np.repeat(picked[-1:], len(index) - len(picked), axis=0)])


def greedy_kmeans_plusplus(
    points: np.ndarray,
    weights: np.ndarray,
    n_clusters: int,
    rng: np.random.Generator,
    n_local_trials: int | None = None,
) -> np.ndarray:
    """Greedy k-means++ seeds among weighted points held in memory.

    As scikit-learn's ``kmeans_plusplus``: the first seed is drawn by weight; each next
    one is the best, by weighted inertia, of ``n_local_trials`` points drawn with
    probability proportional to ``weight * d^2`` (distance to the closest seed so far).

    Parameters
    ----------
    points : ndarray of shape (m, D)
    weights : ndarray of shape (m,)
        Non-negative, not all zero.
    n_clusters : int
    rng : numpy.random.Generator
    n_local_trials : int, optional
        Default ``2 + int(log(n_clusters))`` (scikit-learn's).

    Returns
    -------
    seeds : ndarray of shape (n_clusters, D)
    """
    if n_local_trials is None:
        n_local_trials = 2 + int(np.log(n_clusters))
    m = points.shape[0]
    chosen = [int(rng.choice(m, p=weights / weights.sum()))]
    d2 = _sq_distances(points, points[chosen])[0]
    for _ in range(1, n_clusters):
        score = weights * d2
        if score.sum() <= 0:  # fewer distinct points than clusters: repeat one
            chosen.append(chosen[-1])
            continue
        trials = rng.choice(m, size=n_local_trials, p=score / score.sum())
        trial_d2 = np.minimum(d2, _sq_distances(points, points[trials]))
        best = int(np.argmin(trial_d2 @ weights))
        chosen.append(int(trials[best]))
        d2 = trial_d2[best]
    return points[chosen]


def weighted_lloyd(
    points: np.ndarray, weights: np.ndarray, centers: np.ndarray
) -> tuple[np.ndarray, float]:
    """Lloyd iterations on weighted points in memory until the centers stop moving.

    Parameters
    ----------
    points : ndarray of shape (m, D)
    weights : ndarray of shape (m,)
    centers : ndarray of shape (K, D)
        Where to start.

    Returns
    -------
    centers : ndarray of shape (K, D)
    inertia : float
        Weighted sum of squared distances to the closest center.
    """
    n_clusters = centers.shape[0]
    for _ in range(_LOCAL_LLOYD_ITER):
        _, label = init_kernels.min_sq_distances(points, centers)
        mass = np.bincount(label, weights=weights, minlength=n_clusters)
        sums = np.zeros_like(centers)
        np.add.at(sums, label, points * weights[:, None])
        new = np.where(mass[:, None] > 0, sums / np.maximum(mass, 1e-300)[:, None], centers)
        if np.array_equal(new, centers):
            break
        centers = new
    d2, _ = init_kernels.min_sq_distances(points, centers)
    return centers, float(weights @ d2)


def _weighted_kmeans(
    points: np.ndarray, weights: np.ndarray, n_clusters: int, rng: np.random.Generator
) -> np.ndarray:
    """Best of `CANDIDATE_RESTARTS` k-means runs on a small weighted point set.

    Each run is `greedy_kmeans_plusplus` then `weighted_lloyd`; the one of least
    weighted inertia is kept (the first on ties).

    Parameters
    ----------
    points : ndarray of shape (m, D)
    weights : ndarray of shape (m,)
    n_clusters : int
    rng : numpy.random.Generator

    Returns
    -------
    centers : ndarray of shape (n_clusters, D)
    """
    if not weights.sum() > 0:
        weights = np.ones(points.shape[0])
    best, best_inertia = points[:0], np.inf
    for _ in range(CANDIDATE_RESTARTS):
        seeds = greedy_kmeans_plusplus(points, weights, n_clusters, rng)
        centers, inertia = weighted_lloyd(points, weights, seeds)
        if inertia < best_inertia:
            best, best_inertia = centers, inertia
    return best if best.shape[0] else seeds


def init_kmeans(
    shape: tuple[int, int],
    n_components: int,
    covariance_type: str,
    reg_covar: float,
    seed: int,
    complete_rows: bool = False,
) -> Steps[GMMParams]:
    """k-means‖ seeding, k-means on the candidates in memory, then Lloyd passes until the
    inertia settles; parameters of the final hard assignment."""
    n_samples, n_features = shape
    rng = kernels.chunk_rng(seed, 0)
    centers = yield from _complete(rng.integers(n_samples, size=1), n_features, seed, complete_rows)
    for round_ in range(KMEANS_ROUNDS):
        sample = yield _pass(
            complete_rows,
            init_kernels.sample_by_distance_chunk,
            centers,
            OVERSAMPLING * n_components,
            seed,
            round_,
        )
        centers = np.vstack([centers, sample.rows])
    counts = yield _pass(complete_rows, init_kernels.closest_count_chunk, centers)
    centers = _weighted_kmeans(centers, counts, n_components, rng)
    inertia = np.inf
    for _ in range(LLOYD_MAX_PASSES):
        shift = centers
        stats: SuffStats = yield _pass(
            complete_rows, init_kernels.hard_assign_chunk, shift, covariance_type
        )
        filled = stats.n[:, None] > 0
        centers = shift + np.where(filled, stats.s1 / np.where(filled, stats.n[:, None], 1.0), 0.0)
        previous, inertia = inertia, -stats.loglik
        if previous - inertia <= LLOYD_TOL * inertia:
            break
    return m_step(stats, shift, reg_covar, covariance_type)


def init_kmeans_plusplus(
    shape: tuple[int, int],
    n_components: int,
    covariance_type: str,
    reg_covar: float,
    seed: int,
    complete_rows: bool = False,
) -> Steps[GMMParams]:
    """k-means++ seeds (first one by sample weight, then by squared distance)."""
    seeds = np.empty((0, shape[1]))
    for k in range(n_components):
        sample = yield _pass(
            complete_rows, init_kernels.sample_by_distance_chunk, seeds, 1, seed, 100 + k
        )
        if sample.rows.shape[0] == 0 and seeds.shape[0] == 0:
            raise _no_complete_row()
        if sample.rows.shape[0] == 0:  # every row already is a seed: repeat the last one
            seeds = np.vstack([seeds, seeds[-1:]])
        else:
            seeds = np.vstack([seeds, sample.rows])
    return _at_points(seeds, covariance_type, reg_covar)


def init_random(
    shape: tuple[int, int],
    n_components: int,
    covariance_type: str,
    reg_covar: float,
    seed: int,
    complete_rows: bool = False,
) -> Steps[GMMParams]:
    """Uniformly random responsibilities, normalized per row (one pass)."""
    first = yield from _complete(np.array([0]), shape[1], seed, complete_rows)
    shift = np.repeat(first, n_components, axis=0)
    stats = yield _pass(
        complete_rows, init_kernels.random_resp_chunk, seed, n_components, shift, covariance_type
    )
    return m_step(stats, shift, reg_covar, covariance_type)


def init_random_from_data(
    shape: tuple[int, int],
    n_components: int,
    covariance_type: str,
    reg_covar: float,
    seed: int,
    complete_rows: bool = False,
) -> Steps[GMMParams]:
    """Means at ``K`` distinct random rows (no pass: only those rows are read)."""
    rng = kernels.chunk_rng(seed, 0)
    index = rng.choice(shape[0], size=n_components, replace=False)
    points = yield from _complete(index, shape[1], seed, complete_rows)
    return _at_points(points, covariance_type, reg_covar)


INITIALIZERS: dict[str, Callable[..., Steps[GMMParams]]] = {
    "kmeans": init_kmeans,
    "k-means++": init_kmeans_plusplus,
    "random": init_random,
    "random_from_data": init_random_from_data,
}


def initialize(
    shape: tuple[int, int],
    n_components: int,
    covariance_type: str,
    reg_covar: float,
    init_params: str,
    seed: int,
    weights_init: np.ndarray | None = None,
    means_init: np.ndarray | None = None,
    precisions_init: np.ndarray | None = None,
    complete_rows: bool = False,
) -> Steps[GMMParams]:
    """Initial parameters: the method's, with user-given arrays taking precedence.

    A coroutine (`dask_em.passes`) asking for the method's passes and rows.

    Parameters
    ----------
    shape : (int, int)
        ``(n_samples, n_features)`` of the data.
    n_components : int
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    reg_covar : float
    init_params : str
        A key of `INITIALIZERS`.
    seed : int
        Non-negative seed of every random draw.
    weights_init : ndarray of shape (K,), optional
    means_init : ndarray of shape (K, D), optional
    precisions_init : ndarray, shape from `dask_em.params.covariance_shape`, optional
        Validated beforehand (`dask_em.params.check_init_arrays`).
    complete_rows : bool, default False
        Start from the rows without NaN only (module docstring).

    Returns
    -------
    GMMParams
    """
    given = (weights_init, means_init, precisions_init)
    if all(a is not None for a in given):
        return GMMParams.from_precisions(weights_init, means_init, precisions_init, covariance_type)
    if init_params not in INITIALIZERS:
        raise invalid_parameter("init_params", init_params, f"use one of {', '.join(INITIALIZERS)}")
    found = yield from INITIALIZERS[init_params](
        shape, n_components, covariance_type, reg_covar, seed, complete_rows
    )
    weights = found.weights if weights_init is None else weights_init
    means = found.means if means_init is None else means_init
    if precisions_init is not None:
        return GMMParams.from_precisions(weights, means, precisions_init, covariance_type)
    return GMMParams(weights, means, found.covariances, found.precisions_cholesky, covariance_type)
