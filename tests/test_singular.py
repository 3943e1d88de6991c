"""Singular and near-singular covariances: scikit-learn's actionable error or a
documented recovery, never NaN.

dask-em fits a real Zarr store (row chunks of 100) and scikit-learn the same rows in
memory, both from the same ``weights_init``, ``means_init`` and ``precisions_init``:

- a constant feature with the default ``reg_covar`` (1e-6): both succeed and agree to a
  relative 1e-7, with no NaN in any parameter, lower bound, responsibility or score;
- ``reg_covar=0`` on collapsed data (a constant feature, points on a line, duplicated
  points): where scikit-learn raises its ``ValueError`` ("ill-defined empirical
  covariance ... increase reg_covar"), dask-em raises the same one; where scikit-learn
  succeeds, dask-em does too with finite parameters, or raises that error when
  scikit-learn's success is roundoff (variances ~1e-15 on exactly duplicated points,
  where dask-em's shifted statistics give the exact 0). The ``dask-em fit`` command
  fails in one line (exit 2, naming ``--reg-covar``) and writes no model;
- points on a line plus 1e-9 noise with ``reg_covar=1e-6``: parity to 1e-7 for the four
  covariance types.

A component that loses all its mass is re-seeded; `test_empty_components` covers it.

Off-diagonal covariance entries that are exactly zero in theory (the constant feature's
covariances with the others) are roundoff in both libraries (scikit-learn: 1e-30 to
1e-14, dask-em: 0); matrices are therefore compared normwise (``max |a - b| / max |b|``)
and their diagonals, weights and means elementwise.
"""

from __future__ import annotations

import numpy as np
import pytest
from cli_helpers import LOCAL, assert_usage_error, run_cli, write_array
from oracle import (
    assert_no_nan,
    fit_dask_em,
    fit_sklearn,
    norm_rel_err,
    rel_err,
    same_inits,
    variances,
    zarr_dask,
)
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import dask_em
from dask_em.params import COVARIANCE_TYPES

RTOL = 1e-7
TOL = 1e-8
MAX_ITER = 300
N = 400
SKLEARN_MESSAGE = "ill-defined empirical covariance"


# ----------------------------------------------------------------------------- helpers
def assert_parity(
    dm: dask_em.GaussianMixture, sk: SkGaussianMixture, X: np.ndarray, covariance_type: str
) -> None:
    """dask-em's fit equals scikit-learn's to ``RTOL`` (see the module docstring)."""
    err = {
        "weights": rel_err(dm.weights_, sk.weights_),
        "means": rel_err(dm.means_, sk.means_),
        "variances": rel_err(
            variances(dm.covariances_, covariance_type), variances(sk.covariances_, covariance_type)
        ),
        "covariances": norm_rel_err(dm.covariances_, sk.covariances_),
        "precisions_cholesky": norm_rel_err(dm.precisions_cholesky_, sk.precisions_cholesky_),
        "lower_bound": rel_err(dm.lower_bound_, sk.lower_bound_),
        "score_samples": rel_err(np.asarray(dm.score_samples(X)), sk.score_samples(X)),
    }
    assert max(err.values()) <= RTOL, err
    assert dm.n_iter_ == sk.n_iter_
    assert dm.converged_ == sk.converged_


