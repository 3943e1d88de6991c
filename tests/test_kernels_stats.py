"""The NumPy core: log-densities, responsibilities, additive statistics and the M-step.

The central invariant (pomegranate's ``test_summarize``, Spark's ``ExpectationSum``
monoid): the statistics of any partition of the rows into chunks, with any non-negative
sample weights, add up (`SuffStats.__add__`, in any grouping) to the statistics of the
whole. It is checked with hypothesis over random split points and weights, for the
kernel alone and through the Dask tree reduction of `RowData.map_reduce` with various
``split_every`` and chunkings.
"""

from __future__ import annotations

import functools
import operator

import dask
import dask.array as da
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import dense_covariances, fit_sklearn, random_covariances, second_moments
from scipy import stats as sps

from dask_em import init_kernels, kernels
from dask_em.errors import DataError
from dask_em.params import (
    COVARIANCE_TYPES,
    GMMParams,
    covariance_kind,
    covariance_shape,
    covariances_from_precisions_cholesky,
    n_parameters,
    precisions_cholesky_from_covariances,
    precisions_from_cholesky,
    second_moment_shape,
)
from dask_em.reduce import RowData
from dask_em.stats import SuffStats, m_step

N_ROWS = 5000  # more than kernels.BLOCK_ROWS, so the whole crosses a block boundary
N_FEATURES = 3
N_COMPONENTS = 4


def _data() -> np.ndarray:
    rng = np.random.default_rng(42)
    centers = rng.normal(scale=3.0, size=(N_COMPONENTS, N_FEATURES))
    return centers[rng.integers(N_COMPONENTS, size=N_ROWS)] + rng.normal(size=(N_ROWS, N_FEATURES))


X_DATA = _data()


def make_params(covariance_type: str, seed: int = 0, n_features: int = N_FEATURES) -> GMMParams:
    """Arbitrary valid (not fitted) mixture parameters of a covariance type."""
    rng = np.random.default_rng(seed)
    k, d = N_COMPONENTS, n_features
    weights = rng.dirichlet(np.full(k, 2.0))
    means = rng.normal(scale=3.0, size=(k, d))
    covariances = random_covariances(rng, covariance_type, k, d)
    return GMMParams.from_covariances(weights, means, covariances, covariance_type)


def naive_stats(X: np.ndarray, w: np.ndarray | None, params: GMMParams) -> SuffStats:
    """Statistics computed the obvious way from SciPy densities (the oracle)."""
    covs = dense_covariances(params.covariances, params.covariance_type, *params.means.shape)
    log_dens = np.stack(
        [sps.multivariate_normal(m, c).logpdf(X) for m, c in zip(params.means, covs, strict=True)],
        axis=1,
    ) + np.log(params.weights)
    norm = np.logaddexp.reduce(log_dens, axis=1)
    resp = np.exp(log_dens - norm[:, None])
    w = np.ones(X.shape[0]) if w is None else w
    r = resp * w[:, None]
    diff = X[:, None, :] - params.means[None]  # (n, K, D)
    n = r.sum(axis=0)
    s1 = np.einsum("nk,nkd->kd", r, diff)
    outer = np.einsum("nk,nki,nkj->kij", r, diff, diff)
    s2 = second_moments(outer, params.covariance_type)
    return SuffStats(n, s1, s2, float(norm @ w), float(w.sum()), X.shape[0])


def assert_stats_close(actual: SuffStats, expected: SuffStats, rtol: float) -> None:
    """Each statistic equal to ``rtol`` relative to its own magnitude (normwise)."""
    for name in ("n", "s1", "s2", "loglik", "weight_sum"):
        a = np.asarray(getattr(actual, name))
        e = np.asarray(getattr(expected, name))
        assert a.shape == e.shape, name
        scale = max(float(np.max(np.abs(e))), 1e-300)
        np.testing.assert_allclose(a, e, rtol=0, atol=rtol * scale, err_msg=name)
    assert actual.n_samples == expected.n_samples


