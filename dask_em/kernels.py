"""Per-chunk NumPy maths: log-densities, responsibilities and partial statistics.

Every function here works on one block of rows ``X`` of shape (n, D) held in memory
and returns small values (statistics of shape (K, ...) or per-row vectors of the
chunk). Products are computed in the dtype of ``X`` (float32 input stays float32);
statistics leave the chunk as float64. The responsibilities of a chunk live only inside
these functions. Nothing here imports Dask: the graph layer (`dask_em.reduce`) maps
these functions over chunks.

Chunk functions called by the graph layer share one signature::

    fn(X, sample_weight, chunk_index, row_start, *args) -> additive value

with ``sample_weight`` of shape (n,) or None, ``chunk_index`` the block's position and
``row_start`` the global index of its first row (for deterministic random streams and
tie-breaking).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from dask_em.errors import DataError
from dask_em.params import GMMParams, log_det_cholesky
from dask_em.stats import SuffStats, second_moment_shape

_LOG_2PI = np.log(2.0 * np.pi)


def chunk_rng(seed: int, *stream: int) -> np.random.Generator:
    """Random generator for one chunk and purpose: depends only on the seed and ``stream``.

    Parameters
    ----------
    seed : int
        Non-negative seed derived from the user's ``random_state``.
    *stream : int
        Non-negative integers naming the purpose, e.g. ``(purpose, round, chunk_index)``.
    """
    return np.random.default_rng([seed, *stream])


def log_gaussian_prob(
    X: np.ndarray, means: np.ndarray, precisions_cholesky: np.ndarray, covariance_type: str
) -> np.ndarray:
    """Log-density of each row under each Gaussian component.

    ``log N(x | mu_k, S_k) = -D/2 log(2 pi) + log det U_k - 1/2 ||(x - mu_k)^T U_k||^2``.

    Parameters
    ----------
    X : ndarray of shape (n, D)
    means : ndarray of shape (K, D)
    precisions_cholesky : ndarray, shape from `dask_em.params.covariance_shape`
    covariance_type : {'full', 'tied', 'diag', 'spherical'}

    Returns
    -------
    log_prob : ndarray of shape (n, K), dtype of ``X``
    """
    n, n_features = X.shape
    n_components = means.shape[0]
    dtype = X.dtype
    means = means.astype(dtype, copy=False)
    prec = precisions_cholesky.astype(dtype, copy=False)
    maha = np.empty((n, n_components), dtype=dtype)
    for k in range(n_components):
        diff = X - means[k]
        if covariance_type == "full":
            y = diff @ prec[k]
        elif covariance_type == "tied":
            y = diff @ prec
        else:  # diag: one scale per feature; spherical: one scale
            y = diff * prec[k]
        maha[:, k] = np.einsum("ij,ij->i", y, y)
    log_det = np.asarray(log_det_cholesky(precisions_cholesky, covariance_type, n_features))
    return (-0.5 * (n_features * _LOG_2PI + maha) + log_det).astype(dtype, copy=False)


def log_prob_resp(X: np.ndarray, params: GMMParams) -> tuple[np.ndarray, np.ndarray]:
    """Per-row log-likelihood and log-responsibilities (log-sum-exp, no underflow).

    Parameters
    ----------
    X : ndarray of shape (n, D)
    params : GMMParams

    Returns
    -------
    log_prob_norm : ndarray of shape (n,)
        ``log p(x_i)``.
    log_resp : ndarray of shape (n, K)
        ``log p(k | x_i)``.
    """
    weighted = log_gaussian_prob(X, params.means, params.precisions_cholesky, params.covariance_type)
    with np.errstate(divide="ignore"):
        weighted += np.log(params.weights).astype(X.dtype)
    log_prob_norm = logsumexp(weighted, axis=1)
    with np.errstate(under="ignore", invalid="ignore"):
        log_resp = weighted - log_prob_norm[:, None]
    return log_prob_norm, log_resp


def moment_stats(
    X: np.ndarray, resp: np.ndarray, shift: np.ndarray, covariance_type: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shifted moments of a chunk: ``n``, ``s1``, ``s2`` of `dask_em.stats.SuffStats`.

    Parameters
    ----------
    X : ndarray of shape (n, D)
    resp : ndarray of shape (n, K)
        Responsibilities already multiplied by the sample weights.
    shift : ndarray of shape (K, D)
    covariance_type : {'full', 'tied', 'diag', 'spherical'}

    Returns
    -------
    n : ndarray of shape (K,), float64
    s1 : ndarray of shape (K, D), float64
    s2 : ndarray, shape from `dask_em.stats.second_moment_shape`, float64
    """
    n_features = X.shape[1]
    n_components = resp.shape[1]
    dtype = X.dtype
    shift = np.asarray(shift).astype(dtype, copy=False)
    resp = resp.astype(dtype, copy=False)
    nk = resp.sum(axis=0, dtype=np.float64)
    s1 = np.empty((n_components, n_features))
    s2 = np.zeros(second_moment_shape(covariance_type, n_components, n_features))
    for k in range(n_components):
        diff = X - shift[k]
        rk = resp[:, k]
        s1[k] = rk @ diff
        if covariance_type == "full":
            s2[k] = (diff * rk[:, None]).T @ diff
        elif covariance_type == "tied":
            s2 += (diff * rk[:, None]).T @ diff
        else:
            s2[k] = rk @ (diff * diff)
    return nk, s1, s2


