"""The ``dask-em`` command: parse arguments, call the library, print, exit.

Exit status: 0 on success (also when a fit did not converge: the summary says so),
2 on bad usage or bad input (one line on stderr, no traceback, nothing written),
1 on an unexpected internal error (with a traceback to report), 143 when stopped by
SIGTERM and 130 by SIGINT (`stop_on_signals`: the command stops at once, keeps the last
committed checkpoint, closes the cluster it started, releases the checkpoint's lock and
says in one line how to resume). Bad input is a
`dask_em.errors.UserError`, whose message the CLI renders with its option names
(`OPTION_NAMES`) and, for some classes, its own advice (`_advice`); any other exception
is a bug.

Progress goes to stderr (one line per iteration; ``--quiet`` silences it); results go
to stdout, as JSON with ``--json`` (``score`` and ``info`` always print JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from dask_em import __version__
from dask_em.choices import (
    CLI_N_INIT,
    CLUSTERS,
    COMPUTE_DTYPES,
    COVARIANCE_TYPES,
    CRITERIA,
    INIT_PARAMS,
    STORE_CHUNK_ROWS,
)
from dask_em.errors import (
    DataError,
    IllDefinedCovarianceError,
    Interrupted,
    UserError,
    hold_stop,
)

if TYPE_CHECKING:
    import dask.array as da

    from dask_em.estimator import GaussianMixture

# The library (NumPy, Dask, scikit-learn, Zarr, distributed) is imported by the commands
# that use it, not here: ``--help`` and usage errors answer without loading it.

DEMO_SIZE = {"n_samples": 2_000_000, "n_features": 8, "n_components": 5}

OPTION_NAMES = {
    "array": "--array",
    "ca_file": "--tls-ca-file",
    "cert": "--tls-cert",
    "checkpoint_dir": "--checkpoint-dir",
    "chunk_rows": "--chunk-rows",
    "compute_dtype": "--compute-dtype",
    "cores": "--cores",
    "init_model": "--init-model",
    "job_extra_directives": "--job-extra",
    "jobs": "--jobs",
    "key": "--tls-key",
    "memory": "--memory",
    "memory_limit": "--memory-limit",
    "missing_drop": "--missing drop",
    "missing_keep": "--missing keep",
    "missing": "--missing em",
    "n_components": "--n-components",
    "queue": "--queue",
    "no_lock": "--no-lock",
    "reg_covar": "--reg-covar",
    "replace_partition": "--replace-partition",
    "restart": "--restart",
    "scheduler": "--scheduler",
    "scheduler_file": "--scheduler-file",
    "security": "--tls-ca-file/--tls-cert/--tls-key",
    "walltime": "--walltime",
    "storage_options": "--storage-option",
}
"""The option of each parameter a library message may name (`dask_em.errors.PYTHON_WORDS`)."""


def error_message(err: UserError, args: argparse.Namespace) -> str:
    """The one line ``dask-em`` prints for ``err``: its message with option names, plus
    advice that only makes sense on the command line."""
    message = " ".join(err.render(OPTION_NAMES).split()) or type(err).__name__
    if isinstance(err, IllDefinedCovarianceError) and hasattr(args, "reg_covar"):
        larger = max(1e-6, 10.0 * args.reg_covar)
        message += f" (here --reg-covar {args.reg_covar:g}: try --reg-covar {larger:g})"
    return message


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line and exit with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _memory_size(text: str) -> str:
    """An argparse type: a positive memory size such as ``2GiB`` (Dask's ``parse_bytes``)."""
    from dask.utils import parse_bytes

    try:
        size = parse_bytes(text)
    except (ValueError, TypeError):
        size = None
    if size is None or size <= 0:
        raise argparse.ArgumentTypeError(
            f"expected a positive memory size such as 2GiB, got {text!r}"
        )
    return text


def _bounded(convert: Callable[[str], Any], minimum: float, what: str) -> Callable[[str], Any]:
    """An argparse type: ``convert(text)``, finite and at least ``minimum``."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _bounded(int, 1, "a positive integer")
_non_negative_int = _bounded(int, 0, "an integer >= 0")
_non_negative_float = _bounded(float, 0.0, "a finite number >= 0")


def _add_em_options(p: argparse.ArgumentParser) -> None:
    """``--tol``, ``--max-iter``, ``--reg-covar`` and ``--compute-dtype`` (fit and select)."""
    p.add_argument(
        "--tol",
        type=_non_negative_float,
        default=1e-3,
        help="converged when the mean log-likelihood changes by less (default 1e-3)",
    )
    p.add_argument(
        "--max-iter", type=_non_negative_int, default=100, help="most EM iterations (default 100)"
    )
    p.add_argument(
        "--reg-covar",
        type=_non_negative_float,
        default=1e-6,
        help="added to the diagonal of every covariance (default 1e-6)",
    )
    p.add_argument(
        "--compute-dtype",
        choices=COMPUTE_DTYPES,
        help="dtype of the per-chunk products (default: the data's); float32 on float64 "
        "data is faster, statistics still add up in float64",
    )


def _add_checkpoint_options(p: argparse.ArgumentParser, every: str) -> None:
    """``--checkpoint-dir`` (a state saved every ``every``) and ``--restart``."""
    p.add_argument(
        "--checkpoint-dir", metavar="DIR", help=f"save state every {every}; rerun to resume"
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="discard the checkpoint of --checkpoint-dir and start over",
    )


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """``--quiet``, ``--storage-option`` and where the work runs (`_add_cluster_options`)."""
    _add_quiet_option(p)
    _add_storage_option(p)
    _add_cluster_options(p)


def _add_cluster_options(p: argparse.ArgumentParser, default: str = "auto") -> None:
    g = p.add_argument_group(
        "cluster (default: threads for data small against this machine's memory, else a "
        "local cluster of worker processes)"
        if default == "auto"
        else f"cluster (default: {default})"
    )
    where = g.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS", help="address of a running Dask scheduler")
    where.add_argument(
        "--scheduler-file", metavar="FILE", help="scheduler file of a running cluster"
    )
    g.add_argument(
        "--n-workers", type=_positive_int, metavar="W", help="local cluster: worker processes"
    )
    g.add_argument(
        "--threads-per-worker",
        type=_positive_int,
        metavar="T",
        help="local cluster: threads per worker",
    )
    g.add_argument(
        "--memory-limit",
        type=_memory_size,
        metavar="SIZE",
        help="local cluster: memory limit per worker, e.g. 2GiB",
    )
    g.add_argument(
        "--tls-ca-file",
        metavar="PEM",
        help="TLS scheduler (tls:// address): CA certificate(s) that signed its certificate",
    )
    g.add_argument("--tls-cert", metavar="PEM", help="TLS scheduler: this client's certificate")
    g.add_argument(
        "--tls-key", metavar="PEM", help="TLS scheduler: the client certificate's private key"
    )
    g.add_argument(
        "--cluster",
        choices=CLUSTERS,
        default=default,
        help="where the work runs: threads in this process, a local cluster of worker "
        "processes, or SLURM jobs; auto: threads when the data takes under 25%% of this "
        "machine's memory, else a local cluster (a --scheduler, --scheduler-file or local "
        f"cluster option decides instead); default {default}",
    )
    _add_slurm_options(p)


SLURM_OPTIONS = ("jobs", "cores", "memory", "walltime", "queue", "job_extra")
"""Destinations of the options of `_add_slurm_options`."""


def _add_slurm_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "SLURM (with --cluster slurm; options not given come from the dask-jobqueue "
        "configuration, jobqueue.slurm.*)"
    )
    g.add_argument(
        "--jobs", type=_positive_int, metavar="N", help="SLURM jobs of Dask workers (default 1)"
    )
    g.add_argument("--cores", type=_positive_int, metavar="C", help="CPU cores of each job")
    g.add_argument("--memory", metavar="SIZE", help="memory of each job, e.g. 8GiB")
    g.add_argument("--walltime", metavar="HH:MM:SS", help="time limit of each job")
    g.add_argument("--queue", metavar="PARTITION", help="SLURM partition of the jobs")
    g.add_argument(
        "--job-extra",
        action="append",
        metavar="OPTION",
        help="an extra sbatch option for the jobs, e.g. --job-extra=--account=proj "
        "(repeat for more)",
    )


def _add_chunk_rows_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--chunk-rows",
        type=_positive_int,
        metavar="R",
        help="rows per task, rounded up to whole store chunks "
        "(default: automatic, store chunks merged up to ~32 MiB per task)",
    )


def _check_usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse conflicting options as usage errors (exit status 2), before any work."""
    if getattr(args, "scheduler", None) or getattr(args, "scheduler_file", None):
        if args.n_workers or args.threads_per_worker or args.memory_limit:
            parser.error(
                "--n-workers/--threads-per-worker/--memory-limit shape a local cluster; "
                "drop them with --scheduler or --scheduler-file."
            )
    cluster = getattr(args, "cluster", "auto")
    if cluster in ("slurm", "threads"):
        given = [
            option
            for option in ("scheduler", "scheduler_file", "n_workers", "threads_per_worker")
            + ("memory_limit", "tls_ca_file", "tls_cert", "tls_key")
            if getattr(args, option)
        ]
        if given:
            flags = "/".join("--" + name.replace("_", "-") for name in given)
            shaped_by = (
                "SLURM jobs are shaped by --jobs/--cores/--memory"
                if cluster == "slurm"
                else "threads run in this process"
            )
            parser.error(
                f"{flags} cannot be used with --cluster {cluster} ({shaped_by}); drop them."
            )
    if cluster != "slurm" and any(getattr(args, name, None) for name in SLURM_OPTIONS):
        parser.error(
            "--jobs/--cores/--memory/--walltime/--queue/--job-extra shape SLURM jobs: "
            "give --cluster slurm too."
        )
    tls = [getattr(args, name, None) for name in ("tls_ca_file", "tls_cert", "tls_key")]
    if any(tls) and not (tls[0] and tls[1]):
        parser.error(
            "a TLS connection needs --tls-ca-file and --tls-cert (and --tls-key unless "
            "the certificate file holds the key)."
        )
    if getattr(args, "init_model", None) and args.n_init not in (None, 1):
        parser.error(
            f"--init-model starts one run from the model's parameters: drop --n-init "
            f"{args.n_init} (or give --n-init 1)."
        )
    if getattr(args, "restart", False) and not args.checkpoint_dir:
        parser.error("--restart discards a checkpoint: give --checkpoint-dir too.")


def _cluster(args: argparse.Namespace, nbytes: float | None = None) -> Any:
    """Where the command runs (`dask_em.cluster.open_cluster`): a context manager yielding
    the `dask_em.cluster.ClusterChoice`; ``nbytes``, the size of the data, for ``auto``."""
    from dask_em.cluster import open_cluster, tls_security

    quiet = getattr(args, "quiet", False)
    if args.cluster == "slurm":
        return open_cluster(
            "slurm",
            quiet=quiet,
            jobs=args.jobs or 1,
            cores=args.cores,
            memory=args.memory,
            walltime=args.walltime,
            queue=args.queue,
            job_extra_directives=args.job_extra,
        )
    security = None
    if args.tls_ca_file:
        security = tls_security(args.tls_ca_file, args.tls_cert, args.tls_key)
    return open_cluster(
        args.cluster,
        nbytes,
        quiet=quiet,
        scheduler=args.scheduler,
        scheduler_file=args.scheduler_file,
        n_workers=args.n_workers,
        threads_per_worker=args.threads_per_worker,
        memory_limit=args.memory_limit,
        security=security,
    )


def _say(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


def _print_json(value: dict[str, Any]) -> None:
    print(json.dumps(value, indent=2, default=_json_default, allow_nan=False))


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


# ---------------------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> int:
    from dask_em.datasets import generate
    from dask_em.io import check_destination

    check_destination(args.out, storage_options=storage_options(args.storage_option))
    with _cluster(args, args.n_samples * args.n_features * 8):
        start = time.perf_counter()
        generate(
            args.out,
            args.n_samples,
            args.n_features,
            args.n_components,
            args.seed,
            args.store_chunk_rows,
            storage_options(args.storage_option),
        )
    _say(
        args,
        f"wrote {args.n_samples} x {args.n_features} rows of a {args.n_components}-component "
        f"mixture to {args.out} in {time.perf_counter() - start:.1f} s",
    )
    return 0


# --------------------------------------------------------------------------------- fit
def fit_with_progress(
    gm: GaussianMixture, X: da.Array, *, quiet: bool, restart: bool = False
) -> float:
    """``gm.fit(X, restart=restart)`` with progress and warnings on stderr (none if
    ``quiet``); return the seconds it took. Shared by ``fit`` and ``demo``."""
    from sklearn.exceptions import ConvergenceWarning

    from dask_em.errors import CheckpointWarning, EmptyComponentWarning

    gm.set_params(verbose=0 if quiet else 2, verbose_interval=1)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm.fit(X, restart=restart)
    for w in caught:
        if not quiet and issubclass(w.category, ConvergenceWarning):
            print(
                f"note: not converged after {gm.n_iter_} iterations (tol {gm.tol}); "
                "raise --max-iter or --tol",
                file=sys.stderr,
                flush=True,
            )
        elif not quiet and issubclass(w.category, EmptyComponentWarning | CheckpointWarning):
            print(f"warning: {w.message}", file=sys.stderr, flush=True)
    return time.perf_counter() - start


def _summary(gm: GaussianMixture) -> dict[str, Any]:
    return {
        "n_components": gm.n_components,
        "covariance_type": gm.covariance_type,
        "n_features": int(gm.n_features_in_),
        "n_iter": gm.n_iter_,
        "converged": gm.converged_,
        "lower_bound": _finite(gm.lower_bound_),
        "lower_bounds": [_finite(b) for b in gm.lower_bounds_],
        "n_passes": gm.n_passes_,
    }


def _open_for_fitting(
    args: argparse.Namespace, n_components: int, so: dict[str, Any] | None = None
) -> da.Array:
    """The data of ``fit``/``select`` (``so``: its storage options), refused now (before a
    cluster starts) if it has fewer rows than ``n_components``."""
    from dask_em.io import open_array

    X = open_array(args.data, args.array, args.chunk_rows, storage_options=so)
    if X.shape[0] < n_components:
        raise DataError(
            f"{args.data} has {X.shape[0]} rows, fewer than --n-components "
            f"{n_components}; use fewer components or more data."
        )
    return X


def _check_model_destinations(
    args: argparse.Namespace,
    model_size: int,
    n_runs: int,
    so: dict[str, Any] | None = None,
    use_lock: bool = True,
) -> None:
    """Refuse now an ``--output`` (a model of ``model_size`` bytes) or a ``--checkpoint-dir``
    (states of ``n_runs`` such runs) that the fit could not write, before a cluster starts."""
    from dask_em.checkpoint import check_available
    from dask_em.io import check_destination, check_output

    check_output(args.output, "model", [args.data], so)
    check_destination(args.output, model_size, so)
    if args.checkpoint_dir:
        check_available(
            args.checkpoint_dir, args.restart, n_runs, model_size, so, use_lock=use_lock
        )


def cmd_fit(args: argparse.Namespace) -> int:
    from dask_em.estimator import GaussianMixture, warm_start_run
    from dask_em.io import model_bytes

    so = storage_options(args.storage_option)
    X = _open_for_fitting(args, args.n_components, so)
    n_init = args.n_init or (1 if args.init_model else CLI_N_INIT)
    size = model_bytes(args.n_components, X.shape[1], args.covariance_type)
    _check_model_destinations(args, size, n_init, so, use_lock=not args.no_lock)
    if args.init_model:  # a missing, damaged or misshapen model fails before a cluster starts
        warm_start_run(args.init_model, args.n_components, args.covariance_type, X.shape[1], so)
    gm = GaussianMixture(
        args.n_components,
        covariance_type=args.covariance_type,
        tol=args.tol,
        reg_covar=args.reg_covar,
        max_iter=args.max_iter,
        n_init=n_init,
        init_model=args.init_model,
        init_params=args.init_params,
        random_state=args.seed,
        checkpoint_dir=args.checkpoint_dir,
        acceleration=args.acceleration,
        storage_options=so,
        checkpoint_lock=not args.no_lock,
        missing=args.missing,
        compute_dtype=args.compute_dtype,
    )
    with _cluster(args, X.nbytes) as where:
        seconds = fit_with_progress(gm, X, quiet=args.quiet, restart=args.restart)
        gm.save(args.output)
    summary = {
        **_summary(gm),
        "seconds": round(seconds, 3),
        "model": args.output,
        "checkpoint_dir": args.checkpoint_dir,
        "cluster": where.kind,
    }
    if args.json:
        _print_json(summary)
    else:
        state = "converged" if gm.converged_ else "not converged"
        print(
            f"{state} after {gm.n_iter_} iterations ({gm.n_passes_} passes, {seconds:.1f} s): "
            f"lower bound {gm.lower_bound_:.8g}; model written to {args.output}"
        )
    return 0


# ---------------------------------------------------------------------- predict/score
def _model_and_data(args: argparse.Namespace) -> tuple[GaussianMixture, Any]:
    """The model of ``args.model`` and the data of ``args.data``, checked to match."""
    from dask_em.estimator import load_model
    from dask_em.io import open_array

    so = storage_options(args.storage_option)
    gm = load_model(args.model, so)
    X = open_array(args.data, args.array, args.chunk_rows, storage_options=so)
    if X.shape[1] != gm.n_features_in_:
        raise DataError(
            f"{args.data} has {X.shape[1]} features but the model was fitted on "
            f"{gm.n_features_in_}; use data with the same features."
        )
    return gm, X


def _write_per_row(
    args: argparse.Namespace,
    make: Callable[[], da.Array],
    kind: str,
    attrs: dict[str, Any],
    what: str,
    X: da.Array,
) -> int:
    """Write ``make()``, a lazy per-row result of the model on the data (``predict``,
    ``impute``), to ``--output`` as an output of ``kind``; the destination is checked first."""
    from dask_em.io import check_destination, check_output, store_array

    so = storage_options(args.storage_option)
    inputs = [args.model, args.data]
    check_output(args.output, kind, inputs, so)
    check_destination(args.output, storage_options=so)
    with _cluster(args, X.nbytes):
        start = time.perf_counter()
        store_array(
            make(),
            args.output,
            {"model": str(args.model), **attrs},
            kind=kind,
            inputs=inputs,
            storage_options=so,
        )
    _say(
        args,
        f"wrote {what} of {X.shape[0]} rows to {args.output} in {time.perf_counter() - start:.1f} s",
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    gm, X = _model_and_data(args)
    if args.proba:
        return _write_per_row(
            args,
            lambda: gm.predict_proba(X),
            "predictions",
            {"kind": "predict_proba"},
            "responsibilities",
            X,
        )
    return _write_per_row(
        args, lambda: gm.predict(X), "predictions", {"kind": "predict"}, "labels", X
    )


def cmd_impute(args: argparse.Namespace) -> int:
    gm, X = _model_and_data(args)
    return _write_per_row(
        args,
        lambda: gm.impute(X),
        "data",
        {"kind": "impute"},
        "imputed values",
        X,
    )


def cmd_score(args: argparse.Namespace) -> int:
    from dask_em.estimator import information_criteria
    from dask_em.params import n_parameters

    gm, X = _model_and_data(args)
    with _cluster(args, X.nbytes):
        mean = gm.score(X)
    n = int(X.shape[0])
    p = n_parameters(gm.n_components, int(gm.n_features_in_), gm.covariance_type)
    bic, aic = information_criteria(mean, n, p)
    _print_json(
        {
            "mean_log_likelihood": _finite(mean),
            "bic": _finite(bic),
            "aic": _finite(aic),
            "n_samples": n,
        }
    )
    return 0


# ------------------------------------------------------------------------------ select
def _component_counts(text: str) -> list[int]:
    """An argparse type: ``1-12``, ``2,4,8`` or a mix (``1-3,6``) as a list of counts >= 1."""
    counts: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            first, last = int(low), int(high or low)
            if first < 1 or last < first:
                raise ValueError
            counts += range(first, last + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected counts >= 1 such as 1-12 or 2,4,8, got {text!r}"
        ) from None
    if len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"a count is given twice in {text!r}")
    return counts


def _covariance_types(text: str) -> list[str]:
    """An argparse type: comma-separated covariance types, e.g. ``full,diag``."""
    types = text.split(",")
    wrong = [t for t in types if t not in COVARIANCE_TYPES]
    if wrong or len(set(types)) != len(types):
        raise argparse.ArgumentTypeError(
            f"expected distinct types among {','.join(COVARIANCE_TYPES)}, got {text!r}"
        )
    return types


def cmd_select(args: argparse.Namespace) -> int:
    from sklearn.exceptions import ConvergenceWarning

    from dask_em.io import model_bytes
    from dask_em.select import select

    X = _open_for_fitting(args, max(args.n_components))
    sizes = [model_bytes(k, X.shape[1], t) for k in args.n_components for t in args.covariance_type]
    n_candidates = len(args.n_components) * len(args.covariance_type)
    _check_model_destinations(args, max(sizes), n_candidates * args.n_init)
    with _cluster(args, X.nbytes) as where:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            result = select(
                X,
                args.n_components,
                args.covariance_type,
                args.criterion,
                tol=args.tol,
                reg_covar=args.reg_covar,
                max_iter=args.max_iter,
                n_init=args.n_init,
                random_state=args.seed,
                checkpoint_dir=args.checkpoint_dir,
                restart=args.restart,
                compute_dtype=args.compute_dtype,
                verbose=0 if args.quiet else 2,
            )
        seconds = time.perf_counter() - start
        summary = result.summary()
        result.best.save(args.output, {"selection": summary})
    summary.update(seconds=round(seconds, 3), model=args.output, cluster=where.kind)
    if args.json:
        _print_json(summary)
    else:
        best = result.candidates[result.best_index]
        print(result.table())
        print(
            f"best by {args.criterion.upper()}: {best.covariance_type} with "
            f"{best.n_components} components ({result.n_passes} passes for "
            f"{len(result.candidates)} candidates, {seconds:.1f} s); model written to {args.output}"
        )
    return 0


# -------------------------------------------------------------------------------- plot
def _feature_pair(text: str) -> tuple[int, int]:
    """An argparse type: ``i,j``, two feature indices."""
    try:
        i, j = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected two feature indices i,j, got {text!r}"
        ) from None
    return i, j


def cmd_plot(args: argparse.Namespace) -> int:
    # matplotlib is imported by this command alone (the plot extra)
    from dask_em.io import open_array, read_model
    from dask_em.plot import check_features, check_png_output, render, sample_rows
    from dask_em.reduce import RowData

    params, attrs = read_model(args.model)
    check_png_output(args.output)
    sample = None
    if args.data is not None:
        check_features(params.n_features, args.features)
        X = open_array(args.data, args.array, args.chunk_rows)
        if X.shape[1] != params.n_features:
            raise DataError(
                f"{args.data} has {X.shape[1]} features but the model was fitted on "
                f"{params.n_features}; use data with the same features."
            )
        with _cluster(args, X.nbytes):
            sample = sample_rows(RowData(X), args.sample, args.seed)
    elif args.features is not None:
        raise DataError("--features chooses the axes of the scatter: give DATA too.")
    picture = render(args.output, params, attrs, sample, args.features)
    _say(args, f"wrote {', '.join(picture.panels)} to {args.output}")
    return 0


# -------------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    from dask_em.checkpoint import describe
    from dask_em.io import read_model

    so = storage_options(args.storage_option)
    checkpoint = describe(args.path, so)
    if checkpoint is not None:
        _print_json(checkpoint)
        return 0
    params, attrs = read_model(args.path, so)
    _print_json(
        {
            "kind": "model",
            "n_components": params.n_components,
            "covariance_type": params.covariance_type,
            "n_features": params.n_features,
            "n_iter": attrs.get("n_iter"),
            "converged": attrs.get("converged"),
            "lower_bound": attrs.get("lower_bound"),
            "lower_bounds": attrs.get("lower_bounds"),
            "n_passes": attrs.get("n_passes"),
            "hyper_parameters": attrs.get("hyper_parameters"),
            "dask_em_version": attrs.get("dask_em_version"),
            "weights": params.weights,
        }
    )
    return 0


# -------------------------------------------------------------------------------- demo
def _match(true_means: Any, fitted_means: Any) -> Any:
    """``order[j]``: the fitted component matched to true component ``j`` (min total distance)."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    cost = np.linalg.norm(true_means[:, None, :] - fitted_means[None, :, :], axis=2)
    _, order = linear_sum_assignment(cost)
    return order


def cmd_demo(args: argparse.Namespace) -> int:
    import dask.array as da
    import numpy as np

    from dask_em.datasets import generate, true_labels
    from dask_em.estimator import GaussianMixture
    from dask_em.io import open_array, store_array

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data, model, labels, ckpt = (
        workdir / n for n in ("data.zarr", "model.zarr", "labels.zarr", "checkpoint")
    )
    n, d, k, seed = args.n_samples, args.n_features, args.n_components, args.seed
    with _cluster(args, n * d * 8):
        t0 = time.perf_counter()
        truth = generate(data, n, d, k, seed, args.store_chunk_rows)
        t1 = time.perf_counter()
        _say(
            args,
            f"generated {n} x {d} rows ({n * d * 8 / 2**20:.0f} MiB) in {data} in "
            f"{t1 - t0:.1f} s; fitting {k} components, best of {CLI_N_INIT} initializations "
            f"(their seeds drawn from --seed {seed})",
        )
        gm = GaussianMixture(k, n_init=CLI_N_INIT, random_state=seed, checkpoint_dir=ckpt)
        X = open_array(data)
        fit_seconds = fit_with_progress(gm, X, quiet=args.quiet, restart=True)
        gm.save(model)
        t2 = time.perf_counter()
        store_array(
            gm.predict(X),
            labels,
            {"model": str(model), "kind": "predict"},
            kind="predictions",
            inputs=[model, data],
        )
        order = _match(truth.means, gm.means_)
        relabel = np.empty(k, dtype=np.int64)
        relabel[order] = np.arange(k)
        expected = true_labels(truth, n, seed, args.store_chunk_rows)
        predicted = da.from_zarr(str(labels)).map_blocks(relabel.__getitem__, dtype=np.int64)
        agreement = float((predicted == expected).mean().compute())
        t3 = time.perf_counter()
    fitted_w, fitted_m = gm.weights_[order], gm.means_[order]
    print(
        f"dask-em demo: {n:,} rows x {d} features, {k} full-covariance components, workdir {workdir}"
    )
    print(
        f"  generate {t1 - t0:6.1f} s   fit {fit_seconds:6.1f} s ({gm.n_iter_} iterations, {gm.n_passes_} passes, "
        f"{'converged' if gm.converged_ else 'not converged'})   predict+check {t3 - t2:6.1f} s"
    )
    print(f"  best of {gm.n_init} initializations, advanced together: every pass served them all")
    print(
        f"  lower bound {gm.lower_bound_:.6f}; labels agree with the true components on {100 * agreement:.3f}% of rows"
    )
    print("  component  true weight  fitted weight  max |fitted mean - true mean|")
    for j in range(k):
        print(
            f"  {j:9d}  {truth.weights[j]:11.4f}  {fitted_w[j]:13.4f}  {np.max(np.abs(fitted_m[j] - truth.means[j])):29.4f}"
        )
    print(f"  model: {model}   labels: {labels}   checkpoint: {ckpt}")
    return 0


# ------------------------------------------------------------------------------ ingest
INGEST_PROGRESS_SECONDS = 1.0
"""Least time between two progress lines of ``ingest`` (the last one is always shown)."""


def _ingest_progress(args: argparse.Namespace) -> Callable[[dict[str, Any]], None] | None:
    """The progress callback of ``ingest``: a line on stderr at most once a second, and
    one for every finished partition."""
    if args.quiet:
        return None
    shown = {"at": -math.inf, "partitions": 0}

    def progress(p: dict[str, Any]) -> None:
        now = time.monotonic()
        finished = p["partitions"] != shown["partitions"]
        if not finished and now - shown["at"] < INGEST_PROGRESS_SECONDS:
            return
        shown.update(at=now, partitions=p["partitions"])
        print(
            f"{p['rows']:,} rows, {p['partitions']}/{p['partitions_total']} partitions, "
            f"{p['rows_per_s']:,.0f} rows/s ({p['partition']})",
            file=sys.stderr,
            flush=True,
        )

    return progress


def cmd_ingest(args: argparse.Namespace) -> int:
    from dask_em.ingest import ingest

    columns = None
    if args.columns is not None:
        columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    summary = ingest(
        args.source,
        args.out,
        columns=columns,
        query=args.query,
        partition=args.partition,
        missing=args.missing,
        replace_partition=args.replace_partition,
        dtype=args.dtype,
        chunk_rows=args.store_chunk_rows,
        progress=_ingest_progress(args),
        storage_options=storage_options(args.storage_option),
    )
    for message in summary["messages"]:
        _say(args, message)
    if args.json:
        _print_json(summary)
    else:
        _say(
            args,
            f"{summary['rows_added']:,} rows added ({summary['rows_dropped']:,} dropped); "
            f"{args.out} holds {summary['n_samples']:,} x {summary['n_features']} "
            f"{summary['dtype']} in {summary['seconds']:.1f} s",
        )
    return 0


# ------------------------------------------------------------------------------ parser
def _add_store_chunk_rows_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store-chunk-rows",
        "--chunk-rows",
        dest="store_chunk_rows",
        type=_positive_int,
        default=STORE_CHUNK_ROWS,
        metavar="R",
        help=f"rows per chunk of the written store (default {STORE_CHUNK_ROWS}); "
        "--chunk-rows is its older name, kept as an alias",
    )


def _storage_option(text: str) -> tuple[list[str], Any]:
    """An argparse type: ``KEY=VALUE`` (``a.b=VALUE`` nests), VALUE as JSON if it parses."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key.split("."), parsed


def storage_options(pairs: Sequence[tuple[list[str], Any]] | None) -> dict[str, Any] | None:
    """The fsspec storage options of repeated ``--storage-option KEY=VALUE``, or None."""
    if not pairs:
        return None
    options: dict[str, Any] = {}
    for keys, value in pairs:
        node = options
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return options


def _add_storage_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-option",
        dest="storage_option",
        action="append",
        type=_storage_option,
        metavar="KEY=VALUE",
        help="fsspec option of s3:// (or other URL) paths, e.g. endpoint_url=http://host:9000, "
        "key=..., secret=...; repeatable (credentials may come from the environment)",
    )


