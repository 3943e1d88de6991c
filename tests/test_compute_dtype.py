"""``compute_dtype``: per-chunk products in another dtype than the data's.

``compute_dtype=None`` (the default) computes in the data's dtype, bit for bit as
before the option existed. ``'float32'`` on float64 data runs the products in float32
while the statistics and the log-likelihood are still accumulated in float64, and the
rows are centered in float64 before the cast; its fit is compared with the float64 fit
from the same initial parameters on the parity datasets of ``tests/test_parity.py``
(the 2,000 x 3, 4-component overlapping mixture in 16 row chunks, also shifted by 1e6).
``'float64'`` on float32 data is honoured: it computes as on the same values in float64.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from cli_helpers import LOCAL, assert_usage_error, run_cli, write_array
from oracle import norm_rel_err, rel_err
from sklearn.exceptions import ConvergenceWarning

from dask_em import GaussianMixture, kernels, load_model
from dask_em.checkpoint import Checkpoint, CheckpointMismatch
from dask_em.errors import ParameterError
from dask_em.params import COVARIANCE_TYPES
from dask_em.select import select

OFFSET = 1e6
PARAMS = ("weights_", "means_", "covariances_", "precisions_cholesky_")

# Float32 products against float64 ones, measured on the parity datasets (all four
# covariance types, at the origin and shifted by 1e6; see test_float32_compute_...):
# at most MEASURED_NORMWISE normwise (max|error| / max|value| of each array) and
# MEASURED_ELEMENTWISE elementwise (on small off-diagonal covariances, whose absolute
# error is that of their neighbours). The bounds are 10x the measured errors (which
# move by a factor 2-3 with the chunking); float32 accumulation of the statistics would
# miss them by orders of magnitude.
MEASURED_NORMWISE = 7.1e-7
MEASURED_ELEMENTWISE = 4.9e-6
NORMWISE_BOUND = 10 * MEASURED_NORMWISE
ELEMENTWISE_BOUND = 10 * MEASURED_ELEMENTWISE


def fit(data, inits: dict, covariance_type: str, **kw) -> GaussianMixture:
    """dask-em from the given initial parameters on the Zarr store of ``data``, tol 1e-3.

    ``tol`` is scikit-learn's default: the float32 lower bound is only accurate to ~1e-7
    relative, so with a ``tol`` near 1e-6 the iteration at which EM stops would be a
    matter of float32 rounding (as in test_parity's float32 test).
    """
    params = dict(n_components=4, covariance_type=covariance_type, tol=1e-3, max_iter=300)
    return GaussianMixture(**params, **inits, **kw).fit(data.dask())


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_compute_dtype_of_the_data_is_bit_for_bit_the_default_fit(
    covariance_type, mixture_zarr, given_inits
):
    inits = given_inits(mixture_zarr.X, 4, covariance_type)
    default = fit(mixture_zarr, inits, covariance_type)
    for same in (None, "float64", np.float64):
        other = fit(mixture_zarr, inits, covariance_type, compute_dtype=same)
        for name in PARAMS:
            np.testing.assert_array_equal(getattr(other, name), getattr(default, name))
        assert other.lower_bounds_ == default.lower_bounds_


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_em_chunk_in_the_rows_dtype_is_bit_for_bit_em_chunk(covariance_type, given_inits):
    X = np.random.default_rng(0).standard_normal((5000, 3)) + OFFSET
    inits = given_inits(X, 4, covariance_type)
    gm = GaussianMixture(4, covariance_type=covariance_type, max_iter=1, **inits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        params = gm.fit(X)._params()
    for rows in (X, X.astype(np.float32)):
        want = kernels.em_chunk(rows, None, 0, 0, params)
        got = kernels.em_chunk(rows, None, 0, 0, params, compute_dtype=rows.dtype)
        for field in ("n", "s1", "s2"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
        assert got.loglik == want.loglik


@pytest.mark.parametrize("offset", [0.0, OFFSET], ids=["origin", "offset-1e6"])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float32_compute_is_within_the_documented_tolerance_of_the_float64_fit(
    covariance_type, offset, make_mixture, write_zarr, given_inits, parity_log
):
    X = make_mixture(2000, 3, 4, seed=0) + offset
    data = write_zarr(X, 130)
    inits = given_inits(X, 4, covariance_type)
    f64 = fit(data, inits, covariance_type)
    f32 = fit(data, inits, covariance_type, compute_dtype="float32")

    for name in PARAMS:
        assert getattr(f32, name).dtype == np.float64, name
    # the means are judged on the scale of the data (translation leaves it unchanged)
    scale = float(np.max(np.std(X, axis=0)))
    norm_err = {
        "weights": norm_rel_err(f32.weights_, f64.weights_),
        "means/std": float(np.max(np.abs(f32.means_ - f64.means_))) / scale,
        "covariances": norm_rel_err(f32.covariances_, f64.covariances_),
        "lower_bound": norm_rel_err(f32.lower_bound_, f64.lower_bound_),
    }
    err = {
        "weights": rel_err(f32.weights_, f64.weights_),
        "covariances": rel_err(f32.covariances_, f64.covariances_),
    }
    where = "offset 1e6" if offset else "origin"
    parity_log.record(f"f32 compute normwise {where}", covariance_type, **norm_err)
    parity_log.record(f"f32 compute elementwise {where}", covariance_type, **err)
    assert f64.n_iter_ >= 10, "the case must take many EM iterations"
    assert f32.n_iter_ == f64.n_iter_
    assert max(norm_err.values()) <= NORMWISE_BOUND, norm_err
    assert max(err.values()) <= ELEMENTWISE_BOUND, err
    assert not np.array_equal(f32.means_, f64.means_), "float32 products were not used"


def test_inference_honours_compute_dtype(mixture_zarr, given_inits):
    inits = given_inits(mixture_zarr.X, 4, "full")
    gm = fit(mixture_zarr, inits, "full")
    X = mixture_zarr.X
    f64 = {"log_p": gm.score_samples(X), "proba": gm.predict_proba(X), "labels": gm.predict(X)}
    gm.set_params(compute_dtype="float32")
    f32 = {"log_p": gm.score_samples(X), "proba": gm.predict_proba(X), "labels": gm.predict(X)}

    assert f32["log_p"].dtype == np.float64 and f32["proba"].dtype == np.float64
    assert not np.array_equal(f32["log_p"], f64["log_p"])
    np.testing.assert_allclose(f32["log_p"], f64["log_p"], rtol=1e-5)
    np.testing.assert_allclose(f32["proba"], f64["proba"], atol=1e-5)
    assert np.mean(f32["labels"] == f64["labels"]) > 0.999
    lazy = gm.score_samples(mixture_zarr.dask()).compute()  # the Dask path too
    assert not np.array_equal(lazy, f64["log_p"])
    np.testing.assert_allclose(lazy, f64["log_p"], rtol=1e-5)


def test_float64_compute_of_float32_data_equals_the_fit_of_the_same_values_in_float64(
    make_mixture, write_zarr, given_inits
):
    X32 = make_mixture(2000, 3, 4, seed=0).astype(np.float32)
    inits = given_inits(X32, 4, "full")
    honoured = fit(write_zarr(X32, 130), inits, "full", compute_dtype="float64")
    as_float64 = fit(write_zarr(X32.astype(np.float64), 130), inits, "full")
    in_float32 = fit(write_zarr(X32, 130), inits, "full")
    for name in PARAMS:
        np.testing.assert_array_equal(getattr(honoured, name), getattr(as_float64, name))
    assert honoured.lower_bounds_ == as_float64.lower_bounds_
    assert not np.array_equal(honoured.means_, in_float32.means_)


@pytest.mark.parametrize("value", ["float16", "int32", "double-ish", 3])
def test_invalid_compute_dtype_is_a_one_line_parameter_error(value):
    X = np.random.default_rng(0).standard_normal((50, 2))
    with pytest.raises(ParameterError, match="'compute_dtype'") as err:
        GaussianMixture(2, compute_dtype=value).fit(X)
    assert "\n" not in str(err.value)
    assert err.value.parameter == "compute_dtype"


def test_compute_dtype_with_missing_values_is_refused():
    X = np.random.default_rng(0).standard_normal((50, 2))
    with pytest.raises(ParameterError, match="compute_dtype applies to complete rows") as err:
        GaussianMixture(2, missing="em", compute_dtype="float32").fit(X)
    assert "missing='em'" in str(err.value)


def test_checkpoint_fingerprint_holds_compute_dtype_only_when_set(
    tmp_path, mixture_zarr, given_inits
):
    inits = given_inits(mixture_zarr.X, 4, "diag")
    settings = dict(n_components=4, covariance_type="diag", max_iter=3, **inits)

    def fit_into(ckpt, **kw) -> GaussianMixture:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            gm = GaussianMixture(**settings, checkpoint_dir=ckpt, **kw)
            return gm.fit(mixture_zarr.path)

    def hyper(ckpt) -> dict:
        saved = Checkpoint(ckpt, {}).load(check_fingerprint=False)
        return saved.fingerprint["hyper_parameters"]

    fit_into(tmp_path / "default")
    assert "compute_dtype" not in hyper(tmp_path / "default")  # earlier checkpoints resume
    fit_into(tmp_path / "default", compute_dtype=None)  # resumes (finished: nothing to do)
    ckpt = tmp_path / "f32"
    fit_into(ckpt, compute_dtype=np.float32)
    assert hyper(ckpt)["compute_dtype"] == "float32"
    assert fit_into(ckpt, compute_dtype="float32").n_iter_ == 3
    for other in (None, "float64"):
        with pytest.raises(CheckpointMismatch, match="compute_dtype"):
            fit_into(ckpt, compute_dtype=other)


def test_saved_model_keeps_compute_dtype_by_name(tmp_path, mixture_zarr):
    gm = GaussianMixture(2, random_state=0, compute_dtype=np.float32).fit(mixture_zarr.X)
    gm.save(tmp_path / "m.zarr")
    loaded = load_model(tmp_path / "m.zarr")
    assert loaded.compute_dtype == "float32"
    np.testing.assert_array_equal(
        loaded.score_samples(mixture_zarr.X), gm.score_samples(mixture_zarr.X)
    )
    assert "compute_dtype" in GaussianMixture().get_params()


def test_select_with_compute_dtype_equals_each_estimator_fitted_alone(mixture_zarr):
    result = select(mixture_zarr.path, [2, 3], ["diag"], compute_dtype="float32", max_iter=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        alone = GaussianMixture(
            3, covariance_type="diag", random_state=0, max_iter=20, compute_dtype="float32"
        ).fit(mixture_zarr.path)
    (three,) = [c for c in result.candidates if c.n_components == 3]
    np.testing.assert_array_equal(three.params.means, alone.means_)


def test_cli_refuses_an_unknown_compute_dtype_in_one_line(tmp_path):
    data = write_array(tmp_path / "data.zarr", np.zeros((10, 2)))
    model = tmp_path / "model.zarr"
    for command in ("fit", "select"):
        bad = run_cli(
            command, data, "--n-components", 2, "--output", model, "--compute-dtype", "half"
        )
        assert_usage_error(bad, "--compute-dtype")
    assert not model.exists()


@pytest.mark.slow
def test_cli_fit_with_compute_dtype_fits_in_float32_and_records_it(tmp_path):
    X = np.random.default_rng(0).standard_normal((600, 2))
    data = write_array(tmp_path / "data.zarr", X)
    model = tmp_path / "model.zarr"
    done = run_cli(
        "fit", data, "--n-components", 2, "--output", model, "--compute-dtype", "float32",
        "--quiet", *LOCAL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    loaded = load_model(model)
    assert loaded.compute_dtype == "float32"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        alone = GaussianMixture(2, n_init=3, random_state=0, compute_dtype="float32").fit(str(data))
    np.testing.assert_allclose(loaded.means_, alone.means_, rtol=1e-12)
