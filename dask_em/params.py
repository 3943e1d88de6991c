"""Gaussian-mixture parameters: the `GMMParams` value, its validation and conversions.

Owns the four covariance parametrizations (``full``, ``tied``, ``diag``, ``spherical``),
whose facts (shapes, matrix or not, shared or not, free parameters) are one table,
`COVARIANCE`, that every module asks instead of comparing names, and the conversions between covariances, precisions and precision Cholesky factors,
following scikit-learn's conventions exactly: the precision Cholesky factor ``U`` of a
covariance ``S`` is upper triangular with ``inv(S) = U @ U.T``.

Shapes, for ``K`` components and ``D`` features:

=============  ==============  ==================================
type           covariances     precisions_cholesky
=============  ==============  ==================================
``full``       ``(K, D, D)``   ``(K, D, D)``
``tied``       ``(D, D)``      ``(D, D)``
``diag``       ``(K, D)``      ``(K, D)``
``spherical``  ``(K,)``        ``(K,)``
=============  ==============  ==================================

Shifted second moments (`dask_em.stats.SuffStats.s2`) are those shapes with the
diagonal types at (K, D): see `second_moment_shape`.

No Dask here: everything is small NumPy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg

from dask_em.choices import COVARIANCE_TYPES
from dask_em.errors import DataError, IllDefinedCovarianceError, ParameterError, invalid_parameter


@dataclass(frozen=True)
class CovarianceType:
    """The facts of one covariance parametrization (one row of `COVARIANCE`).

    Attributes
    ----------
    name : {'full', 'tied', 'diag', 'spherical'}
    matrix : bool
        Each covariance is a (D, D) matrix (``full``, ``tied``), not a vector of variances.
    shared : bool
        One covariance for all components (``tied``).
    per_feature : bool
        A variance per feature (``diag``), or one for all features (``spherical``);
        true for the matrix types.
    """

    name: str
    matrix: bool
    shared: bool
    per_feature: bool

    def covariance_shape(self, n_components: int, n_features: int) -> tuple[int, ...]:
        """Shape of the covariances (and precisions) array: see the module's table."""
        lead = () if self.shared else (n_components,)
        if self.matrix:
            return (*lead, n_features, n_features)
        return (*lead, n_features) if self.per_feature else lead

    def second_moment_shape(self, n_components: int, n_features: int) -> tuple[int, ...]:
        """Shape of the shifted second moments ``s2`` (`dask_em.stats.SuffStats`).

        ``full``: (K, D, D); ``tied``: (D, D) (summed over components); ``diag`` and
        ``spherical``: (K, D) (diagonal only).
        """
        lead = () if self.shared else (n_components,)
        return (*lead, n_features, n_features) if self.matrix else (*lead, n_features)

    def n_parameters(self, n_components: int, n_features: int) -> int:
        """Number of free parameters of the covariances."""
        if self.matrix:
            per_covariance = n_features * (n_features + 1) // 2
        else:
            per_covariance = n_features if self.per_feature else 1
        return per_covariance * (1 if self.shared else n_components)


COVARIANCE: dict[str, CovarianceType] = {
    kind.name: kind
    for kind in (
        CovarianceType("full", matrix=True, shared=False, per_feature=True),
        CovarianceType("tied", matrix=True, shared=True, per_feature=True),
        CovarianceType("diag", matrix=False, shared=False, per_feature=True),
        CovarianceType("spherical", matrix=False, shared=False, per_feature=False),
    )
}
"""The covariance types and their facts, by name: the one place that knows them."""


PARAM_ARRAYS: tuple[str, ...] = ("weights", "means", "covariances", "precisions_cholesky")
"""The array fields of `GMMParams`, in order: what models and checkpoints store."""

LOG_2PI = float(np.log(2.0 * np.pi))
"""``log(2 pi)``, of the Gaussian log-density's constant."""

ILL_DEFINED_COVARIANCE = (
    "Fitting the mixture model failed because some components have ill-defined "
    "empirical covariance (for instance caused by singleton or collapsed samples). "
    "Try to decrease the number of components, increase reg_covar, or scale the "
    "input data. The numerical accuracy can also be improved by passing float64 "
    "data instead of float32."
)


def covariance_kind(covariance_type: str) -> CovarianceType:
    """The `COVARIANCE` row of ``covariance_type``, or ParameterError naming the valid types."""
    if covariance_type not in COVARIANCE:
        raise invalid_parameter(
            "covariance_type", covariance_type, f"use one of {', '.join(COVARIANCE_TYPES)}"
        )
    return COVARIANCE[covariance_type]


