"""The EM driver: iterate E-step passes and M-steps until the lower bound settles.

`run_em` runs one initialization; `fit_restarts` runs ``n_init`` of them, keeps the
best, and can resume from a saved `FitState`. Neither knows of Dask, files or the CLI:
they are given an ``e_step`` function (one pass over the data returning reduced
`SuffStats`) and call optional hooks after every iteration (progress output,
checkpoints).

Semantics are scikit-learn's ``GaussianMixture.fit``: the lower bound of iteration
``t`` is the mean log-likelihood under the parameters *before* that iteration's M-step;
the loop stops when ``|lower_bound_t - lower_bound_{t-1}| < tol`` or after ``max_iter``
iterations.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dask_em.params import GMMParams
from dask_em.stats import SuffStats, m_step


@dataclass
class EMResult:
    """State of one EM run (one initialization).

    Attributes
    ----------
    params : GMMParams
        Parameters after the last M-step (the initial ones when ``n_iter == 0``).
    n_iter : int
        Iterations done.
    converged : bool
    lower_bound : float
        The last lower bound (``-inf`` before the first iteration).
    lower_bounds : list of float
        The lower bound of every iteration.
    """

    params: GMMParams
    n_iter: int = 0
    converged: bool = False
    lower_bound: float = float("-inf")
    lower_bounds: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Iteration:
    """What one EM iteration produced (passed to callbacks).

    Attributes
    ----------
    result : EMResult
        The run after this iteration: ``result.lower_bound`` is the mean
        log-likelihood under the parameters before this iteration's M-step and
        ``result.params`` the parameters after it.
    change : float
        ``lower_bound`` minus the previous one (``inf`` on a first iteration).
    seconds : float
        Wall time of the iteration.
    resumable : bool
        Whether ``result`` is a point a fit can resume from with the same outcome
        (always for plain EM; for SQUAREM only at the end of an acceleration cycle).
    note : str
        What else happened (e.g. an extrapolation rejected), for progress output.
    """

    result: EMResult
    change: float
    seconds: float
    resumable: bool = True
    note: str = ""

    @property
    def n_iter(self) -> int:
        """1-based iteration number."""
        return self.result.n_iter

    @property
    def lower_bound(self) -> float:
        """Lower bound of this iteration."""
        return self.result.lower_bound

    @property
    def converged(self) -> bool:
        """Whether ``|change| < tol``."""
        return self.result.converged


def em_step(
    e_step: Callable[[GMMParams], SuffStats], result: EMResult, tol: float, reg_covar: float
) -> tuple[EMResult, float]:
    """One EM iteration (one pass) from ``result``; returns the new result and the change."""
    stats = e_step(result.params)
    lower_bound = stats.mean_loglik
    params = m_step(stats, result.params.means, reg_covar, result.params.covariance_type)
    change = lower_bound - result.lower_bound
    history = [*result.lower_bounds, lower_bound]
    return EMResult(params, result.n_iter + 1, abs(change) < tol, lower_bound, history), change


def run_em(
    e_step: Callable[[GMMParams], SuffStats],
    start: EMResult,
    *,
    tol: float,
    max_iter: int,
    reg_covar: float,
    callback: Callable[[Iteration], None] | None = None,
) -> EMResult:
    """Run EM from ``start`` until convergence or ``max_iter`` iterations in all.

    Parameters
    ----------
    e_step : callable
        ``e_step(params) -> SuffStats`` of the whole data, shifted by ``params.means``.
    start : EMResult
        Where to start: fresh parameters (``EMResult(params)``), a warm start
        (``lower_bound`` set to the previous fit's), or a resumed run (``n_iter``
        iterations already done; a converged run is returned as it is).
    tol : float
        Convergence threshold on the change of the lower bound.
    max_iter : int
        Maximum number of iterations, counting those of ``start``.
    reg_covar : float
        Added to the diagonal of the covariances in the M-step.
    callback : callable, optional
        Called with an `Iteration` after every iteration.

    Returns
    -------
    EMResult
    """
    result = start
    while not result.converged and result.n_iter < max_iter:
        began = time.perf_counter()
        result, change = em_step(e_step, result, tol, reg_covar)
        if callback is not None:
            callback(Iteration(result, change, time.perf_counter() - began))
    return result


SQUAREM_STEP_MAX = 64.0
"""Largest SQUAREM step length ``|alpha|``: fixed, so a resumed fit repeats the same steps."""


def _as_vector(params: GMMParams) -> np.ndarray:
    return np.concatenate([params.weights, params.means.ravel(), params.covariances.ravel()])


def extrapolate(p0: GMMParams, p1: GMMParams, p2: GMMParams) -> GMMParams | None:
    """SQUAREM's extrapolated parameters from three successive EM iterates (scheme S3).

    With ``r = p1 - p0``, ``v = p2 - 2 p1 + p0`` and ``alpha = -|r| / |v|`` clamped to
    ``[-SQUAREM_STEP_MAX, -1]``, returns ``p0 - 2 alpha r + alpha^2 v`` (Varadhan &
    Roland 2008), or None when that is plain EM (``alpha = -1`` gives ``p2``) or not a
    valid mixture (a weight <= 0, a covariance not positive definite).
    """
    x0, x1, x2 = _as_vector(p0), _as_vector(p1), _as_vector(p2)
    r = x1 - x0
    v = x2 - 2.0 * x1 + x0
    norm_v = float(np.linalg.norm(v))
    if norm_v == 0.0:
        return None
    alpha = max(min(-float(np.linalg.norm(r)) / norm_v, -1.0), -SQUAREM_STEP_MAX)
    if alpha == -1.0:
        return None
    x = x0 - 2.0 * alpha * r + alpha * alpha * v
    k, d = p0.means.shape
    weights = x[:k]
    if np.any(weights <= 0.0) or not np.all(np.isfinite(x)):
        return None
    means = x[k : k + k * d].reshape(k, d)
    cov = x[k + k * d :].reshape(p0.covariances.shape)
    if p0.covariance_type in ("full", "tied"):
        cov = 0.5 * (cov + np.swapaxes(cov, -1, -2))
    try:
        return GMMParams.from_covariances(weights / weights.sum(), means, cov, p0.covariance_type)
    except ValueError:
        return None


def run_squarem(
    e_step: Callable[[GMMParams], SuffStats],
    start: EMResult,
    *,
    tol: float,
    max_iter: int,
    reg_covar: float,
    callback: Callable[[Iteration], None] | None = None,
) -> EMResult:
    """EM accelerated by SQUAREM, with the monotonicity safeguard. Same contract as `run_em`.

    A cycle from ``p0`` makes two EM iterations (``p1``, ``p2``), extrapolates ``p'``
    (`extrapolate`) and runs one EM iteration from it. The extrapolation is kept when its
    lower bound is at least that of ``p1``; otherwise that pass is discarded (it counts
    in ``n_passes_`` but not in ``n_iter``) and the cycle ends at ``p2``. An invalid
    extrapolation falls back to ``p2`` without a pass. The recorded lower bounds are thus
    those of accepted points only and never decrease beyond rounding. Checkpoints are
    taken at cycle ends only (`Iteration.resumable`), so a resumed fit repeats exactly
    the cycles of an uninterrupted one.
    """
    result = start

    def done(r: EMResult) -> bool:
        return r.converged or r.n_iter >= max_iter

    def report(r: EMResult, change: float, began: float, resumable: bool, note: str = "") -> None:
        if callback is not None:
            callback(Iteration(r, change, time.perf_counter() - began, resumable or done(r), note))

    while not done(result):
        began = time.perf_counter()
        r1, change1 = em_step(e_step, result, tol, reg_covar)
        report(r1, change1, began, False)
        if done(r1):
            return r1
        began = time.perf_counter()
        r2, change2 = em_step(e_step, r1, tol, reg_covar)
        candidate = None if done(r2) else extrapolate(result.params, r1.params, r2.params)
        if candidate is None:
            report(r2, change2, began, True)
            result = r2
            continue
        seconds2 = time.perf_counter() - began
        began = time.perf_counter()
        from_candidate = EMResult(candidate, r2.n_iter, False, r2.lower_bound, r2.lower_bounds)
        r3, change3 = em_step(e_step, from_candidate, tol, reg_covar)
        accepted = r3.lower_bound >= r2.lower_bound
        if callback is not None:
            note = (
                "" if accepted else "extrapolation rejected (lower bound fell); continuing from EM"
            )
            callback(Iteration(r2, change2, seconds2, not accepted, note))
        if accepted:
            report(r3, change3, began, True, "extrapolated")
            result = r3
        else:
            result = r2
    return result


ACCELERATIONS: dict[str | None, Callable[..., EMResult]] = {None: run_em, "squarem": run_squarem}


@dataclass(frozen=True)
class FitState:
    """Everything needed to resume a fit with restarts (what a checkpoint holds).

    Attributes
    ----------
    seeds : tuple of int
        Seed of each initialization (``n_init`` of them).
    init_index : int
        The initialization in progress.
    current : EMResult or None
        Its run so far (None before its initialization is done).
    best : EMResult or None
        Best finished run of the earlier initializations.
    done : bool
        Whether the whole fit is finished (``best`` is the answer).
    """

    seeds: tuple[int, ...]
    init_index: int = 0
    current: EMResult | None = None
    best: EMResult | None = None
    done: bool = False


def better(best: EMResult | None, candidate: EMResult) -> EMResult:
    """The run to keep of two, by scikit-learn's rule (higher lower bound; a -inf best is replaced)."""
    if best is None or candidate.lower_bound > best.lower_bound or best.lower_bound == -np.inf:
        return candidate
    return best


