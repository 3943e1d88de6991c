"""Synthetic Gaussian-mixture data, generated chunk by chunk (for ``dask-em generate`` and the demo).

A dataset is defined by ``(n_components, n_features, seed)`` for its true parameters and
by ``(seed, chunk index)`` for the rows of each chunk, so any chunk can be regenerated
alone and the data never needs to fit in memory. NumPy only; `dask_em.reduce.from_blocks`
turns `mixture_rows` and `mixture_labels` into lazy Dask arrays.
"""

from __future__ import annotations

import numpy as np

from dask_em.kernels import chunk_rng
from dask_em.params import GMMParams


def true_params(n_components: int, n_features: int, seed: int) -> GMMParams:
    """Overlapping but identifiable true parameters with full covariances of varied shape.

    Returns
    -------
    GMMParams
        ``weights`` from a Dirichlet(5), means uniform in [-3, 3]^D, covariances
        ``A A^T / D + 0.3 I`` with ``A`` standard normal (scale about 1).
    """
    rng = chunk_rng(seed, 7)
    weights = rng.dirichlet(np.full(n_components, 5.0))
    means = rng.uniform(-3.0, 3.0, size=(n_components, n_features))
    a = rng.standard_normal((n_components, n_features, n_features))
    covariances = a @ np.swapaxes(a, 1, 2) / n_features + 0.3 * np.eye(n_features)
    return GMMParams.from_covariances(weights, means, covariances, "full")


def mixture_block(
    chunk_index: int, n_rows: int, params: GMMParams, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of one chunk drawn from the mixture ``params``.

    Parameters
    ----------
    chunk_index : int
    n_rows : int
    params : GMMParams
        Full covariances.
    seed : int

    Returns
    -------
    X : ndarray of shape (n_rows, D), float64
    labels : ndarray of shape (n_rows,), int64
        The component each row was drawn from.
    """
    rng = chunk_rng(seed, 9, chunk_index)
    labels = rng.choice(params.n_components, size=n_rows, p=params.weights)
    z = rng.standard_normal((n_rows, params.n_features))
    chol = np.linalg.cholesky(params.covariances)
    X = np.empty_like(z)
    for k in range(params.n_components):
        rows = labels == k
        X[rows] = params.means[k] + z[rows] @ chol[k].T
    return X, labels.astype(np.int64)


def mixture_rows(chunk_index: int, n_rows: int, params: GMMParams, seed: int) -> np.ndarray:
    """The rows ``X`` of `mixture_block`: shape (n_rows, D)."""
    return mixture_block(chunk_index, n_rows, params, seed)[0]


def mixture_labels(chunk_index: int, n_rows: int, params: GMMParams, seed: int) -> np.ndarray:
    """The true components of `mixture_block`: shape (n_rows,)."""
    return mixture_block(chunk_index, n_rows, params, seed)[1]
