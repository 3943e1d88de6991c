"""Synthetic Gaussian-mixture data, generated chunk by chunk (``dask-em generate``, the demo).

A dataset is defined by ``(n_components, n_features, seed)`` for its true parameters and
by ``(seed, chunk index)`` for the rows of each chunk, so any chunk can be regenerated
alone and the data never needs to fit in memory. The chunk functions are NumPy only;
`generate` and `true_labels` turn them into lazy Dask arrays with
`dask_em.reduce.from_blocks`, one chunk per chunk of the written store
(``store_chunk_rows`` rows each).
"""

from __future__ import annotations

import os
from typing import Any

import dask.array as da
import numpy as np

from dask_em.choices import STORE_CHUNK_ROWS
from dask_em.io import store_array
from dask_em.kernels import chunk_rng
from dask_em.params import GMMParams
from dask_em.reduce import from_blocks, row_chunks


def generate(
    path: str | os.PathLike[str],
    n_samples: int,
    n_features: int,
    n_components: int,
    seed: int = 0,
    store_chunk_rows: int = STORE_CHUNK_ROWS,
    storage_options: dict[str, Any] | None = None,
) -> GMMParams:
    """Write a synthetic mixture dataset to a Zarr array; return its true parameters.

    Parameters
    ----------
    path : str or path
        Destination of the (n_samples, n_features) float64 array; its attributes hold
        the seed and the true parameters.
    n_samples, n_features, n_components : int
    seed : int, default 0
        Seeds the true parameters and the rows (per chunk).
    store_chunk_rows : int, default `STORE_CHUNK_ROWS`
        Rows per chunk of the written store (the rows are drawn per chunk, so they
        depend on it; rows per task when fitting are chosen separately, ``chunk_rows``).
    storage_options : dict, optional
        fsspec options of a URL ``path`` (credentials, ``endpoint_url``).

    Returns
    -------
    GMMParams
        The true parameters (full covariances).
    """
    params = true_params(n_components, n_features, seed)
    chunks = row_chunks(n_samples, store_chunk_rows)
    X = from_blocks(mixture_rows, chunks, n_features, np.float64, params, seed)
    store_array(
        X,
        path,
        kind="data",
        attrs={
            "generator": "dask-em generate",
            "seed": seed,
            "true_weights": params.weights.tolist(),
            "true_means": params.means.tolist(),
            "true_covariances": params.covariances.tolist(),
        },
        storage_options=storage_options,
    )
    return params


def true_labels(
    params: GMMParams, n_samples: int, seed: int, store_chunk_rows: int = STORE_CHUNK_ROWS
) -> da.Array:
    """The component each row of a dataset written by `generate` was drawn from: lazy, shape (n_samples,)."""
    chunks = row_chunks(n_samples, store_chunk_rows)
    return from_blocks(mixture_labels, chunks, None, np.int64, params, seed)


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
