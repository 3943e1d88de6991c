"""Helpers shared by the tests that compare dask-em with scikit-learn (the oracle).

- `rel_err` / `norm_rel_err`: elementwise and normwise relative errors;
- `variances`: the diagonal of covariances of any type;
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


def same_inits(X: np.ndarray, covariance_type: str, means: np.ndarray) -> dict[str, np.ndarray]:
    """``weights_init`` (uniform), ``means_init`` and ``precisions_init`` (diagonal, from
    the per-feature variances plus 1e-3, so that it exists for collapsed data too)."""
    k = means.shape[0]
    precision = 1.0 / (X.var(axis=0) + 1e-3)
    precisions = {
        "full": np.repeat(np.diag(precision)[None], k, axis=0),
        "tied": np.diag(precision),
        "diag": np.repeat(precision[None], k, axis=0),
        "spherical": np.full(k, float(precision.mean())),
    }[covariance_type]
    return {
        "weights_init": np.full(k, 1.0 / k),
        "means_init": np.asarray(means, dtype=np.float64),
        "precisions_init": precisions,
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
