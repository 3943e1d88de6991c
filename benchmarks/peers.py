"""Side-by-side EM iteration timings: dask-em (cached and streamed) vs scikit-learn vs Spark MLlib.

dask-em also runs cached with ``compute_dtype='float32'`` (float32 products of the float64
rows, statistics accumulated in float64); a last line gives that row's speed against
dask-em's float64 row and scikit-learn's.

Every engine runs a fixed number of EM iterations (``tol=0``) on the same data from the
same starting parameters where it accepts them (dask-em and scikit-learn: weights, means
and precisions; Spark MLlib's RDD API: an initial model with the full covariances). The
table gives median seconds per iteration, the ratio of each peer to dask-em (cached),
achieved GFLOP/s against a matrix-multiply rate measured in the same run, and the mean
log-likelihood of the final parameters on the data (computed by one function for all).

    python benchmarks/peers.py --shape A            # 2M x 8, K=5, full
    python benchmarks/peers.py --shape B --iters 5  # 1M x 32, K=16, full
    python benchmarks/peers.py --small              # seconds; exercised by the tests

Spark needs ``pip install -e '.[bench]'`` (pyspark) and a Java runtime; without them the
Spark row says why it was skipped. Where the compiled kernel serves the shape (numba
installed, the ``fast`` extra; full covariances, D <= 16, float64), a second cached row
runs dask-em's NumPy kernel right after it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from dask_em import kernels, kernels_compiled
from dask_em.datasets import mixture_rows, true_params
from dask_em.em import EMResult, run_em
from dask_em.io import store_array
from dask_em.params import GMMParams
from dask_em.reduce import RowData
from dask_em.stats import SuffStats

SHAPES: dict[str, dict[str, Any]] = {
    "A": {"n": 2_000_000, "d": 8, "k": 5, "cov": "full"},
    "B": {"n": 1_000_000, "d": 32, "k": 16, "cov": "full"},
    "C": {"n": 4_000_000, "d": 4, "k": 3, "cov": "diag"},
    "small": {"n": 20_000, "d": 4, "k": 3, "cov": "full"},
}


@dataclass
class Row:
    """One engine's outcome."""

    engine: str
    seconds: list[float]
    loglik: float | None
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")


def flops_per_iteration(n: int, d: int, k: int, cov: str) -> float:
    """Floating-point operations of one EM iteration, counted as the products that dominate.

    full: projections ``(x - mu_k) U_k`` (2nKD^2) and second moments (2nKD^2);
    tied: 2nD^2 + 2nD^2 + 4nKD; diag/spherical: about 10nKD; plus 10nKD for
    log-sum-exp, responsibilities and first moments in every case.
    """
    base = 10.0 * n * k * d
    if cov == "full":
        return 4.0 * n * k * d * d + base
    if cov == "tied":
        return 4.0 * n * d * d + 4.0 * n * k * d + base
    return 2.0 * base