def two_clusters(seed: int, d: int = 3) -> np.ndarray:
    """``N`` rows of two unit Gaussians 4 apart in every feature."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, d))
    X[: N // 2] += 4.0
    return X


def on_a_line(seed: int, noise: float = 0.0) -> np.ndarray:
    """``N`` 2-D points of two clusters on the line ``y = 0.3 x + 0.1`` (plus noise)."""
    rng = np.random.default_rng(seed)
    t = rng.normal(size=N)
    t[: N // 2] += 5.0
    return np.c_[t, 0.3 * t + 0.1] + noise * rng.normal(size=(N, 2))


def constant_feature(seed: int) -> np.ndarray:
    """`two_clusters` with feature 1 constant (0.1, not exactly representable)."""
    X = two_clusters(seed)
    X[:, 1] = 0.1
    return X


def duplicated_points(seed: int) -> np.ndarray:
    """``N`` rows that are copies of two distinct 2-D points."""
    points = np.random.default_rng(seed).normal(size=(2, 2))
    return np.repeat(points, N // 2, axis=0)


def first_rows_of_each_half(X: np.ndarray) -> np.ndarray:
    """Initial means: one row of each cluster (rows 0 and N - 1)."""
    return X[[0, N - 1]].copy()


# --------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_constant_feature_with_default_reg_covar_matches_sklearn(covariance_type, tmp_path):
    X = constant_feature(seed=0)
    X[:, 1] = 2.5
    params = dict(
        n_components=2,
        covariance_type=covariance_type,
        tol=TOL,
        max_iter=MAX_ITER,
        **same_inits(X, covariance_type, first_rows_of_each_half(X)),
    )
    sk = fit_sklearn(X, **params)
    dm = fit_dask_em(zarr_dask(tmp_path, X), **params)

    assert_no_nan(dm, X)
    assert_parity(dm, sk, X, covariance_type)
    if covariance_type != "spherical":  # the constant feature's variance is reg_covar
        np.testing.assert_allclose(variances(dm.covariances_, covariance_type)[..., 1], 1e-6)


COLLAPSED = {
    "constant-feature": constant_feature,
    "on-a-line": on_a_line,
    "duplicated-points": duplicated_points,
}


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("data", list(COLLAPSED))
def test_reg_covar_zero_fails_as_sklearn_does_and_never_gives_nan(data, covariance_type, tmp_path):
    X = COLLAPSED[data](seed=1)
    params = dict(
        n_components=2,
        covariance_type=covariance_type,
        reg_covar=0.0,
        tol=TOL,
        max_iter=MAX_ITER,
        **same_inits(X, covariance_type, first_rows_of_each_half(X)),
    )
    try:
        sk = fit_sklearn(X, **params)
    except ValueError as err:
        assert SKLEARN_MESSAGE in str(err)
        with pytest.raises(ValueError, match="increase reg_covar") as raised:
            fit_dask_em(zarr_dask(tmp_path, X), **params)
        assert SKLEARN_MESSAGE in str(raised.value)
        return
    try:
        dm = fit_dask_em(zarr_dask(tmp_path, X), **params)
    except ValueError as err:
        # scikit-learn "succeeded" only thanks to roundoff: on exactly collapsed points
        # its variances are ~1e-15 instead of 0 (E[x^2] - 2 E[x] mu + mu^2 cancels
        # inexactly); dask-em's shifted statistics give the exact 0 and the error
        assert "increase reg_covar" in str(err) and SKLEARN_MESSAGE in str(err)
        assert np.min(variances(sk.covariances_, covariance_type)) <= 1e-12 * X.var()
        return
    # both recover (a spherical or diagonal covariance that stays positive)
    assert_no_nan(dm, X)
    assert rel_err(dm.weights_, sk.weights_) <= RTOL
    assert rel_err(dm.lower_bound_, sk.lower_bound_) <= RTOL


def test_reg_covar_zero_is_refused_for_every_collapsed_case_sklearn_refuses():
    """The parametrized test above must not pass vacuously: scikit-learn refuses most."""
    refused = 0
    for make in COLLAPSED.values():
        X = make(seed=1)
        for covariance_type in COVARIANCE_TYPES:
            params = same_inits(X, covariance_type, first_rows_of_each_half(X))
            try:
                fit_sklearn(
                    X, n_components=2, covariance_type=covariance_type, reg_covar=0.0, **params
                )
            except ValueError:
                refused += 1
    assert refused >= 8


def test_cli_fit_with_reg_covar_zero_fails_in_one_line_without_a_model(tmp_path):
    data = write_array(tmp_path / "data.zarr", constant_feature(seed=2))
    model = tmp_path / "model.zarr"
    result = run_cli(
        "fit", data, "--n-components", "2", "--output", model, "--reg-covar", "0", "--quiet", *LOCAL
    )
    assert_usage_error(result, SKLEARN_MESSAGE, "--reg-covar")
    assert not model.exists()


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_near_singular_line_with_tiny_noise_matches_sklearn(covariance_type, tmp_path):
    X = on_a_line(seed=2, noise=1e-9)
    params = dict(
        n_components=2,
        covariance_type=covariance_type,
        reg_covar=1e-6,
        tol=TOL,
        max_iter=MAX_ITER,
        **same_inits(X, covariance_type, first_rows_of_each_half(X)),
    )
    sk = fit_sklearn(X, **params)
    dm = fit_dask_em(zarr_dask(tmp_path, X), **params)

    assert sk.converged_
    assert_no_nan(dm, X)
    assert_parity(dm, sk, X, covariance_type)
