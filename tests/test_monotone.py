"""EM never decreases the lower bound: ``lower_bounds_`` is non-decreasing (to 1e-10).

Each iteration's lower bound is the mean log-likelihood under the parameters before its
M-step, so consecutive values compare the parameters before and after one EM step, which
cannot lower the likelihood (up to rounding, and the tiny ``reg_covar`` added to the
diagonal). Checked for every covariance type and initializer, on different data sets.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

import dask_em
from dask_em.params import COVARIANCE_TYPES

INITS = ("kmeans", "k-means++", "random", "random_from_data")
CASES = [
    (cov, init, seed) for seed, (cov, init) in enumerate(itertools.product(COVARIANCE_TYPES, INITS))
]


@pytest.mark.parametrize(("covariance_type", "init_params", "seed"), CASES)
def test_lower_bound_never_decreases(covariance_type, init_params, seed, make_mixture, write_zarr):
    data = write_zarr(make_mixture(1500, 3, 4, seed=seed % 5), 190)
    gm = dask_em.GaussianMixture(
        4,
        covariance_type=covariance_type,
        init_params=init_params,
        random_state=seed,
        tol=0.0,  # never converged: max_iter iterations checked, however good the start
        max_iter=20,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm.fit(data.dask())
    bounds = np.asarray(gm.lower_bounds_)
    assert len(bounds) == gm.n_iter_ == 20
    steps = np.diff(bounds)
    assert steps.min() >= -1e-10, (int(steps.argmin()), steps.min())
    assert bounds[-1] > bounds[0]  # it did climb