def matmul_gflops(size: int = 2048, repeats: int = 3) -> float:
    """Best float64 matrix-multiply rate of this machine (all cores), in GFLOP/s."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((size, size)), rng.standard_normal((size, size))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best / 1e9


def make_data(shape: dict[str, Any], seed: int) -> tuple[np.ndarray, GMMParams]:
    """The data (float64, in memory) and the common starting parameters."""
    truth = true_params(shape["k"], shape["d"], seed)
    X = mixture_rows(0, shape["n"], truth, seed)
    rng = np.random.default_rng(seed + 1)
    means = truth.means + rng.normal(scale=0.5, size=truth.means.shape)
    cov = truth.covariances
    if shape["cov"] == "diag":
        cov = np.stack([np.diag(c) for c in cov])
    start = GMMParams.from_covariances(
        np.full(shape["k"], 1.0 / shape["k"]), means, cov, shape["cov"]
    )
    return X, start


def mean_loglik(X: np.ndarray, params: GMMParams) -> float:
    """Mean log-likelihood of ``params`` on ``X`` (the same function for every engine)."""
    return float(np.mean(kernels.score_samples_block(X, params)))


def em_chunk_numpy(
    X: np.ndarray,
    sample_weight: np.ndarray | None,
    chunk_index: int,
    row_start: int,
    params: GMMParams,
) -> SuffStats:
    """`dask_em.kernels.em_chunk` through its NumPy path (never the compiled kernel)."""
    with kernels.compiled_kernels(False):
        return kernels.em_chunk(X, sample_weight, chunk_index, row_start, params)


def run_dask_em(
    X: np.ndarray,
    start: GMMParams,
    iters: int,
    store: str,
    cached: bool,
    workers: int,
    name: str,
    em_chunk: Any = kernels.em_chunk,
) -> Row:
    """dask-em on a local cluster of worker processes, data persisted or streamed from Zarr;
    ``em_chunk`` is the chunk E-step (the default, `kernels.e_step("float32")` or
    `em_chunk_numpy`)."""
    import dask.array as da
    from distributed import Client

    from dask_em.cluster import local_cluster

    with (
        local_cluster(workers, 1) as cluster,
        Client(cluster),
    ):
        data = RowData(da.from_zarr(store)).persisted(cached)
        seconds: list[float] = []
        result = run_em(
            lambda p: data.map_reduce(em_chunk, p),
            EMResult(start),
            tol=0.0,
            max_iter=iters,
            reg_covar=1e-6,
            callback=lambda it: seconds.append(it.seconds),
        )
    return Row(
        name, seconds, mean_loglik(X, result.params), f"{workers} worker processes x 1 thread"
    )


def run_sklearn(X: np.ndarray, start: GMMParams, iters: int) -> Row:
    """scikit-learn: per-iteration time from fits of ``iters`` and 1 iteration (init excluded)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    def fit(max_iter: int) -> tuple[float, Any]:
        gm = GaussianMixture(
            start.n_components,
            covariance_type=start.covariance_type,
            tol=0.0,
            max_iter=max_iter,
            reg_covar=1e-6,
            init_params="random_from_data",
            random_state=0,
            weights_init=start.weights,
            means_init=start.means,
            precisions_init=start.precisions,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            began = time.perf_counter()
            gm.fit(X)
        return time.perf_counter() - began, gm

    one, _ = fit(1)
    total, gm = fit(iters)
    per = (total - one) / (iters - 1)
    params = GMMParams(
        gm.weights_, gm.means_, gm.covariances_, gm.precisions_cholesky_, start.covariance_type
    )
    return Row("scikit-learn", [per], mean_loglik(X, params), "(t(iters) - t(1)) / (iters - 1)")


def run_spark(X: np.ndarray, start: GMMParams, iters: int, cores: int) -> Row:
    """Spark MLlib (RDD API, local[cores], data cached) from the same initial model."""
    try:
        from pyspark import SparkConf, SparkContext
        from pyspark.mllib.clustering import GaussianMixture
    except ImportError as err:
        return Row("Spark MLlib", [], None, f"skipped: {err} (pip install -e '.[bench]')")
    covs = start.covariances
    if start.covariance_type != "full":
        covs = np.stack([np.diag(c) for c in covs])
    conf = (
        SparkConf()
        .setMaster(f"local[{cores}]")
        .setAppName("dask-em-bench")
        .set("spark.driver.memory", "12g")
        .set("spark.ui.enabled", "false")
    )
    sc = SparkContext.getOrCreate(conf)
    sc.setLogLevel("ERROR")
    try:
        from pyspark.mllib.linalg import DenseMatrix, DenseVector

        rdd = sc.parallelize([DenseVector(r) for r in X], numSlices=cores * 4).cache()
        rdd.count()
        # MLlib's train() reads k, weights and gaussians[i].mu/.sigma of its initialModel.
        init = SimpleNamespace(
            k=start.n_components,
            weights=[float(w) for w in start.weights],
            gaussians=[
                SimpleNamespace(
                    mu=DenseVector(m),
                    sigma=DenseMatrix(len(m), len(m), c.ravel(order="F").tolist()),
                )
                for m, c in zip(start.means, covs, strict=True)
            ],
        )

        def fit(max_iter: int) -> tuple[float, Any]:
            began = time.perf_counter()
            model = GaussianMixture.train(
                rdd,
                start.n_components,
                convergenceTol=0.0,
                maxIterations=max_iter,
                initialModel=init,
            )
            return time.perf_counter() - began, model

        one, _ = fit(1)
        total, model = fit(iters)
        weights = np.array(model.weights)
        means = np.array([g.mu.toArray() for g in model.gaussians])
        sigmas = np.array([g.sigma.toArray() for g in model.gaussians])
        params = GMMParams.from_covariances(weights, means, sigmas, "full")
        note = (
            "full covariances (MLlib has no other type)" if start.covariance_type != "full" else ""
        )
        return Row(
            f"Spark MLlib local[{cores}]",
            [(total - one) / (iters - 1)],
            mean_loglik(X, params),
            note,
        )
    finally:
        sc.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[s for s in SHAPES if s != "small"], default="A")
    parser.add_argument("--small", action="store_true", help="tiny data: runs in seconds")
    parser.add_argument("--iters", type=int, default=6, help="EM iterations per engine (>= 2)")
    parser.add_argument("--peers", default="sklearn,spark", help="comma list: sklearn, spark")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.iters < 2:
        parser.error("--iters must be at least 2")
    name = "small" if args.small else args.shape
    shape = SHAPES[name]
    peers = {p.strip() for p in args.peers.split(",") if p.strip()}

    X, start = make_data(shape, seed=0)
    gflops_peak = matmul_gflops(512 if args.small else 2048)
    flops = flops_per_iteration(shape["n"], shape["d"], shape["k"], shape["cov"])
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        import dask.array as da

        # The store as `dask-em generate` writes it (Blosc LZ4, see dask_em.io), and the
        # same rows with Zarr's default codec (Zstandard), which decodes more slowly.
        store, zstd_store = os.path.join(tmp, "data.zarr"), os.path.join(tmp, "zstd.zarr")
        blocks = da.from_array(X, chunks=(min(250_000, shape["n"]), -1))
        store_array(blocks, store, kind="data")
        blocks.to_zarr(zstd_store)
        raw_store = os.path.join(tmp, "raw.zarr")
        blocks.to_zarr(raw_store, compressors=None)
        compiled = (
            kernels_compiled.available
            and shape["cov"] == "full"
            and shape["d"] <= kernels_compiled.MAX_FEATURES
        )
        runs = [
            (store, True, "dask-em (cached)", kernels.em_chunk),
            (store, True, "dask-em (cached, NumPy kernel)", em_chunk_numpy),
            (store, True, "dask-em float32 compute (cached)", kernels.e_step("float32")),
            (store, False, "dask-em (streamed from Zarr)", kernels.em_chunk),
            (raw_store, False, "dask-em (streamed, raw store)", kernels.em_chunk),
            (zstd_store, False, "dask-em (streamed, zstd store)", kernels.em_chunk),
        ]
        for path, cached, engine, em_chunk in runs:
            if em_chunk is em_chunk_numpy and not compiled:
                continue
            rows.append(
                run_dask_em(X, start, args.iters, path, cached, args.workers, engine, em_chunk)
            )
    if "sklearn" in peers:
        rows.append(run_sklearn(X, start, args.iters))
    if "spark" in peers:
        rows.append(run_spark(X, start, args.iters, os.cpu_count() or 1))

    ref = rows[0].median
    sk = next((r.loglik for r in rows if r.engine == "scikit-learn"), None)
    print(
        f"shape {name}: {shape['n']:,} x {shape['d']}, K={shape['k']}, {shape['cov']}; {args.iters} iterations, tol=0; "
        f"matmul {gflops_peak:.1f} GFLOP/s; {flops / 1e9:.2f} GFLOP per iteration"
    )
    print(
        f"{'engine':34s} {'s/iter':>9s} {'vs dask-em':>11s} {'GFLOP/s':>8s} {'% matmul':>9s} {'mean loglik':>20s} {'rel. to sklearn':>16s}  note"
    )
    for r in rows:
        rate = flops / r.median / 1e9 if r.seconds else float("nan")
        rel = (
            abs(r.loglik - sk) / abs(sk)
            if (sk is not None and r.loglik is not None)
            else float("nan")
        )
        ll = f"{r.loglik:.12f}" if r.loglik is not None else "-"
        print(
            f"{r.engine:34s} {r.median:9.4f} {r.median / ref:10.2f}x {rate:8.2f} {100 * rate / gflops_peak:8.1f}% {ll:>20s} {rel:16.2e}  {r.note}"
        )
    f32 = next(r for r in rows if r.engine.startswith("dask-em float32"))
    sk_row = next((r for r in rows if r.engine == "scikit-learn"), None)
    versus_sk = f", {sk_row.median / f32.median:.2f}x scikit-learn" if sk_row else ""
    print(f"float32 compute: {ref / f32.median:.2f}x dask-em float64 (cached){versus_sk}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "shape": name,
                    **shape,
                    "iters": args.iters,
                    "matmul_gflops": gflops_peak,
                    "flops_per_iteration": flops,
                    "rows": [
                        {
                            "engine": r.engine,
                            "seconds": r.seconds,
                            "median": r.median,
                            "loglik": r.loglik,
                            "note": r.note,
                        }
                        for r in rows
                    ],
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
