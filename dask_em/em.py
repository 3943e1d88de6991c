"""The EM driver: iterate E-step passes and M-steps until the lower bound settles.

`em_steps` (plain) and `squarem_steps` (accelerated) run one initialization as
coroutines that ask for E-step passes (`dask_em.passes`); `run_em` serves one with an
``e_step`` function. `fit_restarts` runs ``n_init`` initializations
and their EM runs side by side, sharing every pass over the data, keeps the best, and
can resume from a saved `FitState`. Nothing here knows of Dask, files or the CLI:
callers supply the passes and get optional hooks after every iteration (progress
output, checkpoints).

Semantics are scikit-learn's ``GaussianMixture.fit``: the lower bound of iteration
``t`` is the mean log-likelihood under the parameters *before* that iteration's M-step;
the loop stops when ``|lower_bound_t - lower_bound_{t-1}| < tol`` or after ``max_iter``
iterations.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from dask_em import kernels
from dask_em.errors import IllDefinedCovarianceError, invalid_parameter
from dask_em.params import GMMParams
from dask_em.passes import Pass, Steps, serve_alone, serve_together
from dask_em.reseed import Reseed, reseed
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
    step_max : float
        SQUAREM's current cap on the step length (1 for plain EM); part of the state a
        resumed SQUAREM run needs.
    """

    params: GMMParams
    n_iter: int = 0
    converged: bool = False
    lower_bound: float = float("-inf")
    lower_bounds: list[float] = field(default_factory=list)
    step_max: float = 1.0


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
        What else happened (e.g. an extrapolation rejected), for progress output
        (`remarks` adds the re-seed).
    reseed : Reseed or None
        The empty component this iteration re-seeded (`dask_em.reseed`), if any: the
        next lower bound may be below this one.
    """

    result: EMResult
    change: float
    seconds: float
    resumable: bool = True
    note: str = ""
    reseed: Reseed | None = None

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

    @property
    def remarks(self) -> str:
        """``note`` and the re-seed, if any, as one line for progress output."""
        reseeded = self.reseed.describe() if self.reseed is not None else ""
        return "; ".join(part for part in (self.note, reseeded) if part)


def _advance(
    stats: SuffStats, result: EMResult, tol: float, reg_covar: float
) -> tuple[EMResult, float, Reseed | None]:
    """The M-step on the E-step statistics of ``result.params``, then the re-seed of an
    empty component (`dask_em.reseed`) if there is one.

    Returns the new result, the change of the lower bound and the re-seed done (or None).
    A re-seeded result is not converged: its parameters have not been through EM yet.
    Re-seeding does not depend on ``max_iter``, so a fit resumed with a larger one
    follows the same path.
    """
    lower_bound = stats.mean_loglik
    params = m_step(stats, result.params.means, reg_covar, result.params.covariance_type)
    change = lower_bound - result.lower_bound
    converged = abs(change) < tol
    history = [*result.lower_bounds, lower_bound]
    event = None
    reseeded = reseed(params, stats)
    if reseeded is not None:
        params, event = reseeded
        converged = False
    return (
        EMResult(params, result.n_iter + 1, converged, lower_bound, history, result.step_max),
        change,
        event,
    )


EStepChunk = Callable[..., SuffStats]
"""A chunk function of the E-step, ``fn(X, sample_weight, chunk_index, row_start, params)``:
`dask_em.kernels.em_chunk`, or `dask_em.kernels_missing.em_chunk_missing` for data with NaN."""


def e_step_pass(params: GMMParams, e_step: EStepChunk = kernels.em_chunk) -> Pass:
    """The pass request of an E-step: ``e_step`` (default `dask_em.kernels.em_chunk`) at ``params``."""
    return Pass(e_step, (params,))


def em_steps(
    start: EMResult,
    *,
    tol: float,
    max_iter: int,
    reg_covar: float,
    callback: Callable[[Iteration], None] | None = None,
    e_step: EStepChunk = kernels.em_chunk,
) -> Steps[EMResult]:
    """Plain EM from ``start`` until convergence or ``max_iter`` iterations in all.

    A coroutine (`dask_em.passes`): yields one E-step `Pass` per iteration.

    Parameters
    ----------
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
    e_step : callable, default `dask_em.kernels.em_chunk`
        The E-step's chunk function (`EStepChunk`).

    Returns
    -------
    EMResult
    """
    result = start
    while not result.converged and result.n_iter < max_iter:
        began = time.perf_counter()
        stats = yield e_step_pass(result.params, e_step)
        result, change, event = _advance(stats, result, tol, reg_covar)
        if callback is not None:
            callback(Iteration(result, change, time.perf_counter() - began, reseed=event))
    return result


SQUAREM_STEP_GROWTH = 4.0
"""Factor by which SQUAREM's step-length cap grows after a full-length step is accepted
(and shrinks after one fails): the ``mstep`` of Varadhan & Roland's reference code."""

