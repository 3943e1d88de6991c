"""Helpers shared by the tests that compare dask-em with scikit-learn (the oracle).

- `rel_err` / `norm_rel_err`: elementwise and normwise relative errors;
- `variances`: the diagonal of covariances of any type;
- `dense_covariances`: covariances (or precisions) of any type as (K, D, D) matrices;
- `diagonal_covariances`: per-type diagonal parameters from one value per feature;
- `random_covariances`: random, correlated covariances of a type from a generator;
- `second_moments`: per-component (K, D, D) moments in the layout of ``SuffStats.s2``;
- `same_inits`: ``weights_init`` / ``means_init`` / ``precisions_init`` that both libraries
  accept, also for collapsed data;
- `zarr_dask`: rows written to a real Zarr store on disk, opened as a Dask array;
- `fit_sklearn` / `fit_dask_em`: fits with ``ConvergenceWarning`` silenced;
- `assert_no_nan`: a fitted model is a valid, finite mixture.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import zarr
from cli_helpers import write_array
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import dask_em


def rel_err(actual: np.ndarray | float, expected: np.ndarray | float) -> float:
    """Largest elementwise relative error ``|actual - expected| / |expected|``.

    Entries where ``expected`` is exactly zero (the structural zeros of triangular
    factors) are measured relative to the largest ``|expected|`` instead.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    scale = np.where(expected != 0.0, np.abs(expected), np.max(np.abs(expected)))
    return float(np.max(np.abs(actual - expected) / scale))


def norm_rel_err(actual: np.ndarray | float, expected: np.ndarray | float) -> float:
    """Normwise relative error ``max |actual - expected| / max |expected|``."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def variances(covariances: np.ndarray, covariance_type: str) -> np.ndarray:
    """The diagonal entries (variances) of covariances of any type."""
    if covariance_type == "full":
        return np.diagonal(covariances, axis1=1, axis2=2)
    if covariance_type == "tied":
        return np.diag(covariances)
    return covariances


def dense_covariances(
    covariances: np.ndarray, covariance_type: str, n_components: int, n_features: int
) -> np.ndarray:
    """Covariances (or precisions) of any type as matrices.

    Parameters
    ----------
    covariances : ndarray, shape from `dask_em.params.covariance_shape`
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    n_components, n_features : int
        ``K`` and ``D``.

    Returns
    -------
    ndarray of shape (K, D, D)
    """
    if covariance_type == "full":
        return covariances
    if covariance_type == "tied":
        return np.repeat(covariances[None], n_components, axis=0)
    if covariance_type == "diag":
        return np.stack([np.diag(c) for c in covariances])
    return np.stack([c * np.eye(n_features) for c in covariances])


def diagonal_covariances(values: np.ndarray, covariance_type: str, n_components: int) -> np.ndarray:
    """Diagonal covariances (or precisions) of a type, the same for every component.

    Parameters
    ----------
    values : ndarray of shape (D,)
        The diagonal; ``spherical`` takes its mean.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    n_components : int

    Returns
    -------
    ndarray, shape from `dask_em.params.covariance_shape`
    """
    return {
        "full": np.repeat(np.diag(values)[None], n_components, axis=0),
        "tied": np.diag(values),
        "diag": np.repeat(values[None], n_components, axis=0),
        "spherical": np.full(n_components, float(values.mean())),
    }[covariance_type]


def random_covariances(
    rng: np.random.Generator,
    covariance_type: str,
    n_components: int,
    n_features: int,
    ridge: float = 0.5,
) -> np.ndarray:
    """Random covariances of a type: correlated ``A A^T / D + ridge I`` (``tied``: the
    first component's), variances uniform in [0.5, 2) for ``diag``/``spherical``.

    Draws the same numbers from ``rng`` whatever the type (so that what a caller draws
    next does not depend on it).

    Returns
    -------
    ndarray, shape from `dask_em.params.covariance_shape`
    """
    k, d = n_components, n_features
    a = rng.normal(size=(k, d, d))
    full = a @ np.swapaxes(a, 1, 2) / d + ridge * np.eye(d)
    return {
        "full": full,
        "tied": full[0],
        "diag": rng.uniform(0.5, 2.0, size=(k, d)),
        "spherical": rng.uniform(0.5, 2.0, size=k),
    }[covariance_type]


def second_moments(full: np.ndarray, covariance_type: str) -> np.ndarray:
    """Per-component second moments in the layout of ``SuffStats.s2``.

    Parameters
    ----------
    full : ndarray of shape (K, D, D)
    covariance_type : {'full', 'tied', 'diag', 'spherical'}

    Returns
    -------
    ndarray, shape from `dask_em.params.second_moment_shape`
        ``full`` itself, its sum over components (``tied``) or the diagonals (K, D).
    """
    return {
        "full": full,
        "tied": full.sum(axis=0),
        "diag": np.einsum("kii->ki", full),
        "spherical": np.einsum("kii->ki", full),
    }[covariance_type]


def same_inits(X: np.ndarray, covariance_type: str, means: np.ndarray) -> dict[str, np.ndarray]:
    """``weights_init`` (uniform), ``means_init`` and ``precisions_init`` (diagonal, from
    the per-feature variances plus 1e-3, so that it exists for collapsed data too)."""
    k = means.shape[0]
    precision = 1.0 / (X.var(axis=0) + 1e-3)
    return {
        "weights_init": np.full(k, 1.0 / k),
        "means_init": np.asarray(means, dtype=np.float64),
        "precisions_init": diagonal_covariances(precision, covariance_type, k),
    }


def zarr_dask(tmp_path: Path, X: np.ndarray) -> da.Array:
    """``X`` written to a real Zarr store (row chunks of 100), opened as a Dask array."""
    return da.from_zarr(zarr.open_array(write_array(tmp_path / "data.zarr", X), mode="r"))


def fit_sklearn(X: np.ndarray, **params: object) -> SkGaussianMixture:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return SkGaussianMixture(**params).fit(X)


def fit_dask_em(X: da.Array, **params: object) -> dask_em.GaussianMixture:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return dask_em.GaussianMixture(**params).fit(X)


def assert_no_nan(gm: dask_em.GaussianMixture, X: np.ndarray) -> None:
    """Finite parameters, lower bounds, responsibilities (rows summing to 1) and scores."""
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        assert np.all(np.isfinite(getattr(gm, name))), name
    assert np.all(np.isfinite(gm.lower_bounds_))
    assert abs(gm.weights_.sum() - 1.0) <= 1e-12
    proba = np.asarray(gm.predict_proba(X))
    assert np.all(np.isfinite(proba))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    assert np.all(np.isfinite(np.asarray(gm.score_samples(X))))
