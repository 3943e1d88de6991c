"""A component that loses all its mass is re-seeded, deterministically and with a warning.

The strategy (`dask_em.reseed`, README "Differences from scikit-learn"): after the
M-step of an iteration in which a component's mass fell below 1e-6 of a row, the first
such component moves to the row the E-step fitted worst, with the other components'
weighted mean covariance and the row's share of the weight, if that fits the row better
than the mixture did. The tests check it against an independent computation and
scikit-learn:

- a component initialized 1e6 away from the data (all four covariance types): dask-em's
  first lower bound equals scikit-learn's; the re-seeded parameters equal those computed
  here from scikit-learn's first M-step and the worst row found with SciPy; from there
  the whole remaining trajectory (every lower bound, the final parameters, the number of
  iterations) equals scikit-learn's started from those parameters, to a relative 1e-7;
- duplicated points with more components than distinct points: finite, valid mixtures;
  at most one re-seed per iteration and never a loop of them; the lower bound never
  decreases except right after a re-seed;
- with SQUAREM and across a checkpoint resume at the re-seeded iteration: the same
  re-seed, a valid fit, and a resumed fit equal to the uninterrupted one;
- the kernel's worst row ignores rows of zero weight and does not depend on chunking;
- `reseed` leaves a component empty when re-seeding would not fit the worst row better.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from cli_helpers import assert_same_fit
from oracle import (
    assert_no_nan,
    dense_covariances,
    fit_sklearn,
    norm_rel_err,
    rel_err,
    same_inits,
    zarr_dask,
)
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import dask_em
from dask_em import kernels
from dask_em.checkpoint import Checkpoint
from dask_em.errors import EmptyComponentWarning
from dask_em.params import COVARIANCE_TYPES, GMMParams
from dask_em.reseed import reseed
from dask_em.stats import SuffStats, WorstFit

RTOL = 1e-7
TOL = 1e-8
MAX_ITER = 300
N = 400
FAR = np.array([1e6, 1e6])
RESEED = re.compile(r"iteration (\d+).*re-seeded empty component (\d+) .* row (\d+)")
ENDED_EMPTY = re.compile(r"(\d+) of (\d+) components ended empty \(component\(s\) ([\d, ]+) hold")


def two_clusters(seed: int) -> np.ndarray:
    """``N`` 2-D rows of two unit Gaussians 4 apart in each feature."""
    X = np.random.default_rng(seed).normal(size=(N, 2))
    X[: N // 2] += 4.0
    return X


def far_inits(X: np.ndarray, covariance_type: str) -> dict[str, np.ndarray]:
    """Initial parameters: a mean at a row of each cluster and one 1e6 away."""
    return same_inits(X, covariance_type, np.vstack([X[[0, N - 1]], FAR]))


def log_density(
    X: np.ndarray, weights: np.ndarray, means: np.ndarray, covs: np.ndarray
) -> np.ndarray:
    """``log p(x_i)`` of a mixture with (k, d, d) covariances, computed with SciPy."""
    per_component = [
        np.log(w) + multivariate_normal(m, c).logpdf(X)
        for w, m, c in zip(weights, means, covs, strict=True)
    ]
    return logsumexp(np.stack(per_component, axis=1), axis=1)


def fit_recording(
    X: da.Array | str, **params: object
) -> tuple[dask_em.GaussianMixture, list[tuple[int, int, int]]]:
    """A dask-em fit and its re-seeds as (iteration, component, row), from the warnings.

    The fit's `ENDED_EMPTY` warning, if any, is kept in ``gm.ended_empty_warnings``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = dask_em.GaussianMixture(**params).fit(X)
    reseeds = []
    gm.ended_empty_warnings = []  # type: ignore[attr-defined]
    for w in caught:
        if issubclass(w.category, EmptyComponentWarning):
            if ENDED_EMPTY.search(str(w.message)):
                gm.ended_empty_warnings.append(str(w.message))  # type: ignore[attr-defined]
                continue
            match = RESEED.search(str(w.message))
            assert match, w.message
            reseeds.append(tuple(int(g) for g in match.groups()))
    return gm, reseeds


