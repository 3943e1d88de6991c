"""`GaussianMixture(missing='em')` and ``dask-em fit --missing em`` / ``dask-em impute``:
the NaN-aware kernels (`dask_em.kernels_missing`) wired into the estimator and the CLI.

The oracle is the NumPy EM loop of `tests/test_missing.py` (`em_fit`, itself checked
against a row-by-row implementation) from the same initial parameters.
"""

from __future__ import annotations

import json
import warnings

import dask.array as da
import numpy as np
import pytest
import zarr
from scipy import stats as sps
from sklearn.exceptions import ConvergenceWarning

from dask_em import GaussianMixture, kernels_missing, load_model
from dask_em.checkpoint import CheckpointMismatch
from dask_em.errors import DataError
from dask_em.params import COVARIANCE_TYPES, GMMParams, second_moment_shape
from dask_em.reseed import reseed
from dask_em.stats import SuffStats, WorstFit
from tests.cli_helpers import (
    assert_ok,
    assert_same_fit,
    assert_usage_error,
    run_cli,
    write_array,
)
from tests.test_missing import (
    em_fit,
    param_errors,
    punch_holes,
    sample_rows,
    start_params,
    truth_params,
)
from tests.test_resume import Interrupted, at_iteration, crash_after  # noqa: F401

PARAMS = ("weights_", "means_", "covariances_", "precisions_cholesky_")


def _inits(params: GMMParams) -> dict[str, np.ndarray]:
    return {
        "weights_init": params.weights,
        "means_init": params.means,
        "precisions_init": params.precisions,
    }


def _fitted(gm: GaussianMixture) -> GMMParams:
    return GMMParams.from_covariances(gm.weights_, gm.means_, gm.covariances_, gm.covariance_type)


