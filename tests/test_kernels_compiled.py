"""The compiled E-step (`dask_em.kernels_compiled`, the ``fast`` extra) against the NumPy one.

Both paths of `dask_em.kernels.em_chunk` run on the same chunks: full covariances with
D up to `kernels_compiled.MAX_FEATURES`, with and without sample weights, rows far from
the origin, rows that no component explains, ragged tiles and empty chunks. They agree
to rounding (the compiled kernel adds the same terms in another order). The parity and
robustness suites run with whichever path is active (the compiled one where numba is
installed).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from oracle import random_covariances
from test_kernels_stats import assert_stats_close

from dask_em import kernels, kernels_compiled
from dask_em.errors import DataError
from dask_em.params import GMMParams

needs_numba = pytest.mark.skipif(
    not kernels_compiled.available, reason="numba is not installed (the fast extra)"
)


def _mixture(n_rows: int, n_features: int, n_components: int, seed: int, offset: float = 0.0):
    """Rows of a random mixture and arbitrary (not fitted) full-covariance parameters."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=3.0, size=(n_components, n_features)) + offset
    X = centers[rng.integers(n_components, size=n_rows)] + rng.normal(size=(n_rows, n_features))
    covariances = random_covariances(rng, "full", n_components, n_features)
    params = GMMParams.from_covariances(
        rng.dirichlet(np.full(n_components, 2.0)),
        centers + rng.normal(scale=0.5, size=centers.shape),
        covariances,
        "full",
    )
    return X, params


def _both_paths(X, w, params, chunk_index=0, row_start=0):
    with kernels.compiled_kernels(False):
        numpy_stats = kernels.em_chunk(X, w, chunk_index, row_start, params)
    with kernels.compiled_kernels(True):
        assert kernels._compiled_applies(params, kernels._Projection.of(params, X))
        compiled_stats = kernels.em_chunk(X, w, chunk_index, row_start, params)
    return numpy_stats, compiled_stats


@needs_numba
@pytest.mark.parametrize("n_features", [1, 2, 8, 16])
@pytest.mark.parametrize("n_rows", [1, 128, 129, 5000])  # tiles of 128 rows
@pytest.mark.parametrize("weighted", [False, True])
def test_compiled_em_chunk_equals_numpy_em_chunk(n_features, n_rows, weighted):
    X, params = _mixture(n_rows, n_features, 5, seed=n_features + n_rows)
    w = np.random.default_rng(3).uniform(0, 3, size=n_rows) if weighted else None
    numpy_stats, compiled_stats = _both_paths(X, w, params, 2, 777)
    assert_stats_close(compiled_stats, numpy_stats, rtol=1e-12)
    assert compiled_stats.worst.index == numpy_stats.worst.index
    assert compiled_stats.worst.weight == numpy_stats.worst.weight
    np.testing.assert_array_equal(compiled_stats.worst.row, numpy_stats.worst.row)


@needs_numba
def test_compiled_em_chunk_is_accurate_far_from_the_origin():
    X, params = _mixture(3000, 6, 4, seed=1, offset=1e6)
    numpy_stats, compiled_stats = _both_paths(X, None, params)
    assert_stats_close(compiled_stats, numpy_stats, rtol=1e-12)


@needs_numba
def test_compiled_em_chunk_skips_zero_weight_rows_for_the_worst_fit():
    X, params = _mixture(500, 4, 3, seed=2)
    X[10] += 50.0  # the worst-fitted row, but of weight zero
    w = np.ones(500)
    w[10] = 0.0
    numpy_stats, compiled_stats = _both_paths(X, w, params)
    assert compiled_stats.worst.index == numpy_stats.worst.index != 10
    assert_stats_close(compiled_stats, numpy_stats, rtol=1e-12)


@needs_numba
def test_compiled_em_chunk_of_no_rows_is_zero():
    X, params = _mixture(0, 3, 2, seed=4)
    numpy_stats, compiled_stats = _both_paths(X, None, params)
    assert_stats_close(compiled_stats, numpy_stats, rtol=0.0)
    assert compiled_stats.worst is None


