"""Seconds per EM iteration against rows per task, on a store written with small chunks.

A 2M x 8 float64 store in 2,000-row chunks (1,000 chunks of 125 KiB) is fitted for a
few EM iterations (``tol=0``, 5 full components, fixed start) on a local cluster of
worker processes, streaming from Zarr every pass. Each configuration opens the store
with `dask_em.io.open_array` and a ``chunk_rows``: ``store`` is one task per store chunk
(what dask-em did before automatic sizing), ``auto`` is `dask_em.io.choose_chunk_rows`'s choice,
and ``N MiB`` are other task sizes for comparison. Configurations run alternately for
several rounds, so load from other processes on the machine spreads over all of them;
the table gives the median over rounds of each round's median seconds per iteration,
and the ratio to ``auto``.

    python benchmarks/chunking.py                      # 2M x 8, 2 workers x 1 thread
    python benchmarks/chunking.py --rounds 5 --iters 6
    python benchmarks/chunking.py --small              # seconds
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from dask_em import kernels
from dask_em.datasets import mixture_rows, true_params
from dask_em.em import EMResult, run_em
from dask_em.io import choose_chunk_rows, open_array
from dask_em.params import GMMParams
from dask_em.reduce import RowData

MiB = 2**20


def write_store(path: Path, n: int, d: int, k: int, store_rows: int, seed: int) -> GMMParams:
    """Write ``n`` x ``d`` mixture rows in ``store_rows``-row chunks; return a start."""
    truth = true_params(k, d, seed)
    z = zarr.create_array(store=str(path), shape=(n, d), chunks=(store_rows, d), dtype="f8")
    for start in range(0, n, 100 * store_rows):
        stop = min(n, start + 100 * store_rows)
        z[start:stop] = mixture_rows(start // store_rows, stop - start, truth, seed)
    rng = np.random.default_rng(seed + 1)
    means = truth.means + rng.normal(scale=0.5, size=truth.means.shape)
    return GMMParams.from_covariances(np.full(k, 1.0 / k), means, truth.covariances, "full")


def seconds_per_iteration(
    store: Path, chunk_rows: int | None, start: GMMParams, iters: int
) -> float:
    """Median seconds of ``iters`` EM iterations streamed from ``store`` (the first dropped)."""
    data = RowData(open_array(store, chunk_rows=chunk_rows))
    seconds: list[float] = []
    run_em(
        lambda p: data.map_reduce(kernels.em_chunk, p),
        EMResult(start),
        tol=0.0,
        max_iter=iters + 1,
        reg_covar=1e-6,
        callback=lambda it: seconds.append(it.seconds),
    )
    return statistics.median(seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2_000_000)
    parser.add_argument("--d", type=int, default=8)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--store-rows", type=int, default=2000)
    parser.add_argument("--iters", type=int, default=4, help="timed iterations per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mib", default="8,128", help="extra task sizes to try, in MiB")
    parser.add_argument("--small", action="store_true", help="200,000 rows, 1 round")
    args = parser.parse_args()
    if args.small:
        args.n, args.rounds, args.iters = 200_000, 1, 2
    from distributed import Client

    from dask_em.cluster import local_cluster

    row_bytes = args.d * 8
    configs: dict[str, int | None] = {"store": args.store_rows, "auto": None}
    for mib in (int(m) for m in args.mib.split(",") if m):
        configs[f"{mib} MiB"] = max(1, mib * MiB // row_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "data.zarr"
        start = write_store(store, args.n, args.d, args.k, args.store_rows, seed=0)
        with (
            local_cluster(args.workers, 1) as cluster,
            Client(cluster),
        ):
            results: dict[str, list[float]] = {name: [] for name in configs}
            for round_ in range(args.rounds):
                for name, chunk_rows in configs.items():
                    t = seconds_per_iteration(store, chunk_rows, start, args.iters)
                    results[name].append(t)
                    print(f"round {round_}: {name:>8}  {t:.3f} s/iteration", flush=True)
    auto = statistics.median(results["auto"])
    print(
        f"\n{args.n:,} x {args.d} float64, {args.store_rows:,}-row store chunks, "
        f"K={args.k} full, {args.workers} worker processes x 1 thread, streamed from Zarr"
    )
    print(f"{'config':>8}  {'rows/task':>10}  {'tasks':>6}  {'s/iteration':>11}  {'vs auto':>7}")
    for name, chunk_rows in configs.items():
        rows = choose_chunk_rows(args.n, args.d, 8, args.store_rows, chunk_rows)
        tasks = -(-args.n // rows)
        med = statistics.median(results[name])
        print(f"{name:>8}  {rows:>10,}  {tasks:>6,}  {med:>11.3f}  {med / auto:>6.2f}x")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"(total {time.perf_counter() - t0:.0f} s)")
