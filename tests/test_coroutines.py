"""The coroutine layer on its own: `dask_em.passes` and em.py's step coroutines, no Dask.

A pure-NumPy pass server (`NumpyPasses`) answers the coroutines' requests: a `Pass` is
its chunk function applied to every chunk of an in-memory list and summed in chunk
order, a `Rows` request is answered by indexing. It counts what it is asked, so the
tests check the layer's contract directly:

- one pass serves every pending candidate (`serve_together`, `fit_restarts`);
- a candidate's result is exactly (bit for bit) the same run served alone;
- plain EM (`em_steps`) follows scikit-learn's trajectory from the same initial
  parameters (relative 1e-7), with its convergence and ``max_iter`` rules;
- a fit stopped at any saved `FitState` and resumed from it ends exactly where the
  uninterrupted fit ends, for plain EM and SQUAREM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from oracle import fit_sklearn, rel_err, same_inits

from dask_em.em import (
    EMResult,
    FitState,
    Iteration,
    better,
    em_steps,
    fit_restarts,
    squarem_steps,
)
from dask_em.params import COVARIANCE_TYPES, GMMParams
from dask_em.passes import Pass, Rows, Steps, serve_alone, serve_together

RTOL = 1e-7
TOL = 1e-6
REG_COVAR = 1e-6
N_COMPONENTS = 4
CHUNK_ROWS = 130  # 2,000 rows: 15 chunks of 130 and one of 50


class NumpyPasses:
    """Serves `Pass` and `Rows` requests from row chunks held in memory, counting them.

    Attributes
    ----------
    batches : list of int
        The number of requests each pass served, in order (its length is the number of
        passes).
    row_reads : list of int
        The number of rows each `read_rows` call returned.
    """

    def __init__(self, X: np.ndarray, chunk_rows: int = CHUNK_ROWS) -> None:
        self.X = X
        self.chunks = [
            (X[start : start + chunk_rows], index, start)
            for index, start in enumerate(range(0, X.shape[0], chunk_rows))
        ]
        self.batches: list[int] = []
        self.row_reads: list[int] = []

    @property
    def n_passes(self) -> int:
        """Passes over the data served so far."""
        return len(self.batches)

    def run_passes(self, passes: list[Pass]) -> list[Any]:
        """One pass: every request's chunk function on each chunk, summed in chunk order."""
        self.batches.append(len(passes))
        return [self._reduce(p) for p in passes]

    def run_pass(self, request: Pass) -> Any:
        """One pass serving one request (what `serve_alone` wants)."""
        return self.run_passes([request])[0]

    def read_rows(self, indices: np.ndarray) -> np.ndarray:
        """The rows at ``indices``, in that order."""
        self.row_reads.append(len(indices))
        return self.X[np.asarray(indices, dtype=np.int64)]

    def _reduce(self, request: Pass) -> Any:
        total = None
        for block, index, start in self.chunks:
            value = request.fn(block, None, index, start, *request.args)
            total = value if total is None else total + value
        return total


def start_params(inits: dict[str, np.ndarray], covariance_type: str) -> GMMParams:
    """The `GMMParams` scikit-learn starts from with these ``*_init`` arguments."""
    return GMMParams.from_precisions(
        inits["weights_init"], inits["means_init"], inits["precisions_init"], covariance_type
    )


def run_alone(
    X: np.ndarray, start: EMResult, steps: Callable[..., Steps[EMResult]], max_iter: int
) -> tuple[EMResult, list[Iteration], NumpyPasses]:
    """``steps`` from ``start`` served alone; the result, its iterations and the server."""
    server = NumpyPasses(X)
    seen: list[Iteration] = []
    result = serve_alone(
        steps(start, tol=TOL, max_iter=max_iter, reg_covar=REG_COVAR, callback=seen.append),
        server.run_pass,
        server.read_rows,
    )
    return result, seen, server


def assert_same_run(a: EMResult, b: EMResult) -> None:
    """Two runs are bit for bit the same."""
    assert (a.n_iter, a.converged, a.step_max) == (b.n_iter, b.converged, b.step_max)
    assert a.lower_bounds == b.lower_bounds and a.lower_bound == b.lower_bound
    np.testing.assert_array_equal(a.params.flat(), b.params.flat())
    np.testing.assert_array_equal(a.params.precisions_cholesky, b.params.precisions_cholesky)


def rows_initializer(X: np.ndarray, covariance_type: str) -> Callable[[int], Steps[GMMParams]]:
    """An initializer coroutine independent of `dask_em.init`: means at ``K`` random rows
    (one `Rows` request), equal weights and diagonal precisions (`oracle.same_inits`)."""

    def initialize(seed: int) -> Steps[GMMParams]:
        indices = np.random.default_rng(seed).choice(X.shape[0], N_COMPONENTS, replace=False)
        means = yield Rows(indices)
        return start_params(same_inits(X, covariance_type, means), covariance_type)

    return initialize


