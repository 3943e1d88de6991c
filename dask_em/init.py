"""Initial parameters of a mixture: a registry of initializers.

Each initializer is a coroutine (`dask_em.passes`): it yields the passes over the data
and the row reads it needs, so ``n_init`` initializations can share every pass.

========================  =======================================================  ==========
``init_params``           what it does                                             passes
========================  =======================================================  ==========
``'kmeans'``              k-means‖ seeding (``KMEANS_ROUNDS`` rounds of            3
                          ``OVERSAMPLING * K`` rows sampled by squared distance,
                          then one pass weighting the candidates and drawing a
                          uniform sample of ``SAMPLE_ROWS_PER_COMPONENT * K``
                          rows); in memory, ``CANDIDATE_RESTARTS`` greedy
                          k-means++ + Lloyd runs on the weighted candidates,
                          each distinct outcome a start for EM on the sample
                          (`best_on_sample`); the mixture of highest
                          likelihood on the sample is the start
``'k-means++'``           k-means++ seeds (one pass per seed); means at the        K
                          seeds, covariances ``reg_covar * I``
``'random'``              uniformly random responsibilities per row                1
``'random_from_data'``    means at ``K`` distinct random rows, covariances         0
                          ``reg_covar * I``
========================  =======================================================  ==========

Every random draw comes from generators seeded by ``(seed, purpose, chunk index)``, so
the result does not depend on the number of workers or on timing. The ``'kmeans'``
sample is drawn by sample weight (uniformly without one) and fitted unweighted; it is
capped at ``SAMPLE_MAX_ROWS`` rows. Should every start have an ill-defined covariance
on the sample (e.g. ``reg_covar=0``), one more pass assigns the rows to the k-means
centers of least inertia and the parameters are those of that hard assignment. Weights are always
normalized to sum to one (scikit-learn leaves them at ``1/n`` each for
``'k-means++'``/``'random_from_data'``, which only shifts the first lower bound).
User-given ``weights_init``, ``means_init`` and ``precisions_init`` replace what the
method found, as in scikit-learn; when all three are given no pass is made.

With ``complete_rows=True`` (``GaussianMixture(missing='em')``) a start is made from the
rows without NaN only: every pass runs through `dask_em.init_kernels.on_complete_rows`
(rows with NaN weigh 0, and so are never sampled as seeds), and a row read by index
(the first k-means‖ center, the shift of ``'random'``, the rows of
``'random_from_data'``) that holds NaN is replaced by rows sampled uniformly among the
complete ones, at the cost of one more pass (`Problem.rows`). On data without NaN this is
exactly the plain start. With no complete row at all, `DataError` asks for the three
``*_init`` arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dask_em import init_kernels, kernels
from dask_em.errors import DataError, IllDefinedCovarianceError, invalid_parameter
from dask_em.params import GMMParams, covariance_kind, covariance_shape
from dask_em.passes import Pass, Rows, Steps
from dask_em.stats import m_step

KMEANS_ROUNDS = 2
"""k-means‖ sampling rounds (one pass each)."""

OVERSAMPLING = 16
"""Rows sampled per k-means‖ round, per component."""

CANDIDATE_RESTARTS = 10
"""In-memory k-means restarts (greedy k-means++ then Lloyd) on the weighted k-means‖
candidates; each distinct outcome is a candidate start for `sample_em`."""

SAMPLE_ROWS_PER_COMPONENT = 1024
"""Rows per component of the uniform sample held in memory (at most `SAMPLE_MAX_ROWS`)."""

SAMPLE_MAX_ROWS = 50_000
"""Most rows of the in-memory sample."""

SAMPLE_EM_TOL = 1e-3
"""EM on the sample stops once its lower bound changes by less than this."""

SAMPLE_EM_MAX_ITER = 100
"""Most EM iterations on the sample, per candidate start."""

_LOCAL_LLOYD_ITER = 100


@dataclass(frozen=True)
class Problem:
    """What every initializer is given: the data's ``shape``, ``(n_samples, n_features)``,
    and the parameters of `initialize` of the same names."""

    shape: tuple[int, int]
    n_components: int
    covariance_type: str
    reg_covar: float
    seed: int
    complete_rows: bool = False

    @property
    def n_features(self) -> int:
        return self.shape[1]

    def rng(self) -> np.random.Generator:
        """The generator of the in-memory draws (seeded by ``(seed, 0)``)."""
        return kernels.chunk_rng(self.seed, 0)

    def pass_of(self, chunk_fn: Callable[..., object], *args: object) -> Pass:
        """The pass of ``chunk_fn``, on the complete rows only when ``complete_rows``."""
        if self.complete_rows:
            return Pass(init_kernels.on_complete_rows, (chunk_fn, *args))
        return Pass(chunk_fn, args)

    def rows(self, index: np.ndarray) -> Steps[np.ndarray]:
        """The rows at ``index``; with ``complete_rows``, if one of them holds NaN, as
        many rows drawn uniformly (without replacement) among the complete rows, the
        last repeated when there are fewer (one more pass)."""
        rows = yield Rows(index)
        if not self.complete_rows or not np.isnan(rows).any():
            return rows
        sample = yield self.pass_of(
            init_kernels.sample_by_distance_chunk, self.no_centers(), len(index), self.seed, 99
        )
        if sample.rows.shape[0] == 0:
            raise _no_complete_row()
        picked = sample.rows[np.argsort(sample.index, kind="stable")]
        return np.vstack([picked, np.repeat(picked[-1:], len(index) - len(picked), axis=0)])

    def at_points(self, points: np.ndarray) -> GMMParams:
        """Equal weights, means at ``points`` (K, D), covariances ``reg_covar * I``."""
        shape = covariance_shape(self.covariance_type, self.n_components, self.n_features)
        if covariance_kind(self.covariance_type).matrix:
            cov = np.broadcast_to(np.eye(self.n_features) * self.reg_covar, shape).copy()
        else:
            cov = np.full(shape, self.reg_covar, dtype=np.float64)
        weights = np.full(self.n_components, 1.0 / self.n_components)
        return GMMParams.from_covariances(weights, points, cov, self.covariance_type)

    def no_centers(self) -> np.ndarray:
        """No centers, shape (0, D): sampling by them is sampling by weight alone."""
        return np.empty((0, self.n_features))


def _sq_distances(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Squared distances of every point to every center: shape (len(centers), len(points))."""
    return np.sum((centers[:, None, :] - points[None, :, :]) ** 2, axis=2)


