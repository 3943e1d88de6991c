"""Re-seeding a component that has lost all its mass.

A component whose responsibilities vanish (an initial mean far from the data, a
component squeezed out by its neighbours, duplicated points) would otherwise stay a
dead weight of ``10 eps`` for the rest of the fit. After the M-step of an iteration
whose statistics show such a component, `reseed` moves it to the row the E-step fitted
worst (the lowest ``log p(x_i)``, which `dask_em.kernels.em_chunk` tracks during the
pass, so re-seeding costs no extra pass). The strategy is deterministic:

- *empty*: a component whose responsibility mass is below `EMPTY_MASS` times an average
  row's weight (``weight_sum / n_samples``);
- at most one component per iteration, the empty one of lowest index;
- its mean becomes the worst-fitted row ``x`` (ties: the lowest row index); its
  covariance the weighted average of the other components' covariances (the shared one
  for ``tied``); its weight the row's share of the total weight, ``w_x / sum w``, after
  which the weights are renormalized;
- only if this helps the row: the new component's density at ``x``,
  ``w_new N(x | x, S_new)``, must exceed ``p(x)`` in the E-step. Otherwise (e.g. more
  components than distinct points) nothing changes and the component stays empty,
  which is how scikit-learn leaves it.
- a worst row with missing values (``missing='em'``, `dask_em.kernels_missing`) has
  its marginal ``p(x_o)`` as log-likelihood and its conditional-mean imputation as
  ``x``; the test then compares like with like, the new component's marginal density
  on the observed coordinates, ``w_new N(x_o | x_o, S_new,oo)``, with ``p(x_o)``
  (comparing a full ``D``-dimensional density with a marginal one would favour or
  refuse the re-seed for the number of missing values, not for the fit).

The lower bound never decreases under EM except across a re-seed, which the iteration
reports (`Reseed`). No Dask here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dask_em.params import LOG_2PI, GMMParams, log_det_cholesky
from dask_em.stats import SuffStats

EMPTY_MASS = 1e-6
"""A component is empty when its responsibility mass is below this fraction of an
average row's weight."""


@dataclass(frozen=True)
class Reseed:
    """A re-seed that happened (for progress output and warnings).

    Attributes
    ----------
    component : int
        Index of the re-seeded component.
    row : int
        Global index of the row it was moved to.
    loglik : float
        ``log p(x)`` of that row under the E-step's parameters.
    mass : float
        The component's responsibility mass before the re-seed.
    """

    component: int
    row: int
    loglik: float
    mass: float

    def describe(self) -> str:
        """One line, e.g. ``re-seeded empty component 2 (mass 0) at row 17 (log p -1.2e+12)``."""
        return (
            f"re-seeded empty component {self.component} (mass {self.mass:.3g}) at the "
            f"worst-fitted row {self.row} (log-likelihood {self.loglik:.6g})"
        )


def empty_components(stats: SuffStats) -> np.ndarray:
    """Indices of the components whose mass in ``stats`` is below `EMPTY_MASS` average rows.

    Returns
    -------
    ndarray of int, shape (m,)
    """
    if stats.n_samples == 0 or not stats.weight_sum > 0.0:
        return np.zeros(0, dtype=np.int64)
    threshold = EMPTY_MASS * stats.weight_sum / stats.n_samples
    return np.flatnonzero(stats.n < threshold)


def empty_weights(weights: np.ndarray, n_samples: int) -> np.ndarray:
    """Indices of the components of fitted ``weights`` that are empty (`empty_components`).

    A component's weight is its mass over the total weight, so its mass is below
    `EMPTY_MASS` average rows exactly when its weight is below ``EMPTY_MASS / n_samples``.

    Parameters
    ----------
    weights : ndarray of shape (K,)
    n_samples : int
        Rows of the data the weights were fitted on.

    Returns
    -------
    ndarray of int, shape (m,)
    """
    return np.flatnonzero(np.asarray(weights) < EMPTY_MASS / max(1, int(n_samples)))


def _average_covariance(params: GMMParams, live: np.ndarray) -> np.ndarray:
    """The covariance of a re-seeded component: weighted mean over the ``live`` components."""
    w = params.weights[live] / params.weights[live].sum()
    return np.tensordot(w, params.covariances[live], axes=1)


def _observed_log_det(params: GMMParams, k: int, observed: np.ndarray) -> float:
    """``log det S_k,oo``: of component ``k``'s covariance on the ``observed`` coordinates."""
    cov = params.covariances
    if params.covariance_type == "diag":
        return float(np.sum(np.log(cov[k][observed])))
    if params.covariance_type == "spherical":
        return float(np.count_nonzero(observed) * np.log(cov[k]))
    matrix = cov[k] if params.covariance_type == "full" else cov
    return float(np.linalg.slogdet(matrix[np.ix_(observed, observed)])[1])


def reseed(params: GMMParams, stats: SuffStats) -> tuple[GMMParams, Reseed] | None:
    """Re-seed the first empty component of ``params`` at the worst-fitted row (module doc).

    Parameters
    ----------
    params : GMMParams
        The M-step's result on ``stats``.
    stats : SuffStats
        The E-step statistics ``params`` came from (with ``worst`` set).

    Returns
    -------
    (GMMParams, Reseed) or None
        The re-seeded parameters and what was done, or None when no component is empty
        or re-seeding would not fit the worst row better.
    """
    empty = empty_components(stats)
    worst = stats.worst
    if empty.size == 0 or worst is None or empty.size == params.n_components:
        return None
    k = int(empty[0])
    live = np.setdiff1d(np.arange(params.n_components), empty)
    share = worst.weight / stats.weight_sum
    weights = params.weights.copy()
    weights[k] = share
    weights /= weights.sum()
    means = params.means.copy()
    means[k] = worst.row
    covariances = params.covariances.copy()
    if not params.kind.shared:
        covariances[k] = _average_covariance(params, live)
    new = GMMParams.from_covariances(weights, means, covariances, params.covariance_type)
    log_det = log_det_cholesky(new.precisions_cholesky, new.covariance_type, new.n_features)
    log_det_k = float(log_det if np.ndim(log_det) == 0 else log_det[k])  # type: ignore[index]
    if worst.observed is None or worst.observed.all():
        own_density = np.log(weights[k]) - 0.5 * new.n_features * LOG_2PI + log_det_k
    else:
        n_observed = int(np.count_nonzero(worst.observed))
        log_det_oo = _observed_log_det(new, k, worst.observed)
        own_density = np.log(weights[k]) - 0.5 * (n_observed * LOG_2PI + log_det_oo)
    if not own_density > worst.loglik:
        return None
    return new, Reseed(k, worst.index, worst.loglik, float(stats.n[k]))