SQUAREM_STEP_LIMIT = 4.0**6
"""Largest step-length cap SQUAREM may reach."""


def step_length(p0: GMMParams, p1: GMMParams, p2: GMMParams, step_max: float) -> float:
    """SQUAREM's step length ``|r| / |v|`` (scheme S3) clamped to ``[1, step_max]``.

    ``r = p1 - p0`` and ``v = p2 - 2 p1 + p0`` over all parameters; 1 means plain EM.
    """
    x0, x1, x2 = p0.flat(), p1.flat(), p2.flat()
    norm_v = float(np.linalg.norm(x2 - 2.0 * x1 + x0))
    if norm_v == 0.0 or not np.isfinite(norm_v):
        return 1.0
    return float(min(max(float(np.linalg.norm(x1 - x0)) / norm_v, 1.0), step_max))


def extrapolate(
    p0: GMMParams, p1: GMMParams, p2: GMMParams, alpha: float | None = None
) -> GMMParams | None:
    """SQUAREM's extrapolated parameters from three successive EM iterates (scheme S3).

    With ``r = p1 - p0`` and ``v = p2 - 2 p1 + p0``, returns ``p0 + 2 alpha r +
    alpha^2 v`` (Varadhan & Roland 2008), or None when that is plain EM (``alpha = 1``
    gives ``p2``) or not a valid mixture (a weight <= 0, a covariance not positive
    definite).

    Parameters
    ----------
    p0, p1, p2 : GMMParams
    alpha : float, optional
        Step length (>= 1); default `step_length` with no cap beyond `SQUAREM_STEP_LIMIT`.
    """
    if alpha is None:
        alpha = step_length(p0, p1, p2, SQUAREM_STEP_LIMIT)
    if alpha <= 1.0:
        return None
    x0, x1, x2 = p0.flat(), p1.flat(), p2.flat()
    r = x1 - x0
    v = x2 - 2.0 * x1 + x0
    x = x0 + 2.0 * alpha * r + alpha * alpha * v
    k, d = p0.means.shape
    weights = x[:k]
    if np.any(weights <= 0.0) or not np.all(np.isfinite(x)):
        return None
    means = x[k : k + k * d].reshape(k, d)
    cov = x[k + k * d :].reshape(p0.covariances.shape)
    if p0.kind.matrix:
        cov = 0.5 * (cov + np.swapaxes(cov, -1, -2))
    try:
        return GMMParams.from_covariances(weights / weights.sum(), means, cov, p0.covariance_type)
    except IllDefinedCovarianceError:
        return None