@pytest.fixture
def data(make_mixture) -> np.ndarray:
    return make_mixture(2000, 3, N_COMPONENTS, seed=0)


# ---------------------------------------------------------------- serve_together
def count_rows(X: np.ndarray, w: None, chunk_index: int, row_start: int, scale: int) -> int:
    return scale * X.shape[0]


def passes_then_rows(n_passes: int, scale: int) -> Steps[tuple[list[int], np.ndarray]]:
    """Asks for ``n_passes`` passes, then for rows ``0..scale``; returns what it got."""
    answers = []
    for _ in range(n_passes):
        answers.append((yield Pass(count_rows, (scale,))))
    rows = yield Rows(np.arange(scale))
    return answers, rows


def test_one_pass_serves_every_pending_request_and_rows_are_read_together(data):
    server = NumpyPasses(data)
    after: list[int] = []
    results = serve_together(
        [passes_then_rows(1, 1), passes_then_rows(3, 2), passes_then_rows(0, 3)],
        server.run_passes,
        server.read_rows,
        lambda: after.append(server.n_passes),
    )

    n = data.shape[0]
    assert [answers for answers, _ in results] == [[n], [2 * n] * 3, []]
    for (_, rows), scale in zip(results, (1, 2, 3), strict=True):
        np.testing.assert_array_equal(rows, data[:scale])
    assert server.batches == [2, 1, 1]  # three passes: the longest coroutine's
    assert after == [1, 2, 3]  # after_pass once after each pass
    # rows: the third (no passes) with the first pass's requests, then one read each
    assert server.row_reads == [3, 1, 2]


def test_serve_alone_returns_the_coroutines_result_with_one_pass_per_request(data):
    server = NumpyPasses(data)
    answers, rows = serve_alone(passes_then_rows(4, 5), server.run_pass, server.read_rows)
    assert answers == [5 * data.shape[0]] * 4
    np.testing.assert_array_equal(rows, data[:5])
    assert server.batches == [1, 1, 1, 1]


# ----------------------------------------------------------------------- em_steps
def em_and_sklearn(
    X: np.ndarray, inits: dict[str, np.ndarray], covariance_type: str, max_iter: int
) -> tuple[EMResult, list[Iteration], NumpyPasses, Any]:
    """`em_steps` served alone and scikit-learn, from the same ``*_init`` parameters."""
    sk = fit_sklearn(
        X,
        n_components=N_COMPONENTS,
        covariance_type=covariance_type,
        tol=TOL,
        max_iter=max_iter,
        reg_covar=REG_COVAR,
        **inits,
    )
    start = EMResult(start_params(inits, covariance_type))
    return (*run_alone(X, start, em_steps, max_iter), sk)


def assert_same_trajectory(result: EMResult, sk: Any) -> None:
    """The run's iterations, lower bounds and parameters are scikit-learn's (1e-7)."""
    assert result.converged == sk.converged_ and result.n_iter == sk.n_iter_
    np.testing.assert_allclose(result.lower_bounds, sk.lower_bounds_, rtol=RTOL)
    assert rel_err(result.params.weights, sk.weights_) <= RTOL
    assert rel_err(result.params.means, sk.means_) <= RTOL
    assert rel_err(result.params.covariances, sk.covariances_) <= RTOL
    assert rel_err(result.params.precisions_cholesky, sk.precisions_cholesky_) <= RTOL


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_em_steps_follow_sklearn_from_the_same_start(data, given_inits, covariance_type):
    inits = given_inits(data, N_COMPONENTS, covariance_type)
    result, seen, server, sk = em_and_sklearn(data, inits, covariance_type, 300)

    assert sk.converged_ and sk.n_iter_ >= 10, "the case must take many EM iterations"
    assert_same_trajectory(result, sk)
    assert server.n_passes == result.n_iter  # one E-step pass per iteration
    # the callback sees every iteration, 1-based, with its change of the lower bound
    assert [it.n_iter for it in seen] == list(range(1, result.n_iter + 1))
    assert [it.lower_bound for it in seen] == result.lower_bounds
    changes = np.diff(result.lower_bounds)
    assert seen[0].change == np.inf
    np.testing.assert_array_equal([it.change for it in seen[1:]], changes)
    # converged exactly when |change| < tol: at the last iteration and not before
    assert np.all(np.abs(changes[:-1]) >= TOL) and abs(changes[-1]) < TOL
    assert [it.converged for it in seen] == [False] * (result.n_iter - 1) + [True]


