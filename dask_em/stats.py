"""Sufficient statistics of a Gaussian mixture and the M-step that turns them into parameters.

`SuffStats` is an immutable value that adds: the statistics of a dataset are the sum of
the statistics of any partition of its rows, in any grouping (a commutative monoid with
`SuffStats.zero`). This is what lets one EM iteration be a map (per chunk) and a tree
reduction (`+`) followed by `m_step` on the driver.

Moments are *shifted*: for component ``k`` with shift ``c_k`` (the current means),

    n_k  = sum_i r_ik                                    shape (K,)
    s1_k = sum_i r_ik (x_i - c_k)                        shape (K, D)
    s2_k = sum_i r_ik (x_i - c_k)(x_i - c_k)^T           shape depends on the covariance type

where ``r_ik`` already includes the sample weight. Shifting keeps cancellation small on
data far from the origin (the M-step subtracts ``(s1/n)(s1/n)^T``, which is small near
convergence, instead of ``mu mu^T``). No Dask here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dask_em.errors import DataError
from dask_em.params import GMMParams, covariance_kind, second_moment_shape

ZERO_WEIGHT_SUM = "sample_weight sums to zero; at least one row needs a positive weight."
"""The message for weights that sum to zero, seen by the estimator (in-memory weights) or
at the first reduction (lazy weights)."""


_EPS = 10.0 * np.finfo(np.float64).eps  # added to n_k exactly as scikit-learn does


@dataclass(frozen=True)
class WorstFit:
    """The row with the lowest log-likelihood among those of positive weight; adds by keeping
    the lower one (ties: the lower row index), so the result does not depend on grouping.

    Attributes
    ----------
    loglik : float
        ``log p(x_i)`` of that row under the E-step's parameters.
    index : int
        Its global row index.
    row : ndarray of shape (D,), float64
    weight : float
        Its sample weight (1 without weights).
    observed : ndarray of shape (D,), bool, or None
        For a row with missing values (`dask_em.kernels_missing`): which coordinates
        were observed, ``loglik`` being the marginal ``log p(x_o)`` and ``row`` the
        conditional-mean imputation. None for a complete row.
    """

    loglik: float
    index: int
    row: np.ndarray
    weight: float
    observed: np.ndarray | None = None

    def __add__(self, other: WorstFit) -> WorstFit:
        if not isinstance(other, WorstFit):
            return NotImplemented
        return self if (self.loglik, self.index) <= (other.loglik, other.index) else other


def _lower(a: WorstFit | None, b: WorstFit | None) -> WorstFit | None:
    return b if a is None else a if b is None else a + b


@dataclass(frozen=True)
class SuffStats:
    """Additive sufficient statistics of (a part of) the data under fixed parameters.

    Attributes
    ----------
    n : ndarray of shape (K,)
        Weighted responsibility mass per component.
    s1 : ndarray of shape (K, D)
        Shifted first moments.
    s2 : ndarray, shape from `dask_em.params.second_moment_shape`
        Shifted second moments.
    loglik : float
        ``sum_i w_i log p(x_i)`` under the parameters of the E-step (0 where not an E-step).
    weight_sum : float
        ``sum_i w_i``.
    n_samples : int
        Number of rows.
    worst : WorstFit or None
        The row fitted worst by the E-step's parameters (None where not an E-step); used
        to re-seed a component that lost its mass (`dask_em.reseed`).
    """

    n: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    loglik: float
    weight_sum: float
    n_samples: int
    worst: WorstFit | None = None

    def __post_init__(self) -> None:
        for name in ("n", "s1", "s2"):
            value = np.array(getattr(self, name), dtype=np.float64)
            value.flags.writeable = False
            object.__setattr__(self, name, value)
        object.__setattr__(self, "loglik", float(self.loglik))
        object.__setattr__(self, "weight_sum", float(self.weight_sum))
        object.__setattr__(self, "n_samples", int(self.n_samples))

    @classmethod
    def zero(cls, n_components: int, n_features: int, covariance_type: str) -> SuffStats:
        """The neutral element: statistics of no rows."""
        return cls(
            np.zeros(n_components),
            np.zeros((n_components, n_features)),
            np.zeros(second_moment_shape(covariance_type, n_components, n_features)),
            0.0,
            0.0,
            0,
        )

    def __add__(self, other: SuffStats) -> SuffStats:
        if not isinstance(other, SuffStats):
            return NotImplemented
        if self.s2.shape != other.s2.shape:
            raise ValueError(
                f"Cannot add statistics of different shapes {self.s2.shape} and {other.s2.shape}."
            )
        return SuffStats(
            self.n + other.n,
            self.s1 + other.s1,
            self.s2 + other.s2,
            self.loglik + other.loglik,
            self.weight_sum + other.weight_sum,
            self.n_samples + other.n_samples,
            _lower(self.worst, other.worst),
        )

    @property
    def mean_loglik(self) -> float:
        """Weighted mean log-likelihood per sample (scikit-learn's lower bound).

        Raises
        ------
        DataError
            If the weights sum to zero (lazy weights are only seen here).
        """
        if not self.weight_sum > 0.0:
            raise DataError(ZERO_WEIGHT_SUM, parameter="sample_weight")
        return self.loglik / self.weight_sum


def m_step(
    stats: SuffStats, shift: np.ndarray, reg_covar: float, covariance_type: str
) -> GMMParams:
    """New mixture parameters from reduced statistics.

    Parameters
    ----------
    stats : SuffStats
        Statistics of the whole dataset, shifted by ``shift``.
    shift : ndarray of shape (K, D)
        The per-component shift the statistics were computed with.
    reg_covar : float
        Non-negative regularization added to the diagonal of the covariances.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}

    Returns
    -------
    GMMParams

    Raises
    ------
    IllDefinedCovarianceError
        If a covariance is not positive definite (message says to increase ``reg_covar``).

    Notes
    -----
    With ``d_k = s1_k / n_k`` the new mean is ``c_k + d_k`` and the covariance is
    ``s2_k / n_k - d_k d_k^T + reg_covar I`` (the weighted scatter around the new mean),
    as scikit-learn's ``_estimate_gaussian_parameters``; ``n_k`` gets scikit-learn's
    ``10 * eps`` so that empty components give finite means.
    """
    nk = stats.n + _EPS
    delta = stats.s1 / nk[:, None]
    means = np.asarray(shift, dtype=np.float64) + delta
    n_features = means.shape[1]
    if covariance_type == "full":
        cov = stats.s2 / nk[:, None, None] - delta[:, :, None] * delta[:, None, :]
        cov = 0.5 * (cov + np.swapaxes(cov, 1, 2))
        cov[:, np.arange(n_features), np.arange(n_features)] += reg_covar
    elif covariance_type == "tied":
        cov = (stats.s2 - np.einsum("k,ki,kj->ij", nk, delta, delta)) / nk.sum()
        cov = 0.5 * (cov + cov.T)
        cov[np.arange(n_features), np.arange(n_features)] += reg_covar
    elif covariance_type == "diag":
        cov = stats.s2 / nk[:, None] - delta**2 + reg_covar
    elif covariance_type == "spherical":
        cov = (stats.s2 / nk[:, None] - delta**2).mean(axis=1) + reg_covar
    else:
        covariance_kind(covariance_type)  # raises: not a covariance type
    return GMMParams.from_covariances(nk / nk.sum(), means, cov, covariance_type)