@pytest.mark.parametrize("fraction", [0.1, 0.4])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_fit_on_a_zarr_store_with_nan_equals_the_numpy_em_loop(
    covariance_type, fraction, write_zarr
):
    truth = truth_params(covariance_type, 41)
    X = punch_holes(sample_rows(truth, 1000, 42), fraction, 43)
    store = write_zarr(X, 130)
    start = start_params(X, covariance_type, 44)
    gm = GaussianMixture(
        3, covariance_type=covariance_type, tol=0.0, max_iter=20, missing="em", **_inits(start)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tol=0 never converges
        gm.fit(store.path)
    expected, bounds = em_fit(np.array_split(X, range(130, 1000, 130)), start, 20)
    assert gm.n_iter_ == 20 and gm.n_passes_ == 20
    np.testing.assert_allclose(gm.lower_bounds_, bounds, rtol=1e-12)
    errors = param_errors(_fitted(gm), expected)
    assert max(errors.values()) <= 1e-10, errors
    assert np.min(np.diff(gm.lower_bounds_)) >= -1e-12 * abs(gm.lower_bounds_[-1])


@pytest.mark.parametrize(
    ("init_params", "acceleration"),
    [
        ("kmeans", None),
        ("k-means++", None),
        ("random", None),
        ("random_from_data", None),
        ("kmeans", "squarem"),
    ],
)
def test_data_without_nan_gives_exactly_the_missing_none_fit(init_params, acceleration, write_zarr):
    X = sample_rows(truth_params("full", 51), 900, 52)
    store = write_zarr(X, 130)
    settings = dict(init_params=init_params, acceleration=acceleration, random_state=0, tol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # squarem may stop at max_iter
        fits = [GaussianMixture(3, **settings, missing=m).fit(store.path) for m in (None, "em")]
    for name in PARAMS:
        np.testing.assert_array_equal(getattr(fits[0], name), getattr(fits[1], name))
    assert fits[0].lower_bounds_ == fits[1].lower_bounds_
    assert fits[0].n_passes_ == fits[1].n_passes_


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random", "random_from_data"])
def test_every_initialization_starts_from_complete_rows(init_params):
    X = punch_holes(sample_rows(truth_params("full", 61), 800, 62), 0.2, 63)
    X[0, 0] = np.nan  # the row 'random' reads first holds NaN
    gm = GaussianMixture(3, init_params=init_params, random_state=1, missing="em", max_iter=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        gm.fit(da.from_array(X, chunks=(200, 3)))
    assert np.all(np.isfinite(gm.means_)) and np.all(np.isfinite(gm.covariances_))
    assert np.min(np.diff(gm.lower_bounds_)) >= -1e-12 * abs(gm.lower_bounds_[-1])


def test_no_complete_row_is_refused_asking_for_initial_parameters():
    X = sample_rows(truth_params("diag", 71), 50, 72)
    X[np.arange(50), np.arange(50) % 3] = np.nan
    with pytest.raises(DataError, match="no row of the data is complete.*means_init"):
        GaussianMixture(2, missing="em").fit(X)
    start = start_params(X, "diag", 73)
    gm = GaussianMixture(3, covariance_type="diag", missing="em", **_inits(start)).fit(X)
    assert np.all(np.isfinite(gm.means_))


def test_nan_without_missing_is_refused_naming_the_parameter(write_zarr):
    X = punch_holes(sample_rows(truth_params("full", 81), 300, 82), 0.1, 83)
    store = write_zarr(X, 130)
    with pytest.raises(DataError, match="missing='em'"):
        GaussianMixture(2).fit(store.path)
    with pytest.raises(ValueError, match="NaN"):
        GaussianMixture(2).fit(X)


def test_inference_and_impute_use_the_observed_values(write_zarr):
    truth = truth_params("full", 91)
    X = punch_holes(sample_rows(truth, 700, 92), 0.2, 93)
    store = write_zarr(X, 130)
    gm = GaussianMixture(3, random_state=0, missing="em").fit(store.path)
    params = _fitted(gm)
    lazy = gm.score_samples(store.path)
    assert isinstance(lazy, da.Array)
    expected = kernels_missing.score_samples_block(X, params)
    np.testing.assert_allclose(lazy.compute(), expected, rtol=1e-12)
    np.testing.assert_allclose(gm.score_samples(X), expected, rtol=1e-12)
    np.testing.assert_array_equal(gm.predict(store.path).compute(), gm.predict(X))
    np.testing.assert_allclose(gm.predict_proba(X).sum(axis=1), 1.0, rtol=1e-12)
    assert gm.score(X) == pytest.approx(float(expected.mean()), rel=1e-12)
    imputed = gm.impute(store.path)
    assert isinstance(imputed, da.Array)
    filled = imputed.compute()
    np.testing.assert_array_equal(filled, kernels_missing.impute_block(X, params))
    np.testing.assert_array_equal(gm.impute(X), filled)
    assert not np.isnan(filled).any()
    observed = ~np.isnan(X)
    np.testing.assert_array_equal(filled[observed], X[observed])


def test_infinite_value_at_inference_names_its_global_row(write_zarr):
    X = punch_holes(sample_rows(truth_params("diag", 95), 500, 96), 0.1, 97)
    gm = GaussianMixture(3, covariance_type="diag", random_state=0, missing="em").fit(X)
    X[321, 1] = np.inf
    store = write_zarr(X, 130)
    with pytest.raises(DataError, match="row 321"):
        gm.score_samples(store.path).compute()


def test_missing_is_saved_in_the_model_and_the_sklearn_tags(tmp_path):
    X = punch_holes(sample_rows(truth_params("diag", 99), 400, 100), 0.1, 101)
    gm = GaussianMixture(2, covariance_type="diag", random_state=0, missing="em").fit(X)
    gm.save(tmp_path / "m.zarr")
    loaded = load_model(tmp_path / "m.zarr")
    assert loaded.missing == "em"
    np.testing.assert_array_equal(loaded.impute(X), gm.impute(X))
    assert gm.__sklearn_tags__().input_tags.allow_nan
    assert not GaussianMixture().__sklearn_tags__().input_tags.allow_nan
    with pytest.raises(ValueError, match="'missing'"):
        GaussianMixture(missing="mean").fit(X)


def test_checkpoint_resume_with_missing_equals_the_uninterrupted_fit(
    tmp_path,
    write_zarr,
    crash_after,  # noqa: F811 (the fixture of tests/test_resume.py)
):
    X = punch_holes(sample_rows(truth_params("full", 111), 900, 112), 0.3, 113)
    store = write_zarr(X, 130)
    settings = dict(n_components=3, random_state=3, tol=0.0, max_iter=12, missing="em")
    with pytest.warns(Warning):  # tol=0 never converges
        whole = GaussianMixture(**settings).fit(store.path)
    ckpt = tmp_path / "ckpt"
    crash_after(at_iteration(5))
    with pytest.raises(Interrupted):
        GaussianMixture(**settings, checkpoint_dir=ckpt).fit(store.path)
    with pytest.warns(Warning):
        resumed = GaussianMixture(**settings, checkpoint_dir=ckpt).fit(store.path)
    assert_same_fit(resumed, whole, atol=0.0)
    other = {**settings, "missing": None}
    with pytest.raises(CheckpointMismatch, match="missing"):
        GaussianMixture(**other, checkpoint_dir=ckpt).fit(store.path)


@pytest.mark.slow
def test_cli_fit_missing_then_impute_round_trip(tmp_path):
    truth = truth_params("full", 121)
    X = punch_holes(sample_rows(truth, 600, 122), 0.2, 123)
    data = write_array(tmp_path / "data.zarr", X)
    model, out = tmp_path / "model.zarr", tmp_path / "imputed.zarr"
    refused = run_cli("fit", data, "--n-components", 3, "--output", model, "--quiet")
    assert_usage_error(refused, "--missing em", "row")
    assert not model.exists()
    fit = run_cli(
        "fit", data, "--n-components", 3, "--output", model, "--missing", "em",
        "--seed", 0, "--quiet", "--threads-per-worker", 1, "--n-workers", 1,
    )  # fmt: skip
    assert_ok(fit)
    assert_ok(run_cli("impute", model, data, "--output", out))
    gm = load_model(model)
    filled = zarr.open_array(str(out), mode="r")[...]
    np.testing.assert_array_equal(filled, gm.impute(X))
    assert_usage_error(run_cli("impute", model, data, "--output", data), "data.zarr")
    score = run_cli("score", model, data)
    assert_ok(score)
    assert json.loads(score.stdout)["mean_log_likelihood"] == pytest.approx(gm.score(X), rel=1e-9)
    empty = X.copy()
    empty[5] = np.nan
    bad = write_array(tmp_path / "empty.zarr", empty)
    assert_usage_error(
        run_cli(
            "fit",
            bad,
            "--n-components",
            3,
            "--output",
            tmp_path / "m2.zarr",
            "--missing",
            "em",
            "--quiet",
        ),  # fmt: skip
        "row 5",
        "every feature missing",
    )


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_reseed_at_a_row_with_missing_values_compares_marginal_densities(covariance_type):
    """The re-seed test at a worst row with NaN compares the new component's density on
    the row's observed coordinates with the row's marginal log-likelihood."""
    start = truth_params(covariance_type, 131)
    weights = np.array([0.6, 0.4 - 1e-16, 1e-16])
    params = GMMParams.from_covariances(weights, start.means, start.covariances, covariance_type)
    observed = np.array([True, False, True, False])
    row = np.array([0.5, -1.0, 2.0, 0.25])
    new_weight = 1e-3 / (1.0 + 1e-3)
    if covariance_type == "full":
        live = weights[:2] / weights[:2].sum()
        s_new = np.tensordot(live, params.covariances[:2], axes=1)
    elif covariance_type == "tied":
        s_new = params.covariances
    elif covariance_type == "diag":
        s_new = np.diag(np.tensordot(weights[:2] / weights[:2].sum(), params.covariances[:2], 1))
    else:
        s_new = np.eye(4) * float(weights[:2] @ params.covariances[:2] / weights[:2].sum())
    s_oo = s_new[np.ix_(observed, observed)]
    expected = np.log(new_weight) + sps.multivariate_normal(row[observed], s_oo).logpdf(
        row[observed]
    )

    def stats(worst_loglik: float) -> SuffStats:
        worst = WorstFit(worst_loglik, 7, row, 1.0, observed)
        zeros = np.zeros(second_moment_shape(covariance_type, 3, 4))
        return SuffStats(
            np.array([600.0, 400.0, 0.0]), np.zeros((3, 4)), zeros, 0.0, 1000.0, 1000, worst
        )

    assert reseed(params, stats(expected + 1e-9)) is None
    done = reseed(params, stats(expected - 1e-9))
    assert done is not None
    np.testing.assert_array_equal(done[0].means[2], row)