@pytest.mark.parametrize("covariance_type", ["full", "spherical"])
def test_em_steps_stop_at_max_iter_like_sklearn(data, given_inits, covariance_type):
    inits = given_inits(data, N_COMPONENTS, covariance_type)
    result, _, server, sk = em_and_sklearn(data, inits, covariance_type, 5)

    assert not sk.converged_
    assert_same_trajectory(result, sk)
    assert result.n_iter == server.n_passes == 5


def test_a_warm_start_measures_its_first_change_from_its_lower_bound(data, given_inits):
    params = start_params(given_inits(data, N_COMPONENTS, "tied"), "tied")
    cold, _, _ = run_alone(data, EMResult(params), em_steps, 3)
    warm, seen, _ = run_alone(data, EMResult(params, lower_bound=0.0), em_steps, 3)

    assert warm.lower_bounds == cold.lower_bounds
    assert seen[0].change == cold.lower_bounds[0] < 0.0  # the fall from 0, signed
    assert not seen[0].converged
    # the same start with its own first lower bound converges at once
    again, seen, _ = run_alone(
        data, EMResult(params, lower_bound=cold.lower_bounds[0]), em_steps, 3
    )
    assert again.converged and again.n_iter == 1 and seen[0].change == 0.0


@pytest.mark.parametrize("steps", [em_steps, squarem_steps])
def test_max_iter_counts_the_iterations_of_the_start(data, given_inits, steps):
    """A run at ``max_iter`` or converged is returned as it is; a run at ``n_iter``
    does only ``max_iter - n_iter`` more (the resume rule)."""
    start = EMResult(start_params(given_inits(data, N_COMPONENTS, "diag"), "diag"))
    five, _, _ = run_alone(data, start, steps, 5)
    again, seen, server = run_alone(data, five, steps, 5)
    assert again is five and seen == [] and server.n_passes == 0
    done = EMResult(start.params, n_iter=2, converged=True)
    assert run_alone(data, done, steps, 300)[0] is done

    eight, _, _ = run_alone(data, start, steps, 8)
    assert eight.n_iter == 8 and not eight.converged
    if steps is em_steps:  # plain EM: every iteration a pass and a resumable point
        more, _, server = run_alone(data, five, steps, 8)
        assert server.n_passes == 3
        assert_same_run(more, eight)


def test_squarem_reaches_the_same_optimum_in_fewer_passes_without_decreasing(data, given_inits):
    start = EMResult(start_params(given_inits(data, N_COMPONENTS, "full"), "full"))
    plain, _, plain_server = run_alone(data, start, em_steps, 300)
    fast, seen, fast_server = run_alone(data, start, squarem_steps, 300)

    assert plain.converged and fast.converged
    assert fast_server.n_passes < plain_server.n_passes
    assert fast_server.n_passes >= fast.n_iter  # rejected extrapolations cost a pass
    assert np.all(np.diff(fast.lower_bounds) >= -1e-12 * abs(fast.lower_bound))
    assert abs(fast.lower_bound - plain.lower_bound) <= 1e-5 * abs(plain.lower_bound)
    assert seen[-1].resumable and seen[-1].result is fast


# ---------------------------------------------------------------- fit_restarts
SEEDS = (3, 11, 29)


def fit(
    X: np.ndarray,
    state: FitState,
    covariance_type: str,
    acceleration: str | None = None,
    max_iter: int = 300,
) -> tuple[EMResult, NumpyPasses, list[FitState], dict[int, list[Iteration]]]:
    """`fit_restarts` on a fresh `NumpyPasses`: the best run, the server, the saved
    states and each initialization's iterations."""
    server = NumpyPasses(X)
    states: list[FitState] = []
    iterations: dict[int, list[Iteration]] = {}
    best = fit_restarts(
        server.run_passes,
        server.read_rows,
        rows_initializer(X, covariance_type),
        state,
        tol=TOL,
        max_iter=max_iter,
        reg_covar=REG_COVAR,
        on_iteration=lambda i, it: iterations.setdefault(i, []).append(it),
        on_state=states.append,
        acceleration=acceleration,
    )
    return best, server, states, iterations


def alone(
    X: np.ndarray, seed: int, covariance_type: str, acceleration: str | None
) -> tuple[EMResult, int, list[Iteration]]:
    """One initialization's run served alone, its number of passes and its iterations."""
    server = NumpyPasses(X)
    seen: list[Iteration] = []
    params = serve_alone(
        rows_initializer(X, covariance_type)(seed), server.run_pass, server.read_rows
    )
    steps = squarem_steps if acceleration == "squarem" else em_steps
    result = serve_alone(
        steps(EMResult(params), tol=TOL, max_iter=300, reg_covar=REG_COVAR, callback=seen.append),
        server.run_pass,
        server.read_rows,
    )
    return result, server.n_passes, seen


