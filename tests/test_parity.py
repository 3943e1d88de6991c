"""Parity with scikit-learn's ``GaussianMixture`` given the same initial parameters.

dask-em runs on a Zarr-backed Dask array (16 row chunks, uneven last chunk);
scikit-learn on the same rows in memory. Both start from the same ``weights_init``,
``means_init`` and ``precisions_init`` with the same ``tol`` and ``max_iter``, so EM must
follow the same trajectory: ``weights_``, ``means_``, ``covariances_``, ``lower_bound_``
and ``n_iter_`` agree to a relative 1e-7 in float64. The measured errors are recorded
with `parity_log` and printed in the terminal summary.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from oracle import norm_rel_err, rel_err
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import dask_em
from dask_em.params import COVARIANCE_TYPES

RTOL = 1e-7
OFFSET = 1e6
TOL = 1e-6  # small enough for dozens of EM iterations on the overlapping test mixture
MAX_ITER = 300


def errors(dm: dask_em.GaussianMixture, sk: SkGaussianMixture, mean_shift: float = 0.0) -> dict:
    """Relative errors of dask-em's fitted attributes against scikit-learn's."""
    return {
        "weights": rel_err(dm.weights_, sk.weights_),
        "means": rel_err(dm.means_, sk.means_ + mean_shift),
        "covariances": rel_err(dm.covariances_, sk.covariances_),
        "lower_bound": rel_err(dm.lower_bound_, sk.lower_bound_),
    }


def fit_both(data, inits: dict, covariance_type: str, **kw):
    """Fit scikit-learn on ``data.X`` and dask-em on the Zarr store of ``data``."""
    params = dict(n_components=4, covariance_type=covariance_type, **inits, **kw)
    sk = SkGaussianMixture(**params).fit(data.X.astype(np.float64))
    dm = dask_em.GaussianMixture(**params).fit(data.dask())
    return dm, sk


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_fit_matches_sklearn_to_1e7_relative(
    covariance_type, mixture_zarr, given_inits, parity_log
):
    inits = given_inits(mixture_zarr.X, 4, covariance_type)
    dm, sk = fit_both(mixture_zarr, inits, covariance_type, tol=TOL, max_iter=MAX_ITER)

    err = errors(dm, sk)
    parity_log.record("float64", covariance_type, n_iter=dm.n_iter_, **err)
    assert sk.converged_ and sk.n_iter_ >= 10, "the case must take many EM iterations"
    assert dm.converged_
    assert dm.n_iter_ == sk.n_iter_
    assert max(err.values()) <= RTOL, err
    assert rel_err(dm.precisions_cholesky_, sk.precisions_cholesky_) <= RTOL
    assert rel_err(dm.precisions_, sk.precisions_) <= RTOL
    np.testing.assert_allclose(dm.lower_bounds_, sk.lower_bounds_, rtol=RTOL)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_stopping_at_max_iter_matches_sklearn_and_warns(
    covariance_type, mixture_zarr, given_inits, parity_log
):
    inits = given_inits(mixture_zarr.X, 4, covariance_type)
    params = dict(n_components=4, covariance_type=covariance_type, tol=TOL, max_iter=6, **inits)
    with pytest.warns(ConvergenceWarning):
        sk = SkGaussianMixture(**params).fit(mixture_zarr.X)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        dm = dask_em.GaussianMixture(**params).fit(mixture_zarr.dask())

    err = errors(dm, sk)
    parity_log.record("float64 max_iter=6", covariance_type, **err)
    assert not sk.converged_
    assert dm.converged_ is False
    assert dm.n_iter_ == sk.n_iter_ == 6
    assert len(dm.lower_bounds_) == 6
    assert max(err.values()) <= RTOL, err


def test_full_on_offset_data_matches_sklearn_fitted_on_the_same_data(
    make_mixture, write_zarr, given_inits, parity_log
):
    # scikit-learn's 'full' path works on differences x - mu (its M-step forms
    # diff.T @ diff and its E-step (x - mu) @ U), so it stays accurate on data far from
    # the origin and is a direct oracle there.
    data = write_zarr(make_mixture(2000, 3, 4, seed=0) + OFFSET, 130)
    inits = given_inits(data.X, 4, "full")
    dm, sk = fit_both(data, inits, "full", tol=TOL, max_iter=MAX_ITER)

    err = errors(dm, sk)
    parity_log.record("offset 1e6 vs sklearn(X+1e6)", "full", **err)
    assert sk.n_iter_ >= 10
    assert dm.n_iter_ == sk.n_iter_
    assert max(err.values()) <= RTOL, err


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_offset_data_gives_translated_sklearn_solution(
    covariance_type, make_mixture, write_zarr, given_inits, parity_log
):
    """dask-em on X + 1e6 against scikit-learn on X: EM is translation equivariant.

    scikit-learn's tied/diag/spherical paths lose digits on offset data (its M-step forms
    X^T X - sum n mu mu^T and its diag/spherical E-step expands |x - mu|^2), so the exact
    oracle is scikit-learn on the untranslated rows with the translated means removed:
    starting from means_init + 1e6, EM on X + 1e6 has weights, covariances and lower
    bounds equal to those of EM on X, and means shifted by exactly 1e6.
    """
    X = make_mixture(2000, 3, 4, seed=0)
    data = write_zarr(X + OFFSET, 130)
    inits = given_inits(X, 4, covariance_type)
    params = dict(n_components=4, covariance_type=covariance_type, tol=TOL, max_iter=MAX_ITER)
    sk = SkGaussianMixture(**params, **inits).fit(X)
    shifted = {**inits, "means_init": inits["means_init"] + OFFSET}
    dm = dask_em.GaussianMixture(**params, **shifted).fit(data.dask())

    err = errors(dm, sk, mean_shift=OFFSET)
    # Means: the literal criterion above (relative to |means_| ~ 1e6, i.e. an absolute
    # 0.1) says little, so also hold the means to 1e-7 relative to the scale of the data,
    # the scale on which a location parameter is judged and that translation leaves
    # unchanged. Rounding X + 1e6 to float64 already moves every datum by up to
    # ulp(1e6)/2 = 2**-34 ~ 5.8e-11, so no algorithm can recover the means of X to better
    # than about 1e-10 absolute from the stored rows; 1e-7 * std(X) (~1e-7) leaves room
    # for that input rounding, amplified by the EM iterations, and nothing more.
    scale = float(np.max(np.std(X, axis=0)))
    mean_abs = float(np.max(np.abs((dm.means_ - OFFSET) - sk.means_)))
    parity_log.record(
        "offset 1e6 vs sklearn(X)", covariance_type, mean_abs_over_std=mean_abs / scale, **err
    )
    assert sk.n_iter_ >= 10
    assert dm.n_iter_ == sk.n_iter_
    assert max(err.values()) <= RTOL, err  # weights, covariances, lower bound: never loosened
    assert mean_abs <= RTOL * scale, mean_abs


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float32_input_matches_sklearn_on_the_same_values(
    covariance_type, make_mixture, write_zarr, given_inits, parity_log
):
    """Float32 data: statistics in float64, parity at a float32-appropriate tolerance.

    The oracle is scikit-learn in float64 on the very same float32 values (scikit-learn
    on float32 input computes in float32 and is itself off by up to ~1e-2 here). dask-em
    computes per-chunk products in float32 (unit roundoff u = 6e-8): each log-density and
    moment carries a relative error of a few u, and EM propagates it through the
    iterations, amplified by about 1 / (1 - its rate of convergence). Measured errors
    are up to ~6e-7 normwise (``max|error| / max|value|`` of each array) and ~7e-6
    elementwise (on a small off-diagonal covariance of 0.07, whose absolute error is that
    of its neighbours). We require 1e-5 normwise (~170 u) and 1e-4 elementwise: about
    10x the measured errors, which move by a factor 2-3 with the chunking, while float32
    accumulation of the statistics would miss them by orders of magnitude (scikit-learn's
    float32 path is off by up to 1e-2 here).

    ``tol`` is scikit-learn's default 1e-3 here, not the 1e-6 of the float64 tests: the
    float32 lower bound (about -5) is itself only accurate to ~1e-7 relative, so with a
    ``tol`` near 1e-6 the iteration at which |change| < tol becomes a matter of float32
    rounding and the two runs legitimately stop at different iterations.
    """
    data = write_zarr(make_mixture(2000, 3, 4, seed=0), 130, dtype=np.float32)
    assert data.open().dtype == np.float32
    inits = given_inits(data.X, 4, covariance_type)
    dm, sk = fit_both(data, inits, covariance_type, tol=1e-3, max_iter=MAX_ITER)

    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        assert getattr(dm, name).dtype == np.float64, name
    err = errors(dm, sk)
    norm_err = {
        "weights": norm_rel_err(dm.weights_, sk.weights_),
        "means": norm_rel_err(dm.means_, sk.means_),
        "covariances": norm_rel_err(dm.covariances_, sk.covariances_),
        "lower_bound": norm_rel_err(dm.lower_bound_, sk.lower_bound_),
    }
    parity_log.record("float32 normwise", covariance_type, **norm_err)
    parity_log.record("float32 elementwise", covariance_type, **err)
    assert sk.n_iter_ >= 10
    assert dm.n_iter_ == sk.n_iter_
    assert max(norm_err.values()) <= 1e-5, norm_err
    assert max(err.values()) <= 1e-4, err


def test_parity_holds_with_sample_weights_given_as_row_repetitions(
    mixture_zarr, given_inits, parity_log
):
    # scikit-learn has no sample_weight; integer weights are the same as repeated rows.
    rng = np.random.default_rng(3)
    w = rng.integers(0, 4, size=mixture_zarr.X.shape[0])
    inits = given_inits(mixture_zarr.X, 4, "full")
    params = dict(n_components=4, covariance_type="full", tol=TOL, max_iter=MAX_ITER, **inits)
    sk = SkGaussianMixture(**params).fit(np.repeat(mixture_zarr.X, w, axis=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        dm = dask_em.GaussianMixture(**params).fit(mixture_zarr.dask(), sample_weight=w)

    err = errors(dm, sk)
    parity_log.record("integer sample_weight", "full", **err)
    assert dm.n_iter_ == sk.n_iter_ >= 10
    assert max(err.values()) <= RTOL, err