def _no_complete_row() -> DataError:
    return DataError(
        "no row of the data is complete (every row holds NaN), so no start can be drawn "
        "from the data: give weights_init, means_init and precisions_init."
    )


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


def kmeans_restarts(
    points: np.ndarray, weights: np.ndarray, n_clusters: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """The distinct outcomes of `CANDIDATE_RESTARTS` k-means runs on weighted points.

    Each run is `greedy_kmeans_plusplus` then `weighted_lloyd`; runs that end at the
    same centers (in any order) count once. Sorted by weighted inertia, least first
    (the earlier run on ties).

    Parameters
    ----------
    points : ndarray of shape (m, D)
    weights : ndarray of shape (m,)
        Non-negative (all zero is read as all one).
    n_clusters : int
    rng : numpy.random.Generator

    Returns
    -------
    list of ndarray of shape (n_clusters, D)
    """
    if not weights.sum() > 0:
        weights = np.ones(points.shape[0])
    found: dict[bytes, tuple[float, int, np.ndarray]] = {}
    for run in range(CANDIDATE_RESTARTS):
        seeds = greedy_kmeans_plusplus(points, weights, n_clusters, rng)
        centers, inertia = weighted_lloyd(points, weights, seeds)
        key = centers[np.lexsort(centers.T[::-1])].tobytes()
        found.setdefault(key, (inertia, run, centers))
    return [centers for _, _, centers in sorted(found.values(), key=lambda f: f[:2])]


def sample_em(
    sample: np.ndarray, start: GMMParams, reg_covar: float, max_iter: int
) -> tuple[GMMParams, float]:
    """Plain EM on rows held in memory until the lower bound changes by less than
    `SAMPLE_EM_TOL` (at most ``max_iter`` iterations).

    Parameters
    ----------
    sample : ndarray of shape (m, D)
    start : GMMParams
    reg_covar : float
    max_iter : int

    Returns
    -------
    params : GMMParams
        After the last M-step.
    lower_bound : float
        Mean log-likelihood of ``sample`` before that M-step.
    """
    params, lower_bound = start, -np.inf
    for _ in range(max_iter):
        stats = kernels.em_chunk(sample, None, 0, 0, params)
        previous, lower_bound = lower_bound, stats.mean_loglik
        params = m_step(stats, params.means, reg_covar, params.covariance_type)
        if abs(lower_bound - previous) < SAMPLE_EM_TOL:
            break
    return params, lower_bound


def best_on_sample(
    sample: np.ndarray, starts: list[np.ndarray], covariance_type: str, reg_covar: float
) -> GMMParams | None:
    """The mixture of highest likelihood EM reaches on ``sample`` from ``starts``.

    Each start (centers) gives parameters from the hard assignment of the sample to its
    closest center, then `sample_em` (at most `SAMPLE_EM_MAX_ITER` iterations); the
    result of the highest lower bound is kept (the first on ties). A start whose
    covariances become ill-defined on the sample is dropped.

    Parameters
    ----------
    sample : ndarray of shape (m, D)
    starts : list of ndarray of shape (K, D)
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    reg_covar : float

    Returns
    -------
    GMMParams or None
        None when every start was dropped.
    """
    best, best_lower_bound = None, -np.inf
    for centers in starts:
        try:
            stats = init_kernels.hard_assign_chunk(sample, None, 0, 0, centers, covariance_type)
            start = m_step(stats, centers, reg_covar, covariance_type)
            params, lower_bound = sample_em(sample, start, reg_covar, SAMPLE_EM_MAX_ITER)
        except IllDefinedCovarianceError:
            continue
        if best is None or lower_bound > best_lower_bound:
            best, best_lower_bound = params, lower_bound
    return best


def init_kmeans(problem: Problem) -> Steps[GMMParams]:
    """k-means‖ seeding, k-means restarts on the candidates, EM on a uniform sample."""
    p = problem
    n_samples, n_features = p.shape
    rng = p.rng()
    centers = yield from p.rows(rng.integers(n_samples, size=1))
    for round_ in range(KMEANS_ROUNDS):
        sample = yield p.pass_of(
            init_kernels.sample_by_distance_chunk,
            centers,
            OVERSAMPLING * p.n_components,
            p.seed,
            round_,
        )
        centers = np.vstack([centers, sample.rows])
    size = min(n_samples, SAMPLE_ROWS_PER_COMPONENT * p.n_components, SAMPLE_MAX_ROWS)
    both = yield p.pass_of(
        init_kernels.joint_chunk,
        (
            (init_kernels.closest_count_chunk, (centers,)),
            (init_kernels.sample_by_distance_chunk, (p.no_centers(), size, p.seed, 98)),
        ),
    )
    counts, uniform = both.parts
    starts = kmeans_restarts(centers, counts, p.n_components, rng)
    found = best_on_sample(uniform.rows, starts, p.covariance_type, p.reg_covar)
    if found is not None:
        return found
    stats = yield p.pass_of(init_kernels.hard_assign_chunk, starts[0], p.covariance_type)
    return m_step(stats, starts[0], p.reg_covar, p.covariance_type)


def init_kmeans_plusplus(problem: Problem) -> Steps[GMMParams]:
    """k-means++ seeds (first one by sample weight, then by squared distance)."""
    p = problem
    seeds = p.no_centers()
    for k in range(p.n_components):
        sample = yield p.pass_of(init_kernels.sample_by_distance_chunk, seeds, 1, p.seed, 100 + k)
        if sample.rows.shape[0] == 0 and seeds.shape[0] == 0:
            raise _no_complete_row()
        if sample.rows.shape[0] == 0:  # every row already is a seed: repeat the last one
            seeds = np.vstack([seeds, seeds[-1:]])
        else:
            seeds = np.vstack([seeds, sample.rows])
    return p.at_points(seeds)


def init_random(problem: Problem) -> Steps[GMMParams]:
    """Uniformly random responsibilities, normalized per row (one pass)."""
    p = problem
    first = yield from p.rows(np.array([0]))
    shift = np.repeat(first, p.n_components, axis=0)
    stats = yield p.pass_of(
        init_kernels.random_resp_chunk, p.seed, p.n_components, shift, p.covariance_type
    )
    return m_step(stats, shift, p.reg_covar, p.covariance_type)


def init_random_from_data(problem: Problem) -> Steps[GMMParams]:
    """Means at ``K`` distinct random rows (no pass: only those rows are read)."""
    index = problem.rng().choice(problem.shape[0], size=problem.n_components, replace=False)
    points = yield from problem.rows(index)
    return problem.at_points(points)


INITIALIZERS: dict[str, Callable[[Problem], Steps[GMMParams]]] = {
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
    problem = Problem(shape, n_components, covariance_type, reg_covar, seed, complete_rows)
    found = yield from INITIALIZERS[init_params](problem)
    weights = found.weights if weights_init is None else weights_init
    means = found.means if means_init is None else means_init
    if precisions_init is not None:
        return GMMParams.from_precisions(weights, means, precisions_init, covariance_type)
    return GMMParams(weights, means, found.covariances, found.precisions_cholesky, covariance_type)