@needs_numba
def test_compiled_em_chunk_names_the_chunk_holding_nan():
    X, params = _mixture(300, 3, 2, seed=5)
    X[117, 1] = np.nan
    with kernels.compiled_kernels(True), pytest.raises(DataError, match=r"chunk 7 .*row 1517"):
        kernels.em_chunk(X, None, 7, 1400, params)


@needs_numba
def test_compiled_em_chunk_reports_rows_too_far_for_the_working_precision():
    X, params = _mixture(300, 3, 2, seed=6)
    X[5] = 1e200  # finite, but its log-density under every component is -inf
    with (
        kernels.compiled_kernels(True),
        pytest.raises(DataError, match="non-finite log-likelihood"),
    ):
        kernels.em_chunk(X, None, 0, 0, params)


@needs_numba
def test_vectorized_exp_is_within_one_ulp_of_numpy():
    rng = np.random.default_rng(8)
    x = np.concatenate(
        [
            np.linspace(-708.0, 0.0, 200_001),
            -rng.exponential(3.0, 100_000),
            -rng.uniform(0.0, 1e-6, 1000),
            [0.0, -0.0, -5e-324, -np.log(2.0), -700.0, np.nextafter(-700.0, 0.0)],
        ]
    )
    got, want = kernels_compiled.exp_nonpositive(x), np.exp(x)
    ulps = np.abs(got - want) / np.spacing(want)
    assert ulps.max() <= 1.0
    assert np.mean(ulps) < 0.2  # mostly correctly rounded, not merely within 1 ulp


@needs_numba
def test_vectorized_exp_at_the_ends_of_its_range():
    x = np.array([-np.inf, np.nan, -745.0, -744.0, -720.0, -1399.0, -1400.5, -1e300])
    got, want = kernels_compiled.exp_nonpositive(x), np.exp(x)
    assert got[0] == 0.0 and np.isnan(got[1])
    # subnormal results: within one step of the smallest subnormal; underflow to exact 0
    np.testing.assert_allclose(got[2:], want[2:], rtol=0, atol=np.spacing(0.0))
    assert np.all(got[5:] == 0.0)


@needs_numba
def test_compiled_kernel_keeps_numpy_semantics_for_an_infinite_density():
    # +inf log-densities fall outside the vectorized exp's domain: np.exp serves them.
    X, params = _mixture(200, 3, 2, seed=9)
    U = params.precisions_cholesky
    center = X.mean(axis=0)
    b = np.einsum("kd,kde->ke", params.means - center, U)
    const = np.array([np.inf, 0.0])
    norm, *_ = kernels_compiled.em_full(X, None, center, U, b, const)
    assert np.all(norm == np.inf)


@needs_numba
@pytest.mark.parametrize(
    ("dtype", "covariance_type", "n_features"),
    [(np.float32, "full", 4), (np.float64, "diag", 4), (np.float64, "full", 17)],
)
def test_numpy_path_serves_chunks_the_compiled_kernel_does_not_take(
    dtype, covariance_type, n_features
):
    rng = np.random.default_rng(7)
    X = rng.normal(size=(200, n_features)).astype(dtype)
    params = GMMParams.from_covariances(
        np.full(2, 0.5),
        rng.normal(size=(2, n_features)),
        random_covariances(rng, covariance_type, 2, n_features),
        covariance_type,
    )
    with kernels.compiled_kernels(True):
        assert not kernels._compiled_applies(params, kernels._Projection.of(params, X))


def test_numpy_kernel_serves_every_chunk_without_numba(tmp_path):
    # A fresh interpreter in which numba cannot be imported (as without the fast extra).
    script = (
        "import sys; sys.modules['numba'] = None\n"
        "import numpy as np\n"
        "from dask_em import kernels, kernels_compiled\n"
        "from dask_em.params import GMMParams\n"
        "assert not kernels_compiled.available and not kernels._use_compiled\n"
        "params = GMMParams.from_covariances(np.full(2, 0.5), np.eye(2), np.stack([np.eye(2)] * 2), 'full')\n"
        "X = np.random.default_rng(0).normal(size=(300, 2))\n"
        "assert not kernels._compiled_applies(params, kernels._Projection.of(params, X))\n"
        "print(kernels.em_chunk(X, None, 0, 0, params).n.sum())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert float(out.stdout) == pytest.approx(300.0)
