"""Per-chunk NumPy maths of the initializers (`dask_em.init`).

Chunk functions with the signature of `dask_em.kernels` (``fn(X, sample_weight,
chunk_index, row_start, *args) -> additive value``) for the passes that make a start:
random responsibilities, hard assignment to centers (a Lloyd step), sampling rows by
squared distance (k-means‖ / k-means++) and counting the rows closest to each
candidate; plus `min_sq_distances`, which the in-memory steps of `dask_em.init` reuse,
and `on_complete_rows`, which runs any of them on the rows without NaN only.
Every random draw comes from `dask_em.kernels.chunk_rng` seeded by the seed, the
purpose and the chunk index, never by worker or time. Nothing here imports Dask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dask_em.kernels import (
    _blocks,
    _centered,
    _check_finite,
    _check_weights,
    _moment_workspace,
    chunk_rng,
    moment_stats,
)
from dask_em.stats import SuffStats


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
    _check_finite(X, X, chunk_index, row_start)
    _check_weights(sample_weight, chunk_index)
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
    centers = np.asarray(centers, dtype=np.float64)
    center = centers.mean(axis=0)
    offsets = (centers - center).astype(X.dtype)  # (m, D)
    offset_sq = np.einsum("ij,ij->i", offsets, offsets)[:, None]
    center_x = center.astype(X.dtype)
    dist = np.empty(X.shape[0])
    label = np.empty(X.shape[0], dtype=np.int64)
    for start, ws in _blocks(X.shape[0], _moment_workspace(X.shape[1], X.dtype)):
        xt = _centered(X, start, center_x, ws)
        # |x - c|^2 = |x'|^2 - 2 c'.x' + |c'|^2 about the centers' mean: one product per block
        d2 = offsets @ xt
        d2 *= -2.0
        d2 += offset_sq
        d2 += np.einsum("ij,ij->j", xt, xt)
        np.maximum(d2, 0.0, out=d2)
        block_label = np.argmin(d2, axis=0)
        label[start : start + ws.rows] = block_label
        dist[start : start + ws.rows] = d2[block_label, np.arange(ws.rows)]
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
    _check_finite(X, X, chunk_index, row_start)
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
    _check_finite(X, X, chunk_index, row_start)
    _check_weights(sample_weight, chunk_index)
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


def on_complete_rows(
    X: np.ndarray,
    sample_weight: np.ndarray | None,
    chunk_index: int,
    row_start: int,
    chunk_fn: Callable[..., Any],
    *args: Any,
) -> Any:
    """``chunk_fn`` on the rows without NaN: the others get sample weight 0.

    Rows keep their places (NaN read as 0, weight 0), so row indices and every random
    draw seeded by ``(seed, chunk index)`` are those of ``chunk_fn`` on the whole chunk;
    a chunk without NaN gives exactly ``chunk_fn``'s result. Infinite values are still
    refused by ``chunk_fn``.
    """
    has_nan = np.isnan(X).any(axis=1)
    if not has_nan.any():
        return chunk_fn(X, sample_weight, chunk_index, row_start, *args)
    weight = np.ones(X.shape[0]) if sample_weight is None else sample_weight.astype(np.float64)
    weight[has_nan] = 0.0
    return chunk_fn(np.where(np.isnan(X), 0, X), weight, chunk_index, row_start, *args)


@dataclass(frozen=True)
class Joint:
    """The answers of several chunk functions over the same rows, added part by part."""

    parts: tuple[Any, ...]

    def __add__(self, other: Joint) -> Joint:
        return Joint(tuple(a + b for a, b in zip(self.parts, other.parts, strict=True)))


def joint_chunk(
    X: np.ndarray,
    sample_weight: np.ndarray | None,
    chunk_index: int,
    row_start: int,
    calls: tuple[tuple[Callable[..., Any], tuple[Any, ...]], ...],
) -> Joint:
    """Every ``(chunk_fn, args)`` of ``calls`` on the chunk, so one pass serves them all."""
    return Joint(tuple(fn(X, sample_weight, chunk_index, row_start, *args) for fn, args in calls))