def covariance_shape(covariance_type: str, n_components: int, n_features: int) -> tuple[int, ...]:
    """Shape of the covariances (and precisions) array for a covariance type."""
    return covariance_kind(covariance_type).covariance_shape(n_components, n_features)


def second_moment_shape(
    covariance_type: str, n_components: int, n_features: int
) -> tuple[int, ...]:
    """Shape of the shifted second moments ``s2`` for a covariance type."""
    return covariance_kind(covariance_type).second_moment_shape(n_components, n_features)


def _flipudlr(a: np.ndarray) -> np.ndarray:
    return np.flipud(np.fliplr(a))


def _cholesky_upper_precision(covariance: np.ndarray) -> np.ndarray:
    """Upper-triangular ``U`` with ``inv(covariance) = U @ U.T`` for one (D, D) matrix."""
    try:
        cov_chol = linalg.cholesky(covariance, lower=True)
    except linalg.LinAlgError:
        raise IllDefinedCovarianceError(ILL_DEFINED_COVARIANCE) from None
    # LAPACK's triangular inverse, not solve_triangular(cov_chol, I): the latter goes
    # through multi-threaded BLAS trsm, whose thread wake-ups cost milliseconds per tiny
    # matrix while Dask's threads keep the cores busy (the M-step dominated the fit).
    cov_chol_inv, info = linalg.lapack.dtrtri(cov_chol, lower=1)
    if info != 0:
        raise IllDefinedCovarianceError(ILL_DEFINED_COVARIANCE)
    return cov_chol_inv.T


def precisions_cholesky_from_covariances(
    covariances: np.ndarray, covariance_type: str
) -> np.ndarray:
    """Precision Cholesky factors of covariances.

    Parameters
    ----------
    covariances : ndarray, shape given by `covariance_shape`
    covariance_type : {'full', 'tied', 'diag', 'spherical'}

    Returns
    -------
    precisions_cholesky : ndarray, same shape as ``covariances``

    Raises
    ------
    IllDefinedCovarianceError
        If a covariance is not positive definite (the message says what to change).
    """
    covariances = np.asarray(covariances, dtype=np.float64)
    if covariance_kind(covariance_type).matrix:
        mats = covariances.reshape(-1, *covariances.shape[-2:])
        return np.stack([_cholesky_upper_precision(c) for c in mats]).reshape(covariances.shape)
    if np.any(~(covariances > 0.0)):
        raise IllDefinedCovarianceError(ILL_DEFINED_COVARIANCE)
    return 1.0 / np.sqrt(covariances)


def precisions_cholesky_from_precisions(precisions: np.ndarray, covariance_type: str) -> np.ndarray:
    """Precision Cholesky factors of precision matrices, as scikit-learn computes them.

    Parameters
    ----------
    precisions : ndarray, shape given by `covariance_shape`
    covariance_type : {'full', 'tied', 'diag', 'spherical'}

    Returns
    -------
    precisions_cholesky : ndarray, same shape as ``precisions``
    """
    precisions = np.asarray(precisions, dtype=np.float64)
    if covariance_kind(covariance_type).matrix:
        mats = precisions.reshape(-1, *precisions.shape[-2:])
        factors = [_flipudlr(linalg.cholesky(_flipudlr(p), lower=True)) for p in mats]
        return np.stack(factors).reshape(precisions.shape)
    return np.sqrt(precisions)


def precisions_from_cholesky(precisions_cholesky: np.ndarray, covariance_type: str) -> np.ndarray:
    """Precisions ``U @ U.T`` (or ``U**2`` for diag/spherical) from their Cholesky factors."""
    if covariance_kind(covariance_type).matrix:
        return precisions_cholesky @ np.swapaxes(precisions_cholesky, -1, -2)
    return precisions_cholesky**2


def covariances_from_precisions_cholesky(
    precisions_cholesky: np.ndarray, covariance_type: str
) -> np.ndarray:
    """Covariances from precision Cholesky factors: ``inv(U @ U.T)`` (or ``1/U**2``)."""
    if covariance_kind(covariance_type).matrix:
        u_inv = np.linalg.inv(precisions_cholesky)
        return np.swapaxes(u_inv, -1, -2) @ u_inv
    return 1.0 / precisions_cholesky**2


def log_det_cholesky(
    precisions_cholesky: np.ndarray, covariance_type: str, n_features: int
) -> np.ndarray | float:
    """Log-determinant of the precision Cholesky factor, per component.

    Returns
    -------
    log_det : ndarray of shape (K,), or a float for ``tied``
    """
    kind = covariance_kind(covariance_type)
    if kind.matrix:
        diag = np.diagonal(precisions_cholesky, axis1=-2, axis2=-1)
        log_det = np.sum(np.log(diag), axis=-1)
        return float(log_det) if kind.shared else log_det
    if kind.per_feature:
        return np.sum(np.log(precisions_cholesky), axis=1)
    return n_features * np.log(precisions_cholesky)


