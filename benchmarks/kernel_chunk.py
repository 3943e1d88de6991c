"""Time one chunk's E-step (`dask_em.kernels.em_chunk`) on one thread, NumPy and compiled paths.

Reports milliseconds per chunk (median of the repeats) and the share of a one-thread
float64 matrix multiply that the chunk's nominal arithmetic (``flops_per_iteration`` of
``benchmarks/peers.py``) reaches, with the first call's time (JIT compilation) and the
largest difference between the two paths' statistics.

    OPENBLAS_NUM_THREADS=1 python benchmarks/kernel_chunk.py            # 65,536 x 8, K=5, full
    OPENBLAS_NUM_THREADS=1 python benchmarks/kernel_chunk.py --d 16 --k 8
    python benchmarks/kernel_chunk.py --small        # 4,096 rows; exercised by the tests
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import flops_per_iteration  # noqa: E402

from dask_em import kernels, kernels_compiled  # noqa: E402
from dask_em.datasets import mixture_rows, true_params  # noqa: E402
from dask_em.params import GMMParams  # noqa: E402


def matmul_gflops_one_thread(size: int = 1024, repeats: int = 3) -> float:
    """Best one-thread float64 matrix-multiply rate, in GFLOP/s."""
    rng = np.random.default_rng(0)
    a, b = rng.random((size, size)), rng.random((size, size))
    best = np.inf
    for _ in range(repeats):
        t = time.process_time()
        a @ b
        best = min(best, time.process_time() - t)
    return 2.0 * size**3 / best / 1e9


def time_chunk(X: np.ndarray, params: GMMParams, repeats: int) -> tuple[float, float]:
    """(first call, median of ``repeats`` later calls) in seconds of this process's CPU
    time (one thread: on a shared machine, the time others take the core is left out)."""
    t = time.process_time()
    kernels.em_chunk(X, None, 0, 0, params)
    first = time.process_time() - t
    times = []
    for _ in range(repeats):
        t = time.process_time()
        kernels.em_chunk(X, None, 0, 0, params)
        times.append(time.process_time() - t)
    return first, statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=65_536)
    parser.add_argument("--d", type=int, default=8)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--small", action="store_true", help="4,096 rows, 3 repeats")
    args = parser.parse_args(argv)
    if args.small:
        args.rows, args.repeats = 4096, 3
    truth = true_params(args.k, args.d, 0)
    X = mixture_rows(0, args.rows, truth, 0)
    params = GMMParams.from_covariances(
        truth.weights, truth.means + 0.3, truth.covariances * 1.2, "full"
    )
    flops = flops_per_iteration(args.rows, args.d, args.k, "full")
    with threadpool_limits(1):
        peak = matmul_gflops_one_thread()
        print(
            f"{args.rows:,} x {args.d}, K={args.k}, full, float64, one thread; "
            f"matmul {peak:.1f} GFLOP/s; {flops / 1e6:.1f} MFLOP per chunk"
        )
        print(f"{'path':10s} {'ms/chunk':>9s} {'% matmul':>9s} {'first call ms':>14s}")
        results = {}
        for path in ("numpy", "compiled"):
            if path == "compiled" and not kernels_compiled.available:
                print("compiled   skipped: numba is not installed (pip install -e '.[fast]')")
                continue
            with kernels.compiled_kernels(path == "compiled"):
                first, median = time_chunk(X, params, args.repeats)
                results[path] = kernels.em_chunk(X, None, 0, 0, params)
            share = flops / median / 1e9 / peak
            print(f"{path:10s} {median * 1e3:9.2f} {share:9.1%} {first * 1e3:14.1f}")
    if len(results) == 2:
        a, b = results["numpy"], results["compiled"]
        rel = max(
            float(np.max(np.abs(x - y)) / np.max(np.abs(x)))
            for x, y in ((a.n, b.n), (a.s1, b.s1), (a.s2, b.s2))
        )
        print(
            f"compiled vs numpy: statistics max rel diff {rel:.2e}, "
            f"loglik rel diff {abs(a.loglik - b.loglik) / abs(a.loglik):.2e}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
