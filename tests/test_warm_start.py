"""Warm starts: EM begun at a saved model's parameters (``init_model=``, ``--init-model``).

- 20 iterations from a model fitted 10 iterations equal a straight 30-iteration fit
  from the same start (tol=0): the same parameters (max abs difference <= 1e-12) and
  the straight fit's last 20 lower bounds, with no initialization pass; the same from
  the fitted estimator itself;
- ``dask-em fit --init-model`` from a converged model on the same data converges in
  fewer passes than the cold fit;
- a model of another shape, or ``--n-init`` > 1 beside it, is refused in one line
  (exit 2); resuming a checkpoint with another init model is refused naming the
  difference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_ok, assert_usage_error, mixture, run_cli, write_array

from dask_em import GaussianMixture
from dask_em.errors import ParameterError

# tol=0 fits run max_iter iterations on purpose, and warn that they did not converge
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

PARAMS = ("weights_", "means_", "covariances_", "precisions_cholesky_")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """20k rows of an overlapping 3-component mixture in 4 dimensions (chunks of 2000):
    EM needs dozens of iterations on it."""
    root = tmp_path_factory.mktemp("warm")
    return write_array(root / "data.zarr", mixture(20_000, 4, 3, seed=8), (2000, 4))


def assert_same_params(a: GaussianMixture, b: GaussianMixture) -> None:
    for name in PARAMS:
        diff = float(np.max(np.abs(getattr(a, name) - getattr(b, name))))
        assert diff <= 1e-12, f"{name} differs by {diff:.3e}"


def test_twenty_iterations_from_a_ten_iteration_model_equal_a_thirty_iteration_fit(
    data: str, tmp_path: Path
) -> None:
    """init_model (a saved model's path, or the fitted estimator) continues EM exactly:
    10 + 20 iterations equal 30, without an initialization pass."""
    straight = GaussianMixture(3, tol=0, max_iter=30, random_state=0).fit(data)
    first = GaussianMixture(3, tol=0, max_iter=10, random_state=0).fit(data)
    first.save(tmp_path / "ten.zarr")
    for start in (tmp_path / "ten.zarr", str(tmp_path / "ten.zarr"), first):
        warm = GaussianMixture(3, tol=0, max_iter=20, init_model=start).fit(data)
        assert_same_params(warm, straight)
        assert warm.lower_bounds_ == straight.lower_bounds_[10:]
        assert warm.n_iter_ == 20 and warm.n_passes_ == 20


def test_a_warm_start_from_a_converged_model_converges_in_fewer_passes(
    data: str, tmp_path: Path
) -> None:
    """``dask-em fit --init-model`` of a cold fit's converged model on the same data
    converges, in fewer passes than the cold fit made."""
    cold = GaussianMixture(3, random_state=0).fit(data)
    assert cold.converged_
    cold.save(tmp_path / "cold.zarr")
    warm = run_cli(
        "fit", data, "--n-components", "3", "--json", "--quiet",
        "--output", tmp_path / "warm.zarr", "--init-model", tmp_path / "cold.zarr",
    )  # fmt: skip
    assert_ok(warm)
    summary = json.loads(warm.stdout)
    assert summary["converged"]
    assert summary["n_passes"] < cold.n_passes_, (summary, cold.n_passes_)
    assert summary["n_passes"] <= 3


def test_an_init_model_of_another_shape_or_with_n_init_is_refused(
    data: str, tmp_path: Path
) -> None:
    """A model with other components, covariance type or features, or ``--n-init 3``
    beside ``--init-model``, is refused in one line with exit status 2, before any work."""
    model = tmp_path / "diag.zarr"
    GaussianMixture(3, covariance_type="diag", max_iter=2, random_state=0).fit(data).save(model)
    fit = ["fit", data, "--n-components", "3", "--output", tmp_path / "m.zarr"]
    assert_usage_error(run_cli(*fit, "--init-model", model), "--init-model", "'diag'", "same shape")
    assert_usage_error(run_cli(*fit, "--init-model", model, "--n-init", "3"), "--n-init 3")
    assert not (tmp_path / "m.zarr").exists()
    other = write_array(tmp_path / "d5.zarr", mixture(1000, 5, 3, seed=1))
    with pytest.raises(ParameterError, match="on 4 features.*and 5 features"):
        GaussianMixture(3, covariance_type="diag", init_model=model).fit(other)
    with pytest.raises(ParameterError, match="n_components 2"):
        GaussianMixture(2, covariance_type="diag", init_model=model).fit(data)
    with pytest.raises(ParameterError, match="n_init"):
        GaussianMixture(3, covariance_type="diag", init_model=model, n_init=2).fit(data)


def test_resuming_with_another_init_model_is_refused(data: str, tmp_path: Path) -> None:
    """The init model's parameters are part of the checkpoint's fingerprint: the
    checkpoint of a fit started from one model is refused, naming ``init_model``, to
    the same fit started from another; started from the same model, it resumes."""
    for name, iterations in (("a.zarr", 2), ("b.zarr", 3)):
        GaussianMixture(3, max_iter=iterations, random_state=0).fit(data).save(tmp_path / name)
    ckpt = tmp_path / "ck"
    first = GaussianMixture(3, random_state=0, init_model=tmp_path / "a.zarr", checkpoint_dir=ckpt)
    first.fit(data)
    fit = ["fit", data, "--n-components", "3", "--quiet", "--checkpoint-dir", ckpt]
    again = run_cli(*fit, "--output", tmp_path / "m.zarr", "--init-model", tmp_path / "b.zarr")
    assert_usage_error(again, "hyper_parameters.init_model", "--restart")
    resumed = GaussianMixture(
        3, random_state=0, init_model=tmp_path / "a.zarr", checkpoint_dir=ckpt
    )
    resumed.fit(data)
    assert_same_params(resumed, first)
    assert resumed.n_passes_ == first.n_passes_
