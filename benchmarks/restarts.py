"""Passes over the data with ``n_init`` restarts sharing every pass.

The ``n_init`` initializations and their EM runs advance together: each pass over the
data serves all of them, so the data is read as often as by the slowest run alone.
This prints ``n_passes_`` (initialization included), ``n_iter_`` of the kept run, its
lower bound and the wall time for each ``n_init``, on a Zarr store streamed every pass.

    python benchmarks/restarts.py                  # 400k x 8 rows, K=5, n_init 1 and 5
    python benchmarks/restarts.py --small          # seconds
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import dask
from acceleration import timed_fit

from dask_em import GaussianMixture
from dask_em.datasets import generate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--components", type=int, default=5)
    parser.add_argument("--n-init", default="1,5", help="comma list of n_init values")
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args(argv)
    if args.small:
        args.rows = 5_000
    with tempfile.TemporaryDirectory() as tmp, dask.config.set(scheduler="threads"):
        store = f"{tmp}/data.zarr"
        generate(store, args.rows, args.features, args.components, args.seed, 50_000)
        print(
            f"{args.rows:,} x {args.features} rows, K={args.components}, tol={args.tol:g}, "
            "kmeans init, streamed from Zarr (cache=False), threaded scheduler"
        )
        print(f"{'n_init':>6s} {'passes':>7s} {'n_iter':>7s} {'lower bound':>14s} {'seconds':>8s}")
        for n_init in (int(v) for v in args.n_init.split(",")):
            gm = GaussianMixture(
                args.components,
                n_init=n_init,
                tol=args.tol,
                random_state=args.seed,
                cache=False,
            )
            seconds = timed_fit(gm, store)
            print(
                f"{n_init:6d} {gm.n_passes_:7d} {gm.n_iter_:7d} {gm.lower_bound_:14.8f} {seconds:8.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
