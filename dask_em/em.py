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
    """

    result: EMResult
    change: float
    seconds: float

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
    if result.converged:
        return result
    for n_iter in range(start.n_iter + 1, max_iter + 1):
        began = time.perf_counter()
        stats = e_step(result.params)
        lower_bound = stats.mean_loglik
        params = m_step(stats, result.params.means, reg_covar, result.params.covariance_type)
        change = lower_bound - result.lower_bound
        result = EMResult(
            params, n_iter, abs(change) < tol, lower_bound, [*result.lower_bounds, lower_bound]
        )
        if callback is not None:
            callback(Iteration(result, change, time.perf_counter() - began))
        if result.converged:
            break
    return result


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
        Called with the new `FitState` after every initialization and iteration, and
        once at the end with ``done=True`` (checkpointing hooks in here).

    Returns
    -------
    EMResult
        The best run.
    """
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
            if on_state is not None:
                on_state(FitState(state.seeds, index, it.result, best))

        result = run_em(e_step, current, tol=tol, max_iter=max_iter, reg_covar=reg_covar, callback=step)
        best = better(best, result)
    assert best is not None
    if on_state is not None:
        on_state(FitState(state.seeds, len(state.seeds) - 1, None, best, done=True))
    return best
