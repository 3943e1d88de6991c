"""Passes over the data to reach a tight tolerance: plain EM vs SQUAREM.

On strongly overlapping mixtures EM creeps: each iteration gains little, and a loose
``tol`` stops it early at a worse point. Both runs here use the same data, the same
initialization (``random_state``) and ``tol=1e-8``; the table gives passes over the
data (``n_passes_``, initialization included), iterations, the final lower bound and
the wall time, for several datasets.

    python benchmarks/acceleration.py                 # 200k x 3 rows, K=4, 3 datasets
    python benchmarks/acceleration.py --small         # seconds
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import dask.array as da
import numpy as np
from sklearn.exceptions import ConvergenceWarning

from dask_em import GaussianMixture
from dask_em.datasets import mixture_rows, true_params
from dask_em.params import GMMParams


def overlapping_data(
    rows: int, features: int, components: int, seed: int, squeeze: float
) -> np.ndarray:
    """Rows of a mixture whose means are pulled towards each other by ``squeeze``."""
    truth = true_params(components, features, seed)
    close = GMMParams.from_covariances(
        truth.weights, truth.means * squeeze, truth.covariances, "full"
    )
    return mixture_rows(0, rows, close, seed)


def timed_fit(gm: GaussianMixture, X: object) -> float:
    """Fit ``gm`` on ``X`` (a ConvergenceWarning is expected at a tight ``tol``); the seconds."""
    began = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm.fit(X)
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--features", type=int, default=3)
    parser.add_argument("--components", type=int, default=4)
    parser.add_argument(
        "--squeeze", type=float, default=0.25, help="means scale (smaller: more overlap)"
    )
    parser.add_argument("--seeds", default="5,6,7")
    parser.add_argument("--tol", type=float, default=1e-8)
    parser.add_argument("--max-iter", type=int, default=5000)
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args(argv)
    if args.small:
        args.rows, args.seeds, args.max_iter = 5_000, "5", 300
    print(
        f"{args.rows:,} x {args.features} rows, K={args.components}, means x{args.squeeze}, "
        f"tol={args.tol:g}, kmeans init (random_state=0), threaded scheduler"
    )
    print(
        f"{'data seed':>9s} {'method':>8s} {'passes':>7s} {'iters':>6s} {'converged':>9s} {'lower bound':>17s} {'seconds':>8s}"
    )
    ratios = []
    for seed in (int(s) for s in args.seeds.split(",")):
        X = da.from_array(
            overlapping_data(args.rows, args.features, args.components, seed, args.squeeze),
            chunks=(max(1, args.rows // 8), -1),
        )
        passes = {}
        for method in (None, "squarem"):
            gm = GaussianMixture(
                args.components,
                tol=args.tol,
                max_iter=args.max_iter,
                random_state=0,
                acceleration=method,
            )
            seconds = timed_fit(gm, X)
            passes[method] = gm.n_passes_
            print(
                f"{seed:9d} {method or 'plain':>8s} {gm.n_passes_:7d} {gm.n_iter_:6d} {gm.converged_!s:>9s} "
                f"{gm.lower_bound_:17.10f} {seconds:8.2f}"
            )
        ratios.append(passes[None] / passes["squarem"])
    print("passes plain / squarem: " + ", ".join(f"{r:.1f}x" for r in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