def _check_finite(X: np.ndarray, values: np.ndarray, chunk_index: int) -> None:
    if np.all(np.isfinite(values)):
        return
    if not np.all(np.isfinite(X)):
        bad = int(np.count_nonzero(~np.isfinite(X).all(axis=1)))
        raise DataError(
            f"chunk {chunk_index} contains {bad} row(s) with NaN or infinite values; "
            "clean or drop those rows before fitting."
        )
    raise FloatingPointError(
        f"non-finite log-likelihood in chunk {chunk_index}: the data are too far from every "
        "component for the working precision; scale the input data or pass float64."
    )


def em_chunk(
    X: np.ndarray,
    sample_weight: np.ndarray | None,
    chunk_index: int,
    row_start: int,
    params: GMMParams,
) -> SuffStats:
    """E-step of one chunk: its statistics under ``params``, shifted by ``params.means``.

    Returns
    -------
    SuffStats
        With ``loglik = sum_i w_i log p(x_i)``.

    Raises
    ------
    DataError
        If the chunk holds NaN or infinite values (the message names the chunk).
    """
    log_prob_norm, log_resp = log_prob_resp(X, params)
    _check_finite(X, log_prob_norm, chunk_index)
    resp = np.exp(log_resp)
    if sample_weight is None:
        loglik = log_prob_norm.sum(dtype=np.float64)
        weight_sum = float(X.shape[0])
    else:
        resp *= sample_weight[:, None].astype(resp.dtype, copy=False)
        loglik = np.dot(log_prob_norm.astype(np.float64), sample_weight.astype(np.float64))
        weight_sum = sample_weight.sum(dtype=np.float64)
    nk, s1, s2 = moment_stats(X, resp, params.means, params.covariance_type)
    return SuffStats(nk, s1, s2, loglik, weight_sum, X.shape[0])


def _weighted_resp_stats(
    X: np.ndarray,
    sample_weight: np.ndarray | None,
    resp: np.ndarray,
    shift: np.ndarray,
    covariance_type: str,
) -> SuffStats:
    if sample_weight is not None:
        resp = resp * sample_weight[:, None]
        weight_sum = sample_weight.sum(dtype=np.float64)
    else:
        weight_sum = float(X.shape[0])
    nk, s1, s2 = moment_stats(X, resp, shift, covariance_type)
    return SuffStats(nk, s1, s2, 0.0, weight_sum, X.shape[0])


def random_resp_chunk(
    X: np.ndarray,
    sample_weight: np.ndarray | None,
    chunk_index: int,
    row_start: int,
    seed: int,
    n_components: int,
    shift: np.ndarray,
    covariance_type: str,
) -> SuffStats:
    """Statistics under uniformly random normalized responsibilities (``init_params='random'``).

    The random stream depends only on ``(seed, chunk_index)``.
    """
    resp = chunk_rng(seed, 1, chunk_index).uniform(size=(X.shape[0], n_components))
    resp /= resp.sum(axis=1, keepdims=True)
    _check_finite(X, X, chunk_index)
    return _weighted_resp_stats(X, sample_weight, resp, shift, covariance_type)


