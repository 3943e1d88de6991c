"""Model selection over K and covariance type: shared passes against separate fits.

Three ways to get a BIC for every candidate (K x covariance type) on the same data:

- ``dask_em.select``: every candidate in the same passes over a Zarr store, plus one
  shared pass scoring the final parameters;
- dask-em candidate by candidate: ``GaussianMixture(K, covariance_type=t).fit(store)``
  then ``.bic(store)`` (one more pass each);
- scikit-learn looping over K and type in memory (the rows loaded first, load included).

Prints the passes over the data and the wall time of each, then the selection's table.
Data is streamed from the store every pass (``cache=False``), threaded scheduler.

    python benchmarks/model_selection.py                  # 400k x 6 rows of a 5-component mixture, K 1-8
    python benchmarks/model_selection.py --small          # seconds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings

import dask
import numpy as np
import zarr
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from dask_em import GaussianMixture
from dask_em.datasets import generate
from dask_em.select import select


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--features", type=int, default=6)
    parser.add_argument("--components", type=int, default=5, help="of the generated mixture")
    parser.add_argument("--max-k", type=int, default=8, help="candidates K = 1..max-k")
    parser.add_argument("--types", default="full,diag", help="comma list of covariance types")
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args(argv)
    if args.small:
        args.rows, args.max_k = 5_000, 3
    ks, types = range(1, args.max_k + 1), args.types.split(",")
    warnings.simplefilter("ignore", ConvergenceWarning)
    with tempfile.TemporaryDirectory() as tmp, dask.config.set(scheduler="threads"):
        store = f"{tmp}/data.zarr"
        generate(store, args.rows, args.features, args.components, args.seed, 50_000)
        print(
            f"{args.rows:,} x {args.features} rows of a {args.components}-component mixture; "
            f"candidates K=1..{args.max_k} x {','.join(types)} ({len(ks) * len(types)}), "
            f"tol={args.tol:g}, kmeans init, streamed from Zarr, threaded scheduler"
        )
        began = time.perf_counter()
        result = select(store, ks, types, tol=args.tol, random_state=args.seed, cache=False)
        shared_seconds = time.perf_counter() - began

        began, separate_passes, separate_bic = time.perf_counter(), 0, []
        for t in types:
            for k in ks:
                gm = GaussianMixture(k, covariance_type=t, tol=args.tol, random_state=args.seed)
                gm.set_params(cache=False)
                gm.fit(store)
                separate_bic.append(gm.bic(store))
                separate_passes += gm.n_passes_ + 1
        separate_seconds = time.perf_counter() - began

        began = time.perf_counter()
        X = np.asarray(zarr.open_array(store, mode="r")[...], dtype=np.float64)
        sk_bic = [
            SkGaussianMixture(k, covariance_type=t, tol=args.tol, random_state=args.seed)
            .fit(X)
            .bic(X)
            for t in types
            for k in ks
        ]
        sk_seconds = time.perf_counter() - began

        print(f"{'method':<34s} {'passes':>7s} {'seconds':>8s}")
        print(f"{'dask_em.select (shared passes)':<34s} {result.n_passes:7d} {shared_seconds:8.2f}")
        print(
            f"{'dask-em, one fit per candidate':<34s} {separate_passes:7d} {separate_seconds:8.2f}"
        )
        print(f"{'scikit-learn loop (in memory)':<34s} {'-':>7s} {sk_seconds:8.2f}")
        same = max(
            abs(a - c.bic) / abs(c.bic)
            for a, c in zip(separate_bic, result.candidates, strict=True)
        )
        print(f"max rel. BIC difference, select vs separate fits: {same:.1e}")
        sk_best = result.candidates[int(np.argmin(sk_bic))]
        print(
            f"scikit-learn's best: {sk_best.covariance_type} K={sk_best.n_components}; "
            f"select's best: {result.best.covariance_type} K={result.best.n_components}"
        )
        print(result.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