def fit_restarts(
    e_step: Callable[[GMMParams], SuffStats],
    initialize: Callable[[int], EMResult],
    state: FitState,
    *,
    tol: float,
    max_iter: int,
    reg_covar: float,
    on_iteration: Callable[[Iteration], None] | None = None,
    on_state: Callable[[FitState], None] | None = None,
    acceleration: str | None = None,
) -> EMResult:
    """Run one EM per seed of ``state`` from where ``state`` stands; return the best run.

    Parameters
    ----------
    e_step : callable
        ``e_step(params) -> SuffStats`` (one pass over the data).
    initialize : callable
        ``initialize(seed) -> EMResult``: the starting point of an initialization.
    state : FitState
        ``FitState(seeds)`` for a new fit, or a state saved by ``on_state`` to resume.
    tol, max_iter, reg_covar
        As in `run_em`.
    on_iteration : callable, optional
        Called with every `Iteration`.
    on_state : callable, optional
        Called with the new `FitState` after every initialization and every
        resumable iteration, and once at the end with ``done=True`` (checkpointing
        hooks in here).
    acceleration : {None, 'squarem'}
        A key of `ACCELERATIONS`: plain EM (`run_em`) or `run_squarem`.

    Returns
    -------
    EMResult
        The best run.
    """
    if acceleration not in ACCELERATIONS:
        raise ValueError(f"Invalid acceleration {acceleration!r}: use None or 'squarem'.")
    run = ACCELERATIONS[acceleration]
    if state.done and state.best is not None:
        return state.best
    best = state.best
    for index in range(state.init_index, len(state.seeds)):
        current = state.current if index == state.init_index else None
        if current is None:
            current = initialize(state.seeds[index])
            if on_state is not None:
                on_state(FitState(state.seeds, index, current, best))

        def step(it: Iteration, index: int = index, best: EMResult | None = best) -> None:
            if on_iteration is not None:
                on_iteration(it)
            if on_state is not None and it.resumable:
                on_state(FitState(state.seeds, index, it.result, best))

        result = run(
            e_step, current, tol=tol, max_iter=max_iter, reg_covar=reg_covar, callback=step
        )
        best = better(best, result)
    assert best is not None
    if on_state is not None:
        on_state(FitState(state.seeds, len(state.seeds) - 1, None, best, done=True))
    return best
