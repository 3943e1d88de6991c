"""Seconds per EM pass against the number of tasks and of workers: a scale-out model.

Three sweeps time real dask-em EM passes (`dask_em.em.run_em`, ``tol=0``, each E-step
one `dask_em.reduce.RowData` pass of `dask_em.kernels.em_chunk`: the graph built on the
client, then computed on a `dask_em.cluster.local_cluster` of worker processes x 1 thread)
over Zarr stores of tiny chunks (a few rows each, read by `dask_em.io.open_array` as a
fit reads them), so per-task costs (the scheduler's, each task's read), not the
arithmetic, set the time:

- chunks: 10 to 30,000 chunks (tasks) per pass on as many workers as cores (``--chunks``
  takes more: 100,000 is about 15 minutes per pass on 2 loaded cores);
- workers: 1 to 32 worker processes on a fixed number of chunks;
- fan-in: the reduction tree's ``split_every`` (2 to 64) on a fixed number of chunks,
  which changes its depth.

The seconds are fitted (non-negative least squares) to

    pass = fixed + serial x tasks + parallel x tasks / min(workers, cores) + level x depth

where ``tasks`` counts the chunk tasks and the tree's combine tasks, ``depth`` is the
tree's number of levels (ceil(log_fanin(chunks))), ``serial`` is the per-task cost paid
by the one client and the one scheduler (it does not shrink with workers or nodes) and
``parallel`` the per-task cost paid by a worker. The script then measures the E-step's
cost per row at D=32, K=16 full in one thread and extrapolates one pass over 10^10 rows
x 32 features on 100 nodes for a range of chunk sizes, under the assumptions given on
the command line (printed with the result).

    OPENBLAS_NUM_THREADS=1 python benchmarks/scaling.py              # 30 min on 2 loaded cores
    OPENBLAS_NUM_THREADS=1 python benchmarks/scaling.py --json out.json
    python benchmarks/scaling.py --small                             # seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from dask_em import kernels
from dask_em.datasets import mixture_rows, true_params
from dask_em.em import EMResult, run_em
from dask_em.io import ARRAY_COMPRESSORS, open_array
from dask_em.params import GMMParams
from dask_em.reduce import TASK_MEMORY_FACTOR, RowData

MiB = 2**20
GiB = 2**30


@dataclass
class Pass:
    """One timed EM pass.

    Attributes
    ----------
    sweep : str
        ``'chunks'``, ``'workers'`` or ``'fan-in'``.
    chunks, workers, split_every : int
        The configuration.
    tasks : int
        Chunk tasks plus combine tasks of the pass's graph.
    depth : int
        Levels of the reduction tree.
    build, compute : float
        Seconds building the graph on the client, and computing it.
    """

    sweep: str
    chunks: int
    workers: int
    split_every: int
    tasks: int
    depth: int
    build: float
    compute: float

    @property
    def seconds(self) -> float:
        """Wall time of the pass (build + compute)."""
        return self.build + self.compute


def tree_shape(chunks: int, split_every: int) -> tuple[int, int]:
    """``(combine tasks, levels)`` of `RowData`'s reduction tree over ``chunks`` results."""
    combines, levels = 0, 0
    while chunks > 1:
        chunks = -(-chunks // split_every)
        combines += chunks
        levels += 1
    return combines, levels


def write_store(path: Path, chunks: int, chunk_rows: int, d: int, truth: GMMParams) -> None:
    """Write ``chunks`` x ``chunk_rows`` mixture rows of ``truth`` in ``chunk_rows``-row chunks
    (compressed as dask-em writes data)."""
    z = zarr.create_array(
        store=str(path),
        shape=(chunks * chunk_rows, d),
        chunks=(chunk_rows, d),
        dtype="f8",
        compressors=list(ARRAY_COMPRESSORS),
    )
    z[:] = mixture_rows(0, chunks * chunk_rows, truth, seed=0)


def time_passes(
    store: Path, chunk_rows: int, split_every: int, start: GMMParams, passes: int
) -> list[tuple[float, float]]:
    """``(build, compute)`` seconds of each of ``passes`` EM passes over ``store``.

    The chunks' delayed reads are made and the graph built once before the timed passes
    (setup, as a fit's first pass pays it), so each timed pass is what every later EM
    iteration costs.
    """
    data = RowData(open_array(store, chunk_rows=chunk_rows), split_every=split_every)
    data.build(kernels.em_chunk, start.params)
    timings: list[tuple[float, float]] = []

    def e_step(params: GMMParams) -> Any:
        began = time.perf_counter()
        graph = data.build(kernels.em_chunk, params)
        built = time.perf_counter()
        stats = graph.compute()
        timings.append((built - began, time.perf_counter() - built))
        return stats

    run_em(e_step, start, tol=0.0, max_iter=passes, reg_covar=1e-6)
    return timings


def fit_model(runs: list[Pass], cores: int) -> tuple[dict[str, float], np.ndarray]:
    """Non-negative least squares of the pass seconds on the model's four terms.

    Returns
    -------
    constants : dict
        ``fixed`` (s), ``serial`` and ``parallel`` (s per task), ``level`` (s per level).
    predicted : ndarray of shape (len(runs),)
        Seconds the fitted model gives each run.
    """
    from scipy.optimize import nnls

    A = np.array(
        [[1.0, r.tasks, r.tasks / min(r.workers, cores), r.depth] for r in runs], dtype=float
    )
    y = np.array([r.seconds for r in runs])
    # relative least squares: each pass counts by its relative error, not its seconds
    coef, _ = nnls(A / y[:, None], np.ones_like(y))
    constants = dict(zip(("fixed", "serial", "parallel", "level"), coef.tolist(), strict=True))
    return constants, A @ coef


def kernel_seconds_per_row(d: int, k: int, rows: int, repeats: int) -> float:
    """Best-of-``repeats`` seconds per row of `kernels.em_chunk` on ``rows`` x ``d``, K=``k``
    full, in one thread."""
    from threadpoolctl import threadpool_limits

    truth = true_params(k, d, 0)
    X = mixture_rows(0, rows, truth, seed=1)
    best = math.inf
    with threadpool_limits(1):
        for _ in range(repeats):
            began = time.perf_counter()
            kernels.em_chunk(X, None, 0, 0, truth)
            best = min(best, time.perf_counter() - began)
    return best / rows


@dataclass
class Cluster:
    """What the extrapolation assumes of the big cluster."""

    rows: float
    features: int
    nodes: int
    cores_per_node: int
    node_read_gbs: float
    node_memory_gib: float
    network_gbits: float


def extrapolate(
    constants: dict[str, float],
    row_seconds: float,
    big: Cluster,
    chunk_mib: list[float],
    split_every: int,
    stats_bytes: int,
) -> list[dict[str, float]]:
    """Estimated seconds of one pass over ``big`` for each chunk size.

    ``data`` is the time for the workers to read and compute every row (whichever is
    slower: aggregate read bandwidth or aggregate E-step rate) plus their per-task cost,
    ``scheduler`` the serial
    per-task cost times the tasks (one scheduler, one client, whatever the nodes),
    ``tail`` the last task of the pass (a core finishing one chunk while the others
    idle), ``tree`` the levels of the reduction, each also moving ``split_every``
    partial statistics over the network. The scheduler hands out tasks while the
    workers run them, so a pass is about ``fixed + max(scheduler, data) + tail + tree``;
    ``additive`` is the pessimistic sum with no overlap.
    """
    row_bytes = 8 * big.features
    total_bytes = big.rows * row_bytes
    cores = big.nodes * big.cores_per_node
    read_row = row_bytes * big.cores_per_node / (big.node_read_gbs * 1e9)  # s/row on a core
    per_row = max(row_seconds, read_row)  # a core's seconds per row, reading and computing
    out = []
    for mib in chunk_mib:
        chunk_bytes = mib * MiB
        rows = chunk_bytes / row_bytes
        chunks = math.ceil(big.rows / rows)
        combines, depth = tree_shape(chunks, split_every)
        tasks = chunks + combines
        scheduler = constants["serial"] * tasks
        data = (big.rows * per_row + constants["parallel"] * tasks) / cores
        tail = rows * per_row
        hop = split_every * stats_bytes * 8 / (big.network_gbits * 1e9)
        tree = depth * (constants["level"] + hop)
        memory = TASK_MEMORY_FACTOR * chunk_bytes * big.cores_per_node / GiB
        out.append(
            {
                "chunk_mib": mib,
                "rows_per_chunk": rows,
                "tasks": tasks,
                "depth": depth,
                "scheduler_s": scheduler,
                "data_s": data,
                "tail_s": tail,
                "tree_s": tree,
                "pass_s": constants["fixed"] + max(scheduler, data) + tail + tree,
                "additive_s": constants["fixed"] + scheduler + data + tail + tree,
                "node_memory_gib": memory,
                "fits": memory <= big.node_memory_gib,
                "total_bytes": total_bytes,
            }
        )
    return out


def ints(text: str) -> list[int]:
    """``'10,1e3'`` -> ``[10, 1000]``."""
    return [int(float(v)) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", default="10,100,1000,3000,10000,30000")
    parser.add_argument("--workers", default="1,2,4,8,16,32")
    parser.add_argument("--fan-ins", default="2,4,16,64", help="split_every values")
    parser.add_argument("--fixed-chunks", type=int, default=1000, help="for workers, fan-in")
    parser.add_argument("--chunk-rows", type=int, default=4, help="rows per tiny chunk")
    parser.add_argument("--d", type=int, default=8)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--passes", type=int, default=2, help="timed passes per config")
    parser.add_argument(
        "--pass-tasks", type=int, default=3_000, help="configs over this many chunks: 1 pass"
    )
    parser.add_argument("--kernel-rows", type=int, default=65_536)
    # the cluster of the extrapolation
    parser.add_argument("--big-rows", type=float, default=1e10)
    parser.add_argument("--big-features", type=int, default=32)
    parser.add_argument("--big-components", type=int, default=16)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--cores-per-node", type=int, default=32)
    parser.add_argument("--node-read-gbs", type=float, default=1.0, help="GB/s per node")
    parser.add_argument("--node-memory-gib", type=float, default=128.0)
    parser.add_argument("--network-gbits", type=float, default=25.0, help="Gbit/s per node")
    parser.add_argument("--chunk-mib", default="8,32,64,128,256,512,1024,2048")
    parser.add_argument("--small", action="store_true", help="seconds: tiny sweeps")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    if args.small:
        args.chunks, args.workers, args.fan_ins = "10,50", "1,2", "2,16"
        args.fixed_chunks, args.passes, args.kernel_rows = 50, 1, 4096
    chunk_counts, worker_counts, fan_ins = ints(args.chunks), ints(args.workers), ints(args.fan_ins)
    cores = os.cpu_count() or 1
    began = time.perf_counter()

    from distributed import Client

    from dask_em.cluster import local_cluster

    truth = true_params(args.k, args.d, 0)
    start = EMResult(
        GMMParams.from_covariances(truth.weights, truth.means + 0.3, truth.covariances, "full")
    )
    runs: list[Pass] = []
    load = os.getloadavg()

    def measure(sweep: str, store: Path, chunks: int, workers: int, split_every: int) -> None:
        passes = args.passes if chunks <= args.pass_tasks else 1
        combines, depth = tree_shape(chunks, split_every)
        for build, compute in time_passes(store, args.chunk_rows, split_every, start, passes):
            runs.append(
                Pass(sweep, chunks, workers, split_every, chunks + combines, depth, build, compute)
            )
        last = runs[-1]
        print(
            f"{sweep:>7}  chunks {chunks:>7,}  workers {workers:>2}  split_every "
            f"{split_every:>2}  tasks {last.tasks:>7,}  depth {depth:>2}  "
            f"{np.median([r.seconds for r in runs[-passes:]]):8.3f} s/pass",
            flush=True,
        )

    with tempfile.TemporaryDirectory() as tmp:
        stores: dict[int, Path] = {}
        written = time.perf_counter()
        for chunks in sorted({*chunk_counts, args.fixed_chunks}):
            stores[chunks] = Path(tmp) / f"chunks-{chunks}.zarr"
            write_store(stores[chunks], chunks, args.chunk_rows, args.d, truth)
        written = time.perf_counter() - written
        print(f"stores written in {written:.0f} s", flush=True)
        base = min(cores, max(worker_counts))
        with local_cluster(base, 1) as cluster, Client(cluster) as client:
            for chunks in chunk_counts:
                measure("chunks", stores[chunks], chunks, base, 8)
            for split_every in fan_ins:
                measure("fan-in", stores[args.fixed_chunks], args.fixed_chunks, base, split_every)
            for workers in worker_counts:
                cluster.scale(workers)
                client.wait_for_workers(workers)
                while len(client.scheduler_info(n_workers=-1)["workers"]) > workers:
                    time.sleep(0.1)
                measure("workers", stores[args.fixed_chunks], args.fixed_chunks, workers, 8)
    load = tuple(max(a, b) for a, b in zip(load, os.getloadavg(), strict=True))
    swept = time.perf_counter() - began

    constants, predicted = fit_model(runs, cores)
    row_seconds = kernel_seconds_per_row(
        args.big_features, args.big_components, args.kernel_rows, 3
    )
    big = Cluster(
        args.big_rows,
        args.big_features,
        args.nodes,
        args.cores_per_node,
        args.node_read_gbs,
        args.node_memory_gib,
        args.network_gbits,
    )
    d, k = args.big_features, args.big_components
    stats_bytes = 8 * k * (1 + d + d * d)
    table = extrapolate(
        constants, row_seconds, big, [float(m) for m in args.chunk_mib.split(",")], 8, stats_bytes
    )

    print(
        f"\n{args.chunk_rows}-row chunks of {args.d} float64 features (Zarr, Blosc LZ4), "
        f"K={args.k} full, {cores} cores, worker processes x 1 thread; "
        f"load average {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f} (highest seen); "
        f"sweeps {swept:.0f} s (stores {written:.0f} s)"
    )
    print(
        f"{'sweep':>7}  {'chunks':>7}  {'workers':>7}  {'fan-in':>6}  {'tasks':>7}  "
        f"{'depth':>5}  {'build s':>8}  {'compute s':>9}  {'pass s':>8}  {'model s':>8}  {'resid':>6}"
    )
    groups: dict[tuple[str, int, int, int], list[int]] = {}
    for i, r in enumerate(runs):
        groups.setdefault((r.sweep, r.chunks, r.workers, r.split_every), []).append(i)
    for (sweep, chunks, workers, fan), idx in groups.items():
        r = runs[idx[0]]
        build = float(np.median([runs[i].build for i in idx]))
        compute = float(np.median([runs[i].compute for i in idx]))
        seconds = float(np.median([runs[i].seconds for i in idx]))
        model = float(np.median(predicted[idx]))
        print(
            f"{sweep:>7}  {chunks:>7,}  {workers:>7}  {fan:>6}  {r.tasks:>7,}  {r.depth:>5}  "
            f"{build:>8.3f}  {compute:>9.3f}  {seconds:>8.3f}  {model:>8.3f}  "
            f"{(seconds - model) / seconds:>+6.0%}"
        )
    rel = (np.array([r.seconds for r in runs]) - predicted) / np.array([r.seconds for r in runs])
    print(
        f"\nfitted: pass = {constants['fixed'] * 1e3:.1f} ms + "
        f"{constants['serial'] * 1e6:.0f} us x tasks (client + scheduler, serial) + "
        f"{constants['parallel'] * 1e6:.0f} us x tasks / min(workers, {cores}) + "
        f"{constants['level'] * 1e3:.1f} ms x depth; "
        f"relative residuals: median |{np.median(np.abs(rel)):.0%}|, worst {rel[np.argmax(np.abs(rel))]:+.0%} "
        f"over {len(runs)} passes"
    )
    build_share = sum(r.build for r in runs) / sum(r.seconds for r in runs)
    print(f"client graph building: {build_share:.0%} of the measured pass seconds")
    print(
        f"E-step kernel: {row_seconds * 1e9:.0f} ns per row at D={d}, K={k} full, one thread "
        f"({1 / row_seconds / 1e6:.2f} M rows/s per core)"
    )
    row_bytes = 8 * d
    print(
        f"\none pass over {big.rows:.0e} rows x {d} float64 ({big.rows * row_bytes / 1e12:.2f} TB), "
        f"K={k} full, on {big.nodes} nodes x {big.cores_per_node} cores "
        f"({big.nodes * big.cores_per_node:,} worker threads), each node reading "
        f"{big.node_read_gbs:g} GB/s, {big.node_memory_gib:g} GiB, {big.network_gbits:g} Gbit/s; "
        f"one scheduler at this machine's serial cost per task; fan-in 8"
    )
    print(
        f"{'chunk':>9}  {'rows/chunk':>11}  {'tasks':>9}  {'depth':>5}  {'scheduler s':>11}  "
        f"{'data s':>7}  {'tail s':>7}  {'tree s':>6}  {'pass s':>7}  {'additive s':>10}  "
        f"{'node GiB':>8}"
    )
    for row in table:
        print(
            f"{row['chunk_mib']:>5g} MiB  {row['rows_per_chunk']:>11,.0f}  {row['tasks']:>9,}  "
            f"{row['depth']:>5}  {row['scheduler_s']:>11.1f}  {row['data_s']:>7.1f}  "
            f"{row['tail_s']:>7.1f}  {row['tree_s']:>6.2f}  {row['pass_s']:>7.1f}  "
            f"{row['additive_s']:>10.1f}  {row['node_memory_gib']:>8.0f}"
            + ("" if row["fits"] else "  (over memory)")
        )
    fitting = [row for row in table if row["fits"]]
    best = min(fitting, key=lambda row: (row["pass_s"], row["additive_s"]))
    print(
        f"recommended chunk: {best['chunk_mib']:g} MiB ({best['rows_per_chunk']:,.0f} rows), "
        f"about {best['pass_s']:.0f} s per pass ({best['additive_s']:.0f} s with no overlap)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "runs": [asdict(r) for r in runs],
                    "load_average": load,
                    "constants": constants,
                    "kernel_seconds_per_row": row_seconds,
                    "assumptions": asdict(big),
                    "extrapolation": table,
                    "recommended_chunk_mib": best["chunk_mib"],
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
