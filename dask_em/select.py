"""Model selection over the number of components and the covariance type, sharing passes.

`select` fits every candidate ``(n_components, covariance_type)`` (each with its own
``n_init`` initializations) in the **same** passes over the data: every candidate's
initialization and EM run is a coroutine (`dask_em.passes`) and `dask_em.em.fit_restarts`
serves them all together, so the whole selection reads the data as often as its slowest
candidate alone, plus one pass that scores every candidate's final parameters. Each
candidate's numbers are those of ``GaussianMixture(n_components, covariance_type=...,
random_state=...)`` fitted alone: the seeds of its initializations are drawn from
``random_state`` exactly as the estimator draws them.

The state of a selection is a `dask_em.em.FitState` over every (candidate,
initialization) run, keyed by the run's index in the selection's table (the table, with
each run's seed, is part of the checkpoint's fingerprint); it is saved with
`dask_em.checkpoint.Checkpoint` after every pass that moved a run, so a selection
resumes like ``fit``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.utils import check_random_state

from dask_em.checkpoint import Checkpoint, data_fingerprint
from dask_em.choices import CRITERIA
from dask_em.em import EMResult, FitState, Iteration, better, fit_restarts
from dask_em.errors import DataError, ParameterError, invalid_parameter
from dask_em.estimator import GaussianMixture, check_compute_dtype, information_criteria
from dask_em.init import initialize
from dask_em.params import GMMParams, n_parameters
from dask_em.passes import Steps
from dask_em.reduce import DEFAULT_SPLIT_EVERY, RowData, check_chunk_memory


@dataclass(frozen=True)
class Candidate:
    """One fitted candidate of a selection (a row of its table).

    Attributes
    ----------
    n_components : int
    covariance_type : str
    n_parameters : int
        Free parameters of the mixture (scikit-learn's count).
    mean_log_likelihood : float
        Mean log-likelihood per row under the final parameters (``GaussianMixture.score``).
    bic, aic : float
        ``GaussianMixture.bic`` / ``.aic`` of the final parameters on the data.
    n_iter : int
    converged : bool
    lower_bound : float
    lower_bounds : list of float
        Lower bound of every iteration of the candidate's best initialization.
    params : GMMParams
        The final parameters.
    """

    n_components: int
    covariance_type: str
    n_parameters: int
    mean_log_likelihood: float
    bic: float
    aic: float
    n_iter: int
    converged: bool
    lower_bound: float
    lower_bounds: list[float]
    params: GMMParams

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (no arrays; non-finite numbers as None)."""

        def finite(v: float) -> float | None:
            return float(v) if np.isfinite(v) else None

        return {
            "n_components": self.n_components,
            "covariance_type": self.covariance_type,
            "n_parameters": self.n_parameters,
            "mean_log_likelihood": finite(self.mean_log_likelihood),
            "bic": finite(self.bic),
            "aic": finite(self.aic),
            "n_iter": self.n_iter,
            "converged": self.converged,
            "lower_bounds": [finite(b) for b in self.lower_bounds],
        }


@dataclass(frozen=True)
class SelectionResult:
    """What `select` found.

    Attributes
    ----------
    candidates : list of Candidate
        Every candidate, covariance types in the order given, then ``n_components`` ascending.
    criterion : {'bic', 'aic'}
    best_index : int
        Index in ``candidates`` of the lowest criterion (the first on ties).
    best : GaussianMixture
        The best candidate as a fitted estimator (``n_passes_`` is the selection's).
    n_passes : int
        Full passes over the data made by the whole selection (initializations, EM and
        the scoring pass included; passes before a resume included).
    n_samples : int
    """

    candidates: list[Candidate]
    criterion: str
    best_index: int
    best: GaussianMixture
    n_passes: int
    n_samples: int

    def table(self) -> str:
        """The candidates as a text table, the best marked with ``*``."""
        lines = [
            f"{'':1} {'covariance':>10} {'K':>3} {'params':>7} {'log-lik/row':>13} "
            f"{'BIC':>15} {'AIC':>15} {'iter':>4} converged"
        ]
        for i, c in enumerate(self.candidates):
            mark = "*" if i == self.best_index else " "
            lines.append(
                f"{mark} {c.covariance_type:>10} {c.n_components:>3} {c.n_parameters:>7} "
                f"{c.mean_log_likelihood:>13.6f} {c.bic:>15.3f} {c.aic:>15.3f} "
                f"{c.n_iter:>4} {'yes' if c.converged else 'no'}"
            )
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary: criterion, best candidate, passes and every candidate's row."""
        best = self.candidates[self.best_index]
        return {
            "criterion": self.criterion,
            "best": {"n_components": best.n_components, "covariance_type": best.covariance_type},
            "n_passes": self.n_passes,
            "n_samples": self.n_samples,
            "candidates": [c.summary() for c in self.candidates],
        }


def _check_choices(
    n_components: Iterable[int], covariance_types: Iterable[str], criterion: str
) -> tuple[list[int], list[str]]:
    if isinstance(n_components, int | np.integer):
        n_components = [int(n_components)]
    ks = list(n_components)
    types = [covariance_types] if isinstance(covariance_types, str) else list(covariance_types)
    if not ks:
        raise invalid_parameter("n_components", ks, "give at least one number of components")
    if len(set(ks)) != len(ks):
        raise invalid_parameter("n_components", ks, "give each number of components once")
    if not types or len(set(types)) != len(types):
        raise ParameterError(
            f"covariance_types={types!r} is invalid: give each covariance type once, at least one."
        )
    if criterion not in CRITERIA:
        raise ParameterError(f"criterion={criterion!r} is invalid: use 'bic' or 'aic'.")
    return sorted(int(k) for k in ks), types


def select(
    X: Any,
    n_components: Iterable[int] = range(1, 13),
    covariance_types: Iterable[str] = ("full", "diag"),
    criterion: str = "bic",
    *,
    sample_weight: Any = None,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
    max_iter: int = 100,
    n_init: int = 1,
    init_params: str = "kmeans",
    random_state: int | None = 0,
    acceleration: str | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    restart: bool = False,
    cache: bool | str = "auto",
    split_every: int = DEFAULT_SPLIT_EVERY,
    chunk_rows: int | None = None,
    compute_dtype: str | None = None,
    verbose: int = 0,
) -> SelectionResult:
    """Fit every ``(n_components, covariance_type)`` candidate in shared passes; pick the best.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        Any input `GaussianMixture.fit` accepts (NumPy, Dask, Zarr array or its path/URL).
    n_components : iterable of int, default ``range(1, 13)``
    covariance_types : iterable of str, default ``('full', 'diag')``
    criterion : {'bic', 'aic'}, default 'bic'
        Minimized to choose the best candidate.
    sample_weight : array-like of shape (n_samples,), optional
        As in `GaussianMixture.fit` (the log-likelihood in the criteria is then the
        weighted mean times ``n_samples``).
    tol, reg_covar, max_iter, n_init, init_params, acceleration, cache, split_every, chunk_rows
        As in `GaussianMixture`, for every candidate.
    compute_dtype : {None, 'float32', 'float64'}, default None
        As in `GaussianMixture`, for every candidate's passes and the scoring pass.
    random_state : int or None, default 0
        Every candidate draws its initializations' seeds from ``random_state`` as
        ``GaussianMixture(random_state=random_state)`` does, so with an int each candidate
        equals that estimator fitted alone.
    checkpoint_dir : str or path, optional
        Save the selection's state after every pass that moved a run; a later call with
        the same data and settings resumes from it (`GaussianMixture` ``checkpoint_dir``).
        Needs an int ``random_state`` (the seeds are part of the checkpoint's fingerprint).
    restart : bool, default False
        Discard the checkpoint in ``checkpoint_dir`` first.
    verbose : int, default 0
        2 prints a line per candidate iteration on stderr.

    Returns
    -------
    SelectionResult
    """
    ks, types = _check_choices(n_components, covariance_types, criterion)
    if restart and checkpoint_dir is None:
        raise ParameterError(
            "{restart} discards a checkpoint: give {checkpoint_dir} too.",
            parameter="checkpoint_dir",
        )
    if checkpoint_dir is not None and not isinstance(random_state, int | np.integer):
        raise ParameterError(
            f"random_state={random_state!r} draws other seeds on every call, so a selection "
            "could not resume from its checkpoint: give an int random_state with "
            "{checkpoint_dir}.",
            parameter="checkpoint_dir",
        )
    settings = {
        "tol": tol,
        "reg_covar": reg_covar,
        "max_iter": max_iter,
        "n_init": n_init,
        "init_params": init_params,
        "random_state": random_state,
        "acceleration": acceleration,
        "cache": cache,
        "split_every": split_every,
        "chunk_rows": chunk_rows,
        "compute_dtype": compute_dtype,
    }
    estimators = [GaussianMixture(k, covariance_type=t, **settings) for t in types for k in ks]
    for gm in estimators:
        gm._check_hyper_parameters()
    shaper = estimators[0]
    e_step = shaper._e_step
    Xd = shaper._as_dask(X, reset=True)
    n_samples = int(Xd.shape[0])
    if n_samples < max(2, ks[-1]):
        raise DataError(
            f"X has {n_samples} rows, fewer than n_components = {ks[-1]} (or 2); "
            "use fewer components or more data.",
            parameter="n_components",
        )
    data = RowData(Xd, shaper._as_sample_weight(sample_weight, Xd), split_every)
    check_chunk_memory(data.X)

    # one run per (candidate, initialization); FitState keys each by its index here
    runs: list[tuple[int, int]] = []
    for index in range(len(estimators)):
        draw = check_random_state(random_state)
        runs += [(index, int(draw.randint(np.iinfo(np.int32).max))) for _ in range(n_init)]

    checkpoint = None
    if checkpoint_dir is not None:
        table = [[estimators[i].n_components, estimators[i].covariance_type, s] for i, s in runs]
        hyper = {
            "select": table,
            "tol": float(tol),
            "reg_covar": float(reg_covar),
            "init_params": init_params,
            "split_every": split_every,
            "acceleration": acceleration,
        }
        if compute_dtype is not None:  # absent for None: checkpoints of earlier versions resume
            hyper["compute_dtype"] = check_compute_dtype(compute_dtype).name
        fingerprint = {
            "data": data_fingerprint(data.X, data.sample_weight, data.row_starts),
            "hyper_parameters": hyper,
        }
        checkpoint = Checkpoint(checkpoint_dir, fingerprint)

    def start(key: int) -> Steps[GMMParams]:
        index, seed = runs[key]
        gm = estimators[index]
        return initialize(
            data.shape, gm.n_components, gm.covariance_type, reg_covar, init_params, seed
        )

    def report(key: int, it: Iteration) -> None:
        if verbose >= 2:
            gm = estimators[runs[key][0]]
            print(
                f"K={gm.n_components:<3d} {gm.covariance_type:<9} iteration {it.n_iter:4d}  "
                f"lower bound {it.lower_bound: .10g}  change {it.change: .3e}",
                file=sys.stderr,
                flush=True,
            )

    with checkpoint.lock(restart=restart) if checkpoint is not None else nullcontext():
        loaded = checkpoint.load() if checkpoint is not None else None
        state = loaded.state if loaded is not None else FitState(tuple(range(len(runs))))
        passes_before = loaded.n_passes if loaded is not None else 0
        if verbose >= 1 and loaded is not None:
            print(f"Resuming selection from {checkpoint_dir}", file=sys.stderr)
        data = data.persisted(cache)
        final = [state]

        def save(fit_state: FitState) -> None:
            final[0] = fit_state
            if checkpoint is not None:
                checkpoint.save(fit_state, passes_before + data.n_passes)

        fit_restarts(
            data.map_reduce_many,
            data.read_rows,
            start,
            state,
            tol=tol,
            max_iter=max_iter,
            reg_covar=reg_covar,
            on_iteration=report,
            on_state=save,
            acceleration=acceleration,
            e_step=e_step,
        )
        bests: list[EMResult | None] = [None] * len(estimators)
        for key, (index, _) in enumerate(runs):
            run = final[0].run(key)
            assert run is not None
            bests[index] = better(bests[index], run)
        chosen = [b for b in bests if b is not None]
        scores = data.map_reduce_many([(e_step, (b.params,)) for b in chosen])
    n_passes = int(passes_before + data.n_passes)

    candidates = []
    for gm, run, stats in zip(estimators, chosen, scores, strict=True):
        mean = float(stats.mean_loglik)
        p = n_parameters(gm.n_components, data.shape[1], gm.covariance_type)
        bic, aic = information_criteria(mean, n_samples, p)
        candidates.append(
            Candidate(
                gm.n_components,
                gm.covariance_type,
                p,
                mean,
                bic,
                aic,
                run.n_iter,
                run.converged,
                run.lower_bound,
                list(run.lower_bounds),
                run.params,
            )
        )
    values = [getattr(c, criterion) for c in candidates]
    best_index = int(np.argmin(values))
    best = estimators[best_index]
    run = chosen[best_index]
    best._set_result(run, n_passes)
    return SelectionResult(candidates, criterion, best_index, best, n_passes, n_samples)