def squarem_steps(
    start: EMResult,
    *,
    tol: float,
    max_iter: int,
    reg_covar: float,
    callback: Callable[[Iteration], None] | None = None,
    e_step: EStepChunk = kernels.em_chunk,
) -> Steps[EMResult]:
    """EM accelerated by SQUAREM, with the monotonicity safeguard. Same contract as `em_steps`.

    A cycle from ``p0`` makes two EM iterations (``p1``, ``p2``), extrapolates ``p'``
    with step length ``alpha`` (`step_length`, capped by ``start.step_max``) and runs
    one EM iteration from it. The extrapolation is kept when its lower bound is at least
    that of ``p1``; otherwise that pass is discarded (it counts in ``n_passes_`` but not
    in ``n_iter``) and the cycle ends at ``p2``. An invalid extrapolation falls back to
    ``p2`` without a pass. The cap adapts as in Varadhan & Roland's reference code: it
    grows by `SQUAREM_STEP_GROWTH` when a step at the cap is kept and shrinks by it (not
    below 1) when a step at the cap fails. The recorded lower bounds are those of
    accepted points only and never decrease beyond rounding, except after a re-seed
    (`dask_em.reseed`), which ends a cycle without extrapolating. Convergence (``|change| <
    tol``) is judged on EM steps only, never on an extrapolation's gain. Checkpoints are taken at
    cycle ends only (`Iteration.resumable`), where ``EMResult.step_max`` holds the cap,
    so a resumed fit repeats exactly the cycles of an uninterrupted one.
    """
    result = start

    def done(r: EMResult) -> bool:
        return r.converged or r.n_iter >= max_iter

    def report(
        r: EMResult,
        change: float,
        began: float,
        resumable: bool,
        note: str = "",
        event: Reseed | None = None,
    ) -> None:
        if callback is not None:
            seconds = time.perf_counter() - began
            callback(Iteration(r, change, seconds, resumable or done(r), note, event))

    while not done(result):
        began = time.perf_counter()
        r1, change1, event = _advance(
            (yield e_step_pass(result.params, e_step)), result, tol, reg_covar
        )
        if event is not None:  # a re-seed ends the cycle: no extrapolation across it
            result = r1
            report(result, change1, began, True, event=event)
            continue
        report(r1, change1, began, False)
        if done(r1):
            return r1
        began = time.perf_counter()
        r2, change2, event = _advance((yield e_step_pass(r1.params, e_step)), r1, tol, reg_covar)
        if event is not None:
            result = r2
            report(result, change2, began, True, event=event)
            continue
        step_max = result.step_max
        alpha = step_length(result.params, r1.params, r2.params, step_max)
        at_cap = alpha == step_max
        grown = min(step_max * SQUAREM_STEP_GROWTH, SQUAREM_STEP_LIMIT) if at_cap else step_max
        shrunk = max(1.0, step_max / SQUAREM_STEP_GROWTH) if at_cap else step_max
        candidate = None if done(r2) else extrapolate(result.params, r1.params, r2.params, alpha)
        if candidate is None:  # a plain EM step (alpha = 1) succeeds; an invalid mixture fails
            result = replace(r2, step_max=grown if alpha <= 1.0 else shrunk)
            report(result, change2, began, True)
            continue
        seconds2 = time.perf_counter() - began
        began = time.perf_counter()
        from_candidate = replace(r2, params=candidate, converged=False)
        r3, change3, event = _advance(
            (yield e_step_pass(candidate, e_step)), from_candidate, tol, reg_covar
        )
        if r3.lower_bound >= r2.lower_bound:
            # L(p') - L(p1) is the extrapolation's gain, not an EM step's change: a small
            # one says nothing about convergence, which only EM steps judge
            result = replace(r3, step_max=grown, converged=False)
            if callback is not None:
                callback(Iteration(r2, change2, seconds2, False))
            report(result, change3, began, True, f"extrapolated, step {alpha:.3g}", event)
        else:
            result = replace(r2, step_max=shrunk)
            if callback is not None:
                note = f"extrapolation (step {alpha:.3g}) rejected: lower bound fell; continuing from EM"
                callback(Iteration(result, change2, seconds2, True, note))
    return result


STEPS: dict[str | None, Callable[..., Steps[EMResult]]] = {None: em_steps, "squarem": squarem_steps}
"""The EM coroutine of each ``acceleration``."""

ACCELERATIONS = tuple(STEPS)


def run_em(
    e_step: Callable[[GMMParams], SuffStats],
    start: EMResult,
    *,
    tol: float,
    max_iter: int,
    reg_covar: float,
    callback: Callable[[Iteration], None] | None = None,
    acceleration: str | None = None,
) -> EMResult:
    """One EM run (`em_steps`, or `squarem_steps` with ``acceleration='squarem'``) with
    each E-step served by ``e_step(params) -> SuffStats`` (one pass over the data)."""
    steps = STEPS[acceleration](
        start, tol=tol, max_iter=max_iter, reg_covar=reg_covar, callback=callback
    )
    return serve_alone(steps, lambda p: e_step(p.args[0]), _no_rows)  # type: ignore[no-any-return]


def _no_rows(indices: np.ndarray) -> np.ndarray:
    raise AssertionError("EM runs ask for passes only")