def n_parameters(n_components: int, n_features: int, covariance_type: str) -> int:
    """Number of free parameters of the mixture (for BIC/AIC)."""
    cov_params = covariance_kind(covariance_type).n_parameters(n_components, n_features)
    return cov_params + n_features * n_components + n_components - 1


@dataclass(frozen=True)
class GMMParams:
    """Parameters of a Gaussian mixture, immutable and small.

    Attributes
    ----------
    weights : ndarray of shape (K,)
        Mixing weights, summing to one.
    means : ndarray of shape (K, D)
    covariances : ndarray, shape given by `covariance_shape`
    precisions_cholesky : ndarray, same shape as ``covariances``
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    """

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    precisions_cholesky: np.ndarray
    covariance_type: str

    def __post_init__(self) -> None:
        for name in PARAM_ARRAYS:
            value = np.array(getattr(self, name), dtype=np.float64)
            value.flags.writeable = False
            object.__setattr__(self, name, value)

    @classmethod
    def from_covariances(
        cls,
        weights: np.ndarray,
        means: np.ndarray,
        covariances: np.ndarray,
        covariance_type: str,
    ) -> GMMParams:
        """Build parameters from covariances (computes the precision Cholesky factors)."""
        return cls(
            weights,
            means,
            covariances,
            precisions_cholesky_from_covariances(covariances, covariance_type),
            covariance_type,
        )

    @classmethod
    def from_precisions(
        cls,
        weights: np.ndarray,
        means: np.ndarray,
        precisions: np.ndarray,
        covariance_type: str,
    ) -> GMMParams:
        """Build parameters from precisions (inverse covariances)."""
        prec_chol = precisions_cholesky_from_precisions(precisions, covariance_type)
        return cls(
            weights,
            means,
            covariances_from_precisions_cholesky(prec_chol, covariance_type),
            prec_chol,
            covariance_type,
        )

    @property
    def n_components(self) -> int:
        """Number of mixture components ``K``."""
        return int(self.means.shape[0])

    @property
    def n_features(self) -> int:
        """Number of features ``D``."""
        return int(self.means.shape[1])

    @property
    def kind(self) -> CovarianceType:
        """The facts of this covariance type (`COVARIANCE`)."""
        return covariance_kind(self.covariance_type)

    @property
    def precisions(self) -> np.ndarray:
        """Precision matrices (inverse covariances), same shape as ``covariances``."""
        return precisions_from_cholesky(self.precisions_cholesky, self.covariance_type)

    def flat(self) -> np.ndarray:
        """The free parameters as one float64 vector: weights, means, covariances, raveled.

        Returns
        -------
        ndarray of shape (K + K*D + covariances.size,)
            The precision Cholesky factors are left out: they follow from the covariances.
        """
        return np.concatenate([self.weights, self.means.ravel(), self.covariances.ravel()])


MODEL_RTOL = 1e-6
"""Relative tolerance of `validate_params`: on the weights' sum, and on the residuals of
the covariance checks, each relative to the size of the terms it sums (so the checks do
not depend on the data's scale or conditioning)."""


def _first(bad: np.ndarray) -> str:
    """The index of the first True of ``bad``, as text (``3`` or ``(3, 1)``)."""
    index = np.argwhere(bad)[0]
    return str(int(index[0])) if index.size == 1 else str(tuple(int(i) for i in index))


