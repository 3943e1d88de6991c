"""EM with missing values (`dask_em.kernels_missing`) against a row-by-row oracle.

The oracle here is deliberately simple and independent of the kernels: one row at a
time, no batching, no shifts, SciPy for the densities and ``np.linalg.solve`` for the
conditional Gaussian of the missing coordinates given the observed ones (Ghahramani &
Jordan 1994). Checked:

- the kernel's statistics, and the M-step on them, equal the oracle's for every
  covariance type, several missingness patterns, sample weights and data far from the
  origin; the inference functions (marginal log-likelihood, responsibilities, imputation)
  too;
- statistics of two halves add up to those of the whole; a chunk without NaN gives
  exactly (bit for bit) `dask_em.kernels.em_chunk`'s statistics;
- one pass of the graph layer (`dask_em.reduce.RowData`) over a Zarr store with NaN
  gives the whole array's statistics;
- a NumPy EM loop over chunks never decreases the observed-data log-likelihood;
- with 10% and 40% of values missing completely at random, the fitted parameters stay
  close to the complete-data fit, and conditional-mean imputation beats column means and
  scikit-learn's ``KNNImputer`` (errors and the RMSE table go to the terminal summary).
"""

from __future__ import annotations

from dataclasses import replace

import dask.array as da
import numpy as np
import pytest
from oracle import dense_covariances, diagonal_covariances, random_covariances, second_moments
from scipy import stats as sps
from sklearn.impute import KNNImputer

from dask_em import kernels, kernels_missing
from dask_em.em import EMResult, run_em
from dask_em.errors import DataError
from dask_em.params import COVARIANCE_TYPES, GMMParams
from dask_em.reduce import RowData
from dask_em.stats import SuffStats, m_step

N_COMPONENTS = 3
N_FEATURES = 4


# ------------------------------------------------------------------------ oracle
def component_covariances(params: GMMParams) -> np.ndarray:
    """The (K, D, D) covariance matrix of each component, whatever the covariance type."""
    return dense_covariances(params.covariances, params.covariance_type, *params.means.shape)


def oracle_row(x: np.ndarray, params: GMMParams) -> tuple[float, np.ndarray, list, list]:
    """One row: ``log p(x_o)``, responsibilities (K,), and per component the completed
    row ``xhat_k`` (D,) and the conditional covariance ``C_k`` (D, D, zero outside the
    missing block)."""
    o = ~np.isnan(x)
    m = ~o
    log_dens, xhats, conds = [], [], []
    for w, mu, cov in zip(params.weights, params.means, component_covariances(params), strict=True):
        s_oo = cov[np.ix_(o, o)]
        log_marginal = sps.multivariate_normal(mu[o], s_oo).logpdf(x[o]) if o.any() else 0.0
        log_dens.append(np.log(w) + log_marginal)
        xhat = x.copy()
        c = np.zeros_like(cov)
        if m.any():
            s_mo = cov[np.ix_(m, o)]
            if o.any():
                xhat[m] = mu[m] + s_mo @ np.linalg.solve(s_oo, x[o] - mu[o])
                c[np.ix_(m, m)] = cov[np.ix_(m, m)] - s_mo @ np.linalg.solve(s_oo, s_mo.T)
            else:
                xhat[m] = mu[m]
                c[np.ix_(m, m)] = cov[np.ix_(m, m)]
        xhats.append(xhat)
        conds.append(c)
    log_dens = np.array(log_dens)
    norm = float(np.logaddexp.reduce(log_dens))
    return norm, np.exp(log_dens - norm), xhats, conds


def oracle_stats(X: np.ndarray, w: np.ndarray | None, params: GMMParams) -> SuffStats:
    """E-step statistics shifted by the means, summed row by row."""
    k, d = params.n_components, params.n_features
    w = np.ones(X.shape[0]) if w is None else w
    n, s1, full = np.zeros(k), np.zeros((k, d)), np.zeros((k, d, d))
    loglik = 0.0
    for x, wi in zip(X, w, strict=True):
        norm, resp, xhats, conds = oracle_row(x, params)
        loglik += wi * norm
        for j in range(k):
            r = wi * resp[j]
            diff = xhats[j] - params.means[j]
            n[j] += r
            s1[j] += r * diff
            full[j] += r * (np.outer(diff, diff) + conds[j])
    s2 = second_moments(full, params.covariance_type)
    return SuffStats(n, s1, s2, loglik, float(w.sum()), X.shape[0])


