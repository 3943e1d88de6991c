"""Per-chunk NumPy maths for rows with missing values (NaN): exact EM under missing-at-random.

The model is the Gaussian mixture of `dask_em.kernels`; a NaN marks a value that was not
observed. Under missing-at-random (Ghahramani & Jordan 1994) each row ``x_i`` with
observed coordinates ``o`` and missing ones ``m`` contributes through:

- its *marginal* density on the observed coordinates,
  ``p(x_o) = sum_k w_k N(x_o | mu_k,o, S_k,oo)``, which gives the responsibilities
  ``r_ik`` and the log-likelihood (the lower bound is the mean of ``log p(x_o)``);
- the *conditional* distribution of the missing coordinates under each component,
  ``x_m | x_o, k ~ N(xhat_ik,m, C_ik)`` with ``xhat_ik,m = mu_k,m + S_k,mo S_k,oo^-1
  (x_o - mu_k,o)`` and ``C_ik = S_k,mm - S_k,mo S_k,oo^-1 S_k,om``, whose first two
  moments replace the missing values in the statistics::

      n_k  += r_ik
      s1_k += r_ik (xhat_ik - c_k)
      s2_k += r_ik [(xhat_ik - c_k)(xhat_ik - c_k)^T + C_ik]      (C_ik zero outside m x m)

  with ``xhat_ik = x_i`` on the observed coordinates and the shift ``c_k = mu_k`` that
  `dask_em.kernels.em_chunk` uses, so `dask_em.stats.m_step` applies unchanged and its
  result is the exact EM update of the observed-data likelihood.

Rows are grouped by missingness pattern inside the chunk. For ``full`` covariances the
marginal and conditional need one factorization per pattern and component, of the
missing block of the precision matrix (`_conditional_blocks`), so a row with few
missing values costs a small one; ``tied`` shares one per pattern; for ``diag`` and
``spherical`` the coordinates are independent given the component, so the marginal
drops the missing terms and ``xhat_ik,m = mu_k,m``, ``C_ik = diag(S_k,mm)``, with no
factorization at all.

Rows without NaN take the fast path, `dask_em.kernels.em_chunk` and
`dask_em.kernels.log_prob_resp`: a chunk without NaN gives exactly (bit for bit) the
statistics and outputs of those functions. Rows with NaN are computed in float64
whatever the input dtype, with statistics accumulated in float64 as everywhere.

Rows with every feature missing are refused (`DataError` naming the row) unless their
sample weight is 0, in which case they contribute nothing. Under missing-at-random such a
row has likelihood 1 and its E-step only returns the prior: it carries no information,
counting it would still dilute the lower bound (a mean over rows), and an empty record
usually betrays a broken export or join that skipping it silently would hide. A zero
sample weight says the row is meant to be there and to count for nothing. The inference
functions (`score_samples_block`, `predict_proba_block`, `predict_block`, `impute_block`)
answer such a row exactly as the model does given no observation: ``log p = 0``, the
mixing weights as responsibilities and the mixture's mean as imputation.

Chunk functions share `dask_em.kernels`' signature ``fn(X, sample_weight, chunk_index,
row_start, *args)``. Nothing here imports Dask.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from dask_em import kernels
from dask_em.errors import DataError
from dask_em.params import LOG_2PI, GMMParams, second_moment_shape
from dask_em.stats import SuffStats, WorstFit

BLOCK_ELEMENTS = 2**20
"""Size of a block of rows with NaN, in values of its ``delta`` (rows x K x D) or, for
``full``/``tied``, of the ``D x D`` matrices of every component for the patterns it
joins: 8 MB in float64, so temporaries stay bounded whatever the chunk's length and
number of distinct missingness patterns."""


def _check_infinite(X: np.ndarray, row_start: int) -> None:
    """Raise DataError naming the first row holding an infinite value (not a missing one)."""
    bad = np.isinf(X).any(axis=1)
    if bad.any():
        row = row_start + int(np.flatnonzero(bad)[0])
        raise DataError(
            f"row {row} holds an infinite value; only NaN marks a missing value: replace "
            "infinities with NaN or drop those rows."
        )


def _check_not_empty(X: np.ndarray, sample_weight: np.ndarray | None, row_start: int) -> None:
    """Raise DataError naming the first row with every value missing and a positive
    weight (module docstring)."""
    empty = np.isnan(X).all(axis=1)
    if sample_weight is not None:
        empty &= sample_weight > 0
    if empty.any():
        rows = np.flatnonzero(empty)
        raise DataError(
            f"row {row_start + int(rows[0])} has every feature missing (NaN) "
            f"({rows.size} such row(s) in its chunk): drop those rows or give them "
            "sample_weight 0."
        )


@dataclass(frozen=True)
class _Block:
    """Rows with NaN of one block, under every component.

    Attributes
    ----------
    rows : ndarray of shape (b,), int
        Positions of the rows in the array given to `_missing_blocks`.
    log_prob : ndarray of shape (b, K)
        ``log w_k + log N(x_o | mu_k,o, S_k,oo)``.
    delta : ndarray of shape (b, K, D)
        ``xhat_ik - mu_k``: the observed offsets and the conditional means of the missing
        coordinates, about each component's mean.
    starts : ndarray of shape (P,), int, or None
        ``full``/``tied``, whose blocks hold the rows of ``P`` patterns one after the
        other: where each pattern's rows begin.
    conditionals : list of (ndarray of shape (m,), ndarray of shape (K or 1, m, m))
        ``full``/``tied``: each pattern's missing coordinates and their conditional
        covariance ``C_mm`` (one shared by every component for ``tied``); empty when not
        asked for.
    missing : ndarray of shape (b, D), float64, or None
        ``diag``/``spherical``: 1 where a value is missing (``C = diag(S_k)`` there).
    """

    rows: np.ndarray
    log_prob: np.ndarray
    delta: np.ndarray
    starts: np.ndarray | None = None
    conditionals: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    missing: np.ndarray | None = None

    def conditional_scatter(self, resp: np.ndarray, params: GMMParams) -> np.ndarray:
        """``sum_i r_ik C_ik`` in the layout of ``s2`` (`dask_em.params.second_moment_shape`).

        Parameters
        ----------
        resp : ndarray of shape (b, K)
            Responsibilities already multiplied by the sample weights.
        params : GMMParams
        """
        if self.missing is not None:  # diag / spherical
            return (resp.T @ self.missing) * _variances(params)
        assert self.starts is not None and len(self.conditionals) == self.starts.size
        mass = np.add.reduceat(resp, self.starts, axis=0)  # (P, K): each pattern's share
        n_components, n_features = params.means.shape
        if params.covariance_type == "full":
            out = np.zeros((n_components, n_features, n_features))
            for share, (mis, cond) in zip(mass, self.conditionals, strict=True):
                out[:, mis[:, None], mis] += share[:, None, None] * cond
        else:
            out = np.zeros((n_features, n_features))
            for share, (mis, cond) in zip(mass.sum(axis=1), self.conditionals, strict=True):
                out[mis[:, None], mis] += share * cond[0]
        return out


def _variances(params: GMMParams) -> np.ndarray:
    """Per-component variances of ``diag``/``spherical`` parameters: shape (K, D)."""
    cov = params.covariances
    if params.covariance_type == "spherical":
        return np.repeat(cov[:, None], params.n_features, axis=1)
    return cov


def _independent_blocks(X: np.ndarray, params: GMMParams) -> Iterator[_Block]:
    """`_Block` s of ``diag``/``spherical`` parameters: the missing terms drop out."""
    with np.errstate(divide="ignore"):
        log_weights = np.log(params.weights)
    variances = _variances(params)
    log_var = np.log(variances)
    n_components, n_features = params.means.shape
    step = max(1, BLOCK_ELEMENTS // (n_components * n_features))
    for start in range(0, X.shape[0], step):
        x = X[start : start + step].astype(np.float64)
        observed = ~np.isnan(x)
        delta = np.where(observed[:, None, :], x[:, None, :] - params.means[None], 0.0)
        quad = np.einsum("bkd,kd->bk", delta * delta, 1.0 / variances)
        log_det = observed @ log_var.T  # log det S_k,oo, (b, K)
        n_observed = observed.sum(axis=1)[:, None]
        log_prob = log_weights - 0.5 * (n_observed * LOG_2PI + log_det + quad)
        yield _Block(
            np.arange(start, start + x.shape[0]),
            log_prob,
            delta,
            missing=(~observed).astype(np.float64),
        )


def _patterns(observed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of ``observed`` (n, D) bool, shape (P, D), and each row's index
    among them, shape (n,).

    Rows are packed into bits first: up to 64 features a pattern is one integer, which
    NumPy groups far faster than rows of booleans.
    """
    packed = np.packbits(observed, axis=1)
    if packed.shape[1] <= 8:
        keys = np.zeros((packed.shape[0], 8), np.uint8)
        keys[:, : packed.shape[1]] = packed
        _, first, inverse = np.unique(
            keys.view(np.uint64)[:, 0], return_index=True, return_inverse=True
        )
    else:
        _, first, inverse = np.unique(packed, axis=0, return_index=True, return_inverse=True)
    return observed[first], inverse.reshape(-1)


