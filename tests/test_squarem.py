"""SQUAREM acceleration (``acceleration='squarem'``): fewer passes, monotone, resumable.

Pass counts are deterministic for fixed data and seeds, so "fewer passes" is a
behavioural assertion, not a timing one. Data are written to real Zarr stores.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from dask_em import GaussianMixture
from dask_em.checkpoint import Checkpoint
from dask_em.datasets import mixture_rows, true_params
from dask_em.em import FitState, extrapolate
from dask_em.params import GMMParams


class Interrupted(Exception):
    """Raised right after a checkpoint save (a simulated crash)."""


@pytest.fixture
def overlapping(tmp_path: Path) -> da.Array:
    """20,000 x 3 rows of a 4-component mixture whose means are pulled together (slow EM),
    in a Zarr store of 8 row chunks."""
    truth = true_params(4, 3, 5)
    close = GMMParams.from_covariances(truth.weights, truth.means * 0.25, truth.covariances, "full")
    X = mixture_rows(0, 20_000, close, 1)
    path = str(tmp_path / "overlap.zarr")
    da.from_array(X, chunks=(2_500, 3)).to_zarr(path)
    return da.from_zarr(path)


def fit(X: da.Array, **kw: object) -> GaussianMixture:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return GaussianMixture(4, random_state=0, **kw).fit(X)


def test_squarem_reaches_a_tight_tol_in_far_fewer_passes_and_no_worse(
    overlapping: da.Array,
) -> None:
    plain = fit(overlapping, tol=1e-8, max_iter=3000)
    fast = fit(overlapping, tol=1e-8, max_iter=3000, acceleration="squarem")
    assert plain.converged_ and fast.converged_
    assert 3 * fast.n_passes_ <= plain.n_passes_, (fast.n_passes_, plain.n_passes_)
    assert fast.lower_bound_ >= plain.lower_bound_ - 1e-7


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_squarem_lower_bounds_never_decrease(overlapping: da.Array, covariance_type: str) -> None:
    gm = fit(
        overlapping, tol=1e-7, max_iter=400, acceleration="squarem", covariance_type=covariance_type
    )
    steps = np.diff(gm.lower_bounds_)
    assert steps.min() >= -1e-10
    assert gm.n_passes_ >= gm.n_iter_  # rejected extrapolations cost a pass but no iteration
    assert np.isfinite(gm.means_).all() and np.isclose(gm.weights_.sum(), 1.0)


def test_extrapolation_is_plain_em_when_the_step_is_one_and_refuses_invalid_mixtures() -> None:
    def at(mean: float, weights: tuple[float, float] = (0.5, 0.5)) -> GMMParams:
        return GMMParams.from_covariances(
            np.array(weights), np.full((2, 1), mean), np.ones((2, 1, 1)), "full"
        )

    # alpha = -|r|/|v| = -1 (equally spaced iterates): plain EM, no extrapolation
    assert extrapolate(at(0.0), at(1.0), at(2.0)) is None
    # geometric iterates 0, 1, 1.5 (-> 2): alpha = -2 jumps to the limit
    jump = extrapolate(at(0.0), at(1.0), at(1.5))
    assert jump is not None
    np.testing.assert_allclose(jump.means, 2.0)
    # weights 0.5, 0.3, 0.12: alpha = -10 drives a weight negative: refused
    assert extrapolate(at(0.0), at(0.0, (0.3, 0.7)), at(0.0, (0.12, 0.88))) is None


@pytest.mark.parametrize("crash_at_save", [2, 5, 9])
def test_squarem_fit_interrupted_and_resumed_equals_an_uninterrupted_one(
    overlapping: da.Array, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at_save: int
) -> None:
    kw = dict(tol=1e-8, max_iter=40, acceleration="squarem")
    reference = fit(overlapping, **kw)
    real_save = Checkpoint.save
    saves: list[FitState] = []

    def save(self: Checkpoint, state: FitState, n_passes: int) -> None:
        real_save(self, state, n_passes)
        saves.append(state)
        if len(saves) == crash_at_save:
            raise Interrupted

    monkeypatch.setattr(Checkpoint, "save", save)
    with pytest.raises(Interrupted):
        fit(overlapping, checkpoint_dir=tmp_path / "ck", **kw)
    monkeypatch.undo()
    resumed = fit(overlapping, checkpoint_dir=tmp_path / "ck", **kw)
    assert resumed.n_iter_ == reference.n_iter_
    assert resumed.lower_bounds_ == reference.lower_bounds_
    np.testing.assert_array_equal(resumed.means_, reference.means_)
    np.testing.assert_array_equal(resumed.covariances_, reference.covariances_)
    assert resumed.n_passes_ == reference.n_passes_


def test_squarem_checkpoint_is_refused_for_plain_em(overlapping: da.Array, tmp_path: Path) -> None:
    fit(overlapping, tol=1e-3, max_iter=5, acceleration="squarem", checkpoint_dir=tmp_path / "ck")
    with pytest.raises(ValueError, match="acceleration"):
        fit(overlapping, tol=1e-3, max_iter=5, checkpoint_dir=tmp_path / "ck")