@pytest.mark.parametrize(
    ("covariance_type", "acceleration"), [("full", None), ("tied", "squarem"), ("diag", None)]
)
def test_restarts_share_passes_and_each_run_equals_the_run_alone(
    data, covariance_type, acceleration
):
    best, server, states, iterations = fit(data, FitState(SEEDS), covariance_type, acceleration)
    runs = [alone(data, seed, covariance_type, acceleration) for seed in SEEDS]

    final = states[-1]
    assert final.done and final.seeds == SEEDS
    for index, ((run, _, seen), shared) in enumerate(zip(runs, final.runs, strict=True)):
        assert_same_run(shared, run)
        reported = iterations[index]
        assert [(it.n_iter, it.resumable, it.note) for it in reported] == [
            (it.n_iter, it.resumable, it.note) for it in seen
        ]
        assert [it.lower_bound for it in reported] == [it.lower_bound for it in seen]
    passes = [n for _, n, _ in runs]
    assert len(set(passes)) > 1, "the runs should take different numbers of passes"
    assert server.n_passes == max(passes)  # each pass serves every run still going
    assert server.batches == sorted(server.batches, reverse=True)
    assert server.batches[0] == len(SEEDS)
    assert server.batches.count(len(SEEDS)) == min(passes)
    assert server.row_reads == [len(SEEDS) * N_COMPONENTS]  # initializers' rows: one read
    # the best by scikit-learn's rule: the highest lower bound, first on ties
    lower = [run.lower_bound for run, _, _ in runs]
    assert best is final.runs[int(np.argmax(lower))]
    assert final.best is best


@pytest.mark.parametrize("acceleration", [None, "squarem"])
def test_a_fit_resumed_from_any_saved_state_ends_as_the_uninterrupted_one(data, acceleration):
    best, server, states, _ = fit(data, FitState(SEEDS), "full", acceleration)
    assert len(states) > 10
    if acceleration is None:  # every pass moves every running candidate to a resumable point
        assert len(states) == server.n_passes + 1
    checked = 0
    for k in range(0, len(states) - 1, max(1, len(states) // 6)):
        resumed, again, later, _ = fit(data, states[k], "full", acceleration)
        assert_same_run(resumed, best)
        for a, b in zip(later[-1].runs, states[-1].runs, strict=True):
            assert_same_run(a, b)
        progressed = any(run is not None and run.n_iter > 0 for run in states[k].runs)
        assert again.n_passes < server.n_passes if progressed else again.n_passes == server.n_passes
        if acceleration is None:
            assert again.n_passes == server.n_passes - (k + 1)
        not_started = sum(states[k].run(i) is None for i in range(len(SEEDS)))
        assert again.row_reads == ([not_started * N_COMPONENTS] if not_started else [])
        checked += 1
    assert checked >= 5
    # a finished state is answered without reading the data
    finished, again, later, _ = fit(data, states[-1], "full", acceleration)
    assert finished is states[-1].best and again.n_passes == 0 and later == []


def test_saved_states_hold_every_runs_last_resumable_point(data):
    _, _, states, iterations = fit(data, FitState(SEEDS), "diag", "squarem")
    # SQUAREM: only cycle ends are resumable; every saved run is one of those
    resumable = {id(it.result) for its in iterations.values() for it in its if it.resumable}
    for state in states[:-1]:
        assert not state.done
        for index, run in enumerate(state.runs):
            assert run is None or run.n_iter == 0 or id(run) in resumable, (index, run.n_iter)
    assert any(not it.resumable for its in iterations.values() for it in its)


def test_max_iter_stops_every_run_of_a_fit(data):
    best, server, states, iterations = fit(data, FitState(SEEDS), "spherical", max_iter=4)
    assert server.n_passes == 4
    assert all(run.n_iter == 4 and not run.converged for run in states[-1].runs)
    assert all(len(its) == 4 for its in iterations.values())
    assert best is states[-1].best


def test_the_best_run_is_the_first_of_equal_ones_and_replaces_a_minus_inf_one(data, given_inits):
    best, _, states, _ = fit(data, FitState((3, 3)), "diag", max_iter=6)
    first, second = states[-1].runs
    assert_same_run(first, second)
    assert best is first  # scikit-learn keeps the first of equal lower bounds

    start = EMResult(start_params(given_inits(data, N_COMPONENTS, "diag"), "diag"))
    assert start.lower_bound == -np.inf
    later = EMResult(start.params)
    assert better(start, later) is later  # a -inf best is replaced, even by -inf
    assert better(None, start) is start
    assert FitState((1, 2), (start, None)).best is start
    assert FitState((1, 2), (None, None)).best is None