def _add_quiet_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "data", metavar="DATA", help="path or URL of a Zarr array (or of a group, with --array)"
    )
    p.add_argument("--array", metavar="NAME", help="the array to use inside a Zarr group")
    _add_chunk_rows_option(p)


def build_parser() -> argparse.ArgumentParser:
    """The ``dask-em`` argument parser (sub-commands generate, fit, predict, score, info, demo)."""
    parser = _Parser(
        prog="dask-em", description="Out-of-core EM for Gaussian mixtures on Zarr data with Dask."
    )
    parser.add_argument("--version", action="version", version=f"dask-em {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser, metavar="COMMAND"
    )

    p = sub.add_parser("generate", help="write a synthetic mixture dataset to a Zarr array")
    p.add_argument("out", metavar="OUT.zarr", help="path of the Zarr array to write")
    p.add_argument("--n-samples", type=_positive_int, required=True, help="rows to draw")
    p.add_argument("--n-features", type=_positive_int, required=True, help="features per row")
    p.add_argument(
        "--n-components", type=_positive_int, required=True, help="components of the mixture"
    )
    p.add_argument(
        "--seed",
        type=_non_negative_int,
        default=0,
        help="seeds the true parameters and the rows (default 0)",
    )
    _add_store_chunk_rows_option(p)
    _add_run_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("fit", help="fit a Gaussian mixture to a Zarr array")
    _add_data_options(p)
    p.add_argument("--n-components", type=_positive_int, required=True, help="components to fit")
    p.add_argument(
        "--output", required=True, metavar="MODEL.zarr", help="where to write the fitted model"
    )
    p.add_argument(
        "--covariance-type",
        choices=COVARIANCE_TYPES,
        default="full",
        help="form of the covariances (default full)",
    )
    _add_em_options(p)
    p.add_argument(
        "--init-params",
        choices=INIT_PARAMS,
        default="kmeans",
        help="how to initialize (default kmeans, k-means||)",
    )
    p.add_argument(
        "--n-init",
        type=_positive_int,
        help="initializations, advanced together (they share every pass); the best is kept "
        f"(default {CLI_N_INIT}: benchmarks/fit_quality.py measured it; Python's default is 1; "
        "1 with --init-model)",
    )
    p.add_argument(
        "--init-model",
        metavar="MODEL.zarr",
        help="warm start: begin EM at this model's parameters (one run, no initialization "
        "pass); it must have the same components, covariance type and features",
    )
    p.add_argument(
        "--seed",
        type=_non_negative_int,
        default=0,
        help="random seed; each initialization's seed is drawn from it (default 0)",
    )
    p.add_argument(
        "--acceleration", choices=["squarem"], help="SQUAREM extrapolation (fewer passes)"
    )
    _add_checkpoint_options(p, "iteration")
    p.add_argument(
        "--missing",
        choices=["em"],
        help="treat NaN as missing values: EM on each row's observed values (default: refuse NaN)",
    )
    p.add_argument(
        "--no-lock",
        action="store_true",
        help="checkpoint on an object store without conditional writes: no one-fit lock",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    _add_run_options(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser(
        "select",
        help="fit every (components, covariance type) candidate in shared passes; keep the best",
    )
    _add_data_options(p)
    p.add_argument(
        "--n-components",
        type=_component_counts,
        default=list(range(1, 13)),
        metavar="RANGE",
        help="component counts to try, e.g. 1-12 or 2,4,8 (default 1-12)",
    )
    p.add_argument(
        "--covariance-type",
        type=_covariance_types,
        default=["full", "diag"],
        metavar="TYPES",
        help="covariance types to try, comma-separated (default full,diag)",
    )
    p.add_argument(
        "--criterion", choices=CRITERIA, default="bic", help="minimized to choose (default bic)"
    )
    p.add_argument(
        "--output", required=True, metavar="BEST.zarr", help="where to write the best model"
    )
    _add_em_options(p)
    p.add_argument(
        "--n-init",
        type=_positive_int,
        default=1,
        help="initializations per candidate (default 1)",
    )
    p.add_argument(
        "--seed",
        type=_non_negative_int,
        default=0,
        help="random seed; each candidate draws its seeds from it as fit does (default 0)",
    )
    _add_checkpoint_options(p, "pass")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    _add_quiet_option(p)
    _add_cluster_options(p)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("predict", help="write labels (or responsibilities) of a Zarr array")
    p.add_argument("model", metavar="MODEL.zarr", help="a model written by fit")
    _add_data_options(p)
    p.add_argument("--output", required=True, metavar="OUT.zarr", help="where to write the labels")
    p.add_argument(
        "--proba", action="store_true", help="write responsibilities (n, K) instead of labels"
    )
    _add_run_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "impute", help="write a Zarr array with NaN replaced by conditional means under a model"
    )
    p.add_argument("model", metavar="MODEL.zarr", help="a model written by fit")
    _add_data_options(p)
    p.add_argument(
        "--output", required=True, metavar="OUT.zarr", help="where to write the imputed data"
    )
    _add_run_options(p)
    p.set_defaults(func=cmd_impute)

    p = sub.add_parser("score", help="JSON: mean log-likelihood, bic, aic, n_samples")
    p.add_argument("model", metavar="MODEL.zarr", help="a model written by fit")
    _add_data_options(p)
    _add_run_options(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser(
        "plot", help="PNG: convergence, components over a sample of DATA, criterion against K"
    )
    p.add_argument("model", metavar="MODEL.zarr", help="a model written by fit or select")
    p.add_argument(
        "data",
        metavar="DATA",
        nargs="?",
        help="Zarr array to scatter a sample of (optional; or a group, with --array)",
    )
    p.add_argument("--array", metavar="NAME", help="the array to use inside a Zarr group")
    _add_chunk_rows_option(p)
    p.add_argument("--output", required=True, metavar="FIG.png", help="the PNG to write")
    p.add_argument(
        "--features",
        type=_feature_pair,
        metavar="I,J",
        help="features to plot (default: the sample's top two principal axes)",
    )
    p.add_argument(
        "--sample", type=_positive_int, default=5000, help="rows to scatter (default 5000)"
    )
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seeds the sample (default 0)")
    _add_quiet_option(p)
    _add_cluster_options(p)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser(
        "ingest", help="append Parquet data (files, a partitioned dataset, DuckDB SQL) to Zarr"
    )
    p.add_argument(
        "source",
        metavar="SOURCE",
        nargs="?",
        help="a Parquet file or dataset directory (optional with a --query that reads files)",
    )
    p.add_argument("out", metavar="OUT.zarr", help="the Zarr array to create or append to")
    p.add_argument(
        "--query", metavar="SQL", help="DuckDB SQL producing the rows (view 'source': SOURCE)"
    )
    p.add_argument("--columns", metavar="A,B", help="feature columns (default: every numeric one)")
    p.add_argument(
        "--partition", metavar="NAME", help="the partition to ingest (e.g. dt=2026-11-22)"
    )
    p.add_argument(
        "--missing",
        choices=["error", "drop", "keep"],
        default="error",
        help="NULL/NaN/inf values: refuse (default), drop their rows, or store NaN",
    )
    p.add_argument(
        "--replace-partition",
        action="store_true",
        help="replace a partition whose content changed since it was ingested",
    )
    p.add_argument(
        "--dtype",
        choices=["float64", "float32"],
        help="stored dtype (default float64, or the store's when appending)",
    )
    p.add_argument(
        "--store-chunk-rows",
        type=_positive_int,
        metavar="R",
        help="rows per chunk of a new store (default: automatic, chunks of ~8 MiB)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    _add_quiet_option(p)
    _add_storage_option(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("info", help="JSON description of a model or a checkpoint directory")
    p.add_argument(
        "path", metavar="MODEL.zarr|CHECKPOINT_DIR", help="a model, or a --checkpoint-dir"
    )
    _add_storage_option(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "demo",
        help="generate, fit (checkpointed), predict and report, on the embedded local cluster "
        "(or where --cluster says)",
    )
    p.add_argument(
        "--workdir",
        default="dask-em-demo",
        metavar="DIR",
        help="where the data, model, labels and checkpoint go (default dask-em-demo)",
    )
    p.add_argument(
        "--n-samples",
        type=_positive_int,
        default=DEMO_SIZE["n_samples"],
        help=f"rows to generate (default {DEMO_SIZE['n_samples']})",
    )
    p.add_argument(
        "--n-features",
        type=_positive_int,
        default=DEMO_SIZE["n_features"],
        help=f"features per row (default {DEMO_SIZE['n_features']})",
    )
    p.add_argument(
        "--n-components",
        type=_positive_int,
        default=DEMO_SIZE["n_components"],
        help=f"components (default {DEMO_SIZE['n_components']})",
    )
    _add_store_chunk_rows_option(p)
    p.add_argument(
        "--seed",
        type=_non_negative_int,
        default=0,
        help="seeds the data and the fit (default 0)",
    )
    _add_quiet_option(p)
    _add_cluster_options(p, default="local")  # the main job shows the worker processes
    p.set_defaults(func=cmd_demo)
    return parser


STOP_SIGNALS: dict[int, int] = {signal.SIGTERM: 143, signal.SIGINT: 130}
"""The signals that stop a command gracefully, and the exit status of each (128 + the
signal's number, as a shell reports a process killed by it)."""


def _stop(signum: int, frame: Any) -> None:
    """The handler of `STOP_SIGNALS`: raise `Interrupted` in the main thread, wherever it is.

    Later stop signals are ignored: the stop under way closes the cluster and releases the
    checkpoint's lock (SIGKILL still ends the process at once). The logs of asyncio and
    distributed are silenced from then on: the cancelled computation's tasks report their
    cancellation there, and the one line of `_stopped` says what happened.
    """
    import logging

    for other in STOP_SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    for name in ("asyncio", "distributed", "tornado"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    if not hold_stop(signum):  # else raised once the step under way is done
        raise Interrupted(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into `Interrupted` for the ``with`` block (main thread only);
    the previous handlers are restored at its end."""
    previous = {signum: signal.signal(signum, _stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dask-em``; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_usage(parser, args)
    try:
        with stop_on_signals():
            return _run(args)
    finally:
        if "dask_em.store" in sys.modules:  # object-store sessions were possibly opened
            sys.modules["dask_em.store"].close_sessions()


def _stopped(args: argparse.Namespace, stop: Interrupted) -> str:
    """The line saying that the command was stopped by ``stop``, what it kept and how to
    go on (called once the cluster is closed and the checkpoint's lock released)."""
    from dask_em.checkpoint import describe

    said = f"stopped by {stop.name}"
    if args.command == "select" and args.checkpoint_dir:
        return (
            f"{said}; the last committed pass is kept: run the same command again to resume "
            f"from {args.checkpoint_dir}"
        )
    if args.command not in ("fit", "select"):
        return f"{said}; run the same command again to do the work anew"
    if not args.checkpoint_dir:
        return (
            f"{said}; nothing was kept (no --checkpoint-dir): give --checkpoint-dir DIR to "
            "make the next run resumable"
        )
    try:
        state = describe(
            args.checkpoint_dir, storage_options(getattr(args, "storage_option", None))
        )
    except UserError:  # no state committed yet, or none intact
        state = None
    if state is None:
        return (
            f"{said} before an iteration was saved; nothing was kept in {args.checkpoint_dir}; "
            "run the same command again to start over"
        )
    return (
        f"{said} after iteration {state['n_iter']}; run the same command again to resume "
        f"from {args.checkpoint_dir}"
    )


def _run(args: argparse.Namespace) -> int:
    """``args.func(args)`` with the exit status of each outcome (see the module docstring)."""
    try:
        return int(args.func(args))
    except UserError as err:
        print(f"dask-em {args.command}: error: {error_message(err, args)}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"dask-em {args.command}: {_stopped(args, stop)}", file=sys.stderr, flush=True)
        return STOP_SIGNALS[stop.signum]
    except KeyboardInterrupt:  # not through `_stop` (a handler replaced meanwhile)
        print(f"dask-em {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of stdout went away (e.g. `| head`): no more output can reach it, and
        # the interpreter must not fail again flushing stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(
            f"dask-em {args.command}: error: standard output was closed before the result "
            "was written; read the whole output",
            file=sys.stderr,
        )
        return 2
    except Exception:
        traceback.print_exc()
        print(
            f"dask-em {args.command}: internal error (a bug: please report it with the traceback above)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
