"""The `dask_em.GaussianMixture` user contract beyond the EM numbers.

Inputs (NumPy, Dask, ``zarr.Array``, path), lazy outputs for lazy inputs, agreement of
the inference methods with scikit-learn given the same fitted parameters, sampling,
warm starts, restarts, initializers, sample weights, caching, pass counting and the
errors a user gets for bad input.
"""

from __future__ import annotations

import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import dask_em
from dask_em.checkpoint import Checkpoint
from dask_em.errors import DataError
from dask_em.params import COVARIANCE_TYPES

FITTED = (
    "weights_",
    "means_",
    "covariances_",
    "precisions_",
    "precisions_cholesky_",
)


def quiet_fit(gm, X, **kw):
    """``gm.fit(X)`` ignoring ConvergenceWarning (for fits stopped by max_iter on purpose)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return gm.fit(X, **kw)


def sklearn_with_params_of(gm: dask_em.GaussianMixture) -> SkGaussianMixture:
    """A scikit-learn GaussianMixture holding the fitted parameters of ``gm``."""
    sk = SkGaussianMixture(gm.n_components, covariance_type=gm.covariance_type)
    for name in (*FITTED, "converged_", "n_iter_", "lower_bound_", "n_features_in_"):
        setattr(sk, name, getattr(gm, name))
    return sk


def assert_same_fit(a, b, rtol: float = 0.0) -> None:
    """Same fitted parameters and history (exactly equal when ``rtol`` is 0)."""
    for name in FITTED:
        np.testing.assert_allclose(
            getattr(a, name), getattr(b, name), rtol=rtol, atol=0, err_msg=name
        )
    assert a.n_iter_ == b.n_iter_
    assert a.converged_ == b.converged_
    np.testing.assert_allclose(a.lower_bounds_, b.lower_bounds_, rtol=rtol, atol=0)


@pytest.fixture
def fitted(mixture_zarr):
    """A dask-em model fitted on `mixture_zarr` (k-means init, random_state=0)."""
    return dask_em.GaussianMixture(4, random_state=0).fit(mixture_zarr.dask())


# -------------------------------------------------------------------- inference
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_inference_is_lazy_for_dask_input_and_agrees_with_numpy_and_sklearn(
    covariance_type, mixture_zarr
):
    gm = dask_em.GaussianMixture(4, covariance_type=covariance_type, random_state=0)
    gm.fit(mixture_zarr.dask())
    sk = sklearn_with_params_of(gm)
    X, Xd = mixture_zarr.X, mixture_zarr.dask()

    lazy = {
        "predict": gm.predict(Xd),
        "predict_proba": gm.predict_proba(Xd),
        "score_samples": gm.score_samples(Xd),
    }
    for name, value in lazy.items():
        assert isinstance(value, da.Array), name
        assert value.chunks[0] == Xd.chunks[0], name
    eager = {name: getattr(gm, name)(X) for name in lazy}
    for name, value in eager.items():
        assert type(value) is np.ndarray, name
        # chunk by chunk or all rows at once: the same per-row arithmetic
        np.testing.assert_allclose(lazy[name].compute(), value, rtol=1e-12, err_msg=name)

    proba = eager["predict_proba"]
    assert proba.shape == (2000, 4)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(eager["predict"], proba.argmax(axis=1))
    np.testing.assert_allclose(proba, sk.predict_proba(X), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(eager["score_samples"], sk.score_samples(X), rtol=1e-12)
    # rows where two components are equally likely to 1e-9 may legitimately differ
    decided = np.sort(proba, axis=1)[:, -1] - np.sort(proba, axis=1)[:, -2] > 1e-9
    np.testing.assert_array_equal(eager["predict"][decided], sk.predict(X)[decided])
    np.testing.assert_array_equal(gm.fit_predict(Xd).compute(), eager["predict"])


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_score_bic_aic_agree_with_sklearn_for_numpy_and_dask_input(covariance_type, mixture_zarr):
    gm = dask_em.GaussianMixture(3, covariance_type=covariance_type, random_state=1)
    gm.fit(mixture_zarr.X)
    sk = sklearn_with_params_of(gm)
    X = mixture_zarr.X
    for source in (X, mixture_zarr.dask(), mixture_zarr.path):
        score = gm.score(source)
        assert isinstance(score, float)
        np.testing.assert_allclose(score, sk.score(X), rtol=1e-12)
        np.testing.assert_allclose(gm.bic(source), sk.bic(X), rtol=1e-12)
        np.testing.assert_allclose(gm.aic(source), sk.aic(X), rtol=1e-12)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_sample_matches_sklearn_stream_shape_and_labels(covariance_type, mixture_zarr):
    gm = dask_em.GaussianMixture(4, covariance_type=covariance_type, random_state=7)
    gm.fit(mixture_zarr.X)
    X, y = gm.sample(5000)
    assert X.shape == (5000, 3) and y.shape == (5000,)
    assert set(np.unique(y)) <= set(range(4))
    np.testing.assert_allclose(np.bincount(y, minlength=4) / 5000, gm.weights_, atol=0.03)
    for k in range(4):  # each label's rows come from its component
        np.testing.assert_allclose(X[y == k].mean(axis=0), gm.means_[k], atol=0.25)
    sk = sklearn_with_params_of(gm)
    sk.random_state = 7
    X_sk, y_sk = sk.sample(5000)
    np.testing.assert_allclose(X, X_sk, rtol=1e-10)
    np.testing.assert_array_equal(y, y_sk)
    with pytest.raises(ValueError, match="n_samples"):
        gm.sample(0)


# ----------------------------------------------------------------------- inputs
def test_zarr_array_path_and_dask_inputs_give_the_same_fit(mixture_zarr):
    def fit(X):  # the same row chunks for every input type: one task per store chunk
        gm = dask_em.GaussianMixture(4, covariance_type="diag", random_state=3, chunk_rows=130)
        return gm.fit(X)

    from_dask = fit(mixture_zarr.dask())
    from_zarr = fit(mixture_zarr.open())
    from_path = fit(mixture_zarr.path)
    assert isinstance(mixture_zarr.open(), zarr.Array)
    assert_same_fit(from_zarr, from_dask)
    assert_same_fit(from_path, from_dask)
    assert from_path.n_features_in_ == 3
    assert isinstance(from_path.predict(mixture_zarr.path), da.Array)


def test_numpy_input_gives_the_same_fit_as_the_zarr_store_up_to_chunking(mixture_zarr, given_inits):
    inits = given_inits(mixture_zarr.X, 4, "full")
    a = dask_em.GaussianMixture(4, tol=1e-6, **inits).fit(mixture_zarr.X)
    b = dask_em.GaussianMixture(4, tol=1e-6, **inits).fit(mixture_zarr.path)
    assert_same_fit(a, b, rtol=1e-10)  # only the summation order differs


def test_features_split_over_chunks_are_merged(mixture_zarr, given_inits):
    inits = given_inits(mixture_zarr.X, 4, "full")
    a = dask_em.GaussianMixture(4, **inits).fit(mixture_zarr.dask())
    b = dask_em.GaussianMixture(4, **inits).fit(mixture_zarr.dask().rechunk((130, 1)))
    assert_same_fit(a, b)


# ---------------------------------------------------------------------- fitting
def test_warm_start_continues_where_the_previous_fit_stopped(mixture_zarr, given_inits):
    inits = given_inits(mixture_zarr.X, 4, "full")
    X = mixture_zarr.dask()
    straight = quiet_fit(dask_em.GaussianMixture(4, tol=0.0, max_iter=12, **inits), X)
    warm = dask_em.GaussianMixture(4, tol=0.0, max_iter=5, warm_start=True, **inits)
    quiet_fit(warm, X)
    first = list(warm.lower_bounds_)
    warm.set_params(max_iter=7)
    quiet_fit(warm, X)
    assert warm.n_iter_ == 7 and warm.n_passes_ == 7
    np.testing.assert_array_equal(first + warm.lower_bounds_, straight.lower_bounds_)
    for name in FITTED:
        np.testing.assert_array_equal(getattr(warm, name), getattr(straight, name), err_msg=name)


def test_warm_start_skips_initialization(mixture_zarr):
    gm = dask_em.GaussianMixture(4, warm_start=True, random_state=0, max_iter=3, tol=0.0)
    quiet_fit(gm, mixture_zarr.dask())
    assert gm.n_passes_ > gm.n_iter_  # k-means initialization passes
    quiet_fit(gm, mixture_zarr.dask())
    assert gm.n_passes_ == gm.n_iter_ == 3


def test_n_init_keeps_the_initialization_with_the_best_lower_bound(mixture_zarr):
    """``n_init`` restarts draw their seeds in turn from ``random_state``; the result is
    the run with the highest final lower bound among the single runs with those seeds."""
    X = mixture_zarr.dask()
    params = dict(n_components=4, init_params="random", max_iter=15, tol=1e-3)

    def random_state_after(draws: int) -> np.random.RandomState:
        rs = np.random.RandomState(11)
        for _ in range(draws):
            rs.randint(np.iinfo(np.int32).max)
        return rs

    singles = [
        quiet_fit(dask_em.GaussianMixture(**params, random_state=random_state_after(i)), X)
        for i in range(4)
    ]
    bounds = [s.lower_bound_ for s in singles]
    assert len(set(bounds)) == 4, "the restarts must end at different lower bounds"
    best = quiet_fit(dask_em.GaussianMixture(**params, n_init=4, random_state=11), X)
    assert best.lower_bound_ == max(bounds)
    assert_same_fit(best, singles[int(np.argmax(bounds))])
    assert best.lower_bound_ > bounds[0]


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random", "random_from_data"])
@pytest.mark.parametrize("covariance_type", ["full", "spherical"])
def test_every_initializer_works_and_is_deterministic_under_random_state(
    init_params, covariance_type, mixture_zarr
):
    def fit(random_state):
        gm = dask_em.GaussianMixture(
            4,
            covariance_type=covariance_type,
            init_params=init_params,
            random_state=random_state,
            max_iter=300,
        )
        return gm.fit(mixture_zarr.path)

    a, b, other = fit(5), fit(5), fit(6)
    assert a.converged_
    assert_same_fit(a, b)
    np.testing.assert_allclose(a.weights_.sum(), 1.0, rtol=1e-12)
    assert np.isfinite(a.lower_bound_)
    assert a.lower_bounds_[-1] == a.lower_bound_
    # a different seed starts elsewhere
    assert a.lower_bounds_[0] != other.lower_bounds_[0]


def test_integer_sample_weights_equal_repeated_rows(mixture_zarr, given_inits):
    w = np.random.default_rng(0).integers(0, 4, size=2000)
    inits = given_inits(mixture_zarr.X, 4, "diag")
    params = dict(n_components=4, covariance_type="diag", tol=1e-6, **inits)
    weighted = dask_em.GaussianMixture(**params).fit(mixture_zarr.dask(), sample_weight=w)
    repeated = dask_em.GaussianMixture(**params).fit(np.repeat(mixture_zarr.X, w, axis=0))
    assert weighted.n_iter_ >= 10
    assert_same_fit(weighted, repeated, rtol=1e-9)
    # a Dask array of weights, chunked unlike X, gives the same
    w_dask = da.from_array(w.astype(float), chunks=333)
    same = dask_em.GaussianMixture(**params).fit(mixture_zarr.dask(), sample_weight=w_dask)
    assert_same_fit(same, weighted, rtol=1e-12)


@pytest.mark.parametrize("init_params", ["kmeans", "random_from_data"])
def test_cache_options_give_identical_results(init_params, mixture_zarr):
    fits = [
        dask_em.GaussianMixture(4, init_params=init_params, random_state=2, cache=cache).fit(
            mixture_zarr.path
        )
        for cache in (True, False, "auto")
    ]
    for other in fits[1:]:
        assert_same_fit(other, fits[0])
        assert other.n_passes_ == fits[0].n_passes_


def test_passes_are_counted(mixture_zarr, given_inits):
    X = mixture_zarr.dask()
    given = dask_em.GaussianMixture(4, **given_inits(mixture_zarr.X, 4, "full")).fit(X)
    assert given.n_passes_ == given.n_iter_
    random = dask_em.GaussianMixture(4, init_params="random", random_state=0).fit(X)
    assert random.n_passes_ == random.n_iter_ + 1
    restarts = dask_em.GaussianMixture(
        4, init_params="random_from_data", n_init=3, random_state=0, max_iter=4
    )
    quiet_fit(restarts, X)
    # the 3 runs share every pass: 4 iterations, no initialization pass
    assert restarts.n_passes_ == 4


@pytest.mark.parametrize(("acceleration", "tol"), [(None, 0.0), ("squarem", 1e-6)])
def test_restarts_share_passes_and_each_run_is_what_it_is_alone(
    mixture_zarr, tmp_path, acceleration, tol
):
    """The ``n_init`` runs share every pass, and each ends exactly where it would alone.

    With a fixed iteration budget (``tol=0``), ``n_init=5`` reads the data no more than
    ``n_init=1`` plus one pass per candidate (only k-means initializations that stop
    after different numbers of Lloyd passes differ). With a tolerance, each run stops at
    its own convergence, so the passes are those of the slowest run: far fewer than 5
    runs one after the other."""
    X = mixture_zarr.path
    kw = dict(n_components=4, random_state=0, tol=tol, max_iter=40, acceleration=acceleration)
    alone = quiet_fit(dask_em.GaussianMixture(**kw), X)
    shared = quiet_fit(dask_em.GaussianMixture(**kw, n_init=5, checkpoint_dir=tmp_path / "c"), X)
    if tol == 0.0:
        assert shared.n_passes_ <= alone.n_passes_ + 5
    else:
        assert shared.n_passes_ < 2 * alone.n_passes_
    final = Checkpoint(tmp_path / "c", {}).load(check_fingerprint=False)
    assert final is not None and final.state.done and len(final.state.runs) == 5
    first = final.state.run(0)  # the first seed is the one n_init=1 uses
    assert first.n_iter == alone.n_iter_ and first.lower_bounds == alone.lower_bounds_
    np.testing.assert_array_equal(first.params.means, alone.means_)
    np.testing.assert_array_equal(first.params.covariances, alone.covariances_)
    np.testing.assert_array_equal(shared.means_, final.state.best.params.means)
    assert shared.lower_bound_ == max(r.lower_bound for r in final.state.runs)
    assert len({r.lower_bound for r in final.state.runs}) > 1  # the seeds really differ


def test_dask_input_follows_the_active_scheduler(mixture_zarr):
    # the same fit on the synchronous and threaded schedulers
    fits = []
    for scheduler in ("sync", "threads"):
        with dask.config.set(scheduler=scheduler):
            fits.append(dask_em.GaussianMixture(4, random_state=0).fit(mixture_zarr.path))
    assert_same_fit(*fits)


# ----------------------------------------------------------------------- errors
def test_fewer_samples_than_components_is_refused(write_zarr):
    data = write_zarr(np.random.default_rng(0).normal(size=(5, 2)), 2)
    with pytest.raises(ValueError, match="n_samples >= n_components"):
        dask_em.GaussianMixture(6).fit(data.path)
    with pytest.raises(ValueError, match="n_samples >= n_components"):
        dask_em.GaussianMixture(6).fit(data.X)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("n_components", 0),
        ("n_components", 1.5),
        ("covariance_type", "banded"),
        ("tol", -1.0),
        ("reg_covar", -1e-6),
        ("max_iter", -1),
        ("n_init", 0),
        ("init_params", "kmedoids"),
        ("cache", "sometimes"),
        ("split_every", 1),
        ("verbose_interval", 0),
    ],
)
def test_bad_hyper_parameters_are_refused_naming_the_parameter(name, value, mixture_zarr):
    gm = dask_em.GaussianMixture(2).set_params(**{name: value})
    with pytest.raises(ValueError, match=name):
        gm.fit(mixture_zarr.path)


@pytest.mark.parametrize(
    ("covariance_type", "shape"),
    [("full", (4, 3, 2)), ("tied", (4, 3, 3)), ("diag", (4,)), ("spherical", (4, 3))],
)
def test_wrong_precisions_init_shape_is_refused(covariance_type, shape, mixture_zarr):
    gm = dask_em.GaussianMixture(4, covariance_type=covariance_type, precisions_init=np.ones(shape))
    with pytest.raises(ValueError, match=r"precision' should have the shape"):
        gm.fit(mixture_zarr.path)


def test_bad_weights_and_means_init_are_refused(mixture_zarr):
    with pytest.raises(ValueError, match="normalized"):
        dask_em.GaussianMixture(2, weights_init=[0.2, 0.2]).fit(mixture_zarr.path)
    with pytest.raises(ValueError, match="'means' should have the shape"):
        dask_em.GaussianMixture(2, means_init=np.zeros((2, 5))).fit(mixture_zarr.path)
    with pytest.raises(ValueError, match="positive-definite"):
        dask_em.GaussianMixture(2, covariance_type="tied", precisions_init=-np.eye(3)).fit(
            mixture_zarr.path
        )


@pytest.mark.parametrize("init_params", ["kmeans", "given"])
def test_nan_in_a_zarr_chunk_raises_data_error_naming_the_chunk_and_row(
    init_params, mixture_zarr, given_inits
):
    z = zarr.open_array(mixture_zarr.path, mode="r+")
    z[5 * 130 + 17, 2] = np.nan  # in store chunk 5
    kw = given_inits(mixture_zarr.X, 4, "full") if init_params == "given" else {}
    gm = dask_em.GaussianMixture(4, random_state=0, cache=False, chunk_rows=130, **kw)
    with pytest.raises(DataError, match=r"chunk 5\b.*NaN.*first at row 667\b"):
        gm.fit(mixture_zarr.path)


def test_bad_sample_weight_is_refused(mixture_zarr):
    gm = dask_em.GaussianMixture(2)
    with pytest.raises(ValueError, match="negative"):
        gm.fit(mixture_zarr.path, sample_weight=-np.ones(2000))
    with pytest.raises(ValueError, match="one weight per row"):
        gm.fit(mixture_zarr.path, sample_weight=np.ones(1999))
    with pytest.raises(ValueError, match="sums to zero"):
        gm.fit(mixture_zarr.path, sample_weight=np.zeros(2000))


@pytest.mark.parametrize("init_params", ["kmeans", "random", "given"])
@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf])
def test_bad_lazy_sample_weight_raises_data_error_naming_the_chunk(
    init_params, bad, mixture_zarr, given_inits
):
    w = np.ones(2000)
    w[4 * 130 + 1] = bad  # chunk 4 of the weights, chunked like the data
    kw = given_inits(mixture_zarr.X, 4, "full") if init_params == "given" else {}
    gm = dask_em.GaussianMixture(
        4, init_params="random" if init_params == "random" else "kmeans", random_state=0, **kw
    )
    with pytest.raises(DataError, match=r"chunk 4 has 1 sample weight"):
        gm.fit(mixture_zarr.dask(), sample_weight=da.from_array(w, chunks=130))


@pytest.mark.parametrize("init_params", ["kmeans", "random_from_data"])
def test_lazy_sample_weights_summing_to_zero_are_refused(init_params, mixture_zarr):
    gm = dask_em.GaussianMixture(2, init_params=init_params, random_state=0)
    with pytest.raises(DataError, match="sums to zero"):
        gm.fit(mixture_zarr.dask(), sample_weight=da.zeros(2000, chunks=130))


def test_non_2d_or_non_numeric_zarr_data_is_refused(tmp_path):
    one_d = zarr.create_array(store=str(tmp_path / "a.zarr"), shape=(10,), chunks=(5,), dtype="f8")
    with pytest.raises(DataError, match="2-D"):
        dask_em.GaussianMixture(2).fit(one_d)
    with pytest.raises(DataError, match="no such file"):
        dask_em.GaussianMixture(2).fit(str(tmp_path / "missing.zarr"))


def test_predicting_with_other_number_of_features_is_refused(fitted, mixture_zarr):
    with pytest.raises(ValueError, match="features"):
        fitted.predict(da.from_array(np.zeros((10, 2))))
    with pytest.raises(ValueError, match="features"):
        fitted.predict(np.zeros((10, 2)))


# ------------------------------------------------------------------ degenerate
def test_collapsed_component_without_regularization_gives_the_actionable_error(write_zarr):
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(size=(300, 2)), np.full((40, 2), 8.0)])  # 40 identical rows
    data = write_zarr(X, 70)
    gm = dask_em.GaussianMixture(
        2,
        covariance_type="full",
        reg_covar=0.0,
        weights_init=[0.5, 0.5],
        means_init=[[0.0, 0.0], [8.0, 8.0]],
        precisions_init=np.stack([np.eye(2)] * 2),
    )
    with pytest.raises(ValueError, match="increase reg_covar"):
        gm.fit(data.path)