def oracle_m_step(X: np.ndarray, params: GMMParams, reg_covar: float) -> GMMParams:
    """The EM update written from its definition (no shifts): weighted means of the
    completed rows and scatter about the new means plus the conditional covariances."""
    d = params.n_features
    rows = [oracle_row(x, params) for x in X]
    resp = np.array([r[1] for r in rows])  # (n, K)
    xhat = np.array([r[2] for r in rows])  # (n, K, D)
    cond = np.array([r[3] for r in rows])  # (n, K, D, D)
    nk = resp.sum(axis=0) + 10.0 * np.finfo(np.float64).eps
    means = np.einsum("nk,nkd->kd", resp, xhat) / nk[:, None]
    diff = xhat - means[None]
    scatter = np.einsum("nk,nki,nkj->kij", resp, diff, diff) + np.einsum("nk,nkij->kij", resp, cond)
    cov = scatter / nk[:, None, None]
    if params.covariance_type == "full":
        cov = cov + reg_covar * np.eye(d)
    elif params.covariance_type == "tied":
        cov = scatter.sum(axis=0) / nk.sum() + reg_covar * np.eye(d)
    elif params.covariance_type == "diag":
        cov = np.einsum("kii->ki", cov) + reg_covar
    else:
        cov = np.einsum("kii->ki", cov).mean(axis=1) + reg_covar
    return GMMParams.from_covariances(nk / nk.sum(), means, cov, params.covariance_type)


# ------------------------------------------------------------------------- data
def make_params(
    covariance_type: str, seed: int = 0, offset: float = 0.0, n_features: int = N_FEATURES
) -> GMMParams:
    """Arbitrary valid, correlated mixture parameters of a covariance type."""
    rng = np.random.default_rng(seed)
    k, d = N_COMPONENTS, n_features
    covariances = random_covariances(rng, covariance_type, k, d)
    means = rng.normal(scale=2.0, size=(k, d)) + offset
    return GMMParams.from_covariances(
        rng.dirichlet(np.full(k, 3.0)), means, covariances, covariance_type
    )