# ------------------------------------------------------------------ densities
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_log_gaussian_prob_equals_scipy_logpdf(covariance_type):
    params = make_params(covariance_type)
    X = X_DATA[:500]
    covs = dense_covariances(params.covariances, covariance_type, *params.means.shape)
    expected = np.stack(
        [sps.multivariate_normal(m, c).logpdf(X) for m, c in zip(params.means, covs, strict=True)],
        axis=1,
    )
    got = kernels.log_gaussian_prob(X, params.means, params.precisions_cholesky, covariance_type)
    assert got.shape == (500, N_COMPONENTS)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_responsibilities_are_normalized_and_finite_far_from_every_component(covariance_type):
    params = make_params(covariance_type)
    far = X_DATA[:100] + 1e3  # every linear-space density underflows to 0 here
    norm, log_resp = kernels.log_prob_resp(far, params)
    assert np.all(np.isfinite(norm)) and np.all(norm < -1e4)
    assert np.all(np.isfinite(log_resp))
    np.testing.assert_allclose(np.exp(log_resp).sum(axis=1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_covariance_table_gives_sklearns_shapes_and_parameter_count(covariance_type):
    sk = fit_sklearn(
        X_DATA[:500], n_components=N_COMPONENTS, covariance_type=covariance_type, max_iter=1
    )
    shape = covariance_shape(covariance_type, N_COMPONENTS, N_FEATURES)
    assert sk.covariances_.shape == sk.precisions_cholesky_.shape == shape
    assert n_parameters(N_COMPONENTS, N_FEATURES, covariance_type) == sk._n_parameters()
    kind = covariance_kind(covariance_type)
    assert kind.matrix == (sk.covariances_.shape[-2:] == (N_FEATURES, N_FEATURES))
    assert kind.shared == (sk.covariances_.shape[0] != N_COMPONENTS)
    stats = kernels.em_chunk(X_DATA[:500], None, 0, 0, make_params(covariance_type))
    assert stats.s2.shape == second_moment_shape(covariance_type, N_COMPONENTS, N_FEATURES)


def test_an_unknown_covariance_type_is_named_with_the_valid_ones():
    with pytest.raises(ValueError, match="'ful'.*full, tied, diag, spherical"):
        covariance_kind("ful")


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_precision_cholesky_round_trips_to_covariances(covariance_type):
    params = make_params(covariance_type)
    u = precisions_cholesky_from_covariances(params.covariances, covariance_type)
    np.testing.assert_allclose(
        covariances_from_precisions_cholesky(u, covariance_type), params.covariances, rtol=1e-12
    )
    from_prec = GMMParams.from_precisions(
        params.weights, params.means, precisions_from_cholesky(u, covariance_type), covariance_type
    )
    np.testing.assert_allclose(from_prec.precisions_cholesky, u, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(from_prec.covariances, params.covariances, rtol=1e-10)


# ------------------------------------------------------------------ statistics
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_em_chunk_statistics_equal_the_naive_formulas(covariance_type, weighted):
    params = make_params(covariance_type)
    X = X_DATA[:700]
    w = np.random.default_rng(1).uniform(0, 3, size=700) if weighted else None
    got = kernels.em_chunk(X, w, 0, 0, params)
    assert_stats_close(got, naive_stats(X, w, params), rtol=1e-11)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float32_chunks_give_float64_statistics_close_to_float64_input(covariance_type):
    params = make_params(covariance_type)
    X32 = X_DATA.astype(np.float32)
    got = kernels.em_chunk(X32, None, 0, 0, params)
    for name in ("n", "s1", "s2"):
        assert getattr(got, name).dtype == np.float64
    # Products run in float32 (unit roundoff 6e-8); statistics of the same values in
    # float64 agree to a few hundred float32 ulps of each statistic's magnitude.
    assert_stats_close(got, kernels.em_chunk(X32.astype(np.float64), None, 0, 0, params), 1e-5)


def test_zero_statistics_are_neutral_and_addition_checks_shapes():
    params = make_params("diag")
    s = kernels.em_chunk(X_DATA[:50], None, 0, 0, params)
    zero = SuffStats.zero(N_COMPONENTS, N_FEATURES, "diag")
    for total in (s + zero, zero + s):
        assert_stats_close(total, s, rtol=0.0)
    with pytest.raises(ValueError, match="different shapes"):
        s + SuffStats.zero(N_COMPONENTS, N_FEATURES, "full")
    with pytest.raises(ValueError):  # immutable arrays: statistics are values
        s.n[0] = 1.0


def test_em_chunk_names_the_chunk_holding_nan():
    X = X_DATA[:200].copy()
    X[17, 1] = np.nan
    with pytest.raises(DataError, match=r"chunk 7 .*1 row"):
        kernels.em_chunk(X, None, 7, 1400, make_params("full"))


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_m_step_of_hard_assignment_gives_per_cluster_mean_and_covariance(covariance_type):
    X = X_DATA
    labels = np.random.default_rng(5).integers(N_COMPONENTS, size=N_ROWS)
    centers = np.stack([X[labels == k].mean(axis=0) for k in range(N_COMPONENTS)]) + 0.3
    stats = init_kernels.hard_assign_chunk(X, None, 0, 0, centers, covariance_type)
    closest = np.argmin(((X[:, None, :] - centers[None]) ** 2).sum(axis=2), axis=1)
    reg = 1e-6
    params = m_step(stats, centers, reg, covariance_type)
    nk = np.bincount(closest, minlength=N_COMPONENTS).astype(float)
    means = np.stack([X[closest == k].mean(axis=0) for k in range(N_COMPONENTS)])
    covs = np.stack([np.cov(X[closest == k], rowvar=False, bias=True) for k in range(N_COMPONENTS)])
    expected_cov = {
        "full": covs + reg * np.eye(N_FEATURES),
        "tied": np.einsum("k,kij->ij", nk, covs) / nk.sum() + reg * np.eye(N_FEATURES),
        "diag": np.einsum("kii->ki", covs) + reg,
        "spherical": np.einsum("kii->ki", covs).mean(axis=1) + reg,
    }[covariance_type]
    np.testing.assert_allclose(params.weights, nk / nk.sum(), rtol=1e-12)
    np.testing.assert_allclose(params.means, means, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(params.covariances, expected_cov, rtol=1e-11, atol=1e-13)


# ------------------------------------------------------------------ additivity
split_points = st.lists(st.integers(1, N_ROWS - 1), max_size=12, unique=True).map(sorted)
weight_specs = st.one_of(
    st.none(),
    st.tuples(st.integers(0, 2**31), st.floats(0.0, 0.9)),  # (seed, fraction of zero weights)
)


def make_weights(spec: tuple[int, float] | None) -> np.ndarray | None:
    """Non-negative weights from a hypothesis spec: uniform in [0, 5), some exactly zero."""
    if spec is None:
        return None
    seed, zero_fraction = spec
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.0, 5.0, size=N_ROWS)
    w[rng.uniform(size=N_ROWS) < zero_fraction] = 0.0
    return w


def chunk_sizes(points: list[int]) -> tuple[int, ...]:
    bounds = [0, *points, N_ROWS]
    return tuple(int(b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True))


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(points=split_points, weight_spec=weight_specs, grouping_seed=st.integers(0, 2**31))
def test_statistics_of_any_chunking_add_up_to_those_of_the_whole(
    covariance_type, points, weight_spec, grouping_seed
):
    params = make_params(covariance_type, seed=1)
    w = make_weights(weight_spec)
    whole = kernels.em_chunk(X_DATA, w, 0, 0, params)
    bounds = [0, *points, N_ROWS]
    parts = [
        kernels.em_chunk(X_DATA[a:b], None if w is None else w[a:b], i, a, params)
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
    ]
    left_to_right = functools.reduce(operator.add, parts)
    # any grouping: add random adjacent pairs until one value is left
    rng = np.random.default_rng(grouping_seed)
    grouped = list(parts)
    while len(grouped) > 1:
        j = int(rng.integers(len(grouped) - 1))
        grouped[j : j + 2] = [grouped[j] + grouped[j + 1]]
    assert_stats_close(left_to_right, whole, rtol=1e-11)
    assert_stats_close(grouped[0], whole, rtol=1e-11)
    assert left_to_right.n_samples == N_ROWS


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    points=split_points,
    weight_points=split_points,
    weight_spec=weight_specs,
    split_every=st.integers(2, 9),
)
def test_tree_reduction_equals_whole_data_statistics(
    covariance_type, points, weight_points, weight_spec, split_every
):
    params = make_params(covariance_type, seed=2)
    w = make_weights(weight_spec)
    X = da.from_array(X_DATA, chunks=(chunk_sizes(points), N_FEATURES))
    # weights chunked differently from X: RowData must align them with the row chunks
    wd = None if w is None else da.from_array(w, chunks=(chunk_sizes(weight_points),))
    data = RowData(X, wd, split_every=split_every)
    with dask.config.set(scheduler="threads"):
        reduced = data.map_reduce(kernels.em_chunk, params)
    assert data.n_passes == 1
    assert_stats_close(reduced, kernels.em_chunk(X_DATA, w, 0, 0, params), rtol=1e-11)


@pytest.mark.parametrize("split_every", [2, 3, 8, 64])
def test_reduction_result_does_not_depend_on_split_every(split_every):
    params = make_params("full", seed=3)
    X = da.from_array(X_DATA, chunks=(97, N_FEATURES))  # 52 chunks, uneven last one
    reduced = RowData(X, split_every=split_every).map_reduce(kernels.em_chunk, params)
    whole = kernels.em_chunk(X_DATA, None, 0, 0, params)
    assert_stats_close(reduced, whole, rtol=1e-11)
