"""Out-of-core scaling: EM on Zarr data many times larger than the workers' memory.

Generates a mixture dataset into a Zarr store chunk by chunk (never in memory at once),
then fits it with dask-em streaming every pass from the store (``cache=False``) on a
local cluster whose workers have a small memory limit. During the fit a sampler thread
reads every worker's RSS; the report gives peak RSS per worker against its limit,
seconds per iteration, and whether any worker spilled to disk or paused.

    python benchmarks/out_of_core.py --rows 134000000 --memory-limit 512MiB  # 8 GiB vs 2 x 512 MiB
    python benchmarks/out_of_core.py --sweep 1e6,2e6,4e6,8e6,16e6,32e6        # time vs rows
    python benchmarks/out_of_core.py --small                                   # seconds

The store is written under --workdir (default: a temporary directory, removed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

from dask_em import kernels
from dask_em.datasets import mixture_rows, true_params
from dask_em.em import EMResult, run_em
from dask_em.io import store_array
from dask_em.reduce import RowData, from_blocks, row_chunks


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _spill_state(dask_worker: Any) -> dict[str, int]:
    data = dask_worker.data
    slow = getattr(data, "slow", None)
    return {
        "spilled_keys": len(slow) if slow is not None else 0,
        "paused": int(str(getattr(dask_worker, "status", "")).endswith("paused")),
    }


def generate(path: str, rows: int, features: int, components: int, chunk_rows: int) -> float:
    """Write the dataset; return seconds."""
    truth = true_params(components, features, 0)
    X = from_blocks(mixture_rows, row_chunks(rows, chunk_rows), features, np.float64, truth, 0)
    began = time.perf_counter()
    store_array(X, path, {"generator": "benchmarks/out_of_core.py"}, kind="data")
    return time.perf_counter() - began


def fit_streamed(client: Any, path: str, components: int, iters: int) -> dict[str, Any]:
    """Fit ``iters`` EM iterations streaming from ``path``, sampling worker RSS all along."""
    import dask.array as da

    peaks: dict[str, int] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for addr, rss in client.run(_rss).items():
                peaks[addr] = max(peaks.get(addr, 0), rss)
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    data = RowData(da.from_zarr(path))  # cache=False: every pass reads the store
    X0 = data.read_rows(np.arange(min(100_000, data.shape[0])))
    truth = true_params(components, data.shape[1], 0)
    start = EMResult(
        truth.__class__.from_covariances(
            np.full(components, 1.0 / components), truth.means + 0.3, truth.covariances, "full"
        )
    )
    seconds: list[float] = []
    try:
        result = run_em(
            lambda p: data.map_reduce(kernels.em_chunk, p),
            start,
            tol=0.0,
            max_iter=iters,
            reg_covar=1e-6,
            callback=lambda it: seconds.append(it.seconds),
        )
    finally:
        stop.set()
        sampler.join()
    spill = client.run(_spill_state)
    return {
        "rows": data.shape[0],
        "bytes": int(data.X.nbytes),
        "seconds_per_iter": float(np.median(seconds)),
        "seconds": seconds,
        "peak_rss": peaks,
        "spill": spill,
        "lower_bound": result.lower_bound,
        "check_loglik_first_rows": float(np.mean(kernels.score_samples_block(X0, result.params))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=float, default=134_000_000, help="rows of the big run (8 features)"
    )
    parser.add_argument("--sweep", help="comma list of row counts instead of one big run")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--components", type=int, default=5)
    parser.add_argument("--chunk-rows", type=int, default=250_000)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="512MiB", help="per worker")
    parser.add_argument("--workdir", help="where to write the stores (kept)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    sizes = [int(float(s)) for s in args.sweep.split(",")] if args.sweep else [int(args.rows)]
    if args.small:
        sizes, args.chunk_rows, args.iters = [200_000], 50_000, 2

    from dask.utils import parse_bytes
    from distributed import Client

    from dask_em.cluster import local_cluster

    limit = parse_bytes(args.memory_limit)
    workdir = args.workdir or tempfile.mkdtemp(prefix="dask-em-ooc-")
    reports = []
    try:
        with (
            local_cluster(args.workers, 1, args.memory_limit) as cluster,
            Client(cluster) as client,
        ):
            for rows in sizes:
                path = os.path.join(workdir, f"rows-{rows}.zarr")
                gen = (
                    generate(path, rows, args.features, args.components, args.chunk_rows)
                    if not os.path.exists(path)
                    else 0.0
                )
                report = fit_streamed(client, path, args.components, args.iters)
                report["generate_seconds"] = gen
                reports.append(report)
                peak = max(report["peak_rss"].values())
                spilled = sum(s["spilled_keys"] for s in report["spill"].values())
                print(
                    f"rows {rows:>11,}  data {report['bytes'] / 2**30:7.2f} GiB "
                    f"({report['bytes'] / (limit * args.workers):6.1f}x the workers' total limit)  "
                    f"{report['seconds_per_iter']:8.2f} s/iter  {report['seconds_per_iter'] / rows * 1e9:6.1f} ns/row  "
                    f"peak worker RSS {peak / 2**20:6.0f} MiB of {limit / 2**20:.0f} MiB  spilled keys {spilled}",
                    flush=True,
                )
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"memory_limit": limit, "workers": args.workers, "runs": reports}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