def sample_rows(params: GMMParams, n: int, seed: int) -> np.ndarray:
    """Rows drawn from ``params``'s mixture."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(params.n_components, size=n, p=params.weights)
    chol = np.linalg.cholesky(component_covariances(params))
    z = rng.standard_normal((n, params.n_features))
    return params.means[labels] + np.einsum("nij,nj->ni", chol[labels], z)


def punch_holes(X: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """``X`` with a ``fraction`` of its values set to NaN completely at random, keeping
    at least one observed value per row."""
    rng = np.random.default_rng(seed)
    holes = rng.uniform(size=X.shape) < fraction
    full_rows = holes.all(axis=1)
    holes[full_rows, rng.integers(X.shape[1], size=int(full_rows.sum()))] = False
    return np.where(holes, np.nan, X)


def patterned_rows(params: GMMParams, seed: int = 1) -> np.ndarray:
    """300 rows with every kind of pattern: complete rows, one missing, all but one
    missing, two blocks, scattered at random (shuffled together)."""
    X = sample_rows(params, 300, seed)
    d = X.shape[1]
    X[50:100, 0] = np.nan
    X[100:130, 1:] = np.nan
    X[130:160, :2] = np.nan
    X[160:190, d - 1] = np.nan
    X[190:] = punch_holes(X[190:], 0.4, seed)
    return X[np.random.default_rng(seed).permutation(X.shape[0])]


def assert_stats_close(actual: SuffStats, expected: SuffStats, rtol: float) -> float:
    """Each statistic equal to ``rtol`` relative to its own magnitude; returns the largest
    relative error seen."""
    worst = 0.0
    for name in ("n", "s1", "s2", "loglik", "weight_sum"):
        a = np.asarray(getattr(actual, name))
        e = np.asarray(getattr(expected, name))
        assert a.shape == e.shape, name
        err = float(np.max(np.abs(a - e))) / max(float(np.max(np.abs(e))), 1e-300)
        assert err <= rtol, (name, err)
        worst = max(worst, err)
    assert actual.n_samples == expected.n_samples
    return worst


def param_errors(actual: GMMParams, expected: GMMParams) -> dict[str, float]:
    """Normwise relative errors of weights, means and covariances."""

    def err(a: np.ndarray, e: np.ndarray) -> float:
        return float(np.max(np.abs(a - e)) / np.max(np.abs(e)))

    return {
        "weights": err(actual.weights, expected.weights),
        "means": err(actual.means, expected.means),
        "covariances": err(actual.covariances, expected.covariances),
    }


# ------------------------------------------------------------ kernel vs oracle
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_statistics_equal_the_row_by_row_oracle(covariance_type, weighted, parity_log):
    params = make_params(covariance_type)
    X = patterned_rows(params)
    w = np.random.default_rng(3).uniform(0.0, 2.0, X.shape[0]) if weighted else None
    got = kernels_missing.em_chunk_missing(X, w, 0, 0, params)
    err = assert_stats_close(got, oracle_stats(X, w, params), 1e-10)
    scenario = "missing: E-step vs oracle" + (", weighted" if weighted else "")
    parity_log.record(scenario, covariance_type, rel_err=err)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_statistics_of_data_far_from_the_origin_equal_the_oracle(covariance_type):
    params = make_params(covariance_type, seed=5, offset=1e6)
    X = patterned_rows(params, seed=6)
    got = kernels_missing.em_chunk_missing(X, None, 0, 0, params)
    assert_stats_close(got, oracle_stats(X, None, params), 1e-10)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float32_rows_with_nan_give_float64_statistics_close_to_the_oracle(covariance_type):
    params = make_params(covariance_type, seed=36)
    X32 = patterned_rows(params, seed=37).astype(np.float32)
    got = kernels_missing.em_chunk_missing(X32, None, 0, 0, params)
    for name in ("n", "s1", "s2"):
        assert getattr(got, name).dtype == np.float64
    # complete rows run em_chunk's float32 products (unit roundoff 6e-8); rows with NaN
    # run in float64 from the float32 values
    assert_stats_close(got, oracle_stats(X32.astype(np.float64), None, params), 1e-5)
    assert kernels_missing.impute_block(X32, params).dtype == np.float32


@pytest.mark.parametrize("covariance_type", ["full", "tied"])
def test_statistics_with_more_than_64_features_equal_the_oracle(covariance_type):
    """Patterns of more than 64 features are grouped as byte strings, not integers."""
    params = make_params(covariance_type, seed=25, n_features=70)
    X = punch_holes(sample_rows(params, 60, 26), 0.2, 27)
    X[30:40, 5:] = np.nan  # a shared pattern among the distinct ones
    got = kernels_missing.em_chunk_missing(X, None, 0, 0, params)
    assert_stats_close(got, oracle_stats(X, None, params), 1e-10)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_m_step_on_kernel_statistics_equals_the_oracle_update(covariance_type, parity_log):
    params = make_params(covariance_type, seed=2)
    X = patterned_rows(params, seed=4)
    stats = kernels_missing.em_chunk_missing(X, None, 0, 0, params)
    got = m_step(stats, params.means, 1e-6, covariance_type)
    errors = param_errors(got, oracle_m_step(X, params, 1e-6))
    parity_log.record("missing: M-step vs oracle", covariance_type, **errors)
    assert max(errors.values()) <= 1e-10, errors


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_inference_equals_the_oracle(covariance_type):
    params = make_params(covariance_type, seed=7)
    X = patterned_rows(params, seed=8)
    X[5] = np.nan  # a row with nothing observed: the model's answer given nothing
    rows = [oracle_row(x, params) for x in X]
    norm = np.array([r[0] for r in rows])
    resp = np.array([r[1] for r in rows])
    imputed = np.array([np.einsum("k,kd->d", r[1], np.array(r[2])) for r in rows])
    np.testing.assert_allclose(
        kernels_missing.score_samples_block(X, params), norm, rtol=1e-12, atol=1e-14
    )
    np.testing.assert_allclose(
        kernels_missing.predict_proba_block(X, params), resp, rtol=1e-10, atol=1e-14
    )
    np.testing.assert_array_equal(kernels_missing.predict_block(X, params), resp.argmax(axis=1))
    got = kernels_missing.impute_block(X, params)
    np.testing.assert_allclose(got, imputed, rtol=1e-12)
    observed = ~np.isnan(X)
    np.testing.assert_array_equal(got[observed], X[observed])
    assert np.isclose(norm[5], 0.0) and np.allclose(got[5], params.weights @ params.means)


# ------------------------------------------------------------------ invariants
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_statistics_of_two_halves_add_up_to_the_whole(covariance_type):
    params = make_params(covariance_type, seed=9)
    X = patterned_rows(params, seed=10)
    w = np.random.default_rng(11).uniform(0.5, 1.5, X.shape[0])
    whole = kernels_missing.em_chunk_missing(X, w, 0, 0, params)
    cut = 137
    halves = kernels_missing.em_chunk_missing(
        X[:cut], w[:cut], 0, 0, params
    ) + kernels_missing.em_chunk_missing(X[cut:], w[cut:], 1, cut, params)
    assert_stats_close(halves, whole, 1e-13)
    assert halves.worst is not None and whole.worst is not None
    assert halves.worst.index == whole.worst.index
    assert halves.worst.loglik == pytest.approx(whole.worst.loglik, rel=1e-12)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_chunk_without_nan_gives_exactly_em_chunk_statistics(covariance_type, dtype):
    params = make_params(covariance_type, seed=12)
    X = sample_rows(params, 5000, 13).astype(dtype)  # crosses a kernels.BLOCK_ROWS boundary
    w = np.random.default_rng(14).uniform(0.0, 2.0, X.shape[0])
    got = kernels_missing.em_chunk_missing(X, w, 3, 1000, params)
    expected = kernels.em_chunk(X, w, 3, 1000, params)
    for name in ("n", "s1", "s2"):
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name))
    assert (got.loglik, got.weight_sum, got.n_samples) == (
        expected.loglik,
        expected.weight_sum,
        expected.n_samples,
    )
    assert got.worst is not None and expected.worst is not None
    assert (got.worst.index, got.worst.loglik) == (expected.worst.index, expected.worst.loglik)
    for fn in ("score_samples_block", "predict_proba_block", "predict_block"):
        np.testing.assert_array_equal(
            getattr(kernels_missing, fn)(X, params), getattr(kernels, fn)(X, params)
        )
    np.testing.assert_array_equal(kernels_missing.impute_block(X, params), X)


def test_worst_fitted_row_with_nan_is_named_and_imputed():
    params = make_params("full", seed=15)
    X = sample_rows(params, 200, 16)
    X[17] = [40.0, np.nan, -40.0, np.nan]  # far from every component
    X[30, 2] = np.nan
    stats = kernels_missing.em_chunk_missing(X, None, 2, 1000, params)
    assert stats.worst is not None
    assert stats.worst.index == 1017
    assert stats.worst.loglik == pytest.approx(oracle_row(X[17], params)[0], rel=1e-12)
    np.testing.assert_allclose(
        stats.worst.row, kernels_missing.impute_block(X[17:18], params)[0], rtol=1e-15
    )


# ---------------------------------------------------------------- bad input
def test_row_with_every_value_missing_is_refused_naming_it():
    params = make_params("diag")
    X = sample_rows(params, 50, 17)
    X[[12, 20]] = np.nan
    with pytest.raises(DataError, match=r"^row 512 has every feature missing .*2 such row"):
        kernels_missing.em_chunk_missing(X, None, 1, 500, params)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_row_with_every_value_missing_and_zero_weight_counts_for_nothing(covariance_type):
    params = make_params(covariance_type, seed=18)
    X = patterned_rows(params, seed=19)
    w = np.ones(X.shape[0])
    X[40], w[40] = np.nan, 0.0
    got = kernels_missing.em_chunk_missing(X, w, 0, 0, params)
    keep = np.arange(X.shape[0]) != 40
    expected = oracle_stats(X[keep], w[keep], params)
    assert_stats_close(got, replace(expected, n_samples=X.shape[0]), 1e-10)


def test_infinite_value_is_refused_naming_its_row():
    params = make_params("full")
    X = sample_rows(params, 50, 20)
    X[3, 0] = np.nan
    X[7, 1] = -np.inf
    with pytest.raises(DataError, match=r"^row 107 holds an infinite value; only NaN marks"):
        kernels_missing.em_chunk_missing(X, None, 0, 100, params)
    with pytest.raises(DataError, match=r"^row 7 holds an infinite value"):
        kernels_missing.impute_block(X, params)


# ---------------------------------------------------------------------- EM
def em_fit(
    chunks: list[np.ndarray],
    params: GMMParams,
    max_iter: int,
    tol: float = 0.0,
    reg_covar: float = 1e-6,
) -> tuple[GMMParams, list[float]]:
    """EM in NumPy: `em_chunk_missing` over the chunks, summed, then `m_step`, until the
    lower bound changes by less than ``tol`` or ``max_iter`` iterations. Returns the last
    parameters and the lower bound of every iteration."""
    bounds: list[float] = []
    starts = np.cumsum([0] + [c.shape[0] for c in chunks])
    for _ in range(max_iter):
        stats = sum(
            (
                kernels_missing.em_chunk_missing(c, None, i, int(starts[i]), params)
                for i, c in enumerate(chunks)
            ),
            SuffStats.zero(params.n_components, params.n_features, params.covariance_type),
        )
        bounds.append(stats.mean_loglik)
        params = m_step(stats, params.means, reg_covar, params.covariance_type)
        if len(bounds) > 1 and abs(bounds[-1] - bounds[-2]) < tol:
            break
    return params, bounds


def truth_params(covariance_type: str, seed: int) -> GMMParams:
    """A mixture of three identifiable, correlated components (weights 0.5, 0.3, 0.2)."""
    rng = np.random.default_rng(seed)
    k, d = N_COMPONENTS, N_FEATURES
    covariances = random_covariances(rng, covariance_type, k, d, ridge=0.3)
    means = rng.normal(scale=3.0, size=(k, d))
    return GMMParams.from_covariances(
        np.array([0.5, 0.3, 0.2]), means, covariances, covariance_type
    )


def fit_errors(fit: GMMParams, reference: GMMParams) -> dict[str, float]:
    """How far ``fit`` is from ``reference``: largest weight difference, largest mean
    difference in units of the reference's standard deviation, normwise relative error
    of the covariances."""
    sd = np.sqrt(np.einsum("kii->ki", component_covariances(reference)))
    return {
        "weights": float(np.max(np.abs(fit.weights - reference.weights))),
        "means_sd": float(np.max(np.abs(fit.means - reference.means) / sd)),
        "covariances": float(
            np.max(np.abs(fit.covariances - reference.covariances))
            / np.max(np.abs(reference.covariances))
        ),
    }


MCAR_SAMPLES = 3000
MCAR_TOL = 1e-9
MCAR_MAX_ITER = 1000


def start_params(X: np.ndarray, covariance_type: str, seed: int) -> GMMParams:
    """Initial parameters from the observed values: random complete-ish rows as means
    (NaN filled by column means), the observed per-feature variances."""
    rng = np.random.default_rng(seed)
    col_mean = np.nanmean(X, axis=0)
    col_var = np.nanvar(X, axis=0)
    means = np.where(np.isnan(X), col_mean, X)[rng.choice(X.shape[0], N_COMPONENTS, replace=False)]
    k = N_COMPONENTS
    covariances = diagonal_covariances(col_var, covariance_type, k)
    return GMMParams.from_covariances(np.full(k, 1.0 / k), means, covariances, covariance_type)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_em_over_chunks_never_decreases_the_observed_data_log_likelihood(covariance_type):
    truth = make_params(covariance_type, seed=21)
    X = punch_holes(sample_rows(truth, 1500, 22), 0.3, 23)
    chunks = np.array_split(X, 4)
    _, bounds = em_fit(chunks, start_params(X, covariance_type, 24), 30)
    steps = np.diff(bounds)
    assert steps.min() >= -1e-10 * abs(bounds[-1]), (int(steps.argmin()), steps.min())
    assert bounds[-1] > bounds[0] + 0.1


# Bounds on the distance between the fit on data with missing values and the fit on the
# complete data (same start, same EM): a few times the sampling error of 3,000 rows, whose
# smallest component (600 rows) has means known to about 1/sqrt(600) = 0.04 sd.
MCAR_BOUNDS = {
    0.1: {"weights": 0.02, "means_sd": 0.1, "covariances": 0.1},
    0.4: {"weights": 0.03, "means_sd": 0.15, "covariances": 0.2},
}


@pytest.mark.parametrize("fraction", sorted(MCAR_BOUNDS))
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_fit_with_values_missing_at_random_is_close_to_the_complete_data_fit(
    covariance_type, fraction, parity_log
):
    truth = truth_params(covariance_type, 30)
    X = sample_rows(truth, MCAR_SAMPLES, 31)
    holes = punch_holes(X, fraction, 32)
    start = start_params(holes, covariance_type, 33)
    complete, _ = em_fit(np.array_split(X, 4), start, MCAR_MAX_ITER, MCAR_TOL)
    missing, bounds = em_fit(np.array_split(holes, 4), start, MCAR_MAX_ITER, MCAR_TOL)
    assert len(bounds) < MCAR_MAX_ITER  # converged
    mean_filled = np.where(np.isnan(holes), np.nanmean(holes, axis=0), holes)
    baseline, _ = em_fit(np.array_split(mean_filled, 4), start, MCAR_MAX_ITER, MCAR_TOL)
    errors = fit_errors(missing, complete)
    baseline_errors = fit_errors(baseline, complete)
    parity_log.record(
        f"missing {fraction:.0%}: EM vs complete",
        covariance_type,
        **errors,
        mean_imputed_covariances=baseline_errors["covariances"],
    )
    for name, bound in MCAR_BOUNDS[fraction].items():
        assert errors[name] <= bound, (name, errors, baseline_errors)
    # filling with column means shrinks the variances: EM must do better
    assert errors["covariances"] < baseline_errors["covariances"], (errors, baseline_errors)


@pytest.mark.parametrize("fraction", [0.1, 0.4])
def test_conditional_mean_imputation_beats_column_means_and_nearest_neighbours(
    fraction, parity_log
):
    truth = truth_params("full", 40)
    X = sample_rows(truth, MCAR_SAMPLES, 41)
    holes = punch_holes(X, fraction, 42)
    fitted, _ = em_fit(
        np.array_split(holes, 4), start_params(holes, "full", 43), MCAR_MAX_ITER, MCAR_TOL
    )
    subsample = np.random.default_rng(44).choice(MCAR_SAMPLES, 1500, replace=False)
    sub, truth_sub = holes[subsample], X[subsample]
    missing = np.isnan(sub)

    def rmse(imputed: np.ndarray) -> float:
        return float(np.sqrt(np.mean((imputed[missing] - truth_sub[missing]) ** 2)))

    table = {
        "mixture_em": rmse(kernels_missing.impute_block(sub, fitted)),
        "column_mean": rmse(np.where(missing, np.nanmean(holes, axis=0), sub)),
        "knn_5": rmse(KNNImputer(n_neighbors=5).fit_transform(sub)),
    }
    parity_log.record(f"missing {fraction:.0%}: imputation RMSE", "full", **table)
    assert table["mixture_em"] < table["column_mean"], table
    assert table["mixture_em"] < table["knn_5"], table


# ----------------------------------------------------------- through the graph
@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_one_pass_over_a_zarr_store_with_nan_equals_the_whole_array_statistics(
    covariance_type, write_zarr
):
    """`em_chunk_missing` is a chunk function like `kernels.em_chunk`: mapped by the graph
    layer over a real Zarr store with NaN (uneven chunks, tree reduction), it gives the
    statistics of the whole array in memory."""
    params = make_params(covariance_type, seed=28)
    X = punch_holes(sample_rows(params, 1000, 29), 0.25, 30)
    store = write_zarr(X, 130)
    w = np.random.default_rng(31).uniform(0.5, 1.5, X.shape[0])
    data = RowData(store.dask(), da.from_array(w, chunks=130), split_every=3)
    got = data.map_reduce(kernels_missing.em_chunk_missing, params)
    whole = kernels_missing.em_chunk_missing(X, w, 0, 0, params)
    assert_stats_close(got, whole, 1e-13)
    assert got.worst is not None and whole.worst is not None
    assert got.worst.index == whole.worst.index


def test_em_driver_served_by_passes_over_a_zarr_store_equals_the_numpy_em_loop(write_zarr):
    """`dask_em.em.run_em` unchanged, its E-steps answered by `em_chunk_missing` passes
    over a real Zarr store, follows the NumPy EM loop over the same chunks."""
    truth = truth_params("full", 32)
    X = punch_holes(sample_rows(truth, 1000, 33), 0.3, 34)
    store = write_zarr(X, 130)
    start = start_params(X, "full", 35)
    data = RowData(store.dask(), split_every=4)
    result = run_em(
        lambda p: data.map_reduce(kernels_missing.em_chunk_missing, p),
        EMResult(start),
        tol=0.0,
        max_iter=15,
        reg_covar=1e-6,
    )
    expected, bounds = em_fit(np.array_split(X, range(130, 1000, 130)), start, 15)
    assert data.n_passes == result.n_iter == 15
    np.testing.assert_allclose(result.lower_bounds, bounds, rtol=1e-12)
    errors = param_errors(result.params, expected)
    assert max(errors.values()) <= 1e-10, errors