def assert_monotone_except_after(bounds: list[float], reseed_iterations: set[int]) -> None:
    """Lower bounds never decrease (beyond 1e-10, as in `test_monotone`) except into the
    iteration after a re-seed (bound ``t + 1`` is the first one under the parameters
    re-seeded at ``t``)."""
    b = np.asarray(bounds)
    for t in range(1, len(b)):  # b[t] is iteration t + 1
        if t in reseed_iterations:
            continue
        assert b[t] >= b[t - 1] - 1e-10, (t + 1, b[t - 1], b[t])


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_far_component_is_reseeded_at_the_worst_row_then_follows_sklearn(
    covariance_type: str, tmp_path: Path
) -> None:
    X = two_clusters(seed=3)
    inits = far_inits(X, covariance_type)
    params = dict(n_components=3, covariance_type=covariance_type, tol=TOL, **inits)

    # the worst-fitted row under the initial parameters, with SciPy
    cov0 = np.linalg.inv(dense_covariances(inits["precisions_init"], covariance_type, 3, 2))
    worst = int(np.argmin(log_density(X, inits["weights_init"], inits["means_init"], cov0)))
    # scikit-learn's first M-step, then the documented re-seed of component 2
    sk1 = fit_sklearn(X, **params, max_iter=1)
    weights = sk1.weights_.copy()
    weights[2] = 1.0 / N
    weights /= weights.sum()
    means = sk1.means_.copy()
    means[2] = X[worst]
    covariances = sk1.covariances_.copy()
    if covariance_type != "tied":
        live = sk1.weights_[:2] / sk1.weights_[:2].sum()
        covariances[2] = np.tensordot(live, sk1.covariances_[:2], axes=1)
    reseeded = GMMParams.from_covariances(weights, means, covariances, covariance_type)
    sk2 = fit_sklearn(
        X,
        n_components=3,
        covariance_type=covariance_type,
        tol=TOL,
        max_iter=MAX_ITER - 1,
        weights_init=weights,
        means_init=means,
        precisions_init=reseeded.precisions,
    )

    dm, reseeds = fit_recording(zarr_dask(tmp_path, X), **params, max_iter=MAX_ITER)

    assert reseeds == [(1, 2, worst)]
    assert_no_nan(dm, X)
    assert sk2.converged_ and dm.converged_
    assert dm.n_iter_ == 1 + sk2.n_iter_
    assert rel_err(dm.lower_bounds_[0], sk1.lower_bounds_[0]) <= RTOL
    assert rel_err(dm.lower_bounds_[1:], sk2.lower_bounds_) <= RTOL
    assert rel_err(dm.weights_, sk2.weights_) <= RTOL
    assert rel_err(dm.means_, sk2.means_) <= RTOL
    assert norm_rel_err(dm.covariances_, sk2.covariances_) <= RTOL
    # the re-seeded component ends holding (about) a row's mass: it is no longer empty
    assert dm.weights_[2] >= 0.5 / N
    assert_monotone_except_after(dm.lower_bounds_, {1})


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_more_components_than_distinct_points_never_loop_or_give_nan(
    covariance_type: str, tmp_path: Path
) -> None:
    points = np.random.default_rng(0).normal(size=(2, 2))
    X = np.repeat(points, N // 2, axis=0)
    means = np.vstack([points, [[0.3, 0.3], [50.0, 50.0], [-50.0, 3.0]]])
    dm, reseeds = fit_recording(
        zarr_dask(tmp_path, X),
        n_components=5,
        covariance_type=covariance_type,
        tol=TOL,
        max_iter=MAX_ITER,
        **same_inits(X, covariance_type, means),
    )
    assert_no_nan(dm, X)
    assert dm.converged_
    iterations = [it for it, _, _ in reseeds]
    assert len(iterations) == len(set(iterations))  # at most one per iteration
    assert 1 <= len(reseeds) <= 5
    # every re-seed lands on one of the two distinct points
    assert all(row in range(N) for _, _, row in reseeds)
    assert_monotone_except_after(dm.lower_bounds_, set(iterations))
    # every component with mass sits on one of the two points; one for which no row is
    # better fitted by a re-seed stays empty where it was (10 eps weight)
    distance = np.min(np.linalg.norm(dm.means_[:, None] - points[None], axis=2), axis=1)
    on_a_point = distance <= 1e-6
    assert np.all(on_a_point | (dm.weights_ <= 1e-14)), (dm.means_, dm.weights_)
    assert np.count_nonzero(on_a_point) >= 3
    # the components left empty are named in one warning at the end of the fit
    empty = np.flatnonzero(dm.weights_ <= 1e-14)
    assert empty.size >= 1
    [warned] = dm.ended_empty_warnings
    count, total, listed = ENDED_EMPTY.search(warned).groups()
    assert (int(count), int(total)) == (empty.size, 5)
    assert [int(c) for c in listed.split(",")] == empty.tolist()


def test_no_ended_empty_warning_when_every_component_holds_data(tmp_path: Path) -> None:
    X = two_clusters(seed=3)
    gm, _ = fit_recording(X, n_components=2, tol=TOL, max_iter=MAX_ITER, random_state=0)
    assert gm.ended_empty_warnings == [] and np.all(gm.weights_ > 0.1)


def test_squarem_reseeds_the_same_component_and_ends_valid(tmp_path: Path) -> None:
    X = two_clusters(seed=3)
    params = dict(n_components=3, tol=TOL, max_iter=MAX_ITER, **far_inits(X, "full"))
    data = zarr_dask(tmp_path, X)
    plain, plain_reseeds = fit_recording(data, **params)
    fast, fast_reseeds = fit_recording(data, **params, acceleration="squarem")
    assert fast_reseeds == plain_reseeds == [(1, 2, plain_reseeds[0][2])]
    assert_no_nan(fast, X)
    assert fast.converged_ and fast.n_iter_ < plain.n_iter_
    assert fast.lower_bound_ >= plain.lower_bound_ - 1e-9 * abs(plain.lower_bound_)
    assert_monotone_except_after(fast.lower_bounds_, {1})


class Crash(Exception):
    """Raised right after a checkpoint save (a simulated crash of the fit)."""


def test_a_fit_resumed_right_after_a_reseed_equals_the_uninterrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    X = two_clusters(seed=3)
    data = zarr_dask(tmp_path, X)
    params = dict(n_components=3, tol=TOL, max_iter=MAX_ITER, **far_inits(X, "full"))
    reference, reseeds = fit_recording(data, **params)
    assert [it for it, _, _ in reseeds] == [1]

    real_save = Checkpoint.save

    def save_then_crash(self: Checkpoint, state, n_passes: int) -> None:  # type: ignore[no-untyped-def]
        real_save(self, state, n_passes)
        if state.runs and state.runs[0] is not None and state.runs[0].n_iter == 1:
            raise Crash

    monkeypatch.setattr(Checkpoint, "save", save_then_crash)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Crash), warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyComponentWarning)
        dask_em.GaussianMixture(**params, checkpoint_dir=ckpt).fit(data)
    monkeypatch.undo()
    saved = Checkpoint(ckpt, {}).load(check_fingerprint=False)
    assert saved is not None
    np.testing.assert_array_equal(saved.state.runs[0].params.means[2], X[reseeds[0][2]])

    resumed, again = fit_recording(data, **params, checkpoint_dir=ckpt)
    assert again == []  # the re-seed was done before the crash, not repeated
    assert_same_fit(resumed, reference)