def _conditional_blocks(
    X: np.ndarray, params: GMMParams, conditional_covariance: bool
) -> Iterator[_Block]:
    """`_Block` s of ``full``/``tied`` parameters: the rows of one missingness pattern each.

    Works from the precisions ``P = S^-1 = U U^T`` and factorizes, per pattern and
    component (once per pattern for ``tied``), only the missing block ``P_mm``:

    - the conditional of the missing coordinates is ``C = P_mm^-1`` and
      ``xhat_m - mu_m = -P_mm^-1 P_mo (x_o - mu_o)``;
    - ``log det S_oo = log det P_mm - log det P``;
    - the Mahalanobis distance of the observed coordinates is that of the completed row,
      ``||(xhat - mu)^T U||^2`` (marginalizing a Gaussian minimizes its quadratic form
      over the missing coordinates, at ``xhat``): a sum of squares, free of cancellation.

    A row with few missing values thus costs a small factorization, not one of ``S_oo``.
    Each pattern's rows are whitened and completed by matrix products; consecutive
    patterns are joined into blocks of at most `BLOCK_ELEMENTS` values of ``delta`` (or
    as many patterns as ``D x D`` matrices of every component would take), so that data with a distinct pattern on every row does not pay
    the per-block work row by row.
    """
    with np.errstate(divide="ignore"):
        log_weights = np.log(params.weights)
    n_components, n_features = params.means.shape
    prec_chol = params.precisions_cholesky
    precisions = params.precisions
    if params.covariance_type == "tied":
        prec_chol, precisions = prec_chol[None], precisions[None]
    log_det_prec = 2.0 * np.log(np.diagonal(prec_chol, axis1=-2, axis2=-1)).sum(axis=-1)
    rows_per_block = max(1, BLOCK_ELEMENTS // (n_components * n_features))
    patterns_per_block = max(1, BLOCK_ELEMENTS // (prec_chol.shape[0] * n_features**2))
    patterns, inverse = _patterns(~np.isnan(X))
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(patterns.shape[0] + 1))
    pieces: list[_Block] = []
    for j, seen in enumerate(patterns):
        obs, mis = np.flatnonzero(seen), np.flatnonzero(~seen)
        chol = np.linalg.cholesky(precisions[:, mis[:, None], mis])  # (K', m, m)
        chol_inv = np.linalg.inv(chol)
        cond_mm = np.swapaxes(chol_inv, -1, -2) @ chol_inv  # P_mm^-1
        gain_t = -np.swapaxes(cond_mm @ precisions[:, mis[:, None], obs], -1, -2)  # (K', o, m)
        log_det = 2.0 * np.log(np.diagonal(chol, axis1=-2, axis2=-1)).sum(axis=-1) - log_det_prec
        const = log_weights - 0.5 * (obs.size * LOG_2PI + log_det)  # (K,)
        conditionals = []
        if conditional_covariance:
            conditionals = [(mis, 0.5 * (cond_mm + np.swapaxes(cond_mm, -1, -2)))]
        members = order[bounds[j] : bounds[j + 1]]
        for start in range(0, members.size, rows_per_block):
            rows = members[start : start + rows_per_block]
            x = X[rows[:, None], obs].astype(np.float64)
            delta = np.empty((n_components, rows.size, n_features))
            delta[:, :, obs] = x[None] - params.means[:, None, obs]  # (K, b, o)
            delta[:, :, mis] = delta[:, :, obs] @ gain_t
            z = delta @ prec_chol
            log_prob = const[:, None] - 0.5 * np.einsum("kbd,kbd->kb", z, z)
            pieces.append(
                _Block(rows, log_prob.T, delta.transpose(1, 0, 2), conditionals=conditionals)
            )
            if (
                sum(piece.rows.size for piece in pieces) >= rows_per_block
                or len(pieces) >= patterns_per_block
            ):
                yield _joined(pieces)
                pieces = []
    if pieces:
        yield _joined(pieces)


def _joined(pieces: list[_Block]) -> _Block:
    """One `_Block` of the rows of several single-pattern blocks, one after the other."""
    sizes = [piece.rows.size for piece in pieces]
    return _Block(
        np.concatenate([piece.rows for piece in pieces]),
        np.concatenate([piece.log_prob for piece in pieces]),
        np.concatenate([piece.delta for piece in pieces]),
        starts=np.cumsum([0, *sizes[:-1]]),
        conditionals=[c for piece in pieces for c in piece.conditionals],
    )


def _missing_blocks(
    X: np.ndarray, params: GMMParams, conditional_covariance: bool = False
) -> Iterator[_Block]:
    """The `_Block` s of rows ``X`` (every row with at least one NaN) under ``params``;
    with ``conditional_covariance``, blocks can give `_Block.conditional_scatter`."""
    if params.covariance_type in ("diag", "spherical"):
        return _independent_blocks(X, params)
    return _conditional_blocks(X, params, conditional_covariance)


def _normalize(log_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(log p(x_o) (b,), responsibilities (b, K))`` by log-sum-exp over components
    (`dask_em.kernels._log_normalize` on a copy of the (b, K) log-densities)."""
    norm, resp = kernels._log_normalize(log_prob.copy().T, np.empty((3, log_prob.shape[0])))
    return norm, resp.T


def em_chunk_missing(
    X: np.ndarray,
    sample_weight: np.ndarray | None,
    chunk_index: int,
    row_start: int,
    params: GMMParams,
) -> SuffStats:
    """E-step of one chunk that may hold NaN: its statistics under ``params``, shifted by
    ``params.means`` (module docstring), ready for `dask_em.stats.m_step`.

    Rows without NaN go through `dask_em.kernels.em_chunk`; a chunk without NaN returns
    exactly what that function returns.

    Parameters
    ----------
    X : ndarray of shape (n, D)
        NaN marks a missing value.
    sample_weight : ndarray of shape (n,) or None
    chunk_index : int
    row_start : int
        Global index of ``X[0]``.
    params : GMMParams

    Returns
    -------
    SuffStats
        With ``loglik = sum_i w_i log p(x_i,o)`` (the observed-data log-likelihood) and
        ``worst`` the row of lowest ``log p(x_i,o)`` among those of positive weight;
        for a row with NaN, ``worst.row`` is its conditional-mean imputation
        (`impute_block`), so that a component re-seeded there gets a finite mean, and
        ``worst.observed`` its observed coordinates (`dask_em.reseed` compares
        marginal densities on them).

    Raises
    ------
    DataError
        On infinite values, rows with every value missing and a positive weight,
        negative or non-finite sample weights (the message names the row or chunk).
    """
    has_nan = np.isnan(X).any(axis=1)
    if not has_nan.any():
        return kernels.em_chunk(X, sample_weight, chunk_index, row_start, params)
    kernels._check_weights(sample_weight, chunk_index)
    _check_infinite(X, row_start)
    _check_not_empty(X, sample_weight, row_start)
    complete = np.flatnonzero(~has_nan)
    incomplete = np.flatnonzero(has_nan)
    stats = SuffStats.zero(params.n_components, params.n_features, params.covariance_type)
    if complete.size:
        w = None if sample_weight is None else sample_weight[complete]
        fast = kernels.em_chunk(X[complete], w, chunk_index, 0, params)
        worst = fast.worst
        if worst is not None:
            worst = WorstFit(
                worst.loglik, row_start + int(complete[worst.index]), worst.row, worst.weight
            )
        stats = SuffStats(
            fast.n, fast.s1, fast.s2, fast.loglik, fast.weight_sum, fast.n_samples, worst
        )
    return stats + _missing_stats(
        X[incomplete],
        None if sample_weight is None else sample_weight[incomplete],
        incomplete + row_start,
        params,
    )


def _missing_stats(
    X: np.ndarray, sample_weight: np.ndarray | None, index: np.ndarray, params: GMMParams
) -> SuffStats:
    """Statistics of rows that all hold NaN (``index``: their global row indices)."""
    n_components, n_features = params.means.shape
    cov_type = params.covariance_type
    nk = np.zeros(n_components)
    s1 = np.zeros((n_components, n_features))
    s2 = np.zeros(second_moment_shape(cov_type, n_components, n_features))
    loglik = 0.0
    worst: tuple[float, int] = (np.inf, -1)
    for block in _missing_blocks(X, params, conditional_covariance=True):
        norm, resp = _normalize(block.log_prob)
        if not np.all(np.isfinite(norm)):
            raise FloatingPointError(
                "non-finite marginal log-likelihood of a row with missing values: the data "
                "are too far from every component; scale the input data."
            )
        w = np.ones(norm.shape[0]) if sample_weight is None else sample_weight[block.rows]
        loglik += float(norm @ w)
        candidates = np.where(w > 0, norm, np.inf)
        i = int(np.argmin(candidates))
        if candidates[i] < worst[0]:
            worst = (float(candidates[i]), int(block.rows[i]))
        resp *= w[:, None]
        nk += resp.sum(axis=0)
        weighted = resp[:, :, None] * block.delta  # (b, K, D)
        s1 += weighted.sum(axis=0)
        if cov_type == "full":
            s2 += np.matmul(weighted.transpose(1, 2, 0), block.delta.transpose(1, 0, 2))
        elif cov_type == "tied":
            flat = block.delta.reshape(-1, n_features)
            s2 += weighted.reshape(-1, n_features).T @ flat
        else:
            s2 += np.einsum("bkd,bkd->kd", weighted, block.delta)
        s2 += block.conditional_scatter(resp, params)
    weight_sum = float(X.shape[0]) if sample_weight is None else sample_weight.sum(dtype=np.float64)
    worst_fit = None
    if worst[1] >= 0:
        at = worst[1]
        weight = 1.0 if sample_weight is None else float(sample_weight[at])
        row = impute_block(X[at : at + 1], params)[0].astype(np.float64)
        worst_fit = WorstFit(worst[0], int(index[at]), row, weight, ~np.isnan(X[at]))
    return SuffStats(nk, s1, s2, loglik, weight_sum, X.shape[0], worst_fit)


def _log_prob_resp(
    X: np.ndarray, params: GMMParams, chunk_index: int, row_start: int
) -> tuple[np.ndarray, np.ndarray]:
    """``log p(x_i,o)`` (n,) and ``log p(k | x_i,o)`` (n, K) of rows that may hold NaN.

    Rows without NaN go through `dask_em.kernels.log_prob_resp` (all of them at once when
    none holds NaN, giving exactly its result); outputs are float64 otherwise. An
    infinite value raises DataError naming its global row (``row_start`` is that of ``X[0]``).
    """
    has_nan = np.isnan(X).any(axis=1)
    if not has_nan.any():
        return kernels._checked_log_prob_resp(X, params, chunk_index, row_start)
    _check_infinite(X, row_start)
    norm = np.empty(X.shape[0])
    log_resp = np.empty((X.shape[0], params.n_components))
    complete = np.flatnonzero(~has_nan)
    if complete.size:
        norm[complete], log_resp[complete] = kernels.log_prob_resp(X[complete], params)
    incomplete = np.flatnonzero(has_nan)
    for block in _missing_blocks(X[incomplete], params):
        block_norm, _ = _normalize(block.log_prob)
        rows = incomplete[block.rows]
        norm[rows] = block_norm
        with np.errstate(invalid="ignore"):
            log_resp[rows] = block.log_prob - block_norm[:, None]
    return norm, log_resp


MISSING_VALUES = kernels.BlockInference(_log_prob_resp)
"""Inference given each row's observed values: ``score_samples_block`` is the marginal
log-density ``log p(x_i,o)``, the responsibilities are ``p(k | x_i,o)``; DataError on
infinite values (the message names the global row)."""
score_samples_block = MISSING_VALUES.score_samples_block
predict_proba_block = MISSING_VALUES.predict_proba_block
predict_block = MISSING_VALUES.predict_block


def impute_block(
    X: np.ndarray, params: GMMParams, chunk_index: int = 0, row_start: int = 0
) -> np.ndarray:
    """Conditional-mean imputation under the mixture: NaN replaced by ``E[x_m | x_o]``.

    ``E[x_m | x_o] = sum_k p(k | x_o) xhat_ik,m`` (module docstring); observed values are
    returned unchanged.

    Parameters
    ----------
    X : ndarray of shape (n, D)
        NaN marks a missing value.
    params : GMMParams
    chunk_index : int
    row_start : int
        Global index of ``X[0]`` (names a bad row).

    Returns
    -------
    ndarray of shape (n, D), dtype of ``X``, without NaN

    Raises
    ------
    DataError
        On infinite values (the message names the global row).
    """
    out = X.copy()
    _check_infinite(X, row_start)
    incomplete = np.flatnonzero(np.isnan(X).any(axis=1))
    if incomplete.size == 0:
        return out
    for block in _missing_blocks(X[incomplete], params):
        _, resp = _normalize(block.log_prob)
        expected = np.einsum("bk,bkd->bd", resp, block.delta + params.means[None])
        rows = incomplete[block.rows]
        out[rows] = np.where(np.isnan(X[rows]), expected, X[rows])
    return out
