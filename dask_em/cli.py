"""The ``dask-em`` command: parse arguments, call the library, print, exit.

Exit status: 0 on success (also when a fit did not converge: the summary says so),
2 on bad usage or bad input (one line on stderr, no traceback, nothing written),
1 on an unexpected internal error (with a traceback to report).

Progress goes to stderr (one line per iteration; ``--quiet`` silences it); results go
to stdout, as JSON with ``--json`` (``score`` and ``info`` always print JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NoReturn

import dask.array as da
import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.exceptions import ConvergenceWarning

from dask_em import __version__
from dask_em.checkpoint import (
    LOCK,
    MANIFEST,
    Checkpoint,
    check_checkpoint_dir,
    checkpoint_lock,
    discard,
)
from dask_em.cluster import connect, tls_security
from dask_em.datasets import mixture_labels, mixture_rows, true_params
from dask_em.errors import DataError, EmptyComponentWarning
from dask_em.estimator import GaussianMixture, load_model
from dask_em.init import INITIALIZERS
from dask_em.io import (
    check_destination,
    check_output,
    model_bytes,
    open_array,
    read_model,
    store_array,
)
from dask_em.params import COVARIANCE_TYPES, ILL_DEFINED_COVARIANCE, GMMParams, n_parameters
from dask_em.reduce import from_blocks, row_chunks

DEMO_SIZE = {"n_samples": 2_000_000, "n_features": 8, "n_components": 5}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line and exit with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


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


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster (default: a local cluster of worker processes)")
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
        "--memory-limit", metavar="SIZE", help="local cluster: memory limit per worker, e.g. 2GiB"
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


def _add_chunk_rows_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--chunk-rows",
        type=_positive_int,
        metavar="R",
        help="rows per task, rounded up to whole store chunks "
        "(default: automatic, store chunks merged up to ~32 MiB per task)",
    )


def _cluster(args: argparse.Namespace) -> Any:
    if (args.scheduler or args.scheduler_file) and (
        args.n_workers or args.threads_per_worker or args.memory_limit
    ):
        raise DataError(
            "--n-workers/--threads-per-worker/--memory-limit shape a local cluster; "
            "drop them with --scheduler or --scheduler-file."
        )
    security = None
    if args.tls_ca_file or args.tls_cert or args.tls_key:
        if not (args.tls_ca_file and args.tls_cert):
            raise DataError(
                "a TLS connection needs --tls-ca-file and --tls-cert (and --tls-key unless "
                "the certificate file holds the key)."
            )
        security = tls_security(args.tls_ca_file, args.tls_cert, args.tls_key)
    return connect(
        scheduler=args.scheduler,
        scheduler_file=args.scheduler_file,
        n_workers=args.n_workers,
        threads_per_worker=args.threads_per_worker,
        memory_limit=args.memory_limit,
        quiet=getattr(args, "quiet", False),
        security=security,
    )


def _say(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


def _print_json(value: dict[str, Any]) -> None:
    print(json.dumps(value, indent=2, default=_json_default, allow_nan=False))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


# ---------------------------------------------------------------------------- generate
def generate(
    path: str, n_samples: int, n_features: int, n_components: int, seed: int, chunk_rows: int
) -> GMMParams:
    """Write a synthetic mixture dataset to a Zarr array; return its true parameters."""
    params = true_params(n_components, n_features, seed)
    X = from_blocks(
        mixture_rows, row_chunks(n_samples, chunk_rows), n_features, np.float64, params, seed
    )
    store_array(
        X,
        path,
        kind="data",
        attrs={
            "generator": "dask-em generate",
            "seed": seed,
            "true_weights": params.weights.tolist(),
            "true_means": params.means.tolist(),
            "true_covariances": params.covariances.tolist(),
        },
    )
    return params


def cmd_generate(args: argparse.Namespace) -> int:
    with _cluster(args):
        start = time.perf_counter()
        generate(
            args.out, args.n_samples, args.n_features, args.n_components, args.seed, args.chunk_rows
        )
    _say(
        args,
        f"wrote {args.n_samples} x {args.n_features} rows of a {args.n_components}-component "
        f"mixture to {args.out} in {time.perf_counter() - start:.1f} s",
    )
    return 0


# --------------------------------------------------------------------------------- fit
def _fit(
    args: argparse.Namespace, data: str, array: str | None, checkpoint_dir: str | None
) -> tuple[GaussianMixture, float]:
    """Fit with progress on stderr; return the estimator and the seconds it took."""
    gm = GaussianMixture(
        args.n_components,
        covariance_type=args.covariance_type,
        tol=args.tol,
        reg_covar=args.reg_covar,
        max_iter=args.max_iter,
        n_init=args.n_init,
        init_params=args.init_params,
        random_state=args.seed,
        verbose=0 if args.quiet else 2,
        verbose_interval=1,
        checkpoint_dir=checkpoint_dir,
        acceleration=getattr(args, "acceleration", None),
    )
    X = open_array(data, array, getattr(args, "chunk_rows", None))
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            gm.fit(X)
        except ValueError as err:
            if ILL_DEFINED_COVARIANCE not in str(err):
                raise
            # the library's advice names the parameter; name the option too
            larger = max(1e-6, 10.0 * args.reg_covar)
            raise DataError(
                f"{err} (here --reg-covar {args.reg_covar:g}: try --reg-covar {larger:g})"
            ) from None
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            _say(
                args,
                f"note: not converged after {gm.n_iter_} iterations (tol {args.tol}); "
                "raise --max-iter or --tol",
            )
        elif issubclass(w.category, EmptyComponentWarning) or "checkpoint" in str(w.message):
            _say(args, f"warning: {w.message}")
    return gm, time.perf_counter() - start


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


def cmd_fit(args: argparse.Namespace) -> int:
    # bad input fails here, before a cluster starts
    X = open_array(args.data, args.array, args.chunk_rows)
    if X.shape[0] < args.n_components:
        raise DataError(
            f"{args.data} has {X.shape[0]} rows, fewer than --n-components "
            f"{args.n_components}; use fewer components or more data."
        )
    check_output(args.output, "model", [args.data])
    size = model_bytes(args.n_components, X.shape[1], args.covariance_type)
    check_destination(args.output, size)
    if args.checkpoint_dir:
        check_checkpoint_dir(args.checkpoint_dir, args.n_init, size)
    if args.restart and not args.checkpoint_dir:
        raise DataError("--restart discards a checkpoint: give --checkpoint-dir too.")
    # held from the discarding of --restart to the end (the fit takes it again, re-entrantly)
    with checkpoint_lock(args.checkpoint_dir) if args.checkpoint_dir else nullcontext():
        if args.restart:
            discard(args.checkpoint_dir)
        with _cluster(args):
            gm, seconds = _fit(args, args.data, args.array, args.checkpoint_dir)
            gm.save(args.output)
    summary = {
        **_summary(gm),
        "seconds": round(seconds, 3),
        "model": args.output,
        "checkpoint_dir": args.checkpoint_dir,
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
    gm = load_model(args.model)
    gm.set_params(chunk_rows=None)  # the rows per task are chosen when opening DATA
    X = open_array(args.data, args.array, args.chunk_rows)
    if X.shape[1] != gm.n_features_in_:
        raise DataError(
            f"{args.data} has {X.shape[1]} features but the model was fitted on "
            f"{gm.n_features_in_}; use data with the same features."
        )
    return gm, X


def cmd_predict(args: argparse.Namespace) -> int:
    gm, X = _model_and_data(args)
    check_output(args.output, "predictions", [args.model, args.data])
    check_destination(args.output)
    with _cluster(args):
        start = time.perf_counter()
        out = gm.predict_proba(X) if args.proba else gm.predict(X)
        store_array(
            out,
            args.output,
            {"model": str(args.model), "kind": "predict_proba" if args.proba else "predict"},
            kind="predictions",
            inputs=[args.model, args.data],
        )
    _say(
        args,
        f"wrote {'responsibilities' if args.proba else 'labels'} of {X.shape[0]} rows to "
        f"{args.output} in {time.perf_counter() - start:.1f} s",
    )
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    gm, X = _model_and_data(args)
    with _cluster(args):
        mean = float(gm.score_samples(X).mean().compute())
    n = int(X.shape[0])
    p = n_parameters(gm.n_components, int(gm.n_features_in_), gm.covariance_type)
    _print_json(
        {
            "mean_log_likelihood": _finite(mean),
            "bic": _finite(-2 * mean * n + p * math.log(n)),
            "aic": _finite(-2 * mean * n + 2 * p),
            "n_samples": n,
        }
    )
    return 0


# -------------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.name.startswith("state-") and (path / "state.json").exists():
        path = path.parent  # a state directory: describe its checkpoint
    if (path / MANIFEST).exists() or (path / LOCK).exists() or any(path.glob("state-*")):
        loaded = Checkpoint(path, {}).load(check_fingerprint=False)
        if loaded is None:
            raise DataError(
                f"{args.path} holds no checkpoint state yet (a fit may be starting on it)."
            )
        state = loaded.state
        run = state.best
        if run is None:
            raise DataError(
                f"{args.path} holds a state saved before any initialization finished; "
                "run the fit to go on."
            )
        hyper = loaded.fingerprint.get("hyper_parameters", {})
        _print_json(
            {
                "kind": "checkpoint",
                "n_components": run.params.n_components,
                "covariance_type": run.params.covariance_type,
                "n_features": run.params.n_features,
                "n_iter": run.n_iter,
                "converged": run.converged,
                "lower_bound": _finite(run.lower_bound),
                "lower_bounds": [_finite(b) for b in run.lower_bounds],
                "n_passes": loaded.n_passes,
                "done": state.done,
                "n_init": len(state.seeds),
                "runs": [
                    None
                    if r is None
                    else {
                        "n_iter": r.n_iter,
                        "converged": r.converged,
                        "lower_bound": _finite(r.lower_bound),
                    }
                    for r in (state.run(i) for i in range(len(state.seeds)))
                ],
                "hyper_parameters": hyper,
                "data": loaded.fingerprint.get("data"),
                "skipped_damaged_states": loaded.skipped,
            }
        )
        return 0
    params, attrs = read_model(args.path)
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
def _match(true_means: np.ndarray, fitted_means: np.ndarray) -> np.ndarray:
    """``order[j]``: the fitted component matched to true component ``j`` (min total distance)."""
    cost = np.linalg.norm(true_means[:, None, :] - fitted_means[None, :, :], axis=2)
    _, order = linear_sum_assignment(cost)
    return order


DEMO_N_INIT = 4
"""Initializations the demo keeps the best of (one alone may end in a poor optimum)."""


def cmd_demo(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data, model, labels, ckpt = (
        workdir / n for n in ("data.zarr", "model.zarr", "labels.zarr", "checkpoint")
    )
    n, d, k, seed = args.n_samples, args.n_features, args.n_components, args.seed
    discard(ckpt)
    with _cluster(args):
        t0 = time.perf_counter()
        truth = generate(str(data), n, d, k, seed, args.chunk_rows)
        t1 = time.perf_counter()
        _say(
            args,
            f"generated {n} x {d} rows ({n * d * 8 / 2**20:.0f} MiB) in {data} in "
            f"{t1 - t0:.1f} s; fitting {k} components",
        )
        fit_args = argparse.Namespace(
            n_components=k,
            covariance_type="full",
            tol=1e-3,
            reg_covar=1e-6,
            max_iter=100,
            n_init=DEMO_N_INIT,
            init_params="kmeans",
            seed=seed,
            quiet=args.quiet,
        )
        gm, fit_seconds = _fit(fit_args, str(data), None, str(ckpt))
        gm.save(model)
        t2 = time.perf_counter()
        X = open_array(str(data))
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
        true_labels = from_blocks(  # drawn per chunk of the generated store
            mixture_labels, row_chunks(n, args.chunk_rows), None, np.int64, truth, seed
        )
        predicted = da.from_zarr(str(labels)).map_blocks(relabel.__getitem__, dtype=np.int64)
        agreement = float((predicted == true_labels).mean().compute())
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


# ------------------------------------------------------------------------------ parser
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
    p.add_argument("out", metavar="OUT.zarr")
    p.add_argument("--n-samples", type=_positive_int, required=True)
    p.add_argument("--n-features", type=_positive_int, required=True)
    p.add_argument("--n-components", type=_positive_int, required=True)
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument(
        "--chunk-rows",
        type=_positive_int,
        default=250_000,
        metavar="R",
        help="rows per chunk of the written store (default 250000)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    _add_cluster_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("fit", help="fit a Gaussian mixture to a Zarr array")
    p.add_argument(
        "data", metavar="DATA", help="path or URL of a Zarr array (or group, with --array)"
    )
    p.add_argument("--array", metavar="NAME", help="array inside a Zarr group")
    p.add_argument("--n-components", type=_positive_int, required=True)
    p.add_argument("--output", required=True, metavar="MODEL.zarr")
    p.add_argument("--covariance-type", choices=COVARIANCE_TYPES, default="full")
    p.add_argument("--tol", type=_non_negative_float, default=1e-3)
    p.add_argument("--max-iter", type=_non_negative_int, default=100)
    p.add_argument("--reg-covar", type=_non_negative_float, default=1e-6)
    p.add_argument("--init-params", choices=list(INITIALIZERS), default="kmeans")
    p.add_argument("--n-init", type=_positive_int, default=1)
    p.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--acceleration", choices=["squarem"], help="SQUAREM extrapolation (fewer passes)"
    )
    p.add_argument(
        "--checkpoint-dir", metavar="DIR", help="save state every iteration; rerun to resume"
    )
    p.add_argument("--restart", action="store_true", help="discard the checkpoint and start over")
    _add_chunk_rows_option(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    _add_cluster_options(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("predict", help="write labels (or responsibilities) of a Zarr array")
    p.add_argument("model", metavar="MODEL.zarr")
    p.add_argument("data", metavar="DATA")
    p.add_argument("--array", metavar="NAME")
    p.add_argument("--output", required=True, metavar="OUT.zarr")
    p.add_argument(
        "--proba", action="store_true", help="write responsibilities (n, K) instead of labels"
    )
    _add_chunk_rows_option(p)
    p.add_argument("--quiet", action="store_true")
    _add_cluster_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("score", help="JSON: mean log-likelihood, bic, aic, n_samples")
    p.add_argument("model", metavar="MODEL.zarr")
    p.add_argument("data", metavar="DATA")
    p.add_argument("--array", metavar="NAME")
    _add_chunk_rows_option(p)
    p.add_argument("--quiet", action="store_true")
    _add_cluster_options(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("info", help="JSON description of a model or a checkpoint directory")
    p.add_argument("path", metavar="MODEL.zarr|CHECKPOINT_DIR")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "demo", help="generate, fit (checkpointed), predict and report on a local cluster"
    )
    p.add_argument("--workdir", default="dask-em-demo", metavar="DIR")
    p.add_argument("--n-samples", type=_positive_int, default=DEMO_SIZE["n_samples"])
    p.add_argument("--n-features", type=_positive_int, default=DEMO_SIZE["n_features"])
    p.add_argument("--n-components", type=_positive_int, default=DEMO_SIZE["n_components"])
    p.add_argument("--chunk-rows", type=_positive_int, default=250_000)
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--quiet", action="store_true")
    _add_cluster_options(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dask-em``; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (DataError, ValueError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"dask-em {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dask-em {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(
            f"dask-em {args.command}: internal error (a bug: please report it with the traceback above)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