@dataclass(frozen=True)
class FitState:
    """Everything needed to resume a fit with restarts (what a checkpoint holds).

    Attributes
    ----------
    seeds : tuple of int
        Seed of each initialization (``n_init`` of them).
    runs : tuple of (EMResult or None)
        Each initialization's run at its last resumable point (None before its
        initialization is done); shorter than ``seeds`` means None for the rest.
    done : bool
        Whether the whole fit is finished (`best` is the answer).
    """

    seeds: tuple[int, ...]
    runs: tuple[EMResult | None, ...] = ()
    done: bool = False

    def run(self, index: int) -> EMResult | None:
        """The run of initialization ``index`` (None if not initialized yet)."""
        return self.runs[index] if index < len(self.runs) else None

    def describe(self) -> str:
        """Where the fit stands, for progress output (e.g. ``initialization 1 at iteration 4``)."""
        if self.done:
            return "finished fit"
        where = [
            f"initialization {i} at iteration {run.n_iter if run is not None else 0}"
            for i, run in ((i, self.run(i)) for i in range(len(self.seeds)))
        ]
        return ", ".join(where)

    @property
    def best(self) -> EMResult | None:
        """The best run so far by scikit-learn's rule (`better`, in seed order)."""
        best = None
        for run in self.runs:
            if run is not None:
                best = better(best, run)
        return best


def better(best: EMResult | None, candidate: EMResult) -> EMResult:
    """The run to keep of two, by scikit-learn's rule (higher lower bound; a -inf best is replaced)."""
    if best is None or candidate.lower_bound > best.lower_bound or best.lower_bound == -np.inf:
        return candidate
    return best


def fit_restarts(
    run_passes: Callable[[list[Pass]], list[Any]],
    read_rows: Callable[[np.ndarray], np.ndarray],
    initialize: Callable[[int], Steps[GMMParams]],
    state: FitState,
    *,
    tol: float,
    max_iter: int,
    reg_covar: float,
    on_iteration: Callable[[int, Iteration], None] | None = None,
    on_state: Callable[[FitState], None] | None = None,
    acceleration: str | None = None,
    e_step: EStepChunk = kernels.em_chunk,
) -> EMResult:
    """Run one EM per seed of ``state``, all advancing together; return the best run.

    Every initialization and EM run is a coroutine (`dask_em.passes`); they share each
    pass over the data (`dask_em.passes.serve_together`), so ``n_init`` runs read the
    data as often as the longest of them alone. Each run's numbers are those it would
    reach on its own.

    Parameters
    ----------
    run_passes : callable
        ``run_passes(passes) -> answers``: one pass over the data serving every request.
    read_rows : callable
        ``read_rows(indices) -> rows`` (a few rows, not a pass).
    initialize : callable
        ``initialize(seed)``: a coroutine returning the initial `GMMParams`.
    state : FitState
        ``FitState(seeds)`` for a new fit, or a state saved by ``on_state`` to resume.
    tol, max_iter, reg_covar
        As in `em_steps`.
    on_iteration : callable, optional
        Called with the initialization's index and every `Iteration`.
    on_state : callable, optional
        Called with the new `FitState` after every pass that moved a run to a new
        resumable point, and once at the end with ``done=True`` (checkpointing hooks in
        here).
    acceleration : {None, 'squarem'}
        A key of `STEPS`: plain EM (`em_steps`) or `squarem_steps`.
    e_step : callable, default `dask_em.kernels.em_chunk`
        The E-step's chunk function (`EStepChunk`).

    Returns
    -------
    EMResult
        The best run.
    """
    if acceleration not in STEPS:
        raise invalid_parameter("acceleration", acceleration, "use None or 'squarem'")
    steps = STEPS[acceleration]
    if state.done and state.best is not None:
        return state.best
    runs = [state.run(i) for i in range(len(state.seeds))]
    moved = [False]

    def candidate(index: int) -> Steps[EMResult]:
        run = runs[index]
        if run is None:
            run = EMResult((yield from initialize(state.seeds[index])))
            runs[index], moved[0] = run, True

        def step(it: Iteration) -> None:
            if on_iteration is not None:
                on_iteration(index, it)
            if it.resumable:
                runs[index], moved[0] = it.result, True

        finished = yield from steps(
            run, tol=tol, max_iter=max_iter, reg_covar=reg_covar, callback=step, e_step=e_step
        )
        return finished

    def after_pass() -> None:
        if moved[0] and on_state is not None:
            on_state(FitState(state.seeds, tuple(runs)))
        moved[0] = False

    results = serve_together(
        [candidate(i) for i in range(len(state.seeds))], run_passes, read_rows, after_pass
    )
    final = FitState(state.seeds, tuple(results), done=True)
    if on_state is not None:
        on_state(final)
    assert final.best is not None
    return final.best
