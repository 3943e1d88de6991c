"""Per-chunk NumPy maths: log-densities, responsibilities and partial statistics.

Every function here works on one block of rows ``X`` of shape (n, D) held in memory
and returns small values (statistics of shape (K, ...) or per-row vectors of the
chunk). Products are computed in the dtype of ``X`` (float32 input stays float32), or
in the ``compute_dtype`` given to the E-step and inference functions (`e_step`,
`inference`): the rows are centered in the wider of the two dtypes and only the
centered values are cast, so float32 products of float64 rows lose nothing to an
offset; statistics leave the chunk as float64. The responsibilities of a chunk live
only inside these functions. Nothing here imports Dask: the graph layer
(`dask_em.reduce`) maps these functions over chunks.

Chunk functions called by the graph layer share one signature::

    fn(X, sample_weight, chunk_index, row_start, *args) -> additive value

with ``sample_weight`` of shape (n,) or None, ``chunk_index`` the block's position and
``row_start`` the global index of its first row (for deterministic random streams and
tie-breaking).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np

from dask_em import kernels_compiled
from dask_em.errors import DataError
from dask_em.params import LOG_2PI, GMMParams, log_det_cholesky, second_moment_shape
from dask_em.stats import SuffStats, WorstFit


def chunk_rng(seed: int, *stream: int) -> np.random.Generator:
    """Random generator for one chunk and purpose: depends only on the seed and ``stream``.

    Parameters
    ----------
    seed : int
        Non-negative seed derived from the user's ``random_state``.
    *stream : int
        Non-negative integers naming the purpose, e.g. ``(purpose, round, chunk_index)``.
    """
    return np.random.default_rng([seed, *stream])


BLOCK_ROWS = 4096
"""Rows processed at once inside a chunk: the temporaries of a block stay in cache, and
BLAS sees products of shape (K*D, D) x (D, BLOCK_ROWS), which it runs at speed (a single
product over a tall, skinny chunk runs far slower)."""

BLOCK_ELEMENTS = 2**18
"""Target size of a full-covariance projection block (K*D values per row): 2 MB in
float64. Measured on one core at K=16, D=32 (shape B), `em_chunk` ran 1.4-1.5x faster
with 512-row blocks than with 4,096-row ones (whose 16 MB projection block falls out of
cache); at K=5, D=8 the rule keeps 4,096 rows."""

MIN_BLOCK_ROWS = 256
"""Fewest rows per block (below this, per-block Python overhead shows)."""


def data_center(X: np.ndarray) -> np.ndarray:
    """The point a chunk's rows are centered at: the mean of its first `BLOCK_ROWS` rows.

    A center among the data keeps the moments about it, and their shift to each
    component's mean, free of cancellation wherever the components are; the mixture's
    mean is not, once a component sits far from the data (a mean 1e6 away cost 5 digits
    of the covariances). The first block is a sample, so the center costs next to
    nothing. Shape (D,), float64 (NaN rows make it NaN; the caller reports them).
    """
    if X.shape[0] == 0:
        return np.zeros(X.shape[1])
    return np.asarray(X[:BLOCK_ROWS].mean(axis=0, dtype=np.float64))


@dataclass(frozen=True)
class _Projection:
    """Per-parameter constants of the blocked log-density, in the working dtype.

    Rows are centered at ``c0`` (`data_center` of the chunk) before any product, so
    products and moments stay accurate for data far from the origin; ``d = means - c0``.
    ``c0`` has the dtype the rows are centered in, the wider of theirs and the working
    dtype (that of ``const``); the centered rows are then cast to the working dtype.
    """

    covariance_type: str
    c0: np.ndarray  # (D,), dtype rows are centered in
    d: np.ndarray  # (K, D), float64
    const: np.ndarray  # (K, 1): -D/2 log 2pi + log det U_k + log weight_k
    A: np.ndarray  # full (K*D, D): stacked U_k^T; tied (D, D): U^T; diag/spherical (K, D): U_k^2
    b: np.ndarray  # full (K*D, 1); tied (K, D, 1); diag/spherical (K, D)
    lin: np.ndarray | None  # diag/spherical (K, 1)

    @classmethod
    def build(
        cls,
        means: np.ndarray,
        precisions_cholesky: np.ndarray,
        covariance_type: str,
        log_weights: np.ndarray,
        center: np.ndarray,
        dtype: np.dtype,
        compute_dtype: np.dtype | None = None,
    ) -> _Projection:
        """The constants for rows of ``dtype``, products in ``compute_dtype`` (default
        ``dtype``); rows are centered in the wider of the two (`_Projection.c0`'s dtype)."""
        n_components, n_features = means.shape
        prec = np.asarray(precisions_cholesky, dtype=np.float64)
        c0 = np.asarray(center).astype(np.result_type(dtype, compute_dtype or dtype))
        dtype = np.dtype(compute_dtype or dtype)
        center = c0.astype(np.float64)  # c0 as rows see it
        d = np.asarray(means, dtype=np.float64) - center
        const = (
            -0.5 * n_features * LOG_2PI
            + np.asarray(log_det_cholesky(prec, covariance_type, n_features))
            + log_weights
        )
        lin = None
        if covariance_type == "full":
            A = prec.transpose(0, 2, 1).reshape(n_components * n_features, n_features)
            b = np.einsum("kd,kde->ke", d, prec).reshape(n_components * n_features, 1)
        elif covariance_type == "tied":
            A = prec.T
            b = (d @ prec)[:, :, None]
        else:
            p2 = (
                prec**2
                if covariance_type == "diag"
                else np.repeat((prec**2)[:, None], n_features, axis=1)
            )
            A = p2
            b = -2.0 * d * p2
            lin = np.sum(d * d * p2, axis=1)[:, None].astype(dtype)
        return cls(
            covariance_type,
            c0,
            d,
            np.broadcast_to(const, (n_components,))[:, None].astype(dtype),
            np.ascontiguousarray(A, dtype=dtype),
            np.ascontiguousarray(b, dtype=dtype),
            lin,
        )

    @classmethod
    def of(
        cls, params: GMMParams, X: np.ndarray, compute_dtype: np.dtype | None = None
    ) -> _Projection:
        """The projection of mixture parameters (log-weights included) for the rows ``X``,
        products in ``compute_dtype`` (default ``X.dtype``)."""
        with np.errstate(divide="ignore"):
            log_weights = np.log(params.weights)
        return cls.build(
            params.means,
            params.precisions_cholesky,
            params.covariance_type,
            log_weights,
            data_center(X),
            X.dtype,
            compute_dtype,
        )

    @property
    def block_rows(self) -> int:
        """Rows per block: `BLOCK_ROWS`, fewer for full covariances with many ``K*D``
        projections, so that the (K*D, rows) projection block stays about
        `BLOCK_ELEMENTS` values (in cache) instead of tens of MB."""
        if self.covariance_type != "full":
            return BLOCK_ROWS
        per_row = self.A.shape[0]  # K*D
        rows = 1 << max(int(BLOCK_ELEMENTS // per_row).bit_length() - 1, 0)
        return int(min(max(rows, MIN_BLOCK_ROWS), BLOCK_ROWS))

    def workspace(self, rows: int) -> _Workspace:
        """Buffers for blocks of ``rows`` rows, reused block after block.

        Reusing them matters beyond allocation cost: Dask's worker processes run with
        ``MALLOC_TRIM_THRESHOLD_`` set, under which glibc maps and unmaps every large
        temporary, and fresh pages made the kernel about 4x slower.
        """
        n_components, dtype = self.const.shape[0], self.const.dtype
        n_features = self.c0.shape[0]
        y_shape = {
            "full": (n_components * n_features, rows),
            "tied": (n_components, n_features, rows),
        }.get(self.covariance_type, (n_components, rows))
        return _Workspace(
            rows,
            np.empty((n_features, rows), dtype),
            np.empty((n_features, rows), dtype),
            np.empty(y_shape, dtype),
            np.empty((n_components, rows), dtype),
            np.empty((3, rows), dtype),
        )

    def log_prob(self, xt: np.ndarray, ws: _Workspace) -> np.ndarray:
        """Weighted log-densities of a centered, transposed block ``xt`` (D, m), into ``ws.lp`` (K, m)."""
        n_components = self.const.shape[0]
        m = xt.shape[1]
        lp = ws.lp
        if self.covariance_type == "full":
            y = np.matmul(self.A, xt, out=ws.y)
            y -= self.b
            y *= y
            np.sum(y.reshape(n_components, -1, m), axis=1, out=lp)
        elif self.covariance_type == "tied":
            np.matmul(self.A, xt, out=ws.tmp)
            y = np.subtract(ws.tmp[None], self.b, out=ws.y)
            y *= y
            np.sum(y, axis=1, out=lp)
        else:
            np.multiply(xt, xt, out=ws.tmp)
            np.matmul(self.A, ws.tmp, out=lp)
            lp += np.matmul(self.b, xt, out=ws.y)
            lp += self.lin
        lp *= -0.5
        lp += self.const
        return lp


@dataclass(frozen=True)
class _Workspace:
    """Per-chunk buffers of `_Projection` for blocks of ``rows`` rows (see `_Projection.workspace`)."""

    rows: int
    xt: np.ndarray  # (D, m) centered block, transposed
    tmp: np.ndarray  # (D, m) scratch
    y: np.ndarray  # projections: full (K*D, m), tied (K, D, m), diag/spherical (K, m)
    lp: np.ndarray  # (K, m) log-densities, then responsibilities
    rows3: np.ndarray  # (3, m): per-row max, total, log-likelihood


def _blocks(
    n_rows: int, workspace: Callable[[int], _Workspace], block_rows: int = BLOCK_ROWS
) -> Iterator[tuple[int, _Workspace]]:
    """``(start, workspace)`` for each block of a chunk; one workspace serves all full blocks."""
    full = workspace(min(block_rows, n_rows)) if n_rows else None
    for start in range(0, n_rows, block_rows):
        rows = min(block_rows, n_rows - start)
        yield start, (full if full is not None and rows == full.rows else workspace(rows))


def _moment_workspace(n_features: int, dtype: np.dtype) -> Callable[[int], _Workspace]:
    """Workspaces for `moment_stats` and `dask_em.init_kernels.min_sq_distances`.

    No log-density buffers.
    """

    def make(rows: int) -> _Workspace:
        empty = np.empty(0, dtype)
        return _Workspace(
            rows,
            np.empty((n_features, rows), dtype),
            np.empty((n_features, rows), dtype),
            empty,
            empty,
            np.empty((3, rows), dtype),
        )

    return make


def _centered(X: np.ndarray, start: int, center: np.ndarray, ws: _Workspace) -> np.ndarray:
    """Rows ``start:start+ws.rows`` of ``X`` minus ``center``, transposed into ``ws.xt`` (D, m).

    The difference is taken in the dtype of ``center`` (and ``X``), then cast to that of
    ``ws.xt``.
    """
    np.subtract(X[start : start + ws.rows].T, center[:, None], out=ws.xt)
    return ws.xt


def _accumulate(
    xt: np.ndarray,
    resp: np.ndarray,
    ws: _Workspace,
    moments: tuple[np.ndarray, np.ndarray, np.ndarray],
    covariance_type: str,
) -> None:
    """Add a block's moments about the block's center to ``moments = (nk, m1, m2)``, in place.

    ``xt`` is the centered block (D, m), ``resp`` the weighted responsibilities (K, m).
    """
    nk, m1, m2 = moments
    nk += resp.sum(axis=1, dtype=np.float64)
    m1 += resp @ xt.T
    if covariance_type == "full":
        for k in range(resp.shape[0]):
            m2[k] += np.multiply(xt, resp[k], out=ws.tmp) @ xt.T
    elif covariance_type == "tied":
        m2 += np.multiply(xt, np.sum(resp, axis=0, out=ws.rows3[0]), out=ws.tmp) @ xt.T
    else:
        m2 += resp @ np.multiply(xt, xt, out=ws.tmp).T


def _shifted(
    moments: tuple[np.ndarray, np.ndarray, np.ndarray], d: np.ndarray, covariance_type: str
) -> tuple[np.ndarray, np.ndarray]:
    """Moments about a center ``c0`` moved to the shifts ``c_k = c0 + d_k``: ``(s1, s2)``.

    ``s1_k = m1_k - n_k d_k`` and ``s2_k = m2_k - m1_k d_k^T - d_k m1_k^T + n_k d_k d_k^T``
    (summed over ``k`` for ``tied``, diagonal only for ``diag``/``spherical``).
    """
    nk, m1, m2 = moments
    s1 = m1 - nk[:, None] * d
    if covariance_type == "full":
        outer = m1[:, :, None] * d[:, None, :]
        s2 = (
            m2
            - outer
            - np.swapaxes(outer, 1, 2)
            + nk[:, None, None] * d[:, :, None] * d[:, None, :]
        )
    elif covariance_type == "tied":
        cross = m1.T @ d
        s2 = m2 - cross - cross.T + (d.T * nk) @ d
    else:
        s2 = m2 - 2.0 * d * m1 + nk[:, None] * d * d
    return s1, s2


def log_gaussian_prob(
    X: np.ndarray, means: np.ndarray, precisions_cholesky: np.ndarray, covariance_type: str
) -> np.ndarray:
    """Log-density of each row under each Gaussian component.

    ``log N(x | mu_k, S_k) = -D/2 log(2 pi) + log det U_k - 1/2 ||(x - mu_k)^T U_k||^2``.

    Parameters
    ----------
    X : ndarray of shape (n, D)
    means : ndarray of shape (K, D)
    precisions_cholesky : ndarray, shape from `dask_em.params.covariance_shape`
    covariance_type : {'full', 'tied', 'diag', 'spherical'}

    Returns
    -------
    log_prob : ndarray of shape (n, K), dtype of ``X``
    """
    means = np.asarray(means, dtype=np.float64)
    proj = _Projection.build(
        means,
        precisions_cholesky,
        covariance_type,
        np.zeros(means.shape[0]),
        data_center(X),
        X.dtype,
    )
    out = np.empty((X.shape[0], means.shape[0]), dtype=X.dtype)
    for start, ws in _blocks(X.shape[0], proj.workspace, proj.block_rows):
        out[start : start + ws.rows] = proj.log_prob(_centered(X, start, proj.c0, ws), ws).T
    return out


def _log_normalize(log_prob: np.ndarray, rows3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log-sum-exp over components of a (K, m) block, in place.

    Shared by `dask_em.kernels_missing` (its blocks of rows with NaN, transposed).

    Parameters
    ----------
    log_prob : ndarray of shape (K, m)
        Weighted log-densities; overwritten.
    rows3 : ndarray of shape (3, m)
        Scratch rows (`_Workspace.rows3`): per-row max, total, then ``norm``.

    Returns
    -------
    norm : ndarray of shape (m,)
        ``log sum_k exp(log_prob)``, in ``rows3[2]``.
    resp : ndarray of shape (K, m)
        ``log_prob`` overwritten by the responsibilities ``exp(log_prob - norm)``.
    """
    top, total, norm = rows3
    np.max(log_prob, axis=0, out=top)
    top[~np.isfinite(top)] = 0.0  # a row with every density -inf stays -inf, not NaN
    log_prob -= top
    resp = np.exp(log_prob, out=log_prob)
    np.sum(resp, axis=0, out=total)
    with np.errstate(divide="ignore", invalid="ignore"):
        resp /= total
        np.log(total, out=norm)
    norm += top
    return norm, resp


def log_prob_resp(
    X: np.ndarray, params: GMMParams, compute_dtype: np.dtype | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row log-likelihood and log-responsibilities (log-sum-exp, no underflow).

    Parameters
    ----------
    X : ndarray of shape (n, D)
    params : GMMParams
    compute_dtype : numpy dtype, optional
        Dtype of the products (`dask_em.choices.COMPUTE_DTYPES`); default ``X.dtype``.

    Returns
    -------
    log_prob_norm : ndarray of shape (n,)
        ``log p(x_i)``, in ``compute_dtype``.
    log_resp : ndarray of shape (n, K)
        ``log p(k | x_i)``, in ``compute_dtype``.
    """
    proj = _Projection.of(params, X, compute_dtype)
    norm = np.empty(X.shape[0], dtype=proj.const.dtype)
    log_resp = np.empty((X.shape[0], params.n_components), dtype=proj.const.dtype)
    for start, ws in _blocks(X.shape[0], proj.workspace, proj.block_rows):
        lp = proj.log_prob(_centered(X, start, proj.c0, ws), ws)
        block_norm, _ = _log_normalize(lp.copy(), ws.rows3)
        norm[start : start + ws.rows] = block_norm
        with np.errstate(invalid="ignore"):
            log_resp[start : start + ws.rows] = (lp - block_norm).T
    return norm, log_resp


def moment_stats(
    X: np.ndarray, resp: np.ndarray, shift: np.ndarray, covariance_type: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shifted moments of a chunk: ``n``, ``s1``, ``s2`` of `dask_em.stats.SuffStats`.

    Parameters
    ----------
    X : ndarray of shape (n, D)
    resp : ndarray of shape (n, K)
        Responsibilities already multiplied by the sample weights.
    shift : ndarray of shape (K, D)
    covariance_type : {'full', 'tied', 'diag', 'spherical'}

    Returns
    -------
    n : ndarray of shape (K,), float64
    s1 : ndarray of shape (K, D), float64
    s2 : ndarray, shape from `dask_em.params.second_moment_shape`, float64
    """
    n_features = X.shape[1]
    n_components = resp.shape[1]
    shift = np.asarray(shift, dtype=np.float64)
    center_x = data_center(X).astype(X.dtype)
    center = center_x.astype(np.float64)
    moments = (
        np.zeros(n_components),
        np.zeros((n_components, n_features)),
        np.zeros(second_moment_shape(covariance_type, n_components, n_features)),
    )
    for start, ws in _blocks(X.shape[0], _moment_workspace(n_features, X.dtype)):
        xt = _centered(X, start, center_x, ws)
        block_resp = np.ascontiguousarray(resp[start : start + ws.rows].T, dtype=X.dtype)
        _accumulate(xt, block_resp, ws, moments, covariance_type)
    s1, s2 = _shifted(moments, shift - center, covariance_type)
    return moments[0], s1, s2


def _check_finite(X: np.ndarray, values: np.ndarray, chunk_index: int, row_start: int) -> None:
    """Raise naming the chunk and the first bad row (``row_start`` is the row of ``X[0]``)."""
    if np.all(np.isfinite(values)):
        return
    if not np.all(np.isfinite(X)):
        bad_rows = np.flatnonzero(~np.isfinite(X).all(axis=1))
        raise DataError(
            f"chunk {chunk_index} contains {bad_rows.size} row(s) with NaN or infinite "
            f"values, the first at row {row_start + int(bad_rows[0])}; clean or drop those "
            "rows before fitting, or fit with {missing} if NaN marks missing values."
        )
    raise DataError(
        f"non-finite log-likelihood in chunk {chunk_index}: the data are too far from every "
        "component for the working precision; scale the input data or pass float64."
    )


def _check_weights(sample_weight: np.ndarray | None, chunk_index: int) -> None:
    """Raise DataError naming the chunk if its sample weights are negative or not finite.

    In-memory weights are validated by the estimator; lazy (Dask) weights only reach
    the chunks, where a bad weight would otherwise surface as a misleading numerical error.
    """
    if sample_weight is None:
        return
    bad = int(np.count_nonzero(~(np.isfinite(sample_weight) & (sample_weight >= 0))))
    if bad:
        raise DataError(
            f"chunk {chunk_index} has {bad} sample weight(s) that are negative, NaN or "
            "infinite; weights must be finite and >= 0."
        )


def em_chunk(
    X: np.ndarray,
    sample_weight: np.ndarray | None,
    chunk_index: int,
    row_start: int,
    params: GMMParams,
    compute_dtype: np.dtype | None = None,
) -> SuffStats:
    """E-step of one chunk: its statistics under ``params``, shifted by ``params.means``.

    Works on blocks of `BLOCK_ROWS` rows centered at ``c0`` (`data_center`): the
    moments about ``c0`` are accumulated with matrix products and moved to the shift
    ``c_k = means_k`` at the end (``s1_k = S1_k - n_k d_k``,
    ``s2_k = S2_k - S1_k d_k^T - d_k S1_k^T + n_k d_k d_k^T`` with ``d_k = c_k - c0``).
    The products run in ``compute_dtype`` (`dask_em.choices.COMPUTE_DTYPES`; default
    ``X.dtype``) on the centered rows; each block's moments are added up in float64.

    Returns
    -------
    SuffStats
        With ``loglik = sum_i w_i log p(x_i)`` and ``worst`` the row of lowest
        ``log p(x_i)`` among those of positive weight (the first such row on ties).

    Raises
    ------
    DataError
        If the chunk holds NaN or infinite values, or negative or non-finite sample
        weights (the message names the chunk).
    """
    _check_weights(sample_weight, chunk_index)
    n_samples, n_features = X.shape
    n_components = params.n_components
    cov_type = params.covariance_type
    proj = _Projection.of(params, X, compute_dtype)
    if _compiled_applies(params, proj):
        # products in float64: float32 rows (compute_dtype="float64") are widened first,
        # as the NumPy path widens them when it centers
        X64 = X.astype(np.float64, copy=False)
        return _em_chunk_compiled(X64, sample_weight, chunk_index, row_start, params, proj)
    moments = (
        np.zeros(n_components),
        np.zeros((n_components, n_features)),
        np.zeros(second_moment_shape(cov_type, n_components, n_features)),
    )
    loglik = 0.0
    worst: tuple[float, int] = (np.inf, -1)  # (log p, row in chunk) of the worst-fitted row
    for start, ws in _blocks(n_samples, proj.workspace, proj.block_rows):
        xt = _centered(X, start, proj.c0, ws)
        norm, resp = _log_normalize(proj.log_prob(xt, ws), ws.rows3)
        _check_finite(X[start : start + ws.rows], norm, chunk_index, row_start + start)
        w = None if sample_weight is None else sample_weight[start : start + ws.rows]
        if w is None:
            loglik += norm.sum(dtype=np.float64)
        else:
            resp *= w.astype(resp.dtype, copy=False)
            loglik += float(norm.astype(np.float64) @ w.astype(np.float64))
        i = _worst_row(norm, w)
        if i >= 0 and float(norm[i]) < worst[0]:
            worst = (float(norm[i]), start + i)
        _accumulate(xt, resp, ws, moments, cov_type)
    s1, s2 = _shifted(moments, proj.d, cov_type)
    return _chunk_stats(X, sample_weight, row_start, (moments[0], s1, s2), loglik, worst)


def _worst_row(norm: np.ndarray, w: np.ndarray | None) -> int:
    """Index of the lowest ``log p(x_i)`` in ``norm`` (n,) among rows of positive weight
    ``w`` (every row when None), the first on ties; -1 if there is none."""
    if w is None:
        return int(np.argmin(norm)) if norm.size else -1
    i = int(np.argmin(np.where(w > 0, norm, np.inf))) if norm.size else -1
    return i if i >= 0 and w[i] > 0 else -1


def _chunk_stats(
    X: np.ndarray,
    sample_weight: np.ndarray | None,
    row_start: int,
    shifted: tuple[np.ndarray, np.ndarray, np.ndarray],
    loglik: float,
    worst: tuple[float, int],
) -> SuffStats:
    """The `SuffStats` of chunk ``X`` (n, D) from its shifted moments ``(n_k, s1, s2)``,
    its log-likelihood and ``worst``, ``(log p, row in the chunk)`` of its worst-fitted
    row (row -1: none)."""
    weight_sum = float(X.shape[0]) if sample_weight is None else sample_weight.sum(dtype=np.float64)
    worst_fit = None
    if worst[1] >= 0:
        at = worst[1]
        weight = 1.0 if sample_weight is None else float(sample_weight[at])
        worst_fit = WorstFit(worst[0], row_start + at, X[at].astype(np.float64), weight)
    return SuffStats(*shifted, loglik, weight_sum, X.shape[0], worst_fit)


_use_compiled = kernels_compiled.available


@contextmanager
def compiled_kernels(enabled: bool) -> Iterator[None]:
    """Run `em_chunk` in this process with (``True``) or without the compiled kernel.

    By default the compiled kernel (`dask_em.kernels_compiled`) serves every chunk it
    applies to when numba is installed; tests and ``benchmarks/kernel_chunk.py`` switch
    it to compare both paths.
    """
    global _use_compiled
    before = _use_compiled
    _use_compiled = enabled and kernels_compiled.available
    try:
        yield
    finally:
        _use_compiled = before


def _compiled_applies(params: GMMParams, proj: _Projection) -> bool:
    """Whether `kernels_compiled.em_full` takes a chunk: numba installed and enabled,
    products in float64 (``proj``'s working dtype: float64 rows, or float32 rows with
    ``compute_dtype="float64"``), at most `kernels_compiled.MAX_FEATURES` features, full
    covariances with upper triangular precision factors (as
    `dask_em.params.validate_params` checks)."""
    return (
        _use_compiled
        and params.covariance_type == "full"
        and proj.const.dtype == np.float64
        and params.means.shape[1] <= kernels_compiled.MAX_FEATURES
        and not np.any(np.tril(params.precisions_cholesky, -1))
    )


def _em_chunk_compiled(
    X: np.ndarray,
    sample_weight: np.ndarray | None,
    chunk_index: int,
    row_start: int,
    params: GMMParams,
    proj: _Projection,
) -> SuffStats:
    """`em_chunk` through `kernels_compiled.em_full` (see `_compiled_applies`): the same
    statistics, moments about ``proj.c0`` shifted as in the NumPy path."""
    n_components, n_features = params.means.shape
    norm, nk, m1, m2 = kernels_compiled.em_full(
        X,
        sample_weight,
        proj.c0,
        params.precisions_cholesky,
        proj.b.reshape(n_components, n_features),
        proj.const[:, 0],
    )
    _check_finite(X, norm, chunk_index, row_start)
    if sample_weight is None:
        loglik = norm.sum()
    else:
        loglik = float(norm @ sample_weight.astype(np.float64))
    at = _worst_row(norm, sample_weight)
    worst = (float(norm[at]), at) if at >= 0 else (np.inf, -1)
    s1, s2 = _shifted((nk, m1, m2), proj.d, "full")
    return _chunk_stats(X, sample_weight, row_start, (nk, s1, s2), loglik, worst)


def _check_rows_finite(X: np.ndarray, norm: np.ndarray, chunk_index: int, row_start: int) -> None:
    """Raise DataError naming the first row of ``X`` with NaN or inf (if ``norm`` shows one).

    Only rows with a non-finite log-likelihood ``norm`` can hold one, so finite chunks
    cost one check of ``norm``.
    """
    if np.all(np.isfinite(norm)):
        return
    bad_rows = np.flatnonzero(~np.isfinite(X).all(axis=1))
    if bad_rows.size:
        raise DataError(
            f"chunk {chunk_index} contains {bad_rows.size} row(s) with NaN or infinite "
            f"values, the first at row {row_start + int(bad_rows[0])}; clean or drop those "
            "rows first."
        )


def _checked_log_prob_resp(
    X: np.ndarray,
    params: GMMParams,
    chunk_index: int,
    row_start: int,
    compute_dtype: np.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`log_prob_resp` of rows that are all finite (DataError naming the first that is not)."""
    with np.errstate(invalid="ignore", over="ignore"):  # a bad row is reported below
        norm, log_resp = log_prob_resp(X, params, compute_dtype)
    _check_rows_finite(X, norm, chunk_index, row_start)
    return norm, log_resp


LogProbResp = Callable[[np.ndarray, GMMParams, int, int], tuple[np.ndarray, np.ndarray]]
"""``log_prob_resp(X, params, chunk_index, row_start) -> (norm, log_resp)``: each row's
log-density, shape (n,), and log-responsibilities, shape (n, K); ``row_start`` is the
global index of ``X[0]``, ``chunk_index`` that of the block (both name a bad row)."""


@dataclass(frozen=True)
class BlockInference:
    """The per-block inference functions over one `LogProbResp`, in the signature of
    `dask_em.reduce.map_rows`: complete rows (`COMPLETE_ROWS`, this module's
    ``score_samples_block`` ...) or rows with missing values
    (`dask_em.kernels_missing`)."""

    log_prob_resp: LogProbResp

    def score_samples_block(
        self, X: np.ndarray, params: GMMParams, chunk_index: int = 0, row_start: int = 0
    ) -> np.ndarray:
        """``log p(x_i)`` for each row: shape (n,)."""
        return self.log_prob_resp(X, params, chunk_index, row_start)[0]

    def predict_proba_block(
        self, X: np.ndarray, params: GMMParams, chunk_index: int = 0, row_start: int = 0
    ) -> np.ndarray:
        """Responsibilities ``p(k | x_i)``: shape (n, K)."""
        return np.exp(self.log_prob_resp(X, params, chunk_index, row_start)[1])

    def predict_block(
        self, X: np.ndarray, params: GMMParams, chunk_index: int = 0, row_start: int = 0
    ) -> np.ndarray:
        """Most probable component of each row: shape (n,), int64."""
        log_resp = self.log_prob_resp(X, params, chunk_index, row_start)[1]
        return np.argmax(log_resp, axis=1).astype(np.int64)


COMPLETE_ROWS = BlockInference(_checked_log_prob_resp)
"""Inference on rows that must be all finite (DataError naming the first that is not)."""
score_samples_block = COMPLETE_ROWS.score_samples_block
predict_proba_block = COMPLETE_ROWS.predict_proba_block
predict_block = COMPLETE_ROWS.predict_block


def e_step(compute_dtype: np.dtype | None = None) -> Callable[..., SuffStats]:
    """`em_chunk` with its products in ``compute_dtype`` (None: `em_chunk` itself)."""
    if compute_dtype is None:
        return em_chunk
    return partial(em_chunk, compute_dtype=np.dtype(compute_dtype))


def inference(compute_dtype: np.dtype | None = None) -> BlockInference:
    """`COMPLETE_ROWS` with its products in ``compute_dtype`` (None: `COMPLETE_ROWS` itself)."""
    if compute_dtype is None:
        return COMPLETE_ROWS
    return BlockInference(partial(_checked_log_prob_resp, compute_dtype=np.dtype(compute_dtype)))