def test_worst_row_skips_zero_weights_and_does_not_depend_on_chunking() -> None:
    X = two_clusters(seed=5)
    X[17] = [30.0, -30.0]  # an outlier, given weight 0 below
    X[250] = [-20.0, 20.0]  # the worst row of positive weight
    w = np.ones(N)
    w[17] = 0.0
    params = GMMParams.from_covariances(
        np.array([0.5, 0.5]), np.array([[4.0, 4.0], [0.0, 0.0]]), np.ones((2, 2)), "diag"
    )
    answers = set()
    for rows in (N, 100, 37, 1):
        total = SuffStats.zero(2, 2, "diag")
        for start in range(0, N, rows):
            part = slice(start, start + rows)
            total = total + kernels.em_chunk(X[part], w[part], start // rows, start, params)
        assert total.worst is not None
        answers.add((total.worst.index, tuple(total.worst.row), total.worst.weight))
        sq = [24.0**2 + 16.0**2, 20.0**2 + 20.0**2]  # to the means (4, 4) and (0, 0)
        expected = logsumexp([np.log(0.5) - np.log(2 * np.pi) - 0.5 * q for q in sq])
        assert abs(total.worst.loglik - expected) <= 1e-12 * abs(expected)
    assert answers == {(250, (-20.0, 20.0), 1.0)}
    unweighted = kernels.em_chunk(X, None, 0, 0, params).worst
    assert unweighted is not None and unweighted.index == 17


def test_ties_go_to_the_lower_row_index_in_any_order() -> None:
    row = np.zeros(2)
    a, b, c = WorstFit(-5.0, 9, row, 1.0), WorstFit(-5.0, 3, row, 1.0), WorstFit(-1.0, 0, row, 1.0)
    for order in ((a, b, c), (c, b, a), (b, c, a)):
        assert (order[0] + order[1] + order[2]).index == 3


def test_a_component_stays_empty_when_reseeding_would_not_fit_the_worst_row_better() -> None:
    params = GMMParams.from_covariances(
        np.array([0.5, 0.5 - 1e-16, 1e-16]), np.zeros((3, 2)), np.full(3, 1e-6), "spherical"
    )

    def stats(worst_loglik: float) -> SuffStats:
        worst = WorstFit(worst_loglik, 7, np.zeros(2), 1.0)
        return SuffStats(
            np.array([500.0, 500.0, 0.0]),
            np.zeros((3, 2)),
            np.zeros((3, 2)),
            0.0,
            1000.0,
            1000,
            worst,
        )

    # a new component's density at the row: log(1e-3 / 1.001) - log(2 pi) - log(1e-6) = 5.07
    assert reseed(params, stats(5.1)) is None
    done = reseed(params, stats(5.0))
    assert done is not None
    new, event = done
    assert (event.component, event.row, event.mass) == (2, 7, 0.0)
    np.testing.assert_allclose(new.weights, np.array([0.5, 0.5, 1e-3]) / 1.001)