def min_sq_distances(X: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared Euclidean distance of each row to its closest center, and that center.

    Parameters
    ----------
    X : ndarray of shape (n, D)
    centers : ndarray of shape (m, D)

    Returns
    -------
    dist : ndarray of shape (n,), float64
    label : ndarray of shape (n,), int64
    """
    centers = centers.astype(X.dtype, copy=False)
    dist = np.full(X.shape[0], np.inf)
    label = np.zeros(X.shape[0], dtype=np.int64)
    for j, c in enumerate(centers):
        diff = X - c
        d = np.einsum("ij,ij->i", diff, diff).astype(np.float64)
        closer = d < dist
        dist[closer] = d[closer]
        label[closer] = j
    return dist, label


def hard_assign_chunk(
    X: np.ndarray,
    sample_weight: np.ndarray | None,
    chunk_index: int,
    row_start: int,
    centers: np.ndarray,
    covariance_type: str,
) -> SuffStats:
    """Statistics of the hard assignment of each row to its closest center (a Lloyd step).

    Shifted by ``centers``; ``loglik`` holds minus the weighted inertia.
    """
    _check_finite(X, X, chunk_index)
    dist, label = min_sq_distances(X, centers)
    resp = np.zeros((X.shape[0], centers.shape[0]), dtype=X.dtype)
    resp[np.arange(X.shape[0]), label] = 1.0
    stats = _weighted_resp_stats(X, sample_weight, resp, centers, covariance_type)
    w = np.ones(X.shape[0]) if sample_weight is None else sample_weight.astype(np.float64)
    return SuffStats(
        stats.n, stats.s1, stats.s2, -float(w @ dist), stats.weight_sum, stats.n_samples
    )


@dataclass(frozen=True)
class WeightedSample:
    """A weighted random sample of at most ``size`` rows without replacement, mergeable with ``+``.

    Uses Efraimidis-Spirakis keys ``log(u) / w``: keeping the ``size`` largest keys of a
    union is the same as sampling from the union, so per-chunk samples reduce exactly.
    Ties break on the global row index, so the result does not depend on chunk grouping.

    Attributes
    ----------
    keys : ndarray of shape (m,)
    rows : ndarray of shape (m, D)
    index : ndarray of shape (m,)
        Global row indices.
    size : int
    cost : float
        Sum of the sampling weights seen (the k-means cost of the current centers).
    """

    keys: np.ndarray
    rows: np.ndarray
    index: np.ndarray
    size: int
    cost: float

    def __add__(self, other: WeightedSample) -> WeightedSample:
        keys = np.concatenate([self.keys, other.keys])
        index = np.concatenate([self.index, other.index])
        order = np.lexsort((index, -keys))[: self.size]
        return WeightedSample(
            keys[order],
            np.concatenate([self.rows, other.rows])[order],
            index[order],
            self.size,
            self.cost + other.cost,
        )


def sample_by_distance_chunk(
    X: np.ndarray,
    sample_weight: np.ndarray | None,
    chunk_index: int,
    row_start: int,
    centers: np.ndarray,
    size: int,
    seed: int,
    stream: int,
) -> WeightedSample:
    """Sample rows with probability proportional to ``w_i * d(x_i, centers)^2`` (k-means‖ / ++).

    With no centers (shape (0, D)) the weights are the sample weights alone (uniform when None).
    The random stream depends only on ``(seed, stream, chunk_index)``.
    """
    _check_finite(X, X, chunk_index)
    if centers.shape[0]:
        weight, _ = min_sq_distances(X, centers)
    else:
        weight = np.ones(X.shape[0])
    if sample_weight is not None:
        weight = weight * sample_weight
    u = chunk_rng(seed, 2, stream, chunk_index).uniform(size=X.shape[0])
    with np.errstate(divide="ignore"):
        keys = np.where(weight > 0, np.log(u) / np.where(weight > 0, weight, 1.0), -np.inf)
    top = np.argsort(-keys, kind="stable")[:size]
    top = top[np.isfinite(keys[top])]
    return WeightedSample(
        keys[top],
        X[top].astype(np.float64),
        row_start + top.astype(np.int64),
        size,
        float(weight.sum()),
    )


def closest_count_chunk(
    X: np.ndarray,
    sample_weight: np.ndarray | None,
    chunk_index: int,
    row_start: int,
    centers: np.ndarray,
) -> np.ndarray:
    """Weighted number of rows whose closest center is each of ``centers``.

    Returns
    -------
    counts : ndarray of shape (m,), float64
    """
    _, label = min_sq_distances(X, centers)
    w = None if sample_weight is None else sample_weight.astype(np.float64)
    return np.bincount(label, weights=w, minlength=centers.shape[0]).astype(np.float64)


def score_samples_block(X: np.ndarray, params: GMMParams) -> np.ndarray:
    """``log p(x_i)`` for each row: shape (n,)."""
    return log_prob_resp(X, params)[0]


def predict_proba_block(X: np.ndarray, params: GMMParams) -> np.ndarray:
    """Responsibilities ``p(k | x_i)``: shape (n, K)."""
    return np.exp(log_prob_resp(X, params)[1])


def predict_block(X: np.ndarray, params: GMMParams) -> np.ndarray:
    """Most probable component of each row: shape (n,), int64."""
    return np.argmax(log_prob_resp(X, params)[1], axis=1).astype(np.int64)