def validate_params(params: GMMParams) -> None:
    """Raise DataError naming the first way ``params`` is not a valid Gaussian mixture.

    Checks, in order: weights finite, non-negative and summing to 1 (within
    `MODEL_RTOL`); means finite; covariances and precision Cholesky factors finite;
    covariances symmetric and positive definite; ``precisions_cholesky`` upper
    triangular (full, tied) and consistent with the covariances. With ``L`` the
    Cholesky factor of a covariance and ``U`` its precision factor, ``inv(S) = U U^T``
    exactly when ``L^T U`` is the identity; its residual is compared to
    ``|L^T| |U|`` (and ``U^2 S`` to 1 for diag/spherical), which makes the check
    independent of the features' scales and valid for badly conditioned covariances.

    Parameters
    ----------
    params : GMMParams

    Raises
    ------
    DataError
        One line naming the first violation.
    """
    w, means = params.weights, params.means
    cov, prec = params.covariances, params.precisions_cholesky
    if not np.all(np.isfinite(w)):
        raise DataError(f"weight {_first(~np.isfinite(w))} is not finite.")
    if np.any(w < 0):
        raise DataError(f"weight {_first(w < 0)} is negative ({w[w < 0][0]:g}).")
    if not abs(float(np.sum(w)) - 1.0) <= MODEL_RTOL:
        raise DataError(f"the weights sum to {float(np.sum(w)):.10g}, not 1.")
    if not np.all(np.isfinite(means)):
        raise DataError(f"mean {_first(~np.isfinite(means))} is not finite.")
    for name, value in (("covariances", cov), ("precisions_cholesky", prec)):
        if not np.all(np.isfinite(value)):
            raise DataError(f"{name} {_first(~np.isfinite(value))} is not finite.")
    if params.covariance_type in ("diag", "spherical"):
        if np.any(cov <= 0):
            raise DataError(f"covariance {_first(cov <= 0)} is not positive.")
        residual = np.abs(prec * prec * cov - 1.0)
        if np.any(residual > MODEL_RTOL):
            raise DataError(
                f"covariance {_first(residual > MODEL_RTOL)} disagrees with "
                "precisions_cholesky (precisions_cholesky**2 * covariance != 1)."
            )
        return
    mats = cov[None] if params.covariance_type == "tied" else cov
    precs = prec[None] if params.covariance_type == "tied" else prec
    for k, (s, u) in enumerate(zip(mats, precs, strict=True)):
        which = "the covariance" if params.covariance_type == "tied" else f"covariance {k}"
        scale = np.sqrt(np.abs(np.outer(np.diag(s), np.diag(s))))
        if np.any(np.abs(s - s.T) > MODEL_RTOL * scale):
            raise DataError(f"{which} is not symmetric.")
        try:
            lower = linalg.cholesky(s, lower=True)
        except linalg.LinAlgError:
            raise DataError(f"{which} is not positive definite.") from None
        if np.any(np.tril(u, -1) != 0) or np.any(np.diag(u) <= 0):
            raise DataError(
                f"precisions_cholesky of {which[4:] if which.startswith('the ') else which} "
                "is not upper triangular with a positive diagonal."
            )
        residual = np.abs(lower.T @ u - np.eye(len(s)))
        if np.any(residual > MODEL_RTOL * (np.abs(lower.T) @ np.abs(u))):
            raise DataError(f"{which} disagrees with precisions_cholesky (inv(S) != U U^T).")


def check_init_arrays(
    weights_init: np.ndarray | None,
    means_init: np.ndarray | None,
    precisions_init: np.ndarray | None,
    n_components: int,
    n_features: int,
    covariance_type: str,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Validate user-given initial parameters (scikit-learn's rules and messages).

    Returns
    -------
    weights_init, means_init, precisions_init : float64 ndarrays or None

    Raises
    ------
    ParameterError
        On a wrong shape, weights outside [0, 1] or not summing to one, or
        precisions that are not symmetric positive definite.
    """
    w = m = p = None
    if weights_init is not None:
        w = np.asarray(weights_init, dtype=np.float64)
        if w.shape != (n_components,):
            raise ParameterError(
                f"The parameter 'weights' should have the shape of ({n_components},), "
                f"but got {w.shape}."
            )
        if np.any(w < 0.0) or np.any(w > 1.0):
            raise ParameterError(
                "The parameter 'weights' should be in the range [0, 1], but got "
                f"max value {w.max():.5f}, min value {w.min():.5f}."
            )
        if not np.allclose(np.abs(1.0 - np.sum(w)), 0.0, atol=1e-6):
            raise ParameterError(
                f"The parameter 'weights' should be normalized, but got sum(weights) = {np.sum(w):.5f}."
            )
    if means_init is not None:
        m = np.asarray(means_init, dtype=np.float64)
        if m.shape != (n_components, n_features):
            raise ParameterError(
                f"The parameter 'means' should have the shape of ({n_components}, {n_features}), "
                f"but got {m.shape}."
            )
    if precisions_init is not None:
        p = np.asarray(precisions_init, dtype=np.float64)
        expected = covariance_shape(covariance_type, n_components, n_features)
        if p.shape != expected:
            raise ParameterError(
                f"The parameter '{covariance_type} precision' should have the shape of "
                f"{expected}, but got {p.shape}."
            )
        if not covariance_kind(covariance_type).matrix:
            if np.any(~(p > 0.0)):
                raise ParameterError(f"'{covariance_type} precision' should be positive.")
        else:
            for mat in p.reshape(-1, n_features, n_features):
                if not np.allclose(mat, mat.T) or np.any(np.linalg.eigvalsh(mat) <= 0.0):
                    raise ParameterError(
                        f"'{covariance_type} precision' should be symmetric, positive-definite."
                    )
    return w, m, p
