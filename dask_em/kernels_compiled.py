"""A compiled E-step for full covariances with few features (numba, optional).

For ``D <= MAX_FEATURES`` the NumPy kernel of `dask_em.kernels` spends most of its time
outside arithmetic: products of (K*D, D) by (D, m) are too small for BLAS to reach
speed, and the projections, log-sum-exp, responsibilities and K weighted blocks each
make a pass through memory. `em_full` does a chunk in one pass over its rows, a tile of
`TILE` rows at a time (a tile's buffers stay in cache): the triangular quadratic form
of each component, log-sum-exp, responsibilities and the float64 moments about the
chunk's center, which `dask_em.kernels` shifts to the means as for its NumPy path.
Loops run over the rows of a tile innermost, so the compiler vectorizes them.

Arithmetic is IEEE (no ``fastmath``: infinities and NaN behave as in NumPy) with three
exceptions, each changing rounding only: `_add_moments` may reassociate its sums over
a tile's rows (split into vector lanes, as BLAS does) and fuse multiply-adds; the
quadratic form adds four products at a time; and `_exp_nonpositive` computes the
exponentials of log-sum-exp with a polynomial the compiler vectorizes (within 1 unit
in the last place of ``np.exp``; libm's ``exp``, called once per value, took a third of
the kernel's time). Results differ from the NumPy kernel's by rounding only (1e-14
relative in ``benchmarks/kernel_chunk.py``). Full ``fastmath`` measured no faster.

numba comes with the ``fast`` extra; without it `available` is False and
`dask_em.kernels` keeps its NumPy path. Compiled code is cached in ``__pycache__``
(compiling takes about 2.5 s once; loading it about 0.25 s per process). Nothing here
imports Dask.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

try:
    import numba
except ImportError:  # the ``fast`` extra is not installed
    numba = None

MAX_FEATURES = 16
"""Most features the compiled kernel takes; past this BLAS products run at speed."""

TILE = 128
"""Rows processed together. Measured on one core (``benchmarks/kernel_chunk.py``):
128 rows ran as fast as 64 at K=5, D=8 and 10% faster at K=16, D=16; 32 rows ran 2x
slower, 256 rows 20% slower."""

available = numba is not None
"""Whether numba is importable (the ``fast`` extra)."""


def _jit(fn: Callable, fastmath: bool | set[str] = False) -> Callable:
    """``fn`` compiled by numba at its first call, cached in ``__pycache__`` (or numba's
    user-wide cache; where neither is writable, compiled in every process), IEEE
    arithmetic unless ``fastmath`` says otherwise, NumPy's division semantics (x/0 is
    inf, not an error)."""
    if numba is None:
        return fn
    options = {"fastmath": fastmath, "nogil": True, "error_model": "numpy"}
    try:
        return numba.njit(cache=True, **options)(fn)
    except RuntimeError:  # numba found no writable cache location
        return numba.njit(**options)(fn)


def _jit_contract(fn: Callable) -> Callable:
    """`_jit`, with a multiply followed by an add free to be fused (one rounding)."""
    return _jit(fn, fastmath={"contract"})


def _jit_reassoc(fn: Callable) -> Callable:
    """`_jit`, with sums free to be reassociated (split into vector lanes) and
    multiply-adds fused."""
    return _jit(fn, fastmath={"reassoc", "contract"})


_LN2_HI = 6.93147180369123816490e-01
"""ln 2 rounded to 32 significant bits (fdlibm's ``ln2HI``): ``n * _LN2_HI`` is exact."""
_LN2_LO = 1.90821492927058770002e-10
"""ln 2 - `_LN2_HI`."""
_INV_LN2 = 1.44269504088896338700e00
_SHIFTER = 6755399441055744.0
"""1.5 * 2**52: adding it rounds a float of magnitude below 2**51 to an integer, found
in the low bits of the sum."""
_SHIFTER_BITS = int(np.array([_SHIFTER]).view(np.int64)[0])
_EXP_MINUS_700 = float(np.exp(-700.0))


@_jit_contract
def _exp_nonpositive(  # pragma: no cover - compiled
    x: np.ndarray, out: np.ndarray, kbits: np.ndarray, scale_bits: np.ndarray
) -> None:
    """``out = exp(x)`` for ``x <= 0``, ``-inf`` or NaN, in loops the compiler vectorizes.

    ``x = n ln2 + r`` with ``|r| <= ln2 / 2``; ``exp(r)`` by its Taylor polynomial of
    degree 13 (truncation below 1e-17 relative); ``2**n`` built from its bits. Inputs
    below -700 are shifted by 700 and the result scaled by ``exp(-700)``, so subnormal
    results round as ``np.exp``'s do (within one subnormal step); below -1400 the
    result is 0. Within 1 unit in the last place of ``np.exp`` elsewhere (tested
    over [-708, 0]); ``exp(-inf) = 0`` and NaN stays NaN. Positive
    inputs are outside the domain (the caller uses ``np.exp`` for them).

    ``kbits`` (float64) and ``scale_bits`` (int64), each of ``x``'s length, are scratch.
    """
    n = x.shape[0]
    k_as_int = kbits.view(np.int64)
    scale = scale_bits.view(np.float64)
    for t in range(n):
        v = x[t]
        v_shifted = max(v + 700.0 if v < -700.0 else v, -700.0)
        k_shifted = v_shifted * _INV_LN2 + _SHIFTER
        kbits[t] = k_shifted
        k = k_shifted - _SHIFTER
        r = (v_shifted - k * _LN2_HI) - k * _LN2_LO
        p = 1.0 / 6227020800.0
        p = p * r + 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
        p = p * r + 1.0 / 5040.0
        p = p * r + 1.0 / 720.0
        p = p * r + 1.0 / 120.0
        p = p * r + 1.0 / 24.0
        p = p * r + 1.0 / 6.0
        p = p * r + 0.5
        p = p * r + 1.0
        p = p * r + 1.0
        out[t] = p * (_EXP_MINUS_700 if v < -700.0 else 1.0) * (0.0 if v < -1400.0 else 1.0)
    for t in range(n):  # the bits of 2**k: k in [-1010, 0], so 2**k is a normal number
        scale_bits[t] = (k_as_int[t] - _SHIFTER_BITS + 1023) << 52
    for t in range(n):
        out[t] *= scale[t]


def exp_nonpositive(x: np.ndarray) -> np.ndarray:
    """`_exp_nonpositive` of a 1-d float64 array (for the tests).

    Parameters
    ----------
    x : ndarray of shape (n,), float64
        Values ``<= 0``, ``-inf`` or NaN.

    Returns
    -------
    ndarray of shape (n,)
    """
    x = np.ascontiguousarray(x, np.float64)
    out = np.empty_like(x)
    _exp_nonpositive(x, out, np.empty_like(x), np.empty(x.shape, np.int64))
    return out


@_jit
def _em_full(  # pragma: no cover - compiled
    X: np.ndarray,
    w: np.ndarray,
    c0: np.ndarray,
    U: np.ndarray,
    b: np.ndarray,
    const: np.ndarray,
    norm: np.ndarray,
    nk: np.ndarray,
    m1: np.ndarray,
    m2: np.ndarray,
) -> None:
    """`em_full` into the given outputs; ``w`` of length 0 means unit weights."""
    n, d = X.shape
    k_count = U.shape[0]
    xc = np.zeros((d, TILE))
    y = np.empty(TILE)
    q = np.empty(TILE)
    lp = np.empty((k_count, TILE))
    top = np.empty(TILE)
    total = np.empty(TILE)
    wx = np.empty((d, TILE))
    shifted = np.empty(TILE)
    kbits = np.empty(TILE)
    scale_bits = np.empty(TILE, np.int64)
    nk[:] = 0.0
    m1[:] = 0.0
    m2[:] = 0.0
    has_w = w.shape[0] == n
    for start in range(0, n, TILE):
        rows = min(TILE, n - start)
        for i in range(d):
            ci = c0[i]
            for t in range(rows):
                xc[i, t] = X[start + t, i] - ci
            for t in range(rows, TILE):
                xc[i, t] = 0.0
        # weighted log-densities: const_k - 1/2 ||x_c^T U_k - b_k||^2 (U_k upper triangular)
        for k in range(k_count):
            for t in range(TILE):
                q[t] = 0.0
            for j in range(d):
                bj = b[k, j]
                for t in range(TILE):
                    y[t] = -bj
                i = 0
                while i + 3 <= j:  # four products per pass over y: fewer loads and stores
                    u0, u1, u2, u3 = U[k, i, j], U[k, i + 1, j], U[k, i + 2, j], U[k, i + 3, j]
                    for t in range(TILE):
                        y[t] += (u0 * xc[i, t] + u1 * xc[i + 1, t]) + (
                            u2 * xc[i + 2, t] + u3 * xc[i + 3, t]
                        )
                    i += 4
                while i <= j:
                    uij = U[k, i, j]
                    for t in range(TILE):
                        y[t] += uij * xc[i, t]
                    i += 1
                for t in range(TILE):
                    q[t] += y[t] * y[t]
            ck = const[k]
            for t in range(TILE):
                lp[k, t] = ck - 0.5 * q[t]
        # log-sum-exp over components; responsibilities (times the weights) into lp
        for t in range(TILE):
            top[t] = lp[0, t]
        for k in range(1, k_count):
            for t in range(TILE):
                top[t] = max(top[t], lp[k, t])
        odd = False  # a maximum of +inf or NaN: lp - top may be positive
        for t in range(TILE):
            if not np.isfinite(top[t]):
                odd |= not top[t] < 0.0
                top[t] = 0.0  # a row with every density -inf stays -inf, not NaN
            total[t] = 0.0
        for k in range(k_count):
            for t in range(TILE):
                shifted[t] = lp[k, t] - top[t]
            if odd:
                for t in range(TILE):
                    lp[k, t] = np.exp(shifted[t])
            else:
                _exp_nonpositive(shifted, lp[k], kbits, scale_bits)
            for t in range(TILE):
                total[t] += lp[k, t]
        for t in range(rows):
            norm[start + t] = np.log(total[t]) + top[t]
        for t in range(TILE):
            scale = 0.0
            if t < rows:
                scale = (w[start + t] if has_w else 1.0) / total[t]
            total[t] = scale
        for k in range(k_count):
            for t in range(TILE):
                lp[k, t] *= total[t]
        _add_moments(lp, xc, wx, nk, m1, m2)
    for k in range(k_count):
        for i in range(d):
            for j in range(i):
                m2[k, j, i] = m2[k, i, j]


@_jit_reassoc
def _add_moments(  # pragma: no cover - compiled
    resp: np.ndarray, xc: np.ndarray, wx: np.ndarray, nk: np.ndarray, m1: np.ndarray, m2: np.ndarray
) -> None:
    """Add a tile's moments about the center to ``nk``, ``m1`` and the lower triangle of
    ``m2``: each a sum over the tile's rows, which the compiler splits into vector lanes."""
    k_count, tile = resp.shape
    d = xc.shape[0]
    for k in range(k_count):
        s = 0.0
        for t in range(tile):
            s += resp[k, t]
        nk[k] += s
        for i in range(d):
            s = 0.0
            for t in range(tile):
                wx[i, t] = resp[k, t] * xc[i, t]
                s += wx[i, t]
            m1[k, i] += s
            j = 0
            while j + 3 <= i:  # four sums per pass over wx[i]: fewer loads
                s0 = s1 = s2 = s3 = 0.0
                for t in range(tile):
                    a = wx[i, t]
                    s0 += a * xc[j, t]
                    s1 += a * xc[j + 1, t]
                    s2 += a * xc[j + 2, t]
                    s3 += a * xc[j + 3, t]
                m2[k, i, j] += s0
                m2[k, i, j + 1] += s1
                m2[k, i, j + 2] += s2
                m2[k, i, j + 3] += s3
                j += 4
            while j <= i:
                s = 0.0
                for t in range(tile):
                    s += wx[i, t] * xc[j, t]
                m2[k, i, j] += s
                j += 1


def em_full(
    X: np.ndarray,
    sample_weight: np.ndarray | None,
    center: np.ndarray,
    precisions_cholesky: np.ndarray,
    b: np.ndarray,
    const: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Log-likelihoods and moments about ``center`` of one chunk, full covariances.

    Parameters
    ----------
    X : ndarray of shape (n, D), float64
    sample_weight : ndarray of shape (n,), float64, or None
    center : ndarray of shape (D,), float64
        The chunk's center ``c0``; rows are centered at it before any product.
    precisions_cholesky : ndarray of shape (K, D, D), float64
        Upper triangular factors ``U_k``.
    b : ndarray of shape (K, D), float64
        ``(mu_k - c0)^T U_k``.
    const : ndarray of shape (K,), float64
        ``-D/2 log 2pi + log det U_k + log weight_k``.

    Returns
    -------
    norm : ndarray of shape (n,)
        ``log p(x_i)``.
    nk : ndarray of shape (K,)
        ``sum_i w_i r_ik``.
    m1 : ndarray of shape (K, D)
        ``sum_i w_i r_ik (x_i - c0)``.
    m2 : ndarray of shape (K, D, D)
        ``sum_i w_i r_ik (x_i - c0)(x_i - c0)^T``.
    """
    n, n_features = X.shape
    n_components = precisions_cholesky.shape[0]
    norm = np.empty(n)
    nk = np.empty(n_components)
    m1 = np.empty((n_components, n_features))
    m2 = np.empty((n_components, n_features, n_features))
    w = np.empty(0) if sample_weight is None else np.ascontiguousarray(sample_weight, np.float64)
    _em_full(
        np.ascontiguousarray(X),
        w,
        np.ascontiguousarray(center, np.float64),
        np.ascontiguousarray(precisions_cholesky, np.float64),
        np.ascontiguousarray(b, np.float64),
        np.ascontiguousarray(const, np.float64),
        norm,
        nk,
        m1,
        m2,
    )
    return norm, nk, m1, m2
